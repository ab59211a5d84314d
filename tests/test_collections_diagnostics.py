"""Streamed diagnostics of checkpoint collections equal the in-memory ones."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
import torch

import pyro_symmetry as ps
from pyro_symmetry import collections as pc
from pyro_symmetry.collections._formats import FileSource
from pyro_symmetry.diagnostics import collections as dc
from pyro_symmetry.diagnostics import metrics

SPEC = ps.mlp_spec(["fc1", "fc2", "fc3"], [6, 5], activation_symmetry="scale")


def _network(gen: torch.Generator, scale: float = 1.0) -> dict[str, torch.Tensor]:
    return {
        "fc1.weight": scale * torch.randn(6, 4, generator=gen),
        "fc1.bias": torch.randn(6, generator=gen),
        "fc2.weight": torch.randn(5, 6, generator=gen),
        "fc2.bias": torch.randn(5, generator=gen),
        "fc3.weight": torch.randn(3, 5, generator=gen),
        "fc3.bias": torch.randn(3, generator=gen),
    }


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    """24 checkpoints: 4 runs (chains) of 6, each run around its own network, float64."""
    d = tmp_path_factory.mktemp("ckpts")
    gen = torch.Generator().manual_seed(0)
    for r in range(4):
        centre = _network(gen)
        for k in range(6):
            ck = {s: (v + 0.3 * torch.randn(v.shape, generator=gen)).double() for s, v in centre.items()}
            torch.save(ck, d / f"run{r}_step{k}.pt")
    return d


def stacked(coll) -> dict[str, torch.Tensor]:
    cks = list(coll)
    return {s: torch.stack([ck.params[s] for ck in cks]) for s in cks[0].params}


# ---------------------------------------------------------------------- ArviZ data, R-hat
class CountingSource(FileSource):
    reads = 0

    def read(self, mmap: bool = False):
        type(self).reads += 1
        return super().read(mmap)


def test_to_inference_data_is_lazy_and_groups_chains(files):
    paths = sorted(files.glob("*.pt"))
    coll = pc.Collection([CountingSource(str(p)) for p in paths], SPEC)
    coll.signature  # noqa: B018
    CountingSource.reads = 0
    tree = dc.to_inference_data(coll, chains=lambda name: name.split("/")[-1].split("_")[0])
    assert CountingSource.reads == 0  # nothing read until computed
    post = tree["posterior"]
    assert dict(post.sizes)["chain"] == 4 and dict(post.sizes)["draw"] == 6
    assert post["fc2.weight"].dims == ("chain", "draw", "fc2_neuron", "fc1_neuron")
    values = post["fc1.weight"].values
    assert CountingSource.reads == 24
    want = torch.stack([torch.load(p, weights_only=True)["fc1.weight"] for p in paths]).reshape(4, 6, 6, 4)
    assert np.array_equal(values, want.numpy())
    assert post["checkpoint"].values[2, 3] == str(paths[2 * 6 + 3])
    explicit = dc.to_inference_data(coll, chains=[[0, 2, 4], [1, 3, 5]])
    fifth = torch.load(paths[5], weights_only=True)["fc1.bias"].numpy()
    assert np.array_equal(explicit["posterior"]["fc1.bias"].values[1, 2], fifth)  # chain 1, draw 2: index 5
    with pytest.raises(ValueError, match="same number of draws"):
        dc.to_inference_data(coll, chains=[[0, 1], [2]])
    with pytest.raises(ValueError, match="does not divide"):
        dc.to_inference_data(coll, chains=5)


def test_rhat_ess_block_by_block_equals_the_in_memory_kernel(files):
    coll = pc.from_files(files / "*.pt", SPEC)
    tree = dc.to_inference_data(coll, chains=4)
    full = ps.diagnostics.rhat_ess(tree.compute())
    cases = [(coll, 4 * 6 * 64 * 12), (coll, 1 << 20), (tree, 4 * 6 * 64 * 12)]  # 12 weights per block, or all
    for data, max_bytes in cases:  # passes over the files, or blocks of the dask-backed tree
        streamed = dc.rhat_ess(data, chains=4 if data is coll else None, max_bytes=max_bytes)
        for v in full.rhat:
            assert np.array_equal(streamed.rhat[v], full.rhat[v], equal_nan=True), v
            assert np.array_equal(streamed.ess[v], full.ess[v], equal_nan=True), v
            assert np.array_equal(streamed.degenerate[v], full.degenerate[v]), v
    assert streamed.table() == full.table()
    assert full.row()["rhat_max"] > 1.1  # four runs around four networks: not converged


@pytest.mark.parametrize("shape", [(2, 8, 300), (4, 100, 50), (8, 400, 10)])
def test_a_block_and_its_kernel_fit_the_bytes_per_value_the_budget_assumes(shape):
    """rhat_ess sizes its blocks as max_bytes / (chains * draws * _KERNEL_BYTES)."""
    from memory import peak_bytes

    from pyro_symmetry.diagnostics import _collection_data as cd

    x = np.random.default_rng(0).normal(size=shape)
    peak = peak_bytes(lambda: cd._kernel(x), warm=lambda: cd._kernel(np.ones((2, 4, 3))))
    assert x.nbytes + peak <= cd._KERNEL_BYTES * x.size  # the block itself and the kernel's arrays


def test_rhat_names_a_non_finite_checkpoint(tmp_path, files):
    for i, p in enumerate(sorted(files.glob("*.pt"))[:8]):
        ck = torch.load(p, weights_only=True)
        if i == 5:
            ck["fc2.bias"][1] = float("inf")
        torch.save(ck, tmp_path / f"c{i}.pt")
    coll = pc.from_files(tmp_path / "c*.pt", SPEC)
    with pytest.raises(ValueError, match=r"c5\.pt.*'fc2.bias'.*NaN or Inf"):
        dc.rhat_ess(coll, chains=2)
    with pytest.raises(ValueError, match=r"fc2.bias.*c5\.pt"):  # the dask-backed DataTree path
        dc.rhat_ess(dc.to_inference_data(coll, chains=2))


def test_posterior_moments(files):
    coll = pc.from_files(files / "*.pt", SPEC)
    x = stacked(coll)
    for moments in (dc.posterior_moments(coll), dc.posterior_moments(dc.to_inference_data(coll))):
        for s, (mean, var) in moments.items():  # one pass of Welford updates, or dask reductions
            np.testing.assert_allclose(mean, x[s].mean(0).numpy(), rtol=1e-12, atol=1e-14)
            np.testing.assert_allclose(var, x[s].var(0).numpy(), rtol=1e-12, atol=1e-14)
    per = dc.posterior_moments(coll, chains=4, per_chain=True)
    np.testing.assert_allclose(per["fc1.bias"][0][2], x["fc1.bias"][12:18].mean(0).numpy(), rtol=1e-12)


# ---------------------------------------------------------------------- MMD
def test_mmd_equals_the_exact_mmd(files):
    coll = pc.from_files(files / "*.pt", SPEC)
    x, y = coll[:12], coll[12:]
    kw = {"kernel": "both", "num_permutations": 100, "seed": 3}
    exact = ps.diagnostics.mmd(stacked(x), stacked(y), **kw)
    memory = dc.mmd(x, y, **kw)
    assert memory.method == "memory"
    assert torch.equal(memory.mmd2_grid, exact.mmd2_grid) and memory.p_value == exact.p_value
    streamed = dc.mmd(x, y, method="streamed", max_bytes=24 * 8 * 3 * 2 * 25, **kw)  # 25 weights per pass
    torch.testing.assert_close(streamed.bandwidths, exact.bandwidths, rtol=1e-12, atol=0)
    torch.testing.assert_close(streamed.mmd2_grid, exact.mmd2_grid, rtol=1e-9, atol=1e-14)
    assert torch.equal(streamed.p_values, exact.p_values) and streamed.p_value == exact.p_value
    assert streamed.kernels == exact.kernels and streamed.stderr is None
    assert exact.p_value < 0.05  # runs 0-1 against runs 2-3: different networks


def test_random_features_mmd_within_its_standard_error_of_the_exact_one(files):
    coll = pc.from_files(files / "*.pt", SPEC)
    x, y = coll[:12], coll[12:]
    kw = {"kernel": "both", "num_permutations": 100, "seed": 1}
    exact = dc.mmd(x, y, method="streamed", **kw)
    rff = dc.mmd(x, y, method="random_features", num_features=1024, max_bytes=24 * 8 * 3 * 2 * 40, **kw)
    assert rff.method == "random_features" and rff.num_features == 1024
    torch.testing.assert_close(rff.bandwidths, exact.bandwidths)  # the subsample holds every checkpoint
    assert bool((rff.stderr > 0).all())
    z = (rff.mmd2_grid - exact.mmd2_grid).abs() / rff.stderr
    assert bool((z < 5).all()), z
    assert rff.p_value < 0.05


def test_mmd_of_one_distribution_is_not_significant(files):
    coll = pc.from_files(files / "*.pt", SPEC)
    same = coll[[0, 1, 2, 6, 7, 8, 12, 13, 14, 18, 19, 20]], coll[[3, 4, 5, 9, 10, 11, 15, 16, 17, 21, 22, 23]]
    res = dc.mmd(*same, method="streamed", num_permutations=200)
    assert res.p_value > 0.05


# ---------------------------------------------------------------------- predictive
def _predict(params, x):
    h = torch.relu(x @ params["fc1.weight"].T + params["fc1.bias"])
    h = torch.relu(h @ params["fc2.weight"].T + params["fc2.bias"])
    return torch.softmax(h @ params["fc3.weight"].T + params["fc3.bias"], -1)


def test_predictive_metrics_and_diversity_equal_the_in_memory_ones(files):
    coll = pc.from_files(files / "*.pt", SPEC)
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(40, 4, generator=gen, dtype=torch.float64)
    y = torch.randint(0, 3, (40,), generator=gen)
    res = dc.predictive(coll, _predict, x, y)
    probs = torch.stack([_predict(ck.params, x) for ck in coll])  # (24, 40, 3)
    want = metrics.evaluate(probs, y)
    for k in ("accuracy", "nll", "brier", "ece", "entropy", "predictive_mutual_information"):
        assert res.metrics[k] == pytest.approx(want[k], rel=1e-12, abs=1e-15), k
    torch.testing.assert_close(
        res.predictive_mutual_information, metrics.predictive_mutual_information(probs), rtol=1e-10, atol=1e-12
    )
    labels = probs.argmax(-1)
    pairs = list(itertools.combinations(range(24), 2))
    brute = torch.stack([(labels[i] != labels[j]).double() for i, j in pairs]).mean(0)
    torch.testing.assert_close(res.disagreement, brute, rtol=0, atol=1e-12)
    assert res.member_accuracy[5] == pytest.approx(float(metrics.accuracy(probs[5], y)))
    assert res.num_members == 24 and "disagreement" in str(res)


def test_predictive_refuses_logits_naming_the_checkpoint(files):
    coll = pc.from_files(files / "*.pt", SPEC)
    with pytest.raises(pc.CheckpointError, match=r"run0_step0\.pt.*probabilities"):
        dc.predictive(coll, lambda p, x: torch.log(_predict(p, x)), torch.randn(5, 4, dtype=torch.float64))
