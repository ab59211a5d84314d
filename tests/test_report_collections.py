"""symmetry_report of a checkpoint collection: streamed sections equal the in-memory report's
numbers on the same draws, memory does not grow with the number of checkpoints, and the
sections that need every draw or a model are skipped with a note."""

from __future__ import annotations

import warnings

import numpy as np
import pytest
import torch
from memory import TrackedSource, peak_bytes

import pyro_symmetry as ps
from pyro_symmetry import collections as pc

D = ps.diagnostics
SPEC = ps.mlp_spec(["fc1", "fc2", "fc3"], [6, 5], activation_symmetry="scale")
RUNS, STEPS = 4, 6


def _network(gen: torch.Generator, width: int = 4) -> dict[str, torch.Tensor]:
    return {
        "fc1.weight": torch.randn(6, width, generator=gen),
        "fc1.bias": torch.randn(6, generator=gen),
        "fc2.weight": torch.randn(5, 6, generator=gen),
        "fc2.bias": torch.randn(5, generator=gen),
        "fc3.weight": torch.randn(3, 5, generator=gen),
        "fc3.bias": torch.randn(3, generator=gen),
    }


def _write(d, runs: int, steps: int, width: int = 4, dtype=torch.float64) -> None:
    gen = torch.Generator().manual_seed(0)
    for r in range(runs):
        centre = _network(gen, width)
        for k in range(steps):
            ck = {s: (v + 0.3 * torch.randn(v.shape, generator=gen)).to(dtype) for s, v in centre.items()}
            torch.save(ck, d / f"run{r}_step{k}.pt")


def _run_of(name: str) -> str:
    return name.split("/")[-1].split("_")[0]


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    """24 checkpoints: 4 runs (chains) of 6, each run around its own network, float64."""
    d = tmp_path_factory.mktemp("ckpts")
    _write(d, RUNS, STEPS)
    return d


def _chains(coll) -> list[dict[str, torch.Tensor]]:
    """The in-memory runs: one sample dict ``site -> (draws, *shape)`` per chain."""
    cks = list(coll)
    return [{s: torch.stack([ck.params[s] for ck in cks[r * STEPS : (r + 1) * STEPS]]) for s in cks[0].params}
            for r in range(RUNS)]  # fmt: skip


def _same_rhat(a, b) -> None:
    for site in b.rhat:
        np.testing.assert_allclose(a.rhat[site], b.rhat[site], rtol=1e-12, atol=0)
        np.testing.assert_allclose(a.ess[site], b.ess[site], rtol=1e-12, atol=0)


ROW_KEYS = ("rhat_max", "rhat_median", "frac_rhat>1.01", "frac_rhat>1.1", "ess_min", "ess_median")


def test_collection_report_equals_the_in_memory_report(files, tmp_path):
    coll = pc.from_files(str(files / "*.pt"), SPEC)
    got = D.symmetry_report(coll, SPEC, chains=_run_of, out_dir=tmp_path / "r", mmd_permutations=50, progress=False)
    want = D.symmetry_report(_chains(coll), SPEC, mmd_permutations=50, progress=False)
    _same_rhat(got.convergence.before, want.convergence.before)
    assert [r["layer"] for r in got.rows] == [r["layer"] for r in want.rows] == ["fc1", "fc2", "fc3", "all"]
    for g, w in zip(got.rows, want.rows):
        for k in ROW_KEYS:
            assert g[f"{k}_before"] == pytest.approx(w[f"{k}_before"], rel=1e-12), (g["layer"], k)
            assert g[f"{k}_after"] is None  # nothing after alignment without after=
        # MMD of runs 0 and 1: the streamed estimator's in-memory branch is ps.diagnostics.mmd itself
        assert g["mmd2_before"] == pytest.approx(w["mmd2_before"], rel=1e-9)
        assert g["mmd_p_before"] == w["mmd_p_before"]
        assert g["width"] == w["width"] and g["log_order_share"] == w["log_order_share"]
    # posterior means and variances over every draw
    stacked = {s: torch.cat([c[s] for c in _chains(coll)]).numpy() for s in coll.sites}
    for s, (mean, var) in got.moments["before"].items():
        np.testing.assert_allclose(mean, stacked[s].mean(0), rtol=1e-10, atol=1e-12)
        np.testing.assert_allclose(var, stacked[s].var(0, ddof=1), rtol=1e-10)
    notes = " ".join(got.notes)
    assert "collection.align" in notes and "I(g; w)" in notes and "barriers" in notes.lower()
    assert sorted(p.name for p in (tmp_path / "r").iterdir()) == ["report.html", "report.md"]  # no draws files
    md = (tmp_path / "r" / "report.md").read_text()
    assert "Posterior means and standard deviations" in md and "draws.nc" not in md
    assert "→ –" in str(got)


def test_dask_tree_report_equals_the_collection_report(files):
    coll = pc.from_files(str(files / "*.pt"), SPEC)
    tree = D.collections.to_inference_data(coll, chains=RUNS)
    got = D.symmetry_report(tree, SPEC, progress=False)
    want = D.rhat_ess(_chains(coll))
    _same_rhat(got.convergence.before, want)
    assert not got.mmd and any("pass the Collection itself" in n for n in got.notes)
    with pytest.raises(ValueError, match="chains= applies to a Collection"):
        D.symmetry_report(tree, SPEC, chains=2, progress=False)


def test_after_collection_fills_the_after_columns(files, tmp_path):
    coll = pc.from_files(str(files / "*.pt"), SPEC)
    summary = coll.align(0, tmp_path / "aligned", progress=False)
    aligned = pc.from_files(list(summary.outputs), SPEC)
    assert len(aligned) == len(coll)
    report = D.symmetry_report(
        coll, SPEC, chains=RUNS, after=aligned, mmd_permutations=50, figures=True, progress=False
    )
    _same_rhat(report.convergence.after, D.rhat_ess(_chains(aligned)))
    total = report.rows[-1]
    assert total["rhat_max_after"] is not None and total["mmd2_after"] is not None
    assert set(report.moments) == {"before", "after"}
    assert list(report.figures) == ["rhat_hist"]
    with pytest.raises(ValueError, match="correspond one to one"):
        D.symmetry_report(coll, SPEC, chains=RUNS, after=aligned[:-4], progress=False)
    with pytest.raises(TypeError, match="apply to a checkpoint Collection"):
        D.symmetry_report(_chains(coll), SPEC, after=aligned, progress=False)


# ---------------------------------------------------------------------- memory
def test_memory_does_not_grow_with_the_number_of_checkpoints(tmp_path):
    _write(tmp_path, 8, 8, width=400, dtype=torch.float32)  # 64 checkpoints of ~10 KB
    paths = sorted(tmp_path.glob("*.pt"))
    coll = pc.Collection([TrackedSource(str(p)) for p in paths], SPEC)
    size = sum(v.numel() * v.element_size() for v in torch.load(paths[0], weights_only=True).values())
    budget = 256 << 10
    whole = 64 * size * 2  # every draw in float64, as the in-memory report holds them (and more)
    assert whole > 4 * budget

    def report(c):
        return lambda: D.symmetry_report(c, SPEC, chains=2, max_bytes=budget, mmd_permutations=20, progress=False)

    report(coll[:16])()  # first-time imports
    small, full = peak_bytes(report(coll[:16])), peak_bytes(report(coll))
    # The report holds a block (the R-hat kernel's work arrays: ~2.7 max_bytes measured), a few
    # checkpoints and the float64 moments, whatever the number of checkpoints; every draw at
    # once would take `whole`.
    assert full < 3 * budget < whole, (full, budget, whole)
    assert full < 1.25 * small, (full, small)


def test_report_mutual_information_uses_the_current_estimator_keyword():
    model = ps.models.BayesianMLP(3, [3], 2)
    gen = torch.Generator().manual_seed(0)
    runs = [{k: (torch.randn(s, generator=gen), torch.full(s, 0.1)) for k, s in model.spec.shapes.items()}
            for _ in range(2)]  # fmt: skip
    with warnings.catch_warnings():
        warnings.simplefilter("error", DeprecationWarning)
        warnings.simplefilter("error", FutureWarning)
        report = D.symmetry_report(runs, model.spec, num_samples=8, mi_samples=4, mmd_permutations=10, progress=False)
    assert report.info["I(g;w) estimator"].split(" ")[0] in ("exact", "permanent", "contrastive", "importance")


def test_rhat_ess_of_a_collection_or_its_dask_tree_is_streamed(files):
    """``ps.diagnostics.rhat_ess`` dispatches a Collection (with ``chains=``) and a dask-backed
    tree to the streamed kernel: the same numbers as on the draws in memory; the repr of a
    comparison without an "after" side prints."""
    coll = ps.collections.from_files(files / "*.pt", SPEC)
    want = D.rhat_ess(_chains(coll))
    _same_rhat(D.rhat_ess(coll, chains=_run_of), want)
    _same_rhat(D.rhat_ess(D.to_inference_data(coll, chains=_run_of)), want)
    with pytest.raises(TypeError, match="chains= applies"):
        D.rhat_ess(_chains(coll), chains=_run_of)
    assert "-> -" in repr(D.ConvergenceComparison(want, None, None, None))
