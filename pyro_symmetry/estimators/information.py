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

import contextlib
import math
import time
import warnings
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributions as td
from tqdm.auto import tqdm

from .._state import isolated
from .._validation import check_int, check_real, check_seed
from ..groups import FlatLayout, PermutationSpec, SpecError
from ._base import BaseDensity, as_base, detach_distribution
from .contrastive import contrastive_log_ratio
from .exact import MAX_EXACT_ORDER, exact_log_ratio
from .importance import importance_log_ratio
from .permanent import MAX_PERMANENT_WIDTH, check_decoupled, permanent_log_ratio

__all__ = [
    "ESTIMATORS",
    "METHODS",
    "MIEstimate",
    "base_of",
    "estimate_log_ratio",
    "log_q_sym",
    "log_s",
    "mutual_information",
    "resolve_method",
    "symmetry_log_ratio",
]

ESTIMATORS = ("exact", "permanent", "contrastive", "importance", "auto")
#: The former name of :data:`ESTIMATORS`.
METHODS = ESTIMATORS
#: ``progress=None`` shows a bar once an estimate has run this long (s) ...
PROGRESS_AFTER = 2.0
#: ... and is projected to take longer than this in all (s).
PROGRESS_LONGER_THAN = 10.0
#: ``"auto"`` enumerates G up to this order, then tries the permanent up to this width
#: where the points are draws of ``q`` (:func:`mutual_information`, the guides' training
#: path): there the importance bound is close (within 7-8% of ``I`` at widths 12-16,
#: ``docs/benchmarks/guides.md``) and costs far less than a permanent (about 0.3 s of CPU
#: per draw at width 25, ``docs/benchmarks/estimators.md``).
AUTO_EXACT_ORDER = 10_000
AUTO_PERMANENT_WIDTH = 20
#: ``"auto"`` for a density evaluated at given points (:class:`~pyro_symmetry.Symmetrized`,
#: :func:`symmetry_log_ratio`, :func:`log_q_sym`, :func:`log_s`) uses the permanent up to its
#: width limit: at a point far from ``q`` the importance estimate can be many nats off
#: (its proposal is tuned to draws of ``q``), while the permanent is exact at any point.
AUTO_EVAL_PERMANENT_WIDTH = MAX_PERMANENT_WIDTH


@dataclass(frozen=True, repr=False)
class MIEstimate:
    """A Monte Carlo estimate of ``I(g; w)`` (a frozen dataclass).

    Attributes
    ----------
    value : float
        The estimate in nats; the exact estimators are unbiased, the bounds are lower bounds.
    stderr : float
        Monte Carlo standard error over the ``num_samples`` draws of ``w`` (and of the
        contrastive/proposal elements).
    estimator : str
        The estimator used (``"auto"`` resolved).
    num_samples : int
        Draws of ``w ~ q``.
    num_permutations : int or None
        ``K`` for the bounds, ``None`` for the exact estimators.
    log_order : float
        ``log|G|``, the largest possible value.
    """

    value: float
    stderr: float
    estimator: str
    num_samples: int
    num_permutations: int | None
    log_order: float

    @property
    def method(self) -> str:
        """Deprecated: the former name of :attr:`estimator` (warns)."""
        warnings.warn("MIEstimate.method is deprecated; use MIEstimate.estimator", DeprecationWarning, stacklevel=2)
        return self.estimator

    def __repr__(self) -> str:
        k = "" if self.num_permutations is None else f", K={self.num_permutations}"
        return (
            f"MIEstimate({self.value:.4g} +- {self.stderr:.2g} nats, estimator={self.estimator!r}, "
            f"num_samples={self.num_samples}{k}, log|G|={self.log_order:.4g})"
        )


def estimator_argument(estimator: Any, method: Any, default: str = "auto", where: str = "this function") -> Any:
    """The estimator name given as ``estimator=`` or as the deprecated ``method=``.

    ``method`` (not ``None``) warns (:class:`DeprecationWarning`) and stands for ``estimator``;
    both given is a :class:`TypeError`.
    """
    if method is None:
        return estimator
    warnings.warn(
        f"{where}: method= is deprecated and will be removed; use estimator= (the same names)",
        DeprecationWarning,
        stacklevel=3,
    )
    if estimator != default:
        raise TypeError(f"{where}: pass estimator= only (method= is its deprecated alias), not both")
    return method


def resolve_method(
    base: BaseDensity,
    method: str,
    max_order: int = MAX_EXACT_ORDER,
    permanent_width: int = AUTO_PERMANENT_WIDTH,
) -> str:
    """The method to use, checked against ``q`` and the spec.

    ``"auto"`` stands for exact enumeration if ``|G| <= 10^4``, else the permanent
    (decoupled groups, mean-field ``q``, widths <= ``permanent_width``: 20 by default,
    :data:`AUTO_EVAL_PERMANENT_WIDTH` = 25 where the density is evaluated at given points),
    else ``"importance"``. An explicit ``"exact"`` is refused
    (:class:`~pyro_symmetry.SpecError`) when ``|G|`` exceeds ``max_order``, and
    ``"permanent"`` when the groups are coupled, ``q`` is not mean-field or a group is
    wider than 25 (``MAX_PERMANENT_WIDTH``), before any work is done.
    """
    if not isinstance(method, str) or method not in METHODS:
        raise ValueError(f"method must be one of {METHODS}, got {method!r}")
    if method == "exact":
        if base.spec.order > max_order:
            raise SpecError(
                f"method='exact' enumerates |G| = {base.spec.order:.4g} elements (log|G| = {base.spec.log_order:.1f}), "
                f"more than max_order={max_order}; use 'permanent' (one hidden layer) or a bound "
                "('importance', 'contrastive')"
            )
        return method
    if method == "permanent":
        check_decoupled(base)
        return method
    if method != "auto":
        return method
    if base.spec.order <= min(AUTO_EXACT_ORDER, max_order):
        return "exact"
    if max(base.spec.sizes.values()) <= min(permanent_width, MAX_PERMANENT_WIDTH):
        try:
            check_decoupled(base)
            return "permanent"
        except SpecError:
            pass
    return "importance"


def _check_k(num_permutations: Any, name: str = "num_permutations") -> int:
    return check_int(name, num_permutations, minimum=1)


def _seeded(seed: Any, generator: Any) -> torch.Generator | None:
    """``generator``, or a private CPU generator seeded with ``seed`` (not both)."""
    seed = check_seed("seed", seed)
    if seed is None:
        return generator
    if generator is not None:
        raise ValueError("give seed= or generator=, not both")
    return torch.Generator().manual_seed(seed)


def _check_options(beta: Any, generator: Any, max_order: Any) -> float:
    if generator is not None and not isinstance(generator, torch.Generator):
        raise TypeError(f"generator must be a torch.Generator, got {type(generator).__name__}")
    check_int("max_order", max_order, minimum=1)
    return check_real("beta", beta, nonnegative=True)


def estimate_log_ratio(
    base: BaseDensity,
    value: Any,
    method: str,
    num_permutations: int,
    beta: float = 1.0,
    generator: torch.Generator | None = None,
    max_order: int = MAX_EXACT_ORDER,
    progress: Callable[[int], Any] | None = None,
) -> torch.Tensor:
    """:func:`symmetry_log_ratio` for a checked ``base``, resolved ``method`` and options
    and a value drawn from ``q`` (no NaN check): the guides' training path.
    ``progress`` is called with the number of draws finished (per chunk for
    ``"importance"``, else once)."""
    if method == "importance":
        return importance_log_ratio(base, value, num_permutations, beta, generator, progress)
    if method == "exact":
        out = exact_log_ratio(base, value, max_order)
    elif method == "permanent":
        out = permanent_log_ratio(base, value)
    else:
        out = contrastive_log_ratio(base, value, num_permutations, generator)
    if progress is not None:
        progress(max(1, out.numel()))
    return out


class _Progress:
    """A tqdm bar over the draws of an estimate: always (``True``), never (``False``), or
    (``None``) from the moment the estimate has run :data:`PROGRESS_AFTER` seconds and
    is projected to take more than :data:`PROGRESS_LONGER_THAN` seconds in all."""

    def __init__(self, total: int, mode: bool | None, desc: str) -> None:
        self.total, self.mode, self.desc, self.done = total, mode, desc, 0
        self.start = time.perf_counter()
        self.bar = tqdm(total=total, desc=desc, unit="draw", leave=False) if mode else None

    def __call__(self, count: int) -> None:
        self.done += count
        if self.bar is not None:
            self.bar.update(count)
        elif self.mode is None and self.done < self.total:
            elapsed = time.perf_counter() - self.start
            if elapsed > PROGRESS_AFTER and elapsed * self.total / self.done > PROGRESS_LONGER_THAN:
                self.bar = tqdm(total=self.total, initial=self.done, desc=self.desc, unit="draw", leave=False)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


def symmetry_log_ratio(
    q: Any,
    spec: PermutationSpec | None,
    value: Any,
    estimator: str = "auto",
    num_permutations: int = 16,
    *,
    layout: FlatLayout | None = None,
    beta: float = 1.0,
    generator: torch.Generator | None = None,
    max_order: int = MAX_EXACT_ORDER,
    method: str | None = None,
    seed: int | None = None,
) -> torch.Tensor:
    """``log q_sym(w) - log q(w) = log S(w) - log|G|`` (what a symmetrized guide adds).

    Parameters
    ----------
    q : mapping ``site -> Distribution | (loc, scale)``, flat Distribution (with
        ``layout``), or a :class:`~pyro_symmetry.estimators.BaseDensity`
    spec : PermutationSpec
    value : dict ``site -> (*batch, *shape)`` or flat ``(*batch, D)``
        In ``q``'s dtype and on its device.
    estimator : {"exact", "permanent", "contrastive", "importance", "auto"}
        ``"auto"``: exact enumeration if ``|G| <= 10^4``, else the permanent (one hidden
        layer, mean-field ``q``, widths up to 25: exact at any point, about 0.3 s of CPU
        per point at width 25), else ``"importance"``. The bounds are tuned to draws
        of ``q``: at a point far from ``q`` they can be many nats off.
    num_permutations : int
        ``K`` (bounds only), identity included.
    layout, beta, generator, max_order
        Flat layout; Plackett-Luce inverse temperature (``>= 0``); RNG for the group
        elements; enumeration limit of ``"exact"``.
    method : str, optional
        Deprecated alias of ``estimator`` (warns).
    seed : int, optional
        Seeds a private generator of the group elements (the bounds are then
        reproducible; torch's global RNG is not used nor changed). Not together with
        ``generator``.

    Returns
    -------
    Tensor ``(*batch,)``, differentiable (pathwise) in ``value`` and ``q``.
    Exact for ``"exact"``/``"permanent"``; for the bounds, a random estimate whose
    expectation over ``w ~ q`` upper-bounds ``E log q_sym(w) - E log q(w)``.

    Raises
    ------
    ValueError
        Unknown ``method``, ``num_permutations < 1``, NaN/Inf in ``q`` or ``value``
        (naming the site).
    SpecError
        A value that does not match the spec (naming the site and shape), or a group
        too large for ``"exact"``/``"permanent"``.
    TypeError
        A non-integer ``num_permutations``, a value in another dtype than ``q``.
    """
    estimator = estimator_argument(estimator, method, where="symmetry_log_ratio")
    generator = _seeded(seed, generator)
    beta = _check_options(beta, generator, max_order)
    base = as_base(q, spec, layout) if not isinstance(q, BaseDensity) else q
    m = resolve_method(base, estimator, max_order, AUTO_EVAL_PERMANENT_WIDTH)
    K = _check_k(num_permutations) if m in ("contrastive", "importance") else 1
    base.batch_shape_of(value)  # sites, shapes, dtypes and devices, named on failure
    base.check_value(value)
    return estimate_log_ratio(base, value, m, K, beta, generator, max_order)


def log_s(q: Any, spec: PermutationSpec | None, value: Any, estimator: str = "auto", **kwargs: Any) -> torch.Tensor:
    """``log S(w) = log sum_g q(g^{-1} w) - log q(w)`` (``>= 0``); see :func:`symmetry_log_ratio`."""
    base = as_base(q, spec, kwargs.pop("layout", None)) if not isinstance(q, BaseDensity) else q
    return symmetry_log_ratio(base, None, value, estimator, **kwargs) + base.spec.log_order


def log_q_sym(q: Any, spec: PermutationSpec | None, value: Any, estimator: str = "auto", **kwargs: Any) -> torch.Tensor:
    """``log q_sym(w) = log (1/|G|) sum_g q(g^{-1} w)``; see :func:`symmetry_log_ratio`."""
    base = as_base(q, spec, kwargs.pop("layout", None)) if not isinstance(q, BaseDensity) else q
    ratio = symmetry_log_ratio(base, None, value, estimator, **kwargs)
    return base.log_prob(value) + ratio


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
        with torch.no_grad():
            base = q_or_guide.symmetry_base()
        base = BaseDensity(
            detach_distribution(base.flat)
            if base.is_flat
            else {k: detach_distribution(d) for k, d in base.dists.items()},
            base.spec if spec is None else spec,
            base.layout,
        )
        return base
    if spec is None:
        spec = getattr(q_or_guide, "spec", None)
    if spec is None:
        raise SpecError(f"no spec given and {type(q_or_guide).__name__} carries none: pass spec=")
    if isinstance(q_or_guide, torch.nn.Module) and hasattr(q_or_guide, "prototype_trace"):
        from ..posteriors import as_posterior  # posteriors imports the estimators: import here

        if q_or_guide.prototype_trace is None:
            raise SpecError(f"{type(q_or_guide).__name__} is not fitted: run an SVI step (or call it once) first")
        post = as_posterior(q_or_guide)  # detached parameters
        if post.flat is not None:  # AutoContinuous: q over the flat latent vector, covariance kept
            return BaseDensity(post.flat, spec, post.layout)
        if post.is_point:
            raise SpecError(
                f"{type(q_or_guide).__name__} is a point estimate: I(g; w) and log q_sym need a density q "
                "(a Gaussian posterior: loc and scale)"
            )
        loc, scale = post.gaussian()
        return BaseDensity({k: (loc[k], scale[k]) for k in loc}, spec)
    if isinstance(q_or_guide, td.Distribution):
        return BaseDensity(q_or_guide, spec, layout)
    if isinstance(q_or_guide, Mapping):
        return BaseDensity(q_or_guide, spec)
    raise TypeError(f"cannot read a posterior q from a {type(q_or_guide).__name__}")


def mutual_information(
    q_or_guide: Any,
    spec: PermutationSpec | None = None,
    estimator: str = "auto",
    num_samples: int = 1000,
    num_permutations: int = 16,
    *,
    layout: FlatLayout | None = None,
    beta: float = 1.0,
    batch_size: int = 256,
    generator: torch.Generator | None = None,
    max_order: int = MAX_EXACT_ORDER,
    progress: bool | None = None,
    method: str | None = None,
    seed: int | None = None,
) -> MIEstimate:
    """Estimate ``I(g; w) = E_{w~q}[log q(w) - log q_sym(w)]`` with its standard error.

    Parameters
    ----------
    q_or_guide : guide or distribution
        Anything :func:`base_of` accepts (fitted guides, mappings of Normals, a
        flat distribution with ``layout``, a :class:`~pyro_symmetry.Symmetrized`).
    spec : PermutationSpec, optional
        Defaults to the guide's/distribution's own spec.
    estimator : {"exact", "permanent", "contrastive", "importance", "auto"}
        ``"auto"``: exact enumeration if ``|G| <= 10^4``, else the permanent if
        the groups are decoupled (one hidden layer), ``q`` is mean-field and the
        widths are at most 20, else ``"importance"``. For a symmetrized guide this
        is independent of the estimator it trains with (a measurement wants the
        tightest affordable estimate, not the training bound): pass
        ``estimator=guide.estimator, num_permutations=guide.num_permutations`` for that.
    num_samples : int
        Draws ``w ~ q`` (the Monte Carlo over ``w``; not group elements).
    num_permutations : int
        ``K``, the group elements per draw of the bounds (identity included).
    layout, beta, batch_size, generator, max_order
        Flat layout; proposal inverse temperature (``>= 0``); draws of ``w`` taken
        at once (the estimators then work through the elements and draws of a batch
        in chunks of bounded memory, see
        :data:`~pyro_symmetry.estimators._base.CHUNK_BYTES`, so peak memory does not
        grow with ``num_permutations``); RNG of the group elements and, through a forked
        copy of torch's RNG seeded from it, of the draws of ``w`` (so ``generator`` alone
        makes the estimate reproducible and torch's global RNG is left as found; with
        neither ``generator`` nor ``seed`` the draws use torch's global RNG); enumeration
        limit.
    progress : bool or None
        A tqdm progress bar over the draws (on stderr). ``None`` (default): shown only
        for a long estimate, from the moment it has run 2 s and is projected to take
        more than 10 s in all (e.g. ``"importance"`` on a layer of width 1000, about
        0.34 s of CPU per draw at K = 16, docs/benchmarks/estimators.md); ``True``/``False``: always/never.

    method : str, optional
        Deprecated alias of ``estimator`` (warns).
    seed : int, optional
        Seeds the whole estimate: the draws of ``w`` (from a forked copy of torch's RNG,
        so the caller's RNG state is left as found) and a private generator of the group
        elements. Not together with ``generator``.

    Returns
    -------
    MIEstimate
        ``value`` (nats), ``stderr``, resolved ``estimator``, ...

    Raises
    ------
    ValueError, TypeError
        Bad counts or options (naming the argument), NaN/Inf parameters (naming the site).
    SpecError
        An unfitted guide, a spec that does not match ``q``, a group too large for
        ``"exact"``/``"permanent"``.

    Examples
    --------
    >>> est = ps.mutual_information(guide, estimator="importance", num_permutations=16)
    >>> print(f"I = {est.value:.2f} +- {est.stderr:.2f} (log|G| = {est.log_order:.1f})")
    """
    estimator = estimator_argument(estimator, method, where="mutual_information")
    generator = _seeded(seed, generator)
    check_int("num_samples", num_samples, minimum=2)
    check_int("batch_size", batch_size, minimum=1)
    if progress is not None and not isinstance(progress, bool):
        raise TypeError(f"progress must be True, False or None, got {type(progress).__name__}")
    beta = _check_options(beta, generator, max_order)
    base = base_of(q_or_guide, spec, layout)
    m = resolve_method(base, estimator, max_order)
    K = _check_k(num_permutations) if m in ("contrastive", "importance") else None
    draws_seed = seed
    if draws_seed is None and generator is not None:  # the draws of w follow the generator too
        draws_seed = int(torch.randint(2**62, (1,), generator=generator, device=generator.device))
    terms = []
    bar = _Progress(num_samples, progress, f"I(g; w), {m}")
    rng = contextlib.nullcontext() if draws_seed is None else isolated(param_store=False)
    try:
        with rng, torch.no_grad():
            if draws_seed is not None:
                torch.manual_seed(draws_seed)  # the draws of w, in the forked RNG
            for start in range(0, num_samples, batch_size):
                n = min(batch_size, num_samples - start)
                w = base.sample(torch.Size([n]))
                r = estimate_log_ratio(base, w, m, K or 1, beta, generator, max_order, bar)
                terms.append(-r.double())
    finally:
        bar.close()
    t = torch.cat(terms)
    return MIEstimate(
        value=float(t.mean()),
        stderr=float(t.std() / math.sqrt(t.numel())),
        estimator=m,
        num_samples=num_samples,
        num_permutations=K,
        log_order=base.spec.log_order,
    )
