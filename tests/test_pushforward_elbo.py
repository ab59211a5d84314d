"""The ELBO identity of a push-forward guide: ``ELBO(g#q) = ELBO(q)`` for every guide class.

For a G-invariant prior and likelihood, ``g#q`` has density ``q(g^{-1} v)`` and the model's
log-joint is the same at ``v = g.w`` as at ``w``, so with the SAME base noise the single-draw
ELBO estimates of ``q`` and of ``g#q`` are equal (not only in expectation); with an analytic
KL (``TraceMeanField_ELBO``), ``KL(g#q || p) = KL(q || p)`` too.
"""

import warnings

import pyro
import pytest
import torch
from pyro.infer import SVI, Predictive, Trace_ELBO, TraceMeanField_ELBO
from pyro.infer.autoguide import (
    AutoDelta,
    AutoDiagonalNormal,
    AutoLowRankMultivariateNormal,
    AutoMultivariateNormal,
    AutoNormal,
)

import pyro_symmetry as ps
from pyro_symmetry.models import BayesianMLP

GUIDES = {
    "AutoNormal": AutoNormal,
    "AutoDiagonalNormal": AutoDiagonalNormal,
    "AutoMultivariateNormal": AutoMultivariateNormal,
    "AutoLowRankMultivariateNormal": lambda m: AutoLowRankMultivariateNormal(m, rank=2),
    "AutoDelta": AutoDelta,
    "AutoSymmetrizedNormal-exact": lambda m: ps.AutoSymmetrizedNormal(m, estimator="exact"),
    "AutoSymmetrizedNormal-contrastive": lambda m: ps.AutoSymmetrizedNormal(m, num_permutations=4),
    "AutoSymmetrizedNormal-importance": lambda m: ps.AutoSymmetrizedNormal(m, estimator="importance"),
    "AutoSymmetrizedMeanField": lambda m: ps.AutoSymmetrizedMeanField(m, estimator="exact"),
    "AutoSymmetrizedMeanField-contrastive": lambda m: ps.AutoSymmetrizedMeanField(m, num_permutations=4),
    "Symmetrize(AutoDiagonalNormal)": lambda m: ps.Symmetrize(AutoDiagonalNormal(m), num_permutations=4),
    "Symmetrize(AutoMultivariateNormal)": lambda m: ps.Symmetrize(AutoMultivariateNormal(m), estimator="exact"),
    "Symmetrize(AutoMixtureOfDiagNormals)": lambda m: ps.Symmetrize(
        ps.AutoMixtureOfDiagNormals(m, num_components=2), num_permutations=4
    ),
}


def _data(seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(10, 3, generator=g), torch.randint(0, 2, (10,), generator=g)


def _fitted(name, act):
    model = BayesianMLP(3, [3], 2, activation=act)
    x, y = _data()
    guide = GUIDES[name](model)
    svi = SVI(model, guide, pyro.optim.Adam({"lr": 0.05}), Trace_ELBO())
    for _ in range(15):  # away from the (nearly invariant) initialization
        svi.step(x, y)
    return model, guide, x, y


def _single_draw_elbo(elbo, model, guide, generator_state, seed, x, y, params=()):
    """One-draw ELBO estimate (and its gradient with respect to ``params``) with torch's RNG
    and the guide's private group-element generator (the K-sample bounds) both at fixed
    states: common random numbers."""
    pyro.set_rng_seed(seed)
    if generator_state is not None:
        generator_state[0].set_state(generator_state[1])
    value = -elbo.differentiable_loss(model, guide, x, y)
    grads = torch.autograd.grad(value, params, allow_unused=True) if params else ()
    return float(value.detach()), grads


def _moving_element(spec):
    """A signed element that moves (and, where allowed, flips) every neuron."""
    return {
        k: (~torch.roll(torch.arange(g.size), 1) if g.signed else torch.roll(torch.arange(g.size), 1))
        for k, g in spec.groups.items()
    }


@pytest.mark.parametrize("act", ["tanh", "relu"])
@pytest.mark.parametrize("name", sorted(GUIDES))
def test_elbo_of_the_pushforward_equals_the_elbo_of_q(name, act):
    model, guide, x, y = _fitted(name, act)
    spec = model.spec
    moved = ps.pushforward_guide(guide, spec, _moving_element(spec))
    gen = getattr(guide, "_generator", None)
    state = None if gen is None else (gen, gen.get_state())
    params = [p for p in guide.parameters() if p.requires_grad]
    assert params
    for seed in range(3):
        a, da = _single_draw_elbo(Trace_ELBO(), model, guide, state, seed, x, y, params)
        b, db = _single_draw_elbo(Trace_ELBO(), model, moved, state, seed, x, y, params)
        assert b == pytest.approx(a, rel=1e-5, abs=1e-3), (seed, a, b)
        # the same function of the parameters: the same gradient
        for u, v in zip(da, db):
            assert (u is None) == (v is None)
            if u is not None:
                assert torch.allclose(u, v, rtol=1e-4, atol=1e-4), (seed, (u - v).abs().max())
    # and a different group element gives a different draw (the test is not vacuous)
    pyro.set_rng_seed(0)
    w = guide(x, y)
    pyro.set_rng_seed(0)
    v = moved(x, y)
    assert not torch.equal(w["fc1.weight"], v["fc1.weight"])


@pytest.mark.parametrize("name", ["AutoNormal", "AutoSymmetrizedMeanField"])
def test_mean_field_elbo_of_the_pushforward_equals_that_of_q(name):
    """``TraceMeanField_ELBO`` uses the analytic KL where the guide site is a Normal (the
    mean-field guide); the push-forward's must be the same number."""
    model, guide, x, y = _fitted(name, "tanh")
    moved = ps.pushforward_guide(guide, model.spec, _moving_element(model.spec))
    for seed in range(3):
        a, _ = _single_draw_elbo(TraceMeanField_ELBO(), model, guide, None, seed, x, y)
        b, _ = _single_draw_elbo(TraceMeanField_ELBO(), model, moved, None, seed, x, y)
        assert b == pytest.approx(a, rel=1e-5, abs=1e-3), (seed, a, b)


@pytest.mark.parametrize(
    "name",
    ["AutoNormal", "AutoDelta", "AutoSymmetrizedMeanField", "Symmetrize(AutoDiagonalNormal)"],
)
def test_elbo_identity_with_vectorized_particles(name):
    """Under an outer plate (vectorized particles) every particle draws its own w: the
    moved sites must see that plate too (a hidden site drew one w for all particles)."""
    model, guide, x, y = _fitted(name, "tanh")
    moved = ps.pushforward_guide(guide, model.spec, _moving_element(model.spec))
    gen = getattr(guide, "_generator", None)
    state = None if gen is None else (gen, gen.get_state())
    for elbo in (Trace_ELBO, TraceMeanField_ELBO):
        for seed in range(2):
            a, _ = _single_draw_elbo(elbo(**PARTICLES), model, guide, state, seed, x, y)
            b, _ = _single_draw_elbo(elbo(**PARTICLES), model, moved, state, seed, x, y)
            assert b == pytest.approx(a, rel=1e-5, abs=1e-3), (elbo.__name__, seed, a, b)


PARTICLES = dict(num_particles=4, vectorize_particles=True, max_plate_nesting=1)


@pytest.mark.parametrize("name", ["AutoNormal", "AutoSymmetrizedMeanField", "Symmetrize(AutoDiagonalNormal)"])
def test_parallel_predictive_draws_of_the_pushforward_are_the_moved_draws(name):
    model, guide, x, y = _fitted(name, "tanh")
    perm = _moving_element(model.spec)
    moved = ps.pushforward_guide(guide, model.spec, perm)
    sites = list(model.spec.sites)
    pyro.set_rng_seed(5)
    out0 = Predictive(model, guide=guide, num_samples=6, parallel=True, return_sites=sites)(x)
    pyro.set_rng_seed(5)
    out1 = Predictive(model, guide=moved, num_samples=6, parallel=True, return_sites=sites)(x)
    expected = model.spec.apply({k: out0[k].reshape((6,) + model.spec.shapes[k]) for k in sites}, perm)
    for k in sites:
        v = out1[k].reshape((6,) + model.spec.shapes[k])
        assert torch.equal(v, expected[k])
        assert not torch.equal(v[0], v[1])  # one draw per sample, not one for all


def test_the_pushforward_keeps_the_guides_site_order():
    """TraceMeanField_ELBO checks that guide and model sites come in the same order."""
    model, guide, x, y = _fitted("AutoSymmetrizedMeanField", "tanh")
    moved = ps.pushforward_guide(guide, model.spec, _moving_element(model.spec))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        TraceMeanField_ELBO().loss(model, moved, x, y)
