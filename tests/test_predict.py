"""Predictions of users' own models (no ``functional`` method) against hand-written forward passes."""

from __future__ import annotations

import pyro.poutine as poutine
import pytest
import torch
from user_models import DeepBNN, TutorialBNN, functional_model

import pyro_symmetry as ps
from pyro_symmetry._state import snapshot
from pyro_symmetry.posteriors.predict import predict


def _prior_draws(model, num, *args):
    out = {}
    for _ in range(num):
        tr = poutine.trace(model).get_trace(*args)
        for k, s in tr.nodes.items():
            if s["type"] == "sample" and not s["is_observed"] and k != "data":
                out.setdefault(k, []).append(s["value"].detach())
    return {k: torch.stack(v) for k, v in out.items()}


def test_tutorial_pyromodule_matches_the_hand_written_likelihood():
    x, y = torch.randn(20, 1), torch.randn(20)
    model = TutorialBNN()
    draws = _prior_draws(model, 4, x, y)
    before = snapshot()
    p = predict(model, draws, x, y)
    assert snapshot().diff(before) == []
    assert not p.vectorized  # nn.Linear does not take a batch of weights: looped
    for s in range(4):
        h = torch.tanh(x @ draws["layer1.weight"][s].T + draws["layer1.bias"][s])
        mu = (h @ draws["layer2.weight"][s].T + draws["layer2.bias"][s]).squeeze(-1)
        torch.testing.assert_close(
            p.log_likelihood["obs"][s], torch.distributions.Normal(mu, draws["sigma"][s]).log_prob(y)
        )
        torch.testing.assert_close(p.mean["obs"][s], mu)


def test_functional_model_with_in_out_weights_and_a_learned_precision():
    X, Y = torch.randn(15, 3), torch.randn(15)
    draws = _prior_draws(functional_model, 3, X, Y)
    p = predict(functional_model, draws, X, Y)
    for s in range(3):
        z = (torch.tanh(torch.tanh(X @ draws["w1"][s]) @ draws["w2"][s]) @ draws["w3"][s]).squeeze(-1)
        ref = torch.distributions.Normal(z, draws["prec_obs"][s].rsqrt()).log_prob(Y)
        torch.testing.assert_close(p.log_likelihood["Y"][s], ref)


def test_vectorized_path_is_used_when_the_model_broadcasts_and_agrees_with_the_loop():
    model = ps.models.BayesianMLP(3, [4], 2)
    x, y = torch.randn(10, 3), torch.randint(0, 2, (10,))
    draws = _prior_draws(model, 5, x, y)
    vec = predict(model, draws, x, y)
    loop = predict(model, draws, x, y, vectorize=False)
    assert vec.vectorized and not loop.vectorized
    torch.testing.assert_close(vec.log_likelihood["obs"], loop.log_likelihood["obs"])
    torch.testing.assert_close(vec.mean["obs"], loop.mean["obs"])
    assert vec.categorical["obs"] and vec.mean["obs"].shape == (5, 10, 2)


def test_modulelist_classifier():
    model = DeepBNN()
    x, y = torch.randn(12, 8), torch.randint(0, 3, (12,))
    draws = _prior_draws(model, 2, x, y)
    p = predict(model, draws, x, y)
    h = x
    for i in range(2):
        h = torch.relu(h @ draws[f"layers.{i}.weight"][1].T + draws[f"layers.{i}.bias"][1])
    logits = h @ draws["layers.2.weight"][1].T + draws["layers.2.bias"][1]
    torch.testing.assert_close(p.log_likelihood["obs"][1], torch.distributions.Categorical(logits=logits).log_prob(y))


def test_missing_latent_and_wrong_shape_are_named():
    x, y = torch.randn(20, 1), torch.randn(20)
    model = TutorialBNN()
    draws = _prior_draws(model, 2, x, y)
    with pytest.raises(ps.SpecError, match="latent sites \\['sigma'\\]"):
        predict(model, {k: v for k, v in draws.items() if k != "sigma"}, x, y)
    with pytest.raises(ps.SpecError, match="values\\['layer1.weight'\\] has draws of shape"):
        predict(model, {**draws, "layer1.weight": draws["layer1.weight"][..., None]}, x, y)
    with pytest.raises(ValueError, match="no observed sample site"):
        predict(model, draws, x)
