"""R-hat/ESS across runs: runs that are random relabellings of one posterior look
unconverged before alignment and converged after it."""

import math
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
    to_first = D.rhat_ess_before_after(runs, spec, reference="reference", num_samples=100, draws=cmp.draws_before)
    assert to_first.after.fraction_above(1.1) == 0.0


def test_rhat_ess_accepts_trees_and_checks_its_input():
    spec, runs = _permuted_runs()
    tree = D.to_inference_data(runs, num_samples=20, spec=spec, reference="barycenter")
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
    elif kind == "constant_chains":  # MAP runs: each chain constant, chains differ
        x = np.broadcast_to(rng.normal(size=(chains, 1, n)), x.shape).copy()
    elif kind == "alternating":  # -1, 1, -1, ...: the folded (tail) R-hat is 0/0, the bulk one is not
        x = np.broadcast_to((-1.0) ** (np.arange(draws)[None, :, None] + np.arange(chains)[:, None, None]), x.shape)
        x = x.copy()
    elif kind == "one_constant_chain":
        x[0] = rng.normal(size=n)
    x[..., 0] = 1.5  # a constant weight: R-hat undefined, ESS the number of draws
    return x


@settings(max_examples=40)
@given(
    kind=st.sampled_from(["iid", "ar1", "ties", "offsets", "constant_chains", "alternating", "one_constant_chain"]),
    chains=st.integers(2, 5),
    draws=st.integers(4, 70),
    n=st.integers(1, 12),
    seed=st.integers(0, 2**16),
)
def test_vectorized_rhat_and_ess_equal_arviz_stats(kind, chains, draws, n, seed):
    """The vectorized kernel computes exactly ArviZ's rank-normalized split R-hat and bulk ESS
    wherever ArviZ's answer is finite and not round-off; degenerate weights differ only where
    ArviZ's is an artefact (see ``_rank``)."""
    import arviz_stats as azs

    from pyro_symmetry.diagnostics._rank import degenerate, ess_bulk, rhat_rank

    x = _chains(kind, chains, draws, n, seed)
    da = xr.DataArray(x, dims=("chain", "draw", "w_dim"))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # ArviZ's 0/0 on the constant weight
        ref_r = np.asarray(azs.rhat(da, method="rank").values, dtype=float)
        ref_e = np.asarray(azs.ess(da, method="bulk").values, dtype=float)
    ours_r, ours_e = rhat_rank(x), ess_bulk(x)
    # ArviZ's R-hat of constant chains that differ is inf, or ~1e16 when np.var of identical
    # values rounds to ~1e-34 instead of 0: ours is inf there.
    artefact = ref_r > 1e8
    np.testing.assert_allclose(ours_r[~artefact], ref_r[~artefact], rtol=1e-10, atol=1e-12, equal_nan=True)
    assert np.isposinf(ours_r[artefact]).all()
    np.testing.assert_allclose(ours_e, ref_e, rtol=1e-10, atol=1e-10, equal_nan=True)
    # Degenerate weights: every split chain constant. R-hat is inf where they differ and NaN
    # (undefined) only where every draw is equal.
    degen = degenerate(x)
    split = np.concatenate([x[:, : draws // 2], x[:, draws - draws // 2 :]])
    all_equal = (split == split[:1, :1]).all((0, 1))
    assert degen[0] and np.isnan(ours_r[0]) and ref_e[0] == 2 * chains * (draws // 2)
    assert (np.isnan(ours_r) == all_equal).all()
    assert np.isposinf(ours_r[degen & ~all_equal]).all()
    if kind == "constant_chains":
        assert degen.all()
    # The summary: ESS undefined (NaN) on degenerate weights, both engines alike.
    ds = xr.Dataset({"w": da})
    summary = D.rhat_ess(ds)
    np.testing.assert_array_equal(summary.degenerate["w"], degen)
    assert np.isnan(summary.ess["w"][degen]).all()
    np.testing.assert_array_equal(summary.ess["w"][~degen], ours_e[~degen])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        np.testing.assert_array_equal(np.isnan(D.rhat_ess(ds, engine="arviz").ess["w"]), degen)


def test_engine_options():
    ds = xr.Dataset({"w": (("chain", "draw", "w_dim"), _chains("iid", 2, 8, 3, 0))})
    with pytest.raises(ValueError, match="engine must be"):
        D.rhat_ess(ds, engine="numba")
    with pytest.raises(ValueError, match="method='rank' only"):
        D.rhat_ess(ds, method="split")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        assert D.rhat_ess(ds, method="split", engine="arviz").rhat["w"].shape == (3,)


# ---------------------------------------------------------------------- degenerate draws
def _dataset(x):
    return xr.Dataset({"fc1.weight": (("chain", "draw", "a", "b"), x)})


@pytest.mark.parametrize("num_runs", [2, 3, 5])
@pytest.mark.parametrize("engine", ["vectorized", "arviz"])
def test_constant_runs_that_differ_are_not_converged(num_runs, engine):
    """MAP runs (AutoDelta, tiny scales): each run constant, the runs differ. Nothing in
    the summary may read as converged."""
    rng = np.random.default_rng(num_runs)
    x = np.broadcast_to(rng.normal(size=(num_runs, 1, 2, 3)), (num_runs, 20, 2, 3)).copy()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        s = D.rhat_ess(_dataset(x), engine=engine)
    assert (s.rhat["fc1.weight"] > 1e8).all()  # inf (ArviZ: inf or a round-off 1e16)
    if engine == "vectorized":
        assert np.isposinf(s.rhat["fc1.weight"]).all()
    for t in (1.01, 1.1, 1e6):
        assert s.fraction_above(t) == 1.0 and s.fraction_above(t, "fc1") == 1.0
    row = s.row()
    assert row["rhat_max"] > 1e8 and row["rhat_median"] > 1e8 and row["frac_rhat>1.01"] == 1.0
    assert math.isnan(row["ess_min"]) and math.isnan(row["ess_median"]) and row["degenerate"] == 6
    assert np.isnan(s.ess["fc1.weight"]).all() and s.num_degenerate() == 6
    assert "n/a" in str(s) and "degenerate" in str(s)


def test_identical_constant_runs_are_undefined_never_converged():
    x = np.full((3, 10, 2, 3), 0.25)
    s = D.rhat_ess(_dataset(x))
    assert np.isnan(s.rhat["fc1.weight"]).all() and s.num_degenerate() == 6
    assert s.fraction_above(1.01) == 1.0 and s.fraction_above(1e9) == 1.0
    row = s.row("fc1")
    assert row["rhat_max"] == math.inf and row["frac_rhat>1.1"] == 1.0 and math.isnan(row["ess_min"])


def test_partly_degenerate_layer_aggregates_are_pessimistic():
    rng = np.random.default_rng(0)
    x = rng.normal(size=(4, 50, 2, 3))
    x[:, :, 0, 0] = 3.0  # one weight constant and equal in every run: R-hat undefined
    s = D.rhat_ess(_dataset(x))
    assert np.isnan(s.rhat["fc1.weight"][0, 0]) and s.num_degenerate() == 1
    assert np.isfinite(s.rhat["fc1.weight"].ravel()[1:]).all()
    # Counted above every threshold, never dropped from the max; ESS min undefined, the
    # median (5 defined values of 6, NaN ranked lowest) is the mean of the 3rd and 4th lowest
    # defined ESS.
    assert s.fraction_above(1e6) == pytest.approx(1 / 6)
    row = s.row()
    assert row["rhat_max"] == math.inf and math.isnan(row["ess_min"])
    defined = np.sort(s.ess["fc1.weight"].ravel()[1:])
    assert row["ess_median"] == pytest.approx((defined[1] + defined[2]) / 2)


def test_half_degenerate_layer_has_no_ess_median():
    rng = np.random.default_rng(1)
    x = rng.normal(size=(2, 20, 1, 2))
    x[:, :, 0, 0] = 1.0
    row = D.rhat_ess(_dataset(x)).row()
    assert math.isnan(row["ess_median"]) and math.isnan(row["ess_min"])


def test_nan_rhat_in_a_handmade_summary_counts_as_not_converged():
    s = D.ConvergenceSummary(
        rhat={"w": np.array([1.0, np.nan, 1.005])},
        ess={"w": np.array([100.0, np.nan, 90.0])},
        layers={"w": "w"},
        num_chains=2,
        num_draws=10,
    )
    assert s.fraction_above(1.01) == pytest.approx(1 / 3) and s.num_degenerate() == 1
    assert s.row()["rhat_max"] == math.inf
    with pytest.raises(ValueError, match="threshold"):  # NaN > every R-hat is False: "0% above"
        s.fraction_above(float("nan"))


def test_nan_or_inf_draws_are_refused_not_summarized():
    x = np.random.default_rng(0).normal(size=(2, 10, 2, 3))
    for bad in (np.nan, np.inf):
        y = x.copy()
        y[1, 4, 0, 2] = bad
        for engine in ("vectorized", "arviz"):
            with pytest.raises(ValueError, match=r"'fc1.weight' hold 1 NaN or Inf"):
                D.rhat_ess(_dataset(y), engine=engine)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_tiny_scale_gaussian_runs_are_degenerate_before_and_after_alignment(dtype):
    """Relabelled copies of one posterior with scale 1e-30: the draws are the means. Before
    alignment the runs differ (R-hat inf), after it they coincide (R-hat undefined): neither
    is a convergence verdict."""
    spec, runs = _permuted_runs(num_runs=3)
    runs = [
        {k: (loc.to(dtype), torch.full_like(scale, 1e-30, dtype=dtype)) for k, (loc, scale) in q.items()} for q in runs
    ]
    cmp = D.rhat_ess_before_after(runs, spec, num_samples=12)
    total = sum(v.numel() for v, _ in runs[0].values())
    for summary in (cmp.before, cmp.after):
        assert summary.num_degenerate() == total
        assert summary.fraction_above(1.01) == 1.0 and summary.row()["rhat_max"] == math.inf
    moved = [k for k in spec.sites]
    assert all(np.isposinf(cmp.before.rhat[k]).any() for k in moved)
    assert all(np.isnan(cmp.after.rhat[k]).all() for k in moved)
