"""pyro_symmetry: weight-space symmetries of Bayesian neural networks in Pyro.

Layers (each imports only those below it)::

    diagnostics   ArviZ data, R-hat/ESS, MMD, metrics, report (``ps.diagnostics``)
    collections   lazy checkpoint collections, transforms on executors (``ps.collections``)
    training      multi-run SVI
    guides        AutoSymmetrizedNormal, Symmetrize
    estimators    log S(w) and I(g; w): exact, permanent, contrastive, importance
    distributions Pushforward, Symmetrized
    alignment     align, align_many, align_samples, interpolate, loss_barrier
    scaling       flip_signs, rescale, min_mass, canonicalize
    models        BayesianMLP, BayesianCNN
    posterior     reading guides / (loc, scale) mappings / point estimates
    groups        NeuronGroup, PermutationSpec, builders, flat-latent index maps
"""

from . import (
    collections,  # noqa: F401  (a subpackage, outside __all__: ps.collections.from_files(...))
    diagnostics,  # noqa: E402  (top layer, imported last)
    models,
    testing,  # noqa: F401  (strategies and assertions for users' own tests; Hypothesis: the testing extra)
)
from .alignment import *  # noqa: F403
from .alignment import __all__ as _alignment_all
from .distributions import *  # noqa: F403
from .distributions import __all__ as _distributions_all
from .estimators import *  # noqa: F403
from .estimators import __all__ as _estimators_all
from .groups import (
    Axis,
    FlatLayout,
    NeuronGroup,
    PermutationSpec,
    SpecError,
    apply_flat,
    decode_signed,
    encode_signed,
    flat_permutation,
    mlp_spec,
)
from .guides import *  # noqa: F403
from .guides import __all__ as _guides_all
from .posterior import gaussian_params, point_params
from .posteriors import ModelLoss, Posterior, as_posterior, error_loss, nll_loss
from .scaling import *  # noqa: F403
from .scaling import __all__ as _scaling_all
from .training import *  # noqa: F403
from .training import __all__ as _training_all

__version__ = "0.1.0"

__all__ = [
    "Axis",
    "ModelLoss",
    "Posterior",
    "as_posterior",
    "error_loss",
    "nll_loss",
    "FlatLayout",
    "NeuronGroup",
    "PermutationSpec",
    "SpecError",
    "apply_flat",
    "decode_signed",
    "diagnostics",
    "encode_signed",
    "flat_permutation",
    "gaussian_params",
    "mlp_spec",
    "models",
    "point_params",
    *_alignment_all,
    *_distributions_all,
    *_estimators_all,
    *_guides_all,
    *_scaling_all,
    *_training_all,
]
