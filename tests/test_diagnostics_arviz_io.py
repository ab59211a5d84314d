"""ArviZ in and out, by its conventions, for users' own models (no ``functional``).

``to_inference_data(runs, data=...)`` writes ``posterior``, ``sample_stats`` (``lp``, the
guide's ``log_q``, MCMC's ``diverging``/``step_size``), ``log_likelihood`` (pointwise over the
observed site's plate), ``observed_data`` and, on request, ``posterior_predictive``; every
number is checked against a hand-written forward pass, and ``arviz_stats.loo``/``compare``/
``loo_approximate_posterior`` on our trees are checked against the same functions on trees
built directly from those hand-computed numbers with ``arviz_base.from_dict``. Trees come back
in (a ``DataTree``, a legacy ``InferenceData``, a tree loaded from netCDF/zarr) to every
diagnostics function, and can be re-aligned.
"""

from __future__ import annotations

import math

import numpy as np
import pyro
import pyro.distributions as dist
import pytest
import torch
import xarray as xr
from pyro.infer import MCMC, NUTS
from pyro.infer.autoguide import AutoNormal
from user_models import DeepBNN, TutorialBNN, deep_spec, functional_model, functional_spec, tutorial_spec

import pyro_symmetry as ps

azb = pytest.importorskip("arviz_base")
azs = pytest.importorskip("arviz_stats")
D = ps.diagnostics

pytestmark = pytest.mark.filterwarnings("ignore:Estimated shape parameter of Pareto")


def _gen(seed=0):
    return torch.Generator().manual_seed(seed)


def _train(make_model, make_guide, data, num_runs=2, steps=10):
    return ps.train_runs(make_model, make_guide, data, num_runs, steps=steps, progress=False, vectorize=False)


_FITTED: dict = {}


def _fitted(name, make_guide=AutoNormal):
    """Two AutoNormal runs of a user model on its data, trained once per module (a guide reads
    the parameters its own modules hold)."""
    if name not in _FITTED:
        make_model, _, _, make_data, _ = USER_MODELS[name]
        data = make_data()
        _FITTED[name] = (_train(make_model, make_guide, data), data)
    return _FITTED[name]


# ---------------------------------------------------------------------------------- hand-written models
def _tutorial_forward(w, x):
    h = torch.tanh(x @ w["layer1.weight"].T + w["layer1.bias"])
    return (h @ w["layer2.weight"].T + w["layer2.bias"]).squeeze(-1)


def _tutorial_loglik(w, x, y):
    return dist.Normal(_tutorial_forward(w, x), w["sigma"]).log_prob(y)


def _tutorial_log_prior(w):
    lp = sum(dist.Normal(0.0, 1.0).log_prob(w[k]).sum() for k in w if k != "sigma")
    return lp + dist.Gamma(2.0, 4.0).log_prob(w["sigma"])


def _functional_loglik(w, x, y):
    z = (torch.tanh(torch.tanh(x @ w["w1"]) @ w["w2"]) @ w["w3"]).squeeze(-1)
    return dist.Normal(z, w["prec_obs"].rsqrt()).log_prob(y)


def _deep_loglik(w, x, y):
    h = x
    for i in range(2):
        h = torch.relu(h @ w[f"layers.{i}.weight"].T + w[f"layers.{i}.bias"])
    return dist.Categorical(logits=h @ w["layers.2.weight"].T + w["layers.2.bias"]).log_prob(y)


def _regression_data(n=30, dim=1, seed=0):
    g = _gen(seed)
    x = torch.randn(n, dim, generator=g)
    return x, torch.sin(2 * x[:, 0]) + 0.1 * torch.randn(n, generator=g)


def _draw(tree, c, d):
    post = tree["posterior"]
    return {k: torch.as_tensor(post[k].values[c, d]) for k in post.data_vars}


USER_MODELS = {
    "tutorial": (TutorialBNN, tutorial_spec, _tutorial_loglik, lambda: _regression_data(), "obs"),
    "functional": (lambda: functional_model, functional_spec, _functional_loglik, lambda: _regression_data(dim=3), "Y"),
    "deep": (
        DeepBNN,
        deep_spec,
        _deep_loglik,
        lambda: (torch.randn(24, 8, generator=_gen()), torch.randint(0, 3, (24,), generator=_gen(1))),
        "obs",
    ),
}


@pytest.mark.parametrize("name", list(USER_MODELS))
def test_log_likelihood_of_user_models_is_the_hand_written_forward_pass(name):
    _, make_spec, loglik, _, site = USER_MODELS[name]
    runs, (x, y) = _fitted(name)
    tree = D.to_inference_data(runs, num_samples=30, data=(x, y), spec=make_spec())
    assert set(tree.children) == {"posterior", "sample_stats", "log_likelihood", "observed_data"}
    ll = tree["log_likelihood"][site]
    assert ll.dims == ("chain", "draw", "data") and ll.shape == (2, 30, len(y))  # the model's plate names the dim
    assert tree["observed_data"][site].dims == ("data",)
    np.testing.assert_array_equal(tree["observed_data"][site].values, y.numpy())
    hand = np.stack([np.stack([loglik(_draw(tree, c, d), x, y).numpy() for d in range(30)]) for c in range(2)])
    np.testing.assert_allclose(ll.values, hand, rtol=1e-5, atol=1e-5)
    # loo on our tree = loo on a tree built directly from the hand-computed log-likelihood
    ref = azb.from_dict({"posterior": {"a": np.zeros((2, 30))}, "log_likelihood": {site: hand}})
    ours, theirs = azs.loo(tree), azs.loo(ref)
    assert ours.elpd == pytest.approx(theirs.elpd, rel=1e-5) and ours.p == pytest.approx(theirs.p, rel=1e-4, abs=1e-5)


@pytest.mark.changes_global_state("torch_rng", "param_store")
def test_lp_and_log_q_by_hand_and_loo_approximate_posterior(global_state_unchanged):
    """``lp = log p(data, w)`` and the guide's ``log q`` in the model's space: for the Gamma noise
    scale, the density of ``sigma = exp(u)``, ``u ~ N(loc, scale)``, is ``N(log sigma) / sigma``."""
    runs, (x, y) = _fitted("tutorial")
    tree = D.to_inference_data(runs, num_samples=20, data=(x, y), spec=tutorial_spec(), seed=3)
    stats = tree["sample_stats"]
    assert stats["lp"].dtype == np.float64 and stats["log_q"].dtype == np.float64
    lp, log_q = np.zeros((2, 20)), np.zeros((2, 20))
    for c, run in enumerate(runs):
        for d in range(20):
            w = _draw(tree, c, d)
            lp[c, d] = float(_tutorial_log_prior(w) + _tutorial_loglik(w, x, y).sum())
            total = 0.0
            for k, v in w.items():
                loc, scale = (t.detach() for t in run.guide._get_loc_and_scale(k))
                u = v.log() if k == "sigma" else v
                total += float(dist.Normal(loc, scale).log_prob(u).sum() - (u if k == "sigma" else 0.0))
            log_q[c, d] = total
    np.testing.assert_allclose(stats["lp"].values, lp, rtol=1e-5, atol=1e-3)
    np.testing.assert_allclose(stats["log_q"].values, log_q, rtol=1e-5, atol=1e-3)
    ours = azs.loo_approximate_posterior(tree, log_p=stats["lp"], log_q=stats["log_q"], pointwise=True)
    ref_tree = azb.from_dict(
        {"posterior": {"a": np.zeros((2, 20))}, "log_likelihood": {"obs": tree["log_likelihood"]["obs"].values}}
    )
    theirs = azs.loo_approximate_posterior(ref_tree, log_p=lp, log_q=log_q.ravel(), pointwise=True)
    assert ours.elpd == pytest.approx(theirs.elpd, rel=1e-4)


def test_compare_mean_field_and_symmetrized_guides_aligned_or_not():
    mean_field, (x, y) = _fitted("tutorial")
    spec = tutorial_spec()
    symmetrized = _train(
        TutorialBNN, lambda m: ps.AutoSymmetrizedNormal(m, spec=spec.with_shapes(_shapes()), num_permutations=4), (x, y)
    )
    trees = {
        "mean-field": D.to_inference_data(mean_field, num_samples=30, data=(x, y), spec=spec),
        "mean-field aligned": D.to_inference_data(
            mean_field, num_samples=30, data=(x, y), spec=spec, reference="reference"
        ),
        "symmetrized": D.to_inference_data(symmetrized, num_samples=30, data=(x, y), spec=spec),
    }
    table = azs.compare(trees)
    assert set(table.index) == set(trees)
    # The likelihood is invariant: alignment moves the draws but not their log-likelihood.
    np.testing.assert_allclose(
        trees["mean-field aligned"]["log_likelihood"]["obs"].values,
        trees["mean-field"]["log_likelihood"]["obs"].values,
        rtol=1e-5,
        atol=1e-5,
    )
    assert table.loc["mean-field aligned", "elpd"] == pytest.approx(table.loc["mean-field", "elpd"], rel=1e-5)


def _shapes():
    return {"layer1.weight": (6, 1), "layer1.bias": (6,), "layer2.weight": (1, 6)}


def test_posterior_predictive_on_request_follows_the_observation_model():
    runs, (x, y) = _fitted("tutorial")
    tree = D.to_inference_data(runs, num_samples=25, data=(x, y), spec=tutorial_spec(), posterior_predictive=True)
    pp = tree["posterior_predictive"]
    assert set(pp.data_vars) == {"obs"} and pp["obs"].dims == ("chain", "draw", "data")
    # (pp - mu) / sigma is standard normal: 2 x 25 x 30 = 1500 values, mean and variance within 5 se.
    z = []
    for c in range(2):
        for d in range(25):
            w = _draw(tree, c, d)
            z.append((torch.as_tensor(pp["obs"].values[c, d]) - _tutorial_forward(w, x)) / w["sigma"])
    z = torch.cat(z).double()
    n = z.numel()
    assert abs(float(z.mean())) < 5 / math.sqrt(n) and abs(float(z.var()) - 1) < 5 * math.sqrt(2 / n)
    assert "posterior_predictive" not in D.to_inference_data(runs, num_samples=3, data=(x, y)).children
    deep, data = _fitted("deep")
    classes = D.to_inference_data(deep, num_samples=4, data=data, posterior_predictive=True)
    values = classes["posterior_predictive"]["obs"].values
    assert values.shape == (2, 4, 24) and set(np.unique(values)) <= {0, 1, 2}


def test_mcmc_sample_stats_and_the_model_from_its_kernel():
    x, y = _regression_data(n=15)
    model = TutorialBNN()
    pyro.set_rng_seed(0)
    mcmc = MCMC(NUTS(model), num_samples=6, warmup_steps=6, num_chains=1, disable_progbar=True)
    mcmc.run(x, y)
    tree = D.to_inference_data(mcmc, data=(x, y), spec=tutorial_spec())
    stats = tree["sample_stats"]
    assert set(stats.data_vars) == {"diverging", "step_size", "lp"}
    assert stats["diverging"].dtype == bool and stats["step_size"].shape == (1, 6)
    w = _draw(tree, 0, 4)
    assert float(stats["lp"].values[0, 4]) == pytest.approx(
        float(_tutorial_log_prior(w) + _tutorial_loglik(w, x, y).sum()), rel=1e-5
    )
    np.testing.assert_allclose(tree["log_likelihood"]["obs"].values[0, 4], _tutorial_loglik(w, x, y).numpy(), 1e-5)


def test_errors_name_what_is_missing():
    runs, (x, y) = _fitted("tutorial")
    weights_only = [
        {k: (v.detach(), torch.full_like(v, 0.1)) for k, v in run.guide.median().items() if k != "sigma"}
        for run in runs
    ]
    with pytest.raises(ps.SpecError, match="no model is known"):
        D.to_inference_data(weights_only, num_samples=4, data=(x, y))
    with pytest.raises(ps.SpecError, match=r"latent sites \['sigma'\]"):
        D.to_inference_data(weights_only, num_samples=4, data=(x, y), model=runs[0].model)


# ---------------------------------------------------------------------------------- trees back in
@pytest.fixture(scope="module")
def tree_and_runs():
    x, y = _regression_data()
    pyro.clear_param_store()
    runs = _train(TutorialBNN, AutoNormal, (x, y), num_runs=3, steps=20)
    spec = tutorial_spec()
    tree = D.to_inference_data(runs, num_samples=20, data=(x, y), spec=spec)
    return tree, runs, spec, (x, y)


def _loaded(tree, tmp_path, kind):
    if kind == "datatree":
        return tree
    if kind == "netcdf":
        tree.to_netcdf(tmp_path / "tree.nc")
        return xr.open_datatree(tmp_path / "tree.nc")
    if kind == "zarr":
        pytest.importorskip("zarr")
        tree.to_zarr(tmp_path / "tree.zarr")
        return xr.open_datatree(tmp_path / "tree.zarr", engine="zarr")
    az = pytest.importorskip("arviz")
    if not az.__version__.startswith("0."):
        pytest.skip("legacy InferenceData is arviz 0.x")
    return az.InferenceData.from_datatree(tree)


KINDS = ["datatree", "netcdf", "zarr", "inference_data"]


@pytest.mark.parametrize("kind", KINDS)
def test_trees_read_back_keep_every_group_and_re_align(tree_and_runs, tmp_path, kind):
    tree, runs, spec, (x, y) = tree_and_runs
    loaded = _loaded(tree, tmp_path, kind)
    back = D.to_inference_data(loaded, spec=spec)
    assert set(back.children) == set(tree.children)
    for group in ("posterior", "sample_stats", "log_likelihood", "observed_data"):
        for k in tree[group].data_vars:
            assert back[group][k].dims == tree[group][k].dims, (group, k)
            np.testing.assert_array_equal(back[group][k].values, tree[group][k].values)
    realigned = D.to_inference_data(loaded, spec=spec, reference="barycenter")
    assert realigned["posterior"].attrs["aligned"] == "barycenter"
    # the log-likelihood, lp and observations are invariant: kept; log_q of per-draw aligned draws is not
    np.testing.assert_array_equal(realigned["log_likelihood"]["obs"].values, tree["log_likelihood"]["obs"].values)
    assert set(realigned["sample_stats"].data_vars) == {"lp"}
    assert azs.loo(realigned).elpd == pytest.approx(azs.loo(tree).elpd, rel=1e-9)
    # every draw is a relabelling of the same draw: the function (its predictions) is unchanged
    w0, w1 = _draw(tree, 1, 7), _draw(realigned, 1, 7)
    torch.testing.assert_close(_tutorial_forward(w1, x), _tutorial_forward(w0, x), rtol=1e-4, atol=1e-5)
    draws = D.align_draws(D.collect_draws(loaded), spec)
    assert draws.aligned == "barycenter" and draws.log_likelihood is not None


@pytest.mark.parametrize("kind", KINDS)
def test_every_diagnostics_function_takes_the_tree(tree_and_runs, tmp_path, kind):
    pytest.importorskip("matplotlib")
    tree, _, spec, _ = tree_and_runs
    loaded = _loaded(tree, tmp_path, kind)
    ref = D.rhat_ess(tree)
    got = D.rhat_ess(loaded)
    for k in ref.rhat:
        np.testing.assert_array_equal(got.rhat[k], ref.rhat[k])
    cmp = D.rhat_ess_before_after(loaded, spec)
    assert cmp.after.row()["rhat_max"] <= cmp.before.row()["rhat_max"]
    chains = D.collect_draws(tree).samples
    pooled = {k: v.reshape((-1, *v.shape[2:])) for k, v in chains.items()}
    a = D.mmd(loaded, loaded, num_permutations=10)
    b = D.mmd(pooled, pooled, num_permutations=10)
    assert a.mmd2 == b.mmd2 and a.p_value == b.p_value
    weights = [("layer1.weight", (0, 0)), ("sigma", ())]
    png = D.plots.png_bytes
    assert png(D.plots.plot_marginals(loaded, loaded, weights)) == png(D.plots.plot_marginals(chains, chains, weights))
    assert png(D.plots.plot_ranks(loaded, loaded, weights)) == png(D.plots.plot_ranks(chains, chains, weights))
    assert png(D.plots.plot_rhat_hist(loaded, loaded)) == png(D.plots.plot_rhat_hist(ref.rhat, ref.rhat))
    report = D.symmetry_report(loaded, spec, num_samples=5, mmd_permutations=10, progress=False)
    assert report.info["runs"] == 3 and report.info["alignment"] == "align_samples (barycenter)"


def test_float64_draws_stay_float64_through_netcdf(tmp_path):
    model = ps.models.BayesianMLP(3, [4], 2).double()
    spec = model.spec
    g = _gen(2)
    runs = [{k: (torch.randn(s, generator=g, dtype=torch.float64), torch.full(s, 0.1, dtype=torch.float64))
             for k, s in spec.shapes.items()} for _ in range(2)]  # fmt: skip
    x, y = torch.randn(10, 3, generator=g, dtype=torch.float64), torch.randint(0, 2, (10,), generator=g)
    tree = D.to_inference_data(runs, num_samples=5, data=(x, y), model=model)
    assert {str(tree["posterior"][k].dtype) for k in spec.sites} == {"float64"}
    assert tree["log_likelihood"]["obs"].dtype == np.float64
    tree.to_netcdf(tmp_path / "t.nc")
    back = D.to_inference_data(xr.open_datatree(tmp_path / "t.nc"), spec=spec, reference="reference")
    assert {str(back["posterior"][k].dtype) for k in spec.sites} == {"float64"}


class _NaNWherePositive(TutorialBNN):
    """A user's model bug: its likelihood is NaN where the first weight is positive."""

    def forward(self, x, y=None):
        h = self.activation(self.layer1(x))
        mu = self.layer2(h).squeeze(-1)
        sigma = pyro.sample("sigma", dist.Gamma(2.0, 4.0))
        mu = torch.where(self.layer1.weight[0, 0] > 0, torch.nan, mu)
        with pyro.plate("data", x.shape[0]):
            pyro.sample("obs", dist.Normal(mu, sigma, validate_args=False), obs=y)
        return mu


@pytest.mark.filterwarnings("ignore:Encountered NaN")
def test_a_nan_log_likelihood_is_refused_with_the_site_named():
    x, y = _regression_data(n=10)
    g = _gen(4)
    shapes = {**_shapes(), "layer2.bias": (1,)}
    runs = [{k: torch.randn((6, *s), generator=g) for k, s in shapes.items()} for _ in range(2)]
    for run in runs:
        run["sigma"] = torch.rand(6, generator=g) + 0.5
    with pytest.raises(ValueError, match=r"the log-likelihood of site 'obs' is NaN at \d+ of 12 draws"):
        D.to_inference_data(runs, spec=tutorial_spec(), data=(x, y), model=_NaNWherePositive())


def test_global_state_is_left_alone_with_data_and_predictions():
    from pyro_symmetry._state import snapshot

    runs, (x, y) = _fitted("tutorial")
    before = snapshot()
    D.to_inference_data(runs, num_samples=4, data=(x, y), spec=tutorial_spec(), posterior_predictive=True)
    D.collect_draws(runs, num_samples=4, data=(x, y), spec=tutorial_spec())
    assert snapshot().diff(before) == []


def test_loo_of_a_confident_classifier_float32_model():
    """A float32 log-likelihood of a confident prediction is exactly 0 at every draw, and PSIS
    cannot fit a tail to identical values (arviz_stats raises "All tail values are the same"):
    the model is evaluated in float64."""
    model = ps.models.BayesianMLP(3, [4], 2)
    g = _gen(0)
    x = torch.randn(30, 3, generator=g)
    runs = []
    for _ in range(2):
        loc = {k: 8 * torch.randn(s, generator=g) for k, s in model.spec.shapes.items()}
        runs.append({k: (v, torch.full_like(v, 0.01)) for k, v in loc.items()})
    y = model.functional({k: v[0] for k, v in runs[0].items()}, x).argmax(-1)
    tree = D.to_inference_data(runs, num_samples=100, data=(x, y), model=model)
    ll = tree["log_likelihood"]["obs"]
    assert ll.dtype == np.float64 and str(tree["posterior"]["fc1.weight"].dtype) == "float32"
    w = {k: torch.as_tensor(tree["posterior"][k].values[1, 3]).double() for k in tree["posterior"].data_vars}
    logits = model.double().functional(w, x.double())
    np.testing.assert_allclose(
        ll.values[1, 3], torch.log_softmax(logits, -1)[torch.arange(30), y].numpy(), rtol=1e-9, atol=1e-13
    )
    assert math.isfinite(azs.loo(tree).elpd)
