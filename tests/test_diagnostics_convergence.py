"""R-hat/ESS across runs: runs that are random relabellings of one posterior look
unconverged before alignment and converged after it."""

import pytest
import torch

import pyro_symmetry as ps

D = ps.diagnostics


def _permuted_runs(activation="gelu", num_runs=4, seed=0):
    model = ps.models.BayesianMLP(3, [5, 4], 2, activation=activation)
    spec = model.spec
    g = torch.Generator().manual_seed(seed)
    loc = {k: torch.randn(s, generator=g) for k, s in spec.shapes.items()}
    scale = {k: torch.full(s, 0.1) for k, s in spec.shapes.items()}
    perms = spec.sample((num_runs,), generator=g)
    runs = []
    for r in range(num_runs):
        p = {k: v[r] for k, v in perms.items()}
        locs, scales = spec.apply(loc, p), spec.apply(scale, {k: v.abs() - (v < 0).long() for k, v in p.items()})
        runs.append({k: (locs[k], scales[k]) for k in loc})
    return spec, runs


@pytest.mark.parametrize("activation", ["gelu", "tanh"])
def test_rhat_of_permuted_runs_is_large_before_and_one_after_alignment(activation):
    spec, runs = _permuted_runs(activation)
    cmp = D.rhat_ess_before_after(runs, spec, num_samples=100)
    before, after = cmp.before, cmp.after
    # Every weight a group moves disagrees across runs by O(1) with spread 0.1 (only the
    # output bias fc3.bias is untouched by the group).
    assert before.fraction_above(1.1) > 0.8 and before.row()["rhat_max"] > 1.5
    # After alignment the chains are iid draws of one Gaussian: split R-hat of 4 x 100 iid
    # draws has sd ~ 0.005, so 1.1 is > 15 sd away.
    assert after.fraction_above(1.1) == 0.0 and after.row()["rhat_max"] < 1.05
    assert after.row()["ess_min"] > 5 * before.row()["ess_min"]
    rows = cmp.table()
    assert [r["layer"] for r in rows] == ["fc1", "fc2", "fc3", "all"]
    assert rows[-1]["num_weights"] == sum(v.numel() for v, _ in runs[0].values())
    assert rows[0]["frac_rhat>1.1_before"] > rows[0]["frac_rhat>1.1_after"]
    # Aligning to run 0 instead of the barycenter removes the same disagreement.
    to_first = D.rhat_ess_before_after(runs, spec, align="reference", num_samples=100, draws=cmp.draws_before)
    assert to_first.after.fraction_above(1.1) == 0.0


def test_rhat_ess_accepts_trees_and_checks_its_input():
    spec, runs = _permuted_runs()
    tree = D.to_inference_data(runs, num_samples=20, spec=spec, align="barycenter")
    summary = D.rhat_ess(tree, var_names=["fc1.weight"], layers={"fc1.weight": "first"})
    assert summary.layer_names == ["first"] and summary.rhat["fc1.weight"].shape == (5, 3)
    assert "first" in str(summary)
    with pytest.raises(ValueError, match="var_names"):
        D.rhat_ess(tree, var_names=["nope"])
    with pytest.raises(ValueError, match="2 chains"):
        D.rhat_ess(D.to_inference_data(runs[:1], num_samples=20))
    with pytest.raises(TypeError, match="DataTree"):
        D.rhat_ess({"a": 1})
