"""Which axis of which site holds which neurons, read from the spec (never from shapes).

The diagnostics name ArviZ dims after neuron groups and report the width of every
layer. Both come from the spec's groups: an axis a group acts on holds that group's
neurons, and a two-dimensional weight whose one grouped axis is *incoming* (the rows
of ``fc1.weight``, the columns of a NumPyro-style ``w1`` of shape ``(in, hidden)``)
has its layer's inputs on the other axis, while one whose grouped axis is *outgoing*
(the columns of the output layer's ``fc3.weight``, the rows of ``w2`` of shape
``(hidden, out)``) has its layer's own (output) neurons there. Nothing else is
guessed: an axis no group determines gets a site-specific name and no width.

:func:`axis_roles` is the one place in ``diagnostics`` that reads the groups' axis
tuples (the ``groups`` refactor will answer it through its per-site action).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import NamedTuple

from ..groups import PermutationSpec

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


def axis_roles(spec: PermutationSpec | None, shapes: Mapping[str, Sequence[int]]) -> dict[tuple[str, int], AxisRole]:
    """``(site, event axis >= 0) -> AxisRole`` for every axis the spec determines.

    Parameters
    ----------
    spec : PermutationSpec or None
    shapes : mapping ``site -> own (event) shape``
        The sites' shapes without draw/chain dims.
    """
    roles: dict[tuple[str, int], AxisRole] = {}
    if spec is None:
        return roles
    for name, group in spec.groups.items():
        for role, axes in (("incoming", group.incoming), ("outgoing", group.outgoing)):
            for ax in axes:
                shape = shapes.get(ax.site)
                if shape is None or not -len(shape) <= ax.axis < len(shape):
                    continue  # a site the draws lack, or a spec that does not fit them (checked elsewhere)
                roles[(ax.site, ax.axis % len(shape))] = AxisRole("group", name, role, ax.inner)
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
        for ax in group.incoming:
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
