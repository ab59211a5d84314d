"""Estimators of the symmetry term ``log S(w)`` and of ``I(g; w)`` (SPEC section 2).

``exact`` (enumeration), ``permanent`` (Glynn's formula with an exact subset dynamic
program as fallback; one hidden layer, widths up to 25), ``contrastive``
(Gelberg et al. 2024, Thm 4.3) and ``importance`` (equivariant Plackett-Luce
proposal), behind :func:`mutual_information` and :func:`symmetry_log_ratio`.
The names in ``__all__`` are re-exported at the top level (``ps.mutual_information``);
the per-method functions stay here (``ps.estimators.exact_log_ratio``).
"""

from ._base import BaseDensity
from ._base import Marginals as Marginals
from ._base import detach_distribution as detach_distribution
from .contrastive import contrastive_log_ratio as contrastive_log_ratio
from .exact import MAX_EXACT_ORDER as MAX_EXACT_ORDER
from .exact import exact_log_ratio as exact_log_ratio
from .factors import neuron_log_factors as neuron_log_factors
from .importance import importance_log_ratio as importance_log_ratio
from .importance import plackett_luce_proposal as plackett_luce_proposal
from .information import METHODS as METHODS
from .information import MIEstimate, log_q_sym, log_s, mutual_information, symmetry_log_ratio
from .information import base_of as base_of
from .information import estimate_log_ratio as estimate_log_ratio
from .information import resolve_method as resolve_method
from .permanent import log_permanent
from .permanent import permanent_log_ratio as permanent_log_ratio

__all__ = [
    "BaseDensity",
    "MIEstimate",
    "log_permanent",
    "log_q_sym",
    "log_s",
    "mutual_information",
    "symmetry_log_ratio",
]
