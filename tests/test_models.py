"""Ready BNNs: Pyro integration, batched functional forms, invariance of prior and likelihood."""

import pyro
import pyro.poutine as poutine
import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from pyro.infer import SVI, Predictive, Trace_ELBO
from pyro.infer.autoguide import AutoDiagonalNormal, AutoNormal
from strategies import activations, group_element, mlp_architectures, model_params, seeds

from pyro_symmetry.models import BayesianCNN, BayesianMLP


def _log_joint(model, params, x, y):
    """(log prior, log likelihood) of ``params`` under ``model``."""
    tr = poutine.trace(poutine.condition(model, data=params)).get_trace(x, y)
    tr.compute_log_prob()
    prior = sum(tr.nodes[k]["log_prob_sum"] for k in params)
    return prior, tr.nodes["obs"]["log_prob_sum"]


@given(arch=mlp_architectures(), act=activations, seed=seeds, lik=st.sampled_from(["classification", "regression"]))
def test_prior_and_likelihood_invariance(arch, act, seed, lik):
    n_in, hidden, n_out = arch
    model = BayesianMLP(n_in, hidden, n_out, activation=act, likelihood=lik, prior_scale=0.7)
    params = model_params(model, dtype=torch.float32, seed=seed)
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(6, n_in, generator=g)
    y = torch.randint(0, n_out, (6,), generator=g) if lik == "classification" else torch.randn(6, n_out).squeeze(-1)
    perm = group_element(model.spec, seed)
    p0, l0 = _log_joint(model, params, x, y)
    p1, l1 = _log_joint(model, model.spec.apply(params, perm), x, y)
    assert torch.allclose(p0, p1, atol=1e-4) and torch.allclose(l0, l1, atol=1e-4)


@pytest.mark.parametrize("guide_cls", [AutoNormal, AutoDiagonalNormal])
@pytest.mark.parametrize("vectorize", [False, True])
def test_svi_and_predictive(guide_cls, vectorize):
    model = BayesianMLP(4, [6, 5], 3)
    x, y = torch.randn(30, 4), torch.randint(0, 3, (30,))
    guide = guide_cls(model)
    elbo = Trace_ELBO(num_particles=3, vectorize_particles=vectorize)
    svi = SVI(model, guide, pyro.optim.Adam({"lr": 0.05}), elbo)
    losses = [svi.step(x, y) for _ in range(60)]
    assert sum(losses[-10:]) < sum(losses[:10])
    for parallel in (False, True):
        pred = Predictive(model, guide=guide, num_samples=5, parallel=parallel, return_sites=["obs", "_RETURN"])(x)
        assert pred["obs"].shape == (5, 30)
        assert pred["_RETURN"].shape[-2:] == (30, 3)


def test_regression_learned_noise_and_minibatch_scaling():
    model = BayesianMLP(2, [3], 1, likelihood="regression", obs_scale=None)
    x, y = torch.randn(8, 2), torch.randn(8)
    tr = poutine.trace(model).get_trace(x, y, num_data=80)
    assert "obs_scale" in tr.nodes and tr.nodes["obs"]["scale"] == pytest.approx(10.0)


def test_batched_functional_matches_loop():
    model = BayesianMLP(3, [4, 2], 2, activation="tanh")
    params = model_params(model, batch_shape=(5,), seed=1)
    x = torch.randn(7, 3, dtype=torch.float64)
    out = model.functional(params, x)
    assert out.shape == (5, 7, 2)
    for i in range(5):
        assert torch.allclose(out[i], model.functional({k: v[i] for k, v in params.items()}, x))


@given(c=st.lists(st.integers(1, 4), min_size=1, max_size=2), seed=seeds, act=st.sampled_from(["relu", "tanh"]))
def test_cnn_invariance_and_batched_conv(c, seed, act):
    model = BayesianCNN(1, (8, 8), c, 3, activation=act)
    params = model_params(model, batch_shape=(2,), seed=seed)
    x = torch.randn(4, 1, 8, 8, dtype=torch.float64, generator=torch.Generator().manual_seed(seed))
    out = model.functional(params, x)
    assert out.shape == (2, 4, 3)
    single = model.functional({k: v[0] for k, v in params.items()}, x)
    assert torch.allclose(out[0], single)
    perm = group_element(model.spec, seed, batch_shape=(2,))
    assert torch.allclose(model.functional(model.spec.apply(params, perm), x), out, atol=1e-10)


def test_cnn_svi():
    model = BayesianCNN(1, (8, 8), [3, 4], 10)
    x, y = torch.randn(16, 1, 8, 8), torch.randint(0, 10, (16,))
    guide = AutoNormal(model)
    svi = SVI(model, guide, pyro.optim.Adam({"lr": 0.05}), Trace_ELBO(num_particles=2, vectorize_particles=True))
    for _ in range(3):
        svi.step(x, y)
    assert Predictive(model, guide=guide, num_samples=3, parallel=True)(x)["obs"].shape == (3, 16)


def test_bad_arguments():
    with pytest.raises(ValueError, match="unknown activation 'swishy'"):
        BayesianMLP(2, [3], 1, activation="swishy")
    with pytest.raises(ValueError, match="likelihood must be one of"):
        BayesianMLP(2, [3], 1, likelihood="poisson")
    with pytest.raises(ValueError, match="prior_scale must be a positive"):
        BayesianMLP(2, [3], 1, prior_scale=-1.0)
    with pytest.raises(ValueError, match="all layer sizes must be >= 1"):
        BayesianMLP(2, [0], 1)
    with pytest.raises(ValueError, match="too small"):
        BayesianCNN(1, (2, 2), [2, 2], 3)
