"""The minimum-mass problem reduced to per-neuron coefficients, and its block solver.

The mass as a function of the hidden log-scales ``u`` is a sum of ``c * exp(2 (+-u_a[i]
+- u_b[j]))`` terms (sites connecting two groups) and of ``c * exp(+-2 u_i)`` terms (sites
touched by one group), with ``c`` the squared entries reduced over everything the
rescaling does not distinguish. :func:`solve` runs exact block coordinate descent on it
in log space; :func:`min_mass` (``minimum_mass.py``) chooses the dtype and the scaling
of the coefficients and checks that the answer is representable.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import NamedTuple

import torch

from ..groups import PermutationSpec
from ._axes import SiteAxis, reduce_squares

__all__ = ["Problem", "build_problem", "log_coefficients", "solve"]

_SOR_WARMUP = 4  # plain sweeps before the over-relaxation factor is set


class _Term(NamedTuple):
    """``sum_ij c[:, i, j] exp(2 (da u_a[i] + db u_b[j]))`` for a site that connects two groups."""

    c: torch.Tensor  # (B, n_a, n_b)
    a: str
    da: int
    b: str
    db: int


@dataclass
class Problem:
    """The mass as a function of the log-scales, reduced to per-neuron coefficients.

    ``entries`` is the number of squared entries summed into the problem per sample: a
    bound on how many flushed-to-zero products can enter one coefficient.
    """

    groups: list[str]
    up: dict[str, torch.Tensor]  # (B, n): coefficients of exp(+2 u_i) from sites touched once
    down: dict[str, torch.Tensor]  # (B, n): coefficients of exp(-2 u_i)
    terms: list[_Term] = field(default_factory=list)
    entries: int = 1
    log_up: dict[str, torch.Tensor] = field(default_factory=dict)
    log_down: dict[str, torch.Tensor] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.refresh()

    def refresh(self) -> None:
        """Cache the logs of the unary coefficients (constant during the sweeps)."""
        self.log_up = {g: torch.log(v) for g, v in self.up.items()}
        self.log_down = {g: torch.log(v) for g, v in self.down.items()}

    def total(self) -> torch.Tensor:
        """The mass at ``u = 0``: ``(B,)``."""
        parts = [v.sum(-1) for v in (*self.up.values(), *self.down.values())]
        parts += [t.c.sum((-2, -1)) for t in self.terms]
        return functools.reduce(torch.add, parts)


def build_problem(
    xs: Mapping[str, torch.Tensor],
    table: Mapping[str, tuple[int, list[SiteAxis]]],
    spec: PermutationSpec,
    groups: list[str],
    dtype: torch.dtype,
    shift: torch.Tensor | None = None,
) -> Problem:
    """Reduce the sites ``xs[site]`` ``(B, *site_shape)`` to the coefficients of the mass.

    With ``shift`` ``(B,)`` (integers) every entry of sample ``b`` is first multiplied by
    ``2**-shift[b]`` (exact), so that squares of very large or very small weights stay in
    range; the mass of the problem is then ``4**-shift`` times the network's.
    """
    first = next(iter(xs.values()))
    B, device = first.shape[0], first.device
    zeros = {g: torch.zeros(B, spec.groups[g].size, dtype=dtype, device=device) for g in groups}
    prob = Problem(groups, zeros, {g: torch.zeros_like(v) for g, v in zeros.items()})
    prob.entries = 0
    for site, (nd, axes) in table.items():
        axes = sorted(axes, key=lambda a: a.axis)  # keep the site's memory order: fast matvecs
        x = xs[site].to(dtype)
        if shift is not None:
            x = torch.ldexp(x, -shift.reshape((B,) + (1,) * nd).to(device))
        prob.entries += math.prod(x.shape[1:])
        r = reduce_squares(x, nd, axes).contiguous()
        if len(axes) == 1:
            a = axes[0]
            (prob.up if a.direction > 0 else prob.down)[a.group] += r
        else:
            a, b = axes
            prob.terms.append(_Term(r, a.group, a.direction, b.group, b.direction))
    prob.entries = max(prob.entries, 1)
    prob.refresh()
    return prob


def _log_matvec(c: torch.Tensor, s: torch.Tensor, transpose: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """``(log sum_j c[:, i, j] exp(s[:, j]), m)`` (or over ``i`` with ``transpose``), overflow-safe.

    ``m`` ``(B, 1)`` is the per-sample shift: the products are formed as
    ``c * exp(s - m)``, so one that underflows loses at most ``tiny * exp(m)``.
    """
    m = s.amax(-1, keepdim=True)
    v = torch.exp(s - m)
    # A row vector times a (transposed) matrix: several times faster on CPU than a
    # batched matrix times a column vector.
    r = torch.matmul(v.unsqueeze(-2), c if transpose else c.transpose(-1, -2)).squeeze(-2)
    return torch.log(r) + m, m


def log_coefficients(
    prob: Problem, u: dict[str, torch.Tensor], g: str, bounds: bool = False, pair_masses: list | None = None
) -> tuple[torch.Tensor, ...]:
    """``(log P_i, log Q_i)`` with ``M = sum_i P_i e^{2 u_i} + Q_i e^{-2 u_i} + const`` in ``u_g``.

    With ``bounds``, also the per-sample shifts ``(log S_P, log S_Q)`` ``(B, 1)``: a
    product flushed to zero on the way changes ``P_i`` by at most ``tiny * S_P`` each.
    With ``pair_masses`` (a list), the log-mass ``(B,)`` of every two-group term whose
    first group is ``g`` is appended to it (each term once over all groups).
    """
    ups, downs = [prob.log_up[g]], [prob.log_down[g]]
    zero = torch.zeros_like(prob.log_up[g][..., :1])
    up_shifts, down_shifts = [zero], [zero]  # unary coefficients: no shift
    for t in prob.terms:
        if t.a == g:
            val, m = _log_matvec(t.c, 2 * t.db * u[t.b], transpose=False)
            (ups if t.da > 0 else downs).append(val)
            (up_shifts if t.da > 0 else down_shifts).append(m)
            if pair_masses is not None:
                pair_masses.append(torch.logsumexp(val + 2 * t.da * u[g], -1))
        if t.b == g:
            val, m = _log_matvec(t.c, 2 * t.da * u[t.a], transpose=True)
            (ups if t.db > 0 else downs).append(val)
            (up_shifts if t.db > 0 else down_shifts).append(m)
    log_p, log_q = functools.reduce(torch.logaddexp, ups), functools.reduce(torch.logaddexp, downs)
    if not bounds:
        return log_p, log_q
    return log_p, log_q, functools.reduce(torch.logaddexp, up_shifts), functools.reduce(torch.logaddexp, down_shifts)


def _colors(prob: Problem) -> list[list[str]]:
    """Greedy coloring of the group interaction graph: groups of one color share no site,
    so their exact block updates are independent (red/black layers for a chain)."""
    adj: dict[str, set[str]] = {g: set() for g in prob.groups}
    for t in prob.terms:
        adj[t.a].add(t.b)
        adj[t.b].add(t.a)
    color: dict[str, int] = {}
    for g in prob.groups:
        used = {color[h] for h in adj[g] if h in color}
        color[g] = next(c for c in range(len(prob.groups) + 1) if c not in used)
    return [[g for g in prob.groups if color[g] == c] for c in range(max(color.values()) + 1)]


def _log_gap(log_p: torch.Tensor, log_q: torch.Tensor, u: torch.Tensor, dead: torch.Tensor) -> torch.Tensor:
    """``log in - log out = log P - log Q + 4 u`` per neuron (0 where dead).

    The relative imbalance is ``|in - out| / (in + out) = tanh(|gap| / 2)`` and the exact
    block minimizer is ``u - gap / 4``.
    """
    return torch.where(dead, torch.zeros((), dtype=u.dtype, device=u.device), log_p - log_q + 4 * u)


def _sor_factor(before: torch.Tensor, after: torch.Tensor, sweeps: int) -> torch.Tensor:
    """Over-relaxation factor from the contraction of plain sweeps (per sample).

    For red/black (consistently ordered) block relaxation whose plain sweeps contract
    the error by ``rho``, the optimal over-relaxation factor is
    ``2 / (1 + sqrt(1 - rho))`` (Young 1954). It stays below 2, where every relaxed
    neuron update still lowers the mass (each neuron's mass ``P e^{2u} + Q e^{-2u}`` is
    symmetric about its minimizer in ``u``).
    """
    rho = torch.where(before > 0, after / before, torch.zeros_like(after)).clamp(0.0, 1.0) ** (1.0 / sweeps)
    return 2.0 / (1.0 + torch.sqrt(1.0 - rho.clamp(max=0.99)))


def _final_check(
    prob: Problem, u: dict[str, torch.Tensor], dead: dict[str, torch.Tensor], precision: float
) -> tuple[torch.Tensor, torch.Tensor, bool]:
    """The largest ``|gap|`` and ``log M(u)`` per sample, and whether every number behind
    them is trustworthy.

    Trustworthy: finite log-scales and gaps, and for every live neuron the products
    flushed to zero in the coefficients (at most ``entries * tiny * shift`` of them)
    change its ``P`` and ``Q`` by less than ``precision`` relatively. Otherwise the dtype
    cannot represent the problem and the verdict would rest on underflowed numbers.
    """
    ref = prob.up[prob.groups[0]]
    worst = torch.zeros(ref.shape[0], dtype=ref.dtype, device=ref.device)
    log_floor = math.log(prob.entries * torch.finfo(ref.dtype).tiny / precision)
    ok = True
    parts: list[torch.Tensor] = []
    for g in prob.groups:
        log_p, log_q, shift_p, shift_q = log_coefficients(prob, u, g, bounds=True, pair_masses=parts)
        worst = torch.maximum(worst, _log_gap(log_p, log_q, u[g], dead[g]).abs().amax(-1))
        lost = ((shift_p + log_floor > log_p) | (shift_q + log_floor > log_q)) & ~dead[g]
        ok = ok and not bool(lost.any()) and bool(torch.isfinite(u[g]).all())
        parts += [torch.logsumexp(prob.log_up[g] + 2 * u[g], -1), torch.logsumexp(prob.log_down[g] - 2 * u[g], -1)]
    log_mass = torch.logsumexp(torch.stack(parts), 0)
    return worst, log_mass, ok and bool(torch.isfinite(worst).all())


def solve(
    prob: Problem, dead: dict[str, torch.Tensor], tol: float, max_iters: int, relax: bool
) -> tuple[dict[str, torch.Tensor], torch.Tensor, torch.Tensor, int, bool]:
    """Block coordinate descent on one sub-batch: ``(u, residual, log M(u), sweeps, trustworthy)``.

    ``dead`` neurons (no incoming or no outgoing mass) are pinned at ``u = 0``.
    """
    groups = prob.groups
    ref = prob.up[groups[0]]
    B = ref.shape[0]
    u = {g: torch.zeros_like(prob.up[g]) for g in groups}
    colors = _colors(prob)
    omega = torch.full((B, 1), 0.25, dtype=ref.dtype, device=ref.device)  # relaxation / 4
    limit = 2 * math.atanh(min(tol, 0.5))  # imbalance <= tol  <=>  |gap| <= limit
    history: list[torch.Tensor] = []
    iterations = 0
    for iterations in range(1, max_iters + 1):
        worst = torch.zeros(B, dtype=ref.dtype, device=ref.device)
        for color in colors:
            for g in color:
                gap = _log_gap(*log_coefficients(prob, u, g), u[g], dead[g])
                worst = torch.maximum(worst, gap.abs().amax(-1))
                u[g] = u[g] - omega * gap
        if bool((worst <= limit).all()):
            break
        if not bool(torch.isfinite(worst).all()):
            break  # underflow in this dtype: the caller retries in float64 or refuses
        if relax and iterations <= _SOR_WARMUP:
            history.append(worst)
            if iterations == _SOR_WARMUP:
                omega = 0.25 * _sor_factor(history[1], history[-1], _SOR_WARMUP - 2).unsqueeze(-1)
    worst, log_mass, ok = _final_check(prob, u, dead, precision=min(tol, 1e-3) * 1e-2)
    return u, torch.tanh(0.5 * worst), log_mass, iterations, ok
