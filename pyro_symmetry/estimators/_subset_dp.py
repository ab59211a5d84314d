"""The permanent by dynamic programming over column subsets: no cancellation at all.

For a nonnegative ``n x n`` matrix ``M`` let ``F[S]``, for a set ``S`` of columns with
``|S| = k``, be the sum over the bijections of rows ``0..k-1`` onto ``S`` of the product
of their entries (``F[{}] = 1``); then

    F[S] = sum_{j in S} F[S \\ {j}] M[k - 1, j],      perm(M) = F[all columns].

Every operation adds nonnegative numbers, so the relative rounding error stays of order
``n eps`` whatever the matrix: this is the fallback of :func:`log_permanent` where Glynn's
alternating sum cannot be conditioned. Cost ``O(2^n n)`` (like Glynn's formula, with a
larger constant: a gather per term) and ``2^n`` floats per matrix. The gradient
``d log perm / d log M[i, j]`` (the probability that row ``i`` is matched to column
``j``) comes from the mirror recursion over the remaining columns,

    G[S] = sum_{j not in S} M[|S|, j] G[S + {j}],      G[all columns] = 1,

as ``M[i, j] sum_{|S| = i, j not in S} F[S] G[S + {j}] / perm(M)``: again no
cancellation. Sets are bit masks; one array indexed by the mask holds every level, since
a mask's level is its popcount.
"""

from __future__ import annotations

import torch

__all__ = ["dp_permanent"]

#: Gathered elements per step (memory of one step: 8 bytes each, several times over).
_CHUNK_ELEMENTS = 1 << 21
#: Table entries held at once (``2^n`` per matrix, 8 bytes each; two tables in backward).
_TABLE_ELEMENTS = 1 << 24


def _levels(n: int, device: torch.device):
    """Yield ``(k, masks)`` for ``k = 0..n``: the masks of popcount ``k``, ascending."""
    masks = torch.zeros(1, dtype=torch.long, device=device)
    yield 0, masks
    for k in range(1, n + 1):
        # A mask of popcount k is one of popcount k - 1 whose highest bit is below j, plus bit j.
        parts = [masks[: int(torch.searchsorted(masks, 1 << j))] | (1 << j) for j in range(k - 1, n)]
        masks = torch.cat(parts)
        yield k, masks


def _chunks(masks: torch.Tensor, per_mask: int):
    step = max(1, _CHUNK_ELEMENTS // max(1, per_mask))
    for start in range(0, masks.numel(), step):
        yield masks[start : start + step]


def _forward_table(m: torch.Tensor) -> torch.Tensor:
    """``F`` of the module docstring for ``m`` ``(B, n, n)``: a ``(2^n, B)`` table."""
    b, n = m.shape[0], m.shape[-1]
    bits = 1 << torch.arange(n, device=m.device)
    f = m.new_zeros(1 << n, b)
    f[0] = 1.0
    for k, masks in _levels(n, m.device):
        if k == 0:
            continue
        row = m[:, k - 1, :].T  # (n, B)
        for chunk in _chunks(masks, n * b):
            # F[S ^ bit j] for j not in S is a level k + 1 entry, still zero: no mask needed.
            f[chunk] = (f[chunk.unsqueeze(-1) ^ bits] * row).sum(-2)
    return f


def _backward_table(m: torch.Tensor) -> torch.Tensor:
    """``G`` of the module docstring, ``(2^n, B)``, by levels ``n, n-1, ..., 0``."""
    b, n = m.shape[0], m.shape[-1]
    bits = 1 << torch.arange(n, device=m.device)
    g = m.new_zeros(1 << n, b)
    g[(1 << n) - 1] = 1.0
    for k, masks in reversed(list(_levels(n, m.device))):
        if k == n:
            continue
        row = m[:, k, :].T
        for chunk in _chunks(masks, n * b):
            # G[S ^ bit j] for j in S is a level k - 1 entry, still zero.
            g[chunk] = (g[chunk.unsqueeze(-1) ^ bits] * row).sum(-2)
    return g


def _minor_sums(m: torch.Tensor, f: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
    """``d perm / d M[i, j] = sum_{|S| = i, j not in S} F[S] G[S + {j}]``, ``(B, n, n)``."""
    b, n = m.shape[0], m.shape[-1]
    bits = 1 << torch.arange(n, device=m.device)
    out = m.new_zeros(b, n, n)
    for k, masks in _levels(n, m.device):
        if k == n:
            continue
        for chunk in _chunks(masks, n * b):
            free = (chunk.unsqueeze(-1) & bits) == 0  # j not in S; then S ^ bit j = S + {j}
            terms = f[chunk].unsqueeze(-2) * g[chunk.unsqueeze(-1) ^ bits] * free.unsqueeze(-1)  # (c, n, B)
            out[:, k, :] += terms.sum(0).T
    return out


class _DPPermanent(torch.autograd.Function):
    @staticmethod
    def forward(ctx, m: torch.Tensor) -> torch.Tensor:
        f = _forward_table(m)
        ctx.save_for_backward(m, f)
        return f[-1].clone()

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:
        m, f = ctx.saved_tensors
        return grad[:, None, None] * _minor_sums(m, f, _backward_table(m))


def dp_permanent(m: torch.Tensor) -> torch.Tensor:
    """``perm(m)`` for nonnegative ``m`` ``(*batch, n, n)``, differentiable in ``m``.

    Exact up to ``O(n eps)`` relative rounding for any nonnegative matrix: no
    subtraction occurs. Scale ``m`` first so that its permanent neither overflows nor
    underflows (e.g. entries at most one with a permutation of ones). Matrices are
    processed a few at a time (tables of ``2^n`` floats each, at most 128 MB at once;
    one matrix at ``n = 25``: 256 MB, twice that for the gradient).
    """
    batch, n = m.shape[:-2], m.shape[-1]
    if n == 0:
        return m.new_ones(batch)
    flat = m.reshape(-1, n, n)
    step = max(1, _TABLE_ELEMENTS >> n)  # matrices whose tables are held at once
    parts = [_DPPermanent.apply(flat[i : i + step]) for i in range(0, flat.shape[0], step)]
    return torch.cat(parts).reshape(batch)
