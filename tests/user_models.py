"""Bayesian networks written the way users write them, not with ``ps.models``.

1. ``TutorialBNN``: Pyro's BNN tutorial style: a ``PyroModule`` with ``PyroModule[nn.Linear]``
   layers, ``PyroSample`` priors set after construction, ``self.activation = nn.Tanh()``
   registered before the layers, and a learned noise scale ``sigma``.
2. ``functional_model``: a NumPyro-style functional model ported to Pyro: weights laid out
   ``(in, out)``, ``torch.tanh``, a learned observation precision.
3. ``DeepBNN``: a classifier whose layers live in a ``PyroModule[nn.ModuleList]``, with ReLU.

Each comes with its spec written by hand from the architecture (the tests must not trust
the code under test to describe the user's model).
"""

from __future__ import annotations

import pyro
import pyro.distributions as dist
import torch
import torch.nn.functional as F
from pyro.nn import PyroModule, PyroSample
from torch import nn

import pyro_symmetry as ps
from pyro_symmetry.groups import Axis, NeuronGroup


class TutorialBNN(PyroModule):
    def __init__(self, in_dim: int = 1, out_dim: int = 1, hid_dim: int = 6, prior_scale: float = 1.0):
        super().__init__()
        self.activation = nn.Tanh()
        self.layer1 = PyroModule[nn.Linear](in_dim, hid_dim)
        self.layer2 = PyroModule[nn.Linear](hid_dim, out_dim)
        self.layer1.weight = PyroSample(dist.Normal(0.0, prior_scale).expand([hid_dim, in_dim]).to_event(2))
        self.layer1.bias = PyroSample(dist.Normal(0.0, prior_scale).expand([hid_dim]).to_event(1))
        self.layer2.weight = PyroSample(dist.Normal(0.0, prior_scale).expand([out_dim, hid_dim]).to_event(2))
        self.layer2.bias = PyroSample(dist.Normal(0.0, prior_scale).expand([out_dim]).to_event(1))

    def forward(self, x, y=None):
        x = x.reshape(-1, 1) if x.dim() == 1 else x
        x = self.activation(self.layer1(x))
        mu = self.layer2(x).squeeze(-1)
        sigma = pyro.sample("sigma", dist.Gamma(2.0, 4.0))
        with pyro.plate("data", x.shape[0]):
            pyro.sample("obs", dist.Normal(mu, sigma), obs=y)
        return mu


def tutorial_spec(hid_dim: int = 6) -> ps.PermutationSpec:
    return ps.PermutationSpec(
        {
            "layer1": NeuronGroup(
                hid_dim,
                incoming=[("layer1.weight", -2), ("layer1.bias", -1)],
                outgoing=[("layer2.weight", -1)],
                activation_symmetry="sign",
            )
        }
    )


def functional_model(X, Y=None, D_H: int = 5):
    D_X = X.shape[1]
    w1 = pyro.sample("w1", dist.Normal(torch.zeros(D_X, D_H), torch.ones(D_X, D_H)).to_event(2))
    z1 = torch.tanh(X @ w1)
    w2 = pyro.sample("w2", dist.Normal(torch.zeros(D_H, D_H), torch.ones(D_H, D_H)).to_event(2))
    z2 = torch.tanh(z1 @ w2)
    w3 = pyro.sample("w3", dist.Normal(torch.zeros(D_H, 1), torch.ones(D_H, 1)).to_event(2))
    z3 = (z2 @ w3).squeeze(-1)
    prec_obs = pyro.sample("prec_obs", dist.Gamma(3.0, 1.0))
    sigma_obs = 1.0 / torch.sqrt(prec_obs)
    with pyro.plate("data", X.shape[0]):
        pyro.sample("Y", dist.Normal(z3, sigma_obs), obs=Y)
    return z3


def functional_spec(D_H: int = 5) -> ps.PermutationSpec:
    """Weights ``(in, out)``: a hidden layer's neurons are axis 1 of its own weight
    (incoming) and axis 0 of the next one (outgoing)."""
    sign = "sign"
    return ps.PermutationSpec(
        {
            "h1": NeuronGroup(D_H, [Axis("w1", 1, 1, 2)], [Axis("w2", 0, 1, 2)], sign),
            "h2": NeuronGroup(D_H, [Axis("w2", 1, 1, 2)], [Axis("w3", 0, 1, 2)], sign),
        }
    )


class DeepBNN(PyroModule):
    def __init__(self, sizes=(8, 7, 6, 3), prior_scale: float = 1.0):
        super().__init__()
        self.layers = PyroModule[nn.ModuleList]([PyroModule[nn.Linear](a, b) for a, b in zip(sizes[:-1], sizes[1:])])
        for layer, (a, b) in zip(self.layers, zip(sizes[:-1], sizes[1:])):
            layer.weight = PyroSample(dist.Normal(0.0, prior_scale).expand([b, a]).to_event(2))
            layer.bias = PyroSample(dist.Normal(0.0, prior_scale).expand([b]).to_event(1))

    def forward(self, x, y=None):
        for layer in self.layers[:-1]:
            x = F.relu(layer(x))
        logits = self.layers[-1](x)
        with pyro.plate("data", x.shape[0]):
            pyro.sample("obs", dist.Categorical(logits=logits), obs=y)
        return logits


def deep_spec(sizes=(8, 7, 6, 3)) -> ps.PermutationSpec:
    groups = {}
    for i, n in enumerate(sizes[1:-1]):
        groups[f"layers.{i}"] = NeuronGroup(
            n,
            incoming=[(f"layers.{i}.weight", -2), (f"layers.{i}.bias", -1)],
            outgoing=[(f"layers.{i + 1}.weight", -1)],
            activation_symmetry="scale",
        )
    return ps.PermutationSpec(groups)
