"""The symmetrized (permutation-invariant) posterior ``q_sym = (1/|G|) sum_g g#q``."""

from __future__ import annotations

import warnings
from collections.abc import Mapping
from typing import Any

import torch
import torch.distributions as td
from pyro.distributions import TorchDistribution
from torch.distributions import constraints

from .._shapes import broadcast_shapes
from .._validation import check_int, check_real
from ..estimators import BaseDensity
from ..estimators.exact import MAX_EXACT_ORDER
from ..estimators.information import (
    AUTO_EVAL_PERMANENT_WIDTH,
    METHODS,
    MIEstimate,
    mutual_information,
    resolve_method,
    symmetry_log_ratio,
)
from ..groups import FlatLayout, PermutationSpec, SpecError

__all__ = ["Symmetrized"]

#: The default of the deprecated ``num_samples`` alias: not given (``None`` is a bad value).
_UNSET: Any = object()


class Symmetrized(TorchDistribution):
    r"""The uniform mixture of all push-forwards of ``q`` under a symmetry group.

    .. math::

        q_{sym}(w) = \frac{1}{|G|} \sum_{g \in G} q(g^{-1} w)

    Sampling draws ``w ~ q`` and an independent uniform ``g`` per draw and returns
    ``g . w``. :meth:`log_prob` evaluates ``log q(w) + log S(w) - log|G|`` with the
    chosen estimator of ``log S(w) = log sum_g q(g^{-1} w) / q(w)``:

    - ``"exact"``: enumeration of ``G`` (refused above ``max_order``, default 10^5);
    - ``"permanent"``: exact, for decoupled groups (one hidden layer) and a
      mean-field Normal ``q``, by Glynn's formula on a scaled matrix (with an exact
      subset dynamic program as fallback; widths up to 25, about 0.3 s of CPU per
      point at width 25);
    - ``"contrastive"``: Gelberg et al.'s K-sample estimate (uniform ``g_j``);
    - ``"importance"``: K-sample estimate with an equivariant Plackett-Luce proposal;
    - ``"auto"``: exact enumeration when ``|G| <= 10^4``, else the permanent (one hidden
      layer, mean-field ``q``, widths up to 25), else ``"importance"``.

    The stochastic estimators are tuned to draws of ``q``: at a point far from ``q``
    (a draw of another posterior, a point on a path between modes) they can be many nats
    off, so ``"auto"`` uses the exact permanent wherever it applies.

    The stochastic estimators keep the identity among their K terms, as training
    needs: for ``w ~ q`` their expectation upper-bounds ``E log q_sym(w)`` (a lower
    bound on ``I(g; w)``); they are consistent as ``K`` grows for any ``w``. Only the
    exact methods give a ``log_prob`` that is exactly invariant, ``log_prob(g . w) ==
    log_prob(w)``.

    Parameters
    ----------
    base : Distribution or mapping ``site -> Distribution``
        ``q``: one distribution over the flat latent vector (with ``layout``), e.g.
        ``Normal(loc, scale).to_event(1)`` or ``MixtureOfDiagNormals``, or one
        distribution per site whose event shape is the site's shape.
    spec : PermutationSpec
    estimator : {"auto", "exact", "permanent", "contrastive", "importance"}
    num_permutations : int
        ``K``, the number of group elements of the stochastic estimators (identity
        included).
    layout : FlatLayout, optional
        Required for a flat ``base``.
    beta : float
        Inverse temperature of the importance proposal (``>= 0``).
    max_order : int
        Enumeration limit of ``"exact"``.
    num_samples : int, optional
        Deprecated alias of ``num_permutations`` (warns).

    Raises
    ------
    ValueError, TypeError
        Unknown ``estimator``, ``num_permutations < 1`` or not an int, NaN/Inf or
        non-positive scales in ``base`` (naming the site).
    SpecError
        ``base`` not matching ``spec`` (naming the site and shapes), or a group too
        large for ``"exact"`` (``|G| > max_order``) or ``"permanent"``, at construction.

    Notes
    -----
    In the site-mapping form values are dicts ``site -> tensor`` and
    ``event_shape`` is ``()`` (as for :class:`~pyro_symmetry.Pushforward`); sites of
    ``base`` the spec does not touch are sampled and scored as in ``q``. A mixture
    base with ``C`` components gives a symmetrized posterior with ``C |G|``
    components and the same identities.

    Memory: :meth:`log_prob` on a batch of ``B`` draws evaluates ``q`` at ``K x B``
    permuted copies (the whole group for ``"exact"``); they are formed a chunk at a time
    (:data:`~pyro_symmetry.estimators._base.CHUNK_BYTES`, 256 MB), so peak memory does not
    grow with ``K`` or ``B`` (784-128-10 MLP, 256 draws: 0.6-0.7 GB peak at K = 16 and 64, where
    all copies at once took 5 and 20 GB; ``docs/benchmarks/estimators.md``).

    References
    ----------
    Gelberg, van der Ouderaa, van der Wilk, Gal (2024), Variational inference
    failures under model symmetries: permutation invariant posteriors for Bayesian
    neural networks, PMLR 251.

    Examples
    --------
    >>> q = {k: dist.Normal(loc[k], scale[k]).to_event(loc[k].dim()) for k in loc}
    >>> q_sym = ps.Symmetrized(q, model.spec, estimator="permanent")
    >>> w = q_sym.sample((100,))                    # dict site -> (100, *shape)
    >>> q_sym.log_prob(w)                           # (100,)
    """

    arg_constraints: dict = {}

    def __init__(
        self,
        base: td.Distribution | Mapping[str, td.Distribution],
        spec: PermutationSpec,
        estimator: str = "auto",
        num_permutations: int = 16,
        *,
        layout: FlatLayout | None = None,
        beta: float = 1.0,
        max_order: int = MAX_EXACT_ORDER,
        validate_args: bool | None = None,
        num_samples: Any = _UNSET,
    ) -> None:
        if not isinstance(estimator, str) or estimator not in METHODS:
            raise ValueError(f"estimator must be one of {METHODS}, got {estimator!r}")
        if num_samples is not _UNSET:
            warnings.warn(
                "Symmetrized(num_samples=...) is deprecated and will be removed; use num_permutations= "
                "(num_samples means draws of w elsewhere in the API)",
                DeprecationWarning,
                stacklevel=3,  # the caller, above pyro's distribution metaclass
            )
            if num_permutations != 16:
                raise TypeError("pass num_permutations= only (num_samples= is its deprecated alias), not both")
            num_permutations = check_int("num_samples (K)", num_samples, minimum=1)
        num_permutations = check_int("num_permutations (K)", num_permutations, minimum=1)
        beta = check_real("beta", beta, nonnegative=True)
        max_order = check_int("max_order", max_order, minimum=1)
        self._base = BaseDensity(base, spec, layout)
        self.base, self.spec, self.layout = base, self._base.spec, layout
        self.estimator = resolve_method(self._base, estimator, max_order, AUTO_EVAL_PERMANENT_WIDTH)
        self._requested = estimator
        self.num_permutations, self.beta, self.max_order = num_permutations, beta, max_order
        if self._base.is_flat:
            batch, event = base.batch_shape, base.event_shape
        else:
            try:
                batch = broadcast_shapes(*(d.batch_shape for d in base.values()))
            except RuntimeError:
                raise SpecError("the sites of base have batch shapes that do not broadcast") from None
            event = torch.Size()
        super().__init__(batch, event, validate_args=validate_args)

    @property
    def has_rsample(self) -> bool:  # type: ignore[override]
        return self._base.has_rsample

    @property
    def support(self) -> constraints.Constraint:  # type: ignore[override]
        return self.base.support if self._base.is_flat else constraints.real

    def _draw(self, sample_shape: torch.Size, reparam: bool) -> Any:
        w = self._base.sample(sample_shape, reparam)
        batch = self._base.batch_shape_of(w)
        ref = self._base.reference(w)
        perm = self.spec.sample(batch, device=ref.device)
        moved = self._base.act(w, perm)
        if self._base.is_flat:
            return moved
        return {**w, **moved}

    def rsample(self, sample_shape: torch.Size = torch.Size()) -> Any:
        return self._draw(torch.Size(sample_shape), True)

    def sample(self, sample_shape: torch.Size = torch.Size()) -> Any:
        with torch.no_grad():
            return self._draw(torch.Size(sample_shape), False)

    def log_prob(self, value: Any) -> torch.Tensor:
        """``log q_sym(value)`` by the chosen estimator, shape ``(*batch)``."""
        ratio = symmetry_log_ratio(
            self._base, None, value, self.estimator, self.num_permutations, beta=self.beta, max_order=self.max_order
        )
        return self._base.log_prob(value) + ratio

    def log_s(self, value: Any) -> torch.Tensor:
        """``log S(value) = log sum_g q(g^{-1} w) / q(w)`` by the chosen estimator."""
        ratio = symmetry_log_ratio(
            self._base, None, value, self.estimator, self.num_permutations, beta=self.beta, max_order=self.max_order
        )
        return ratio + self.spec.log_order

    def symmetry_base(self) -> BaseDensity:
        """The base ``q`` with the spec (and layout), as the estimators take it."""
        return self._base

    def mutual_information(self, num_samples: int = 1000, **kwargs: Any) -> MIEstimate:
        """``I(g; w)`` of the base (see :func:`~pyro_symmetry.mutual_information`), by the
        estimator this distribution was given (``"auto"`` resolved by
        :func:`~pyro_symmetry.mutual_information`'s own rule: its points are draws of ``q``)."""
        if "method" not in kwargs:
            kwargs.setdefault("estimator", self._requested)
        kwargs.setdefault("num_permutations", self.num_permutations)
        kwargs.setdefault("beta", self.beta)
        return mutual_information(self._base, num_samples=num_samples, **kwargs)

    @property
    def num_samples(self) -> int:
        """Deprecated: the former name of :attr:`num_permutations` (warns)."""
        warnings.warn("Symmetrized.num_samples is deprecated; use num_permutations", DeprecationWarning, stacklevel=2)
        return self.num_permutations

    def __repr__(self) -> str:
        groups = ", ".join(f"{g}: {n}" for g, n in self.spec.sizes.items())
        return (
            f"Symmetrized(groups {{{groups}}}, estimator={self.estimator!r}, num_permutations={self.num_permutations})"
        )
