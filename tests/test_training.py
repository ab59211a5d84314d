"""train_runs: independent seeded runs, vectorized, sequential and on executors."""

import functools
import math
import multiprocessing
import os
import time
from concurrent.futures import BrokenExecutor, Future, ProcessPoolExecutor, ThreadPoolExecutor
from concurrent.futures.process import BrokenProcessPool

import pyro
import pyro.distributions as dist
import pytest
import torch
from pyro.infer import Predictive
from pyro.infer.autoguide import AutoDiagonalNormal, AutoNormal
from pyro.infer.autoguide.initialization import init_to_sample

import pyro_symmetry as ps
from pyro_symmetry._state import snapshot

N_OBS = 10
Y = torch.linspace(-1.0, 2.0, N_OBS)


def conjugate_model(y=None):
    """mu ~ N(0, 1), y_i ~ N(mu, 1): the posterior is N(sum y / (N + 1), 1 / (N + 1))."""
    mu = pyro.sample("mu", dist.Normal(0.0, 1.0))
    with pyro.plate("data", N_OBS):
        pyro.sample("y", dist.Normal(mu, 1.0), obs=y)


def _make_conjugate():
    return conjugate_model


EXACT_LOC = float(Y.sum() / (N_OBS + 1))
EXACT_SCALE = float((1.0 / (N_OBS + 1)) ** 0.5)


def _optim():
    return pyro.optim.ClippedAdam({"lr": 0.05, "lrd": 0.99})


@pytest.mark.parametrize("vectorize", [True, False])
def test_runs_reach_the_exact_posterior_of_a_conjugate_model(vectorize):
    runs = ps.train_runs(
        _make_conjugate,
        lambda m: AutoNormal(m, init_loc_fn=init_to_sample),
        (Y,),
        3,
        steps=400,
        optim=_optim(),
        vectorize=vectorize,
        progress=False,
    )
    assert len(runs) == 3
    inits = []
    for run in runs:
        (loc, scale) = ps.gaussian_params(run.guide)["mu"]
        # The final Adam iterate fluctuates with the ELBO's noise: over 40 runs of 8 seeds its
        # deviation from the exact value had sd 0.017 (loc) and 0.015 (scale); 0.08 is ~5 sd.
        assert float(loc) == pytest.approx(EXACT_LOC, abs=0.08)
        assert float(scale) == pytest.approx(EXACT_SCALE, abs=0.08)
        assert run.losses.shape == (400,)
        inits.append(float(run.losses[0]))
    assert len(set(inits)) == 3, "runs must start from independent initializations"
    assert (runs[0].seed is None) == vectorize


def test_vectorized_runs_are_independent_guides_with_their_own_parameter_stores():
    x, y = torch.randn(15, 2), torch.randint(0, 2, (15,))
    runs = ps.train_runs(
        lambda: ps.models.BayesianMLP(2, [3], 2),
        lambda m: AutoNormal(m, init_loc_fn=init_to_sample, init_scale=0.05),
        (x, y),
        2,
        steps=20,
        progress=False,
    )
    locs = [ps.gaussian_params(r.guide)["fc1.weight"][0] for r in runs]
    assert not torch.allclose(locs[0], locs[1])
    for r, run in enumerate(runs):
        stored = run.state["params"]["AutoNormal.locs.fc1.weight"]
        assert torch.equal(stored, locs[r])
        # Evaluating with Pyro inside the run's own store sees that run's parameters.
        with pyro.get_param_store().scope(run.state):
            pred = Predictive(run.model, guide=run.guide, num_samples=200, return_sites=["fc1.weight"])(x)
        assert (pred["fc1.weight"].mean(0) - locs[r]).abs().max() < 0.05


def test_process_pool_matches_in_process_training():
    x = torch.linspace(-1, 1, 12)[:, None]
    y = (x[:, 0] > 0).long()
    make_model = functools.partial(ps.models.BayesianMLP, 1, [2], 2)
    make_guide = functools.partial(AutoDiagonalNormal, init_scale=0.05)
    kwargs = dict(steps=10, seed=5, progress=False, num_threads=1)
    local = ps.train_runs(make_model, make_guide, (x, y), 2, **kwargs)
    with ProcessPoolExecutor(2, mp_context=multiprocessing.get_context("spawn")) as pool:
        remote = ps.train_runs(make_model, make_guide, (x, y), 2, executor=pool, **kwargs)
    torch.set_num_threads(2)
    for a, b in zip(local, remote):
        assert a.seed == b.seed
        assert torch.allclose(a.losses, b.losses, rtol=1e-4)
        qa, qb = ps.gaussian_params(a.guide), ps.gaussian_params(b.guide)
        for k in qa:
            assert torch.allclose(qa[k][0], qb[k][0], atol=1e-5)
            assert torch.allclose(qa[k][1], qb[k][1], atol=1e-5)
    assert not torch.allclose(
        ps.gaussian_params(local[0].guide)["fc1.weight"][0], ps.gaussian_params(local[1].guide)["fc1.weight"][0]
    )


def test_dask_executor():
    distributed = pytest.importorskip("dask.distributed")
    with distributed.LocalCluster(n_workers=1, threads_per_worker=1, processes=False) as cluster:
        with distributed.Client(cluster) as client:
            runs = ps.train_runs(
                _make_conjugate, AutoNormal, (Y,), 2, steps=5, executor=client.get_executor(), progress=False
            )
    assert len(runs) == 2 and runs[0].losses.shape == (5,)


def test_bad_arguments():
    with pytest.raises(ValueError, match="num_runs"):
        ps.train_runs(_make_conjugate, AutoNormal, (Y,), 0, steps=1)
    with pytest.raises(ValueError, match="steps"):
        ps.train_runs(_make_conjugate, AutoNormal, (Y,), 1, steps=0)
    with pytest.raises(TypeError, match="Executor"):
        ps.train_runs(_make_conjugate, AutoNormal, (Y,), 1, steps=1, executor=object())
    with pytest.raises(ValueError, match="AutoNormal"):
        ps.train_runs(_make_conjugate, AutoDiagonalNormal, (Y,), 1, steps=1, vectorize=True, progress=False)


def test_a_given_loss_is_the_one_trained():
    """With ``loss=`` the runs train with that ELBO (sequentially), never silently with another."""
    calls = []

    class CountingELBO(pyro.infer.Trace_ELBO):
        def loss_and_grads(self, model, guide, *args, **kwargs):
            calls.append(1)
            return super().loss_and_grads(model, guide, *args, **kwargs)

    runs = ps.train_runs(_make_conjugate, AutoNormal, (Y,), 2, steps=3, loss=CountingELBO(), progress=False)
    assert len(calls) == 6 and [r.seed for r in runs] == [0, 1]
    with pytest.raises(ValueError, match="vectorize=True .* cannot use loss="):
        ps.train_runs(_make_conjugate, AutoNormal, (Y,), 2, steps=3, loss=CountingELBO(), vectorize=True)


# ---------------------------------------------------------------------- failures, executors, side effects
X_CLS = torch.linspace(-1, 1, 12)[:, None]
Y_CLS = (X_CLS[:, 0] > 0).long()
make_mlp = functools.partial(ps.models.BayesianMLP, 1, [2], 2)
make_diag = functools.partial(AutoDiagonalNormal, init_scale=0.05)


def _guide_failing_for_seed(model, seed=1):
    """AutoDiagonalNormal, except for the run seeded with ``seed`` (torch's initial seed)."""
    if torch.initial_seed() == seed:
        raise RuntimeError(f"make_guide failed for seed {seed}")
    return make_diag(model)


def _guide_killing_its_worker(model, seed=1):
    if torch.initial_seed() == seed:
        # Give the pool's manager thread time to read the previous run's result: a result
        # still in the pipe when a worker dies is failed with the whole pool (CPython's
        # ProcessPoolExecutor), which made this test flaky on a loaded machine.
        time.sleep(1.0)
        os._exit(3)  # the worker process dies without a word
    return make_diag(model)


def _guide_killing_its_worker_once(model, marker, seed=1):
    if torch.initial_seed() == seed and not os.path.exists(marker):
        open(marker, "w").close()
        os._exit(3)
    return make_diag(model)


class _BadAfter:
    """A model whose log-joint is -inf (``how="inf"``) or that raises (``"raise"``) from its
    ``step``-th SVI step on, for the run seeded ``seed`` only."""

    def __init__(self, step, how, seed=1):
        self.net, self.step, self.how, self.calls = make_mlp(), step, how, 0
        self.bad = torch.initial_seed() == seed

    def __call__(self, x, y=None):
        self.calls += 1
        if self.bad and self.calls > self.step + 1:  # +1: the guide's set-up traces the model once
            if self.how == "raise":
                raise RuntimeError("the model broke")
            pyro.sample("impossible", dist.Normal(0.0, 1.0), obs=torch.tensor(math.inf))
        return self.net(x, y)


def _single(seed, **kwargs):
    return ps.train_runs(
        make_mlp, _guide_failing_for_seed, (X_CLS, Y_CLS), 1, steps=5, seed=seed, progress=False, **kwargs
    )[0]


def _same_run(a, b):
    assert a.error is None and b.error is None and a.seed == b.seed
    assert torch.equal(a.losses, b.losses)
    qa, qb = ps.gaussian_params(a.guide), ps.gaussian_params(b.guide)
    assert all(torch.equal(qa[k][0], qb[k][0]) and torch.equal(qa[k][1], qb[k][1]) for k in qa)


def test_on_error_keep_returns_finished_runs_intact_and_marks_the_failed_one():
    kwargs = dict(steps=5, progress=False, on_error="keep")
    with pytest.warns(UserWarning, match=r"1 of 3 runs failed.*run 1 \(seed 1\): RuntimeError: make_guide failed"):
        runs = ps.train_runs(make_mlp, _guide_failing_for_seed, (X_CLS, Y_CLS), 3, **kwargs)
    assert [r.seed for r in runs] == [0, 1, 2]
    assert isinstance(runs[1].error, RuntimeError) and runs[1].guide is None and runs[1].model is None
    assert runs[1].losses.shape == (5,) and torch.isnan(runs[1].losses).all()
    for r in (0, 2):
        _same_run(runs[r], _single(r))
    with pytest.raises(RuntimeError, match="make_guide failed for seed 1"):
        ps.train_runs(make_mlp, _guide_failing_for_seed, (X_CLS, Y_CLS), 3, steps=5, progress=False)
    with pytest.raises(ValueError, match="on_error must be one of"):
        ps.train_runs(make_mlp, AutoNormal, (X_CLS, Y_CLS), 1, steps=1, on_error="ignore")


@pytest.mark.parametrize("how", ["inf", "raise"])
def test_on_error_keep_marks_a_diverged_or_raising_run_and_keeps_its_partial_losses(how):
    """A loss that turns infinite (no exception: the guide is kept, marked as diverged) or a
    run that raises mid-way (no guide); the losses reached are kept, NaN beyond."""
    make_model = functools.partial(_BadAfter, 2, how)
    pattern = "ValueError: run 1 .seed 1. diverged: its loss is inf at step 2" if how == "inf" else "model broke"
    with pytest.warns(UserWarning, match=r"1 of 3 runs failed.*" + pattern):
        runs = ps.train_runs(
            make_model, AutoDiagonalNormal, (X_CLS, Y_CLS), 3, steps=4, progress=False, on_error="keep"
        )
    assert runs[0].error is None and runs[2].error is None
    assert torch.isfinite(runs[1].losses[:2]).all()
    if how == "inf":
        assert isinstance(runs[1].error, ValueError) and runs[1].guide is not None
        assert torch.isinf(runs[1].losses[2:]).all()
    else:
        assert isinstance(runs[1].error, RuntimeError) and runs[1].guide is None
        assert torch.isnan(runs[1].losses[2:]).all()
    with pytest.raises((ValueError, RuntimeError), match="diverged" if how == "inf" else "model broke"):
        ps.train_runs(make_model, AutoDiagonalNormal, (X_CLS, Y_CLS), 3, steps=4, progress=False)


def _model_refusing_the_runs_plate():
    net = make_mlp()

    def model(x, y=None):
        if any(f.name == "_runs" for f in pyro.poutine.runtime._PYRO_STACK if hasattr(f, "name")):
            raise RuntimeError("this model cannot run under the runs plate")
        return net(x, y)

    return model


def test_on_error_keep_trains_one_by_one_when_the_vectorized_problem_fails():
    with pytest.warns(UserWarning, match="vectorized runs failed"):
        runs = ps.train_runs(
            _model_refusing_the_runs_plate, AutoNormal, (X_CLS, Y_CLS), 2, steps=3, progress=False, on_error="keep"
        )
    assert [r.error for r in runs] == [None, None] and [r.seed for r in runs] == [0, 1]
    with pytest.raises(RuntimeError, match="runs plate"):
        ps.train_runs(_model_refusing_the_runs_plate, AutoNormal, (X_CLS, Y_CLS), 2, steps=3, progress=False)


class _Counter:
    def __init__(self, fn):
        self.fn, self.calls = fn, 0

    def __call__(self, *args, **kwargs):
        self.calls += 1
        return self.fn(*args, **kwargs)


@pytest.mark.parametrize(
    "how",
    ["vectorized", "sequential", "fallback from vectorize=None", "thread pool"],
)
def test_make_model_is_called_once_per_run(how):
    make_model = _Counter(make_mlp)
    guide = AutoNormal if how == "vectorized" else AutoDiagonalNormal
    kwargs = dict(steps=3, progress=False, vectorize={"vectorized": True, "sequential": False}.get(how))
    if how == "thread pool":
        with ThreadPoolExecutor(2) as pool:
            runs = ps.train_runs(make_model, guide, (X_CLS, Y_CLS), 3, executor=pool, **kwargs)
    else:
        runs = ps.train_runs(make_model, guide, (X_CLS, Y_CLS), 3, **kwargs)
    assert make_model.calls == 3 and len({id(r.model) for r in runs}) == 3


def test_the_first_sequential_run_is_the_same_whether_or_not_vectorization_was_tried():
    """After vectorize=None finds a guide it cannot vectorize, run 0 reuses the model that
    attempt built, with torch's RNG where building it left it: the same run as vectorize=False."""
    a = ps.train_runs(make_mlp, AutoDiagonalNormal, (X_CLS, Y_CLS), 2, steps=4, progress=False)
    b = ps.train_runs(make_mlp, AutoDiagonalNormal, (X_CLS, Y_CLS), 2, steps=4, progress=False, vectorize=False)
    for ra, rb in zip(a, b):
        _same_run(ra, rb)


@pytest.mark.parametrize("vectorize", [True, False])
def test_train_runs_leaves_threads_rngs_dtype_and_param_store_as_found(vectorize):
    pyro.param("users_own", torch.ones(2))
    torch.set_num_threads(2)
    before = snapshot()
    try:
        ps.train_runs(
            make_mlp, AutoNormal, (X_CLS, Y_CLS), 2, steps=2, num_threads=1, vectorize=vectorize, progress=False
        )
        assert snapshot().diff(before) == []
    finally:
        torch.set_num_threads(2)


def test_thread_pool_runs_take_turns_and_match_in_process_training():
    local = ps.train_runs(make_mlp, AutoDiagonalNormal, (X_CLS, Y_CLS), 3, steps=10, seed=5, progress=False)
    with ThreadPoolExecutor(3) as pool:
        threaded = ps.train_runs(
            make_mlp, AutoDiagonalNormal, (X_CLS, Y_CLS), 3, steps=10, seed=5, progress=False, executor=pool
        )
    for a, b in zip(local, threaded):
        _same_run(a, b)


class _LosingExecutor:
    """Runs tasks at once in this process, but the first ``lose`` submissions of the run
    seeded ``seed`` come back as a lost worker (``BrokenExecutor``)."""

    def __init__(self, seed=1, lose=1):
        self.seed, self.lose, self.submitted = seed, lose, []

    def submit(self, fn, *args):
        fut = Future()
        self.submitted.append(args[1])
        if args[1] == self.seed and self.submitted.count(self.seed) <= self.lose:
            fut.set_exception(BrokenExecutor("the worker died"))
        else:
            fut.set_result(fn(*args))
        return fut


def test_a_run_whose_worker_was_lost_is_retried_once():
    pool = _LosingExecutor(lose=1)
    runs = ps.train_runs(make_mlp, AutoDiagonalNormal, (X_CLS, Y_CLS), 3, steps=4, progress=False, executor=pool)
    assert sorted(pool.submitted) == [0, 1, 1, 2] and all(r.error is None for r in runs)
    _same_run(
        runs[1], ps.train_runs(make_mlp, AutoDiagonalNormal, (X_CLS, Y_CLS), 1, steps=4, seed=1, progress=False)[0]
    )
    pool = _LosingExecutor(lose=2)
    with pytest.warns(UserWarning, match="1 of 3 runs failed"):
        runs = ps.train_runs(
            make_mlp, AutoDiagonalNormal, (X_CLS, Y_CLS), 3, steps=4, progress=False, executor=pool, on_error="keep"
        )
    assert sorted(pool.submitted) == [0, 1, 1, 2]
    assert isinstance(runs[1].error, BrokenExecutor) and runs[0].error is None and runs[2].error is None
    assert "lost 2 time(s)" in "".join(getattr(runs[1].error, "__notes__", []))
    with pytest.raises(BrokenExecutor):
        ps.train_runs(
            make_mlp, AutoDiagonalNormal, (X_CLS, Y_CLS), 3, steps=4, progress=False, executor=_LosingExecutor(lose=2)
        )


def test_a_dead_process_pool_worker_loses_no_finished_run():
    """One worker, runs in seed order: run 0 finishes, run 1 kills the worker; a broken
    process pool takes no more tasks, so runs 1 and 2 are marked, run 0 is kept."""
    ctx = multiprocessing.get_context("spawn")
    with ProcessPoolExecutor(1, mp_context=ctx) as pool, pytest.warns(UserWarning, match="2 of 3 runs failed"):
        runs = ps.train_runs(
            make_mlp,
            _guide_killing_its_worker,
            (X_CLS, Y_CLS),
            3,
            steps=4,
            progress=False,
            executor=pool,
            on_error="keep",
            num_threads=1,
        )
    assert runs[0].error is None
    _same_run(
        runs[0],
        ps.train_runs(make_mlp, make_diag, (X_CLS, Y_CLS), 1, steps=4, seed=0, progress=False, num_threads=1)[0],
    )
    assert all(isinstance(r.error, BrokenProcessPool) for r in runs[1:])


@pytest.mark.slow  # worker processes import torch and pyro (about a minute on 2 busy cores)
def test_a_run_whose_dask_worker_died_is_retried_and_the_others_are_untouched(tmp_path):
    """Dask replaces a dead worker; with its own retries off, our one retry re-runs the run."""
    distributed = pytest.importorskip("distributed")
    import dask

    marker = str(tmp_path / "died")
    make_guide = functools.partial(_guide_killing_its_worker_once, marker=marker)
    with dask.config.set({"distributed.scheduler.allowed-failures": 0}):
        with distributed.LocalCluster(n_workers=1, threads_per_worker=1, processes=True) as cluster:
            with distributed.Client(cluster) as client:
                runs = ps.train_runs(
                    make_mlp, make_guide, (X_CLS, Y_CLS), 3, steps=4, progress=False, executor=client, num_threads=1
                )
    assert os.path.exists(marker) and all(r.error is None for r in runs)
    for r in range(3):
        _same_run(
            runs[r],
            ps.train_runs(make_mlp, make_diag, (X_CLS, Y_CLS), 1, steps=4, seed=r, progress=False, num_threads=1)[0],
        )


@pytest.mark.parametrize("which", ["make_model", "make_guide"])
def test_a_factory_a_process_pool_cannot_pickle_is_named(which):
    def local_factory(*args):
        return (make_mlp if which == "make_model" else AutoDiagonalNormal)(*args)

    factories = {"make_model": make_mlp, "make_guide": AutoDiagonalNormal, which: local_factory}
    with ProcessPoolExecutor(1, mp_context=multiprocessing.get_context("spawn")) as pool:
        with pytest.raises(TypeError, match=rf"{which} cannot be sent.*module-level function.*functools\.partial"):
            ps.train_runs(
                factories["make_model"],
                factories["make_guide"],
                (X_CLS, Y_CLS),
                2,
                steps=2,
                executor=pool,
                progress=False,
            )
        with pytest.raises(TypeError, match=rf"{which} cannot be sent"):
            ps.train_runs(
                **{"make_model": lambda: make_mlp(), "make_guide": AutoDiagonalNormal}
                if which == "make_model"
                else {"make_model": make_mlp, "make_guide": lambda m: AutoDiagonalNormal(m)},
                data=(X_CLS, Y_CLS),
                num_runs=2,
                steps=2,
                executor=pool,
                progress=False,
            )
