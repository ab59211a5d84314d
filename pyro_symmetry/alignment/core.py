"""Coordinate-descent matching of a posterior to a reference, up to symmetry.

Given a reference posterior ``q0`` and targets ``q1`` (one, or a batch of them),
find the group element ``g`` minimizing

.. math::

    C(g) = \\|\\mu_0 - g.\\mu_1\\|^2 + \\|\\sigma_0 - |g|.\\sigma_1\\|^2

(the squared 2-Wasserstein distance between diagonal Gaussians; Rossi, Singh and
Hannagan, NeurIPS 2023), or ``||w0 - g.w1||^2`` for point estimates (Git Re-Basin
weight matching; Ainsworth, Hayase and Srinivasa, ICLR 2023). With every other
neuron group fixed, ``C`` is linear in one group's (signed) permutation: the
group's similarity matrix ``S[i, j]`` sums ``<x0[.., i, ..], x1'[.., j, ..]>`` over
every ``(site, axis)`` the group touches, with ``x1'`` the target acted on by the
other groups, and the best assignment is one :func:`scipy.optimize.linear_sum_assignment`.
For sign-flip groups (odd activations) matching ``i`` to ``j`` with sign ``s``
scores ``s M[i, j] + V[i, j]`` (``M`` from the means, which flip, ``V`` from the
standard deviations, which do not), so the best sign per pair is
``sign(M[i, j])`` and the step stays one assignment of ``|M| + V``.

Groups may act on slices of an axis (the q, k, v parts of a fused attention
projection) and may be nested (heads permuted as blocks, the q/k dims and the v dims
permuted within each head). A parent and its nested groups are one coordinate of the
descent, solved exactly over the wreath product: the value of matching reference head
``h`` to target head ``h'`` is the parent's own similarity plus each nested group's
optimal within-head assignment for that pair, and one assignment of these values
picks the heads (:mod:`~pyro_symmetry.alignment.assign`). How groups act on a site is
read from ``spec.action(site)`` only (blocks per unit, and the action of the others).

This module holds the batched engine: every target of a batch runs its own
coordinate descent; the similarity products of all targets are one GEMM per
``(site, axis)`` in float32 (float64 for float64 inputs), while assignment scores,
acceptance tests and the objective are summed in float64. A step is accepted only if
it lowers ``C`` by more than ``64 eps`` of the energy ``||q0||^2 + ||q1||^2``, ``eps``
that of float32 (float64 for float64 inputs), the dtype ``C`` is computed in; with a
coarser compute dtype (float16, bfloat16) the similarities only propose steps, and
each is checked with ``C`` itself, computed from the inputs (as is the objective).
Similarity terms whose neighbouring groups did not move are cached, as are per-site
costs; a group whose neighbours did not change since it was last solved is skipped;
and a group whose row-wise best matches already form a permutation skips the
assignment solver (that permutation attains the bound ``sum_i max_j S[i, j]``). Only
the solver calls loop.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field

import torch

from ..groups import PermutationSpec, Span, SpecError, decode_signed
from .assign import Parts, assign, assign_family, family_value, value
from .inputs import sq_norm as _sq_norm

__all__ = ["Channels", "Solution", "coordinate_descent"]

Channels = tuple[torch.Tensor, "torch.Tensor | None"]


# ---------------------------------------------------------------------------- engine
def _sel(t: torch.Tensor | None, idx: torch.Tensor | None) -> torch.Tensor | None:
    return t if idx is None or t is None else t.index_select(0, idx)


def _add(a: torch.Tensor | None, b: torch.Tensor | None) -> torch.Tensor | None:
    return b if a is None else a if b is None else a + b


def _sum_parts(a: Parts | None, b: Parts | None) -> Parts | None:
    return b if a is None else a if b is None else [_add(x, y) for x, y in zip(a, b)]


@dataclass
class _Term:
    """One span of a family on one site: the rows of its similarity are the units of ``group``
    (the top-level group ``top`` itself, or one of its nested groups)."""

    group: str
    top: str
    site: str
    span: Span
    flips: bool  # the group's sign flips negate these entries (not on a passive axis)
    others: tuple[str, ...]  # top-level groups the value depends on (``top`` itself when coupled)
    coupled: bool  # the family also acts on another axis of the site
    ref: list[torch.Tensor] = field(default_factory=list)  # per channel, reference blocks (*unit, m)
    key: torch.Tensor | None = None  # (B, len(others)) versions the cached value was computed at
    value: Parts | None = None  # cached similarity per stored channel, (B, n, n) or (B, H, H, d, d)

    @property
    def nested(self) -> bool:
        return len(self.span.shape) == 2


@dataclass
class Solution:
    """Output of :func:`coordinate_descent` (all batched over targets)."""

    perm: dict[str, torch.Tensor]  # group -> (B, *unit_shape)
    objective: torch.Tensor  # (B, sweeps + 1) float64
    converged: torch.Tensor  # (B,) bool
    sweeps: int


class _Engine:
    """Batched coordinate descent of targets ``(B, *shape)`` onto one reference.

    The descent visits the top-level groups; a group with nested groups is solved jointly
    with them (:func:`~pyro_symmetry.alignment.assign.assign_family`). How groups act on a
    site is read from ``spec.action(site)`` only.
    """

    def __init__(
        self,
        spec: PermutationSpec,
        ref: Mapping[str, Channels],
        tgt: Mapping[str, Channels],
        compute_dtype: torch.dtype | None,
        rtol: float | None,
    ) -> None:
        self.spec = spec
        self.names = list(spec.top_level)
        self.family = {g: (g, *spec.children(g)) for g in self.names}
        self.top_of = {h: g for g in self.names for h in self.family[g]}
        self.signed = {g: spec.groups[g].signed for g in spec.groups}
        self.actions = {s: spec.action(s) for s in spec.sites}
        self.site_tops = {s: list(dict.fromkeys(self.top_of[h] for h in a.groups)) for s, a in self.actions.items()}
        self.ref, self.tgt = ref, tgt
        first = tgt[spec.sites[0]][0]
        self.B, self.device = first.shape[0], first.device
        dtypes = [t.dtype for ch in (*ref.values(), *tgt.values()) for t in ch if t is not None]
        # Costs: differences in float32 (float64 if any input is), squares summed in float64.
        kdt = torch.float64 if torch.float64 in dtypes else torch.float32
        self.cdt = compute_dtype or kdt
        self.nch = 1 if ref[spec.sites[0]][1] is None else 2
        # Products in the compute dtype, their sums in float64 (no copy when the dtype matches).
        self.tgt_c = {s: [t.to(self.cdt) for t in ch if t is not None] for s, ch in tgt.items()}
        self.ref_c = {s: [t.to(self.cdt) for t in ch if t is not None] for s, ch in ref.items()}
        if self.cdt == kdt:  # one copy of half-precision inputs, not two
            self.tgt_in, self.ref_in = self.tgt_c, self.ref_c
        else:
            self.tgt_in = {s: [t.to(kdt) for t in ch if t is not None] for s, ch in tgt.items()}
            self.ref_in = {s: [t.to(kdt) for t in ch if t is not None] for s, ch in ref.items()}
        # Similarities coarser than the costs (float16/bfloat16 products) only propose steps:
        # each one is then checked with the cost itself.
        cost_eps = torch.finfo(kdt).eps
        self.verify = torch.finfo(self.cdt).eps > cost_eps
        self.perm = {g: spec.identity((self.B,), device=self.device)[g].clone() for g in spec.groups}
        self.version = {g: torch.zeros(self.B, dtype=torch.long, device=self.device) for g in self.names}
        self.terms: dict[str, list[_Term]] = {g: [] for g in self.names}
        for site in spec.sites:
            self._add_terms(site)
        self.neigh = {g: sorted({o for t in self.terms[g] for o in t.others}) for g in self.names}
        self.self_coupled = {g: g in self.neigh[g] for g in self.names}
        # Neighbour versions at each group's last solve; a group is re-solved only when they moved.
        self.seen = {
            g: torch.zeros(self.B, len(self.neigh[g]), dtype=torch.long, device=self.device) for g in self.names
        }
        self.solved = {g: torch.zeros(self.B, dtype=torch.bool, device=self.device) for g in self.names}
        self.site_cost: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
        # Terms no other group acts on never change: one matrix per group, computed once.
        self.const = {g: self._products([t for t in self.terms[g] if not t.others], None) for g in self.names}
        energy = sum(
            _sq_norm(r.unsqueeze(0)) + _sq_norm(t) for s in spec.sites for r, t in zip(ref[s], tgt[s]) if r is not None
        )
        # The acceptance tolerance is the rounding level of the cost (float64: 1.4e-14 of the
        # energy), never that of a coarse compute dtype (bfloat16's would be half the energy).
        rtol = 64 * cost_eps if rtol is None else rtol
        self.tol = rtol * energy
        self.group_sites = {g: sorted({t.site for t in self.terms[g]}) for g in self.names}

    def _add_terms(self, site: str) -> None:
        """One term per top-level span on ``site``, read at the units of the nested group that
        covers it (if any): a parent's blocks on such a span are its children's units."""
        action = self.actions[site]
        for span in action.spans:
            g = span.group
            if g not in self.family:
                continue  # a nested group's span: handled with its parent's span
            nested = [s for s in action.spans if s.group in self.family[g][1:]]
            unit = next((s for s in nested if (s.axis, s.start) == (span.axis, span.start)), span)
            axes = {s.axis for s in action.spans if self.top_of[s.group] == g}
            coupled = len(axes) > 1
            others = tuple(h for h in self.site_tops[site] if h != g) + ((g,) if coupled else ())
            flips = self.signed[unit.group] and unit.role != "passive"
            term = _Term(unit.group, g, site, unit, flips, others, coupled)
            term.ref = [action.blocks(t, unit) for t in self.ref_c[site]]
            self.terms[g].append(term)

    # -------------------------------------------------------------- similarities
    def _store(self, term: _Term, mu: torch.Tensor, sd: torch.Tensor | None) -> Parts:
        """Sign-flip groups keep ``[M, V]`` apart (what a flip negates: means on axes that flip;
        what it does not: standard deviations, passive axes), ``None`` for an empty part;
        other groups only the sum ``[S]``."""
        if not self.signed[term.group]:
            return [_add(mu, sd)]
        return [mu, sd] if term.flips else [None, _add(mu, sd)]

    def _pattern(self, term: _Term) -> list[bool]:
        """Which of :meth:`_store`'s parts are tensors (not ``None``) for ``term``."""
        if not self.signed[term.group]:
            return [True]
        return [True, self.nch == 2] if term.flips else [False, True]

    def _shape(self, term: _Term) -> tuple[int, ...]:
        """Shape of one target's similarity: ``(n, n)`` or ``(H, H, d, d)``."""
        if term.nested:
            H, d = term.span.shape
            return (H, H, d, d)
        return (term.span.shape[0],) * 2

    def _target_blocks(self, term: _Term, x: torch.Tensor, c: int, idx: torch.Tensor | None) -> torch.Tensor:
        """The target's blocks on the term's span, acted on by every group but the family's own
        units there: ``(B', n, m)`` or ``(B', H, d, m)``."""
        action = self.actions[term.site]
        if not term.others:
            return action.blocks(x, term.span)
        element = {h: self._perm_rows(h, idx) for h in action.groups}
        if not term.coupled:
            x = action.apply(x, element, skip=self.family[term.top], unsigned=c == 1)
            return action.blocks(x, term.span)
        # The family acts on another axis of this site too: act with everything, then undo
        # the family's permutation of the span's own units (a scatter of the rows).
        z = action.blocks(action.apply(x, element, unsigned=c == 1), term.span)
        p = _sel(self.perm[term.group], idx)
        src, neg = decode_signed(p)
        if term.nested:
            parent = decode_signed(_sel(self.perm[term.top], idx))[0]
            src = parent.unsqueeze(-1) * src.shape[-1] + src
        flat = z.reshape(z.shape[0], -1, z.shape[-1])
        src, neg = src.reshape(src.shape[0], -1), neg.reshape(neg.shape[0], -1)
        if c == 0 and term.flips:
            flat = flat * torch.where(neg, -1, 1).to(flat.dtype).unsqueeze(-1)
        out = torch.empty_like(flat).scatter_(1, src.unsqueeze(-1).expand_as(flat), flat)
        return out.reshape(z.shape)

    def _gram(self, term: _Term, idx: torch.Tensor | None) -> Parts:
        """``S[b, i, j] = <ref_i, (others . tgt_b)_j>`` for one term, ``(B', n, n)`` (``(B', H, H, d, d)``
        for a nested group) in the compute dtype, stored as :meth:`_store` says."""
        out = []
        for c, (r, x) in enumerate(zip(term.ref, self.tgt_c[term.site])):
            z = self._target_blocks(term, _sel(x, idx), c, idx)
            if term.nested:
                out.append(torch.einsum("hjm,bgkm->bhgjk", r, z))
            elif z.shape[0] == 1:  # one GEMM per term: (n, K) x (K, n) for one target
                out.append((r @ z[0].T).unsqueeze(0))
            else:  # (B n, K) x (K, n) for a batch
                out.append(torch.matmul(z, r.T).transpose(-1, -2))
        return self._store(term, out[0], out[1] if len(out) > 1 else None)

    def _products(self, terms: list[_Term], idx: torch.Tensor | None) -> dict[str, Parts]:
        total: dict[str, Parts] = {}
        for t in terms:
            total[t.group] = _sum_parts(total.get(t.group), self._gram(t, idx))
        return total

    def _perm_rows(self, g: str, idx: torch.Tensor | None) -> torch.Tensor:
        p = _sel(self.perm[g], idx)
        return p[0] if p.shape[0] == 1 else p  # one target: the gather's unbatched fast path

    def _cached(self, term: _Term, idx: torch.Tensor | None) -> Parts:
        key = torch.stack([_sel(self.version[o], idx) for o in term.others], -1)
        if term.value is None and idx is None:
            term.value, term.key = self._gram(term, None), key
            return term.value
        if term.value is None:
            shape = (self.B, *self._shape(term))
            term.value = [
                torch.zeros(shape, dtype=self.cdt, device=self.device) if used else None for used in self._pattern(term)
            ]
            term.key = torch.full((self.B, len(term.others)), -1, dtype=torch.long, device=self.device)
        stale = (_sel(term.key, idx) != key).any(-1)
        if bool(stale.all()) and idx is None:
            term.value, term.key = self._gram(term, None), key
        elif bool(stale.any()):
            sidx = stale.nonzero().squeeze(-1) if idx is None else idx[stale]
            for v, new in zip(term.value, self._gram(term, sidx)):
                if v is not None:
                    v[sidx] = new
            term.key[sidx] = key[stale]
        return [_sel(v, idx) for v in term.value]

    def similarity(self, g: str, idx: torch.Tensor | None, terms: list[_Term] | None = None) -> dict[str, Parts]:
        """``unit group -> parts`` of family ``g`` for targets ``idx``."""
        total = {h: [_sel(c, idx) for c in parts] for h, parts in self.const[g].items()}
        use = [t for t in self.terms[g] if t.others] if terms is None else terms
        for t in use:
            total[t.group] = _sum_parts(total.get(t.group), self._cached(t, idx))
        return total

    # -------------------------------------------------------------- one group
    def _assign(self, g: str, sim: dict[str, Parts], n: int) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
        """Best element of family ``g`` for ``n`` targets: ``(group -> perm, its score (n,))``."""
        if len(self.family[g]) == 1:
            perm, best, _ = assign(sim[g], self.signed[g])
            return {g: perm}, best
        own, children = self._family_parts(g, sim, n)
        parent, nested, best = assign_family(own, children, n, self.spec.groups[g].size, self.device)
        return {g: parent, **nested}, best

    def _family_parts(self, g: str, sim: dict[str, Parts], n: int) -> tuple[torch.Tensor | None, dict]:
        own = sim[g][0] if g in sim else None
        children = {}
        for c in self.family[g][1:]:
            if c not in sim:  # no term of this nested group yet (greedy start): no preference
                H, d = self.spec.unit_shape(c)
                sim[c] = [torch.zeros(n, H, H, d, d, dtype=torch.float64, device=self.device)]
                children[c] = (sim[c], False)
            else:
                children[c] = (sim[c], self.signed[c])
        return own, children

    def _value(self, g: str, sim: dict[str, Parts], perm: Mapping[str, torch.Tensor], n: int) -> torch.Tensor:
        """Linear score of a family element (the parts of :meth:`similarity`)."""
        if len(self.family[g]) == 1:
            return value(sim[g], self.signed[g], perm[g])
        own, children = self._family_parts(g, sim, n)
        return family_value(own, children, perm[g], {c: perm[c] for c in children})

    def solve_group(
        self, g: str, idx: torch.Tensor | None, force: bool = False, terms: list[_Term] | None = None
    ) -> None:
        """Re-solve family ``g`` for targets ``idx`` (None: all); keep the old element unless strictly better."""
        sim = self.similarity(g, idx, terms)
        n = self.B if idx is None else idx.numel()
        new, best = self._assign(g, sim, n)
        old = {h: _sel(self.perm[h], idx) for h in self.family[g]}
        if idx is None:
            idx = torch.arange(self.B, device=self.device)
        moved = torch.stack([(new[h] != old[h]).reshape(n, -1).any(-1) for h in self.family[g]]).any(0)
        if force:
            accept = moved
        elif self.verify:
            # Coarse similarities can neither confirm nor rule out an improvement: check them all.
            accept = self._improves(g, idx, new, moved)
        else:
            accept = best - self._value(g, sim, old, n) > _sel(self.tol, idx)
            if self.self_coupled[g]:
                # The score is only linear in p when no site is acted on twice by g.
                accept = self._improves(g, idx, new, accept)
        if bool(accept.any()):
            sel = idx[accept]
            for h in self.family[g]:
                self.perm[h][sel] = new[h][accept]
            self.version[g][sel] += 1

    def _improves(
        self, g: str, idx: torch.Tensor, new: Mapping[str, torch.Tensor], candidates: torch.Tensor
    ) -> torch.Tensor:
        """Which ``candidates`` lower the cost ``C`` of targets ``idx`` by more than the
        tolerance when family ``g`` takes ``new`` (costs over the sites ``g`` acts on)."""
        if not bool(candidates.any()):
            return candidates
        sites = self.group_sites[g]
        before = self.cost(idx, sites)
        trial = {}
        for h in self.family[g]:
            trial[h] = self.perm[h].clone()
            trial[h][idx[candidates]] = new[h][candidates]
        return candidates & (self.cost(idx, sites, trial) < before - _sel(self.tol, idx))

    # -------------------------------------------------------------- objective
    def cost(self, idx: torch.Tensor | None = None, sites=None, override: Mapping | None = None) -> torch.Tensor:
        """``C(g)`` per target over ``sites`` (default: all): differences in float32 (float64
        for float64 inputs) whatever the compute dtype, squares accumulated in float64."""
        perm = {**self.perm, **(override or {})}
        return sum(self._site_cost(s, perm, idx) for s in (sites or self.spec.sites))

    def _site_cost(self, site: str, perm: Mapping[str, torch.Tensor], idx: torch.Tensor | None) -> torch.Tensor:
        action = self.actions[site]
        element = {h: _sel(perm[h], idx) for h in action.groups}
        total = 0.0
        for c, (r, x) in enumerate(zip(self.ref_in[site], self.tgt_in[site])):
            total = total + _sq_norm(r - action.apply(_sel(x, idx), element, unsigned=c == 1))
        return total

    def objective(self) -> torch.Tensor:
        """``C(g)`` per target, recomputing only the sites whose groups moved since last time."""
        total = torch.zeros(self.B, dtype=torch.float64, device=self.device)
        for s, tops in self.site_tops.items():
            key = torch.stack([self.version[g] for g in tops], -1)
            if s not in self.site_cost:
                self.site_cost[s] = (key, self._site_cost(s, self.perm, None))
            old_key, value = self.site_cost[s]
            stale = (old_key != key).any(-1)
            if bool(stale.any()):
                sidx = stale.nonzero().squeeze(-1)
                value = value.clone()
                value[sidx] = self._site_cost(s, self.perm, sidx)
                self.site_cost[s] = (key, value)
            total += value
        return total

    # -------------------------------------------------------------- driver
    def initialize(self, init: str | Mapping[str, torch.Tensor]) -> None:
        if isinstance(init, Mapping):
            self._set_init(init)
            return
        if init == "identity":
            return
        if init != "greedy":
            raise ValueError(f"init must be 'greedy', 'identity' or a mapping of permutations, got {init!r}")
        # Greedy: groups in spec order (input to output for built specs), each matched on the
        # terms whose other groups are already matched (its incoming weights), as in OT fusion.
        identity_cost = self.objective()
        done: set[str] = set()
        for g in self.names:
            linked = [t for t in self.terms[g] if t.others]
            ready = [t for t in linked if all(o in done and o != g for o in t.others)]
            if not self.const[g] and not ready:
                ready = linked  # nothing is settled yet: use every term at the current permutations
            if len(ready) == len(linked):  # a complete solve: the first sweep may skip it
                self.seen[g] = self._neighbour_versions(g).clone()
                self.solved[g][:] = True
            self.solve_group(g, None, force=True, terms=ready)
            done.add(g)
        self.identity_cost = identity_cost

    def _set_init(self, init: Mapping[str, torch.Tensor]) -> None:
        for g in self.spec.groups:
            if g not in init:
                raise SpecError(f"init is missing group {g!r}")
        given = {g: torch.as_tensor(init[g], device=self.device) for g in self.spec.groups}
        for g, p in given.items():
            if p.is_floating_point() or p.is_complex() or p.dtype == torch.bool:
                # .long() would truncate 1.9 to 1: a different element, silently
                raise TypeError(f"init[{g!r}] must hold integer indices, got dtype {p.dtype}")
        given = {g: p.long() for g, p in given.items()}
        self.spec.validate(given, "init")
        for g, p in given.items():
            unit = self.spec.unit_shape(g)
            if p.dim() > len(unit) and tuple(p.shape[: p.dim() - len(unit)]) != (self.B,):
                raise SpecError(f"init[{g!r}] has shape {tuple(p.shape)}, expected {unit} or ({self.B}, *{unit})")
            self.perm[g] = p.expand(self.B, *unit).clone()
        for g in self.names:
            self.version[g] += 1

    def run(self, max_sweeps: int, seed: int | None, progress: bool = False) -> Solution:
        gen = torch.Generator()
        gen.manual_seed(int(seed) if seed is not None else int(torch.randint(2**62, ()).item()))
        objective = [self.objective()]
        changed = torch.ones(self.B, dtype=torch.bool, device=self.device)
        sweeps = 0
        bar = None
        if progress:
            from tqdm.auto import tqdm

            bar = tqdm(total=max_sweeps, desc="alignment sweeps", leave=False)
        for _ in range(max_sweeps):
            before = {g: v.clone() for g, v in self.version.items()}
            for gi in torch.randperm(len(self.names), generator=gen).tolist():
                g = self.names[gi]
                seen = self._neighbour_versions(g)
                dirty = (seen != self.seen[g]).any(-1) | ~self.solved[g]
                if not bool(dirty.any()):
                    continue
                self.seen[g][dirty] = seen[dirty]
                self.solved[g][dirty] = True
                self.solve_group(g, None if bool(dirty.all()) else dirty.nonzero().squeeze(-1))
            sweeps += 1
            objective.append(self.objective())
            changed = torch.stack([self.version[g] != before[g] for g in self.names]).any(0)
            if bar is not None:
                bar.update(1)
                bar.set_postfix(objective=float(objective[-1].mean()), moving=int(changed.sum()))
            if not bool(changed.any()):
                break
        if bar is not None:
            bar.close()
        obj = torch.stack(objective, -1)
        # A sweep that moved nothing proves a coordinate-wise optimum.
        return Solution(self.perm, obj, ~changed if sweeps else torch.zeros_like(changed), sweeps)

    def _neighbour_versions(self, g: str) -> torch.Tensor:
        nb = self.neigh[g]
        if not nb:
            return torch.zeros(self.B, 1, dtype=torch.long, device=self.device)[:, :0]
        return torch.stack([self.version[h] for h in nb], -1)


def coordinate_descent(
    spec: PermutationSpec,
    ref: Mapping[str, Channels],
    tgt: Mapping[str, Channels],
    *,
    max_sweeps: int = 100,
    seed: int | None = None,
    init: str | Mapping[str, torch.Tensor] = "greedy",
    compute_dtype: torch.dtype | None = None,
    rtol: float | None = None,
    progress: bool = False,
) -> Solution:
    """Align targets ``tgt[site] = (mean (B, *shape), std (B, *shape) | None)`` to one
    reference ``ref[site] = (mean (*shape), std (*shape) | None)``.

    Only the spec's sites are read. ``spec`` must know the sites' shapes. See the
    module docstring for the algorithm; :func:`align` is the public single-pair form.
    """
    if not isinstance(max_sweeps, int) or max_sweeps < 0:
        raise ValueError(f"max_sweeps must be a non-negative int, got {max_sweeps!r}")
    if not spec.groups:
        raise SpecError("the spec has no neuron groups: there is nothing to align")
    engine = _Engine(spec, ref, tgt, compute_dtype, rtol)
    engine.initialize(init)
    sol = engine.run(max_sweeps, seed, progress)
    if isinstance(init, str) and init == "greedy":
        # The greedy start is equivariant (align(q0, h.q1) = align(q0, q1) h^{-1}) but may
        # lead to a worse result than not aligning at all; a target whose descent ends above
        # its identity cost is descended again from the identity, so the result is never
        # worse than the identity (align(q, q) and re-aligning an aligned sample stay put).
        worse = (sol.objective[:, -1] > engine.identity_cost).nonzero().squeeze(-1)
        if worse.numel():
            sub = {s: tuple(None if t is None else t.index_select(0, worse) for t in ch) for s, ch in tgt.items()}
            opts = {"max_sweeps": max_sweeps, "seed": seed, "compute_dtype": compute_dtype, "rtol": rtol}
            again = coordinate_descent(spec, ref, sub, init="identity", **opts)
            sol = _merge(sol, again, worse)
    return sol


def _merge(sol: Solution, sub: Solution, idx: torch.Tensor) -> Solution:
    """``sol`` with the targets ``idx`` replaced by ``sub``'s (objectives padded with their last value)."""
    sweeps = max(sol.sweeps, sub.sweeps)

    def pad(obj: torch.Tensor) -> torch.Tensor:
        return torch.cat([obj, obj[:, -1:].expand(-1, sweeps + 1 - obj.shape[1])], 1)

    objective = pad(sol.objective)
    objective[idx] = pad(sub.objective)
    converged = sol.converged.clone()
    converged[idx] = sub.converged
    perm = {g: p.clone() for g, p in sol.perm.items()}
    for g, p in perm.items():
        p[idx] = sub.perm[g]
    return Solution(perm, objective, converged, sweeps)
