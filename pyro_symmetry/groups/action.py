"""How a group element acts on one site: the only place that reads the spec's axes.

Every other module asks a :class:`SiteAction` (``spec.action(site)``) to permute,
sign-flip or rescale a site, to cut it into per-neuron blocks (matching, canonical forms,
factorized densities) and to name its neuron axes. A new kind of symmetry (an axis slice,
a nested group, a new role of an axis) is added here and in :mod:`.spec`, nowhere else.

Each ``(group, site, axis)`` the spec declares becomes a :class:`Span`: the entries
``[start, start + units * inner)`` of an event axis, read as ``units`` blocks of ``inner``
contiguous entries. A top-level group's span has ``units = n``; a nested group's span is its
parent's span read as ``H`` blocks of ``n`` units.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

from .._shapes import broadcast_shapes
from ._elements import full_index
from ._indexing import decode_signed, gather_axes

if TYPE_CHECKING:  # pragma: no cover
    from .spec import NeuronGroup

__all__ = ["SiteAction", "Span"]

ROLES = ("incoming", "outgoing", "passive")


@dataclass(frozen=True)
class Span:
    """Where one group acts on one axis of one site (a read-only description).

    Attributes
    ----------
    group : str
    site : str
    axis : int
        Non-negative event axis.
    start : int
        First entry of the span on the axis.
    shape : tuple of int
        ``(n,)`` for a top-level group, ``(H, n)`` for a group nested in a parent of size H.
    inner : int
        Contiguous entries per unit (``> 1`` after a conv-to-linear flatten, or for a parent
        whose blocks hold nested units).
    role : {"incoming", "outgoing", "passive"}
        Scaled by ``lam``, by ``1 / lam``, or only permuted (a pre-BatchNorm row).
    whole : bool
        The span must cover the whole axis (an axis declared without ``start``).
    """

    group: str
    site: str
    axis: int
    start: int
    shape: tuple[int, ...]
    inner: int
    role: str
    whole: bool = True

    @property
    def length(self) -> int:
        """Entries the span covers on its axis."""
        n = 1
        for s in self.shape:
            n *= s
        return n * self.inner

    @property
    def stop(self) -> int:
        return self.start + self.length


class SiteAction:
    """The action of a spec's groups on one site ``(*batch, *event)``.

    Parameters
    ----------
    site : str
    event_ndim : int
    spans : sequence of :class:`Span`
    groups : mapping name -> NeuronGroup
        The spec's groups (for sign-flip and parent information).
    """

    def __init__(self, site: str, event_ndim: int, spans: Sequence[Span], groups: Mapping[str, NeuronGroup]) -> None:
        self.site = site
        self.event_ndim = event_ndim
        self.spans = tuple(spans)
        self._groups = groups
        self.groups = tuple(dict.fromkeys(s.group for s in self.spans))

    def __repr__(self) -> str:
        parts = ", ".join(f"{s.group}@{s.axis}[{s.start}:{s.stop}]" for s in self.spans)
        return f"SiteAction({self.site!r}, event_ndim={self.event_ndim}, {parts})"

    # ---------------------------------------------------------------- layout
    def spans_of(self, group: str) -> tuple[Span, ...]:
        return tuple(s for s in self.spans if s.group == group)

    def _check(self, x: torch.Tensor) -> None:
        from .spec import SpecError

        if not isinstance(x, torch.Tensor):
            raise SpecError(f"params[{self.site!r}] must be a tensor, got {type(x).__name__}")
        if x.dim() < self.event_ndim:
            raise SpecError(
                f"params[{self.site!r}] has shape {tuple(x.shape)}, expected at least {self.event_ndim} dims"
            )
        event = x.shape[x.dim() - self.event_ndim :]
        for s in self.spans:
            if s.stop > event[s.axis] or (s.whole and s.stop != event[s.axis]):
                size = "x".join(map(str, s.shape)) + (f" x inner {s.inner}" if s.inner > 1 else "")
                what = f"has size {size}" if s.whole else f"spans entries [{s.start}, {s.stop}) of it (size {size})"
                raise SpecError(
                    f"params[{self.site!r}] has length {event[s.axis]} on axis {s.axis - self.event_ndim} but group "
                    f"{s.group!r} {what}"
                )

    def _top(self, axis: int) -> list[Span]:
        return [s for s in self.spans if s.axis == axis and len(s.shape) == 1]

    def _child(self, span: Span) -> Span | None:
        for s in self.spans:
            if len(s.shape) == 2 and s.axis == span.axis and s.start == span.start:
                return s
        return None

    # ---------------------------------------------------------------- permutations
    def _span_index(
        self, span: Span, element: Mapping[str, torch.Tensor], skip: set[str], unsigned: bool
    ) -> torch.Tensor | None:
        """Signed index ``(*batch, length)`` of one top-level span (with its nested group), or None."""
        child = self._child(span)
        use_top = span.group not in skip
        use_child = child is not None and child.group not in skip
        if not use_top and not use_child:
            return None
        dev = element[span.group].device
        top = element[span.group] if use_top else torch.arange(span.shape[0], device=dev)
        if use_child:
            units = full_index(decode_signed(top)[0], element[child.group])
            inner = child.inner
        else:
            units, inner = top, span.inner
        src, neg = decode_signed(units)
        idx = (src.unsqueeze(-1) * inner + torch.arange(inner, device=dev)).flatten(-2) + span.start
        flips = not unsigned and span.role != "passive" and bool(neg.any())
        if flips:
            idx = torch.where(neg.repeat_interleave(inner, -1), ~idx, idx)
        return idx

    def apply(
        self,
        x: torch.Tensor,
        element: Mapping[str, torch.Tensor],
        *,
        skip: Sequence[str] = (),
        unsigned: bool = False,
    ) -> torch.Tensor:
        """``x`` acted on by ``element`` (its groups on this site), batch dims broadcast.

        Parameters
        ----------
        x : Tensor ``(*batch_x, *event)``
        element : mapping group -> LongTensor ``(*batch_g, *unit_shape)``
        skip : groups to leave out (treated as the identity)
        unsigned : ignore sign flips (e.g. for standard deviations, which do not flip)

        Returns
        -------
        Tensor ``(*broadcast(batch_x, batch_g), *event)``
        """
        self._check(x)
        skip = set(skip)
        moves = []
        for axis in sorted({s.axis for s in self.spans}):
            tops = self._top(axis)
            span = tops[0]
            simple = (
                len(tops) == 1
                and span.start == 0
                and self._child(span) is None
                and span.stop == x.shape[x.dim() - self.event_ndim + axis]
            )
            if simple:
                if span.group in skip:
                    continue
                p = element[span.group]
                signed = self._groups[span.group].signed and not unsigned and span.role != "passive"
                moves.append((axis, span.inner, p if signed else decode_signed(p)[0], signed))
                continue
            length = x.shape[x.dim() - self.event_ndim + axis]
            parts = [(s, self._span_index(s, element, skip, unsigned)) for s in tops]
            parts = [(s, i) for s, i in parts if i is not None]
            if not parts:
                continue
            batch = broadcast_shapes(*(i.shape[:-1] for _, i in parts))
            full = torch.arange(length, device=parts[0][1].device).expand(batch + (length,)).clone()
            for s, i in parts:
                full[..., s.start : s.stop] = i
            moves.append((axis, 1, full, True))
        if not moves:
            return x
        return gather_axes(x, self.event_ndim, moves)

    # ---------------------------------------------------------------- blocks
    def blocks(self, x: torch.Tensor, span: Span) -> torch.Tensor:
        """Per-unit blocks of ``x`` on one span.

        Returns
        -------
        Tensor ``(*batch, *span.shape, m)``: row ``i`` (or ``(h, j)`` for a nested group)
        holds every entry of the site that belongs to that unit along the span's axis,
        the other axes flattened in order.
        """
        nb = x.dim() - self.event_ndim
        ax = nb + span.axis
        y = x.narrow(ax, span.start, span.length)
        y = y.unflatten(ax, (*span.shape, span.inner))
        k = len(span.shape)
        y = y.movedim(tuple(range(ax, ax + k)), tuple(range(nb, nb + k)))
        return y.reshape(y.shape[: nb + k] + (-1,))

    def unit_blocks(self, x: torch.Tensor, group: str) -> torch.Tensor:
        """Every entry of the site belonging to each unit of ``group``: the blocks of all its
        spans on this site, concatenated, ``(*batch, *unit_shape, m)``."""
        return torch.cat([self.blocks(x, s) for s in self.spans_of(group)], dim=-1)

    # ---------------------------------------------------------------- scaling
    def scale(self, x: torch.Tensor, log_scales: Mapping[str, torch.Tensor]) -> torch.Tensor:
        """Incoming entries times ``exp(u)``, outgoing entries times ``exp(-u)``.

        ``log_scales[group]`` has shape ``(*batch, n)``; groups not in it are unchanged, as
        are passive entries.
        """
        self._check(x)
        nb = x.dim() - self.event_ndim
        out = x
        for s in self.spans:
            if s.group not in log_scales or s.role == "passive" or len(s.shape) != 1:
                continue
            u = log_scales[s.group].to(x.dtype)
            if s.role == "outgoing":
                u = -u
            factor = u.exp().repeat_interleave(s.inner, -1)  # (*batch_u, length)
            length = x.shape[nb + s.axis]
            if s.start or s.stop != length:
                full = torch.ones(factor.shape[:-1] + (length,), dtype=x.dtype, device=x.device)
                full[..., s.start : s.stop] = factor
                factor = full
            trail = self.event_ndim - s.axis - 1
            # (*batch, 1 per earlier event axis, length, 1 per later event axis)
            out = out * factor.reshape(factor.shape[:-1] + (1,) * s.axis + factor.shape[-1:] + (1,) * trail)
        return out

    def axis_groups(self) -> list[str | None]:
        """Per event axis: the group whose neurons index it (the axis is one group's whole
        span), else None (no group, or several slices/nesting)."""
        names: list[str | None] = [None] * self.event_ndim
        for axis in range(self.event_ndim):
            tops = self._top(axis)
            if len(tops) == 1 and self._child(tops[0]) is None and tops[0].start == 0 and tops[0].inner == 1:
                names[axis] = tops[0].group
        return names
