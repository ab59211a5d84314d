"""Atoms: the interchangeable-channel spaces of a recorded computation, and how they are tied.

Every dim of every recorded tensor is labelled by an *atom*. An atom is FIXED (batch,
spatial and sequence dims, inputs, network outputs: never permuted), a LEAF (a set of
interchangeable channels created by a layer's output: a Linear's rows, a conv's output
channels, an embedding dim), or *refined*:

- ``PROD(a_1, ..., a_k)``: the dim is read as ``a_1`` blocks of ``a_2`` blocks ... (row-major,
  ``a_1`` outermost): a reshape that splits channels into ``(heads, dims)`` or merges
  ``(channels, h, w)`` into one flattened dim. A LEAF split in two records the inner factor as
  *nested* in the outer one (per-slot permutations: the wreath product of the spec's nested
  groups).
- ``SUM(a_1, ..., a_k)``: the dim is the concatenation of independent slices (a ``cat`` along
  channels, the q/k/v slices of a fused projection).

Atoms live in a union-find: tying two atoms says that they must carry the same permutation
(both sides of ``+``, the contracted dims of a ``matmul``). Tying a FIXED atom fixes the other;
refinements are unified part by part, and a mismatch that cannot be expressed fixes both
sides (a smaller, still exact group).
"""

from __future__ import annotations

from collections.abc import Sequence

__all__ = ["FIXED", "LEAF", "PROD", "SUM", "Forest"]

FIXED, LEAF, PROD, SUM = "fixed", "leaf", "prod", "sum"


class Forest:
    """A union-find of atoms with sizes, refinements and nesting records."""

    def __init__(self) -> None:
        self.up: list[int] = []
        self.size: list[int] = []
        self.state: list[str] = []
        self.parts: list[tuple[int, ...]] = []
        self.origin: list[str] = []
        self.nested_in: list[int] = []  # atom recorded as the outer factor at a split, or -1
        self._expand_cache: dict[int, tuple[int, ...]] | None = None

    # ------------------------------------------------------------------ basics
    def new(self, size: int, origin: str = "", state: str = LEAF, parts: Sequence[int] = ()) -> int:
        """A new atom of ``size`` entries (FIXED when ``size == 0``)."""
        self._expand_cache = None
        a = len(self.up)
        self.up.append(a)
        self.size.append(int(size))
        self.state.append(FIXED if size == 0 else state)
        self.parts.append(tuple(parts))
        self.origin.append(origin)
        self.nested_in.append(-1)
        return a

    def fixed_atom(self, size: int) -> int:
        return self.new(size, state=FIXED)

    def find(self, a: int) -> int:
        root = a
        while self.up[root] != root:
            root = self.up[root]
        while self.up[a] != root:
            self.up[a], a = root, self.up[a]
        return root

    def is_fixed(self, a: int) -> bool:
        return self.state[self.find(a)] == FIXED

    def kind(self, a: int) -> str:
        return self.state[self.find(a)]

    def parts_of(self, a: int) -> tuple[int, ...]:
        return self.parts[self.find(a)]

    def fix(self, a: int) -> bool:
        """Fix ``a`` and everything it is made of; True if anything changed."""
        r = self.find(a)
        if self.state[r] == FIXED:
            return False
        self._expand_cache = None
        parts = self.parts[r]
        self.state[r] = FIXED
        for p in parts:
            self.fix(p)
        return True

    def _union(self, keep: int, drop: int) -> None:
        self._expand_cache = None
        self.up[drop] = keep

    # ------------------------------------------------------------------ ties
    def tie(self, a: int, b: int) -> None:
        """Require ``a`` and ``b`` to carry the same permutation."""
        ra, rb = self.find(a), self.find(b)
        if ra == rb:
            return
        if self.size[ra] != self.size[rb]:  # pragma: no cover - callers compare sizes first
            self.fix(ra)
            self.fix(rb)
            self._union(ra, rb)
            return
        sa, sb = self.state[ra], self.state[rb]
        if FIXED in (sa, sb):
            self.fix(ra)
            self.fix(rb)
            self._union(ra, rb)
        elif sa == LEAF:
            self._union(rb, ra)
        elif sb == LEAF:
            self._union(ra, rb)
        elif sa == sb and [self.size[self.find(p)] for p in self.parts[ra]] == [
            self.size[self.find(p)] for p in self.parts[rb]
        ]:
            pa, pb = self.parts[ra], self.parts[rb]
            self._union(ra, rb)
            for x, y in zip(pa, pb):
                self.tie(x, y)
        else:
            # Two incompatible refinements of one dim (e.g. (2, 6) and (3, 4) blocks): nothing
            # but the identity is known to respect both.
            self.fix(ra)
            self.fix(rb)
            self._union(ra, rb)

    # ------------------------------------------------------------------ refinements
    def factors(self, a: int) -> list[int]:
        """The flattened product factors of ``a`` (PROD refinements opened recursively)."""
        r = self.find(a)
        if self.state[r] != PROD:
            return [r]
        out: list[int] = []
        for p in self.parts[r]:
            out.extend(self.factors(p))
        return out

    def prod_of(self, parts: Sequence[int], origin: str = "") -> int:
        """A new atom read as the product of existing atoms (a merge of dims)."""
        parts = [self.find(p) for p in parts if self.size[self.find(p)] != 1 or not self.is_fixed(p)]
        size = 1
        for p in parts:
            size *= self.size[p]
        if not parts:
            return self.fixed_atom(size)
        if len(parts) == 1:
            return parts[0]
        if all(self.is_fixed(p) for p in parts):
            return self.fixed_atom(size)
        return self.new(size, origin, PROD, parts)

    def sum_of(self, parts: Sequence[int], origin: str = "") -> int:
        """A new atom read as the concatenation of existing atoms (a ``cat`` along the dim)."""
        parts = [self.find(p) for p in parts if self.size[self.find(p)] > 0]
        size = sum(self.size[p] for p in parts)
        if len(parts) == 1:
            return parts[0]
        if not parts or all(self.is_fixed(p) for p in parts):
            return self.fixed_atom(size)
        return self.new(size, origin, SUM, parts)

    def split(self, a: int, sizes: Sequence[int], names: Sequence[str] | None = None) -> list[int]:
        """Read the LEAF ``a`` as the product of new atoms of ``sizes`` (outer first).

        The second factor of a two-factor split is recorded as nested in the first; longer
        splits chain (and are later cut to one level of nesting).
        """
        r = self.find(a)
        if self.state[r] == FIXED:
            return [self.fixed_atom(s) for s in sizes]
        assert self.state[r] == LEAF, "split of a refined atom"
        origin = self.origin[r]
        names = names or [f"{origin}.{i}" for i in range(len(sizes))]
        parts = [self.new(s, n) if s > 1 else self.fixed_atom(s) for s, n in zip(sizes, names)]
        for outer, inner in zip(parts, parts[1:]):
            if self.state[outer] != FIXED and self.state[inner] != FIXED:
                self.nested_in[inner] = outer
        self._expand_cache = None
        self.state[r], self.parts[r] = PROD, tuple(parts)
        return parts

    def segment(self, a: int, lo: int, hi: int) -> list[tuple[int, tuple[int, ...] | None]]:
        """The entries ``[lo, hi)`` of ``a`` as ``(atom, path from a)`` pieces.

        A LEAF is cut into a SUM of slices (each slice permuted on its own); slices of a
        SUM reuse (and cut further) its parts. The path is None for a FIXED piece. A slice
        through the blocks of a PROD fixes the atom (not expressible as slices of one axis).
        """
        r = self.find(a)
        n = self.size[r]
        if lo <= 0 and hi >= n:
            return [(r, ())]
        if self.state[r] == FIXED:
            return [(self.fixed_atom(hi - lo), None)]
        if self.state[r] == PROD:
            self.fix(r)
            return [(self.fixed_atom(hi - lo), None)]
        if self.state[r] == LEAF:
            cuts = [c for c in (0, lo, hi, n) if 0 <= c <= n]
            cuts = sorted(set(cuts))
            base, off = _range_origin(self.origin[r])
            parts = [self.new(b - c, f"{base}[{off + c}:{off + b}]") for c, b in zip(cuts, cuts[1:])]
            self._expand_cache = None
            self.state[r], self.parts[r] = SUM, tuple(parts)
        out: list[tuple[int, tuple[int, ...] | None]] = []
        off = 0
        for i, p in enumerate(self.parts[r]):
            m = self.size[self.find(p)]
            if off < hi and off + m > lo:
                for atom, path in self.segment(p, max(lo, off) - off, min(hi, off + m) - off):
                    out.append((atom, None if path is None else (i, *path)))
            off += m
        return out

    # ------------------------------------------------------------------ reading
    def freeze(self) -> None:
        """Start reading: expansions are cached until the forest changes."""
        self._expand_cache = {}

    def expand(self, a: int) -> tuple[int, ...]:
        """The LEAF roots of ``a`` in entry order (-1 for a FIXED stretch)."""
        r = self.find(a)
        cache = self._expand_cache
        if cache is not None and r in cache:
            return cache[r]
        if self.state[r] == FIXED:
            out: tuple[int, ...] = (-1,)
        elif self.state[r] == LEAF:
            out = (r,)
        else:
            out = tuple(x for p in self.parts[r] for x in self.expand(p))
        if cache is not None:
            cache[r] = out
        return out

    def locate(self, a: int, path: tuple[int, ...]) -> tuple[int, int] | None:
        """``(offset, atom)``: where the sub-atom at ``path`` starts in ``expand(a)``, or None
        if a FIXED atom lies on the path."""
        r = self.find(a)
        start = 0
        for i in path:
            if self.state[r] == FIXED:
                return None
            parts = self.parts[r]
            start += sum(len(self.expand(p)) for p in parts[:i])
            r = self.find(parts[i])
        if self.state[r] == FIXED:
            return None
        return start, r


def _range_origin(origin: str) -> tuple[str, int]:
    """``"qkv[12:36]"`` -> ``("qkv", 12)``: slices of slices are named by absolute entries."""
    if origin.endswith("]") and "[" in origin:
        base, _, rng = origin[:-1].rpartition("[")
        lo = rng.partition(":")[0]
        if lo.isdigit():
            return base, int(lo)
    return origin, 0
