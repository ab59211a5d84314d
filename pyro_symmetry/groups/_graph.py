"""Symmetry analysis of a recorded forward: atoms for every dim, and how values flow.

:class:`Ctx` walks the recorded operations once. Each operation's handler (in
:mod:`._ops` and :mod:`._layers`) labels its outputs' dims with atoms (:mod:`._atoms`),
ties the atoms that must share a permutation, and records *occurrence links* for the
activation-symmetry analysis of :mod:`._resolve`:

- ``eq(a, b)``: the entries of ``a`` and ``b`` are scaled (or negated) together (both
  sides of ``+``, an activation's input and output, a layer's rows and its output);
- ``contract(a, b)``: the two are multiplied and summed over (a layer's columns reading a
  value, ``q @ k.T``);
- ``kind(a, K)``: an operation on ``a`` keeps only the symmetries in ``K`` (``{"sign",
  "scale"}``: a linear op, ``{"scale"}``: ReLU, ``{"sign"}``: tanh, ``{}``: GELU);
- ``norm_input(a)``: ``a`` is normalized (BatchNorm, LayerNorm...): its entries must not
  be scaled, so the layers writing them are *passive*;
- ``neutral(a)``: ``a`` multiplies a value but must not scale with it (BatchNorm running
  statistics, a per-channel gate, a depthwise kernel): if its own region scales, the atom
  loses sign and scale;
- ``role(a, r)``: a parameter axis with a known role (the q and k slices of a fused
  attention projection, whose internals are not recorded).

An occurrence is ``(node, dim, path)``: ``path`` selects a part of the dim's atom (a slice
of a SUM). Links are resolved when the atoms are final.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from ._atoms import Forest
from ._trace import CONST, INPUT, PARAM, UNIFORM, Op, Recording, Ref
from .spec import SpecError

__all__ = ["BOTH", "NONE", "SCALE", "SIGN", "Ctx", "Occ", "analyze"]

BOTH = frozenset({"sign", "scale"})
SCALE = frozenset({"scale"})
SIGN = frozenset({"sign"})
NONE: frozenset = frozenset()

Occ = tuple[int, int, tuple[int, ...]]  # (node, dim, path)


def origin_of(name: str) -> str:
    """Group name for the atoms a parameter creates: its layer (``fc1.weight`` -> ``fc1``,
    ``fc1.parametrizations.weight.original0`` -> ``fc1``)."""
    if ".parametrizations." in name or name.startswith("parametrizations."):
        return name.partition("parametrizations.")[0].rstrip(".") or name
    for suffix in (".weight", ".bias"):
        if name.endswith(suffix):
            return name[: -len(suffix)] or name
    return name


@dataclass
class Ctx:
    """Labels and links of one recording (see the module docstring)."""

    rec: Recording
    f: Forest = field(default_factory=Forest)
    labels: dict[int, list[int]] = field(default_factory=dict)
    links: list[tuple[list[Occ], list[Occ]]] = field(default_factory=list)
    contracts: list[tuple[Occ, Occ]] = field(default_factory=list)
    kinds: list[tuple[Occ, frozenset]] = field(default_factory=list)
    norms: list[Occ] = field(default_factory=list)
    neutrals: list[Occ] = field(default_factory=list)
    roles: list[tuple[Occ, str]] = field(default_factory=list)
    atom_kinds: list[tuple[int, frozenset]] = field(default_factory=list)
    seen: list[int] = field(default_factory=list)  # atoms of values inside composite modules
    op: Op | None = None

    # ---------------------------------------------------------------- nodes and labels
    def shape(self, node: int | Ref) -> tuple[int, ...]:
        return self.rec.nodes[_nid(node)].shape

    def node(self, node: int | Ref) -> Any:
        return self.rec.nodes[_nid(node)]

    def dims(self, node: int | Ref) -> list[int]:
        """The atoms of ``node``'s dims (created for inputs, parameters and constants)."""
        n = self.rec.nodes[_nid(node)]
        if n.id not in self.labels:
            if n.kind in (INPUT, CONST):
                self.labels[n.id] = [self.f.fixed_atom(s) for s in n.shape]
            elif n.kind == PARAM:
                o = origin_of(n.names[0])
                self.labels[n.id] = [self.f.new(s, o) for s in n.shape]
            elif n.kind == UNIFORM:
                self.labels[n.id] = [self.f.new(s) for s in n.shape]
            else:  # pragma: no cover - every op output is labelled by its handler
                raise SpecError(f"internal: tensor {n.id} of shape {n.shape} was never labelled")
        return self.labels[n.id]

    def set(self, node: int | Ref, atoms: Sequence[int]) -> None:
        """Label an op output; sizes must match its shape."""
        n = self.rec.nodes[_nid(node)]
        atoms = list(atoms)
        sizes = [self.f.size[self.f.find(a)] for a in atoms]
        if tuple(sizes) != n.shape:  # pragma: no cover - a handler bug
            raise SpecError(f"internal: {self.where()} labels shape {n.shape} with sizes {tuple(sizes)}")
        self.labels[n.id] = atoms

    def where(self) -> str:
        return self.op.describe() if self.op is not None else "the forward"

    # ---------------------------------------------------------------- links
    def tie(self, a: int, b: int) -> None:
        self.f.tie(a, b)

    def eq(self, a: Occ, b: Occ) -> None:
        self.links.append(([a], [b]))

    def eq_dims(self, a: int | Ref, da: int, b: int | Ref, db: int) -> None:
        """Tie dim ``da`` of ``a`` to dim ``db`` of ``b`` and link their entries."""
        self.tie(self.dims(a)[da], self.dims(b)[db])
        self.eq((_nid(a), da, ()), (_nid(b), db, ()))

    def flat(self, a: list[Occ], b: list[Occ]) -> None:
        self.links.append((a, b))

    def contract(self, a: int | Ref, da: int, b: int | Ref, db: int) -> None:
        """``a``'s dim ``da`` and ``b``'s dim ``db`` are multiplied and summed over."""
        self.tie(self.dims(a)[da], self.dims(b)[db])
        self.contracts.append(((_nid(a), da, ()), (_nid(b), db, ())))

    def kind(self, node: int | Ref, kind: frozenset, dims: Sequence[int] | None = None) -> None:
        nid = _nid(node)
        for d in range(len(self.shape(nid))) if dims is None else dims:
            self.kinds.append(((nid, d, ()), kind))

    def norm_input(self, node: int | Ref, dims: Sequence[int] | None = None) -> None:
        nid = _nid(node)
        for d in range(len(self.shape(nid))) if dims is None else dims:
            self.norms.append((nid, d, ()))

    def neutral(self, node: int | Ref, dim: int, path: tuple[int, ...] = ()) -> None:
        self.neutrals.append((_nid(node), dim, path))

    def role(self, node: int | Ref, dim: int, path: tuple[int, ...], role: str) -> None:
        self.roles.append(((_nid(node), dim, path), role))

    def fix(self, node: int | Ref, dims: Sequence[int] | None = None) -> None:
        atoms = self.dims(node)
        for d in range(len(atoms)) if dims is None else dims:
            self.f.fix(atoms[d])

    def fixed(self, size: int) -> int:
        return self.f.fixed_atom(size)

    # ---------------------------------------------------------------- common patterns
    def same(self, out: int | Ref, src: int | Ref, kind: frozenset = BOTH) -> None:
        """``out`` is ``src`` transformed entry by entry (an activation): same atoms, linked."""
        self.set(out, self.dims(src))
        for d in range(len(self.shape(out))):
            self.eq((_nid(out), d, ()), (_nid(src), d, ()))
        self.kind(out, kind)

    def broadcast(self, out: int, operands: Sequence[Any], modes: Sequence[str], kind: frozenset = BOTH) -> list:
        """Label ``out`` of an entrywise op over broadcast ``operands``.

        ``modes[i]``: ``"eq"`` (linked with the output), ``"neutral"`` (a parameter that is
        only permuted), ``"none"`` (tied, not linked: a mask). A size-1 dim broadcast to more
        entries fixes its atom (one value copied to every channel cannot be permuted).
        Returns, per output dim, the operands that do not have it (broadcast or scalars).
        """
        oshape = self.shape(out)
        nd = len(oshape)
        atoms, missing = [], []
        for d in range(nd):
            members, absent = [], []
            for i, x in enumerate(operands):
                if not isinstance(x, Ref):
                    absent.append(i)
                    continue
                shp = self.shape(x)
                k = d - (nd - len(shp))
                if k < 0:
                    absent.append(i)
                elif shp[k] == oshape[d]:
                    members.append((i, k))
                else:
                    self.f.fix(self.dims(x)[k])
                    absent.append(i)
            if members:
                a = self.dims(operands[members[0][0]])[members[0][1]]
                for i, k in members[1:]:
                    self.tie(a, self.dims(operands[i])[k])
            else:
                a = self.fixed(oshape[d])
            atoms.append(a)
            missing.append(absent)
            for i, k in members:
                if modes[i] == "eq":
                    self.eq((out, d, ()), (_nid(operands[i]), k, ()))
                elif modes[i] == "neutral":
                    self.neutral(operands[i], k)
        self.set(out, atoms)
        self.kind(out, kind)
        return missing


def _nid(x: int | Ref) -> int:
    return x.node if isinstance(x, Ref) else x


Handler = Callable[[Ctx, Op], None]


def analyze(rec: Recording, handlers: dict[str, Handler]) -> Ctx:
    """Run every operation's handler; fix the atoms of inputs, outputs and escaped values."""
    ctx = Ctx(rec)
    for op in rec.ops:
        ctx.op = op
        key = "module:MultiheadAttention" if op.module is not None else op.name
        handler = handlers.get(key)
        if handler is None:
            raise SpecError(
                f"cannot read {op.describe()}: from_module does not know how it acts on channels, so it "
                "cannot tell which permutations keep the function. Use supported operations, or build the "
                "PermutationSpec by hand with NeuronGroup(...)"
            )
        handler(ctx, op)
        for n in op.outs:
            if n not in ctx.labels:  # pragma: no cover - a handler bug
                raise SpecError(f"internal: {op.describe()} left an output unlabelled")
    ctx.op = None
    for n in rec.sinks:
        ctx.fix(n)
    for n, _ in rec.escapes:
        ctx.fix(n)
    return ctx
