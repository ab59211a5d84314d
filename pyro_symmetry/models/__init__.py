"""Ready Bayesian neural networks with iid priors and their symmetry spec.

Every model is a ``PyroModule`` whose weights are ``PyroSample`` sites named like
``nn.Module`` parameters (``"fc1.weight"``, ``"layer1.0.conv1.weight"``), works with the
autoguides and the symmetrized guides, ``SVI`` and ``Predictive``, and carries a ``.spec``
bound to its sites. Each has ``functional(params, x)``: the network for a mapping of
(batched) weights, without Pyro.

- :class:`BayesianMLP`, :class:`BayesianCNN`: small fully connected and conv nets.
- :class:`BayesianModule`: any deterministic ``nn.Module`` made Bayesian (iid Normal priors
  on every parameter, a likelihood on its output); its spec comes from
  :meth:`~pyro_symmetry.PermutationSpec.from_module`.
- :class:`BayesianResNet` (ResNet-20 style) and :class:`BayesianTransformer` (a pre-norm
  transformer classifier), built on :class:`BayesianModule`.
"""

from .mlp import ACTIVATIONS, BayesianCNN, BayesianMLP, activation_symmetry
from .resnet import BayesianResNet, FilterResponseNorm2d, resnet
from .transformer import BayesianTransformer, transformer
from .wrapped import BayesianModule

__all__ = [
    "ACTIVATIONS",
    "BayesianCNN",
    "BayesianMLP",
    "BayesianModule",
    "BayesianResNet",
    "BayesianTransformer",
    "FilterResponseNorm2d",
    "activation_symmetry",
    "resnet",
    "transformer",
]
