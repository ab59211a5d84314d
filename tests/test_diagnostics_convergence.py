"""R-hat/ESS across runs: runs that are random relabellings of one posterior look
unconverged before alignment and converged after it."""

import warnings

import numpy as np
import pytest
import torch
import xarray as xr
from hypothesis import given, settings
from hypothesis import strategies as st

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


def _chains(kind, chains, draws, n, seed):
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(chains, draws, n))
    if kind == "ar1":  # strongly autocorrelated chains: Geyer's truncation differs per weight
        phi = rng.uniform(-0.8, 0.97, size=n)
        for t in range(1, draws):
            x[:, t] = phi * x[:, t - 1] + x[:, t]
    elif kind == "ties":
        x = np.round(x)
    elif kind == "offsets":  # chains in different modes
        x = x + 3 * rng.normal(size=(chains, 1, n))
    x[..., 0] = 1.5  # a constant weight: R-hat undefined, ESS the number of draws
    return x


@settings(max_examples=30)
@given(
    kind=st.sampled_from(["iid", "ar1", "ties", "offsets"]),
    chains=st.integers(2, 5),
    draws=st.integers(4, 70),
    n=st.integers(1, 12),
    seed=st.integers(0, 2**16),
)
def test_vectorized_rhat_and_ess_equal_arviz_stats(kind, chains, draws, n, seed):
    """The vectorized kernel computes exactly ArviZ's rank-normalized split R-hat and bulk ESS."""
    x = _chains(kind, chains, draws, n, seed)
    ds = xr.Dataset({"w": (("chain", "draw", "w_dim"), x)})
    ours = D.rhat_ess(ds)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # ArviZ's 0/0 on the constant weight
        ref = D.rhat_ess(ds, engine="arviz")
    np.testing.assert_allclose(ours.rhat["w"], ref.rhat["w"], rtol=1e-10, atol=1e-12, equal_nan=True)
    np.testing.assert_allclose(ours.ess["w"], ref.ess["w"], rtol=1e-10, atol=1e-10, equal_nan=True)
    assert np.isnan(ours.rhat["w"][0]) and ours.ess["w"][0] == 2 * chains * (draws // 2)


def test_engine_options():
    ds = xr.Dataset({"w": (("chain", "draw", "w_dim"), _chains("iid", 2, 8, 3, 0))})
    with pytest.raises(ValueError, match="engine must be"):
        D.rhat_ess(ds, engine="numba")
    with pytest.raises(ValueError, match="method='rank' only"):
        D.rhat_ess(ds, method="split")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        assert D.rhat_ess(ds, method="split", engine="arviz").rhat["w"].shape == (3,)
