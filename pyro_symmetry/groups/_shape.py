"""Handlers of shape operations: reshape, permute, expand, cat/stack, split, indexing.

A reshape reads the input's channel atoms as a stream of factors and regroups them into
the output dims, splitting an atom into blocks where an output dim needs it (a projection's
output viewed as ``(heads, dims)``). Slicing a channel dim cuts its atom into independent
slices (a SUM); ``cat`` along a channel dim makes one. Anything that selects a particular
channel (an integer index, a flip) fixes the atom.
"""

from __future__ import annotations

from typing import Any

from ._graph import BOTH, NONE, Ctx, Handler
from ._trace import Op, Ref

__all__ = ["HANDLERS", "expand_to"]


def _split_atom(ctx: Ctx, a: int, sizes: tuple[int, ...]) -> list[int]:
    kind = ctx.f.kind(a)
    if kind == "leaf":
        return ctx.f.split(a, sizes)
    ctx.f.fix(a)
    return [ctx.fixed(s) for s in sizes]


def h_reshape(ctx: Ctx, op: Op) -> None:
    """``view``/``reshape``/``flatten``/``unflatten``: regroup the factor stream into the new dims."""
    x, out = op.args[0], op.outs[0]
    oshape = ctx.shape(out)
    stream = [f for a in ctx.dims(x) for f in ctx.f.factors(a)]
    atoms: list[int] = []
    i = 0
    ok = 0 not in oshape
    for n in oshape if ok else ():
        if n == 1:
            if i < len(stream) and ctx.f.size[stream[i]] == 1:
                atoms.append(stream[i])
                i += 1
            else:
                atoms.append(ctx.fixed(1))
            continue
        group, prod = [], 1
        while prod < n and ok:
            if i >= len(stream):
                ok = False
                break
            f = stream[i]
            s = ctx.f.size[ctx.f.find(f)]
            if n % (prod * s) == 0:  # (a width-1 atom merged in keeps its one-unit group)
                group.append(f)
                prod *= s
                i += 1
            elif s % (n // prod) == 0 and n % prod == 0:
                head, rest = _split_atom(ctx, f, (n // prod, s // (n // prod)))
                group.append(head)
                prod = n
                stream[i] = rest
            else:
                ok = False
        atoms.append(ctx.f.prod_of(group) if len(group) != 1 else group[0])
    for f in stream[i:]:
        ctx.f.fix(f)
    if not ok or len(atoms) != len(oshape):
        ctx.fix(x)
        ctx.set(out, [ctx.fixed(s) for s in oshape])
        return
    ctx.set(out, atoms)
    ctx.flat([(x.node, d, ()) for d in range(len(ctx.shape(x)))], [(out, d, ()) for d in range(len(oshape))])


def h_unsqueeze(ctx: Ctx, op: Op) -> None:
    x, out = op.args[0], op.outs[0]
    dim = op.arg(1, "dim") % len(ctx.shape(out))
    atoms = list(ctx.dims(x))
    atoms.insert(dim, ctx.fixed(1))
    ctx.set(out, atoms)
    src = [d for d in range(len(atoms)) if d != dim]
    for od, d in zip(src, range(len(ctx.shape(x)))):
        ctx.eq((out, od, ()), (x.node, d, ()))


def h_squeeze(ctx: Ctx, op: Op) -> None:
    x, out = op.args[0], op.outs[0]
    shp = ctx.shape(x)
    dim = op.arg(1, "dim")
    if dim is None:
        drop = [d for d, s in enumerate(shp) if s == 1]
    else:
        dims = [dim] if isinstance(dim, int) else list(dim)
        drop = [d % len(shp) for d in dims if shp[d % len(shp)] == 1]
    ctx.fix(x, drop)
    keep = [d for d in range(len(shp)) if d not in drop]
    ctx.set(out, [ctx.dims(x)[d] for d in keep])
    for od, d in enumerate(keep):
        ctx.eq((out, od, ()), (x.node, d, ()))


def _permutation(op: Op, nd: int) -> list[int] | None:
    n = op.name
    if n == "permute":
        dims = op.args[1:] if len(op.args) > 2 or isinstance(op.arg(1, "dims"), int) else op.arg(1, "dims")
        return [d % nd for d in dims]
    if n in ("transpose", "swapaxes", "swapdims"):
        a, b = op.arg(1, "dim0") % nd, op.arg(2, "dim1") % nd
        p = list(range(nd))
        p[a], p[b] = p[b], p[a]
        return p
    if n in ("t", "T"):
        return list(range(nd))[::-1]
    if n in ("mT", "adjoint"):
        return list(range(nd - 2)) + [nd - 1, nd - 2]
    if n in ("movedim", "moveaxis"):
        src, dst = op.arg(1, "source"), op.arg(2, "destination")
        src = [src] if isinstance(src, int) else list(src)
        dst = [dst] if isinstance(dst, int) else list(dst)
        src, dst = [s % nd for s in src], [d % nd for d in dst]
        rest = iter([d for d in range(nd) if d not in src])
        order = dict(zip(dst, src))
        return [order[i] if i in order else next(rest) for i in range(nd)]
    return None


def h_permute(ctx: Ctx, op: Op) -> None:
    x, out = op.args[0], op.outs[0]
    nd = len(ctx.shape(x))
    perm = _permutation(op, nd)
    ctx.set(out, [ctx.dims(x)[p] for p in perm])
    for od, d in enumerate(perm):
        ctx.eq((out, od, ()), (x.node, d, ()))


def expand_to(ctx: Ctx, x: Ref, out: int) -> None:
    """Label ``out``, a broadcast of ``x``: copies of one entry along a dim fix its atom."""
    ishape, oshape = ctx.shape(x), ctx.shape(out)
    off = len(oshape) - len(ishape)
    atoms = []
    for d, n in enumerate(oshape):
        k = d - off
        if k < 0:
            atoms.append(ctx.fixed(n))
        elif ishape[k] == n:
            atoms.append(ctx.dims(x)[k])
            ctx.eq((out, d, ()), (x.node, k, ()))
        else:
            ctx.f.fix(ctx.dims(x)[k])
            atoms.append(ctx.fixed(n))
    ctx.set(out, atoms)


def h_expand(ctx: Ctx, op: Op) -> None:
    expand_to(ctx, op.args[0], op.outs[0])


def h_repeat(ctx: Ctx, op: Op) -> None:
    """``repeat``/``tile``: copies of a whole channel dim keep its atom, read as ``(copies, channels)``."""
    x, out = op.args[0], op.outs[0]
    ishape, oshape = ctx.shape(x), ctx.shape(out)
    off = len(oshape) - len(ishape)
    atoms = []
    for d, n in enumerate(oshape):
        k = d - off
        if k < 0:
            atoms.append(ctx.fixed(n))
            continue
        a, s = ctx.dims(x)[k], ishape[k]
        if s == n:
            atoms.append(a)
        elif s == 1 or n % s:
            ctx.f.fix(a)
            atoms.append(ctx.fixed(n))
            continue
        else:
            atoms.append(ctx.f.prod_of([ctx.fixed(n // s), a]))
        ctx.flat([(out, d, ())], [(x.node, k, ())])
    ctx.set(out, atoms)


def h_repeat_interleave(ctx: Ctx, op: Op) -> None:
    x, out = op.args[0], op.outs[0]
    r, dim = op.arg(1, "repeats"), op.arg(2, "dim")
    if not isinstance(x, Ref) or not isinstance(r, int) or dim is None:
        h_fix_all(ctx, op)
        return
    dim %= len(ctx.shape(x))
    atoms = list(ctx.dims(x))
    atoms[dim] = ctx.f.prod_of([atoms[dim], ctx.fixed(r)])
    ctx.set(out, atoms)
    for d in range(len(atoms)):
        ctx.flat([(out, d, ())], [(x.node, d, ())])


def h_cat(ctx: Ctx, op: Op) -> None:
    """``cat`` along a channel dim: the output's atom is the concatenation (SUM) of the inputs'."""
    tensors = [t for t in op.arg(0, "tensors") if isinstance(t, Ref)]
    out = op.outs[0]
    nd = len(ctx.shape(out))
    tensors = [t for t in tensors if len(ctx.shape(t)) == nd]
    dim = op.arg(1, "dim", 0) % nd
    parts = [t for t in tensors if ctx.shape(t)[dim] > 0]
    atoms = []
    for d in range(nd):
        if d == dim:
            atoms.append(ctx.f.sum_of([ctx.dims(t)[d] for t in parts]))
            continue
        a = ctx.dims(tensors[0])[d]
        for t in tensors[1:]:
            ctx.tie(a, ctx.dims(t)[d])
        atoms.append(a)
        for t in tensors:
            ctx.eq((out, d, ()), (t.node, d, ()))
    ctx.set(out, atoms)
    root = ctx.f.find(atoms[dim])
    if len(parts) == 1:
        ctx.eq((out, dim, ()), (parts[0].node, dim, ()))
    elif ctx.f.kind(root) == "sum":
        for i, t in enumerate(parts):
            ctx.eq((out, dim, (i,)), (t.node, dim, ()))


def h_stack(ctx: Ctx, op: Op) -> None:
    tensors = [t for t in op.arg(0, "tensors") if isinstance(t, Ref)]
    out = op.outs[0]
    nd = len(ctx.shape(out))
    dim = op.arg(1, "dim", 0) % nd
    atoms = []
    for d in range(nd - 1):
        a = ctx.dims(tensors[0])[d]
        for t in tensors[1:]:
            ctx.tie(a, ctx.dims(t)[d])
        atoms.append(a)
    atoms.insert(dim, ctx.fixed(len(tensors)))
    ctx.set(out, atoms)
    src = [d for d in range(nd) if d != dim]
    for od, d in zip(src, range(nd - 1)):
        for t in tensors:
            ctx.eq((out, od, ()), (t.node, d, ()))


def _slice_out(ctx: Ctx, x: Ref, dim: int, lo: int, hi: int, out: int, od: int) -> int:
    """Atom of a slice ``[lo, hi)`` of ``x``'s dim ``dim``, linked to ``out``'s dim ``od``."""
    pieces = ctx.f.segment(ctx.dims(x)[dim], lo, hi)
    atom = pieces[0][0] if len(pieces) == 1 else ctx.f.sum_of([a for a, _ in pieces])
    refs = [(x.node, dim, p) for _, p in pieces if p is not None]
    if refs:
        ctx.flat([(out, od, ())], refs)
    return atom


def h_split(ctx: Ctx, op: Op) -> None:
    """``split``/``chunk``/``narrow``/``tensor_split``: consecutive slices of one dim."""
    x = op.args[0]
    nd = len(ctx.shape(x))
    key = {"chunk": 2, "split": 2, "split_with_sizes": 2, "tensor_split": 2, "narrow": 1}[op.name]
    dim = op.arg(key, "dim", 0) % nd
    lo = op.arg(2, "start", 0) if op.name == "narrow" else 0
    if isinstance(lo, Ref):
        h_fix_all(ctx, op)
        return
    for n in op.outs:
        hi = lo + ctx.shape(n)[dim]
        atoms = list(ctx.dims(x))
        atoms[dim] = _slice_out(ctx, x, dim, lo, hi, n, dim)
        ctx.set(n, atoms)
        for d in range(nd):
            if d != dim:
                ctx.eq((n, d, ()), (x.node, d, ()))
        lo = hi


def h_unbind(ctx: Ctx, op: Op) -> None:
    """``unbind``/``select``: one index of a dim (a particular channel: its atom is fixed)."""
    x = op.args[0]
    nd = len(ctx.shape(x))
    dim = op.arg(1, "dim", 0) % nd
    ctx.fix(x, [dim])
    keep = [d for d in range(nd) if d != dim]
    for n in op.outs:
        ctx.set(n, [ctx.dims(x)[d] for d in keep])
        for od, d in enumerate(keep):
            ctx.eq((n, od, ()), (x.node, d, ()))


def h_flip(ctx: Ctx, op: Op) -> None:
    """Flips, rolls and triangular masks: linear, but tied to positions along their dims."""
    x, out = op.args[0], op.outs[0]
    nd = len(ctx.shape(x))
    if op.name in ("tril", "triu"):
        dims = [nd - 2, nd - 1]
    elif op.name in ("fliplr",):
        dims = [1]
    elif op.name in ("flipud",):
        dims = [0]
    else:
        v = op.arg(2 if op.name == "roll" else 1, "dims")
        dims = list(range(nd)) if v is None else [d % nd for d in ([v] if isinstance(v, int) else v)]
    ctx.fix(x, dims)
    ctx.same(out, x, BOTH)


def h_index_select(ctx: Ctx, op: Op) -> None:
    x, out = op.args[0], op.outs[0]
    dim = op.arg(1, "dim") % len(ctx.shape(x))
    ctx.fix(x, [dim])
    atoms = list(ctx.dims(x))
    atoms[dim] = ctx.fixed(ctx.shape(out)[dim])
    ctx.set(out, atoms)
    for d in range(len(atoms)):
        if d != dim:
            ctx.eq((out, d, ()), (x.node, d, ()))


def h_fix_all(ctx: Ctx, op: Op) -> None:
    """Operations that move entries by data (gather, scatter, masked selection): no channel
    moves through them."""
    for r in list(op.args) + list(op.kwargs.values()):
        for t in r if isinstance(r, (list, tuple)) else [r]:
            if isinstance(t, Ref):
                ctx.fix(t)
    for n in op.outs:
        ctx.set(n, [ctx.fixed(s) for s in ctx.shape(n)])


def h_one_hot(ctx: Ctx, op: Op) -> None:
    x, out = op.args[0], op.outs[0]
    ctx.set(out, [*ctx.dims(x), ctx.fixed(ctx.shape(out)[-1])])


def _index_items(idx: Any, nd: int) -> list[Any] | None:
    """The index as one item per consumed dim (``...`` expanded), None items kept in place."""
    items = list(idx) if isinstance(idx, tuple) else [idx]
    if sum(1 for i in items if i is Ellipsis) > 1:
        return None
    used = sum(_consumes(i) for i in items if i is not Ellipsis)
    if Ellipsis in items:
        k = items.index(Ellipsis)
        return items[:k] + [slice(None)] * (nd - used) + items[k + 1 :]
    return items + [slice(None)] * max(0, nd - used)


def _consumes(item: Any) -> int:
    if item is None or isinstance(item, bool):
        return 0
    return 1


def h_getitem(ctx: Ctx, op: Op) -> None:
    """Basic indexing (ints, slices, None, ``...``); one tensor index along a fixed dim."""
    x, out = op.args[0], op.outs[0]
    shp = ctx.shape(x)
    items = _index_items(op.args[1], len(shp))
    atoms: list[int] = []
    links: list[tuple[int, int]] = []
    d = 0
    advanced = 0
    for it in items or []:
        if it is None:
            atoms.append(ctx.fixed(1))
        elif isinstance(it, bool) or d >= len(shp):
            advanced += 1
        elif isinstance(it, int):
            ctx.fix(x, [d])
            d += 1
        elif isinstance(it, slice):
            lo, hi, step = it.indices(shp[d])
            if (lo, hi, step) == (0, shp[d], 1):
                atoms.append(ctx.dims(x)[d])
                links.append((len(atoms) - 1, d))
            elif step == 1:
                atoms.append(_slice_out(ctx, x, d, lo, max(lo, hi), out, len(atoms)))
            else:
                ctx.fix(x, [d])
                atoms.append(ctx.fixed(len(range(lo, hi, step))))
            d += 1
        else:  # a tensor or list index: which entries are read is data
            advanced += 1
            ctx.fix(x, [d])
            if isinstance(it, Ref):
                ctx.fix(it)
            d += 1
            atoms.append(-1)
    oshape = ctx.shape(out)
    if items is None or advanced > 1 or len(atoms) != len(oshape) and advanced == 0:
        ctx.fix(x)
        ctx.set(out, [ctx.fixed(s) for s in oshape])
        return
    if advanced:  # one tensor index: its dims replace the indexed dim
        k = atoms.index(-1) if -1 in atoms else len(atoms)
        extra = len(oshape) - (len(atoms) - (1 if -1 in atoms else 0))
        atoms = atoms[:k] + [ctx.fixed(oshape[k + j]) for j in range(extra)] + atoms[k + 1 :]
        links = [(od if od < k else od + extra - 1, xd) for od, xd in links]
        if len(atoms) != len(oshape):
            ctx.fix(x)
            ctx.set(out, [ctx.fixed(s) for s in oshape])
            return
    ctx.set(out, atoms)
    for od, xd in links:
        ctx.eq((out, od, ()), (x.node, xd, ()))


def h_setitem(ctx: Ctx, op: Op) -> None:
    """``x[idx] = v``: allowed along fixed dims (a channel slice written in place fixes it)."""
    x, idx, v = op.args[0], op.args[1], op.args[2]
    out = op.outs[0]
    shp = ctx.shape(x)
    ctx.same(out, x, BOTH)
    items = _index_items(idx, len(shp))
    region: list[int] = []
    d = 0
    for it in items or [None] * 99:
        if d >= len(shp) or items is None:
            break
        if it is None:
            continue
        if isinstance(it, slice) and it.indices(shp[d]) == (0, shp[d], 1):
            region.append(d)
        else:
            ctx.fix(x, [d])
            if isinstance(it, Ref):
                ctx.fix(it)
        d += 1
    if items is None:
        ctx.fix(x)
    if isinstance(v, Ref):
        vs = ctx.shape(v)
        for k in range(1, min(len(vs), len(region)) + 1):
            rd = region[-k]
            if vs[-k] == shp[rd]:
                ctx.eq_dims(v, len(vs) - k, out, rd)
            else:
                ctx.fix(v, [len(vs) - k])
    elif not (isinstance(v, (int, float)) and v == 0):
        ctx.kind(out, NONE)


HANDLERS: dict[str, Handler] = {
    **dict.fromkeys(["view", "reshape", "flatten", "unflatten", "view_as", "reshape_as", "ravel"], h_reshape),
    "unsqueeze": h_unsqueeze,
    "squeeze": h_squeeze,
    **dict.fromkeys(["permute", "transpose", "swapaxes", "swapdims", "t", "T", "mT", "adjoint"], h_permute),
    **dict.fromkeys(["movedim", "moveaxis"], h_permute),
    **dict.fromkeys(["expand", "expand_as", "broadcast_to"], h_expand),
    **dict.fromkeys(["repeat", "tile"], h_repeat),
    "repeat_interleave": h_repeat_interleave,
    **dict.fromkeys(["cat", "concat", "concatenate"], h_cat),
    "stack": h_stack,
    **dict.fromkeys(["split", "chunk", "split_with_sizes", "tensor_split", "narrow"], h_split),
    **dict.fromkeys(["unbind", "select"], h_unbind),
    **dict.fromkeys(["flip", "fliplr", "flipud", "roll", "tril", "triu"], h_flip),
    "index_select": h_index_select,
    **dict.fromkeys(["gather", "scatter", "scatter_add", "index_put", "take", "take_along_dim"], h_fix_all),
    **dict.fromkeys(["masked_select", "nonzero", "masked_scatter", "diag", "diagonal", "diag_embed"], h_fix_all),
    **dict.fromkeys(["index_add", "index_copy", "index_fill", "put", "scatter_reduce"], h_fix_all),
    "one_hot": h_one_hot,
    "getitem": h_getitem,
    "setitem": h_setitem,
}
