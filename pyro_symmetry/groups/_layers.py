"""Handlers of layers: linear maps, matmul/einsum, convolutions, norms, embeddings and
pooling.

A layer's weight *rows* write a channel space (its output's atom, linked with the output:
they are scaled with it) and its *columns* read one (contracted with the input). Norm layers
make their input passive (its scale is normalized away) and start a new scaled region at
their affine weight. Attention: :mod:`._attention`.
"""

from __future__ import annotations

import torch.nn.functional as F

from ._graph import BOTH, NONE, SCALE, Ctx, Handler
from ._trace import Op, Ref
from .spec import SpecError

__all__ = ["HANDLERS", "batch_dims"]


def batch_dims(ctx: Ctx, out: int, od: list[int], operands: list[tuple[Ref, list[int]]]) -> list[int]:
    """Broadcast batch dims of a product (``out`` dims ``od``) over ``operands`` (ref, dims):
    a value times a value breaks sign and scale; a parameter beside a value is only permuted."""
    values = [r for r, _ in operands if ctx.node(r).is_value]
    atoms = []
    for j, o in enumerate(od):
        members = []
        for r, dims in operands:
            k = j - (len(od) - len(dims))
            if k < 0:
                continue
            d = dims[k]
            if ctx.shape(r)[d] == ctx.shape(out)[o]:
                members.append((r, d))
            else:
                ctx.f.fix(ctx.dims(r)[d])
        a = ctx.dims(members[0][0])[members[0][1]] if members else ctx.fixed(ctx.shape(out)[o])
        for r, d in members[1:]:
            ctx.tie(a, ctx.dims(r)[d])
        atoms.append(a)
        linked = False
        for r, d in members:
            if ctx.node(r).is_value or (not values and not linked):
                ctx.eq((out, o, ()), (r.node, d, ()))
                linked = True
            else:
                ctx.neutral(r, d)
        if len(values) > 1:
            ctx.kind(out, NONE, [o])
    return atoms


def matmul(ctx: Ctx, a: Ref, b: Ref, out: int) -> None:
    """``torch.matmul`` semantics (1-D operands, broadcast batch dims)."""
    na, nb, no = len(ctx.shape(a)), len(ctx.shape(b)), len(ctx.shape(out))
    ctx.contract(a, na - 1, b, 0 if nb == 1 else nb - 2)
    atoms = {}
    if na >= 2:
        atoms[no - (2 if nb >= 2 else 1)] = (a, na - 2)
    if nb >= 2:
        atoms[no - 1] = (b, nb - 1)
    batch_out = [d for d in range(no) if d not in atoms]
    ops = [(a, list(range(na - 2))), (b, list(range(nb - 2)))]
    labels = dict(zip(batch_out, batch_dims(ctx, out, batch_out, ops)))
    for o, (r, d) in atoms.items():
        labels[o] = ctx.dims(r)[d]
        ctx.eq((out, o, ()), (r.node, d, ()))
    ctx.set(out, [labels[d] for d in range(no)])


def h_matmul(ctx: Ctx, op: Op) -> None:
    a, b = op.args[0], op.arg(1, "other")
    if op.name in ("addmm", "baddbmm", "addmv", "addbmm"):
        a, b = op.args[1], op.args[2]
    if not (isinstance(a, Ref) and isinstance(b, Ref)):
        raise SpecError(f"cannot read {op.describe()}: expected two tensors")
    out = op.outs[0]
    matmul(ctx, a, b, out)
    if op.name in ("addmm", "baddbmm", "addmv"):
        bias = op.args[0]
        shp = ctx.shape(bias)
        for k in range(1, len(shp) + 1):
            o = len(ctx.shape(out)) - k
            if shp[-k] == ctx.shape(out)[o]:
                ctx.eq_dims(bias, len(shp) - k, out, o)
            else:
                ctx.fix(bias, [len(shp) - k])


def h_outer(ctx: Ctx, op: Op) -> None:
    a, b, out = op.args[0], op.arg(1, "vec2"), op.outs[0]
    ctx.set(out, [ctx.dims(a)[0], ctx.dims(b)[0]])
    ctx.eq((out, 0, ()), (a.node, 0, ()))
    ctx.eq((out, 1, ()), (b.node, 0, ()))


def h_linear(ctx: Ctx, op: Op) -> None:
    """``F.linear(x, W, b)``: columns of ``W`` read ``x``'s last dim, rows write the output's."""
    x, w, b = op.args[0], op.arg(1, "weight"), op.arg(2, "bias")
    out = op.outs[0]
    nx = len(ctx.shape(x))
    if len(ctx.shape(w)) == 1:
        matmul(ctx, x, w, out)
    else:
        ctx.contract(x, nx - 1, w, 1)
        atoms = [ctx.dims(x)[d] for d in range(nx - 1)] + [ctx.dims(w)[0]]
        ctx.set(out, atoms)
        for d in range(nx - 1):
            ctx.eq((out, d, ()), (x.node, d, ()))
        ctx.eq((out, nx - 1, ()), (w.node, 0, ()))
    if isinstance(b, Ref):
        ctx.eq_dims(b, len(ctx.shape(b)) - 1, out, len(ctx.shape(out)) - 1)


def _letters(eq: str, shapes: list[tuple[int, ...]]) -> tuple[list[str], str] | None:
    eq = eq.replace(" ", "")
    lhs, _, rhs = eq.partition("->")
    terms = lhs.split(",")
    if len(terms) != len(shapes):
        return None
    spare = iter(c for c in "ABCDEFGHIJKLMNOPQRSTUVWXYZ" if c not in eq)
    ell = ""
    out_terms = []
    for t, s in zip(terms, shapes):
        if "..." in t:
            k = len(s) - (len(t) - 3)
            while len(ell) < k:
                ell = next(spare) + ell
            t = t.replace("...", ell[len(ell) - k :])
        out_terms.append(t)
    if "->" not in eq:
        counts = {c: sum(t.count(c) for t in out_terms) for c in set("".join(out_terms))}
        rhs = ell + "".join(sorted(c for c, n in counts.items() if n == 1 and c not in ell))
    else:
        rhs = rhs.replace("...", ell)
    return out_terms, rhs


def h_einsum(ctx: Ctx, op: Op) -> None:
    """``einsum``: a letter kept in the output links its dims there (a product of values where
    several operands share it); a letter summed over by two operands is a contraction."""
    eq = op.args[0]
    operands = list(op.args[1]) if len(op.args) == 2 and isinstance(op.args[1], (list, tuple)) else list(op.args[1:])
    out = op.outs[0]
    parsed = _letters(eq, [ctx.shape(r) for r in operands])
    if parsed is None:
        raise SpecError(f"cannot read {op.describe()}: einsum equation {eq!r}")
    terms, rhs = parsed
    values = sum(1 for r in operands if ctx.node(r).is_value)
    atoms = []
    for o, c in enumerate(rhs):
        have = [(r, t.index(c)) for r, t in zip(operands, terms) if c in t]
        a = ctx.dims(have[0][0])[have[0][1]]
        for r, d in have[1:]:
            ctx.tie(a, ctx.dims(r)[d])
        atoms.append(a)
        linked = False
        for r, d in have:
            if ctx.node(r).is_value or (not values and not linked):
                ctx.eq((out, o, ()), (r.node, d, ()))
                linked = True
            else:
                ctx.neutral(r, d)
        if sum(1 for r, _ in have if ctx.node(r).is_value) > 1:
            ctx.kind(out, NONE, [o])
    ctx.set(out, atoms)
    for c in {c for t in terms for c in t if c not in rhs}:
        have = [(r, t.index(c)) for r, t in zip(operands, terms) if c in t]
        if len(have) == 2:
            ctx.contract(have[0][0], have[0][1], have[1][0], have[1][1])
        else:
            for r, d in have:
                ctx.kind(r, NONE, [d])
                ctx.tie(ctx.dims(have[0][0])[have[0][1]], ctx.dims(r)[d])
    for r, t in zip(operands, terms):
        for c in set(t):
            if t.count(c) > 1:
                ctx.fix(r, [i for i, x in enumerate(t) if x == c])


def _prod_parts(ctx: Ctx, atom: int, sizes: tuple[int, int], names: list[str] | None = None) -> list[int] | None:
    """``atom`` read as ``sizes[0]`` blocks of ``sizes[1]`` (split if needed), or None if it is
    already cut another way (then it is fixed)."""
    f = ctx.f
    if f.kind(atom) == "leaf":
        return f.split(atom, sizes, names)
    if f.kind(atom) == "prod" and [f.size[f.find(p)] for p in f.parts_of(atom)] == list(sizes):
        return list(f.parts_of(atom))
    f.fix(atom)
    return None


def h_conv(ctx: Ctx, op: Op) -> None:
    """Convolutions. Grouped (``groups=g``): conv group ``j`` reads input block ``j`` and writes
    output block ``j``, so whole blocks move together on both sides (one group of size ``g``,
    tied across the layer); within a block the output channels permute freely (nested) and the
    input channels are fixed (their permutation would depend on the output block, which no axis
    of the weight can express). Depthwise (one in and one out channel per group): input and
    output channels share one group; the kernel is only permuted."""
    x, w, b = op.args[0], op.arg(1, "weight"), op.arg(2, "bias")
    out = op.outs[0]
    groups = op.arg(6, "groups", 1)
    transposed = op.name.startswith("conv_transpose")
    if transposed:
        groups = op.arg(6, "groups", 1)
    nsp = len(ctx.shape(w)) - 2
    cdim = len(ctx.shape(x)) - nsp - 1
    ctx.fix(x, range(cdim + 1, len(ctx.shape(x))))
    atoms = [ctx.dims(x)[d] for d in range(cdim)] + [None] + [ctx.fixed(s) for s in ctx.shape(out)[cdim + 1 :]]
    for d in range(cdim):
        ctx.eq((out, d, ()), (x.node, d, ()))
    if transposed and groups != 1:
        raise SpecError(f"cannot read {op.describe()}: grouped transposed convolutions are not supported")
    if groups == 1:
        ctx.contract(x, cdim, w, 0 if transposed else 1)
        atoms[cdim] = ctx.dims(w)[1 if transposed else 0]
        ctx.set(out, atoms)
        ctx.eq((out, cdim, ()), (w.node, 1 if transposed else 0, ()))
    elif ctx.shape(w)[0] == groups and ctx.shape(w)[1] == 1:
        ctx.tie(ctx.dims(x)[cdim], ctx.dims(w)[0])
        ctx.fix(w, [1])
        atoms[cdim] = ctx.dims(x)[cdim]
        ctx.set(out, atoms)
        ctx.eq((out, cdim, ()), (x.node, cdim, ()))
        ctx.neutral(w, 0)
    else:
        _grouped(ctx, x, w, out, cdim, groups, atoms)
    if isinstance(b, Ref):
        ctx.eq_dims(b, 0, out, cdim)


def _grouped(ctx: Ctx, x: Ref, w: Ref, out: int, cdim: int, g: int, atoms: list) -> None:
    cin, cout = ctx.shape(x)[cdim] // g, ctx.shape(w)[0] // g
    xin = _prod_parts(ctx, ctx.dims(x)[cdim], (g, cin))
    wout = _prod_parts(ctx, ctx.dims(w)[0], (g, cout))
    ctx.fix(w, [1])
    if xin is None or wout is None:
        ctx.fix(x, [cdim])
        ctx.fix(w, [0])
        atoms[cdim] = ctx.dims(w)[0]
        ctx.set(out, atoms)
        return
    ctx.f.fix(xin[1])
    ctx.tie(xin[0], wout[0])
    atoms[cdim] = ctx.dims(w)[0]
    ctx.set(out, atoms)
    ctx.eq((out, cdim, (0,)), (x.node, cdim, (0,)))
    ctx.eq((out, cdim, (1,)), (w.node, 0, (1,)))
    ctx.neutral(w, 0, (0,))


def _affine(ctx: Ctx, out: int, dims: list[int], params: list[Ref | None], neutral: list[Ref | None] = ()) -> None:
    """A norm's affine weight/bias (linked: they scale the output) and running statistics
    (only permuted) over ``out``'s ``dims``. Without a weight the output cannot scale."""
    if not isinstance(params[0], Ref):
        ctx.norm_input(out, dims)
    for p in params:
        if isinstance(p, Ref):
            for j, d in enumerate(dims[len(dims) - len(ctx.shape(p)) :]):
                ctx.eq_dims(p, j, out, d)
    for p in neutral:
        if isinstance(p, Ref):
            for j, d in enumerate(dims[len(dims) - len(ctx.shape(p)) :]):
                ctx.tie(ctx.dims(p)[j], ctx.dims(out)[d])
                ctx.neutral(p, j)


def h_batch_norm(ctx: Ctx, op: Op) -> None:
    """BatchNorm/InstanceNorm (per channel, dim 1): the input is normalized (passive)."""
    x, out = op.args[0], op.outs[0]
    if op.func is F.batch_norm or op.func is F.instance_norm:
        rm, rv, w, b = (op.arg(i, k) for i, k in enumerate(["running_mean", "running_var", "weight", "bias"], 1))
    else:  # torch.batch_norm(input, weight, bias, running_mean, running_var, ...)
        w, b, rm, rv = (op.arg(i, k) for i, k in enumerate(["weight", "bias", "running_mean", "running_var"], 1))
    c = 1 if len(ctx.shape(x)) > 1 else 0
    ctx.set(out, ctx.dims(x))
    ctx.norm_input(x)
    _affine(ctx, out, [c], [w, b], [rm, rv])


def h_layer_norm(ctx: Ctx, op: Op) -> None:
    """LayerNorm/RMSNorm over the last dims: the input is normalized; the affine weight
    starts a new scaled region."""
    x, out = op.args[0], op.outs[0]
    shape = op.arg(1, "normalized_shape")
    k = 1 if isinstance(shape, int) else len(shape)
    w = op.arg(2, "weight")
    b = op.arg(3, "bias") if op.name == "layer_norm" else None
    nd = len(ctx.shape(x))
    ctx.set(out, ctx.dims(x))
    ctx.norm_input(x)
    _affine(ctx, out, list(range(nd - k, nd)), [w, b])


def h_group_norm(ctx: Ctx, op: Op) -> None:
    """GroupNorm: channels permute within a group and whole groups move (a nested group),
    except for one group or one channel per group, where any permutation is fine."""
    x, out = op.args[0], op.outs[0]
    G, w, b = op.arg(1, "num_groups"), op.arg(2, "weight"), op.arg(3, "bias")
    C = ctx.shape(x)[1]
    if G not in (1, C):
        atom = ctx.dims(x)[1]
        origin = ctx.f.origin[ctx.f.find(atom)]
        _prod_parts(ctx, atom, (G, C // G), [f"{origin}.groups", f"{origin}.channels"])
    ctx.set(out, ctx.dims(x))
    ctx.norm_input(x)
    _affine(ctx, out, [1], [w, b])


def h_channel_fixing_norm(ctx: Ctx, op: Op) -> None:
    """Norms that mix neighbouring channels (local response norm): channels are fixed."""
    x = op.args[0]
    ctx.fix(x, [1])
    ctx.norm_input(x)
    ctx.set(op.outs[0], ctx.dims(x))


def h_weight_norm(ctx: Ctx, op: Op) -> None:
    """``_weight_norm(v, g, dim)`` (``nn.utils.parametrizations.weight_norm``): ``w = g v / |v|``
    with the norm over every dim but ``dim``. ``g`` scales the rows of ``w`` (``v``'s rows are
    normalized away: passive); the other dims go through the norm (no sign or scale)."""
    v, g, out = op.args[0], op.arg(1, "g"), op.outs[0]
    nd = len(ctx.shape(v))
    dim = op.arg(2, "dim", 0)
    if dim == -1 or nd == 0:
        ctx.same(out, v, NONE)
        ctx.fix(g)
        return
    dim %= nd
    ctx.set(out, ctx.dims(v))
    for d in range(nd):
        if d == dim:
            ctx.eq_dims(g, d, out, d)
        else:
            ctx.eq((out, d, ()), (v.node, d, ()))
            ctx.fix(g, [d])
    ctx.kind(out, NONE, [d for d in range(nd) if d != dim])


def h_embedding(ctx: Ctx, op: Op) -> None:
    """``embedding(idx, W)``: the output's last dim is ``W``'s columns; token rows are fixed."""
    if op.func is F.embedding:
        idx, w = op.args[0], op.arg(1, "weight")
        max_norm = op.arg(3, "max_norm")
    else:  # torch.embedding(weight, input, ...)
        w, idx = op.args[0], op.arg(1, "input")
        max_norm = None
    out = op.outs[0]
    ctx.fix(idx)
    ctx.fix(w, [0])
    ctx.set(out, [ctx.fixed(s) for s in ctx.shape(idx)] + [ctx.dims(w)[1]])
    ctx.eq((out, len(ctx.shape(out)) - 1, ()), (w.node, 1, ()))
    if max_norm is not None:
        ctx.kind(out, NONE)


def h_pool(ctx: Ctx, op: Op) -> None:
    """Pooling and resampling over the trailing spatial dims: channels pass through."""
    x = op.args[0]
    name = op.name
    if name in ("interpolate", "upsample", "upsample_nearest", "upsample_bilinear"):
        nsp = len(ctx.shape(x)) - 2
    else:
        nsp = int(next(c for c in name if c.isdigit()))
    nd = len(ctx.shape(x))
    ctx.fix(x, range(nd - nsp, nd))
    kind = SCALE if ("max" in name or "lp" in name) else BOTH
    for i, n in enumerate(op.outs):
        ctx.set(n, [ctx.dims(x)[d] for d in range(nd - nsp)] + [ctx.fixed(s) for s in ctx.shape(n)[nd - nsp :]])
        if i == 0:
            for d in range(nd - nsp):
                ctx.eq((n, d, ()), (x.node, d, ()))
        ctx.kind(n, kind if i == 0 else NONE)


def h_pad(ctx: Ctx, op: Op) -> None:
    x, pad = op.args[0], op.arg(1, "pad")
    mode, value = op.arg(2, "mode", "constant"), op.arg(3, "value", None)
    nd = len(ctx.shape(x))
    ctx.fix(x, range(nd - len(pad) // 2, nd))
    kind = NONE if mode == "constant" and value not in (None, 0, 0.0) else BOTH
    out = op.outs[0]
    ctx.set(out, [a if ctx.shape(out)[d] == ctx.shape(x)[d] else ctx.fixed(ctx.shape(out)[d])
                  for d, a in enumerate(ctx.dims(x))])  # fmt: skip
    for d in range(nd):
        ctx.eq((out, d, ()), (x.node, d, ()))
    ctx.kind(out, kind)


HANDLERS: dict[str, Handler] = {
    **dict.fromkeys(["matmul", "mm", "bmm", "mv", "dot", "vdot", "inner", "addmm", "baddbmm", "addmv"], h_matmul),
    **dict.fromkeys(["outer", "ger"], h_outer),
    "linear": h_linear,
    "einsum": h_einsum,
    **dict.fromkeys(["conv1d", "conv2d", "conv3d", "conv_transpose1d", "conv_transpose2d", "conv_transpose3d"], h_conv),
    **dict.fromkeys(["batch_norm", "instance_norm"], h_batch_norm),
    **dict.fromkeys(["layer_norm", "rms_norm"], h_layer_norm),
    "group_norm": h_group_norm,
    "local_response_norm": h_channel_fixing_norm,
    "embedding": h_embedding,
    "weight_norm": h_weight_norm,
    **dict.fromkeys(
        [f"{p}_pool{k}d" for p in ("max", "avg", "adaptive_max", "adaptive_avg", "lp") for k in (1, 2, 3)], h_pool
    ),
    **dict.fromkeys([f"max_pool{k}d_with_indices" for k in (1, 2, 3)], h_pool),
    **dict.fromkeys(["interpolate", "upsample", "upsample_nearest", "upsample_bilinear"], h_pool),
    "pad": h_pad,
}
