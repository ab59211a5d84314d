"""symmetry_report on tiny examples: every section renders, and on runs that are
relabellings of one posterior the 'after' columns show no disagreement left."""

import math

import pytest
import torch

import pyro_symmetry as ps

D = ps.diagnostics


def _permuted_runs(num_runs=3, seed=0):
    model = ps.models.BayesianMLP(3, [4, 3], 2, activation="gelu")
    spec = model.spec
    g = torch.Generator().manual_seed(seed)
    loc = {k: 2.0 * torch.randn(s, generator=g) for k, s in spec.shapes.items()}
    scale = {k: torch.full(s, 0.05) for k, s in spec.shapes.items()}
    perms = spec.sample((num_runs,), generator=g)
    runs = []
    for r in range(num_runs):
        p = {k: v[r] for k, v in perms.items()}
        locs, scales = spec.apply(loc, p), spec.apply(scale, p)
        runs.append({k: (locs[k], scales[k]) for k in loc})
    x = torch.randn(40, 3, generator=g)
    y = model.functional(loc, x).argmax(-1)
    return model, runs, x, y


def test_report_renders_every_section_and_removes_the_symmetry(tmp_path):
    model, runs, x, y = _permuted_runs()
    loss = ps.gaussian_nll_loss(model, x, y, num_samples=8)
    report = D.symmetry_report(
        runs,
        model.spec,
        out_dir=tmp_path,
        loss_fn=loss,
        num_samples=30,
        mi_samples=8,
        mmd_permutations=50,
        barrier_points=7,
        progress=False,
    )
    rows = {r["layer"]: r for r in report.rows}
    assert list(rows) == ["fc1", "fc2", "fc3", "all"]
    assert rows["fc1"]["width"] == 4 and rows["fc3"]["width"] == 2 and rows["fc3"]["log_order_share"] == 0
    assert rows["fc1"]["log_order_share"] + rows["fc2"]["log_order_share"] == pytest.approx(1.0)
    total = rows["all"]
    # Relabelled copies of one posterior: large R-hat before, none above 1.1 after.
    assert total["frac_rhat>1.1_before"] > 0.5 and total["frac_rhat>1.1_after"] == 0.0
    # After alignment the runs are the same Gaussian: the path between them is constant.
    assert total["barrier_before"] > 0.01 and total["barrier_after"] == pytest.approx(0.0, abs=1e-9)
    assert total["mmd_p_before"] < 0.05 and total["mmd_p_after"] > 0.01
    assert abs(total["mmd2_after"]) < 0.05 * total["mmd2_before"]
    # I(g; w) per run by exact enumeration (|G| = 4! 3!): the relabelled modes of q (means
    # 2 apart, scale 0.05) do not overlap, so I = log|G| for the network and for each layer.
    assert set(report.mutual_information) == {"all", "fc1", "fc2"}
    for name, log_order in (("all", model.spec.log_order), ("fc1", math.lgamma(5)), ("fc2", math.lgamma(4))):
        for est in report.mutual_information[name]:
            assert est.method == "exact" and est.value == pytest.approx(log_order, abs=1e-4)
    assert rows["fc1"]["mi_mean"] == pytest.approx(math.lgamma(5), abs=1e-4)

    text = str(report)
    assert text.splitlines()[0].split()[:2] == ["layer", "width"] and "→" in text
    md = (tmp_path / "report.md").read_text()
    assert md == report.to_markdown()
    for needle in ("| layer |", "log\\|G\\|", "## I(g; w) per run", "## Loss barriers", "![barriers](barriers.png)"):
        assert needle in md
    html = (tmp_path / "report.html").read_text()
    assert html.count("<table>") == 3 and "<img src='rhat_hist.png'" in html
    assert set(report.figures) == {"rhat_hist", "marginals", "ranks", "barriers"}
    for path in report.figures.values():
        assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_report_on_sample_sets_skips_what_needs_variational_runs():
    model, runs, _, _ = _permuted_runs(2)
    g = torch.Generator().manual_seed(1)
    chains = [{k: loc + s * torch.randn(80, *loc.shape, generator=g) for k, (loc, s) in q.items()} for q in runs]
    report = D.symmetry_report(chains, model.spec, mmd_permutations=20, progress=False)
    assert report.mutual_information == {} and report.barriers == [] and len(report.notes) == 2
    # Draw-by-draw alignment; 2 iid chains of 80 draws have split R-hat within ~0.03 of 1.
    assert report.rows[-1]["frac_rhat>1.1_before"] > 0.5 and report.rows[-1]["rhat_max_after"] < 1.1
    assert "Notes" in report.to_markdown() and report.figures == {}
    with pytest.raises(ValueError, match="2 runs"):
        D.symmetry_report(chains[:1], model.spec, progress=False)
    with pytest.raises(ps.SpecError, match="spec"):
        D.symmetry_report(chains, progress=False)
