"""Push-forward distributions g#q and push-forward guides."""

import pyro
import pyro.distributions as dist
import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from pyro.infer import SVI, Predictive, Trace_ELBO
from pyro.infer.autoguide import AutoDiagonalNormal, AutoLowRankMultivariateNormal, AutoNormal
from strategies import group_element, mlp_architectures, seeds

import pyro_symmetry as ps
from pyro_symmetry.models import BayesianMLP


def _site_base(model, seed, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    base = {}
    for k in model.site_names:
        shape = model.spec.shapes[k]
        loc = torch.randn(shape, generator=g, dtype=dtype)
        scale = torch.rand(shape, generator=g, dtype=dtype) + 0.1
        base[k] = dist.Normal(loc, scale).to_event(len(shape))
    return base


@given(arch=mlp_architectures(), seed=seeds, act=st.sampled_from(["relu", "tanh"]))
def test_site_pushforward_log_prob_and_sampling(arch, seed, act):
    model = BayesianMLP(*arch, activation=act)
    spec = model.spec
    base = _site_base(model, seed)
    perm = group_element(spec, seed)
    pf = ps.Pushforward(base, spec, perm)
    # samples equal sampling-then-permuting with the same seed
    torch.manual_seed(seed)
    v = pf.sample((4,))
    torch.manual_seed(seed)
    w = {k: d.sample((4,)) for k, d in base.items()}
    ref = spec.apply(w, perm)
    for k in base:
        assert torch.equal(v[k], ref[k])
    # log_prob(v) = log q(g^{-1} v), and (g#q)(g w) = q(w)
    lp = pf.log_prob(v)
    base_lp = sum(d.log_prob(w[k]) for k, d in base.items())
    assert torch.allclose(lp, base_lp)
    # closed form for Normal bases
    closed = pf.simplify()
    assert torch.allclose(sum(d.log_prob(v[k]) for k, d in closed.items()), lp)


@given(arch=mlp_architectures(), seed=seeds, family=st.sampled_from(["diag", "lowrank", "mvn", "mixture"]))
def test_flat_pushforward_closed_forms(arch, seed, family):
    model = BayesianMLP(*arch, activation="tanh")
    layout = ps.FlatLayout(model.spec.shapes)
    D = layout.dim
    g = torch.Generator().manual_seed(seed)
    loc = torch.randn(D, generator=g, dtype=torch.float64)
    if family == "diag":
        base = dist.Normal(loc, torch.rand(D, generator=g, dtype=torch.float64) + 0.1).to_event(1)
    elif family == "lowrank":
        base = dist.LowRankMultivariateNormal(
            loc,
            torch.randn(D, 2, generator=g, dtype=torch.float64),
            torch.rand(D, generator=g, dtype=torch.float64) + 0.1,
        )
    elif family == "mvn":
        a = torch.randn(D, D, generator=g, dtype=torch.float64)
        base = dist.MultivariateNormal(loc, covariance_matrix=a @ a.T + torch.eye(D, dtype=torch.float64))
    else:
        base = dist.MixtureOfDiagNormals(
            torch.randn(3, D, generator=g, dtype=torch.float64),
            torch.rand(3, D, generator=g, dtype=torch.float64) + 0.1,
            torch.randn(3, generator=g, dtype=torch.float64),
        )
    perm = group_element(model.spec, seed)
    pf = ps.Pushforward(base, model.spec, perm, layout=layout)
    closed = pf.simplify()
    assert type(closed) is not ps.Pushforward
    v = pf.sample((5,))
    assert torch.allclose(closed.log_prob(v), pf.log_prob(v))
    idx = ps.flat_permutation(model.spec, model.spec.inverse(perm), layout)
    assert torch.allclose(pf.log_prob(v), base.log_prob(ps.apply_flat(v, idx)))


def test_batched_perm_pushforward_and_rsample_gradients():
    model = BayesianMLP(3, [4, 3], 2)
    layout = ps.FlatLayout(model.spec.shapes)
    loc = torch.zeros(layout.dim, requires_grad=True)
    base = dist.Normal(loc, torch.ones(layout.dim)).to_event(1)
    perms = model.spec.sample((6,), generator=torch.Generator().manual_seed(0))
    pf = ps.Pushforward(base, model.spec, perms, layout=layout)
    assert pf.batch_shape == (6,)
    v = pf.rsample((2,))
    assert v.shape == (2, 6, layout.dim)
    v.sum().backward()
    assert torch.allclose(loc.grad, torch.full_like(loc, 12.0))


def test_pushforward_errors():
    model = BayesianMLP(3, [4], 2)
    layout = ps.FlatLayout(model.spec.shapes)
    base = dist.Normal(torch.zeros(layout.dim), 1.0).to_event(1)
    with pytest.raises(ps.SpecError, match="needs layout"):
        ps.Pushforward(base, model.spec, model.spec.identity())
    with pytest.raises(ps.SpecError, match="event shape"):
        ps.Pushforward(dist.Normal(torch.zeros(3), 1.0).to_event(1), model.spec, model.spec.identity(), layout=layout)
    with pytest.raises(ps.SpecError, match="have no distribution in base"):
        ps.Pushforward(
            {"fc1.weight": dist.Normal(torch.zeros(4, 3), 1.0).to_event(2)}, model.spec, model.spec.identity()
        )


@pytest.mark.parametrize("guide_cls", [AutoNormal, AutoDiagonalNormal, AutoLowRankMultivariateNormal])
@pytest.mark.parametrize("act", ["relu", "tanh"])
def test_pushforward_guide_predictions_unchanged(guide_cls, act):
    model = BayesianMLP(4, [5, 3], 3, activation=act)
    x, y = torch.randn(12, 4), torch.randint(0, 3, (12,))
    guide = guide_cls(model)
    svi = SVI(model, guide, pyro.optim.Adam({"lr": 0.05}), Trace_ELBO())
    for _ in range(20):
        svi.step(x, y)
    perm = model.spec.sample(generator=torch.Generator().manual_seed(1))
    moved = ps.pushforward_guide(guide, model.spec, perm)
    sites = ["_RETURN", *model.spec.sites]
    pyro.set_rng_seed(3)
    out0 = Predictive(model, guide=guide, num_samples=7, return_sites=sites)(x)
    pyro.set_rng_seed(3)
    out1 = Predictive(model, guide=moved, num_samples=7, return_sites=sites)(x)
    assert torch.allclose(out0["_RETURN"], out1["_RETURN"], atol=1e-5)  # same predictions
    expected = model.spec.apply({k: out0[k] for k in model.spec.sites}, perm)  # permuted weights
    for k in model.spec.sites:
        assert torch.equal(out1[k], expected[k])
    med = moved.median()
    ref = model.spec.apply(guide.median(), perm)
    for k in model.spec.sites:
        assert torch.equal(med[k], ref[k])
    # quantiles of g#q: coordinate i is s_i * w_src(i), a Normal with permuted, sign-flipped mean;
    # levels not symmetric about 0.5, so that a flipped coordinate needs the level 1 - p itself
    levels = torch.tensor([0.2, 0.5, 0.9])
    q = moved.quantiles(levels.tolist())
    locs = model.spec.apply({k: v[0] for k, v in ps.gaussian_params(guide).items()}, perm)
    scales = model.spec.apply({k: v[1] for k, v in ps.gaussian_params(guide).items()}, perm)
    for k in model.spec.sites:
        shape = (-1,) + (1,) * locs[k].dim()
        expected = dist.Normal(locs[k], scales[k].abs()).icdf(levels.reshape(shape))
        assert torch.allclose(q[k], expected, atol=1e-5)


def test_pushforward_guide_errors():
    model = BayesianMLP(3, [4], 2)
    guide = AutoNormal(model)
    with pytest.raises(ps.SpecError, match="not fitted"):
        ps.pushforward_guide(guide, model.spec, model.spec.identity())
    guide(torch.randn(2, 3), torch.tensor([0, 1]))
    with pytest.raises(ps.SpecError, match="unbatched"):
        ps.pushforward_guide(guide, model.spec, model.spec.sample((2,)))


@pytest.mark.parametrize(
    "make",
    [
        AutoNormal,
        AutoDiagonalNormal,
        AutoLowRankMultivariateNormal,
        lambda m: ps.AutoSymmetrizedNormal(m, num_permutations=2),
        lambda m: ps.Symmetrize(AutoDiagonalNormal(m), m.spec, num_permutations=2),
    ],
    ids=["AutoNormal", "AutoDiagonalNormal", "AutoLowRank", "AutoSymmetrizedNormal", "Symmetrize"],
)
def test_pushforward_guide_quantiles_match_its_own_draws_at_asymmetric_levels(make):
    """The empirical CDF of many draws of g#q at its claimed p-quantile is p, within 5 binomial
    standard errors, for every coordinate, sign-flipped ones included (signed group, tanh)."""
    model = BayesianMLP(3, [4], 2, activation="tanh")
    x, y = torch.randn(8, 3), torch.randint(0, 2, (8,))
    guide = make(model)
    svi = SVI(model, guide, pyro.optim.Adam({"lr": 0.05}), Trace_ELBO())
    for _ in range(5):
        svi.step(x, y)
    perm = {"fc1": torch.tensor([-2, 2, -4, 0])}  # signed: 1 -> -2 flipped, 3 -> 0 flipped, ...
    assert any((p < 0).any() for p in perm.values())
    moved = ps.pushforward_guide(guide, model.spec, perm)
    levels = [0.2, 0.9]
    q = moved.quantiles(levels)
    n = 4000
    draws = Predictive(model, guide=moved, num_samples=n, parallel=True, return_sites=model.spec.sites)(x)
    for k in model.spec.sites:
        v = draws[k].reshape((n,) + model.spec.shapes[k])
        for i, p in enumerate(levels):
            frac = (v <= q[k][i]).double().mean(0)
            se = (p * (1 - p) / n) ** 0.5
            assert (frac - p).abs().max() < 5 * se, (k, p, float((frac - p).abs().max() / se))
    # the same levels as a tensor
    qt = moved.quantiles(torch.tensor(levels))
    for k in model.spec.sites:
        assert torch.allclose(qt[k], q[k])
