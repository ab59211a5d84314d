"""Which axis of which site holds which neurons, read from the spec (never from shapes).

The diagnostics name ArviZ dims after neuron groups and report the width of every
layer. Both come from the spec's groups: an axis a group acts on holds that group's
neurons, and a two-dimensional weight whose one grouped axis is *incoming* (the rows
of ``fc1.weight``, the columns of a NumPyro-style ``w1`` of shape ``(in, hidden)``)
has its layer's inputs on the other axis, while one whose grouped axis is *outgoing*
(the columns of the output layer's ``fc3.weight``, the rows of ``w2`` of shape
``(hidden, out)``) has its layer's own (output) neurons there. Nothing else is
guessed: an axis no group determines gets a site-specific name and no width.

:func:`axis_roles` is the one place in ``diagnostics`` that reads where the groups act,
through the spec's per-site action (``spec.action(site)``).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import NamedTuple

from ..groups import PermutationSpec, SiteAction, SpecError

__all__ = ["AxisRole", "axis_roles", "layer_groups", "layer_name", "layer_of", "layer_widths", "site_dims"]


class AxisRole(NamedTuple):
    """What one event axis of a site holds.

    ``kind`` is ``"group"`` (the neurons of ``group``: incoming or outgoing ``role``),
    ``"input"`` (the inputs of ``layer``) or ``"neuron"`` (the own neurons of ``layer``,
    e.g. the output layer's units, which no group permutes).
    """

    kind: str
    name: str
    role: str | None = None
    inner: int = 1


def layer_of(site: str) -> str:
    """The layer a site belongs to: its name without the last part (``fc1.weight -> fc1``)."""
    return site.rsplit(".", 1)[0] if "." in site else site


def layer_name(site: str) -> str:
    """:func:`layer_of` with dots replaced, usable in a dim name (``block.0.conv -> block_0_conv``)."""
    return layer_of(site).replace(".", "_")


def _actions(spec: PermutationSpec, shapes: Mapping[str, Sequence[int]]) -> dict[str, SiteAction]:
    """``site -> SiteAction`` for every spec site the draws have, read against the draws'
    own shapes when the spec does not know them. Sites whose shape does not fit the spec
    are left out (they are checked elsewhere)."""
    bound = spec
    if spec.shapes is None and all(s in shapes for s in spec.sites):
        try:
            bound = spec.with_shapes({s: tuple(shapes[s]) for s in spec.sites})
        except SpecError:
            bound = spec  # a spec that does not fit the draws: read what it says without shapes
    out = {}
    for site in bound.sites:
        if site not in shapes:
            continue
        try:
            action = bound.action(site, batched=False)
        except SpecError:
            continue
        if action.event_ndim <= len(shapes[site]):
            out[site] = action
    return out


def axis_roles(spec: PermutationSpec | None, shapes: Mapping[str, Sequence[int]]) -> dict[tuple[str, int], AxisRole]:
    """``(site, event axis >= 0) -> AxisRole`` for every axis the spec determines.

    Read from the spec's per-site action: an axis one group's incoming or outgoing span
    covers whole. Sliced axes (several groups on one axis) and nested groups name no axis.

    Parameters
    ----------
    spec : PermutationSpec or None
    shapes : mapping ``site -> own (event) shape``
        The sites' shapes without draw/chain dims.
    """
    roles: dict[tuple[str, int], AxisRole] = {}
    if spec is None:
        return roles
    actions = _actions(spec, shapes)
    for name in spec.groups:
        for site, action in actions.items():
            lead = len(shapes[site]) - action.event_ndim  # the draws' own dims the spec leaves out
            for span in action.spans_of(name):
                if span.role == "passive" or not span.whole or len(span.shape) != 1:
                    continue
                roles[(site, lead + span.axis)] = AxisRole("group", name, span.role, span.inner)
    for site, shape in shapes.items():
        grouped = [(k, roles[(site, k)]) for k in range(len(shape)) if (site, k) in roles]
        if len(shape) == 2 and len(grouped) == 1:  # (inner > 1: a linear layer after a conv flatten)
            other = 1 - grouped[0][0]
            kind = "input" if grouped[0][1].role == "incoming" else "neuron"
            roles[(site, other)] = AxisRole(kind, layer_name(site))
    return roles


def site_dims(shapes: Mapping[str, Sequence[int]], spec: PermutationSpec | None = None) -> dict[str, list[str]]:
    """ArviZ dim names for every site's own axes.

    An axis a neuron group ``g`` permutes one neuron per entry is named ``"{g}_neuron"``
    (so the rows of ``fc1.weight`` and the columns of ``fc2.weight`` share one dim). The
    other axis of a two-dimensional weight with one such axis is ``"{layer}_input"``
    when the group's axis is incoming and ``"{layer}_neuron"`` (the layer's own units,
    e.g. the output layer's) when it is outgoing, whichever the weight's layout. Every
    other axis is ``"{site}_dim{k}"``: without a spec no axis is called a neuron or an
    input. ``layer`` is the site name without its last part. A name that would get two
    lengths falls back to ``"{site}_dim{k}"``.
    """
    roles = axis_roles(spec, shapes)
    lengths: dict[str, int] = {}
    out: dict[str, list[str]] = {}
    for site, shape in shapes.items():
        own = f"{site.replace('.', '_')}_dim"
        dims = []
        for k, n in enumerate(shape):
            role = roles.get((site, k))
            if role is None or role.inner != 1:
                name = f"{own}{k}"
            else:
                name = f"{role.name}_{'input' if role.kind == 'input' else 'neuron'}"
            if lengths.setdefault(name, n) != n:
                name = f"{own}{k}"
                lengths[name] = n
            dims.append(name)
        out[site] = dims
    return out


def layer_groups(spec: PermutationSpec, sites: Sequence[str]) -> dict[str, str | None]:
    """``layer -> the group whose incoming axes are that layer's neurons`` (None: no group,
    e.g. the output layer), for the layers of ``sites`` in order."""
    owner: dict[str, str] = {}
    for name, group in spec.groups.items():
        for role, ax in group.roles():
            if role == "incoming":
                owner.setdefault(layer_of(ax.site), name)
    return {layer: owner.get(layer) for layer in dict.fromkeys(layer_of(s) for s in sites)}


def layer_widths(spec: PermutationSpec, shapes: Mapping[str, Sequence[int]]) -> dict[str, int | None]:
    """``layer -> number of neurons``: its group's size, or the length of the axis
    :func:`axis_roles` names the layer's own neurons (an output layer); None when the
    spec does not say (a layer no group touches)."""
    groups = layer_groups(spec, list(shapes))
    own: dict[str, int] = {}
    for (site, k), role in axis_roles(spec, shapes).items():
        if role.kind == "neuron":
            own.setdefault(layer_of(site), int(shapes[site][k]))
    return {layer: spec.groups[group].size if group is not None else own.get(layer) for layer, group in groups.items()}
