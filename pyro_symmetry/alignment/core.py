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

import numpy as np
import torch
from scipy.optimize import linear_sum_assignment

from ..groups import PermutationSpec, SpecError, decode_signed, encode_signed
from ..groups._indexing import gather_axes
from .inputs import sq_norm as _sq_norm

__all__ = ["Channels", "Solution", "coordinate_descent"]

Channels = tuple[torch.Tensor, "torch.Tensor | None"]


# ---------------------------------------------------------------------------- engine
def _sel(t: torch.Tensor | None, idx: torch.Tensor | None) -> torch.Tensor | None:
    return t if idx is None or t is None else t.index_select(0, idx)


def _add(a: torch.Tensor | None, b: torch.Tensor | None) -> torch.Tensor | None:
    return b if a is None else a if b is None else a + b


def _layout(spec: PermutationSpec, site: str) -> tuple[int, list[tuple[int, int, str, bool]]]:
    """``(event_ndim, [(axis, inner, group, flips)])``: how the groups act on ``site``, read
    from ``spec.action`` (the one place alignment reads it). ``flips``: the group's sign
    flips negate these entries; passive axes (a layer's rows before a BatchNorm, running
    statistics) are only permuted."""
    action = spec.action(site)
    out = []
    for span in action.spans:
        if not span.whole or len(span.shape) > 1:
            raise SpecError(
                f"alignment does not handle a group on a slice of an axis or a nested group yet "
                f"(group {span.group!r} on site {site!r})"
            )
        out.append((span.axis, span.inner, span.group, spec.groups[span.group].signed and span.role != "passive"))
    return action.event_ndim, out


@dataclass
class _Term:
    """One ``(site, axis)`` a group touches, with the other groups on that site."""

    group: str
    site: str
    axis: int
    inner: int
    flips: bool  # the group's sign flips negate these entries (not on a passive axis)
    others: tuple[tuple[int, int, str, bool], ...]  # (axis, inner, group, flips)
    ref: list[torch.Tensor] = field(default_factory=list)  # per channel, (n, K) in the compute dtype
    key: torch.Tensor | None = None  # (B, len(others)) versions the cached value was computed at
    value: list[torch.Tensor | None] | None = None  # cached similarity per stored channel, (B, n, n)


@dataclass
class Solution:
    """Output of :func:`coordinate_descent` (all batched over targets)."""

    perm: dict[str, torch.Tensor]  # group -> (B, n)
    objective: torch.Tensor  # (B, sweeps + 1) float64
    converged: torch.Tensor  # (B,) bool
    sweeps: int


class _Engine:
    """Batched coordinate descent of targets ``(B, *shape)`` onto one reference."""

    def __init__(
        self,
        spec: PermutationSpec,
        ref: Mapping[str, Channels],
        tgt: Mapping[str, Channels],
        compute_dtype: torch.dtype | None,
        rtol: float | None,
    ) -> None:
        self.spec = spec
        self.names = list(spec.groups)
        self.signed = {g: spec.groups[g].signed for g in self.names}
        self.moves = {s: _layout(spec, s) for s in spec.sites}
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
        self.perm = {g: torch.arange(n, device=self.device).repeat(self.B, 1) for g, n in spec.sizes.items()}
        self.version = {g: torch.zeros(self.B, dtype=torch.long, device=self.device) for g in self.names}
        self.terms: dict[str, list[_Term]] = {g: [] for g in self.names}
        for site, (_, mv) in self.moves.items():
            for k, (ax, inner, g, flips) in enumerate(mv):
                term = _Term(g, site, ax, inner, flips, tuple(m for j, m in enumerate(mv) if j != k))
                n = spec.groups[g].size
                term.ref = [t.movedim(ax, 0).reshape(n, -1).to(self.cdt) for t in ref[site] if t is not None]
                self.terms[g].append(term)
        self.neigh = {g: sorted({o[2] for t in self.terms[g] for o in t.others}) for g in self.names}
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

    # -------------------------------------------------------------- similarities
    def _store(self, term: _Term, mu: torch.Tensor, sd: torch.Tensor | None) -> list[torch.Tensor | None]:
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

    def _gram(self, term: _Term, idx: torch.Tensor | None) -> list[torch.Tensor]:
        """``S[b, i, j] = <ref_i, (others . tgt_b)_j>`` for one term, ``(B', n, n)`` in the compute dtype
        (stored as :meth:`_store` says)."""
        nd = self.moves[term.site][0]
        n = self.spec.groups[term.group].size
        out = []
        for c, (r, x) in enumerate(zip(term.ref, self.tgt_c[term.site])):
            x = _sel(x, idx)
            if term.others:
                moves = []
                for ax, inner, g2, flips in term.others:
                    p = self._perm_rows(g2, idx)
                    signed = flips and c == 0
                    moves.append((ax, inner, p if signed else decode_signed(p)[0], signed))
                x = gather_axes(x, nd, moves)
            x = x.movedim(1 + term.axis, 1).reshape(x.shape[0], n, -1)
            # One GEMM per term: (n, K) x (K, n) for one target, (B n, K) x (K, n) for a batch.
            out.append((r @ x[0].T).unsqueeze(0) if x.shape[0] == 1 else torch.matmul(x, r.T).transpose(-1, -2))
        return self._store(term, out[0], out[1] if len(out) > 1 else None)

    def _products(self, terms: list[_Term], idx: torch.Tensor | None) -> list[torch.Tensor | None] | None:
        total = None
        for t in terms:
            s = self._gram(t, idx)
            total = s if total is None else [_add(a, b) for a, b in zip(total, s)]
        return total

    def _perm_rows(self, g: str, idx: torch.Tensor | None) -> torch.Tensor:
        p = _sel(self.perm[g], idx)
        return p[0] if p.shape[0] == 1 else p  # one target: the gather's unbatched fast path

    def _cached(self, term: _Term, idx: torch.Tensor | None) -> list[torch.Tensor]:
        key = torch.stack([_sel(self.version[o[2]], idx) for o in term.others], -1)
        if term.value is None and idx is None:
            term.value, term.key = self._gram(term, None), key
            return term.value
        if term.value is None:
            n = self.spec.groups[term.group].size
            term.value = [
                torch.zeros(self.B, n, n, dtype=self.cdt, device=self.device) if used else None
                for used in self._pattern(term)
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

    def similarity(self, g: str, idx: torch.Tensor | None, terms: list[_Term] | None = None) -> list[torch.Tensor]:
        parts = [] if self.const[g] is None else [[_sel(c, idx) for c in self.const[g]]]
        use = [t for t in self.terms[g] if t.others] if terms is None else terms
        parts += [self._cached(t, idx) for t in use]
        total = parts[0]
        for p in parts[1:]:
            total = [_add(a, b) for a, b in zip(total, p)]
        return total

    # -------------------------------------------------------------- one group
    def _assign(self, g: str, sim: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Best signed assignment: ``(signed perm (B', n), its score, score function)``."""
        m, v = sim if self.signed[g] else (None, sim[0])
        if m is None:  # nothing a flip negates: no flips
            score, neg = v, None
        else:
            score, neg = m.abs() if v is None else m.abs() + v, m < 0
        # When every row's best column is a different one, that is the optimal assignment
        # (it attains the bound sum_i max_j): common near the solution, and O(n^2).
        src = score.argmax(-1)
        n = src.shape[-1]
        hits = torch.zeros_like(src).scatter_(-1, src, 1)
        hard = (hits != 1).any(-1).nonzero().squeeze(-1)
        if hard.numel():
            mats = score.index_select(0, hard).double().cpu().numpy()
            cols = np.stack([linear_sum_assignment(m, maximize=True)[1] for m in mats]).reshape(-1, n)
            src[hard] = torch.as_tensor(cols, device=self.device, dtype=torch.long)
        flip = None if neg is None else neg.gather(-1, src.unsqueeze(-1)).squeeze(-1)
        best = score.gather(-1, src.unsqueeze(-1)).squeeze(-1).double().sum(-1)
        return encode_signed(src, flip), best, score

    def _value(self, g: str, sim: list[torch.Tensor], perm: torch.Tensor) -> torch.Tensor:
        """Linear score ``sum_i s_i M[i, p_i] + V[i, p_i]`` of a signed permutation."""
        src, neg = decode_signed(perm)
        m, v = sim if self.signed[g] else (None, sim[0])
        val = None
        if m is not None:
            pm = m.gather(-1, src.unsqueeze(-1)).squeeze(-1)
            val = torch.where(neg, -pm, pm)
        if v is not None:
            val = _add(val, v.gather(-1, src.unsqueeze(-1)).squeeze(-1))
        return val.double().sum(-1)

    def solve_group(
        self, g: str, idx: torch.Tensor | None, force: bool = False, terms: list[_Term] | None = None
    ) -> None:
        """Re-solve group ``g`` for targets ``idx`` (None: all); keep the old permutation unless strictly better."""
        sim = self.similarity(g, idx, terms)
        new, best, _ = self._assign(g, sim)
        old = _sel(self.perm[g], idx)
        if idx is None:
            idx = torch.arange(self.B, device=self.device)
        if force:
            accept = (new != old).any(-1)
        elif self.verify:
            # Coarse similarities can neither confirm nor rule out an improvement: check them all.
            accept = self._improves(g, idx, new, (new != old).any(-1))
        else:
            accept = best - self._value(g, sim, old) > _sel(self.tol, idx)
            if self.self_coupled[g]:
                # The score is only linear in p when no site is acted on twice by g.
                accept = self._improves(g, idx, new, accept)
        if bool(accept.any()):
            sel = idx[accept]
            self.perm[g][sel] = new[accept]
            self.version[g][sel] += 1

    def _improves(self, g: str, idx: torch.Tensor, new: torch.Tensor, candidates: torch.Tensor) -> torch.Tensor:
        """Which ``candidates`` lower the cost ``C`` of targets ``idx`` by more than the
        tolerance when group ``g`` takes ``new`` (costs over the sites ``g`` acts on)."""
        if not bool(candidates.any()):
            return candidates
        sites = self.group_sites[g]
        before = self.cost(idx, sites)
        trial = self.perm[g].clone()
        trial[idx[candidates]] = new[candidates]
        return candidates & (self.cost(idx, sites, {g: trial}) < before - _sel(self.tol, idx))

    # -------------------------------------------------------------- objective
    def cost(self, idx: torch.Tensor | None = None, sites=None, override: Mapping | None = None) -> torch.Tensor:
        """``C(g)`` per target over ``sites`` (default: all): differences in float32 (float64
        for float64 inputs) whatever the compute dtype, squares accumulated in float64."""
        perm = {**self.perm, **(override or {})}
        return sum(self._site_cost(s, perm, idx) for s in (sites or self.spec.sites))

    def _site_cost(self, site: str, perm: Mapping[str, torch.Tensor], idx: torch.Tensor | None) -> torch.Tensor:
        nd, mv = self.moves[site]
        total = 0.0
        for c, (r, x) in enumerate(zip(self.ref_in[site], self.tgt_in[site])):
            moves = []
            for ax, inner, g, flips in mv:
                p = _sel(perm[g], idx)
                flip = c == 0 and flips
                moves.append((ax, inner, p if flip else decode_signed(p)[0], flip))
            total = total + _sq_norm(r - gather_axes(_sel(x, idx), nd, moves))
        return total

    def objective(self) -> torch.Tensor:
        """``C(g)`` per target, recomputing only the sites whose groups moved since last time."""
        total = torch.zeros(self.B, dtype=torch.float64, device=self.device)
        for s, (_, mv) in self.moves.items():
            key = torch.stack([self.version[g] for _, _, g, _ in mv], -1)
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
            for g in self.names:
                if g not in init:
                    raise SpecError(f"init is missing group {g!r}")
            given = {g: torch.as_tensor(init[g], device=self.device) for g in self.names}
            for g, p in given.items():
                if p.is_floating_point() or p.is_complex() or p.dtype == torch.bool:
                    # .long() would truncate 1.9 to 1: a different element, silently
                    raise TypeError(f"init[{g!r}] must hold integer indices, got dtype {p.dtype}")
            given = {g: p.long() for g, p in given.items()}
            self.spec._check_element(given, "init")
            for g, p in given.items():
                if p.dim() > 1 and p.shape[:-1] != (self.B,):
                    raise SpecError(
                        f"init[{g!r}] has shape {tuple(p.shape)}, expected ({p.shape[-1]},) or ({self.B}, n)"
                    )
                self.perm[g] = p.expand(self.B, p.shape[-1]).clone()
                self.version[g] += 1
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
            ready = [t for t in linked if all(o[2] in done and o[2] != g for o in t.others)]
            if self.const[g] is None and not ready:
                ready = linked  # nothing is settled yet: use every term at the current permutations
            if len(ready) == len(linked):  # a complete solve: the first sweep may skip it
                self.seen[g] = self._neighbour_versions(g).clone()
                self.solved[g][:] = True
            self.solve_group(g, None, force=True, terms=ready)
            done.add(g)
        self.identity_cost = identity_cost

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
