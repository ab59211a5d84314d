"""Minimum mass, the mass, rescaling, sign flips and canonical forms at extreme magnitudes.

The minimizing log-scales do not change when every weight is multiplied by the same
constant ``c`` (``M(u; c W) = c^2 M(u; W)``), so ``min_mass(c W)`` must return the
log-scales of ``min_mass(W)``, ``c`` times its network and ``c^2`` times its masses, in
float32 and float64, for ``c`` from ``1e-25`` to ``1e20`` (float32 squares of such weights
underflow or overflow). The references are computed independently in float64: the mass
as a log-sum-exp of ``2 log|w|`` terms (range-safe), its minimizer by scipy, and the
closed form for one hidden neuron.
"""

import math

import numpy as np
import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from scipy.optimize import minimize
from strategies import mlp_architectures, model_params, seeds
from test_scaling import random_log_scales, rel_err

import pyro_symmetry as ps
from pyro_symmetry.models import BayesianCNN, BayesianMLP

SCALES = [1e-25, 1e-10, 1.0, 1e10, 1e20]
# float32 stops at a relative imbalance of 1e-5; its log-scales are that accurate
U_TOL = {torch.float32: 1e-4, torch.float64: 1e-8}
MASS_RTOL = {torch.float32: 1e-5, torch.float64: 1e-10}


def log_norm(x: torch.Tensor) -> float:
    """``log ||x||_2`` of any float tensor, in float64 without overflow or underflow."""
    x = x.double().abs()
    big = x.max()
    return math.log(big.item()) + 0.5 * math.log((x / big).square().sum().item())


def log_mass_mlp(params, names, u, include_biases=False):
    """``log M(u)`` of an MLP ``names`` (``fc1 .. fcL``) as a log-sum-exp over every entry of
    ``2 log|w| + 2 (u_out[i] - u_in[j])``: exact in float64 at any magnitude of the weights."""
    L = len(names)
    us = [torch.zeros(params[f"{names[0]}.weight"].shape[-1], dtype=torch.float64)]
    us += [u[n] for n in names[:-1]] + [torch.zeros(params[f"{names[-1]}.weight"].shape[-2], dtype=torch.float64)]
    terms = []
    for l, n in enumerate(names):
        w = params[f"{n}.weight"].double()
        terms.append((2 * w.abs().log() + 2 * (us[l + 1][:, None] - us[l][None, :])).flatten())
        if include_biases and l < L - 1:
            terms.append(2 * params[f"{n}.bias"].double().abs().log() + 2 * us[l + 1])
    return torch.logsumexp(torch.cat(terms), 0)


def scipy_min_mass(params, names, sizes, include_biases=False):
    """``(u*, log M(u*))`` by L-BFGS on the log-domain objective (an independent reference)."""
    splits = np.cumsum(sizes)[:-1]

    def f(flat):
        v = torch.tensor(flat, dtype=torch.float64, requires_grad=True)
        u = dict(zip(names, torch.split(v, list(sizes))))
        val = log_mass_mlp(params, names, u, include_biases)
        (g,) = torch.autograd.grad(val, v)
        return val.item(), g.numpy()

    res = minimize(f, np.zeros(sum(sizes)), jac=True, method="L-BFGS-B", options=dict(ftol=0.0, gtol=1e-13))
    return dict(zip(names, (torch.from_numpy(a) for a in np.split(res.x, splits)))), res.fun


@pytest.mark.parametrize("scale", SCALES)
@pytest.mark.parametrize("include_biases", [False, True])
def test_one_hidden_neuron_matches_the_closed_form(scale, dtype, include_biases):
    """``u* = (log ||w_out|| - log ||w_in||) / 2``, and the balanced mass is ``2 ||w_in|| ||w_out||``."""
    g = torch.Generator().manual_seed(0)
    spec = BayesianMLP(3, [1], 2).spec
    params = {
        "fc1.weight": torch.randn(1, 3, generator=g, dtype=torch.float64) * 3.0,
        "fc1.bias": torch.randn(1, generator=g, dtype=torch.float64),
        "fc2.weight": torch.randn(2, 1, generator=g, dtype=torch.float64) / 5.0,
        "fc2.bias": torch.randn(2, generator=g, dtype=torch.float64),
    }
    params = {k: (scale * v).to(dtype) for k, v in params.items()}
    res = ps.min_mass(params, spec, include_biases=include_biases)
    w_in = torch.cat([params["fc1.weight"].flatten(), params["fc1.bias"]]) if include_biases else params["fc1.weight"]
    log_in, log_out = log_norm(w_in), log_norm(params["fc2.weight"])
    assert res.log_scales["fc1"].item() == pytest.approx((log_out - log_in) / 2, abs=U_TOL[dtype])
    assert res.converged and not res.dead["fc1"].any()
    assert res.mass_before.dtype == torch.float64 and torch.isfinite(res.mass_before).all()
    before = math.exp(2 * log_in) + math.exp(2 * log_out)
    after = 2 * math.exp(log_in + log_out)
    assert res.mass_before.item() == pytest.approx(before, rel=MASS_RTOL[dtype])
    assert res.mass_after.item() == pytest.approx(after, rel=MASS_RTOL[dtype])


@pytest.mark.parametrize("scale", SCALES)
def test_min_mass_is_scale_equivariant(scale, dtype):
    """``min_mass(c W)``: the log-scales of ``min_mass(W)``, ``c`` times its network, ``c^2``
    times its masses (references in float64 at scale 1, and by ``ps.mass`` in float64)."""
    model = BayesianMLP(4, [5, 3], 2)
    spec = model.spec
    base = ps.rescale(model_params(model, (3,), seed=1), spec, random_log_scales(spec, 2, (3,), 1.5))
    ref = ps.min_mass(base, spec)
    params = {k: (scale * v).to(dtype) for k, v in base.items()}
    res = ps.min_mass(params, spec)
    assert res.converged and not any(d.any() for d in res.dead.values())
    for g in ref.log_scales:
        torch.testing.assert_close(res.log_scales[g].double(), ref.log_scales[g], atol=U_TOL[dtype], rtol=0)
    for k in spec.sites:
        assert rel_err(res.params[k].double(), scale * ref.params[k]) < 10 * U_TOL[dtype], k
    # the masses are finite, and right in float64 arithmetic on the (rounded) inputs and outputs
    exact_before = ps.mass({k: v.double() for k, v in params.items()}, spec)
    exact_after = ps.mass({k: v.double() for k, v in res.params.items()}, spec)
    torch.testing.assert_close(res.mass_before, exact_before, rtol=MASS_RTOL[dtype], atol=0)
    torch.testing.assert_close(res.mass_after, exact_after, rtol=MASS_RTOL[dtype], atol=0)
    torch.testing.assert_close(res.mass_after / scale**2, ref.mass_after, rtol=MASS_RTOL[dtype], atol=0)


@given(
    arch=mlp_architectures(),
    seed=seeds,
    exponent=st.floats(-25.0, 20.0),
    dtype=st.sampled_from([torch.float32, torch.float64]),
)
def test_scale_equivariance_property(arch, seed, exponent, dtype):
    """Any architecture, any scale ``10**exponent`` in ``[1e-25, 1e20]``, either dtype."""
    n_in, hidden, n_out = arch
    model = BayesianMLP(n_in, hidden, n_out)
    spec = model.spec
    base = ps.rescale(model_params(model, (2,), seed=seed), spec, random_log_scales(spec, seed + 1, (2,), 1.0))
    scale = 10.0**exponent
    ref = ps.min_mass(base, spec)
    res = ps.min_mass({k: (scale * v).to(dtype) for k, v in base.items()}, spec)
    assert res.converged and not any(d.any() for d in res.dead.values())
    for g in ref.log_scales:
        torch.testing.assert_close(res.log_scales[g].double(), ref.log_scales[g], atol=U_TOL[dtype], rtol=0)
    torch.testing.assert_close(res.mass_after / scale**2, ref.mass_after, rtol=MASS_RTOL[dtype], atol=0)


@pytest.mark.parametrize("scale", [1e-25, 1.0, 1e20])
@pytest.mark.parametrize("include_biases", [False, True])
def test_min_mass_matches_scipy_in_the_log_domain(scale, dtype, include_biases):
    """Against L-BFGS on ``log M(u)`` written as a log-sum-exp over the weights (range-safe)."""
    model = BayesianMLP(3, [3, 2], 2)
    spec = model.spec
    base = ps.rescale(model_params(model, seed=4), spec, random_log_scales(spec, 5, scale=1.0))
    params = {k: (scale * v).to(dtype) for k, v in base.items()}
    u_ref, log_m = scipy_min_mass(params, ["fc1", "fc2", "fc3"], [3, 2], include_biases)
    res = ps.min_mass(params, spec, include_biases=include_biases)
    assert res.converged
    for g in u_ref:
        torch.testing.assert_close(res.log_scales[g].double(), u_ref[g], atol=U_TOL[dtype] + 1e-6, rtol=0)
    assert math.log(res.mass_after.item()) == pytest.approx(log_m, abs=MASS_RTOL[dtype])


def test_layers_of_wildly_different_scales():
    """float32 weights of ``1e-18`` in one layer and ``1e18`` in another (a network rescaled by
    ``u ~ 41``, its mass ``1e36``) reach the float64 minimum; so does a spread ``u ~ N(0, 20^2)``."""
    model = BayesianMLP(3, [4, 4], 2)
    spec = model.spec
    base = model_params(model, seed=0)
    ref = ps.min_mass(base, spec)
    layered = dict(base)
    for k in ("fc1.weight", "fc1.bias", "fc2.bias"):
        layered[k] = 1e-18 * base[k]
    layered["fc3.weight"] = 1e18 * base["fc3.weight"]
    spread = ps.rescale(base, spec, random_log_scales(spec, 3, scale=20.0))
    for params in (layered, spread):
        for dtype in (torch.float32, torch.float64):
            res = ps.min_mass({k: v.to(dtype) for k, v in params.items()}, spec)
            assert res.converged and not any(d.any() for d in res.dead.values())
            torch.testing.assert_close(res.mass_after, ref.mass_after, rtol=MASS_RTOL[dtype], atol=0)
            exact = ps.mass({k: v.double() for k, v in params.items()}, spec)
            torch.testing.assert_close(res.mass_before, exact.to(dtype).double(), rtol=MASS_RTOL[dtype], atol=0)


def test_a_neuron_whose_squares_underflow_float32_is_not_dead():
    """Incoming weights of ``1e-25`` (squares ``1e-50``: zero in float32) next to weights of 1:
    the neuron is live, its optimum is ``u ~ log(1e25) / 2 ~ 29`` and min_mass finds it (in float64)."""
    model = BayesianMLP(3, [4, 4], 2)
    spec = model.spec
    base = model_params(model, seed=0)
    base["fc1.weight"][1] *= 1e-25
    base["fc1.bias"][1] *= 1e-25
    ref = ps.min_mass(base, spec)
    assert not ref.dead["fc1"].any() and ref.log_scales["fc1"][1] > 25
    res = ps.min_mass({k: v.float() for k, v in base.items()}, spec)
    assert not res.dead["fc1"].any() and res.converged
    torch.testing.assert_close(res.log_scales["fc1"].double(), ref.log_scales["fc1"], atol=U_TOL[torch.float32], rtol=0)
    torch.testing.assert_close(res.mass_after, ref.mass_after, rtol=1e-5, atol=0)


def test_only_exact_zeros_are_dead(dtype):
    """A neuron whose weights are exactly 0 is dead; one whose weights are tiny but nonzero is not."""
    model = BayesianMLP(3, [4], 2)
    params = model_params(model, seed=0)
    params["fc1.weight"][0] = 0.0
    params["fc2.weight"][:, 2] = 0.0
    params["fc1.weight"][1] *= 1e-30
    res = ps.min_mass({k: v.to(dtype) for k, v in params.items()}, model.spec)
    assert res.dead["fc1"].tolist() == [True, False, True, False]
    assert res.converged and res.log_scales["fc1"][0] == 0 and res.log_scales["fc1"][2] == 0


def test_unrepresentable_networks_are_refused():
    """float64 weights of one neuron ``1e-200`` times the rest: their squares are below
    float64's range, the optimum cannot be computed; min_mass says so instead of calling it dead."""
    model = BayesianMLP(3, [4], 2)
    params = model_params(model, seed=0)
    params["fc1.weight"][1] *= 1e-200
    with pytest.raises(ValueError, match="cannot represent samples 0-0 .* even in float64"):
        ps.min_mass(params, model.spec)


@pytest.mark.parametrize("scale", SCALES)
def test_min_mass_on_a_cnn_at_extreme_scales(scale, dtype):
    model = BayesianCNN(1, (4, 4), [2, 3], 2, activation="relu")
    spec = model.spec
    base = ps.rescale(model_params(model, (2,), seed=3), spec, random_log_scales(spec, 3, (2,), 1.0))
    ref = ps.min_mass(base, spec)
    res = ps.min_mass({k: (scale * v).to(dtype) for k, v in base.items()}, spec)
    assert res.converged
    for g in ref.log_scales:
        torch.testing.assert_close(res.log_scales[g].double(), ref.log_scales[g], atol=U_TOL[dtype], rtol=0)
    torch.testing.assert_close(res.mass_after / scale**2, ref.mass_after, rtol=MASS_RTOL[dtype], atol=0)


# ----------------------------------------------------------------------------- the mass itself
@pytest.mark.parametrize("scale", SCALES)
def test_mass_is_right_at_any_float32_magnitude(scale, dtype):
    model = BayesianMLP(3, [4], 2)
    params = {k: (scale * v).to(dtype) for k, v in model_params(model, (2,), seed=0).items()}
    expected = [sum(math.exp(2 * log_norm(params[k][i])) for k in ("fc1.weight", "fc2.weight")) for i in range(2)]
    m = ps.mass(params, model.spec)
    assert m.dtype == torch.float64
    np.testing.assert_allclose(m.numpy(), expected, rtol=1e-12)


def test_mass_out_of_float64_range_is_refused():
    model = BayesianMLP(3, [4], 2)
    params = model_params(model, seed=0)
    big = {k: 1e200 * v for k, v in params.items()}
    small = {k: 1e-200 * v for k, v in params.items()}
    with pytest.raises(ValueError, match="overflows float64"):
        ps.mass(big, model.spec)
    with pytest.raises(ValueError, match="underflows float64"):
        ps.mass(small, model.spec)
    # exactly zero weights have mass 0: that is representable
    assert ps.mass({k: torch.zeros_like(v) for k, v in params.items()}, model.spec).item() == 0.0
    # 1e150: the squares overflow float64 but the mass (1e300-ish) does not
    m = ps.mass({k: 1e150 * v for k, v in params.items()}, model.spec)
    assert math.isfinite(m.item())
    assert m.item() == pytest.approx(1e300 * ps.mass(params, model.spec).item(), rel=1e-12)


# ----------------------------------------------------------------------------- rescale, signs, canonical forms
@pytest.mark.parametrize("scale, offset", [(1e30, -20.0), (1e-30, 20.0)])
def test_rescale_does_not_overflow_on_a_layer_wide_offset(scale, offset):
    """``e^{u_a - u_b}`` is moderate but ``x e^{-u_b}`` alone overflows float32 (``1e30 e^{20}``)
    or underflows it to a subnormal (``1e-30 e^{-20}``): the result is still right to rounding."""
    spec = BayesianMLP(3, [4, 4], 2).spec
    params = {k: v.float() for k, v in model_params(BayesianMLP(3, [4, 4], 2), seed=0).items()}
    params["fc2.weight"] = params["fc2.weight"] * scale
    u = {g: torch.full((4,), offset) + 0.1 * torch.arange(4.0) for g in ("fc1", "fc2")}
    out = ps.rescale(params, spec, u)
    expected = params["fc2.weight"].double() * (u["fc2"].double()[:, None] - u["fc1"].double()[None, :]).exp()
    assert torch.isfinite(out["fc2.weight"]).all()
    assert rel_err(out["fc2.weight"].double(), expected) < 1e-6


def test_rescale_refuses_to_overflow():
    spec = BayesianMLP(3, [4], 2).spec
    params = {k: v.float() for k, v in model_params(BayesianMLP(3, [4], 2), seed=0).items()}
    params["fc1.weight"] = params["fc1.weight"] * 1e30
    with pytest.raises(ValueError, match=r"rescaling params\['fc1.weight'\] overflows torch.float32"):
        ps.rescale(params, spec, {"fc1": torch.full((4,), 30.0)})


@pytest.mark.parametrize("scale", SCALES)
def test_signs_at_extreme_scales(scale, dtype):
    """Sign flips are exact negations and the sign convention is scale invariant."""
    model = BayesianMLP(3, [4, 5], 6, activation="tanh")
    base = model_params(model, (3,), seed=2)
    params = {k: (scale * v).to(dtype) for k, v in base.items()}
    ref = ps.sign_convention(base, model.spec)
    signs = ps.sign_convention(params, model.spec)
    for g in ref:
        assert torch.equal(signs[g], ref[g]), g
    flipped = ps.flip_signs(params, model.spec, signs)
    for k in model.site_names:
        assert torch.isfinite(flipped[k]).all()
        assert torch.equal(flipped[k].abs(), params[k].abs()), k


def test_sign_convention_near_the_float32_maximum():
    """Outgoing weights ``[3e38, 3e38, -3e38, -3e38, -2e38]`` sum to ``-2e38``: flip (their
    float32 sum is ``+Inf``). The opposite column sums to ``+2e38``: no flip (float32: ``-Inf``)."""
    model = BayesianMLP(2, [2], 5, activation="tanh")
    params = {k: v.float() for k, v in model_params(model, seed=0).items()}
    column = torch.tensor([3e38, 3e38, -3e38, -3e38, -2e38])
    params["fc2.weight"] = torch.stack([column, -column], dim=-1)
    signs = ps.sign_convention(params, model.spec)
    assert signs["fc1"].tolist() == [True, False]


@pytest.mark.parametrize("scale", SCALES)
@pytest.mark.parametrize("permutation", ["sort", "align"])
def test_canonicalize_at_extreme_scales(scale, dtype, permutation):
    """The canonical form of ``c W`` is ``c`` times that of ``W``, and an orbit still meets one point."""
    model = BayesianMLP(3, [4, 3], 2)
    spec = model.spec
    base = model_params(model, seed=6)
    samples = spec.apply(
        ps.rescale(base, spec, random_log_scales(spec, 7, (4,), 1.5)),
        spec.sample((4,), generator=torch.Generator().manual_seed(8)),
    )
    ref = ps.canonicalize(samples, spec, permutation=permutation)
    canon = ps.canonicalize({k: (scale * v).to(dtype) for k, v in samples.items()}, spec, permutation=permutation)
    for k in spec.sites:
        assert torch.isfinite(canon.params[k]).all()
        assert rel_err(canon.params[k].double(), scale * ref.params[k]) < 10 * U_TOL[dtype], k
        first = canon.params[k][:1].double()
        assert rel_err(canon.params[k].double(), first.expand_as(canon.params[k])) < 10 * U_TOL[dtype], k


@pytest.mark.parametrize("scale", SCALES)
def test_sort_keys_and_alignment_without_scaling_at_extreme_scales(scale, dtype):
    """The permutation steps alone: the norm keys of ``1e20`` float32 rows overflow a float32
    sum of squares (every key Inf, a tie) and products of ``1e-25`` weights underflow it."""
    model = BayesianMLP(3, [4, 3], 2, activation="tanh")
    spec = model.spec
    base = model_params(model, seed=6)
    samples = spec.apply(base, spec.sample((4,), generator=torch.Generator().manual_seed(8), signed=False))
    scaled = {k: (scale * v).to(dtype) for k, v in samples.items()}
    ref_perm = ps.sort_permutation(samples, spec)
    perm = ps.sort_permutation(scaled, spec)
    for g in ref_perm:
        assert torch.equal(perm[g], ref_perm[g]), g
    for permutation in ("sort", "align"):
        canon = ps.canonicalize(scaled, spec, scaling=False, permutation=permutation)
        for k in spec.sites:
            first = canon.params[k][:1].double()
            assert rel_err(canon.params[k].double(), first.expand_as(canon.params[k])) < 1e-6, (permutation, k)


def test_float32_masses_are_accurate_on_wide_layers():
    """The masses of a 784-512-512-10 float32 network agree with float64 sums of the (rounded)
    squares to float32 rounding. (A float32 2-norm over a 512 x 784 layer is off by up to
    ``1e-5``; the reported masses come from cascade sums and the solver's coefficients.)"""
    model = BayesianMLP(784, [512, 512], 10)
    params = {k: v.float() for k, v in model_params(model, (2,), seed=0).items()}
    res = ps.min_mass(params, model.spec)
    sites = ps.mass_sites(model.spec)

    def exact(p):
        return sum(p[k].double().square().sum(tuple(range(1, p[k].dim()))) for k in sites)

    torch.testing.assert_close(res.mass_before, exact(params), rtol=1.5e-6, atol=0)
    torch.testing.assert_close(res.mass_after, exact(res.params), rtol=1.5e-6, atol=0)
