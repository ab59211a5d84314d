"""Linear assignment steps of the coordinate descent: one group, or a parent with nested groups.

A group's step maximizes a linear score over its (signed) permutations. For sign-flip
groups (odd activations) the similarity comes in two parts, ``M`` (what a flip negates:
means on axes that flip) and ``V`` (what it does not: standard deviations, passive axes);
matching ``i`` to ``j`` with sign ``s`` scores ``s M[i, j] + V[i, j]``, so the best sign
per pair is ``sign(M[i, j])`` and the step stays one assignment of ``|M| + V``.

A parent group with nested groups (attention heads, with the q/k dims and the v dims
permuted within each head) is solved jointly over the wreath product: matching reference
block ``h`` to target block ``h'`` is worth the parent's own similarity plus, for every
nested group, the optimal assignment of the units of block ``h'`` onto those of block
``h``; the parent's assignment of these values is then optimal for the whole family.
"""

from __future__ import annotations

import numpy as np
import torch
from scipy.optimize import linear_sum_assignment

from ..groups import decode_signed, encode_signed

__all__ = ["Parts", "assign", "assign_family", "family_value", "value"]

#: ``[S]`` for a group without sign flips, ``[M, V]`` (either may be None) for a sign-flip group.
Parts = list["torch.Tensor | None"]


def best_assignment(score: torch.Tensor) -> torch.Tensor:
    """``src (..., n)`` maximizing ``sum_i score[..., i, src_i]`` over permutations, for every
    leading index. When every row's best column is a different one, that is the optimum (it
    attains the bound ``sum_i max_j``): common near the solution, and O(n^2); the other
    matrices go to :func:`scipy.optimize.linear_sum_assignment` in float64."""
    src = score.argmax(-1)
    n = src.shape[-1]
    hits = torch.zeros_like(src).scatter_(-1, src, 1)
    hard = (hits != 1).any(-1).reshape(-1).nonzero().squeeze(-1)
    if hard.numel():
        flat = src.reshape(-1, n).clone()
        mats = score.reshape(-1, n, n).index_select(0, hard).double().cpu().numpy()
        cols = np.stack([linear_sum_assignment(m, maximize=True)[1] for m in mats]).reshape(-1, n)
        flat[hard] = torch.as_tensor(cols, device=src.device, dtype=torch.long)
        src = flat.reshape(src.shape)
    return src


def _split(parts: Parts, signed: bool) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    return (parts[0], parts[1]) if signed else (None, parts[0])


def assign(parts: Parts, signed: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Best signed assignment of similarities ``(..., n, n)``.

    Returns
    -------
    perm : LongTensor ``(..., n)``, signed encoding
    best : Tensor ``(...)`` float64, its score
    pair : Tensor ``(..., n, n)``, the best score of each pair (``|M| + V``)
    """
    m, v = _split(parts, signed)
    if m is None:  # nothing a flip negates: no flips
        score, neg = v, None
    else:
        score, neg = (m.abs() if v is None else m.abs() + v), m < 0
    src = best_assignment(score)
    flip = None if neg is None else neg.gather(-1, src.unsqueeze(-1)).squeeze(-1)
    best = score.gather(-1, src.unsqueeze(-1)).squeeze(-1).double().sum(-1)
    return encode_signed(src, flip), best, score


def value(parts: Parts, signed: bool, perm: torch.Tensor) -> torch.Tensor:
    """Linear score ``sum_i s_i M[..., i, p_i] + V[..., i, p_i]`` of a signed permutation ``(..., n)``."""
    src, neg = decode_signed(perm)
    m, v = _split(parts, signed)
    out = None
    if m is not None:
        pm = m.gather(-1, src.unsqueeze(-1)).squeeze(-1)
        out = torch.where(neg, -pm, pm)
    if v is not None:
        pv = v.gather(-1, src.unsqueeze(-1)).squeeze(-1)
        out = pv if out is None else out + pv
    return out.double().sum(-1)


def _pick(x: torch.Tensor, parent: torch.Tensor) -> torch.Tensor:
    """``x[b, h, parent[b, h], ...]``: ``(B, H, H, *rest)`` -> ``(B, H, *rest)``."""
    B, H = parent.shape
    rest = x.shape[3:]
    index = parent.reshape(B, H, 1, *(1,) * len(rest)).expand(B, H, 1, *rest)
    return x.gather(2, index).squeeze(2)


def assign_family(
    own: torch.Tensor | None, children: dict[str, tuple[Parts, bool]], B: int, H: int, device: torch.device
) -> tuple[torch.Tensor, dict[str, torch.Tensor], torch.Tensor]:
    """Joint assignment of a parent group and its nested groups (the wreath product).

    Parameters
    ----------
    own : Tensor ``(B, H, H)`` or None
        The parent's similarity on the entries no nested group acts on.
    children : mapping name -> (parts, signed)
        Each nested group's similarities ``(B, H, H, d, d)``: ``[b, h, h', j, j']`` pairs unit
        ``j`` of reference block ``h`` with unit ``j'`` of target block ``h'``.

    Returns
    -------
    parent : LongTensor ``(B, H)``
    nested : mapping name -> LongTensor ``(B, H, d)`` (signed encoding)
    best : Tensor ``(B,)`` float64
    """
    total = torch.zeros(B, H, H, dtype=torch.float64, device=device) if own is None else own.double()
    inner = {}
    for name, (parts, signed) in children.items():
        # One d x d assignment per (b, h, h'): the best within-head matching of every head pair.
        perm, best, _ = assign(parts, signed)
        total = total + best
        inner[name] = perm
    parent = best_assignment(total)
    best = total.gather(-1, parent.unsqueeze(-1)).squeeze(-1).sum(-1)
    return parent, {name: _pick(p, parent) for name, p in inner.items()}, best


def family_value(
    own: torch.Tensor | None,
    children: dict[str, tuple[Parts, bool]],
    parent: torch.Tensor,
    nested: dict[str, torch.Tensor],
) -> torch.Tensor:
    """Linear score ``(B,)`` of a family element ``(parent (B, H), nested (B, H, d))``."""
    total = None if own is None else _pick(own.double(), parent).sum(-1)
    for name, (parts, signed) in children.items():
        picked = [None if p is None else _pick(p, parent) for p in parts]
        v = value(picked, signed, nested[name]).sum(-1)
        total = v if total is None else total + v
    return total
