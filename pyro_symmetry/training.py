"""Independent SVI runs with different seeds: in-process (vectorized over runs
where possible) or on any :class:`concurrent.futures.Executor`.

Diagnostics of weight-space symmetry (R-hat across runs, loss barriers, MMD
between runs) need several independently trained posteriors of one model.
:func:`train_runs` trains them and returns :class:`TrainedRun` records that
:func:`pyro_symmetry.diagnostics.to_inference_data` and
:func:`pyro_symmetry.diagnostics.symmetry_report` accept directly.

Every run lives in its own Pyro parameter store (``ParamStoreDict.scope``), so
runs of one model, whose parameters share their names, never see each other.
"""

from __future__ import annotations

import contextlib
import copy
from collections.abc import Callable, Iterator, Mapping
from concurrent.futures import Executor
from dataclasses import dataclass, field
from typing import Any

import pyro
import pyro.poutine as poutine
import torch
from pyro.infer import SVI, Trace_ELBO
from pyro.infer.autoguide import AutoNormal
from pyro.poutine.util import site_is_subsample
from tqdm.auto import tqdm

from ._validation import check_callable, check_finite, check_int

__all__ = ["TrainedRun", "train_runs"]


@dataclass
class TrainedRun:
    """One fitted SVI run.

    Attributes
    ----------
    guide : the fitted guide (its parameters live in the guide module itself)
    model : the model instance the guide was fitted to
    losses : Tensor ``(steps,)``
        The loss (negative ELBO estimate) after every step.
    seed : int or None
        Seed of the run's torch RNG (``None`` for runs trained vectorized, which
        share one RNG stream seeded with ``train_runs(seed=...)``).
    state : dict
        The run's own Pyro parameter-store state (``{"params", "constraints"}``);
        ``with pyro.get_param_store().scope(run.state): ...`` evaluates the run
        with Pyro machinery that reads the global store by name.
    """

    guide: Any
    model: Any
    losses: torch.Tensor
    seed: int | None
    state: dict = field(repr=False)


def _split_data(data: Any) -> tuple[tuple, dict]:
    if isinstance(data, Mapping):
        return (), dict(data)
    if isinstance(data, (tuple, list)):
        return tuple(data), {}
    return (data,), {}


def _build(make_model: Callable[[], Any], make_guide: Callable[[Any], Any]) -> tuple[Any, Any]:
    """``(model, guide)`` from the factories, checked to be callables (a model and a guide)."""
    model = make_model()
    if not callable(model):
        raise TypeError(f"make_model() must return a Pyro model (a callable), got {type(model).__name__}")
    guide = make_guide(model)
    if not callable(guide):
        raise TypeError(f"make_guide(model) must return a Pyro guide (a callable), got {type(guide).__name__}")
    return model, guide


@contextlib.contextmanager
def _diverged(what: str, step: int) -> Iterator[None]:
    """Turn Pyro's complaint about NaN distribution parameters into a divergence error."""
    try:
        yield
    except ValueError as e:
        store = pyro.get_param_store()
        bad = [k for k, v in store.items() if not bool(torch.isfinite(v.detach()).all())]
        # torch's argument validation ("... but found invalid values") after a successful first
        # step means the parameters grew until a distribution's arguments overflowed.
        overflow = step > 0 and "found invalid values" in str(e)
        if not (bad or overflow):
            raise
        why = f"parameters {bad[:3]} are NaN/Inf" if bad else str(e).splitlines()[0]
        raise ValueError(
            f"{what} diverged at step {step}: {why}; lower the learning rate or check the data and the model's scales"
        ) from e


def _fresh_optim(optim: Any) -> Any:
    return pyro.optim.ClippedAdam({"lr": 1e-2}) if optim is None else copy.deepcopy(optim)


def _train_one(
    make_model: Callable[[], Any],
    make_guide: Callable[[Any], Any],
    args: tuple,
    kwargs: dict,
    steps: int,
    seed: int,
    optim: Any,
    loss: Any,
    num_threads: int | None,
    keep_modules: bool,
    progress: bool = False,
    desc: str = "",
) -> tuple[dict, torch.Tensor, Any, Any]:
    """Train one run in its own parameter store; top level so executors can pickle it."""
    if num_threads is not None:
        torch.set_num_threads(num_threads)
    store = pyro.get_param_store()
    losses = torch.empty(steps)
    with torch.random.fork_rng(devices=[]), store.scope() as state:
        torch.manual_seed(seed)
        model, guide = _build(make_model, make_guide)
        svi = SVI(model, guide, _fresh_optim(optim), Trace_ELBO() if loss is None else loss)
        for i in tqdm(range(steps), desc=desc, leave=False, disable=not progress):
            with _diverged(f"the run with seed {seed}", i):
                losses[i] = svi.step(*args, **kwargs)
    if not keep_modules:
        model = guide = None  # rebuilt from ``state`` by the caller
    return state, losses, model, guide


def _rebuild(make_model: Callable, make_guide: Callable, args: tuple, kwargs: dict, state: dict) -> tuple[Any, Any]:
    """A fresh model/guide pair whose guide adopts the parameters in ``state``.

    One guide call inside ``scope(state)`` makes every ``PyroParam`` of the guide
    module take the stored tensor (Pyro syncs module <- store by name).
    """
    model, guide = _build(make_model, make_guide)
    with torch.random.fork_rng(devices=[]), torch.no_grad(), pyro.get_param_store().scope(state):
        guide(*args, **kwargs)
    return model, guide


# ---------------------------------------------------------------------- vectorized
def _plate_nesting(trace: Any) -> int:
    dims = [
        -f.dim
        for site in trace.nodes.values()
        if site["type"] == "sample"
        for f in site["cond_indep_stack"]
        if f.vectorized and f.dim is not None
    ]
    return max(dims, default=0)


class _RunsPlated:
    """``model`` with every site under one extra plate ``_runs`` of size R."""

    def __init__(self, model: Any, num_runs: int, dim: int) -> None:
        self.model, self.num_runs, self.dim = model, num_runs, dim

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        with pyro.plate("_runs", self.num_runs, dim=self.dim):
            return self.model(*args, **kwargs)

    def __getattr__(self, name: str) -> Any:  # make_guide may read model attributes
        return getattr(self.__dict__["model"], name)


def _per_run(log_prob: torch.Tensor, dim: int, num_runs: int) -> torch.Tensor:
    """Sum a site's (scaled) log-prob over everything but the runs plate dim."""
    # A site's batch shape has at most -dim dims with the runs plate leftmost; pad, then
    # broadcast terms that do not depend on the run (each run's ELBO contains them).
    nd = -dim
    lp = log_prob.reshape((1,) * (nd - log_prob.dim()) + tuple(log_prob.shape))
    return lp.expand((num_runs,) + tuple(lp.shape[1:])).reshape(num_runs, -1).sum(-1)


def _per_run_elbo(model: Any, guide: Any, args: tuple, kwargs: dict, dim: int, num_runs: int) -> torch.Tensor:
    """``(R,)`` single-particle ELBO of each run; the guide must be reparameterized."""
    guide_tr = poutine.trace(guide).get_trace(*args, **kwargs)
    model_tr = poutine.trace(poutine.replay(model, trace=guide_tr)).get_trace(*args, **kwargs)
    elbo = torch.zeros(num_runs)
    for tr, sign in ((model_tr, 1.0), (guide_tr, -1.0)):
        tr.compute_log_prob()
        for site in tr.nodes.values():
            if site["type"] != "sample" or site_is_subsample(site):
                continue
            if sign < 0 and not site["fn"].has_rsample:
                raise ValueError(f"guide site {site['name']!r} is not reparameterizable; train with vectorize=False")
            elbo = elbo + sign * _per_run(site["log_prob"], dim, num_runs)
    return elbo


def _train_vectorized(
    make_model: Callable,
    make_guide: Callable,
    args: tuple,
    kwargs: dict,
    num_runs: int,
    steps: int,
    seed: int,
    optim: Any,
    progress: bool,
    required: bool,
) -> list[TrainedRun] | None:
    store = pyro.get_param_store()
    with torch.random.fork_rng(devices=[]), store.scope() as vstate:
        torch.manual_seed(seed)
        base = make_model()
        if not callable(base):
            raise TypeError(f"make_model() must return a Pyro model (a callable), got {type(base).__name__}")
        with torch.no_grad():
            nesting = _plate_nesting(poutine.trace(base).get_trace(*args, **kwargs))
        dim = -(nesting + 1)
        vmodel = _RunsPlated(base, num_runs, dim)
        vguide = make_guide(vmodel)
        if type(vguide) is not AutoNormal:
            if required:
                raise ValueError(
                    f"vectorize=True needs make_guide to return a plain AutoNormal, got {type(vguide).__name__}"
                )
            return None
        optimizer = _fresh_optim(optim)
        losses = torch.empty(steps, num_runs)
        for i in tqdm(range(steps), desc=f"SVI ({num_runs} runs, vectorized)", leave=False, disable=not progress):
            with poutine.trace(param_only=True) as capture, _diverged(f"a run (vectorized, seed {seed})", i):
                elbo = _per_run_elbo(vmodel, vguide, args, kwargs, dim, num_runs)
            (-elbo.sum()).backward()
            params = {site["value"].unconstrained() for site in capture.trace.nodes.values()}
            optimizer(params)
            pyro.infer.util.zero_grads(params)
            losses[i] = -elbo.detach()
    runs = []
    for r in range(num_runs):
        with torch.random.fork_rng(devices=[]), store.scope() as template:
            model = make_model()
            guide = make_guide(model)
            with torch.no_grad():
                guide(*args, **kwargs)
        state = {"params": {}, "constraints": dict(template["constraints"])}
        for name, p in template["params"].items():
            if name not in vstate["params"]:
                raise ValueError(f"parameter {name!r} of a single run is missing from the vectorized guide")
            v = vstate["params"][name].detach()
            if v.numel() != num_runs * p.numel():
                raise ValueError(
                    f"cannot split vectorized parameter {name!r} of shape {tuple(v.shape)} into {num_runs} runs "
                    f"of shape {tuple(p.shape)}"
                )
            # The runs plate is the outermost batch dim, so run r is the r-th leading slice.
            state["params"][name] = torch.nn.Parameter(v.reshape(num_runs, -1)[r].reshape(p.shape).clone())
        model, guide = _rebuild(make_model, make_guide, args, kwargs, state)
        runs.append(TrainedRun(guide, model, losses[:, r].clone(), None, state))
    return runs


# ---------------------------------------------------------------------- public
def train_runs(
    make_model: Callable[[], Any],
    make_guide: Callable[[Any], Any],
    data: Any,
    num_runs: int,
    *,
    steps: int,
    executor: Executor | None = None,
    seed: int = 0,
    optim: Any = None,
    loss: Any = None,
    vectorize: bool | None = None,
    num_threads: int | None = None,
    progress: bool = True,
) -> list[TrainedRun]:
    """Train ``num_runs`` independent SVI runs of one model with different seeds.

    Parameters
    ----------
    make_model : callable ``() -> model``
        Builds a fresh model (e.g. ``lambda: ps.models.BayesianMLP(64, [32, 32], 10)``).
    make_guide : callable ``model -> guide``
        Builds a guide for a model (e.g. ``AutoNormal``). With a process pool both
        factories must be picklable (module-level functions or ``functools.partial``).
    data : tuple of positional args, mapping of keyword args, or a single tensor
        Passed to ``svi.step`` (and so to model and guide).
    num_runs : int
    steps : int
        Full-batch SVI steps per run.
    executor : concurrent.futures.Executor, optional
        Run each fit as one task: a ``ProcessPoolExecutor`` on one machine, or
        ``dask.distributed.Client(...).get_executor()`` on a cluster. Results come
        back as parameter-store states and are loaded into fresh guides here.
    seed : int
        Run ``r`` seeds torch with ``seed + r`` (its initialization and noise).
    optim : pyro.optim.PyroOptim, optional
        Copied per run. Default ``ClippedAdam({"lr": 1e-2})``.
    loss : ELBO, optional
        Default ``Trace_ELBO()``. Given a loss, runs are trained one after another
        (or on the executor): the vectorized path computes its own single-particle
        ELBO per run, so ``vectorize=True`` with a ``loss`` is an error.
    vectorize : bool, optional
        In-process only. Train all runs as one batched problem: the model runs
        under an extra plate of size R, so an ``AutoNormal`` guide holds R
        independent sets of parameters, the summed loss has independent gradients
        per run, and Adam (elementwise) updates them independently. ``None``
        (default) vectorizes whenever ``make_guide`` returns a plain
        ``AutoNormal`` and trains runs one after another otherwise. Vectorized
        runs share one RNG stream seeded with ``seed`` (their initializations and
        noise are still independent draws).
    num_threads : int, optional
        ``torch.set_num_threads`` inside each task (set to 1 with process pools
        to avoid oversubscription).
    progress : bool
        Show tqdm progress bars.

    Returns
    -------
    list of :class:`TrainedRun`, one per run, in seed order.

    Examples
    --------
    >>> runs = ps.train_runs(lambda: ps.models.BayesianMLP(64, [32], 10),
    ...                      lambda m: AutoNormal(m, init_scale=0.05), (x, y), 8, steps=1000)
    >>> idata = ps.diagnostics.to_inference_data(runs, num_samples=100)
    """
    if isinstance(num_runs, bool) or not isinstance(num_runs, int) or num_runs < 1:
        raise ValueError(f"num_runs must be a positive int, got {num_runs!r}")
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
        raise ValueError(f"steps must be a positive int, got {steps!r}")
    check_callable("make_model", make_model)
    check_callable("make_guide", make_guide)
    check_int("seed", seed)
    if num_threads is not None:
        check_int("num_threads", num_threads, minimum=1)
    if optim is not None and not isinstance(optim, pyro.optim.PyroOptim):
        raise TypeError(f"optim must be a pyro.optim.PyroOptim (e.g. pyro.optim.Adam(...)), got {type(optim).__name__}")
    if executor is not None and not isinstance(executor, Executor):
        raise TypeError(f"executor must be a concurrent.futures.Executor, got {type(executor).__name__}")
    if vectorize and executor is not None:
        raise ValueError("vectorize=True trains in-process; it cannot be combined with an executor")
    if loss is not None:
        if vectorize:
            raise ValueError(
                "vectorize=True computes its own single-particle Trace_ELBO per run; it cannot use loss=. "
                "Pass vectorize=False (or leave it None) to train with this loss"
            )
        vectorize = False  # a user's ELBO (particles, TraceMeanField_ELBO, ...) must be the one trained
    args, kwargs = _split_data(data)
    named = {**{f"data[{i}]": a for i, a in enumerate(args)}, **{f"data[{k!r}]": v for k, v in kwargs.items()}}
    for name, value in named.items():
        if torch.is_tensor(value) and value.is_floating_point():
            check_finite(name, value)
    if executor is None and vectorize is not False:
        runs = _train_vectorized(
            make_model, make_guide, args, kwargs, num_runs, steps, seed, optim, progress, bool(vectorize)
        )
        if runs is not None:
            return _check_losses(runs)
    seeds = [seed + r for r in range(num_runs)]
    if executor is None:
        runs = []
        for r, s in enumerate(tqdm(seeds, desc="runs", disable=not progress or num_runs == 1)):
            state, losses, model, guide = _train_one(
                make_model, make_guide, args, kwargs, steps, s, optim, loss, num_threads, True, progress, f"run {r}"
            )
            runs.append(TrainedRun(guide, model, losses, s, state))
        return _check_losses(runs)
    futures = [
        executor.submit(_train_one, make_model, make_guide, args, kwargs, steps, s, optim, loss, num_threads, False)
        for s in seeds
    ]
    runs = []
    for s, fut in zip(seeds, tqdm(futures, desc="runs", disable=not progress)):
        state, losses, _, _ = fut.result()
        model, guide = _rebuild(make_model, make_guide, args, kwargs, state)
        runs.append(TrainedRun(guide, model, losses, s, state))
    return _check_losses(runs)


def _check_losses(runs: list[TrainedRun]) -> list[TrainedRun]:
    """A run whose loss became NaN/Inf has diverged: its guide is no posterior, so say so."""
    for r, run in enumerate(runs):
        bad = (~torch.isfinite(run.losses)).nonzero()
        if bad.numel():
            step = int(bad[0, 0])
            raise ValueError(
                f"run {r} (seed {run.seed}) diverged: its loss is {float(run.losses[step])} at step {step}; "
                "lower the learning rate or check the data and the model's scales"
            )
    return runs
