"""train_runs on executors other than concurrent.futures: a Dask cluster of worker
processes, and an executor whose futures have nothing but ``result()`` (the shape of the
Ray adapter in docs/executors.md). Each must give, per seed, the run in-process training
gives: same losses, same fitted parameters, bit for bit (one thread per run).

Also the short, readable ``repr`` of :class:`~pyro_symmetry.TrainedRun` (issue 13, item 7).
"""

import concurrent.futures as cf
import dataclasses
import functools
import math

import pytest
import torch
from pyro.infer.autoguide import AutoDiagonalNormal

import pyro_symmetry as ps

X = torch.linspace(-1, 1, 12)[:, None]
Y = (X[:, 0] > 0).long()
# Package callables and functools.partial only: Dask worker processes unpickle them by
# reference and have no access to this test module.
make_model = functools.partial(ps.models.BayesianMLP, 1, [2], 2)
make_guide = functools.partial(AutoDiagonalNormal, init_scale=0.05)
KWARGS = dict(steps=4, seed=3, progress=False, num_threads=1)


def _assert_same_runs(local, remote):
    assert [r.seed for r in local] == [r.seed for r in remote] == [3, 4]
    for a, b in zip(local, remote):
        assert a.error is None and b.error is None
        assert torch.equal(a.losses, b.losses), (a.losses, b.losses)
        qa, qb = ps.gaussian_params(a.guide), ps.gaussian_params(b.guide)
        assert qa.keys() == qb.keys()
        for k in qa:
            assert torch.equal(qa[k][0], qb[k][0]) and torch.equal(qa[k][1], qb[k][1]), k
    # Different seeds are different runs (so equality above is not vacuous).
    assert not torch.equal(local[0].losses, local[1].losses)


@pytest.fixture(scope="module")
def in_process_runs():
    return ps.train_runs(make_model, make_guide, (X, Y), 2, vectorize=False, **KWARGS)


@pytest.mark.slow  # two worker processes import torch and pyro: ~45 s on 2 busy cores
def test_dask_local_cluster_of_two_processes_matches_in_process_training(in_process_runs):
    distributed = pytest.importorskip("dask.distributed")
    with (
        distributed.LocalCluster(n_workers=2, threads_per_worker=1, processes=True, dashboard_address=":0") as cluster,
        distributed.Client(cluster) as client,
    ):
        on_client = ps.train_runs(make_model, make_guide, (X, Y), 2, executor=client, **KWARGS)
        on_executor = ps.train_runs(make_model, make_guide, (X, Y), 2, executor=client.get_executor(), **KWARGS)
    _assert_same_runs(in_process_runs, on_client)
    _assert_same_runs(in_process_runs, on_executor)


class _ResultOnlyFuture:
    """A future with ``result()`` and nothing else (no ``done()``), as a Ray adapter's."""

    def __init__(self, fn, args):
        self._fn, self._args = fn, args

    def result(self):
        return self._fn(*self._args)


class _ResultOnlyExecutor:
    """The duck type train_runs needs: ``submit(fn, *args)`` returning such a future."""

    def __init__(self):
        self.submitted = 0

    def submit(self, fn, *args):
        self.submitted += 1
        return _ResultOnlyFuture(fn, args)


def test_an_executor_whose_futures_only_have_result_matches_in_process_training(in_process_runs):
    pool = _ResultOnlyExecutor()
    runs = ps.train_runs(make_model, make_guide, (X, Y), 2, executor=pool, **KWARGS)
    assert pool.submitted == 2
    _assert_same_runs(in_process_runs, runs)


def test_an_object_without_submit_is_refused_naming_the_argument():
    with pytest.raises(TypeError, match=r"executor must be None .* submit\(fn, \*args\)"):
        ps.train_runs(make_model, make_guide, (X, Y), 1, steps=1, executor=cf.Future())


# ---------------------------------------------------------------------- TrainedRun record
def test_trained_run_repr_is_one_short_line_without_the_loss_history():
    runs = ps.train_runs(make_model, make_guide, (X, Y), 1, steps=50, seed=0, progress=False, vectorize=False)
    text = repr(runs[0])
    assert text == f"TrainedRun(seed=0, steps=50, final_loss={float(runs[0].losses[-1]):.6g}, error=None)"
    assert "\n" not in text and len(text) < 100
    assert runs[0].steps == 50 and runs[0].final_loss == float(runs[0].losses[-1])


def test_trained_run_is_frozen_and_a_failed_run_shows_its_error_briefly():
    empty = {"params": {}, "constraints": {}}
    run = ps.TrainedRun(None, None, torch.full((5,), math.nan), 7, empty, ValueError("x" * 500))
    with pytest.raises(dataclasses.FrozenInstanceError):
        run.error = None
    text = repr(run)
    assert text.startswith("TrainedRun(seed=7, steps=5, final_loss=nan, error=ValueError('xxx")
    assert len(text) < 150


def test_a_diverged_run_is_marked_in_a_new_record():
    """train_runs marks a run whose loss became non-finite by replacing its (frozen) record."""
    from pyro_symmetry.training import _finish

    good = ps.TrainedRun("guide", "model", torch.tensor([1.0, 2.0]), 0, {})
    bad = ps.TrainedRun("guide", "model", torch.tensor([1.0, math.inf]), 1, {})
    with pytest.warns(UserWarning, match="1 of 2 runs failed"):
        out = _finish([good, bad], "keep")
    assert out[0] is good and out[1] is not bad and bad.error is None
    assert isinstance(out[1].error, ValueError) and "diverged" in str(out[1].error)
    assert out[1].guide == "guide" and torch.equal(out[1].losses, bad.losses)
