"""Follow-ups of issue 12 in the estimators (items 1 and 11): numbers that must be right
far from ``q``, at extreme ratios ``|loc| / scale`` and in float32 with tiny scales.

References are written here: per-neuron Normal log-densities summed directly in float64
(no quadratic expansion), and brute force over all ``n!`` (signed) permutations.
"""

from __future__ import annotations

import math

import pyro.distributions as dist
import pytest
import torch
from strategies_estimators import brute_force_log_q_sym, mean_field

import pyro_symmetry as ps
from pyro_symmetry.estimators import BaseDensity
from pyro_symmetry.estimators.factors import neuron_log_factors
from pyro_symmetry.models import BayesianMLP


def _neuron_rows(w: dict, n: int) -> torch.Tensor:
    """A one-hidden-layer MLP's neuron contents ``(n, m)``: incoming row, bias, outgoing column."""
    return torch.cat([w["fc1.weight"], w["fc1.bias"].unsqueeze(-1), w["fc2.weight"].transpose(0, 1)], -1)


def _direct_factors(w: dict, loc: dict, scale: dict, n: int, signed: bool) -> torch.Tensor:
    """``A[i, s, j] = sum_k log N(sign_s w_ik | loc_jk, scale_jk)`` in float64, term by term."""
    v = _neuron_rows({k: x.double() for k, x in w.items()}, n)
    mu = _neuron_rows({k: x.double() for k, x in loc.items()}, n)
    sd = _neuron_rows({k: x.double() for k, x in scale.items()}, n)
    out = []
    for sign in (1.0, -1.0) if signed else (1.0,):
        z = (sign * v[:, None, :] - mu[None, :, :]) / sd[None, :, :]
        out.append((-0.5 * z.square() - sd.log()[None] - 0.5 * math.log(2 * math.pi)).sum(-1))
    return torch.stack(out, 1)  # (n, S, n)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("ratio", [1e3, 1e5, 1e7])
@pytest.mark.parametrize("activation", ["relu", "tanh"])
def test_neuron_log_factors_no_cancellation(dtype, ratio, activation):
    """``|loc| / scale`` large: the expansion ``-0.5 l v^2 + l v loc - 0.5 l loc^2`` cancels
    terms of size ``ratio^2`` (1e14 at 1e7: whole nats lost in float64); the entries must
    match the direct float64 sums to the rounding of the inputs' own differences."""
    n = 5
    model = BayesianMLP(3, [n], 2, activation=activation)
    spec = model.spec
    group = next(iter(spec.groups))
    signed = spec.groups[group].signed
    g = torch.Generator().manual_seed(1)
    loc, scale, w = {}, {}, {}
    for s, shape in spec.shapes.items():
        sd = 0.5 + torch.rand(shape, generator=g, dtype=torch.float64)
        mu = ratio * sd * (1 + 0.01 * torch.randn(shape, generator=g, dtype=torch.float64))
        loc[s], scale[s] = mu.to(dtype), sd.to(dtype)
        # near q's mean, with the neurons permuted among themselves on some rows
        w[s] = (mu + sd * torch.randn(shape, generator=g, dtype=torch.float64)).to(dtype)
    base = BaseDensity({s: (loc[s], scale[s]) for s in spec.shapes}, spec)
    a = neuron_log_factors(w, base.marginals(), spec, group)
    ref = _direct_factors(w, loc, scale, n, signed)
    assert a.shape == ref.shape and a.dtype == dtype
    # the result's own rounding: relative to the entry (float32: a few ulp of |A|), and
    # the float64 rounding of the inputs' differences (tiny)
    eps = torch.finfo(dtype).eps
    tol = 1e-9 + 16 * eps * ref.abs()
    err = (a.double() - ref).abs()
    assert bool((err <= tol).all()), (float(err.max()), float((err / (1 + ref.abs())).max()))


# ---------------------------------------------------------------- float32, tiny scales


def _tiny_q(spec, scale: float, dtype: torch.dtype, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    loc = {s: torch.randn(sh, generator=g, dtype=torch.float64) for s, sh in spec.shapes.items()}
    z = {s: torch.randn(sh, generator=g, dtype=torch.float64) for s, sh in spec.shapes.items()}
    sd = {s: scale * (1 + torch.rand(sh, generator=g, dtype=torch.float64)) for s, sh in spec.shapes.items()}
    q = {s: dist.Normal(loc[s].to(dtype), sd[s].to(dtype)).to_event(len(sh)) for s, sh in spec.shapes.items()}
    w = {s: (loc[s].to(dtype).double() + sd[s].to(dtype).double() * z[s]).to(dtype) for s in spec.shapes}
    return q, w


@pytest.mark.parametrize("scale", [1e-20, 1e-30, 1e-37])
def test_float32_tiny_scale_log_prob(scale):
    """torch's ``Normal.log_prob`` squares the scale (0 in float32 below ~1e-19): NaN. The
    base density and ``Symmetrized.log_prob`` must match a float64 brute force instead."""
    hidden = [3]
    spec = BayesianMLP(3, hidden, 2).spec
    q32, w32 = _tiny_q(spec, scale, torch.float32)
    q64 = {
        s: dist.Normal(d.base_dist.loc.double(), d.base_dist.scale.double()).to_event(d.event_dim)
        for s, d in q32.items()
    }
    w64 = {s: x.double() for s, x in w32.items()}
    ref_q = sum(q64[s].log_prob(w64[s]) for s in spec.shapes)
    ref_sym = brute_force_log_q_sym(q64, w64, hidden, signed=False)
    dim = sum(x.numel() for x in w32.values())
    eps = torch.finfo(torch.float32).eps
    base = BaseDensity(q32, spec)
    out_q = base.log_prob(w32)
    assert torch.isfinite(out_q) and abs(float(out_q) - float(ref_q)) <= 4 * dim * eps * (abs(float(ref_q)) + dim)
    out_sym = ps.Symmetrized(q32, spec, estimator="exact").log_prob(w32)
    assert torch.isfinite(out_sym)
    assert abs(float(out_sym) - float(ref_sym)) <= 4 * dim * eps * (abs(float(ref_sym)) + dim)


def test_float32_scale_below_reciprocal_range_raises():
    """A float32 scale whose reciprocal overflows (below ~3e-39) is refused, saying why."""
    spec = BayesianMLP(3, [3], 2).spec
    q = {s: (torch.zeros(sh), torch.full(sh, 1e-40)) for s, sh in spec.shapes.items()}
    with pytest.raises(ValueError, match="reciprocal overflows.*float64"):
        BaseDensity(q, spec)


# ---------------------------------------------------------------- widths 21-25, far from q


def test_default_log_prob_exact_far_from_q_width_21():
    """Beyond width 20 the default estimator was the importance bound, tuned to draws of
    ``q``: at a point far from ``q`` it was ~8 nats off here. ``"auto"`` for a density
    evaluated at given points now uses the permanent up to width 25; reference: direct
    float64 factors and an independent subset dynamic program (numpy, log space)."""
    from test_permanent_robust import subset_dp_log_perm

    n = 21
    spec = BayesianMLP(2, [n], 1).spec
    q = mean_field(spec.shapes, 0)
    g = torch.Generator().manual_seed(3)
    w = {s: 3.0 * torch.randn(sh, generator=g, dtype=torch.float64) for s, sh in spec.shapes.items()}
    loc = {s: d.base_dist.loc for s, d in q.items()}
    scale = {s: d.base_dist.scale for s, d in q.items()}
    a = _direct_factors(w, loc, scale, n, signed=False)[:, 0, :]
    log_q = sum(q[s].log_prob(w[s]) for s in spec.shapes)
    ref = float(log_q) + subset_dp_log_perm(a.numpy()) - float(a.diagonal().sum()) - math.lgamma(n + 1)
    q_sym = ps.Symmetrized(q, spec)
    assert q_sym.estimator == "permanent"
    out = float(q_sym.log_prob(w))
    assert abs(out - ref) <= 1e-9 * (1 + abs(ref)), (out, ref)
    assert abs(float(ps.estimators.log_q_sym(q, spec, w)) - ref) <= 1e-9 * (1 + abs(ref))


# ---------------------------------------------------------------- one vocabulary (issue 13, item 7)


def test_num_permutations_and_estimator_names():
    """``num_permutations`` is the number of group elements and ``estimator`` the choice of
    estimator everywhere; the old names still work for one release, with a warning naming
    the new one; results are frozen dataclasses with short reprs."""
    import dataclasses
    import inspect

    spec = BayesianMLP(3, [3], 2).spec
    q = mean_field(spec.shapes, 0)
    for fn in (ps.mutual_information, ps.symmetry_log_ratio, ps.log_q_sym, ps.log_s):
        assert "estimator" in inspect.signature(fn).parameters, fn
    assert "num_permutations" in inspect.signature(ps.Symmetrized).parameters
    q_sym = ps.Symmetrized(q, spec, estimator="contrastive", num_permutations=5)
    assert q_sym.num_permutations == 5
    with pytest.warns(DeprecationWarning, match="num_permutations"):
        old = ps.Symmetrized(q, spec, estimator="contrastive", num_samples=5)
    assert old.num_permutations == 5
    with pytest.warns(DeprecationWarning, match="num_permutations"):
        assert old.num_samples == 5
    with pytest.raises(TypeError, match="num_permutations= only"), pytest.warns(DeprecationWarning):
        ps.Symmetrized(q, spec, num_permutations=4, num_samples=5)
    assert len(repr(q_sym)) < 200 and "num_permutations=5" in repr(q_sym)

    torch.manual_seed(0)
    est = ps.mutual_information(q, spec, estimator="exact", num_samples=20)
    torch.manual_seed(0)
    with pytest.warns(DeprecationWarning, match="estimator="):
        old_est = ps.mutual_information(q, spec, method="exact", num_samples=20)
    assert est == old_est and est.estimator == "exact"
    assert dataclasses.is_dataclass(est) and dataclasses.fields(est)
    with pytest.raises(dataclasses.FrozenInstanceError):
        est.value = 0.0
    with pytest.warns(DeprecationWarning, match="estimator"):
        assert est.method == "exact"
    assert len(repr(est)) < 200 and "estimator='exact'" in repr(est)
    with pytest.raises(TypeError, match="estimator= only"), pytest.warns(DeprecationWarning):
        ps.mutual_information(q, spec, estimator="exact", method="exact", num_samples=20)

    w = BaseDensity(q, spec).sample()
    ref = ps.symmetry_log_ratio(q, spec, w, estimator="exact")
    with pytest.warns(DeprecationWarning, match="estimator="):
        assert torch.equal(ps.symmetry_log_ratio(q, spec, w, method="exact"), ref)
    with pytest.warns(DeprecationWarning, match="estimator="):
        assert torch.equal(ps.log_q_sym(q, spec, w, method="exact"), ps.log_q_sym(q, spec, w, estimator="exact"))


# ---------------------------------------------------------------- guides read through ps.as_posterior


def test_base_of_a_map_guide_names_the_guide():
    """A fitted ``AutoDelta`` is a point, not a density: the error names the guide (it
    used to speak of "a mapping of point tensors" the user never passed)."""
    import pyro
    from pyro.infer import SVI, Trace_ELBO
    from pyro.infer.autoguide import AutoDelta

    from pyro_symmetry._state import isolated

    with isolated():
        pyro.clear_param_store()
        model = BayesianMLP(3, [3], 1, likelihood="regression")
        guide = AutoDelta(model)
        x, y = torch.randn(8, 3), torch.randn(8)
        SVI(model, guide, pyro.optim.Adam({"lr": 0.01}), Trace_ELBO()).step(x, y)
        with pytest.raises(ps.SpecError, match="AutoDelta is a point estimate"):
            ps.mutual_information(guide, model.spec, "exact", num_samples=4)
