"""From labelled atoms to neuron groups: structure checks, scaled regions, roles and kinds.

1. *Structure* (a fixpoint; each step only fixes atoms, so it terminates): a nested atom
   must sit inside its parent in every tensor that carries it (per-slot permutations need the
   slot), one level of nesting, and every parameter axis must be expressible as
   :class:`~.spec.Axis` spans (blocks, slices, one nested group inside a block). An atom that
   never reaches a value of the forward (an unused parameter, the unread tail of a position
   table) is fixed: it moves nothing the recorded run can see.
2. *Scaled regions*: the occurrence links of :mod:`._graph` join entries that scale together
   into components. A component holding a value of the forward is *active* when a parameter
   writes into it (a layer's rows, a norm's affine weight, a class token) and nothing normalizes
   it; a normalized one (BatchNorm/LayerNorm input) is *passive*. A parameter axis in an active
   component is ``incoming``, one reading an active component is ``outgoing``, everything else
   ``passive``.
3. *Kinds*: the symmetries an atom keeps are those every operation on its active components
   keeps (a value times a value contracted over an atom keeps only sign flips).
"""

from __future__ import annotations

import math
from collections import defaultdict
from dataclasses import dataclass

from ._atoms import FIXED, LEAF, SUM, Forest
from ._graph import BOTH, NONE, SIGN, Ctx
from ._trace import PARAM
from .spec import Axis, NeuronGroup, SpecError

__all__ = ["build_groups"]


@dataclass
class Block:
    """One span of a parameter axis: ``size(top) * inner`` entries from ``offset``."""

    offset: int
    top: int
    inner: int
    top_pos: int
    child: int | None = None
    child_inner: int = 1
    child_pos: int = -1


# ---------------------------------------------------------------------- 1. structure
def _parents(f: Forest) -> tuple[dict[int, int], bool]:
    """``leaf -> parent leaf`` of nested atoms; conflicting or deep nesting is fixed."""
    cand: dict[int, set[int]] = defaultdict(set)
    for a, p in enumerate(f.nested_in):
        if p >= 0:
            cand[f.find(a)].add(f.find(p))
    out, changed = {}, False
    for r, ps in cand.items():
        if f.state[r] != LEAF:
            continue
        if len(ps) != 1 or f.state[next(iter(ps))] != LEAF:
            changed |= f.fix(r)
            continue
        out[r] = next(iter(ps))
    for r, p in list(out.items()):
        if p in out:  # one level of nesting only
            changed |= f.fix(r)
            del out[r]
    return out, changed


def _layout(f: Forest, a: int, parents: dict[int, int], pos: int = 0) -> tuple[list[Block], list[int]]:
    """Spans of an axis labelled ``a`` (and atoms to fix where none can express it)."""
    r = f.find(a)
    st = f.state[r]
    if st == FIXED:
        return [], []
    if st == LEAF:
        return [Block(0, r, 1, pos)], []
    if st == SUM:
        blocks, fixes, off = [], [], 0
        for p in f.parts[r]:
            sub, fx = _layout(f, p, parents, pos)
            blocks += [_shift(b, off) for b in sub]
            fixes += fx
            off += f.size[f.find(p)]
            pos += len(f.expand(p))
        return blocks, fixes
    fs = f.factors(r)
    starts = [pos + sum(len(f.expand(x)) for x in fs[:i]) for i in range(len(fs))]
    free = [i for i, x in enumerate(fs) if f.state[x] != FIXED]
    if not free:
        return [], []
    i0 = free[0]
    top = fs[i0]
    j, child = i0 + 1, None
    if j < len(fs) and f.state[top] == LEAF and f.state[fs[j]] == LEAF and parents.get(fs[j]) == top:
        child, j = fs[j], j + 1
    bad = [x for x in fs[j:] if f.state[x] != FIXED]
    if bad:
        return [], bad
    trailing = math.prod(f.size[x] for x in fs[j:])
    outer = math.prod(f.size[x] for x in fs[:i0])
    if f.state[top] == SUM:
        sub, fixes = _layout(f, top, parents, starts[i0])
        sub = [_scale(b, trailing) for b in sub]
    else:
        inner = trailing * (f.size[child] if child is not None else 1)
        pos_c = starts[i0 + 1] if child is not None else -1
        sub, fixes = [Block(0, top, inner, starts[i0], child, trailing, pos_c)], []
    width = f.size[top] * trailing * (f.size[child] if child is not None else 1)
    return [_shift(b, o * width) for o in range(outer) for b in sub], fixes


def _shift(b: Block, off: int) -> Block:
    return Block(b.offset + off, b.top, b.inner, b.top_pos, b.child, b.child_inner, b.child_pos)


def _scale(b: Block, k: int) -> Block:
    return Block(b.offset * k, b.top, b.inner * k, b.top_pos, b.child, b.child_inner * k, b.child_pos)


def _leaves(f: Forest, atoms: list[int]) -> set[int]:
    return {x for a in atoms for x in f.expand(a) if x >= 0}


def settle(ctx: Ctx) -> dict[int, int]:
    """Fix atoms until every rule of the module docstring (1.) holds; return the nesting."""
    f = ctx.f
    params = [n for n in ctx.rec.nodes.values() if n.kind == PARAM and n.id in ctx.labels]
    while True:
        f.freeze()
        parents, changed = _parents(f)
        f.freeze()
        seen_in_values: set[int] = _leaves(f, ctx.seen)
        for nid, atoms in ctx.labels.items():
            leaves = _leaves(f, atoms)
            if ctx.rec.nodes[nid].is_value:
                seen_in_values |= leaves
            for leaf in leaves:
                p = parents.get(leaf)
                if p is not None and p not in leaves:
                    changed |= f.fix(leaf)
        for n in params:
            for a in ctx.labels[n.id]:
                for x in _layout(f, a, parents)[1]:
                    changed |= f.fix(x)
        for atoms in ctx.labels.values():
            for leaf in _leaves(f, atoms):
                if leaf not in seen_in_values:
                    changed |= f.fix(leaf)
        if not changed:
            f.freeze()
            return _parents(f)[0]


# ---------------------------------------------------------------------- 2. regions
class _Regions:
    """Union-find over occurrences ``(node, dim, position)`` of leaves."""

    def __init__(self, ctx: Ctx) -> None:
        self.ctx = ctx
        self.up: dict[tuple, tuple] = {}
        self.leaf: dict[tuple, int] = {}

    def find(self, k: tuple) -> tuple:
        self.up.setdefault(k, k)
        while self.up[k] != k:
            self.up[k] = self.up[self.up[k]]
            k = self.up[k]
        return k

    def expand(self, occ: tuple) -> list[tuple[tuple, int]]:
        node, dim, path = occ
        f = self.ctx.f
        loc = f.locate(self.ctx.labels[node][dim], path)
        if loc is None:
            return []
        start, sub = loc
        out = []
        for i, leaf in enumerate(f.expand(sub)):
            if leaf >= 0:
                k = (node, dim, start + i)
                self.leaf[k] = leaf
                out.append((k, leaf))
        return out

    def pairs(self, a: list[tuple], b: list[tuple]) -> list[tuple[tuple, tuple]]:
        ea = [x for o in a for x in self.expand(o)]
        eb = [x for o in b for x in self.expand(o)]
        if [leaf for _, leaf in ea] != [leaf for _, leaf in eb]:  # pragma: no cover - a handler bug
            raise SpecError(f"internal: inconsistent link between {a} and {b}")
        return [(ka, kb) for (ka, _), (kb, _) in zip(ea, eb)]


def regions(ctx: Ctx) -> tuple[dict[tuple, str], dict[int, frozenset]]:
    """Roles of parameter occurrences and the kinds each leaf keeps."""
    R = _Regions(ctx)
    forced = {k: role for occ, role in ctx.roles for k, _ in R.expand(occ)}
    for a, b in ctx.links:
        for ka, kb in R.pairs(a, b):
            if ka not in forced and kb not in forced:
                R.up[R.find(ka)] = R.find(kb)
    contract_pairs = [p for a, b in ctx.contracts for p in R.pairs([a], [b])]
    kind_keys = [(k, kind) for occ, kind in ctx.kinds for k, _ in R.expand(occ) if k not in forced]
    unscaled = [k for occ in ctx.neutrals for k, _ in R.expand(occ) if k not in forced]
    members: dict[tuple, list[tuple]] = defaultdict(list)
    for k in list(R.leaf):
        if k not in forced:
            members[R.find(k)].append(k)
    nodes = ctx.rec.nodes
    value = {c: any(nodes[k[0]].is_value for k in ks) for c, ks in members.items()}
    source = {c: any(nodes[k[0]].kind == PARAM for k in ks) for c, ks in members.items()}
    normed = {R.find(k) for o in ctx.norms for k, _ in R.expand(o)}
    active = {c for c in members if value[c] and source[c] and c not in normed}
    kinds: dict[int, frozenset] = defaultdict(lambda: BOTH)
    reads: dict[tuple, set[bool]] = defaultdict(set)
    for ka, kb in contract_pairs:
        _contract(R, ka, kb, value, active, kinds, reads, forced)
    for c, seen in reads.items():
        if len(seen) > 1:  # a parameter reading both scaled and unscaled entries
            kinds[R.leaf[c]] = NONE
    for k in unscaled:  # a factor that must not scale (a BatchNorm statistic, a gate)
        c = R.find(k)
        if c in active or (not value.get(c) and True in reads.get(c, ())):
            kinds[R.leaf[k]] = NONE
    _leaf_kinds(R, ctx, members, active, kind_keys, forced, kinds)
    roles = dict(forced)
    for c, ks in members.items():
        for k in ks:
            if nodes[k[0]].kind != PARAM:
                continue
            if value[c]:
                roles[k] = "incoming" if c in active else "passive"
            else:
                roles[k] = "outgoing" if True in reads.get(c, ()) else "passive"
    return roles, kinds


def _leaf_kinds(R: _Regions, ctx: Ctx, members: dict, active: set, kind_keys: list, forced: dict, kinds: dict) -> None:
    """Each leaf keeps what every operation on its active components keeps; a leaf with no
    scaled entries keeps nothing (except inside composite modules, given by their handler)."""
    comp_kind: dict[tuple, frozenset] = defaultdict(lambda: BOTH)
    for k, kind in kind_keys:
        comp_kind[R.find(k)] &= kind
    has_active: set[int] = set()
    for c in members:
        if c in active:
            kinds[R.leaf[c]] &= comp_kind[c]
            has_active.add(R.leaf[c])
    forced_leaves = {R.leaf[k] for k in forced}
    for leaf in {R.leaf[c] for c in members} | forced_leaves:
        if leaf not in has_active and leaf not in forced_leaves:
            kinds[leaf] = NONE
        else:
            kinds[leaf] &= BOTH
    for atom, kind in ctx.atom_kinds:
        for leaf in ctx.f.expand(atom):
            if leaf >= 0:
                kinds[leaf] &= kind


def _contract(R: _Regions, ka: tuple, kb: tuple, value: dict, active: set, kinds: dict, reads: dict, forced) -> None:
    leaf = R.leaf[ka]
    if ka in forced or kb in forced:
        return
    ca, cb = R.find(ka), R.find(kb)
    va, vb = value.get(ca, False), value.get(cb, False)
    if va and vb:
        n_active = (ca in active) + (cb in active)
        if n_active == 2:
            kinds[leaf] &= SIGN
        elif n_active == 1:
            kinds[leaf] = NONE
    elif va or vb:
        reader, read = (cb, ca) if va else (ca, cb)
        reads[reader].add(read in active)
    else:
        kinds[leaf] = NONE


# ---------------------------------------------------------------------- 3. groups
def _symmetry(kind: frozenset, nested: bool, parent: bool) -> str:
    if parent:
        return "none"
    if "scale" in kind and not nested:
        return "scale"
    return "sign" if "sign" in kind else "none"


def _names(f: Forest) -> dict[int, str]:
    names: dict[int, str] = {}
    for a in range(len(f.up)):
        r = f.find(a)
        if r not in names and f.origin[a]:
            names[r] = f.origin[a]
    return names


def build_groups(ctx: Ctx) -> dict[str, NeuronGroup]:
    """The spec's groups, in order of first appearance in the forward."""
    f = ctx.f
    parents = settle(ctx)
    roles, kinds = regions(ctx)
    axes: dict[int, dict[str, list[Axis]]] = defaultdict(lambda: {"incoming": [], "outgoing": [], "passive": []})
    for n in ctx.rec.nodes.values():
        if n.kind != PARAM or n.id not in ctx.labels:
            continue
        nd = len(n.shape)
        for d, a in enumerate(ctx.labels[n.id]):
            for b in _layout(f, a, parents)[0]:
                whole = b.offset == 0 and f.size[b.top] * b.inner == n.shape[d]
                start = None if whole else b.offset
                r_top = roles.get((n.id, d, b.top_pos), "passive")
                if b.child is not None:
                    r_child = roles.get((n.id, d, b.child_pos), "passive")
                    r_top = r_child
                for site in n.names:
                    axes[b.top][r_top].append(Axis(site, d - nd, b.inner, nd, start))
                    if b.child is not None:
                        axes[b.child][r_child].append(Axis(site, d - nd, b.child_inner, nd, start))
    has_child = set(parents.values())
    names = _names(f)
    first: dict[int, int] = {}
    for a in range(len(f.up)):
        first.setdefault(f.find(a), a)
    order = sorted(axes, key=first.__getitem__)
    taken: set[str] = set()
    label: dict[int, str] = {}
    for r in order:
        base = names.get(r) or "group"
        name, k = base, 2
        while name in taken:
            name, k = f"{base}#{k}", k + 1
        taken.add(name)
        label[r] = name
    groups = {}
    for r in order:
        nested = r in parents
        sym = _symmetry(kinds.get(r, NONE), nested, r in has_child)
        if f.size[r] == 1 and sym == "none" and r not in has_child:
            continue  # a one-unit group with nothing to flip is the identity
        parent = label[parents[r]] if nested else None
        a = axes[r]
        groups[label[r]] = NeuronGroup(
            f.size[r], a["incoming"], a["outgoing"], sym, passive=a["passive"], parent=parent
        )
    return groups
