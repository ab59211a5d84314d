"""The base posterior ``q`` over a network's weights, in the form every estimator uses.

``q`` is either one distribution per site (``site -> Distribution`` whose event shape
is the site's shape, or ``site -> (loc, scale)``: a mean-field Normal), or one
distribution over the flat latent vector of Pyro's ``AutoContinuous`` guides (with a
:class:`~pyro_symmetry.groups.FlatLayout`). Group elements always carry their
leading dims in front of the value's batch dims: ``perm[k]`` of shape
``(E, *batch, n)`` evaluates ``log q(perm . w)`` for ``E`` elements at once.

Memory: evaluating ``log q(g . w)`` for ``E`` elements and ``B`` draws would hold
``E * B`` permuted copies of the weights (gigabytes for a 784-128-10 MLP at K = 16 and
256 draws). :meth:`BaseDensity.log_prob_acted` and :meth:`BaseDensity.log_kernel`
therefore work through the ``E * B`` rows in chunks of about :data:`CHUNK_BYTES`; each
row's value is computed as it would be at once (same operations on the same numbers).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import pyro.distributions as dist
import torch
import torch.distributions as td
import torch.utils.checkpoint

from .._shapes import broadcast_shapes
from .._validation import check_finite, check_spec
from ..groups import FlatLayout, PermutationSpec, SpecError

__all__ = ["CHUNK_BYTES", "BaseDensity", "Marginals", "as_base", "detach_distribution", "safe_log_prob"]

Value = torch.Tensor | Mapping[str, torch.Tensor]

#: Bytes that one chunk of a batched evaluation may hold in permuted weight copies and
#: their temporaries (read at call time: tests make it small to exercise chunk boundaries).
#: Each temporary is then about 50 MB, above glibc's largest mmap threshold (32 MB), so it
#: is returned to the system when freed; with 128 MB chunks (26 MB temporaries) the heap
#: fragmented and the resident memory crept up by ~300 MB over a hundred chunks
#: (benchmarks/estimators_memory.py).
CHUNK_BYTES = 256 * 2**20


def _row_index(own: torch.Size, out: torch.Size, device: torch.device) -> torch.Tensor:
    """For each row of the flattened broadcast batch ``out``, the row of a tensor whose own
    batch shape is ``own`` (right-aligned broadcasting), shape ``(out.numel(),)``."""
    return torch.arange(own.numel(), device=device).reshape(own).expand(out).reshape(-1)


@dataclass(frozen=True)
class Marginals:
    """Per-coordinate Normal marginals of ``q`` on the spec's sites.

    ``loc[site]``/``scale[site]`` have shape ``(*site_shape)``, or ``(C, *site_shape)``
    for a C-component mixture whose component log-weights are ``log_weights`` ``(C,)``.
    ``exact`` says whether ``q`` *is* the product of these factors on the spec's sites
    (then the permanent is exact); otherwise they only score proposals.
    """

    loc: dict[str, torch.Tensor]
    scale: dict[str, torch.Tensor]
    log_weights: torch.Tensor | None
    exact: bool


def _unwrap(d: td.Distribution) -> tuple[td.Distribution, int]:
    n = 0
    while isinstance(d, td.Independent):
        n += d.reinterpreted_batch_ndims
        d = d.base_dist
    return d, n


def detach_distribution(d: td.Distribution) -> td.Distribution:
    """The same distribution with its parameters detached from the autograd graph.

    Handles (independent) Normals, (low-rank) multivariate Normals and
    ``MixtureOfDiagNormals``; any other distribution is returned unchanged.
    """
    inner, n = _unwrap(d)
    if isinstance(inner, td.Normal):
        out = dist.Normal(inner.loc.detach(), inner.scale.detach(), validate_args=False)
    elif isinstance(inner, td.LowRankMultivariateNormal):
        out = dist.LowRankMultivariateNormal(
            inner.loc.detach(), inner.cov_factor.detach(), inner.cov_diag.detach(), validate_args=False
        )
    elif isinstance(inner, td.MultivariateNormal):
        out = dist.MultivariateNormal(inner.loc.detach(), scale_tril=inner.scale_tril.detach(), validate_args=False)
    elif isinstance(inner, dist.MixtureOfDiagNormals):
        out = type(inner)(  # keeps a subclass such as StableMixtureOfDiagNormals
            inner.locs.detach(), inner.coord_scale.detach(), inner.component_logits.detach()
        )
    else:
        return d
    return out.to_event(n) if n else out


def _reference_param(d: td.Distribution) -> torch.Tensor | None:
    """A floating parameter tensor of ``d`` (for its dtype and device), if one is found."""
    inner, _ = _unwrap(d)
    for name in ("loc", "locs", "scale_tril", "logits", "probs", "rate", "concentration"):
        t = inner.__dict__.get(name)
        if torch.is_tensor(t) and t.is_floating_point():
            return t
    return None


def _tensors(d: td.Distribution) -> list[torch.Tensor]:
    """The tensor attributes of a distribution and of the distributions it wraps."""
    out, seen = [], set()
    stack = [d]
    while stack:
        x = stack.pop()
        if id(x) in seen:
            continue
        seen.add(id(x))
        for v in vars(x).values():
            if torch.is_tensor(v):
                out.append(v)
            elif isinstance(v, td.Distribution):
                stack.append(v)
    return out


def safe_log_prob(d: td.Distribution, x: torch.Tensor) -> torch.Tensor:
    """``d.log_prob(x)``, for an (independent) Normal as ``-0.5 z^2 - log scale - log sqrt(2 pi)``
    with ``z = (x - loc) / scale``.

    torch's ``Normal.log_prob`` divides by ``scale ** 2``, which underflows to zero in
    float32 for scales below about 1e-19 (NaN or -inf for a perfectly ordinary value);
    ``z`` is representable whenever the value is within a float's range of ``loc`` on the
    scale of ``scale``.
    """
    inner, n = _unwrap(d)
    if type(inner) not in (td.Normal, dist.Normal) or n > x.dim():
        return d.log_prob(x)
    z = (x - inner.loc) / inner.scale
    out = -0.5 * z * z - inner.scale.log() - 0.5 * math.log(2 * math.pi)
    return out.sum(tuple(range(-n, 0))) if n else out


def _check_normal_params(label: str, loc: torch.Tensor, scale: torch.Tensor) -> None:
    """Finite means and positive finite scales (``Normal``'s own check lets ``scale = inf`` through)."""
    check_finite(f"{label} loc", loc)
    check_finite(f"{label} scale", scale)
    if scale.numel() and not bool((scale > 0).all()):
        raise ValueError(f"{label} scale must be positive, got min {float(scale.min()):.3g}")
    if scale.numel() and scale.is_floating_point() and not bool(torch.isfinite(scale.reciprocal()).all()):
        raise ValueError(
            f"{label} scale has values down to {float(scale.min()):.3g}, whose reciprocal overflows "
            f"{scale.dtype} (the estimators evaluate (w - loc) / scale); use float64 for q and the value"
        )


class BaseDensity:
    """``q`` together with the spec and (for a flat ``q``) the layout.

    Parameters
    ----------
    q : Distribution or mapping ``site -> Distribution | (loc, scale)``
    spec : PermutationSpec
    layout : FlatLayout, optional
        Required when ``q`` is one distribution over the flat latent vector.
    validate : bool
        Check that Normal parameters are finite with positive scales (one pass over
        them; the guides skip it on their training path, where Pyro's own sample
        statement has already checked the same parameters).

    Raises
    ------
    SpecError
        A site of the spec missing from ``q``, or an event shape that is not the site's.
    ValueError
        NaN/Inf means or scales, non-positive scales (naming the site).
    TypeError
        ``q``'s sites in different dtypes or on different devices.
    """

    def __init__(
        self, q: Any, spec: PermutationSpec, layout: FlatLayout | None = None, *, validate: bool = True
    ) -> None:
        check_spec(spec)
        if layout is not None and not isinstance(layout, FlatLayout):
            raise TypeError(f"layout must be a FlatLayout, got {type(layout).__name__}")
        if isinstance(q, td.Distribution):
            if layout is None:
                raise SpecError("a distribution over the flat latent vector needs layout=FlatLayout(...)")
            if tuple(q.event_shape) != (layout.dim,):
                raise SpecError(f"q has event shape {tuple(q.event_shape)}, the layout needs ({layout.dim},)")
            missing = [s for s in spec.sites if s not in layout.shapes]
            if missing:
                raise SpecError(f"sites {missing} of the spec are not in the flat layout {list(layout.shapes)}")
            self.flat, self.dists = q, None
            spec = spec if spec.shapes is not None else spec.with_shapes(layout.shapes)
        elif isinstance(q, Mapping):
            from ..posteriors import as_posterior  # the one reader of posterior forms

            for k, v in q.items():  # a density needs scale > 0 (the reader allows 0: point-like sites)
                if isinstance(v, (tuple, list)) and len(v) == 2 and all(torch.is_tensor(x) for x in v):
                    if v[0].is_floating_point() and v[1].is_floating_point():
                        _check_normal_params(f"q[{k!r}]", *v)
            post = as_posterior(q, name="q", detach=False)  # reads and checks every form; gradients kept
            if post.dists is None:
                raise SpecError(
                    "q must map sites to Distributions or (loc, scale) pairs; got "
                    + ("points" if post.is_point else "draws")
                )
            dists = dict(post.dists)
            missing = [s for s in spec.sites if s not in dists]
            if missing:
                raise SpecError(f"sites {missing} of the spec have no distribution in q (have {sorted(dists)})")
            shapes = {s: tuple(dists[s].event_shape) for s in spec.sites}
            if spec.shapes is not None:
                for s in spec.sites:
                    if s in spec.shapes and tuple(spec.shapes[s]) != shapes[s]:
                        raise SpecError(
                            f"q[{s!r}] has event shape {shapes[s]} but the spec expects {spec.shapes[s]}; "
                            "give each site one distribution whose event shape is the site's shape"
                        )
            self.flat, self.dists = None, dists
            if spec.shapes is None or any(spec.shapes.get(s) != shapes[s] for s in spec.sites):
                spec = spec.with_shapes({**(spec.shapes or {}), **shapes})
        else:
            raise SpecError(
                "q must be a Distribution over the flat latent vector (with layout=) or a mapping "
                f"site -> Distribution / (loc, scale); got {type(q).__name__}"
            )
        self.spec, self.layout = spec, layout
        self._event_ndim = {s: spec.action(s).event_ndim for s in spec.sites}
        self._kernel = self._normal_kernel()
        dists = [self.flat] if self.flat is not None else [self.dists[s] for s in spec.sites]
        self._q_batched = any(d.batch_shape != () for d in dists)
        self.dtype, self.device = self._dtype_device()
        if validate and self._kernel is not None:
            for key, (loc, inv, _) in self._kernel.items():
                label = "q" if key == "flat" else f"q[{key!r}]"
                _check_normal_params(label, loc, inv.reciprocal())

    def _dtype_device(self) -> tuple[torch.dtype | None, torch.device | None]:
        """The dtype and device of ``q``'s parameters; sites that disagree are an error."""
        items = [("q", self.flat)] if self.flat is not None else [(f"q[{s!r}]", self.dists[s]) for s in self.spec.sites]
        ref = None
        for label, d in items:
            t = _reference_param(d)
            if t is None:
                continue
            if ref is None:
                ref = (label, t)
            elif t.dtype != ref[1].dtype:
                raise TypeError(f"{label} has dtype {t.dtype} but {ref[0]} has {ref[1].dtype}; use one dtype for q")
            elif t.device != ref[1].device:
                raise ValueError(f"{label} is on {t.device} but {ref[0]} is on {ref[1].device}; use one device for q")
        return (None, None) if ref is None else (ref[1].dtype, ref[1].device)

    def _check_tensor(self, label: str, x: Any) -> None:
        if not torch.is_tensor(x):
            raise TypeError(f"{label} must be a tensor, got {type(x).__name__}")
        if not x.is_floating_point():
            raise TypeError(f"{label} must be a floating-point tensor, got dtype {x.dtype}")
        if self.dtype is not None and x.dtype != self.dtype:
            raise TypeError(f"{label} has dtype {x.dtype} but q's parameters are {self.dtype}; use one dtype")
        if self.device is not None and x.device != self.device:
            raise ValueError(f"{label} is on {x.device} but q's parameters are on {self.device}; use one device")

    def detached(self) -> BaseDensity:
        """``q`` with its parameters detached (gradients then flow through the value only)."""
        if self.flat is not None:
            return BaseDensity(detach_distribution(self.flat), self.spec, self.layout, validate=False)
        return BaseDensity({k: detach_distribution(d) for k, d in self.dists.items()}, self.spec, validate=False)

    def check_value(self, value: Value) -> None:
        """Raise ``ValueError`` naming the site if the moving part of ``value`` holds NaN/Inf."""
        if self.flat is not None:
            check_finite("value", value)
        else:
            for s in self.spec.sites:
                check_finite(f"value[{s!r}]", value[s])

    def _normal_kernel(self) -> dict[str, tuple[torch.Tensor, torch.Tensor, int]] | None:
        """``(loc, 1/scale, event_ndim)`` per moving part when ``q`` is a diagonal Normal there."""
        parts = {}
        items = [("flat", self.flat)] if self.flat is not None else [(s, self.dists[s]) for s in self.spec.sites]
        for key, d in items:
            base, n = _unwrap(d)
            if not isinstance(base, td.Normal) or n != len(d.event_shape) or d.batch_shape != ():
                return None
            parts[key] = (base.loc, base.scale.reciprocal(), n)
        return parts

    # ------------------------------------------------------------------ basics
    @property
    def is_flat(self) -> bool:
        return self.flat is not None

    @property
    def has_rsample(self) -> bool:
        if self.flat is not None:
            return bool(self.flat.has_rsample)
        return all(d.has_rsample for d in self.dists.values())

    def batch_shape_of(self, value: Value) -> torch.Size:
        """The batch dims of a value (the leading dims before the site/flat shape)."""
        if self.flat is not None:
            if not torch.is_tensor(value) or value.dim() < 1 or value.shape[-1] != self.layout.dim:
                shape = tuple(value.shape) if torch.is_tensor(value) else type(value).__name__
                raise SpecError(f"value must be a tensor (*batch, {self.layout.dim}), got {shape}")
            self._check_tensor("value", value)
            return value.shape[:-1]
        if not isinstance(value, Mapping):
            raise SpecError("q is a mapping of sites: the value must be a dict site -> tensor")
        shapes = []
        for s in self.spec.sites:
            if s not in value:
                raise SpecError(f"site {s!r} of the spec is missing from the value (have {sorted(value)})")
            x, nd = value[s], self._event_ndim[s]
            self._check_tensor(f"value[{s!r}]", x)
            if tuple(x.shape[x.dim() - nd :]) != tuple(self.spec.shapes[s]) or x.dim() < nd:
                raise SpecError(f"value[{s!r}] has shape {tuple(x.shape)}, expected (*batch, {self.spec.shapes[s]})")
            shapes.append(x.shape[: x.dim() - nd])
        try:
            return broadcast_shapes(*shapes)
        except RuntimeError:
            raise SpecError(f"the sites of the value have batch shapes {shapes} that do not broadcast") from None

    def reference(self, value: Value) -> torch.Tensor:
        """A tensor of the value (for its dtype and device)."""
        return value if self.flat is not None else value[self.spec.sites[0]]

    def moving(self, value: Value) -> Value:
        """The part of the value the group moves (all of it when flat)."""
        return value if self.flat is not None else {s: value[s] for s in self.spec.sites}

    def sites(self, value: Value) -> dict[str, torch.Tensor]:
        """The value as ``site -> (*batch, *shape)`` for the spec's sites."""
        if self.flat is not None:
            return {s: v for s, v in self.layout.from_flat(value).items() if s in self.spec.sites}
        return {s: value[s] for s in self.spec.sites}

    # ------------------------------------------------------------------ densities
    def log_prob_moving(self, value: Value) -> torch.Tensor:
        """``log q`` of the part of the value the group moves, shape ``(*batch)``.

        For a site mapping the other sites' densities cancel in every ratio
        ``q(g^{-1} w) / q(w)`` and are left out; a flat ``q`` is evaluated whole.
        """
        if self.flat is not None:
            return safe_log_prob(self.flat, value)
        return sum(safe_log_prob(self.dists[s], value[s]) for s in self.spec.sites)

    def log_kernel(self, value: Value) -> torch.Tensor:
        """``log q`` of the moving part up to a constant that no group element changes.

        For a diagonal Normal ``q`` this is ``-0.5 sum ((w - loc) / scale)^2``: the
        normalizer ``-sum log scale`` is the same for every ``q(g^{-1} w)`` and cancels in
        every ratio the estimators form, so it is skipped (fewer passes over ``K x D``).
        Large batches are evaluated in chunks (see :data:`CHUNK_BYTES`).
        """
        return self._chunked(value, None)

    def _kernel_of(self, value: Value) -> torch.Tensor:
        """:meth:`log_kernel` of one chunk."""
        if self._kernel is None:
            return self.log_prob_moving(value)
        if self.flat is not None:
            loc, inv, _ = self._kernel["flat"]
            return -0.5 * ((value - loc) * inv).square().sum(-1)
        total = 0.0
        for s, (loc, inv, n) in self._kernel.items():
            z = ((value[s] - loc) * inv).square()
            total = total - 0.5 * z.flatten(z.dim() - n).sum(-1) if n else total - 0.5 * z
        return total

    def log_prob(self, value: Value) -> torch.Tensor:
        """``log q(value)``, every site of ``q`` included."""
        if self.flat is not None:
            return safe_log_prob(self.flat, value)
        missing = [s for s in self.dists if s not in value]
        if missing:
            raise SpecError(f"sites {missing} of q are missing from the value (have {sorted(value)})")
        return sum(safe_log_prob(d, value[s]) for s, d in self.dists.items())

    def act(self, value: Value, perm: Mapping[str, torch.Tensor]) -> Value:
        """``perm . value`` for a (batched) element; element dims lead the value's batch dims.

        A flat value is moved site by site (views of the flat vector) and packed again: no
        flat index vector (8 bytes per coordinate and copy) is built."""
        if self.flat is not None:
            sites = self.layout.from_flat(value)
            moved = self.spec.apply({s: sites[s] for s in self.spec.sites}, perm)
            return self.layout.to_flat({**sites, **moved})
        return self.spec.apply(self.moving(value), perm)

    def log_prob_acted(self, value: Value, perm: Mapping[str, torch.Tensor]) -> torch.Tensor:
        """``log q(perm . value)`` (moving part, up to the constant of :meth:`log_kernel`),
        shape ``broadcast(perm batch, value batch)``, in chunks of rows (see
        :data:`CHUNK_BYTES`): memory does not grow with the number of elements or draws."""
        return self._chunked(value, perm)

    # ------------------------------------------------------------------ chunking
    def _own_batch(self, value: Value) -> dict[str, torch.Size]:
        """The batch shape of each moving tensor of the value (unchecked)."""
        if self.flat is not None:
            return {"": value.shape[:-1]}
        return {s: value[s].shape[: value[s].dim() - self._event_ndim[s]] for s in self.spec.sites}

    def row_bytes(self, itemsize: int) -> int:
        """Bytes one permuted copy of a draw costs in :meth:`log_prob_acted`: the copy, two
        temporaries of the kernel, and for a flat ``q`` the moved sites before packing."""
        if self.flat is not None:
            return self.layout.dim * 5 * itemsize
        dim = sum(math.prod(self.spec.shapes[s]) for s in self.spec.sites)
        return max(1, dim * 4 * itemsize)

    def rows_per_chunk(self, itemsize: int, extra: int = 0) -> int:
        """Rows (permuted copies, plus ``extra`` bytes each) that fit in :data:`CHUNK_BYTES`."""
        return max(1, CHUNK_BYTES // (self.row_bytes(itemsize) + extra))

    def take(self, value: Value, rows: torch.Tensor, out: torch.Size) -> Value:
        """The moving part of the value at ``rows`` of its batch broadcast to ``out``,
        with batch shape ``(len(rows),)`` (a copy of those rows only)."""
        own = self._own_batch(value)
        if self.flat is not None:
            index = _row_index(own[""], out, value.device)[rows]
            return value.reshape(-1, value.shape[-1]).index_select(0, index)
        res = {}
        for s in self.spec.sites:
            x = value[s]
            index = _row_index(own[s], out, x.device)[rows]
            res[s] = x.reshape(-1, *x.shape[x.dim() - self._event_ndim[s] :]).index_select(0, index)
        return res

    def take_range(self, value: Value, lo: int, hi: int, out: torch.Size) -> Value:
        """:meth:`take` of rows ``lo:hi``; all rows of an unbroadcast value are a view."""
        own = self._own_batch(value)
        if lo == 0 and hi == out.numel() and all(b == out for b in own.values()):
            if self.flat is not None:
                return value.reshape(-1, value.shape[-1])
            return {s: value[s].reshape(-1, *self.spec.shapes[s]) for s in self.spec.sites}
        return self.take(value, torch.arange(lo, hi, device=self.reference(value).device), out)

    def _chunked(self, value: Value, perm: Mapping[str, torch.Tensor] | None) -> torch.Tensor:
        """``log_kernel(perm . value)`` (``perm`` None: the value itself) over the rows of
        the broadcast batch, a chunk of rows at a time when they exceed :data:`CHUNK_BYTES`."""
        own = self._own_batch(value)
        shapes = list(own.values()) + ([p.shape[:-1] for p in perm.values()] if perm else [])
        out = broadcast_shapes(*shapes)
        ref = self.reference(value)
        rows, chunk = out.numel(), self.rows_per_chunk(ref.element_size())
        if rows <= chunk or self._q_batched:  # a batched q broadcasts against the value's own batch dims
            return self._kernel_of(value if perm is None else self.act(value, perm))
        pidx = {k: _row_index(p.shape[:-1], out, p.device) for k, p in (perm or {}).items()}
        tensors = self.moving_tensors(value)
        grad = self.needs_grad(value)

        def piece(lo: int, hi: int, *_: torch.Tensor) -> torch.Tensor:
            v = self.take_range(value, lo, hi, out)
            if perm is not None:
                v = self.act(v, {k: p.reshape(-1, p.shape[-1])[pidx[k][lo:hi]] for k, p in perm.items()})
            return self._kernel_of(v)

        parts = []
        for lo in range(0, rows, chunk):
            hi = min(rows, lo + chunk)
            if grad:  # recompute the chunk in the backward pass instead of keeping its copies
                parts.append(
                    torch.utils.checkpoint.checkpoint(
                        piece, lo, hi, *tensors, use_reentrant=False, preserve_rng_state=False
                    )
                )
            else:
                parts.append(piece(lo, hi))
        return torch.cat(parts).reshape(out)

    def moving_tensors(self, value: Value) -> list[torch.Tensor]:
        """The tensors of the value's moving part (the flat vector, or the spec's sites)."""
        return [value] if self.flat is not None else [value[s] for s in self.spec.sites]

    def needs_grad(self, value: Value) -> bool:
        """Whether autograd would record an evaluation at ``value`` (then chunks are
        recomputed in the backward pass rather than kept)."""
        if not torch.is_grad_enabled():
            return False
        return any(t.requires_grad for t in self.moving_tensors(value)) or any(
            p.requires_grad for p in self._parameters()
        )

    def _parameters(self) -> list[torch.Tensor]:
        """The tensors of ``q``'s Normal kernel (for the gradient check of the chunked path)."""
        if self._kernel is None:
            return [t for d in ([self.flat] if self.flat is not None else self.dists.values()) for t in _tensors(d)]
        return [t for loc, inv, _ in self._kernel.values() for t in (loc, inv)]

    def sample(self, sample_shape: torch.Size = torch.Size(), reparam: bool = False) -> Value:
        draw = (lambda d: d.rsample(sample_shape)) if reparam else (lambda d: d.sample(sample_shape))
        if self.flat is not None:
            return draw(self.flat)
        return {s: draw(d) for s, d in self.dists.items()}

    # ------------------------------------------------------------------ factors
    def marginals(self) -> Marginals:
        """Normal marginals on the spec's sites (exact factors when ``q`` is mean-field)."""
        if self.flat is None:
            loc, scale, exact = {}, {}, True
            for s in self.spec.sites:
                base, _ = _unwrap(self.dists[s])
                if isinstance(base, td.Normal):
                    loc[s], scale[s] = base.loc.expand(base.batch_shape), base.scale.expand(base.batch_shape)
                else:
                    loc[s], scale[s] = self.dists[s].mean, self.dists[s].stddev
                    exact = False
                if tuple(loc[s].shape) != tuple(self.spec.shapes[s]):
                    raise SpecError(
                        f"the permanent and importance estimators need an unbatched q; q[{s!r}] has "
                        f"shape {tuple(loc[s].shape)} for a site of shape {self.spec.shapes[s]}"
                    )
            return Marginals(loc, scale, None, exact)
        base, n = _unwrap(self.flat)
        log_w = None
        if isinstance(base, td.Normal) and n == 1:
            loc, scale, exact = base.loc.expand(base.batch_shape), base.scale.expand(base.batch_shape), True
        elif isinstance(base, dist.MixtureOfDiagNormals):
            loc, scale, exact = base.locs, base.coord_scale, False
            log_w = torch.log_softmax(base.component_logits, -1)
        else:
            loc, scale, exact = self.flat.mean, self.flat.stddev, False
        if loc.dim() != (1 if log_w is None else 2):
            raise SpecError(
                f"the permanent and importance estimators need an unbatched q; q has batch shape "
                f"{tuple(self.flat.batch_shape)}"
            )
        locs, scales = self.layout.from_flat(loc), self.layout.from_flat(scale)
        keep = set(self.spec.sites)
        return Marginals(
            {k: v for k, v in locs.items() if k in keep}, {k: v for k, v in scales.items() if k in keep}, log_w, exact
        )


def as_base(q: Any, spec: PermutationSpec, layout: FlatLayout | None = None) -> BaseDensity:
    """``q`` as a :class:`BaseDensity` (returned unchanged if it already is one)."""
    return q if isinstance(q, BaseDensity) else BaseDensity(q, spec, layout)
