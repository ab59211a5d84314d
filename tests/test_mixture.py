"""StableMixtureOfDiagNormals: Pyro's implicit mixture gradient, computed in log space."""

import math

import pyro
import pyro.distributions as dist
import pytest
import torch
from pyro.infer import SVI, Trace_ELBO

import pyro_symmetry as ps
from pyro_symmetry.distributions._mixture import StableMixtureOfDiagNormals


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


@pytest.mark.parametrize("D", [2, 5, 12])
@pytest.mark.parametrize(
    "sample_shape, batch_shape", [((7,), ()), ((1,), ()), ((), ()), ((), (4,)), ((), (2, 3))], ids=str
)
def test_gradients_equal_pyros_in_low_dimension(D, sample_shape, batch_shape):
    params = _params(3, D, torch.float64)
    z_pyro, g_pyro = _draw_and_grad(dist.MixtureOfDiagNormals, params, sample_shape, batch_shape)
    z_ours, g_ours = _draw_and_grad(StableMixtureOfDiagNormals, params, sample_shape, batch_shape)
    assert torch.equal(z_ours, z_pyro)  # the same draw for the same seed
    for name, a, b in zip(("locs", "coord_scale", "component_logits"), g_ours, g_pyro):
        assert torch.isfinite(b).all()
        rel = float((a - b).abs().max() / b.abs().max())
        assert rel < 1e-8, f"{name}: relative difference {rel:.2e}"


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
    """E[f(z)] = sum_c pi_c (a . mu_c + b sum(mu_c^2 + sigma_c^2)) for f(z) = a . z + b |z|^2.

    The parameters are expanded to a batch of N, so each batch element's gradient is one
    draw's and the standard error comes from their spread. In float32 at D = 150 Pyro's
    gradients are NaN (``q_j(z)`` underflows). Scales near 1 and small means keep the
    component-weight estimator's density ratios well behaved (see the class Notes).
    """
    K, D, N, b = 3, 150, 4000, 0.5
    g = torch.Generator().manual_seed(0)
    locs = 0.1 * torch.randn(K, D, generator=g, dtype=torch.float64)
    # components 2.5% narrower / wider than the middle one, so the weights' gradient is sizeable
    offset = torch.tensor([[-0.025], [0.0], [0.025]], dtype=torch.float64)
    scales = 1 + offset + 0.02 * (torch.rand(K, D, generator=g, dtype=torch.float64) - 0.5)
    logits = 0.5 * torch.randn(K, generator=g, dtype=torch.float64)
    a = torch.randn(D, generator=g, dtype=torch.float64).to(dtype)
    params = [t.to(dtype).requires_grad_() for t in (locs, scales, logits)]

    mean_f = (params[2].softmax(-1) * (params[0] @ a + b * (params[0] ** 2 + params[1] ** 2).sum(-1))).sum()
    analytic = torch.autograd.grad(mean_f, params)

    batched = [p.expand((N,) + p.shape) for p in params]
    for t in batched:
        t.retain_grad()
    pyro.set_rng_seed(0)
    z = StableMixtureOfDiagNormals(*batched).rsample()
    (z @ a + b * (z**2).sum(-1)).sum().backward()

    for name, t, exact in zip(("locs", "coord_scale", "component_logits"), batched, analytic):
        per_draw = t.grad.double()  # (N, ...): one draw's gradient each
        mean, se = per_draw.mean(0), per_draw.std(0) / math.sqrt(N)
        assert torch.isfinite(mean).all()
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
