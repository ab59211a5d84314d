"""Symmetrized autoguides: Pyro integration, the ELBO identity, invariance checks, training."""

import math

import pyro
import pyro.distributions as dist
import pytest
import torch
from pyro.infer import SVI, Predictive, Trace_ELBO, TraceMeanField_ELBO
from pyro.infer.autoguide import (
    AutoDiagonalNormal,
    AutoLowRankMultivariateNormal,
    AutoMultivariateNormal,
    AutoNormal,
    init_to_sample,
)
from pyro.nn import PyroModule, PyroSample

import pyro_symmetry as ps
from pyro_symmetry.estimators import symmetry_log_ratio
from pyro_symmetry.models import BayesianMLP


class TwoReLU(PyroModule):
    """Gelberg et al.'s tractable BNN ``f(x) = relu(w1 x) + relu(w2 x)``, prior N(0, 1)."""

    def __init__(self, obs_scale=0.5):
        super().__init__()
        self.w = PyroSample(dist.Normal(0.0, 1.0).expand([2]).to_event(1))
        self.obs_scale = obs_scale
        self.spec = ps.PermutationSpec({"h": ps.NeuronGroup(2, incoming=[("w", -1)])}, {"w": (2,)})

    @staticmethod
    def f(w, x):
        return torch.relu(w[..., :1] * x) + torch.relu(w[..., 1:] * x)  # (*batch, N)

    def forward(self, x, y=None):
        w = self.w
        w = w.squeeze(-2) if w.dim() > 1 else w  # (P, 1, 2) under vectorized particles
        with pyro.plate("data", x.shape[0]):
            pyro.sample("obs", dist.Normal(self.f(w, x), self.obs_scale), obs=y)


def _regression_data(n=12, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 2, generator=g)
    return x, torch.sin(2 * x[:, 0]) + 0.1 * torch.randn(n, generator=g)


def _fit(model, guide, x, y, steps, lr=0.03, particles=4, seed=0):
    pyro.set_rng_seed(seed)
    svi = SVI(model, guide, pyro.optim.Adam({"lr": lr}), Trace_ELBO(num_particles=particles, vectorize_particles=True))
    for _ in range(steps):
        svi.step(x, y)
    return guide


def _exact_elbo_sym(model, guide, x, y, num_particles=4000, seed=123):
    """Exact ELBO(q_sym) of an AutoNormal-family guide: Pyro's ELBO(q) + I, on common draws."""
    with pyro.get_param_store().scope():  # a separate store: guides of one class share parameter names
        sym = ps.AutoSymmetrizedNormal(model, estimator="exact", check_invariance=False)
        sym(x, y)
        sym.load_state_dict(guide.state_dict())
        pyro.set_rng_seed(seed)
        return -Trace_ELBO(num_particles=num_particles, vectorize_particles=True).loss(model, sym, x, y)


@pytest.mark.parametrize("estimator,vectorize", [("contrastive", False), ("importance", True)])
def test_svi_predictive_median_quantiles_and_draws(estimator, vectorize):
    model = BayesianMLP(3, [4, 3], 2, activation="tanh")
    x, y = torch.randn(16, 3), torch.randint(0, 2, (16,))
    guide = ps.AutoSymmetrizedNormal(model, num_permutations=4, estimator=estimator)
    svi = SVI(model, guide, pyro.optim.Adam({"lr": 0.05}), Trace_ELBO(num_particles=3, vectorize_particles=vectorize))
    losses = [svi.step(x, y) for _ in range(25)]
    assert sum(losses[-5:]) < sum(losses[:5])
    tr = pyro.poutine.trace(guide).get_trace(x, y)
    assert tr.nodes[guide._factor_name]["fn"].log_factor.shape == ()
    pred = Predictive(model, guide=guide, num_samples=5, parallel=vectorize, return_sites=["_RETURN"])(x)
    assert pred["_RETURN"].shape[-2:] == (16, 2)
    med, qs = guide.median(), guide.quantiles([0.1, 0.9])
    assert med["fc1.weight"].shape == (4, 3) and qs["fc1.weight"].shape == (2, 4, 3)
    # q_sym draws: predictions unchanged, weights permuted (a uniform g per draw)
    moved = Predictive(
        model, guide=guide.symmetrized(), num_samples=5, parallel=vectorize, return_sites=["_RETURN", "fc1.weight"]
    )(x)
    pyro.set_rng_seed(1)
    draws = guide.sample_posterior(400)
    assert draws["fc2.weight"].shape == (400, 3, 4) and moved["fc1.weight"].shape[-2:] == (4, 3)
    # under q_sym every hidden neuron of fc1 has the same marginal: the row means agree
    rows = draws["fc1.weight"].abs().mean(0).sum(-1)
    assert rows.std() < 0.25 * rows.mean()


def test_param_store_save_and_load(tmp_path):
    model = BayesianMLP(3, [4], 2)
    x, y = torch.randn(10, 3), torch.randint(0, 2, (10,))
    guide = _fit(model, ps.AutoSymmetrizedNormal(model), x, y, 20)
    med = guide.median()
    pyro.get_param_store().save(tmp_path / "params.pt")
    pyro.clear_param_store()
    pyro.get_param_store().load(tmp_path / "params.pt")
    fresh = ps.AutoSymmetrizedNormal(model)
    fresh(x, y)
    for k, v in fresh.median().items():
        assert torch.equal(v, med[k])


def test_elbo_identity_through_pyro():
    """ELBO(q_sym) - ELBO(q) = I(g; w), and Pyro's ELBO on the guide (w ~ q) is ELBO(q_sym)."""
    model = BayesianMLP(2, [3], 1, likelihood="regression", obs_scale=0.3)
    x, y = _regression_data()
    base = _fit(model, AutoNormal(model, init_loc_fn=init_to_sample), x, y, 200)
    sym = ps.AutoSymmetrizedNormal(model, estimator="exact")
    sym(x, y)
    sym.load_state_dict(base.state_dict())
    elbo = Trace_ELBO(num_particles=200, vectorize_particles=True)
    diffs, sym_elbos = [], []
    for r in range(10):  # common draws for both guides: the difference has a small variance
        pyro.set_rng_seed(r)
        lq = -elbo.loss(model, base, x, y)
        pyro.set_rng_seed(r)
        ls = -elbo.loss(model, sym, x, y)
        diffs.append(ls - lq)
        sym_elbos.append(ls)
    diffs, sym_elbos = torch.tensor(diffs, dtype=torch.float64), torch.tensor(sym_elbos, dtype=torch.float64)
    pyro.set_rng_seed(99)
    mi = ps.mutual_information(sym, method="exact", num_samples=4000)
    se = math.hypot(diffs.std() / math.sqrt(len(diffs)), mi.stderr)
    assert 0.3 < mi.value < model.spec.log_order
    assert abs(diffs.mean() - mi.value) < 4 * se
    # ELBO(q_sym) by hand with w ~ q_sym (random g per draw) and the exact log q_sym
    q = {k: dist.Normal(*sym._get_loc_and_scale(k)).to_event(sym._event_dims[k]) for k in model.site_names}
    q_sym = ps.Symmetrized({k: d for k, d in q.items()}, model.spec, estimator="exact")
    torch.manual_seed(5)
    with torch.no_grad():
        w = q_sym.sample((4000,))
        prior = sum(dist.Normal(0.0, 1.0).log_prob(w[k]).flatten(1).sum(-1) for k in model.site_names)
        lik = dist.Normal(model.functional(w, x).squeeze(-1), 0.3).log_prob(y).sum(-1)
        terms = prior + lik - q_sym.log_prob(w)
    se = math.hypot(terms.std() / math.sqrt(len(terms)), sym_elbos.std() / math.sqrt(len(sym_elbos)))
    assert abs(terms.mean() - sym_elbos.mean()) < 4 * se


class _Broken(BayesianMLP):
    """A BNN that is not permutation invariant: a row-dependent prior, or an extra
    observation that reads hidden neuron 0's outgoing weight."""

    def __init__(self, where):
        super().__init__(2, [3], 1, likelihood="regression")
        self.where = where
        if where == "prior":
            loc = torch.arange(3.0).unsqueeze(-1).expand(3, 2)
            self.fc1.weight = PyroSample(dist.Normal(loc, 1.0).to_event(2))

    def forward(self, x, y=None):
        out = super().forward(x, y)
        if self.where == "likelihood":
            pyro.sample("obs2", dist.Normal(self.fc2.weight[..., 0, 0], 1.0), obs=torch.tensor(0.5))
        return out


def test_invariance_check_names_the_site():
    x, y = _regression_data(6)
    with pytest.raises(ps.SpecError, match="'fc1.weight'.*prior"):
        ps.AutoSymmetrizedNormal(_Broken("prior"))(x, y)
    with pytest.raises(ps.SpecError, match="'obs2'.*likelihood"):
        ps.AutoSymmetrizedNormal(_Broken("likelihood"))(x, y)
    ps.AutoSymmetrizedNormal(_Broken("prior"), check_invariance=False)(x, y)  # opt-out


def test_guide_errors():
    x, y = _regression_data(6)
    model = BayesianMLP(2, [3], 1, likelihood="regression", obs_scale=None)
    with pytest.raises(ps.SpecError, match="needs a PermutationSpec"):
        ps.AutoSymmetrizedNormal(lambda x, y: None)
    with pytest.raises(ValueError, match="num_permutations"):
        ps.AutoSymmetrizedNormal(model, num_permutations=0)
    with pytest.raises(ValueError, match="estimator"):
        ps.AutoSymmetrizedNormal(model, estimator="bad")
    wrong = ps.PermutationSpec({"h": ps.NeuronGroup(3, incoming=[("fc9.weight", -2)])})
    with pytest.raises(ps.SpecError, match="fc9.weight"):
        ps.AutoSymmetrizedNormal(model, spec=wrong)(x, y)
    positive = ps.PermutationSpec({"s": ps.NeuronGroup(1, incoming=[("obs_scale", -1, 1, 1)])})
    with pytest.raises(ps.SpecError, match="obs_scale"):
        ps.AutoSymmetrizedNormal(model, spec=positive)(x, y)
    with pytest.raises(TypeError, match="AutoContinuous"):
        ps.Symmetrize(AutoNormal(model))


def test_analytic_kl_lowers_gradient_variance():
    model = BayesianMLP(3, [4], 2)
    x, y = torch.randn(4, 3, generator=torch.Generator().manual_seed(0)), torch.tensor([0, 1, 1, 0])
    mc = _fit(model, ps.AutoSymmetrizedNormal(model, num_permutations=4), x, y, 100, particles=1)
    mf = ps.AutoSymmetrizedMeanField(model, num_permutations=4)
    mf(x, y)
    mf.load_state_dict(mc.state_dict())
    tr = pyro.poutine.trace(mf).get_trace(x, y)
    assert isinstance(tr.nodes["fc1.weight"]["fn"], torch.distributions.Independent)  # Normal at the site

    def grad_stats(guide, elbo):
        params = list(guide.parameters())
        grads, losses = [], []
        for r in range(60):
            pyro.set_rng_seed(r)
            loss = elbo.differentiable_loss(model, guide, x, y)
            grads.append(torch.cat([g.reshape(-1) for g in torch.autograd.grad(loss, params)]))
            losses.append(float(loss.detach()))
        return torch.stack(grads).var(0).sum(), torch.tensor(losses)

    v_mc, l_mc = grad_stats(mc, Trace_ELBO())
    v_mf, l_mf = grad_stats(mf, TraceMeanField_ELBO())
    assert v_mf < 0.85 * v_mc
    se = math.hypot(l_mc.std(), l_mf.std()) / math.sqrt(len(l_mc))
    assert abs(l_mc.mean() - l_mf.mean()) < 4 * se  # the same objective in expectation


@pytest.mark.parametrize(
    "make",
    [
        lambda m: AutoDiagonalNormal(m),
        lambda m: AutoLowRankMultivariateNormal(m, rank=2),
        lambda m: AutoMultivariateNormal(m),
        lambda m: ps.AutoMixtureOfDiagNormals(m, num_components=3),
    ],
    ids=["diag", "lowrank", "mvn", "mixture"],
)
def test_symmetrize_flat_guides(make):
    model = BayesianMLP(2, [3], 1, activation="tanh", likelihood="regression", obs_scale=0.3)
    x, y = _regression_data(10)
    guide = ps.Symmetrize(make(model), estimator="exact")
    losses = []
    svi = SVI(model, guide, pyro.optim.Adam({"lr": 0.03}), Trace_ELBO(num_particles=2, vectorize_particles=True))
    losses = [svi.step(x, y) for _ in range(60)]
    assert sum(losses[-5:]) < sum(losses[:5])
    # the factor is log q_sym(z) - log q(z) on the flat latent
    tr = pyro.poutine.trace(guide).get_trace(x, y)
    z = tr.nodes[f"_{guide.guide._pyro_name}_latent"]["value"]
    expected = symmetry_log_ratio(guide.get_posterior(), guide.spec, z, "exact", layout=guide.layout)
    assert torch.allclose(tr.nodes[guide._factor_name]["fn"].log_factor, expected)
    mi = ps.mutual_information(guide, method="exact", num_samples=200)
    assert 0 <= mi.value <= model.spec.log_order
    draws = guide.sample_posterior(50)
    assert draws["fc1.weight"].shape == (50, 3, 2) and guide.median()["fc2.weight"].shape == (1, 3)


def test_training_regimes_on_the_tractable_bnn():
    """Overlapping modes (alpha = 0.01): q_sym training leaves the swap-invariant diagonal
    w1 = w2 where mean-field VI sits (between the modes) and gains tenths of a nat of
    ELBO(q_sym); separated modes (alpha = 0.2): both sit on one mode and agree."""

    def run(alpha, seed):
        g = torch.Generator().manual_seed(seed)
        x = torch.rand(100, generator=g) * 20 - 10
        y = alpha * x.abs() + 0.5 * torch.randn(100, generator=g)
        out = {}
        for name in ("normal", "sym"):
            pyro.clear_param_store()
            model = TwoReLU()
            make = (
                AutoNormal if name == "normal" else lambda m, **k: ps.AutoSymmetrizedNormal(m, estimator="exact", **k)
            )
            guide = make(model, init_loc_fn=init_to_sample, init_scale=0.05)
            pyro.set_rng_seed(seed)
            optim = pyro.optim.ClippedAdam({"lr": 0.05, "lrd": 0.993})
            svi = SVI(model, guide, optim, Trace_ELBO(num_particles=32, vectorize_particles=True))
            for _ in range(400):
                svi.step(x, y)
            w = guide.median()["w"]
            out[name] = (_exact_elbo_sym(model, guide, x, y), float((w[0] - w[1]).abs()))
        return out

    for seed in (0, 1):
        out = run(0.01, seed)
        assert out["sym"][0] > out["normal"][0] + 0.1, out
        assert out["sym"][1] > max(0.01, 4 * out["normal"][1]), out
    out = run(0.2, 0)
    assert abs(out["sym"][0] - out["normal"][0]) < 0.05, out


def test_importance_gradient_raises_exact_elbo_sym():
    """Training with the importance estimator (pathwise gradient, proposal held fixed) reaches a
    higher exact ELBO(q_sym) and I(g; w) than mean-field VI trained the same way."""
    model = BayesianMLP(2, [4], 1, likelihood="regression", obs_scale=0.3)
    x, y = _regression_data(8)
    out = {}
    for name in ("mean-field", "importance"):
        pyro.clear_param_store()
        pyro.set_rng_seed(1)
        guide = (
            AutoNormal(model, init_loc_fn=init_to_sample)
            if name == "mean-field"
            else ps.AutoSymmetrizedNormal(model, estimator="importance", num_permutations=4, init_loc_fn=init_to_sample)
        )
        _fit(model, guide, x, y, 400, lr=0.03, particles=8, seed=1)
        pyro.set_rng_seed(1)
        out[name] = (_exact_elbo_sym(model, guide, x, y), ps.mutual_information(guide, model.spec, "exact", 1000))
    (e_mf, i_mf), (e_imp, i_imp) = out["mean-field"], out["importance"]
    assert e_imp > e_mf + 0.3, out
    assert i_imp.value > i_mf.value + 0.3 + 3 * math.hypot(i_imp.stderr, i_mf.stderr), out
