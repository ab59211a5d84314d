"""Push-forward ``g#q`` of a distribution (or a fitted guide) under a group element.

The action of a (signed) permutation is volume preserving, so the density of the
push-forward is ``(g#q)(v) = q(g^{-1} v)`` (Rossi, Singh, Hannagan, NeurIPS 2023).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import pyro
import pyro.distributions as dist
import torch
import torch.distributions as td
from pyro.distributions import TorchDistribution
from pyro.poutine.messenger import Messenger
from torch.distributions import constraints

from .._shapes import broadcast_shapes
from .._validation import check_spec
from ..groups import FlatLayout, GroupElement, PermutationSpec, SpecError, apply_flat, flat_permutation
from ..groups.builders import own_batch_ndim
from ..posteriors import as_posterior

__all__ = ["Pushforward", "PushforwardGuide", "pushforward_guide"]


def _unwrap_independent(d: td.Distribution) -> tuple[td.Distribution, int]:
    n = 0
    while isinstance(d, td.Independent):
        n += d.reinterpreted_batch_ndims
        d = d.base_dist
    return d, n


class Pushforward(TorchDistribution):
    """The push-forward ``g#q`` of ``q`` under a group element ``g``.

    Parameters
    ----------
    base : posterior density in any form :func:`~pyro_symmetry.as_posterior` reads
        One distribution over the flat latent vector (event shape ``(D,)``, e.g. the
        posterior of an ``AutoDiagonalNormal``; then ``layout`` says which sites the
        coordinates are), one distribution per site whose event shape is the site's
        shape (e.g. ``Normal(loc, scale).to_event(2)``), a ``site -> (loc, scale)``
        mapping, a fitted guide (its ``q``, live parameters) or a point.
    spec : PermutationSpec
    perm : mapping ``group -> LongTensor (*batch_g, n)``
        A (batched) group element; batch dims broadcast with the base's.
    layout : FlatLayout, optional
        Required for a flat base.

    Notes
    -----
    ``sample``/``rsample`` draw ``w ~ q`` and return ``g . w``;
    ``log_prob(v) = q.log_prob(g^{-1} . v)``. In the site-mapping form, values are
    dicts ``site -> tensor`` and ``event_shape`` is ``()``.
    :meth:`simplify` gives the closed form when there is one: for a (mean-field
    or low-rank or full-covariance) Normal base, a Normal with permuted (and
    sign-flipped) parameters.

    Examples
    --------
    >>> q = dist.Normal(loc, scale).to_event(1)            # flat, D = layout.dim
    >>> g = spec.sample()
    >>> pq = Pushforward(q, spec, g, layout=layout)
    >>> v = pq.rsample()
    >>> torch.allclose(pq.log_prob(v), q.log_prob(apply_flat(v, flat_permutation(spec, spec.inverse(g), layout))))
    """

    arg_constraints: dict = {}

    def __init__(
        self,
        base: td.Distribution | Mapping[str, td.Distribution],
        spec: PermutationSpec,
        perm: GroupElement,
        layout: FlatLayout | None = None,
        validate_args: bool | None = None,
    ) -> None:
        if not isinstance(spec, PermutationSpec):
            raise SpecError(f"spec must be a PermutationSpec, got {type(spec).__name__}")
        gbatch = spec.validate(perm)
        self.spec, self.perm = spec, dict(perm)
        # One reader for every form of q; the live parameters are kept (rsample differentiates).
        q = as_posterior(base, name="base", layout=layout, detach=False)
        if q.form == "draws":
            raise SpecError("base is a set of draws, not a density: move draws with spec.apply(draws, perm)")
        self.posterior = q
        if q.flat is not None:
            self.base, self.layout = q.flat, q.layout
            batch = _broadcast(gbatch, {"base": q.flat.batch_shape})
            self._index = flat_permutation(spec, perm, q.layout)
            self._inv_index = flat_permutation(spec, spec.inverse(perm), q.layout)
            super().__init__(batch, q.flat.event_shape, validate_args=validate_args)
            return
        self.base, self.layout = q.dists, layout
        missing = [s for s in spec.sites if s not in q.dists]
        if missing:
            raise SpecError(f"sites {missing} of the spec have no distribution in base (have {sorted(q.dists)})")
        batch = _broadcast(gbatch, {f"base[{k!r}]": d.batch_shape for k, d in q.dists.items()})
        self._inv = spec.inverse(perm)
        super().__init__(batch, torch.Size(), validate_args=validate_args)

    @property
    def flat(self) -> bool:
        return isinstance(self.base, td.Distribution)

    @property
    def has_rsample(self) -> bool:  # type: ignore[override]
        if self.flat:
            return self.base.has_rsample
        return all(d.has_rsample for d in self.base.values())

    @property
    def support(self) -> constraints.Constraint:  # type: ignore[override]
        return self.base.support if self.flat else constraints.real

    def _draw(self, sample_shape: torch.Size, reparam: bool) -> Any:
        # Independent draws for every batch entry of the perm: expand the base first.
        def draw(d: td.Distribution) -> torch.Tensor:
            d = d.expand(self.batch_shape) if d.batch_shape != self.batch_shape else d
            return d.rsample(sample_shape) if reparam else d.sample(sample_shape)

        if self.flat:
            return apply_flat(draw(self.base), self._index)
        return self.spec.apply({k: draw(d) for k, d in self.base.items()}, self.perm)

    def rsample(self, sample_shape: torch.Size = torch.Size()) -> Any:
        return self._draw(torch.Size(sample_shape), True)

    def sample(self, sample_shape: torch.Size = torch.Size()) -> Any:
        with torch.no_grad():
            return self._draw(torch.Size(sample_shape), False)

    def log_prob(self, value: Any) -> torch.Tensor:
        if self.flat:
            return self.base.log_prob(apply_flat(value, self._inv_index))
        if not isinstance(value, Mapping):
            raise SpecError("this push-forward is over a mapping of sites: log_prob needs a dict site -> tensor")
        missing = [k for k in self.base if k not in value]
        if missing:
            raise SpecError(f"sites {missing} of the push-forward are missing from the value (have {sorted(value)})")
        src = self.spec.apply(value, self._inv)
        return sum(d.log_prob(src[k]) for k, d in self.base.items())

    def simplify(self) -> td.Distribution | dict[str, td.Distribution] | Pushforward:
        """The closed form of ``g#q`` when the base is Normal; otherwise ``self``.

        Flat base: ``Normal``/``Independent(Normal)``, ``LowRankMultivariateNormal``,
        ``MultivariateNormal`` and ``MixtureOfDiagNormals`` map to the same family
        with permuted (and sign-flipped) parameters. Site mapping: each site's
        (Independent) Normal maps to a Normal with permuted ``loc``/``scale``.
        """
        if not self.flat:
            parts = {k: _unwrap_independent(d) for k, d in self.base.items()}
            if not all(isinstance(b, td.Normal) for b, _ in parts.values()):
                return self
            locs = self.spec.apply({k: b.loc.expand(b.batch_shape) for k, (b, _) in parts.items()}, self.perm)
            scales = self.spec.apply({k: b.scale.expand(b.batch_shape) for k, (b, _) in parts.items()}, self.perm)
            # Sign flips negate the mean only; standard deviations stay positive.
            return {k: dist.Normal(locs[k], scales[k].abs()).to_event(n) for k, (_, n) in parts.items()}
        base, n = _unwrap_independent(self.base)
        idx = self._index
        if isinstance(base, td.Normal) and n == 1:
            loc = apply_flat(base.loc.expand(base.batch_shape), idx)
            scale = apply_flat(base.scale.expand(base.batch_shape), idx).abs()
            return dist.Normal(loc, scale).to_event(1)
        if isinstance(base, td.LowRankMultivariateNormal):
            loc = apply_flat(base.loc, idx)
            factor = apply_flat(base.cov_factor.transpose(-1, -2), idx).transpose(-1, -2)
            return dist.LowRankMultivariateNormal(loc, factor, apply_flat(base.cov_diag, idx).abs())
        if isinstance(base, td.MultivariateNormal):
            loc = apply_flat(base.loc, idx)
            cov = apply_flat(apply_flat(base.covariance_matrix, idx).transpose(-1, -2), idx)
            return dist.MultivariateNormal(loc, covariance_matrix=cov)
        if isinstance(base, dist.MixtureOfDiagNormals):
            return dist.MixtureOfDiagNormals(
                apply_flat(base.locs, idx.unsqueeze(-2)),
                apply_flat(base.coord_scale, idx.unsqueeze(-2)).abs(),
                base.component_logits,
            )
        return self


def _broadcast(gbatch: torch.Size, shapes: Mapping[str, torch.Size]) -> torch.Size:
    """Broadcast the group element's batch shape with the base's, naming the culprit."""
    batch = gbatch
    for name, shape in shapes.items():
        try:
            batch = broadcast_shapes(batch, shape)
        except RuntimeError:
            raise SpecError(
                f"{name} has batch shape {tuple(shape)}, which does not broadcast with the group element's "
                f"batch shape {tuple(gbatch)}"
            ) from None
    return batch


def _is_model_site(msg: dict, sites: Sequence[str]) -> bool:
    return msg["type"] == "sample" and msg["name"] in sites and not msg["infer"].get("is_auxiliary", False)


class _Drawn(TorchDistribution):
    """A distribution whose draw is already made: ``value``, a draw of ``fn`` (moved by a
    group element after sampling). ``log_prob`` and the KL divergence are ``fn``'s."""

    arg_constraints: dict = {}

    def __init__(self, fn: td.Distribution, value: torch.Tensor) -> None:
        self.fn, self.value = fn, value
        super().__init__(fn.batch_shape, fn.event_shape, validate_args=False)

    @property
    def support(self) -> constraints.Constraint:  # type: ignore[override]
        return self.fn.support

    @property
    def has_rsample(self) -> bool:  # type: ignore[override]
        return self.fn.has_rsample

    def expand(self, batch_shape: torch.Size, _instance: Any = None) -> _Drawn:
        batch_shape = torch.Size(batch_shape)
        return _Drawn(self.fn.expand(batch_shape), self.value.expand(batch_shape + self.event_shape))

    def rsample(self, sample_shape: torch.Size = torch.Size()) -> torch.Tensor:
        if torch.Size(sample_shape):
            raise ValueError("a drawn site has one value: it cannot be sampled with a sample_shape")
        return self.value

    def sample(self, sample_shape: torch.Size = torch.Size()) -> torch.Tensor:
        return self.rsample(sample_shape).detach()

    def log_prob(self, value: torch.Tensor) -> torch.Tensor:
        return self.fn.log_prob(value)


@td.kl.register_kl(_Drawn, td.Distribution)
def _kl_drawn(p: _Drawn, q: td.Distribution) -> torch.Tensor:
    return td.kl_divergence(p.fn, q)


class MoveSites(Messenger):
    """Move the spec's sites of a guide by ``perm``, each at its own sample statement.

    The guide's own draw of a model site is kept under the name ``"{site}_unmoved"`` as
    an auxiliary site with its log-density masked out, so it still passes every outer
    handler (the plates of vectorized particles and ``Predictive(parallel=True)`` expand
    it), and the guide's code (a symmetry factor) sees the value it drew. Right after it,
    the model site is emitted with the moved value and the density ``q`` gave the draw:
    ``(g#q)(g.w) = q(w)``. A Normal stays a Normal with moved parameters, so
    ``TraceMeanField_ELBO`` still finds its analytic KL.

    ``perm=None``: one uniform element per draw (:meth:`PermutationSpec.sample`, torch's
    RNG), drawn at the first moved site with the batch dims of its value (vectorized
    particles, ``Predictive(parallel=True)`` samples) and used for all sites of that draw.
    """

    def __init__(self, spec: PermutationSpec, perm: GroupElement | None = None) -> None:
        super().__init__()
        self.spec, self.perm, self._emitting = spec, perm, False
        self.moved: dict[str, torch.Tensor] = {}

    def _process_message(self, msg: dict) -> None:
        if self._emitting or not _is_model_site(msg, self.spec.sites) or msg["is_observed"]:
            return
        name, infer, then = msg["name"], dict(msg["infer"]), msg["continuation"]
        msg["name"] = f"{name}_unmoved"
        msg["infer"] = {**infer, "is_auxiliary": True}
        msg["mask"] = False  # its density is the moved site's

        def emit(m: dict) -> None:  # after every handler is done with the draw
            if then is not None:
                then(m)
            self._emit(name, infer, m["fn"], m["value"])

        msg["continuation"] = emit

    def _emit(self, name: str, infer: dict, fn: td.Distribution, value: torch.Tensor) -> None:
        if self.perm is None:
            nd = len(self.spec.shapes[name])
            self.perm = self.spec.sample(value.shape[: value.dim() - nd], device=value.device)
        action = self.spec.action(name)
        moved = action.apply(value, self.perm)
        closed = _moved_normal(fn, action, self.perm)
        if closed is not None:
            site: td.Distribution = _Drawn(closed, moved)
        else:
            site = dist.Delta(moved, log_density=fn.log_prob(value), event_dim=fn.event_dim)
        self._emitting = True
        try:
            self.moved[name] = pyro.sample(name, site, infer=infer)
        finally:
            self._emitting = False


def _moved_normal(fn: td.Distribution, action: Any, perm: GroupElement) -> td.Distribution | None:
    """``g#N(loc, scale)`` of one site: ``N(g.loc, |g|.scale)``, or ``None`` if ``fn`` is
    not an (Independent) Normal."""
    base, n = _unwrap_independent(fn)
    if not isinstance(base, td.Normal):
        return None
    loc = action.apply(base.loc.expand(base.batch_shape), perm)
    scale = action.apply(base.scale.expand(base.batch_shape), perm, unsigned=True)
    moved = dist.Normal(loc, scale, validate_args=False)
    return moved.to_event(n) if n else moved


class PushforwardGuide:
    """A fitted guide ``q`` pushed forward by a group element: the guide of ``g#q``.

    Calling it runs ``q`` and emits each site the spec acts on moved by ``g`` (right
    after ``q`` draws it, so outer plates and the site order are kept), with the
    log-density it had in ``q``: ``(g#q)(g.w) = q(w)`` since the action preserves
    volume. The draw of ``q`` stays in the trace as an auxiliary site
    ``"{site}_unmoved"`` whose density is masked out. Auxiliary sites (AutoNormal, the
    AutoContinuous family) and the symmetry factor of a symmetrized guide are
    unchanged; a Normal placed at the model's site
    (:class:`~pyro_symmetry.AutoSymmetrizedMeanField`) stays a Normal, with permuted
    (and sign-flipped) parameters, so ``TraceMeanField_ELBO`` keeps its analytic KL. With
    a G-invariant model, ``ELBO(g#q) = ELBO(q)`` draw by draw on the same noise. It
    shares the parameters of ``q`` (nothing is copied), so it can be used with
    ``Predictive`` right away and reflects later training of ``q``.

    Parameters
    ----------
    guide : callable
        Any Pyro guide (AutoNormal, the AutoContinuous family, ...), called once.
    spec : PermutationSpec
    perm : GroupElement
        An unbatched group element.
    """

    def __init__(self, guide: Any, spec: PermutationSpec, perm: GroupElement) -> None:
        check_spec(spec)
        if not callable(guide):
            raise TypeError(f"guide must be a Pyro guide (a callable), got {type(guide).__name__}")
        spec.validate(perm)
        if any(p.dim() != 1 for p in perm.values()):
            raise SpecError("PushforwardGuide takes one (unbatched) group element")
        if getattr(guide, "prototype_trace", None) is None:
            raise SpecError(f"{type(guide).__name__} is not fitted: call it once (or run an SVI step) first")
        nodes = guide.prototype_trace.nodes
        shapes = {}
        for s in spec.sites:
            if s not in nodes or nodes[s]["type"] != "sample" or nodes[s]["is_observed"]:
                raise SpecError(f"site {s!r} of the spec is not a latent site of the guide's model")
            support = nodes[s]["fn"].support
            while isinstance(support, constraints.independent):
                support = support.base_constraint
            if support is not constraints.real:
                raise SpecError(f"site {s!r} has support {support}; only real-valued sites can be permuted")
            fn = nodes[s]["fn"]
            own = own_batch_ndim(nodes[s])
            shapes[s] = tuple(fn.batch_shape[len(fn.batch_shape) - own :]) + tuple(fn.event_shape)
        # A spec whose groups do not match the model's site shapes is rejected here, naming them.
        spec = spec.with_shapes({**(spec.shapes or {}), **shapes})
        self.guide, self.spec, self.perm = guide, spec, dict(perm)

    def __call__(self, *args: Any, **kwargs: Any) -> dict[str, torch.Tensor]:
        mover = MoveSites(self.spec, self.perm)
        with mover:
            values = self.guide(*args, **kwargs)
        return {**values, **mover.moved}

    def median(self, *args: Any, **kwargs: Any) -> dict[str, torch.Tensor]:
        return self.spec.apply(self.guide.median(*args, **kwargs), self.perm)

    def quantiles(
        self, quantiles: Sequence[float] | torch.Tensor, *args: Any, **kwargs: Any
    ) -> dict[str, torch.Tensor]:
        """Quantiles of ``g#q`` at the levels ``quantiles`` (a sequence or tensor of
        levels in ``(0, 1)``), ``site -> (len(quantiles), *shape)``.

        A coordinate that ``g`` moves without flipping is the source coordinate's
        quantile at the same level; one it flips, ``-X``, has its ``p``-quantile at
        ``-Q_X(1 - p)``, so the guide's quantiles at the levels ``1 - p`` are computed too
        (reversing the list of levels is only right for levels symmetric about 0.5).
        """
        if torch.is_tensor(quantiles):
            quantiles = quantiles.tolist()  # the guides build their own tensor of levels
        qs = self.guide.quantiles(quantiles, *args, **kwargs)
        qc = self.guide.quantiles([1 - float(p) for p in quantiles], *args, **kwargs)
        sites = self.spec.sites
        # The quantile axis leads and acts as a batch dim of ``apply``.
        direct = self.spec.apply({s: qs[s] for s in sites}, self.perm)
        reverse = self.spec.apply({s: qc[s] for s in sites}, self.perm)
        negated = self.spec.apply({s: torch.ones_like(qs[s][0]) for s in sites}, self.perm)
        out = dict(qs)
        for s in sites:
            out[s] = torch.where(negated[s] < 0, reverse[s], direct[s])
        return out


def pushforward_guide(guide: Any, spec: PermutationSpec, perm: GroupElement) -> PushforwardGuide:
    """The guide of ``g#q`` for a fitted guide ``q``; see :class:`PushforwardGuide`."""
    return PushforwardGuide(guide, spec, perm)
