"""Resolution of a spec's axes: nesting rules, negative axes, sizes against shapes, and
disjoint spans on each axis. Called once when a :class:`~.spec.PermutationSpec` is built."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # pragma: no cover
    from .spec import Axis, NeuronGroup, PermutationSpec

__all__ = ["check_spans", "event_ndim", "negative_axis", "prefix_hint", "resolve"]


def _error(msg: str) -> Exception:
    from .spec import SpecError

    return SpecError(msg)


def prefix_hint(spec: PermutationSpec, sites: Any) -> str:
    """A hint when the spec's sites are the model's sites without a common module prefix
    (a spec built from a sub-module ``net`` of a model whose sites are ``"net.fc1.weight"``)."""
    prefixes = set()
    for s in {ax.site for g in spec.groups.values() for ax in g.axes}:
        if s in sites:
            continue
        found = [t[: -len(s)] for t in sites if t.endswith("." + s)]
        if len(found) != 1:
            return ""
        prefixes.add(found[0])
    if len(prefixes) != 1:
        return ""
    p = prefixes.pop()
    return f"; the model's sites carry the prefix {p!r}: use spec.with_prefix({p!r})"


def resolve(spec: PermutationSpec) -> None:
    """Check nesting, normalize every axis to a negative one where the site's number of
    dims is known, check sizes against shapes and that spans on one axis are disjoint."""
    for name, g in spec.groups.items():
        if g.parent is None:
            continue
        parent = spec.groups.get(g.parent)
        if parent is None:
            raise _error(f"group {name!r} is nested in {g.parent!r}, which is not a group of the spec")
        if parent.parent is not None:
            raise _error(f"group {name!r} is nested in {g.parent!r}, itself nested: one level of nesting only")
        if parent.activation_symmetry != "none":
            raise _error(
                f"group {g.parent!r} has nested groups, so it cannot have activation_symmetry="
                f"{parent.activation_symmetry!r} (its nested groups carry the sign flips)"
            )
    table: dict[str, list[tuple[str, str, Axis, int | None]]] = {}  # site -> (group, role, axis, neg)
    event_ndim: dict[str, int] = {}
    for name, g in spec.groups.items():
        for role, ax in g.roles():
            shape = None if spec.shapes is None else spec.shapes.get(ax.site)
            if spec.shapes is not None and shape is None:
                raise _error(
                    f"group {name!r} acts on site {ax.site!r}, which is not among the model's sites "
                    f"{sorted(spec.shapes)}" + prefix_hint(spec, spec.shapes)
                )
            neg = negative_axis(spec, name, g, ax, shape, event_ndim)
            table.setdefault(ax.site, []).append((name, role, ax, neg))
    for site, entries in table.items():
        check_spans(spec, site, entries)
    spec._resolved.clear()
    spec._resolved.update(table=table, event_ndim=event_ndim, actions={})


def negative_axis(
    spec: PermutationSpec,
    name: str,
    g: NeuronGroup,
    ax: Axis,
    shape: tuple[int, ...] | None,
    event_ndim: dict[str, int],
) -> int | None:
    length = spec._units(name) * ax.inner
    if shape is not None:
        nd = len(shape)
        if ax.ndim is not None and ax.ndim != nd:
            raise _error(f"group {name!r}: site {ax.site!r} has {nd} dims {shape}, not {ax.ndim}")
        if not -nd <= ax.axis < nd:
            raise _error(f"group {name!r}: axis {ax.axis} is out of range for site {ax.site!r} of shape {shape}")
        neg = ax.axis - nd if ax.axis >= 0 else ax.axis
        have = shape[neg]
        if (ax.start is None and have != length) or (ax.start is not None and ax.start + length > have):
            where = "" if ax.start is None else f" from entry {ax.start}"
            size = f"{g.size}" if g.parent is None else f"{spec.groups[g.parent].size} x {g.size}"
            raise _error(
                f"group {name!r} has size {size} (x inner {ax.inner}){where} but axis {ax.axis} of site "
                f"{ax.site!r} has length {have} (site shape {shape})"
            )
        event_ndim[ax.site] = nd
        return neg
    if ax.ndim is not None:
        if event_ndim.setdefault(ax.site, ax.ndim) != ax.ndim:
            raise _error(f"site {ax.site!r} is given ndim {ax.ndim} and {event_ndim[ax.site]}")
        return ax.axis - ax.ndim if ax.axis >= 0 else ax.axis
    return None if ax.axis >= 0 else ax.axis  # None: resolved once shapes are known


def check_spans(spec: PermutationSpec, site: str, entries: list[tuple[str, str, Axis, int | None]]) -> None:
    """Top-level spans on one axis are disjoint; a nested group's span is its parent's."""
    by_axis: dict[Any, list[tuple[str, Axis]]] = {}
    for name, _, ax, neg in entries:
        by_axis.setdefault(ax.axis if neg is None else neg, []).append((name, ax))
    for key, items in by_axis.items():
        tops = [(n, ax) for n, ax in items if spec.groups[n].parent is None]
        spans = []
        for n, ax in tops:
            lo = ax.start or 0
            spans.append((lo, lo + spec._units(n) * ax.inner, n, ax.start is None))
        spans.sort()
        for (_, hi1, n1, w1), (lo2, _, n2, w2) in zip(spans, spans[1:]):
            if hi1 > lo2 or w1 or w2:
                raise _error(f"axis {key} of site {site!r} is claimed by groups {n1!r} and {n2!r}")
        for n, ax in items:
            g = spec.groups[n]
            if g.parent is None:
                continue
            match = [pax for pn, pax in tops if pn == g.parent and (pax.start or 0) == (ax.start or 0)]
            if not match:
                raise _error(
                    f"group {n!r} is nested in {g.parent!r} but acts on axis {ax.axis} of site {site!r}"
                    + (f" from entry {ax.start}" if ax.start else "")
                    + f", where {g.parent!r} does not act"
                )
            if match[0].inner != g.size * ax.inner:
                raise _error(
                    f"group {n!r} ({g.size} units x inner {ax.inner}) is nested in {g.parent!r}, whose blocks "
                    f"on axis {ax.axis} of site {site!r} have {match[0].inner} entries, not {g.size * ax.inner}"
                )
            twins = [m for m, bx in items if m != n and spec.groups[m].parent == g.parent and bx.start == ax.start]
            if twins:
                raise _error(f"groups {n!r} and {twins[0]!r} are both nested on the same span of {site!r}")


def event_ndim(spec: PermutationSpec, site: str, batched: bool) -> int:
    """The site's number of event dims.

    Without a known shape, a site given only by negative axes is read with the
    fewest event dims those axes need: exact for unbatched group elements (the
    gather then treats extra leading dims as batch), but batched elements must
    know where the batch dims end, so they need the shape.
    """
    if site not in spec._resolved["table"]:
        raise _error(f"no group acts on site {site!r}; the spec's sites are {list(spec.sites)}")
    entries = spec._resolved["table"][site]
    nd = spec._resolved["event_ndim"].get(site)
    if nd is None:
        if any(neg is None for *_, neg in entries) or batched:
            why = "is given by a non-negative axis" if not batched else "is acted on by a batched group element"
            raise _error(
                f"site {site!r} {why} but the spec does not know the site's shape; use "
                "spec.with_shapes({site: shape, ...}) or spec.check(model, *args)"
                + ("" if batched else ", or give the axis as a negative number counting from the right")
            )
        nd = max(-neg for *_, neg in entries)
    return nd
