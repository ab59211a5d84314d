"""``as_posterior``: every form a posterior comes in reads as one object, checked against the spec."""

from __future__ import annotations

import pyro
import pyro.distributions as dist
import pytest
import torch
from pyro.infer import MCMC, NUTS, SVI, Trace_ELBO
from pyro.infer.autoguide import (
    AutoDelta,
    AutoDiagonalNormal,
    AutoGuideList,
    AutoLowRankMultivariateNormal,
    AutoNormal,
)
from pyro.poutine import block
from user_models import TutorialBNN, tutorial_spec

import pyro_symmetry as ps
from pyro_symmetry.posteriors import Posterior, as_posterior

X, Y = torch.randn(30, 1, generator=torch.Generator().manual_seed(0)), torch.randn(30)
SHAPES = {"layer1.weight": (6, 1), "layer1.bias": (6,), "layer2.weight": (1, 6)}
SPEC = tutorial_spec().with_shapes(SHAPES)


def _fit(guide_cls, steps=2, **kw):
    model = TutorialBNN()
    guide = guide_cls(model, **kw)
    svi = SVI(model, guide, pyro.optim.Adam({"lr": 1e-2}), Trace_ELBO())
    for _ in range(steps):
        svi.step(X, Y)
    return model, guide


@pytest.mark.parametrize("guide_cls", [AutoNormal, AutoDiagonalNormal, AutoLowRankMultivariateNormal, AutoDelta])
def test_guides_read_with_their_sites_model_and_constrained_draws(guide_cls):
    model, guide = _fit(guide_cls)
    p = as_posterior(guide, SPEC, name="q")
    assert set(p.sites) == {"layer1.weight", "layer1.bias", "layer2.weight", "layer2.bias", "sigma"}
    assert p.model is model and p.spec.shapes == SPEC.shapes
    draws = p.draws(16, generator=torch.Generator().manual_seed(0))
    assert draws["layer1.weight"].shape[-2:] == (6, 1)
    assert bool((draws["sigma"] > 0).all())  # the guide's transform maps to the Gamma's support
    loc, scale = p.gaussian()
    median = guide.median()
    torch.testing.assert_close(loc["layer1.weight"], median["layer1.weight"].detach())
    assert p.form == ("point" if guide_cls is AutoDelta else "gaussian")


def test_gaussian_of_autonormal_equals_its_parameters():
    _, guide = _fit(AutoNormal)
    loc, scale = as_posterior(guide).gaussian()
    ref_loc, ref_scale = guide._get_loc_and_scale("layer1.weight")
    torch.testing.assert_close(loc["layer1.weight"], ref_loc.detach())
    torch.testing.assert_close(scale["layer1.weight"], ref_scale.detach())


def test_guide_list_of_per_site_parts():
    model = TutorialBNN()
    guide = AutoGuideList(model)
    guide.append(AutoDelta(block(model, expose=["sigma"])))
    guide.append(AutoNormal(block(model, hide=["sigma"])))
    SVI(model, guide, pyro.optim.Adam({"lr": 1e-2}), Trace_ELBO()).step(X, Y)
    p = as_posterior(guide, SPEC)
    assert p.form == "gaussian" and set(p.sites) >= set(SPEC.sites) | {"sigma"}
    assert float(p.gaussian()[1]["sigma"]) == 0.0  # the AutoDelta part is a point


def test_mappings_points_draws_and_predictive_shapes():
    gen = torch.Generator().manual_seed(1)
    point = {k: torch.randn(s, generator=gen) for k, s in SHAPES.items()}
    assert as_posterior(point, SPEC).form == "point"
    one_chain = {k: torch.randn((7, *s), generator=gen) for k, s in SHAPES.items()}
    assert as_posterior(one_chain, SPEC).draws()["layer1.weight"].shape == (1, 7, 6, 1)
    chains = {k: torch.randn((3, 7, *s), generator=gen) for k, s in SHAPES.items()}
    assert as_posterior(chains, SPEC).num_chains == 3
    predictive = {k: torch.randn((7, 1, *s), generator=gen) for k, s in SHAPES.items()}
    assert as_posterior(predictive, SPEC).draws()["layer1.bias"].shape == (1, 7, 6)
    pairs = {k: (torch.zeros(s), torch.ones(s)) for k, s in SHAPES.items()}
    assert as_posterior(pairs, SPEC).form == "gaussian"
    dists = {k: dist.Normal(torch.zeros(s), 1.0).to_event(len(s)) for k, s in SHAPES.items()}
    p = as_posterior(dists, SPEC)
    assert p.log_prob(point).shape == ()


def test_state_dicts_and_named_parameters_that_require_grad():
    net = torch.nn.Sequential(torch.nn.Linear(1, 6), torch.nn.Tanh(), torch.nn.Linear(6, 1))
    spec = ps.mlp_spec(["0", "2"], [6], activation_symmetry="sign")
    for x in (dict(net.named_parameters()), net.named_parameters(), net.state_dict(), net):
        p = as_posterior(x, spec)
        assert p.form == "point" and not p.point()["0.weight"].requires_grad


def test_mcmc_draws_with_divergences_and_model():
    model = TutorialBNN()
    mcmc = MCMC(NUTS(model), num_samples=5, warmup_steps=5, num_chains=1, disable_progbar=True)
    mcmc.run(X, Y)
    p = as_posterior(mcmc, SPEC)
    assert p.form == "draws" and p.model is model
    assert p.draws()["layer1.weight"].shape == (1, 5, 6, 1)
    assert p.sample_stats["diverging"].shape == (1, 5)


def test_arviz_tree_roundtrip_keeps_float64(tmp_path):
    azb = pytest.importorskip("arviz_base")
    w = torch.randn(2, 5, 6, 1, dtype=torch.float64)
    tree = azb.from_dict({"posterior": {"layer1.weight": w.numpy()}, "sample_stats": {"lp": torch.randn(2, 5).numpy()}})
    p = as_posterior(tree)
    assert p.draws()["layer1.weight"].dtype == torch.float64
    torch.testing.assert_close(p.draws()["layer1.weight"], w)
    assert set(p.sample_stats) == {"lp"}
    path = tmp_path / "draws.nc"
    tree.to_netcdf(path)
    import xarray as xr

    loaded = xr.open_datatree(path)
    torch.testing.assert_close(as_posterior(loaded).draws()["layer1.weight"], w)
    torch.testing.assert_close(as_posterior(loaded["posterior"].dataset).draws()["layer1.weight"], w)


def test_errors_name_the_site_axis_and_form():
    with pytest.raises(ps.SpecError, match="site 'layer1.weight' is missing from q1"):
        as_posterior({"fc.w": torch.zeros(2)}, SPEC, name="q1")
    with pytest.raises(ps.SpecError, match=r"q1\['layer1.bias'\] has shape \(5,\)"):
        as_posterior({**{k: torch.zeros(s) for k, s in SHAPES.items()}, "layer1.bias": torch.zeros(5)}, SPEC, name="q1")
    with pytest.raises(ps.SpecError, match="mixes tensors"):
        as_posterior({"a": torch.zeros(2), "b": (torch.zeros(2), torch.ones(2))})
    with pytest.raises(ValueError, match="must not be NaN|NaN"):
        as_posterior({"a": torch.tensor([float("nan")])})
    with pytest.raises(TypeError, match="must be a fitted Pyro autoguide.*got a float"):
        as_posterior(3.0)
    with pytest.raises(ps.SpecError, match="q0 must be a fitted Pyro autoguide.*got a list"):
        as_posterior([1, 2], name="q0")
    with pytest.raises(ps.SpecError, match="not fitted"):
        as_posterior(AutoNormal(TutorialBNN()))
    with pytest.raises(ps.SpecError, match="not a density"):
        as_posterior({k: torch.zeros((2, 3, *s)) for k, s in SHAPES.items()}, SPEC).log_prob({})


def test_posterior_passes_through_and_binds_a_spec_without_shapes():
    p = as_posterior({k: torch.zeros(s) for k, s in SHAPES.items()})
    bound = as_posterior(p, tutorial_spec())
    assert isinstance(bound, Posterior) and bound.spec.shapes["layer1.weight"] == (6, 1)


def test_gaussian_and_point_readers_are_views_of_as_posterior():
    """``gaussian_params``/``point_params`` (and so ``align``, ``interpolate``) read every form
    ``as_posterior`` reads: a ``train_runs`` result, an ``AutoDelta``, a ``Posterior``."""
    model, guide = _fit(AutoNormal)
    runs = ps.train_runs(TutorialBNN, AutoNormal, (X, Y), 2, steps=2, progress=False, vectorize=False)
    for q in (guide, runs[0], as_posterior(guide)):
        pairs = ps.gaussian_params(q)
        loc, scale = as_posterior(q).gaussian()
        assert set(pairs) == set(loc) and all(torch.equal(pairs[k][0], loc[k]) for k in loc)
        assert all(torch.equal(pairs[k][1], scale[k]) for k in loc)
    res = ps.align(runs[0], runs[1], SPEC)
    assert res.objective[-1] <= res.objective[0]
    _, delta = _fit(AutoDelta)
    assert set(ps.point_params(delta)) == set(delta.median())
    with pytest.raises(ps.SpecError, match="a Gaussian posterior is needed"):
        ps.gaussian_params(delta)
    chains = {k: torch.randn((2, 3, *s)) for k, s in SHAPES.items()}
    with pytest.raises(ps.SpecError, match="set of draws"):
        ps.point_params(as_posterior(chains, SPEC))


def test_readers_keep_the_graph_only_when_asked():
    net = torch.nn.Linear(2, 3)
    live = ps.point_params(dict(net.named_parameters()), detach=False)
    assert live["weight"] is net.weight or live["weight"].requires_grad
    assert not ps.point_params(dict(net.named_parameters()))["weight"].requires_grad
    _, guide = _fit(AutoNormal)
    loc, scale = ps.gaussian_params(guide, detach=False)["layer1.weight"]
    assert loc.requires_grad and scale.requires_grad
    assert not any(t.requires_grad for t in ps.gaussian_params(guide)["layer1.weight"])


def test_pushforward_reads_its_base_through_as_posterior():
    _, guide = _fit(AutoNormal)
    g = SPEC.sample(generator=torch.Generator().manual_seed(3))
    loc, scale = as_posterior(guide).gaussian()
    explicit = {k: dist.Normal(loc[k], scale[k]).to_event(loc[k].dim()) for k in loc}
    value = {k: torch.randn(v.shape, generator=torch.Generator().manual_seed(4)) for k, v in loc.items()}
    ref = ps.Pushforward(explicit, SPEC, g).log_prob(value)
    pairs = {k: (loc[k], scale[k]) for k in loc}
    for base in (guide, pairs, as_posterior(guide)):
        torch.testing.assert_close(ps.Pushforward(base, SPEC, g).log_prob(value), ref)
    _, flat = _fit(AutoDiagonalNormal)
    pf = ps.Pushforward(flat, SPEC, g)  # the layout comes with the guide
    assert pf.flat and pf.layout.shapes["layer1.weight"] == (6, 1)
    with pytest.raises(ps.SpecError, match="set of draws"):
        ps.Pushforward(as_posterior({k: torch.randn((2, 3, *s)) for k, s in SHAPES.items()}, SPEC), SPEC, g)
