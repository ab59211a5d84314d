"""StableMixtureOfDiagNormals: an unbiased implicit mixture gradient, computed in log space."""

import math
from types import SimpleNamespace

import pyro
import pyro.distributions as dist
import pytest
import torch
from pyro.distributions.diag_normal_mixture import _MixDiagNormalSample
from pyro.infer import SVI, Trace_ELBO

import pyro_symmetry as ps
from pyro_symmetry.distributions._mixture import StableMixtureOfDiagNormals, _StableMixDiagNormalSample

# Nonlinear integrands f(z) and E[f] under N(mu, diag s^2), per component (mu, s: (K, D)).
INTEGRANDS = {
    "z1^2": (lambda z: z[..., 0] ** 2, lambda mu, s: mu[:, 0] ** 2 + s[:, 0] ** 2),
    "z1*z2": (lambda z: z[..., 0] * z[..., 1], lambda mu, s: mu[:, 0] * mu[:, 1]),
    "sum cos": (lambda z: z.cos().sum(-1), lambda mu, s: (mu.cos() * (-0.5 * s**2).exp()).sum(-1)),
}


def _params(K, D, dtype, seed=1, scale_lo=0.5, scale_hi=1.5):
    g = torch.Generator().manual_seed(seed)
    locs = torch.randn(K, D, generator=g, dtype=torch.float64)
    scales = scale_lo + (scale_hi - scale_lo) * torch.rand(K, D, generator=g, dtype=torch.float64)
    logits = torch.randn(K, generator=g, dtype=torch.float64)
    return [t.to(dtype).requires_grad_() for t in (locs, scales, logits)]


def _draw_and_grad(cls, params, sample_shape=(), batch_shape=(), seed=0):
    """One draw with a fixed seed, backpropagating a random upstream gradient."""
    args = [p.expand(torch.Size(batch_shape) + p.shape) for p in params]
    pyro.set_rng_seed(seed)
    z = cls(*args).rsample(sample_shape)
    upstream = torch.randn(z.shape, generator=torch.Generator().manual_seed(seed + 1), dtype=z.dtype)
    grads = torch.autograd.grad(z, params, upstream)
    return z.detach(), grads


def _exact_grads(params, integrand):
    """Gradient of E[f] = sum_c pi_c E_c[f] (closed form) w.r.t. ``(locs, scales, logits)``."""
    locs, scales, logits = params
    mean_f = (logits.softmax(-1) * INTEGRANDS[integrand][1](locs, scales)).sum()
    return torch.autograd.grad(mean_f, params, allow_unused=True, materialize_grads=True)


def _assert_close_to_pyro(ours, pyros, names):
    for name, a, b in zip(names, ours, pyros):
        assert torch.isfinite(b).all()
        rel = float((a - b).abs().max() / b.abs().max())
        assert rel < 1e-8, f"{name}: relative difference {rel:.2e}"


SHAPES = [((7,), ()), ((1,), ()), ((), ()), ((), (4,)), ((), (2, 3))]


@pytest.mark.parametrize("D", [2, 5, 12])
@pytest.mark.parametrize("sample_shape, batch_shape", SHAPES, ids=str)
def test_draws_and_mean_scale_gradients_equal_pyros_in_low_dimension(D, sample_shape, batch_shape):
    """The logits gradient differs from Pyro's (Pyro's is biased, see below)."""
    params = _params(3, D, torch.float64)
    z_pyro, g_pyro = _draw_and_grad(dist.MixtureOfDiagNormals, params, sample_shape, batch_shape)
    z_ours, g_ours = _draw_and_grad(StableMixtureOfDiagNormals, params, sample_shape, batch_shape)
    assert torch.equal(z_ours, z_pyro)  # the same draw for the same seed
    _assert_close_to_pyro(g_ours[:2], g_pyro[:2], ("locs", "coord_scale"))
    assert torch.isfinite(g_ours[2]).all()


@pytest.mark.parametrize("D", [2, 5])
@pytest.mark.parametrize("sample_shape, batch_shape", SHAPES[::2], ids=str)
def test_logits_gradient_equals_pyros_where_pyros_field_is_right(D, sample_shape, batch_shape):
    """With sigma_0 = 1 and every pair of means on a line through the origin, Pyro's
    cross-component flux is the whitened one, so all three gradients coincide."""
    locs, scales, logits = (p.detach() for p in _params(3, D, torch.float64))
    locs = torch.tensor([[1.3], [-0.4], [0.7]], dtype=torch.float64) * locs[0]  # collinear with 0
    scales = scales / scales.min(0).values  # the smallest scale of each coordinate is 1
    params = [t.requires_grad_() for t in (locs, scales, logits)]
    z_pyro, g_pyro = _draw_and_grad(dist.MixtureOfDiagNormals, params, sample_shape, batch_shape)
    z_ours, g_ours = _draw_and_grad(StableMixtureOfDiagNormals, params, sample_shape, batch_shape)
    assert torch.equal(z_ours, z_pyro)
    _assert_close_to_pyro(g_ours, g_pyro, ("locs", "coord_scale", "component_logits"))


def _mixture_params(K, D, seed):
    """Distinct scales in [0.5, 1.5]; no line through two (whitened) means passes near 0."""
    locs, scales, logits = (p.detach() for p in _params(K, D, torch.float64, seed=seed))
    m = locs / scales.min(0).values
    for c in range(K):
        for d in range(c):
            n = (m[c] - m[d]) / (m[c] - m[d]).norm()
            assert (m[c] - (m[c] @ n) * n).norm() > 0.3  # distance of the line from the origin
    return [t.requires_grad_() for t in (locs, scales, logits)]


def _expected_backward(fn, params, integrand, n=201, half=10.0):
    """E_q[dL/dtheta] for L = f(z), by trapezoidal quadrature over a D = 2 grid.

    The backward pass at grid points ``z`` with upstream gradient ``q(z) dA grad f(z)``
    sums to the integral of the per-draw gradient against ``q``: the estimator's exact
    expectation, with no Monte Carlo noise.
    """
    locs, scales, logits = (p.detach() for p in params)
    x = torch.linspace(-half, half, n, dtype=torch.float64)
    z = torch.stack(torch.meshgrid(x, x, indexing="ij"), -1).reshape(-1, 2).requires_grad_()
    (grad_f,) = torch.autograd.grad(INTEGRANDS[integrand][0](z).sum(), z)
    weight = dist.MixtureOfDiagNormals(locs, scales, logits).log_prob(z.detach()).exp() * (x[1] - x[0]) ** 2
    if fn is _MixDiagNormalSample:
        ctx = SimpleNamespace(saved_tensors=(z.detach(), scales, locs, logits, logits.softmax(-1)))
    else:
        ctx = SimpleNamespace(saved_tensors=(z.detach(), locs, scales, logits))
    return fn.backward(ctx, grad_f * weight[:, None])[:3]


@pytest.mark.parametrize("integrand", list(INTEGRANDS))
@pytest.mark.parametrize("K", [2, 3])
def test_gradient_expectation_is_exact_by_quadrature(K, integrand):
    """In D = 2 the expected gradient, by quadrature, is the analytic one; Pyro's logits is not."""
    locs = torch.tensor([[1.0, -0.5], [-1.0, 2.0], [0.4, 0.9]], dtype=torch.float64)[:K]
    scales = torch.tensor([[0.7, 1.2], [1.5, 0.6], [0.8, 0.9]], dtype=torch.float64)[:K]
    logits = torch.tensor([0.3, -0.2, 0.1], dtype=torch.float64)[:K]
    params = [t.requires_grad_() for t in (locs, scales, logits)]
    exact = _exact_grads(params, integrand)
    ours = _expected_backward(_StableMixDiagNormalSample, params, integrand)
    for name, a, b in zip(("locs", "coord_scale", "component_logits"), ours, exact):
        assert torch.allclose(a, b, atol=1e-6, rtol=0), f"{name}: {a} vs {b}"
    pyros = _expected_backward(_MixDiagNormalSample, params, integrand)
    assert torch.allclose(pyros[0], exact[0], atol=1e-6, rtol=0)  # Pyro's means gradient is right
    assert (pyros[2] - exact[2]).abs().max() > 1e-2  # ... its logits gradient is biased


@pytest.mark.parametrize("D, K", [(2, 2), (2, 3), (5, 2), (5, 3)])
def test_gradients_are_unbiased_for_nonlinear_integrands(D, K):
    """Monte Carlo mean of per-draw gradients within 4.5 standard errors of the analytic one.

    The parameters are expanded to a batch of N, so each batch element's gradient is one
    draw's; the standard error comes from their spread.
    """
    N = 40000
    params = _mixture_params(K, D, seed=5)
    batched = [p.expand((N,) + p.shape) for p in params]
    pyro.set_rng_seed(5)
    z = StableMixtureOfDiagNormals(*batched).rsample()
    for integrand, (f, _) in INTEGRANDS.items():
        per_draw = torch.autograd.grad(f(z).sum(), batched, retain_graph=True)
        exact = _exact_grads(params, integrand)
        for name, t, e in zip(("locs", "coord_scale", "component_logits"), per_draw, exact):
            mean, se = t.mean(0), t.std(0) / math.sqrt(N)
            zscore = ((mean - e).abs() / se.clamp_min(1e-300)).max()  # 0/0 entries (f ignores z_i) -> 0
            assert zscore < 4.5, f"{integrand}, {name}: {float(zscore):.2f} standard errors off"
        assert exact[2].abs().max() > 10 * se.max()  # the logits check has power


def test_distribution_interface():
    locs, scales, logits = _params(3, 4, torch.float64)
    d = StableMixtureOfDiagNormals(locs, scales, logits)
    e = d.expand((5, 2))
    assert type(e) is StableMixtureOfDiagNormals
    assert e.batch_shape == (5, 2) and e.event_shape == (4,) and e.rsample((3,)).shape == (3, 5, 2, 4)
    assert d.support is torch.distributions.constraints.real_vector
    value = torch.randn(6, 4, dtype=torch.float64)
    expected = dist.MixtureOfDiagNormals(locs, scales, logits).log_prob(value)
    assert torch.allclose(d.log_prob(value), expected)
    assert torch.allclose(e.log_prob(value[:, None, None]), expected[:, None, None].expand(6, 5, 2))
    # with equal means the cross-component term vanishes instead of dividing by zero
    same = StableMixtureOfDiagNormals(locs[:1].expand(3, 4), scales, logits)
    assert all(torch.isfinite(g).all() for g in torch.autograd.grad(same.rsample((5,)).sum(), (locs, logits)))


@pytest.mark.parametrize("D", [200, 2000])
def test_gradients_are_finite_in_high_dimension(D, dtype):
    locs, scales, logits = _params(3, D, dtype, scale_lo=0.1, scale_hi=0.1)
    z = StableMixtureOfDiagNormals(locs, scales, logits).rsample((4,))
    g = torch.randn(z.shape, dtype=dtype)
    grads = torch.autograd.grad(z, (locs, scales, logits), g)
    assert all(torch.isfinite(t).all() for t in grads)
    # responsibilities sum to one, so the mean gradients add up to the upstream gradient
    assert torch.allclose(grads[0].sum(0), g.sum(0), rtol=1e-4, atol=1e-4)


def test_gradient_is_unbiased_in_high_dimension(dtype):
    """E[f(z)] = sum_c pi_c (a . mu_c + sum_i b_i (mu_ci^2 + sigma_ci^2)), f(z) = a . z + sum_i b_i z_i^2.

    Unequal ``b_i`` and scales away from 1 are where Pyro's logits gradient is biased
    (tens of standard errors here, in float64; in float32 it is NaN at this ``D``).
    Scales alike across components and modest whitened separations keep the weights'
    density ratios well behaved (see the class Notes).
    """
    K, D, N = 3, 200, 4000
    g = torch.Generator().manual_seed(0)
    locs = 0.05 * torch.randn(K, D, generator=g, dtype=torch.float64)
    # components 2.5% narrower / wider than the middle one, so the weights' gradient is sizeable
    offset = torch.tensor([[-0.025], [0.0], [0.025]], dtype=torch.float64)
    scales = 0.5 * (1 + offset + 0.02 * (torch.rand(K, D, generator=g, dtype=torch.float64) - 0.5))
    logits = 0.5 * torch.randn(K, generator=g, dtype=torch.float64)
    a = torch.randn(D, generator=g, dtype=torch.float64).to(dtype)
    b = torch.rand(D, generator=g, dtype=torch.float64).to(dtype)
    params = [t.to(dtype).requires_grad_() for t in (locs, scales, logits)]

    mean_f = (params[2].softmax(-1) * (params[0] @ a + (params[0] ** 2 + params[1] ** 2) @ b)).sum()
    analytic = torch.autograd.grad(mean_f, params)

    batched = [p.expand((N,) + p.shape) for p in params]
    pyro.set_rng_seed(0)
    z = StableMixtureOfDiagNormals(*batched).rsample()
    per_draw_grads = torch.autograd.grad((z @ a + z**2 @ b).sum(), batched)

    for name, t, exact in zip(("locs", "coord_scale", "component_logits"), per_draw_grads, analytic):
        per_draw = t.double()  # (N, ...): one draw's gradient each
        assert torch.isfinite(per_draw).all()
        mean, se = per_draw.mean(0), per_draw.std(0) / math.sqrt(N)
        zscore = ((mean - exact.double()) / se).abs().max()  # the largest of K D (or K) entries
        assert zscore < 5, f"{name}: {float(zscore):.2f} standard errors from the analytic gradient"
        if name == "component_logits":
            assert exact.abs().max() > 10 * se.max()  # the check has power


def test_symmetrized_mixture_guide_trains_on_a_bayesian_mlp():
    """Pyro's MixtureOfDiagNormals gives NaN by the second step here (123 latent dims)."""
    model = ps.models.BayesianMLP(5, [8, 6], 3)
    guide = ps.Symmetrize(ps.AutoMixtureOfDiagNormals(model, 3))
    g = torch.Generator().manual_seed(0)
    x = torch.randn(20, 5, generator=g)
    y = torch.randint(0, 3, (20,), generator=g)
    svi = SVI(model, guide, pyro.optim.Adam({"lr": 1e-2}), Trace_ELBO())
    losses = [svi.step(x, y) for _ in range(30)]
    assert all(math.isfinite(loss) for loss in losses)
    assert isinstance(guide.get_posterior(), StableMixtureOfDiagNormals)
    params = dict(pyro.get_param_store().items())
    assert params and all(torch.isfinite(v).all() for v in params.values())
