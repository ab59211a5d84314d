"""``log S(w)``, ``log q_sym(w)`` and the mutual information ``I(g; w)`` behind one API.

With ``q_sym(w) = (1/|G|) sum_g q(g^{-1} w)`` and ``S(w) = sum_g q(g^{-1} w) / q(w)``,

    I(g; w) = E_{w~q}[log q(w) - log q_sym(w)] = log|G| - E_{w~q}[log S(w)],

``0 <= I <= log|G|`` and ``ELBO(q_sym) = ELBO(q) + I`` for an invariant model
(Gelberg, van der Ouderaa, van der Wilk, Gal, PMLR 251, 2024).

Methods: ``"exact"`` (enumerate G), ``"permanent"`` (exact, one hidden layer,
mean-field ``q``), ``"contrastive"`` (Gelberg et al.'s K-sample bound, at most
``log K``), ``"importance"`` (the same kind of bound with an equivariant
Plackett-Luce proposal; far tighter on wide layers) and ``"auto"``.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any, NamedTuple

import torch
import torch.distributions as td

from ..groups import FlatLayout, PermutationSpec, SpecError
from ._base import BaseDensity, as_base
from .contrastive import contrastive_log_ratio
from .exact import MAX_EXACT_ORDER, exact_log_ratio
from .importance import importance_log_ratio
from .permanent import check_decoupled, permanent_log_ratio

__all__ = [
    "METHODS",
    "MIEstimate",
    "base_of",
    "log_q_sym",
    "log_s",
    "mutual_information",
    "resolve_method",
    "symmetry_log_ratio",
]

METHODS = ("exact", "permanent", "contrastive", "importance", "auto")
#: ``"auto"`` enumerates G up to this order, then tries the permanent up to this width.
AUTO_EXACT_ORDER = 10_000
AUTO_PERMANENT_WIDTH = 20


class MIEstimate(NamedTuple):
    """A Monte Carlo estimate of ``I(g; w)``, a named tuple of

    - ``value`` (float): the estimate in nats; exact methods are unbiased, the bounds
      are lower bounds;
    - ``stderr`` (float): the Monte Carlo standard error over the ``num_samples`` draws
      of ``w`` (and of the contrastive/proposal elements);
    - ``method`` (str): the method used (``"auto"`` resolved);
    - ``num_samples`` (int);
    - ``num_permutations`` (int or None): ``K`` for the bounds, ``None`` for the exact
      methods;
    - ``log_order`` (float): ``log|G|``, the largest possible value.
    """

    value: float
    stderr: float
    method: str
    num_samples: int
    num_permutations: int | None
    log_order: float


def resolve_method(base: BaseDensity, method: str) -> str:
    """The method ``"auto"`` stands for: exact if ``|G| <= 10^4``, else the permanent
    (decoupled groups, mean-field ``q``, widths <= 20), else ``"importance"``."""
    if method not in METHODS:
        raise ValueError(f"method must be one of {METHODS}, got {method!r}")
    if method != "auto":
        return method
    if base.spec.order <= AUTO_EXACT_ORDER:
        return "exact"
    if max(base.spec.sizes.values()) <= AUTO_PERMANENT_WIDTH:
        try:
            check_decoupled(base)
            return "permanent"
        except SpecError:
            pass
    return "importance"


def _check_k(num_permutations: Any) -> int:
    if isinstance(num_permutations, bool) or not isinstance(num_permutations, int) or num_permutations < 1:
        raise ValueError(f"num_permutations must be an int >= 1, got {num_permutations!r}")
    return num_permutations


def symmetry_log_ratio(
    q: Any,
    spec: PermutationSpec | None,
    value: Any,
    method: str = "auto",
    num_permutations: int = 16,
    *,
    layout: FlatLayout | None = None,
    beta: float = 1.0,
    generator: torch.Generator | None = None,
    max_order: int = MAX_EXACT_ORDER,
) -> torch.Tensor:
    """``log q_sym(w) - log q(w) = log S(w) - log|G|`` (what a symmetrized guide adds).

    Parameters
    ----------
    q : mapping ``site -> Distribution | (loc, scale)``, flat Distribution (with
        ``layout``), or a :class:`~pyro_symmetry.estimators.BaseDensity`
    spec : PermutationSpec
    value : dict ``site -> (*batch, *shape)`` or flat ``(*batch, D)``
    method : {"exact", "permanent", "contrastive", "importance", "auto"}
    num_permutations : int
        ``K`` (bounds only), identity included.
    layout, beta, generator, max_order
        Flat layout; Plackett-Luce inverse temperature; RNG for the group
        elements; enumeration limit of ``"exact"``.

    Returns
    -------
    Tensor ``(*batch,)``, differentiable (pathwise) in ``value`` and ``q``.
    Exact for ``"exact"``/``"permanent"``; for the bounds, a random estimate whose
    expectation over ``w ~ q`` upper-bounds ``E log q_sym(w) - E log q(w)``.
    """
    base = as_base(q, spec, layout) if not isinstance(q, BaseDensity) else q
    m = resolve_method(base, method)
    if m == "exact":
        return exact_log_ratio(base, value, max_order)
    if m == "permanent":
        return permanent_log_ratio(base, value)
    K = _check_k(num_permutations)
    if m == "contrastive":
        return contrastive_log_ratio(base, value, K, generator)
    return importance_log_ratio(base, value, K, beta, generator)


def log_s(q: Any, spec: PermutationSpec | None, value: Any, method: str = "auto", **kwargs: Any) -> torch.Tensor:
    """``log S(w) = log sum_g q(g^{-1} w) - log q(w)`` (``>= 0``); see :func:`symmetry_log_ratio`."""
    base = as_base(q, spec, kwargs.pop("layout", None)) if not isinstance(q, BaseDensity) else q
    return symmetry_log_ratio(base, None, value, method, **kwargs) + base.spec.log_order


def log_q_sym(q: Any, spec: PermutationSpec | None, value: Any, method: str = "auto", **kwargs: Any) -> torch.Tensor:
    """``log q_sym(w) = log (1/|G|) sum_g q(g^{-1} w)``; see :func:`symmetry_log_ratio`."""
    base = as_base(q, spec, kwargs.pop("layout", None)) if not isinstance(q, BaseDensity) else q
    return base.log_prob(value) + symmetry_log_ratio(base, None, value, method, **kwargs)


def base_of(q_or_guide: Any, spec: PermutationSpec | None = None, layout: FlatLayout | None = None) -> BaseDensity:
    """The base ``q`` of a guide or distribution, as a :class:`BaseDensity`.

    Accepts a :class:`~pyro_symmetry.Symmetrized` distribution, the guides of
    :mod:`pyro_symmetry.guides` (their base ``q``), fitted ``AutoNormal`` and
    ``AutoContinuous`` guides (``AutoDiagonalNormal``, ``AutoLowRankMultivariateNormal``,
    ``AutoMultivariateNormal``, ...), mappings ``site -> Distribution | (loc, scale)``
    and a flat Distribution with ``layout``. Parameters are detached.
    """
    if isinstance(q_or_guide, BaseDensity):
        return q_or_guide
    if hasattr(q_or_guide, "symmetry_base"):
        base = q_or_guide.symmetry_base()
        return base if spec is None else BaseDensity(base.flat or base.dists, spec, base.layout)
    if spec is None:
        spec = getattr(q_or_guide, "spec", None)
    if spec is None:
        raise SpecError(f"no spec given and {type(q_or_guide).__name__} carries none: pass spec=")
    if isinstance(q_or_guide, torch.nn.Module) and hasattr(q_or_guide, "prototype_trace"):
        from pyro.infer import autoguide

        from ..posterior import gaussian_params

        if q_or_guide.prototype_trace is None:
            raise SpecError(f"{type(q_or_guide).__name__} is not fitted: run an SVI step (or call it once) first")
        if isinstance(q_or_guide, autoguide.AutoContinuous):
            with torch.no_grad():
                post = q_or_guide.get_posterior()
            return BaseDensity(_detach(post), spec, FlatLayout.from_guide(q_or_guide))
        return BaseDensity(gaussian_params(q_or_guide), spec)
    if isinstance(q_or_guide, td.Distribution):
        return BaseDensity(q_or_guide, spec, layout)
    if isinstance(q_or_guide, Mapping):
        return BaseDensity(q_or_guide, spec)
    raise SpecError(f"cannot read a posterior q from a {type(q_or_guide).__name__}")


def _detach(d: td.Distribution) -> td.Distribution:
    """Detach a flat posterior built from parameters (for estimation, not training)."""
    import pyro.distributions as dist

    inner, n = d, 0
    while isinstance(inner, td.Independent):
        n += inner.reinterpreted_batch_ndims
        inner = inner.base_dist
    if isinstance(inner, td.Normal):
        return dist.Normal(inner.loc.detach(), inner.scale.detach()).to_event(n)
    if isinstance(inner, td.LowRankMultivariateNormal):
        return dist.LowRankMultivariateNormal(inner.loc.detach(), inner.cov_factor.detach(), inner.cov_diag.detach())
    if isinstance(inner, td.MultivariateNormal):
        return dist.MultivariateNormal(inner.loc.detach(), scale_tril=inner.scale_tril.detach())
    if isinstance(inner, dist.MixtureOfDiagNormals):
        return dist.MixtureOfDiagNormals(
            inner.locs.detach(), inner.coord_scale.detach(), inner.component_logits.detach()
        )
    return d


def mutual_information(
    q_or_guide: Any,
    spec: PermutationSpec | None = None,
    method: str = "auto",
    num_samples: int = 1000,
    num_permutations: int = 16,
    *,
    layout: FlatLayout | None = None,
    beta: float = 1.0,
    batch_size: int = 256,
    generator: torch.Generator | None = None,
    max_order: int = MAX_EXACT_ORDER,
) -> MIEstimate:
    """Estimate ``I(g; w) = E_{w~q}[log q(w) - log q_sym(w)]`` with its standard error.

    Parameters
    ----------
    q_or_guide : guide or distribution
        Anything :func:`base_of` accepts (fitted guides, mappings of Normals, a
        flat distribution with ``layout``, a :class:`~pyro_symmetry.Symmetrized`).
    spec : PermutationSpec, optional
        Defaults to the guide's/distribution's own spec.
    method : {"exact", "permanent", "contrastive", "importance", "auto"}
        ``"auto"``: exact enumeration if ``|G| <= 10^4``, else the permanent if
        the groups are decoupled (one hidden layer), ``q`` is mean-field and the
        widths are at most 20, else ``"importance"``.
    num_samples : int
        Draws ``w ~ q`` (the Monte Carlo over ``w``).
    num_permutations : int
        ``K`` for the bounds (identity included).
    layout, beta, batch_size, generator, max_order
        Flat layout; proposal inverse temperature; draws evaluated at once; RNG of
        the group elements (the draws of ``w`` use torch's global RNG);
        enumeration limit.

    Returns
    -------
    MIEstimate
        ``value`` (nats), ``stderr``, resolved ``method``, ...

    Examples
    --------
    >>> est = ps.mutual_information(guide, method="importance", num_permutations=16)
    >>> print(f"I = {est.value:.2f} +- {est.stderr:.2f} (log|G| = {est.log_order:.1f})")
    """
    if isinstance(num_samples, bool) or not isinstance(num_samples, int) or num_samples < 2:
        raise ValueError(f"num_samples must be an int >= 2, got {num_samples!r}")
    base = base_of(q_or_guide, spec, layout)
    m = resolve_method(base, method)
    K = _check_k(num_permutations) if m in ("contrastive", "importance") else None
    if m == "importance":
        # The proposal holds K (n x 2n) score matrices per draw: bound the batch's memory.
        n = max(base.spec.sizes.values())
        batch_size = max(1, min(batch_size, (1 << 24) // (K * n * 2 * n)))
    terms = []
    with torch.no_grad():
        for start in range(0, num_samples, batch_size):
            n = min(batch_size, num_samples - start)
            w = base.sample(torch.Size([n]))
            r = symmetry_log_ratio(base, None, w, m, K or 1, beta=beta, generator=generator, max_order=max_order)
            terms.append(-r.double())
    t = torch.cat(terms)
    return MIEstimate(
        value=float(t.mean()),
        stderr=float(t.std() / math.sqrt(t.numel())),
        method=m,
        num_samples=num_samples,
        num_permutations=K,
        log_order=base.spec.log_order,
    )
