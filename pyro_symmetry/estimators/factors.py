"""Per-neuron factor log-densities ``A[i, j] = log q_j(w_i)`` of a factorized ``q``.

For a neuron group of size ``n`` and a mean-field Gaussian ``q``, the density of the
coordinates the group moves factorizes over neurons: neuron ``j`` owns its incoming
row, bias and outgoing column, and ``q_j`` is the product of their Normal factors.
``A[i, j]`` evaluates neuron ``j``'s factor at the coordinates that neuron ``i``
holds in ``w``; for a sign-flip group also at their negation. These matrices drive
the permanent (exact ``S(w)`` for one hidden layer) and the Plackett-Luce proposal.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping

import torch

from .._shapes import broadcast_shapes
from ..groups import PermutationSpec, SpecError
from ._base import Marginals

__all__ = ["neuron_log_factors", "group_axes", "group_sites"]


def group_sites(spec: PermutationSpec, group: str) -> list[tuple[str, int, int]]:
    """``[(site, event_axis, inner)]`` the group acts on; one entry per site (see
    :func:`group_axes`)."""
    return [(site, axis, inner) for site, axis, inner, _ in group_axes(spec, group)]


def group_axes(spec: PermutationSpec, group: str) -> list[tuple[str, int, int, bool]]:
    """``[(site, event_axis, inner, passive)]`` the group acts on; one entry per site.

    ``event_axis`` is negative; ``passive`` marks an axis that is permuted but never
    sign-flipped (rows before a BatchNorm, running statistics). Read from
    ``spec.action(site)``.

    Raises :class:`SpecError` if the group acts on two axes of one site (a square
    recurrent weight), where a coordinate belongs to two neurons of the group, or on a
    slice of an axis or as a nested group (the neurons' factors are then not whole rows).
    """
    out = []
    for site in spec.sites:
        action = spec.action(site)
        spans = action.spans_of(group)
        if len(spans) > 1:
            raise SpecError(f"group {group!r} acts on {len(spans)} axes of site {site!r}: its neurons do not factorize")
        if spans:
            span = spans[0]
            if len(span.shape) > 1 or span.start or span.stop != spec.shapes[site][span.axis]:
                raise SpecError(
                    f"group {group!r} acts on a slice of axis {span.axis} of site {site!r} or is nested: the "
                    "factorized estimators ('permanent', 'importance') need whole axes; use 'exact' or 'contrastive'"
                )
            out.append((site, span.axis - action.event_ndim, span.inner, span.role == "passive"))
    return out


def _rows(x: torch.Tensor, axis: int, n: int, ndim: int) -> torch.Tensor:
    """``(*lead, *shape)`` with the neuron axis ``axis`` (negative) -> ``(*lead, n, m)``."""
    x = x.movedim(axis, -ndim)
    return x.reshape(*x.shape[: x.dim() - ndim], n, -1)


def _join(rows: list[torch.Tensor]) -> torch.Tensor:
    """Rows ``(*lead_s, n, m_s)`` -> ``(*lead, n, sum m_s)`` (``lead`` broadcast)."""
    if len(rows) == 1:
        return rows[0]
    lead = broadcast_shapes(*(r.shape[:-1] for r in rows))
    return torch.cat([r.expand(*lead, r.shape[-1]) for r in rows], -1)


#: An entry whose expansion adds terms larger than this many times its own size (plus one
#: nat) is recomputed directly: the expansion's rounding error is relative to those terms.
_CANCELLATION = 4.0
#: Elements of the gathered rows that a direct recomputation holds at once.
_DIRECT_ELEMENTS = 1 << 22


def _factor_term(x: torch.Tensor, loc: torch.Tensor, lam: torch.Tensor) -> torch.Tensor:
    """``T[..., i, j] = sum_k log N(x_ik | loc_jk, lam_jk^{-1/2})`` for rows ``x``
    ``(*batch, n, m)`` and factors ``loc``, ``lam`` ``(n, m)`` (or broadcastable).

    One matrix product per term of the quadratic expansion around ``c``, the neurons'
    mean ``loc`` (any ``c`` gives the same value: ``x - loc = (x - c) - (loc - c)``), so
    the terms are of the size of ``lam (x - c)^2`` rather than ``lam x^2``; with
    ``|loc| / scale`` at 1e7 the uncentered expansion cancelled terms of 1e14 and lost
    whole nats even in float64. Entries where the centered terms are still more than
    :data:`_CANCELLATION` times the result (neurons whose ``loc`` lie far apart on the
    scale of their ``scale``, evaluated near one of them) are recomputed directly as
    ``-0.5 sum lam (x - loc)^2``: every entry is then right to its own rounding.
    """
    c = loc.mean(-2, keepdim=True)
    xc, lc = x - c, loc - c
    m = x.shape[-1]
    lsum = (lc * lc * lam).sum(-1).unsqueeze(-2)
    norm = (0.5 * lam.log().sum(-1) - 0.5 * m * math.log(2 * math.pi)).unsqueeze(-2)
    # qb = quad - lsum / 2 with quad = -0.5 (xc^2) @ lam^T <= 0, and kern = qb + xc @ (lc lam)^T,
    # -0.5 sum lam (x - loc)^2 by the expansion; lsum - 2 quad = -2 qb is the terms' size.
    if lam.dim() == 2 and loc.dim() == 2:  # one 2-D product per term, the bias folded in
        lead = xc.shape[:-1]
        flat = xc.reshape(-1, m)
        qb = torch.addmm(-0.5 * lsum, flat.square(), -0.5 * lam.transpose(-1, -2))
        kern = torch.addmm(qb, flat, (lc * lam).transpose(-1, -2)).reshape(*lead, -1)
        qb = qb.reshape(*lead, -1)
    else:
        qb = (xc * xc) @ (-0.5 * lam).transpose(-1, -2) - 0.5 * lsum
        kern = qb + xc @ (lc * lam).transpose(-1, -2)
    with torch.no_grad():
        # (lsum - 2 quad) > C (|kern| + 1)  <=>  qb + (C / 2) |kern| < -C / 2, with |kern| = -kern
        # (a sum of -0.5 lam (x - loc)^2; one rounded above 0 only flags more entries for redoing)
        gap = torch.add(qb, kern, alpha=-0.5 * _CANCELLATION)
        idx = None
        low = gap.min() if gap.numel() else None
        if low is not None and not bool(low >= -0.5 * _CANCELLATION):  # a NaN min: look entry by entry
            redo = gap < -0.5 * _CANCELLATION
            idx = redo.nonzero(as_tuple=True) if bool(redo.any()) else None
    if idx is not None:
        shape = kern.shape  # (*lead, n, n)
        rows = shape[:-1] + (m,)
        xe, le, lame = x.expand(rows), loc.expand(rows), lam.expand(rows)
        lead, i, j = idx[:-2], idx[-2], idx[-1]
        step = max(1, _DIRECT_ELEMENTS // max(1, m))
        parts = []
        for lo in range(0, i.numel(), step):
            sel = slice(lo, lo + step)
            li = tuple(t[sel] for t in lead)
            d = xe[li + (i[sel],)] - le[li + (j[sel],)]
            parts.append(-0.5 * (lame[li + (j[sel],)] * d * d).sum(-1))
        kern = kern.index_put(idx, torch.cat(parts))
    if kern.requires_grad:
        return kern + norm
    return kern.add_(norm)


def neuron_log_factors(
    values: Mapping[str, torch.Tensor],
    marginals: Marginals,
    spec: PermutationSpec,
    group: str,
    *,
    sites: Iterable[str] | None = None,
    dtype: torch.dtype | None = None,
) -> torch.Tensor:
    """Factor log-densities of one neuron group.

    Parameters
    ----------
    values : mapping ``site -> Tensor (*batch, *site_shape)``
        The weights ``w`` (other groups' axes already aligned if needed).
    marginals : Marginals
        Normal factors of ``q`` (``(C, *site_shape)`` with ``log_weights`` for a
        mixture, where each neuron's factor becomes ``log sum_c pi_c q_{c,j}(w_i)``).
    spec : PermutationSpec
    group : str
    sites : iterable of str, optional
        Sites to include (default: every site the group acts on).
    dtype : torch.dtype, optional
        Compute dtype (default: the values' dtype).

    Returns
    -------
    Tensor ``(*batch, n, S, n)``
        ``A[..., i, s, j] = log q_j(sign_s * w_i)``, ``S = 2`` for a sign-flip group
        (``s = 1`` negates neuron ``i``'s coordinates, except on passive axes), else ``S = 1``. Computed with
        one batched matrix product per site and term (quadratic expansion of the Gaussian
        around the neurons' mean ``loc``; entries it would get wrong by cancellation are
        recomputed directly, see :func:`_factor_term`).
    """
    if group not in spec.groups:
        raise SpecError(f"unknown group {group!r}; groups are {sorted(spec.groups)}")
    n, signed = spec.groups[group].size, spec.groups[group].signed
    chosen = None if sites is None else set(sites)
    entries = [e for e in group_axes(spec, group) if chosen is None or e[0] in chosen]
    mixture = marginals.log_weights is not None
    ref = next(iter(values.values()))
    dtype = dtype or ref.dtype
    # The factor is a sum over coordinates: sites of the same kind (passive or not) are
    # joined along the coordinates and evaluated with one set of products.
    kinds: dict[bool, list] = {}
    for site, axis, _, passive in entries:
        nd = len(spec.shapes[site])
        v = _rows(values[site].to(dtype), axis, n, nd)
        loc = _rows(marginals.loc[site].to(dtype), axis, n, nd)
        lam = _rows(marginals.scale[site].to(dtype), axis, n, nd).pow(-2)
        kinds.setdefault(passive and signed, []).append((v.unsqueeze(-3) if mixture else v, loc, lam))
    total = None
    for passive, parts in kinds.items():
        v, loc, lam = (_join([p[r] for p in parts]) for r in range(3))
        plus = _factor_term(v, loc, lam)
        if not signed:
            term = plus.unsqueeze(-2)  # (*batch, [C,] n, 1, n)
        elif passive:  # permuted with its neuron but never negated
            term = torch.stack([plus, plus], -2)
        else:
            term = torch.stack([plus, _factor_term(-v, loc, lam)], -2)  # (*batch, [C,] n, 2, n)
        total = term if total is None else total + term
    S = 2 if signed else 1
    if total is None:
        batch = broadcast_shapes(*(v.shape[: v.dim() - len(spec.shapes[k])] for k, v in values.items()))
        return torch.zeros(*batch, n, S, n, dtype=dtype, device=ref.device)
    if mixture:
        lw = marginals.log_weights.to(dtype).reshape(-1, 1, 1, 1)
        total = torch.logsumexp(total + lw, dim=-4)
    return total
