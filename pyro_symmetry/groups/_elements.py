"""The group law on elements: identity, uniform sampling, validation, inverse, compose,
enumeration and the elements that move every neuron.

An element maps each group name to a LongTensor of (signed, see :mod:`._indexing`)
permutations: ``(*batch, n)`` for a top-level group, ``(*batch, H, n)`` for a group nested
in a parent of size ``H`` (one permutation of the parent's block per parent slot; the
wreath product ``S_n wr S_H``). The law of nested groups is computed through the full
index of the parent's span (``full_index``/``split_index``), where it is the ordinary law
of permutations of ``H * n`` units, so there is one definition of inverse and compose.
"""

from __future__ import annotations

import itertools
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any

import torch

from .._shapes import broadcast_shapes
from ._indexing import decode_signed, encode_signed

if TYPE_CHECKING:  # pragma: no cover
    from .spec import PermutationSpec

__all__ = [
    "check_element",
    "compose",
    "elements",
    "full_index",
    "identity",
    "inverse",
    "moving_elements",
    "sample",
    "split_index",
]


def _error(msg: str) -> Exception:
    from .spec import SpecError

    return SpecError(msg)


def unit_shape(spec: PermutationSpec, name: str) -> tuple[int, ...]:
    """``(n,)`` for a top-level group, ``(H, n)`` for one nested in a parent of size ``H``."""
    g = spec.groups[name]
    return (g.size,) if g.parent is None else (spec.groups[g.parent].size, g.size)


def identity(spec: PermutationSpec, batch_shape: tuple[int, ...], device: torch.device) -> dict[str, torch.Tensor]:
    out = {}
    for k, g in spec.groups.items():
        shape = unit_shape(spec, k)
        out[k] = torch.arange(g.size, device=device).expand(batch_shape + shape).clone()
    return out


def sample(
    spec: PermutationSpec,
    batch_shape: tuple[int, ...],
    generator: torch.Generator | None,
    device: torch.device,
    signed: bool,
) -> dict[str, torch.Tensor]:
    out = {}
    for k, g in spec.groups.items():
        shape = batch_shape + unit_shape(spec, k)
        p = torch.rand(shape, generator=generator, device=device).argsort(-1)
        if signed and g.signed:
            p = encode_signed(p, torch.rand(shape, generator=generator, device=device) < 0.5)
        out[k] = p
    return out


def check_element(spec: PermutationSpec, perm: Any, what: str = "perm") -> torch.Size:
    """Check a (batched) element; return its broadcast batch shape.

    Every entry must be a (signed, for sign-flip groups) permutation of ``0..n-1`` in every
    batch entry and parent slot: one sort per group, cheap next to moving the weights.
    """
    if not isinstance(perm, Mapping):
        raise _error(f"{what} must be a mapping group name -> LongTensor, got {type(perm).__name__}")
    missing, extra = set(spec.groups) - set(perm), set(perm) - set(spec.groups)
    if missing or extra:
        raise _error(f"{what} has groups {sorted(perm, key=str)}, the spec has {sorted(spec.groups)}")
    batches = []
    for k, p in perm.items():
        if not isinstance(p, torch.Tensor) or p.dtype not in (torch.int64, torch.int32):
            raise _error(f"{what}[{k!r}] must be an integer LongTensor, got {getattr(p, 'dtype', type(p))}")
        shape = unit_shape(spec, k)
        if p.dim() < len(shape) or tuple(p.shape[p.dim() - len(shape) :]) != shape:
            want = ", ".join(map(str, shape))
            nested = f" (one permutation per slot of parent group {spec.groups[k].parent!r})" if len(shape) > 1 else ""
            raise _error(f"{what}[{k!r}] has shape {tuple(p.shape)}, expected (*batch, {want}){nested}")
        n, signed = shape[-1], spec.groups[k].signed
        src = decode_signed(p)[0] if signed else p
        if not bool((src.sort(-1).values == torch.arange(n, device=p.device)).all()):
            if not signed and bool((p < 0).any()):
                raise _error(f"{what}[{k!r}] flips signs (negative entries) but group {k!r} has no sign-flip symmetry")
            raise _error(f"{what}[{k!r}] is not a permutation of 0..{n - 1} in every batch entry")
        batches.append(p.shape[: p.dim() - len(shape)])
    try:
        return broadcast_shapes(*batches)
    except RuntimeError:
        shapes = {k: tuple(b) for k, b in zip(perm, batches)}
        raise _error(f"{what} has batch shapes {shapes} that do not broadcast") from None


def full_index(parent: torch.Tensor, child: torch.Tensor) -> torch.Tensor:
    """Signed index ``(*batch, H * n)`` of a parent element ``(*b, H)`` with a nested child ``(*b, H, n)``.

    Unit ``(h, j)`` takes unit ``(parent[h], child[h, j])``; the sign is the child's (parents
    of nested groups are never signed).
    """
    n = child.shape[-1]
    src_c, neg = decode_signed(child)
    src = parent.unsqueeze(-1) * n + src_c
    src, neg = torch.broadcast_tensors(src, neg)
    return encode_signed(src, neg).flatten(-2)


def split_index(full: torch.Tensor, H: int, n: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Inverse of :func:`full_index` for an index of the wreath product."""
    src, neg = decode_signed(full.unflatten(-1, (H, n)))
    return src[..., 0] // n, encode_signed(src % n, neg)


def _inverse_flat(p: torch.Tensor) -> torch.Tensor:
    src, neg = decode_signed(p.long())
    ar = torch.arange(p.shape[-1], device=p.device).expand_as(src)
    inv = torch.empty_like(src).scatter_(-1, src, ar)
    return encode_signed(inv, torch.zeros_like(neg).scatter_(-1, src, neg))


def _compose_flat(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    sa, na = decode_signed(a.long())
    sb, nb = decode_signed(b.long())
    shape = broadcast_shapes(sa.shape, sb.shape)
    sa, na, sb, nb = (t.expand(shape) for t in (sa, na, sb, nb))
    return encode_signed(sb.gather(-1, sa), na ^ nb.gather(-1, sa))


def _families(spec: PermutationSpec) -> list[tuple[str, list[str]]]:
    """``(top-level group, [its nested groups])`` in spec order."""
    return [(k, spec.children(k)) for k, g in spec.groups.items() if g.parent is None]


def _by_family(spec: PermutationSpec, fn: Any, *elements: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Apply a law on flat indices family by family (a parent and its nested groups)."""
    out: dict[str, torch.Tensor] = {}
    for top, kids in _families(spec):
        out[top] = fn(*(e[top].long() for e in elements))
        H = spec.groups[top].size
        for kid in kids:
            n = spec.groups[kid].size
            full = fn(*(full_index(e[top].long(), e[kid].long()) for e in elements))
            _, out[kid] = split_index(full, H, n)
    return out


def inverse(spec: PermutationSpec, perm: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return _by_family(spec, _inverse_flat, perm)


def compose(spec: PermutationSpec, a: Mapping[str, torch.Tensor], b: Mapping[str, torch.Tensor]) -> dict:
    """``compose(a, b)``: first ``b``, then ``a``."""
    return _by_family(spec, _compose_flat, a, b)


def _all_of(n: int, signed: bool, device: torch.device) -> torch.Tensor:
    perms = torch.tensor(list(itertools.permutations(range(n))), dtype=torch.long, device=device)
    if signed:
        flips = torch.tensor(list(itertools.product([False, True], repeat=n)), device=device)
        perms = encode_signed(
            perms[:, None, :].expand(-1, len(flips), -1), flips[None].expand(len(perms), -1, -1)
        ).reshape(-1, n)
    return perms


def elements(spec: PermutationSpec, device: torch.device) -> dict[str, torch.Tensor]:
    """All elements stacked along a leading dim (the caller bounds ``|G|``)."""
    factors: list[tuple[str, torch.Tensor]] = []  # (group, table (m, *unit_shape))
    for k, g in spec.groups.items():
        table = _all_of(g.size, g.signed, device)
        if g.parent is not None:  # one independent permutation per parent slot
            H = spec.groups[g.parent].size
            idx = torch.cartesian_prod(*[torch.arange(len(table), device=device)] * H) if H > 1 else None
            table = table[idx] if idx is not None else table.unsqueeze(1)
        factors.append((k, table))
    if not factors:
        return {}
    grids = torch.meshgrid(*[torch.arange(len(t), device=device) for _, t in factors], indexing="ij")
    return {k: t[i.reshape(-1)] for (k, t), i in zip(factors, grids)}


def _shift(shape: Sequence[int], device: torch.device) -> torch.Tensor:
    n = shape[-1]
    return ((torch.arange(n, device=device) + 1) % n).expand(tuple(shape)).clone()


def moving_elements(spec: PermutationSpec, device: torch.device, seed: int = 0) -> list[dict[str, torch.Tensor]]:
    """Elements that together move every neuron of every group.

    A cyclic shift of every group (every neuron of a group of width >= 2 moves) with every
    sign flipped for sign-flip groups (so width-1 signed groups move too), and a seeded
    uniform element (a shift alone commutes with too much to catch every broken spec).
    Width-1 groups without signs have nothing to move.
    """
    shift = {}
    for k, g in spec.groups.items():
        p = _shift(unit_shape(spec, k), device)
        shift[k] = ~p if g.signed else p
    gen = torch.Generator(device=device).manual_seed(seed)
    return [shift, sample(spec, (), gen, device, signed=True)]
