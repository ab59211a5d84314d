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
    # Relabelled copies of one posterior: large R-hat before; after alignment the runs are iid
    # draws of one Gaussian, whose split R-hat (6 half-chains of 15) exceeds 1.1 with chance
    # ~0.002 per weight (F(5, 84) > 4.15) and 1.2 with chance ~1e-5.
    assert total["frac_rhat>1.1_before"] > 0.5 and total["frac_rhat>1.1_after"] <= 0.05
    assert total["rhat_max_after"] < 1.2
    # After alignment the runs are the same Gaussian: the path between them is constant.
    assert total["barrier_before"] > 0.01 and total["barrier_after"] == pytest.approx(0.0, abs=1e-9)
    assert total["mmd_p_before"] < 0.05 and total["mmd_p_after"] > 0.01
    assert abs(total["mmd2_after"]) < 0.05 * total["mmd2_before"]
    # I(g; w) per run by exact enumeration (|G| = 4! 3!): the relabelled modes of q (means
    # 2 apart, scale 0.05) do not overlap, so I = log|G| for the network and for each layer.
    assert set(report.mutual_information) == {"all", "fc1", "fc2"}
    for name, log_order in (("all", model.spec.log_order), ("fc1", math.lgamma(5)), ("fc2", math.lgamma(4))):
        for est in report.mutual_information[name]:
            assert est.estimator == "exact" and est.value == pytest.approx(log_order, abs=1e-4)
    assert rows["fc1"]["mi_mean"] == pytest.approx(math.lgamma(5), abs=1e-4)

    text = str(report)
    assert text.splitlines()[0].split()[:2] == ["layer", "width"] and "→" in text
    md = (tmp_path / "report.md").read_text()
    assert md == report.to_markdown()
    for needle in ("| layer |", "log\\|G\\|", "## I(g; w) per run", "## Loss barriers", "Embedded in report.html"):
        assert needle in md
    html = (tmp_path / "report.html").read_text()
    assert html.count("<table>") == 3 and "<img src='data:image/png;base64," in html
    assert set(report.figures) == {"rhat_hist", "marginals", "ranks", "barriers"}
    for png in report.figures.values():
        assert png[:8] == b"\x89PNG\r\n\x1a\n"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["draws.nc", "draws_aligned.nc", "report.html", "report.md"]
    assert report.files == {k: tmp_path / v for k, v in D.report.REPORT_FILES.items()}


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


# ---------------------------------------------------------------------- degenerate draws, layouts, failed runs
def test_report_on_point_estimates_never_reads_converged():
    """MAP runs (every draw of a run the same point): before alignment the runs differ
    (R-hat inf), after it they are one point (R-hat undefined). Neither is "0% above 1.01"."""
    model, runs, _, _ = _permuted_runs(3)
    points = [{k: loc.expand(12, *loc.shape).clone() for k, (loc, _) in q.items()} for q in runs]
    report = D.symmetry_report(points, model.spec, mmd_permutations=20, progress=False)
    total = report.rows[-1]
    for when in ("before", "after"):
        assert total[f"frac_rhat>1.01_{when}"] == 1.0 and total[f"frac_rhat>1.1_{when}"] == 1.0
        assert total[f"rhat_max_{when}"] == math.inf and math.isnan(total[f"ess_median_{when}"])
        assert total[f"degenerate_{when}"] == total["num_weights"]
    cells = dict(zip(report.table()[0], report.table()[-1]))
    assert cells["R-hat max"] == "inf → inf" and cells["R-hat > 1.01"] == "100% → 100%"
    assert cells["ESS median"] == "n/a (degenerate) → n/a (degenerate)"
    degenerate = [n for n in report.notes if "degenerate draws" in n]
    assert len(degenerate) == 2 and "fc1 16, fc2 15, fc3 8" in degenerate[0]  # weights per layer
    assert degenerate[0] in str(report) and degenerate[0] in report.to_markdown()


def _functional_runs(num_runs=2, seed=0):
    """Gaussian runs of a NumPyro-style network (weights ``(in, out)``), relabelled copies."""
    shapes = {"w1": (3, 4), "b1": (4,), "w2": (4, 2), "b2": (2,)}
    group = ps.NeuronGroup(4, incoming=[("w1", 1), ("b1", 0)], outgoing=[("w2", 0)])
    spec = ps.PermutationSpec({"h": group}, shapes)
    g = torch.Generator().manual_seed(seed)
    loc = {k: 2.0 * torch.randn(s, generator=g) for k, s in shapes.items()}
    perms = spec.sample((num_runs,), generator=g)
    runs = []
    for r in range(num_runs):
        locs = spec.apply(loc, {k: v[r] for k, v in perms.items()})
        runs.append({k: (locs[k], torch.full_like(locs[k], 0.05)) for k in shapes})
    return spec, runs


def test_report_widths_of_an_in_out_layout_come_from_the_spec():
    spec, runs = _functional_runs()
    report = D.symmetry_report(runs, spec, num_samples=20, mi_samples=4, mmd_permutations=20, progress=False)
    widths = {r["layer"]: r["width"] for r in report.rows}
    # w2 is (hidden, out): its layer has 2 output neurons (not the 4 of its first axis);
    # b2 is no group's: its width is not guessed.
    assert widths == {"w1": 4, "b1": 4, "w2": 2, "b2": None, "all": 4}
    assert dict(zip(report.table()[0], report.table()[4]))["width"] == "–"


class _Run:
    """A TrainedRun-like record, as ``train_runs(on_error="keep")`` returns them."""

    def __init__(self, posterior=None, error=None):
        self.guide, self.state, self.model, self.error = posterior, {}, None, error


def test_report_skips_failed_runs_with_a_note():
    model, runs, x, y = _permuted_runs(3)
    failed = _Run(None, FloatingPointError("non-finite loss at step 12"))
    wrapped = [_Run(runs[0]), failed, _Run(runs[1]), _Run(runs[2])]
    loss = ps.gaussian_nll_loss(model, x, y, num_samples=4)
    report = D.symmetry_report(
        wrapped,
        model.spec,
        loss_fn=loss,
        num_samples=12,
        mi_samples=4,
        mmd_permutations=20,
        barrier_points=3,
        progress=False,
    )
    assert report.notes[0] == "run 1 skipped: FloatingPointError: non-finite loss at step 12"
    assert "note: run 1 skipped" in str(report) and "run 1 skipped" in report.to_html()
    assert report.info["runs"] == 3 and report.runs == [0, 2, 3]
    assert [label for label, _, _ in report.barriers] == ["runs 0-2", "runs 2-3"]
    assert report.info["MMD"].startswith("runs 0 vs 2")
    assert "| 3 |" in report.to_markdown()  # the I(g; w) table names runs by their index
    with pytest.raises(ValueError, match=r"symmetry_report needs at least 2 runs, got 1 after skipping 1 failed"):
        D.symmetry_report([_Run(runs[0]), failed], model.spec, progress=False)


def test_rhat_histogram_legend_counts_infinite_and_undefined_rhat_as_above():
    pytest.importorskip("matplotlib")
    import numpy as np

    before = {"w": np.array([1.0, np.inf, np.nan, 1.5])}
    after = {"w": np.array([1.0, 1.001, 1.002, 1.0])}
    fig = D.plots.plot_rhat_hist(before, after)
    labels = [t.get_text() for t in fig.axes[0].get_legend().get_texts()]
    assert labels[0] == "before alignment (75% > 1.1; 2 inf/undefined not shown)"
    assert labels[1] == "after alignment (0% > 1.1)"


def test_format_row_shows_nan_estimates_as_nan_not_as_blanks():
    from pyro_symmetry.diagnostics.report import COLUMNS, _format_row

    nan = float("nan")
    row = {"layer": "all", "width": 3, "log_order": 1.8, "mi_mean": nan, "mi_sd": nan}
    row.update(barrier_before=nan, barrier_after=0.1, rhat_max_before=nan, rhat_max_after=math.inf)
    cells = dict(zip(COLUMNS, _format_row(row)))
    assert cells["I(g;w) / log|G|"] == "NaN ± NaN / 1.8"
    assert cells["barrier"] == "NaN → 0.100" and cells["R-hat max"] == "n/a → inf"


def test_deprecated_report_options_warn_and_map_to_the_new_names():
    """``align=`` and ``mi_method=`` are the old spellings of ``reference=`` and ``mi_estimator=``."""
    from pyro_symmetry.diagnostics.report import _renamed_options

    with pytest.warns(DeprecationWarning, match="reference="):
        assert _renamed_options("barycenter", "auto", "reference", None) == (0, "auto")
    with pytest.warns(DeprecationWarning, match="mi_estimator="):
        assert _renamed_options("barycenter", "auto", None, "exact") == ("barycenter", "exact")
    with pytest.raises(ValueError, match="reference must be"):
        _renamed_options("first", "auto", None, None)
