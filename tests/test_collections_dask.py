"""Collections on a Dask LocalCluster (2 worker processes) give the in-process results."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import pyro_symmetry as ps
from pyro_symmetry import collections as pc
from pyro_symmetry.diagnostics import collections as dc

distributed = pytest.importorskip("distributed")

SPEC = ps.mlp_spec(["fc1", "fc2", "fc3"], [6, 5], activation_symmetry="scale")


@pytest.fixture(scope="module")
def client():
    cluster = distributed.LocalCluster(
        n_workers=2, threads_per_worker=1, processes=True, dashboard_address=None, silence_logs=40
    )
    c = distributed.Client(cluster, set_as_default=False)
    yield c
    c.close()
    cluster.close()


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    d = tmp_path_factory.mktemp("dask")
    gen = torch.Generator().manual_seed(0)
    base = {
        "fc1.weight": torch.randn(6, 4, generator=gen),
        "fc1.bias": torch.randn(6, generator=gen),
        "fc2.weight": torch.randn(5, 6, generator=gen),
        "fc2.bias": torch.randn(5, generator=gen),
        "fc3.weight": torch.randn(3, 5, generator=gen),
        "fc3.bias": torch.randn(3, generator=gen),
    }
    for i in range(12):
        moved = SPEC.apply(base, SPEC.sample(generator=gen))
        torch.save({k: v + 0.05 * torch.randn(v.shape, generator=gen) for k, v in moved.items()}, d / f"ck_{i}.pt")
    return d


def _sha(summary) -> dict[str, str]:
    return {r["output"]: r["sha256"] for r in summary.records()}


def test_align_and_canonicalize_on_dask_equal_in_process(client, files, tmp_path):
    coll = pc.from_files(files / "ck_*.pt", SPEC)
    local = coll.align(0, tmp_path / "local", progress=False)
    remote = coll.align(0, tmp_path / "dask", executor=client, batch_size=3, progress=False)
    assert _sha(remote) == _sha(local) and remote.processed == 12
    workers = {r["worker"] for r in remote.records()}
    assert len(workers) == 2  # both worker processes did work
    canon_local = coll.canonicalize(tmp_path / "cl", permutation="sort", progress=False)
    canon_dask = coll.canonicalize(tmp_path / "cd", permutation="sort", executor=client, progress=False)
    assert _sha(canon_dask) == _sha(canon_local)


def test_barycenter_on_dask(client, files, tmp_path):
    coll = pc.from_files(files / "ck_*.pt", SPEC)
    local = coll.barycenter(progress=False)
    remote = coll.barycenter(executor=client, batch_size=2, progress=False)
    assert remote.passes == local.passes and remote.converged
    for k, v in local.params.items():  # float64 partial sums added in completion order
        torch.testing.assert_close(remote.params[k], v, rtol=1e-6, atol=1e-7)
    summary = coll.align("barycenter", tmp_path / "out", executor=client, progress=False)
    ref = torch.load(tmp_path / "out" / "_reference.pt", weights_only=True)
    for i, out in enumerate(summary.outputs):
        want = ps.align(ref, coll[i].params, SPEC, method="weights", seed=0).aligned
        got = torch.load(out, weights_only=True)
        assert all(torch.equal(got[k], want[k]) for k in want)


def test_in_memory_runs_are_shipped_to_workers(client, files, tmp_path):
    runs = [torch.load(p, weights_only=True) for p in sorted(files.glob("ck_*.pt"))[:4]]
    coll = pc.from_runs(runs, SPEC)
    local = coll.align(0, tmp_path / "l", progress=False)
    remote = coll.align(0, tmp_path / "r", executor=client, progress=False)
    assert _sha(remote) == _sha(local)


def test_streamed_rhat_computed_by_the_cluster(client, files):
    coll = pc.from_files(files / "ck_*.pt", SPEC)
    local = dc.rhat_ess(coll, chains=2)
    tree = ps.diagnostics.to_inference_data(coll, chains=2)
    with client.as_current(), distributed.get_task_stream(client) as stream:
        remote = dc.rhat_ess(tree, max_bytes=2 * 6 * 64 * 20)  # the workers read the files
        moments = dc.posterior_moments(tree)
    for v in local.rhat:
        assert np.array_equal(remote.rhat[v], local.rhat[v], equal_nan=True)
    np.testing.assert_allclose(moments["fc1.weight"][0], dc.posterior_moments(coll)["fc1.weight"][0], rtol=1e-12)
    assert any(t["key"][0].startswith("collection-") for t in stream.data if isinstance(t["key"], tuple))


def test_corrupt_file_on_a_worker_is_named_and_a_rerun_resumes(client, files, tmp_path):
    src = tmp_path / "ckpts"
    src.mkdir()
    for p in sorted(files.glob("ck_*.pt")):
        (src / p.name).write_bytes(p.read_bytes())
    good = (src / "ck_7.pt").read_bytes()
    (src / "ck_7.pt").write_bytes(good[: len(good) // 3])  # truncated while being copied
    coll = pc.from_files(src / "ck_*.pt", SPEC)
    with pytest.raises(pc.TransformError, match=r"ck_7\.pt") as info:
        coll.align(0, tmp_path / "out", executor=client, batch_size=2, progress=False)
    summary = info.value.summary
    assert (summary.processed, summary.failed) == (11, 1)
    assert "corrupt or truncated" in summary.failures[str(src / "ck_7.pt")]
    (src / "ck_7.pt").write_bytes(good)  # the file repaired: the same call does only what is missing
    again = coll.align(0, tmp_path / "out", executor=client, batch_size=2, progress=False)
    assert (again.processed, again.skipped, again.failed) == (1, 11, 0)
    local = coll.align(0, tmp_path / "local", progress=False)
    assert _sha(again) == _sha(local)
