"""Exact ``log S(w)`` for decoupled neuron groups (one hidden layer) via the permanent.

With a factorized ``q`` and a single hidden layer, ``sum_g q(g^{-1} w)`` is the
permanent of the matrix ``exp A``, ``A[i, j] = log q_j(w_i)`` (with sign flips,
``A[i, j] = logaddexp(log q_j(w_i), log q_j(-w_i))``), so

    log S(w) = log perm(exp A) - sum_i A[i, i].

Ryser's formula ``perm(M) = (-1)^n sum_{T subset [n]} (-1)^{|T|} prod_i sum_{j in T} M[i, j]``
costs ``O(2^n n)``. It is an alternating sum, so the matrix is first brought close to
doubly stochastic by a few log-domain Sinkhorn sweeps (``perm(D1 M D2) =
perm(M) prod D1 prod D2`` for any diagonal scalings, so this changes nothing exact):
then every term is at most one and the permanent is at least ``n!/n^n``
(van der Waerden), which keeps the cancellation within float64 to ``n`` around 25.
The row sums of all ``2^n`` column subsets are produced in reflected Gray-code order
(each new half is the mirrored previous half plus one column, one vector add per
subset) as the outer sum of a low-column table and a high-column table, then
reduced in chunks: no Python loop over subsets.
"""

from __future__ import annotations

import math

import torch

from .._validation import check_int
from ..groups import SpecError
from ._base import BaseDensity
from .factors import group_sites, neuron_log_factors

__all__ = ["log_permanent", "permanent_log_ratio", "check_decoupled"]

#: Widths above this are refused (2^n n work per matrix).
MAX_PERMANENT_WIDTH = 25
_LOW_BITS = 12
_CHUNK_ELEMENTS = 1 << 22


def _gray_subset_sums(cols: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Row sums of all column subsets in Gray-code order, and their parities.

    ``cols`` is ``(*batch, n_rows, k)``; returns ``(*batch, 2^k, n_rows)`` and a
    ``(2^k,)`` tensor of ``(-1)^{|T|}``.
    """
    sums = cols.new_zeros(*cols.shape[:-2], 1, cols.shape[-2])
    sign = cols.new_ones(1)
    for c in range(cols.shape[-1]):
        sums = torch.cat([sums, sums.flip(-2) + cols[..., c].unsqueeze(-2)], dim=-2)
        sign = torch.cat([sign, -sign.flip(0)])
    return sums, sign


def _ryser(m: torch.Tensor) -> torch.Tensor:
    """``perm(m)`` for nonnegative ``m`` ``(*batch, n, n)``."""
    n = m.shape[-1]
    k = min(n, _LOW_BITS)
    low, low_sign = _gray_subset_sums(m[..., :k])
    high, high_sign = _gray_subset_sums(m[..., k:])
    batch = m.shape[:-2]
    per_high = max(1, _CHUNK_ELEMENTS // max(1, low.shape[-2] * n * max(1, batch.numel())))
    total = m.new_zeros(batch)
    for start in range(0, high.shape[-2], per_high):
        h = high[..., start : start + per_high, :]
        prods = (low.unsqueeze(-2) + h.unsqueeze(-3)).prod(-1)  # (*batch, 2^k, chunk)
        signs = low_sign.unsqueeze(-1) * high_sign[start : start + per_high]
        total = total + (prods * signs).sum((-1, -2))
    return total if n % 2 == 0 else -total


def log_permanent(log_a: torch.Tensor, sinkhorn_iters: int = 30) -> torch.Tensor:
    """``log perm(exp(log_a))`` for a batch of square matrices, in float64.

    Parameters
    ----------
    log_a : Tensor ``(*batch, n, n)``
        Entry-wise logs of a positive matrix (``-inf`` allowed if a perfect
        matching remains).
    sinkhorn_iters : int
        Log-domain Sinkhorn sweeps used to condition Ryser's alternating sum.

    Returns
    -------
    Tensor ``(*batch,)`` in ``log_a``'s dtype; differentiable in ``log_a``. ``-inf``
    where a row or column is all ``-inf`` (no perfect matching).

    Raises
    ------
    TypeError
        ``log_a`` not a floating-point tensor.
    ValueError
        A non-square shape, ``n > 25``, NaN or ``+inf`` entries, ``sinkhorn_iters < 0``.

    Notes
    -----
    Ryser (1963); cost ``O(2^n n)`` per matrix, refused above ``n = 25``: beyond
    it rounding in the alternating sum grows (on the all-ones matrix, the worst
    case, the log-permanent is off by 2e-4 nats at n = 24 but by 0.04 at n = 28).
    """
    if not torch.is_tensor(log_a):
        raise TypeError(f"log_a must be a torch.Tensor, got {type(log_a).__name__}")
    if not log_a.is_floating_point():
        raise TypeError(f"log_a must be a floating-point tensor of log-entries, got dtype {log_a.dtype}")
    if log_a.dim() < 2 or log_a.shape[-2] != log_a.shape[-1]:
        raise ValueError(f"log_a must be (*batch, n, n), got shape {tuple(log_a.shape)}")
    check_int("sinkhorn_iters", sinkhorn_iters, minimum=0)
    n = log_a.shape[-1]
    if n > MAX_PERMANENT_WIDTH:
        raise ValueError(
            f"log_a is {n} x {n}: its permanent costs 2^{n} n operations; at most {MAX_PERMANENT_WIDTH} x "
            f"{MAX_PERMANENT_WIDTH} is allowed"
        )
    if log_a.numel():
        with torch.no_grad():
            bad = torch.isnan(log_a) | (log_a == math.inf)
            if bool(bad.any()):
                raise ValueError(
                    f"log_a holds NaN or +inf entries (first at index {tuple(bad.nonzero()[0].tolist())}); "
                    "only finite values and -inf (a zero entry) are allowed"
                )
            # A row or column of zeros has no perfect matching: the permanent is 0.
            empty = (log_a == -math.inf).all(-1).any(-1) | (log_a == -math.inf).all(-2).any(-1)
    else:
        empty = torch.zeros(log_a.shape[:-2], dtype=torch.bool, device=log_a.device)
    a = log_a.double()
    with torch.no_grad():
        # The scalings only condition the sum: any u, v give an exact identity, so no gradient.
        u = a.new_zeros(a.shape[:-1])
        v = a.new_zeros(a.shape[:-1])
        for _ in range(sinkhorn_iters):
            u = torch.logsumexp(a - v.unsqueeze(-2), dim=-1)
            v = torch.logsumexp(a - u.unsqueeze(-1), dim=-2)
    if bool(empty.any()):
        a = torch.where(empty[..., None, None], torch.zeros_like(a), a)
        u = torch.where(empty[..., None], torch.zeros_like(u), u)
        v = torch.where(empty[..., None], torch.zeros_like(v), v)
    m = torch.exp(a - u.unsqueeze(-1) - v.unsqueeze(-2))
    out = torch.log(_ryser(m)) + u.sum(-1) + v.sum(-1)
    out = out.masked_fill(empty, -math.inf)
    return out.to(log_a.dtype)


def check_decoupled(base: BaseDensity) -> None:
    """Raise unless every site is acted on by one group only and ``q`` is mean-field."""
    spec = base.spec
    owner: dict[str, str] = {}
    for g in spec.groups:
        for site, _, _ in group_sites(spec, g):
            if site in owner:
                raise SpecError(
                    f"the permanent needs decoupled neuron groups (one hidden layer); site {site!r} is acted on by "
                    f"groups {owner[site]!r} and {g!r}: use method='exact' (small nets) or 'importance'"
                )
            owner[site] = g
    if not base.marginals().exact:
        raise SpecError("the permanent needs a factorized (mean-field Normal) q; use method='exact' or 'importance'")
    big = {g: n for g, n in spec.sizes.items() if n > MAX_PERMANENT_WIDTH}
    if big:
        raise SpecError(
            f"group(s) {big} are wider than {MAX_PERMANENT_WIDTH}: the permanent (2^n n work) is too costly; "
            "use method='importance'"
        )


def permanent_log_ratio(base: BaseDensity, value) -> torch.Tensor:
    """``log q_sym(w) - log q(w) = log S(w) - log|G|`` exactly, via permanents.

    Parameters
    ----------
    base : BaseDensity
        Mean-field Normal ``q``; every site acted on by one group at most.
    value : weights ``w`` ``(*batch, ...)``

    Returns
    -------
    Tensor ``(*batch,)``: one permanent per group and batch entry, summed over groups.
    """
    check_decoupled(base)
    ref = base.reference(value)
    sites = base.sites(value)
    marg = base.marginals()
    total = torch.zeros((), dtype=torch.float64, device=ref.device)
    for g in base.spec.groups:
        a = neuron_log_factors(sites, marg, base.spec, g, dtype=torch.float64)  # (*batch, n, S, n)
        diag = a[..., 0, :].diagonal(dim1=-2, dim2=-1).sum(-1)
        total = total + log_permanent(torch.logsumexp(a, dim=-2)) - diag
    return (total - base.spec.log_order).to(ref.dtype)
