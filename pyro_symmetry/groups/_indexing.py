"""Low-level gather kernel shared by every group action.

A *signed index* is a LongTensor whose entry ``p[i] >= 0`` means "take source
element ``p[i]``" and ``p[i] < 0`` means "take source element ``~p[i]`` and negate
it" (``~p == -p - 1``, so index 0 can carry a sign). Plain permutations are
signed indices with no negative entries, so one encoding serves permutations,
signed permutations and flat-vector index maps.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch

from .._shapes import broadcast_shapes

__all__ = ["decode_signed", "encode_signed", "gather_axes"]


def decode_signed(index: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Split a signed index into ``(source, negative)`` (``negative`` a bool mask)."""
    negative = index < 0
    return torch.where(negative, ~index, index), negative


def encode_signed(source: torch.Tensor, negative: torch.Tensor | None) -> torch.Tensor:
    """Inverse of :func:`decode_signed`."""
    if negative is None:
        return source
    return torch.where(negative, ~source, source)


#: Batch-chunk size (bytes) for sites moved along several axes; about an L2/L3 slice.
CHUNK_BYTES = 4 * 2**20


def _gather_one(x: torch.Tensor, axis: int, inner: int, src: torch.Tensor) -> torch.Tensor:
    """Gather event axis ``axis`` of ``x`` ``(B, *event)`` with ``src`` ``(B, n)``.

    One memory-bound pass over ``x``; the two kernels below were the fastest of the
    torch indexing ops measured on CPU (see docs/benchmarks.md).
    """
    B, n = src.shape
    event = x.shape[1:]
    P = math.prod(event[:axis])
    Q = math.prod(event[axis + 1 :]) * inner
    if P == 1:
        # Contiguous blocks of length Q: one row gather over the flattened batch.
        offsets = torch.arange(B, device=x.device).unsqueeze(-1) * n
        y = x.reshape(B * n, Q).index_select(0, (src + offsets).reshape(-1))
    elif Q == 1:
        # Last axis: gather with a stride-0 expanded index (never materialized). A trailing
        # singleton dim would send torch.gather down a ~10x slower path, so stay 3-d.
        y = torch.gather(x.reshape(B, P, n), 2, src.reshape(B, 1, n).expand(B, P, n))
    else:
        y = torch.gather(x.reshape(B, P, n, Q), 2, src.reshape(B, 1, n, 1).expand(B, P, n, Q))
    return y.reshape(x.shape)


def gather_axes(
    x: torch.Tensor,
    event_ndim: int,
    moves: Sequence[tuple[int, int, torch.Tensor, bool]],
) -> torch.Tensor:
    """Gather ``x`` along several event axes at once, with optional sign flips.

    Parameters
    ----------
    x : Tensor, shape ``(*batch_x, *event)``
        ``event`` has ``event_ndim`` dims.
    event_ndim : int
    moves : sequence of ``(axis, inner, index, signed)``
        ``axis`` a non-negative event axis of ``x``; the axis has length
        ``n * inner`` and is read as ``n`` blocks of ``inner`` contiguous entries
        (``inner > 1`` after a conv-to-linear flatten); ``index`` a signed index of
        shape ``(*batch_i, n)``; ``signed`` whether negative entries may occur.

    Returns
    -------
    Tensor, shape ``(*broadcast(batch_x, batch_i...), *event)``
        ``y[..., i, ...] = s_i x[..., src_i, ...]`` along every listed axis.

    Notes
    -----
    Each axis is one memory-bound gather with a small (broadcast) index; no index of
    the size of ``x`` is materialized and nothing loops over single samples. A site
    moved along several axes is processed in batch chunks of about
    :data:`CHUNK_BYTES`, so the intermediate of the first gather is still in cache
    when the next one reads it and the output is written once.
    """
    event = tuple(x.shape[x.dim() - event_ndim :])
    batch_x = tuple(x.shape[: x.dim() - event_ndim])
    batch = tuple(broadcast_shapes(batch_x, *(m[2].shape[:-1] for m in moves)))
    # Flatten the (broadcast) batch to one dim: a view unless x itself is broadcast.
    flat = x.expand(batch + event).reshape((-1,) + event)
    B = flat.shape[0]
    steps = []  # (axis, inner, src (B or 1, n), sign factor broadcastable to (B or 1, *event) or None)
    for axis, inner, index, signed in moves:
        index = index.to(x.device)  # a group element may live on another device than the weights
        src, neg = decode_signed(index) if signed else (index, None)
        n = src.shape[-1]
        src = src.expand(batch + (n,)).reshape(B, n) if src.dim() > 1 else src.unsqueeze(0)
        sign = None
        if neg is not None:
            sign = torch.where(neg, -1, 1).to(x.dtype)
            if inner > 1:
                sign = sign.repeat_interleave(inner, dim=-1)
            sign = sign.expand(batch + sign.shape[-1:]).reshape(B, -1) if neg.dim() > 1 else sign.unsqueeze(0)
            sign = sign.reshape(sign.shape[:1] + (1,) * axis + sign.shape[-1:] + (1,) * (event_ndim - axis - 1))
        steps.append((axis, inner, src, sign))

    def run(block: torch.Tensor, lo: int, hi: int) -> torch.Tensor:
        for axis, inner, src, sign in steps:
            src_b = src[lo:hi] if src.shape[0] > 1 else src.expand(hi - lo, -1)
            block = _gather_one(block, axis, inner, src_b)
            if sign is not None:
                block = block * (sign[lo:hi] if sign.shape[0] > 1 else sign)
        return block

    if len(steps) == 1 or B <= 1:
        return run(flat, 0, B).reshape(batch + event)
    out = torch.empty((B,) + event, dtype=x.dtype, device=x.device)
    per_sample = max(1, flat[0].numel() * flat.element_size())
    chunk = max(1, CHUNK_BYTES // per_sample)
    for lo in range(0, B, chunk):
        hi = min(B, lo + chunk)
        out[lo:hi] = run(flat[lo:hi], lo, hi)
    return out.reshape(batch + event)
