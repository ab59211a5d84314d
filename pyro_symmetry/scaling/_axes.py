"""Where the activation symmetries of a spec act: per site, the event axes of each group
and the direction (incoming ``+1`` / outgoing ``-1``). Shared by rescaling, min-mass and
the sign convention. Read only through the spec's group-action interface
(``spec.action(site)``, ``NeuronGroup.roles/scalable/signed``)."""

from __future__ import annotations

import itertools
from collections.abc import Mapping, Sequence
from typing import NamedTuple

import torch

from ..groups import NeuronGroup, PermutationSpec, SiteAction, Span, SpecError

__all__ = [
    "SiteAxis",
    "check_group_tensors",
    "detached",
    "group_spans",
    "groups_with",
    "narrow",
    "pieces",
    "reduce_squares",
    "site_axes",
    "split_event",
    "symmetry_name",
    "unit_rows",
]


class SiteAxis(NamedTuple):
    """One event axis of a site that a group acts on."""

    axis: int  # non-negative event axis
    inner: int  # block length (> 1 after a conv-to-linear flatten)
    group: str
    direction: int  # +1 incoming (rows, biases), -1 outgoing (next layer's columns)
    start: int = 0  # first entry of a slice of the axis (a concatenation's part)
    length: int | None = None  # entries of the slice; None: the group owns the whole axis


def detached(params: Mapping[str, object]) -> dict[str, object]:
    """``params`` with every tensor detached from autograd (other values kept as they are)."""
    return {k: v.detach() if torch.is_tensor(v) else v for k, v in params.items()}


def symmetry_name(group: NeuronGroup) -> str:
    """``"scale"``, ``"sign"`` or ``"none"``: the group's activation symmetry as the user
    declared it (for messages), read through :attr:`NeuronGroup.scalable`/``signed``."""
    return "scale" if group.scalable else "sign" if group.signed else "none"


def groups_with(spec: PermutationSpec, symmetry: str) -> list[str]:
    """Names of the groups with a scaling (``"scale"``) or sign-flip (``"sign"``) symmetry, in spec order."""
    return [k for k, g in spec.groups.items() if symmetry_name(g) == symmetry]


def group_spans(spec: PermutationSpec, name: str, role: str) -> list[tuple[SiteAction, Span]]:
    """``(action, span)`` for every span of group ``name`` with ``role`` (``"incoming"``,
    ``"outgoing"``), in the order the group declares its axes."""
    out = []
    seen: set[str] = set()
    for r, ax in spec.groups[name].roles():
        if r != role or ax.site in seen:
            continue
        seen.add(ax.site)
        action = spec.action(ax.site)
        out += [(action, span) for span in action.spans_of(name) if span.role == role]
    return out


def unit_rows(x: torch.Tensor, action: SiteAction, span: Span) -> torch.Tensor:
    """The entries of ``x`` on one span, one row per unit: ``(*batch, *span.shape, m)``.

    Row ``i`` holds the unit's ``inner`` entries along the span's axis, then the other
    axes in order (the layout sort keys index, e.g. ``int`` keys of
    :func:`~pyro_symmetry.scaling.sort_permutation`).
    """
    nb = x.dim() - action.event_ndim
    ax = nb + span.axis
    part = x.narrow(ax, span.start, span.length).movedim(ax, nb)
    return part.reshape(tuple(x.shape[:nb]) + tuple(span.shape) + (-1,))


def site_axes(spec: PermutationSpec, groups: list[str] | tuple[str, ...]) -> dict[str, tuple[int, list[SiteAxis]]]:
    """``site -> (event_ndim, [SiteAxis])`` for every site one of ``groups`` scales.

    Read from the spec's per-site action (:meth:`PermutationSpec.action`): the incoming and
    outgoing spans of each group, in the order the group declares its axes. Passive spans
    (a conv's rows before a BatchNorm, running statistics) are never rescaled and are left
    out. Sites are listed in the order the groups first scale them.

    A group acting on a slice of an axis (the channels a concatenation takes from one
    branch) gets a :class:`SiteAxis` with ``start`` and ``length``; :func:`pieces` cuts
    such a site into blocks on which every scaled axis is whole.

    Raises
    ------
    SpecError
        If one of ``groups`` is nested in another group (nested groups have no scaling
        symmetry; rescaling and min-mass need whole units).
    """
    out: dict[str, tuple[int, list[SiteAxis]]] = {}
    for name in groups:
        for role, direction in (("incoming", 1), ("outgoing", -1)):
            for action, span in group_spans(spec, name, role):
                if len(span.shape) != 1:
                    raise SpecError(
                        f"group {name!r} is nested in another group on site {action.site!r}: rescaling and min-mass "
                        "support only top-level groups"
                    )
                entry = out.setdefault(action.site, (action.event_ndim, []))
                sliced = (span.start, span.length) if not span.whole else (0, None)
                entry[1].append(SiteAxis(span.axis, span.inner, name, direction, *sliced))
    return out


def pieces(event: Sequence[int], axes: list[SiteAxis]) -> list[tuple[tuple[tuple[int, int, int], ...], list[SiteAxis]]]:
    """Cut a site into blocks on which every scaled axis is whole.

    Returns ``[(ranges, axes)]``: ``ranges`` are ``(axis, start, length)`` to narrow the
    site's event to (empty: the whole site), ``axes`` the whole-axis :class:`SiteAxis` of
    that block (none for a block no group scales, e.g. a passive part of a concatenation).
    A site whose groups own whole axes is one piece ``((), axes)``.
    """
    if all(a.length is None for a in axes):
        return [((), list(axes))]
    choices = []
    for axis in dict.fromkeys(a.axis for a in axes):
        on = sorted((a for a in axes if a.axis == axis), key=lambda a: a.start)
        if len(on) == 1 and on[0].length is None:
            choices.append([(None, on[0])])
            continue
        segs, pos = [], 0
        for a in on:
            if a.start > pos:
                segs.append(((axis, pos, a.start - pos), None))
            segs.append(((axis, a.start, a.length), a._replace(start=0, length=None)))
            pos = a.start + a.length
        if pos < event[axis]:
            segs.append(((axis, pos, event[axis] - pos), None))
        choices.append(segs)
    out = []
    for combo in itertools.product(*choices):
        ranges = tuple(r for r, _ in combo if r is not None)
        out.append((ranges, [a for _, a in combo if a is not None]))
    return out


def narrow(x: torch.Tensor, nd: int, ranges: tuple[tuple[int, int, int], ...]) -> torch.Tensor:
    """``x`` (``nd`` event dims) narrowed to ``ranges`` (a view)."""
    for axis, start, length in ranges:
        x = x.narrow(x.dim() - nd + axis, start, length)
    return x


def check_group_tensors(
    spec: PermutationSpec, values: Mapping[str, torch.Tensor], symmetry: str, what: str
) -> dict[str, torch.Tensor]:
    """Check a mapping ``group -> (*batch, n)`` against the groups of one activation symmetry."""
    if not isinstance(values, Mapping):
        raise TypeError(f"{what} must be a mapping group name -> tensor (*batch, n), got {type(values).__name__}")
    out = {}
    for k, v in values.items():
        if k not in spec.groups:
            raise SpecError(f"{what} names group {k!r}, which is not in the spec (groups: {sorted(spec.groups)})")
        g = spec.groups[k]
        if symmetry_name(g) != symmetry:
            kind = {"scale": "positively homogeneous (ReLU-like)", "sign": "odd (tanh-like)"}[symmetry]
            raise SpecError(
                f"{what}[{k!r}]: group {k!r} has activation_symmetry={symmetry_name(g)!r}, so its activation is "
                f"not {kind} and this transformation would change the network's function"
            )
        v = torch.as_tensor(v)
        shape = spec.unit_shape(k)
        if v.dim() < len(shape) or tuple(v.shape[v.dim() - len(shape) :]) != shape:
            want = ", ".join(map(str, shape))
            raise SpecError(f"{what}[{k!r}] has shape {tuple(v.shape)}, expected (*batch, {want})")
        out[k] = v
    return out


def split_event(event: torch.Size, axes: list[SiteAxis]) -> tuple[list[int], dict[int, int]]:
    """Event shape with each blocked axis split into ``(n, inner)``, and the new position of each axis."""
    split: list[int] = []
    pos: dict[int, int] = {}
    inner = {a.axis: a.inner for a in axes}
    for d, size in enumerate(event):
        pos[d] = len(split)
        k = inner.get(d, 1)
        split.extend([size // k, k] if k > 1 else [size])
    return split, pos


def reduce_squares(x: torch.Tensor, nd: int, axes: list[SiteAxis]) -> torch.Tensor:
    """Sum of ``x**2`` over every event entry except the listed axes' neuron indices.

    Returns a tensor ``(*batch, n_1, ..., n_k)`` with one dim per entry of ``axes``
    (in that order). Blocks (``inner > 1``) and untouched dims (conv kernels, inputs)
    are summed; ``vector_norm`` avoids materializing ``x**2`` when something is summed.
    """
    nb = x.dim() - nd
    split, pos = split_event(x.shape[nb:], axes)
    xs = x.reshape(tuple(x.shape[:nb]) + tuple(split))
    keep = [nb + pos[a.axis] for a in axes]
    drop = [d for d in range(nb, xs.dim()) if d not in keep]
    if drop:
        r = torch.linalg.vector_norm(xs, dim=drop).square()
        # the kept dims keep their relative order after the reduction
        order = sorted(keep)
        kept_pos = [nb + order.index(k) for k in keep]
    else:
        r = xs.square()
        kept_pos = keep
    return r.movedim(kept_pos, list(range(nb, nb + len(keep))))
