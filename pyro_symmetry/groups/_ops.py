"""Handlers of entrywise, reduction and elementwise-arithmetic operations.

Each handler labels its outputs and records links (see :mod:`._graph`). The symmetry an
entrywise function keeps is ``f(s x) = s f(x)``: both for linear ops, ``"scale"`` for
positively homogeneous ones (ReLU, max), ``"sign"`` for odd ones (tanh, sin, erf).
"""

from __future__ import annotations

from typing import Any

from ._graph import BOTH, NONE, SCALE, SIGN, Ctx, Handler
from ._trace import Op, Ref

__all__ = ["HANDLERS"]

UNARY: dict[str, frozenset] = {
    **dict.fromkeys(
        ["neg", "positive", "clone", "contiguous", "detach", "to", "type", "type_as", "float", "double", "half"], BOTH
    ),
    **dict.fromkeys(["bfloat16", "cpu", "cuda", "requires_grad", "identity", "resolve_conj", "resolve_neg"], BOTH),
    **dict.fromkeys(["dropout", "alpha_dropout", "feature_alpha_dropout", "dropout1d", "dropout2d", "dropout3d"], BOTH),
    **dict.fromkeys(["relu", "leaky_relu", "rrelu", "abs", "absolute"], SCALE),
    **dict.fromkeys(["tanh", "sin", "erf", "special_erf", "asinh", "arcsinh", "sinh", "atan", "arctan"], SIGN),
    **dict.fromkeys(["softsign", "tanhshrink", "sign", "sgn", "hardshrink", "softshrink", "erfinv", "atanh"], SIGN),
    **dict.fromkeys(["asin", "arcsin", "tan", "trunc", "fix", "reciprocal"], SIGN),
    **dict.fromkeys(["sigmoid", "gelu", "silu", "elu", "selu", "celu", "mish", "softplus", "hardsigmoid"], NONE),
    **dict.fromkeys(["hardswish", "logsigmoid", "relu6", "exp", "exp2", "expm1", "log", "log1p", "log2"], NONE),
    **dict.fromkeys(["log10", "sqrt", "rsqrt", "square", "cos", "cosh", "floor", "ceil", "frac", "erfc"], NONE),
    **dict.fromkeys(["lgamma", "digamma", "logit", "nan_to_num", "softmax", "log_softmax", "softmin", "round"], NONE),
    **dict.fromkeys(["normalize", "special_expit", "expit", "sinc"], NONE),
}
COMPARE = {"gt", "lt", "ge", "le", "eq", "ne", "greater", "less", "isnan", "isinf", "isfinite", "logical_not"}
COMPARE |= {"logical_and", "logical_or", "logical_xor", "bitwise_not", "and", "or", "xor", "isclose", "signbit"}
COMPARE |= {"invert", "bitwise_and", "bitwise_or", "bitwise_xor", "isneginf", "isposinf", "isreal"}
# Reductions: the symmetry kept by the non-reduced dims (the reduced dims keep none).
REDUCE: dict[str, frozenset] = {
    **dict.fromkeys(["sum", "mean", "nansum", "nanmean"], BOTH),
    **dict.fromkeys(["amax", "amin", "max", "min", "median", "nanmedian", "std", "norm", "vector_norm"], SCALE),
    **dict.fromkeys(["logsumexp", "var", "prod", "all", "any", "count_nonzero", "argmax", "argmin", "aminmax"], NONE),
    **dict.fromkeys(["var_mean", "std_mean", "mode", "is_all_true", "is_any_true"], NONE),
}
SCANS = {"cumsum", "cumprod", "cummax", "cummin", "logcumsumexp", "sort", "argsort", "topk", "msort"}


def _unary(kind: frozenset) -> Handler:
    def handler(ctx: Ctx, op: Op) -> None:
        ctx.same(op.outs[0], op.args[0], kind)

    return handler


def _activation_kind(op: Op) -> frozenset:
    """Kinds of activations whose symmetry depends on their arguments."""
    n = op.name
    if n == "hardtanh":
        lo, hi = op.arg(1, "min_val", -1.0), op.arg(2, "max_val", 1.0)
        return SIGN if lo == -hi else NONE
    if n in ("clamp", "clip"):
        lo, hi = op.arg(1, "min"), op.arg(2, "max")
        if isinstance(lo, Ref) or isinstance(hi, Ref):
            return NONE
        if lo == 0 and hi is None:
            return SCALE
        return SIGN if lo is not None and hi is not None and lo == -hi else NONE
    if n in ("clamp_min",):
        return SCALE if op.arg(1, "min") == 0 else NONE
    if n == "threshold":
        return SCALE if op.arg(1, "threshold") == 0 and op.arg(2, "value") == 0 else NONE
    if n in ("pow", "float_power"):
        p = op.arg(1, "exponent")
        if isinstance(p, (int, float)) and not isinstance(p, bool):
            if p == 1:
                return BOTH
            if float(p).is_integer() and int(p) % 2 == 1:
                return SIGN
        return NONE
    return NONE


def h_param_activation(ctx: Ctx, op: Op) -> None:
    x = op.args[0]
    if op.name in ("pow", "float_power") and not isinstance(x, Ref):
        _arith_fallback(ctx, op)
        return
    if isinstance(op.arg(1, "exponent"), Ref) and op.name in ("pow", "float_power"):
        _arith_fallback(ctx, op)
        return
    ctx.same(op.outs[0], x, _activation_kind(op))


def h_prelu(ctx: Ctx, op: Op) -> None:
    x, w = op.args[0], op.arg(1, "weight")
    ctx.same(op.outs[0], x, SCALE)
    if isinstance(w, Ref) and ctx.shape(w) and ctx.shape(w)[0] > 1:
        ctx.tie(ctx.dims(w)[0], ctx.dims(x)[1 if len(ctx.shape(x)) > 1 else 0])
        ctx.neutral(w, 0)
    elif isinstance(w, Ref) and len(ctx.shape(x)) > 1:
        ctx.kind(op.outs[0], NONE)  # one slope for every channel would be fine, but keep it simple


def h_glu(ctx: Ctx, op: Op) -> None:
    """``glu(x, dim) = a * sigmoid(b)``, ``a, b`` the two halves: the halves share a permutation."""
    x = op.args[0]
    dim = op.arg(1, "dim", -1) % len(ctx.shape(x))
    n = ctx.shape(x)[dim]
    a, pa = ctx.f.segment(ctx.dims(x)[dim], 0, n // 2)[0]
    b, pb = ctx.f.segment(ctx.dims(x)[dim], n // 2, n)[0]
    if pb is not None:
        ctx.kinds.append(((x.node, dim, pb), NONE))  # the gate goes through a sigmoid
    ctx.tie(a, b)
    atoms = list(ctx.dims(x))
    atoms[dim] = a
    ctx.set(op.outs[0], atoms)
    for d in range(len(atoms)):
        if d != dim:
            ctx.eq((op.outs[0], d, ()), (x.node, d, ()))
    if pa is not None:
        ctx.eq((op.outs[0], dim, ()), (x.node, dim, pa))
    ctx.kind(op.outs[0], NONE)


def _is_zero(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and v == 0


def h_add(ctx: Ctx, op: Op) -> None:
    """``a + b`` / ``a - b`` (``alpha`` scales ``b``): every tensor operand is linked to the
    output; a constant or a broadcast operand added to a channel breaks its sign and scale."""
    a, b = op.args[0], op.arg(1, "other")
    out = op.outs[0]
    missing = ctx.broadcast(out, [a, b], ["eq", "eq"])
    for d, absent in enumerate(missing):
        for i in absent:
            x = (a, b)[i]
            uniform_zero = isinstance(x, Ref) and ctx.node(x).zero
            if not (_is_zero(x) or uniform_zero or x is None):
                ctx.kind(out, NONE, [d])


def h_mul(ctx: Ctx, op: Op) -> None:
    """``a * b``: a value times a parameter keeps the value's scale (the parameter is only
    permuted); a value times a value breaks sign and scale where both carry the channel."""
    a, b = op.args[0], op.arg(1, "other")
    refs = [x for x in (a, b) if isinstance(x, Ref)]
    values = [x for x in refs if ctx.node(x).is_value]
    if len(values) == 2:
        ctx.broadcast(op.outs[0], [a, b], ["eq", "eq"], NONE)
        return
    modes = []
    linked = False
    for x in (a, b):
        if not isinstance(x, Ref):
            modes.append("none")
        elif ctx.node(x).is_value or (not values and not linked):
            modes.append("eq")
            linked = True
        else:
            modes.append("neutral")
    kind = BOTH
    for x in (a, b):
        if not isinstance(x, Ref) and not isinstance(x, (int, float)):
            kind = NONE
    ctx.broadcast(op.outs[0], [a, b], modes, kind)


def h_div(ctx: Ctx, op: Op) -> None:
    a, b = op.args[0], op.arg(1, "other")
    mode = op.kwargs.get("rounding_mode")
    if not isinstance(a, Ref):
        ctx.broadcast(op.outs[0], [a, b], ["none", "eq"], NONE)
        return
    if isinstance(b, Ref) and ctx.node(b).is_value:
        ctx.broadcast(op.outs[0], [a, b], ["eq", "eq"], NONE)
        return
    kind = BOTH if mode is None and (isinstance(b, Ref) or isinstance(b, (int, float))) else NONE
    ctx.broadcast(op.outs[0], [a, b], ["eq", "neutral"], kind)


def _arith_fallback(ctx: Ctx, op: Op) -> None:
    """Entrywise op of tensors (and numbers) with no special structure: permutation
    equivariant, no sign or scale symmetry."""
    operands = [x for x in op.args if isinstance(x, Ref) or isinstance(x, (int, float))]
    ctx.broadcast(op.outs[0], operands, ["eq"] * len(operands), NONE)


def h_binary_scale(ctx: Ctx, op: Op) -> None:
    """``maximum(a, b)``: positively homogeneous in both."""
    a, b = op.args[0], op.arg(1, "other")
    ctx.broadcast(op.outs[0], [a, b], ["eq", "eq"], SCALE if isinstance(b, Ref) else NONE)


def h_compare(ctx: Ctx, op: Op) -> None:
    """A boolean mask: permuted with its inputs, never scaled; the inputs lose sign and scale."""
    operands = [x for x in op.args[:2] if isinstance(x, Ref) or isinstance(x, (int, float))]
    ctx.broadcast(op.outs[0], operands, ["none"] * len(operands), NONE)
    for x in operands:
        if isinstance(x, Ref):
            ctx.kind(x, NONE)


def h_where(ctx: Ctx, op: Op) -> None:
    c, a, b = op.args[0], op.arg(1, "input"), op.arg(2, "other")
    kind = BOTH if all(isinstance(x, Ref) or _is_zero(x) for x in (a, b)) else NONE
    ctx.broadcast(op.outs[0], [c, a, b], ["none", "eq", "eq"], kind)


def h_masked_fill(ctx: Ctx, op: Op) -> None:
    x, mask, value = op.args[0], op.arg(1, "mask"), op.arg(2, "value")
    kind = BOTH if _is_zero(value) else NONE
    ctx.broadcast(op.outs[0], [x, mask], ["eq", "none"], kind)


def h_fill(ctx: Ctx, op: Op) -> None:
    """``x.zero_()``, ``x.fill_(v)``: the values are replaced by a constant."""
    ctx.set(op.outs[0], ctx.dims(op.args[0]))


def h_copy(ctx: Ctx, op: Op) -> None:
    dst, src = op.args[0], op.arg(1, "src")
    ctx.broadcast(op.outs[0], [dst, src], ["none", "eq"])


def h_factory(ctx: Ctx, op: Op) -> None:
    """Constants: uniform ones (zeros, ones, full) have free atoms, others fixed ones."""
    for n in op.outs:
        node = ctx.node(n)
        if node.kind == "uniform":
            ctx.set(n, [ctx.f.new(s) for s in node.shape])
        else:
            ctx.set(n, [ctx.fixed(s) for s in node.shape])


def h_as_tensor(ctx: Ctx, op: Op) -> None:
    if isinstance(op.args[0], Ref) and ctx.shape(op.args[0]) == ctx.shape(op.outs[0]):
        ctx.same(op.outs[0], op.args[0])
    else:
        h_factory(ctx, op)


def _dims_arg(v: Any, nd: int) -> list[int] | None:
    """Reduction dims as non-negative ints (None: all dims)."""
    if v is None or isinstance(v, bool) or (isinstance(v, (tuple, list)) and len(v) == 0):
        return None
    if isinstance(v, int):
        return [v % max(nd, 1)]
    if isinstance(v, (tuple, list)) and all(isinstance(d, int) for d in v):
        return [d % max(nd, 1) for d in v]
    return None


def h_reduce(ctx: Ctx, op: Op) -> None:
    """Reduce over some dims: the reduced atoms lose sign and scale, the others keep what the
    reduction keeps (a mean is linear; a max is positively homogeneous)."""
    x = op.args[0]
    nd = len(ctx.shape(x))
    other = op.arg(1, "dim")
    if op.name in ("max", "min") and isinstance(other, Ref):
        h_binary_scale(ctx, op)
        return
    if op.name in ("norm",):
        other = op.arg(2, "dim")
    if op.name == "vector_norm":
        other = op.arg(2, "dim")
    dims = _dims_arg(other, nd)
    red = list(range(nd)) if dims is None else dims
    keep = [d for d in range(nd) if d not in red]
    ctx.kind(x, NONE, red)
    kind = REDUCE[op.name]
    for i, n in enumerate(op.outs):
        oshape = ctx.shape(n)
        keepdim = len(oshape) == nd and nd > 0
        atoms, pairs = [], []
        for d in range(nd):
            if d in keep:
                pairs.append((len(atoms), d))
                atoms.append(ctx.dims(x)[d])
            elif keepdim:
                atoms.append(ctx.fixed(1))
        if len(atoms) != len(oshape):
            atoms = [ctx.fixed(s) for s in oshape]
            ctx.fix(x)
            pairs = []
        ctx.set(n, atoms)
        values_out = i == 0 and op.name not in ("argmax", "argmin", "all", "any", "count_nonzero")
        for od, d in pairs:
            if values_out:
                ctx.eq((n, od, ()), (x.node, d, ()))
        ctx.kind(n, kind if values_out else NONE)


def h_scan(ctx: Ctx, op: Op) -> None:
    """Scans and sorts along a dim: fine along a fixed dim, fix a channel dim."""
    x = op.args[0]
    nd = len(ctx.shape(x))
    dim = op.arg(1, "dim", -1)
    if op.name == "topk":
        dim = op.arg(2, "dim", -1)
    dims = _dims_arg(dim, nd) or list(range(nd))
    ctx.fix(x, dims)
    for i, n in enumerate(op.outs):
        if ctx.shape(n) == ctx.shape(x):
            ctx.set(n, ctx.dims(x))
            if i == 0:
                for d in range(nd):
                    ctx.eq((n, d, ()), (x.node, d, ()))
            ctx.kind(n, NONE)
        else:
            ctx.fix(x)
            ctx.set(n, [ctx.fixed(s) for s in ctx.shape(n)])


def h_sink(ctx: Ctx, op: Op) -> None:
    """Losses and other reads of a whole tensor: every channel they see is fixed."""
    for r in op.args:
        if isinstance(r, Ref):
            ctx.fix(r)
    for n in op.outs:
        ctx.set(n, [ctx.fixed(s) for s in ctx.shape(n)])


def h_broadcast_tensors(ctx: Ctx, op: Op) -> None:
    from ._shape import expand_to

    ins = [x for x in op.args if isinstance(x, Ref)]
    for x, n in zip(ins, op.outs):
        expand_to(ctx, x, n)
    shapes = {ctx.shape(n) for n in op.outs}
    if len(shapes) == 1 and len(op.outs) > 1:
        first = op.outs[0]
        for n in op.outs[1:]:
            for d in range(len(ctx.shape(n))):
                ctx.tie(ctx.dims(first)[d], ctx.dims(n)[d])


HANDLERS: dict[str, Handler] = {
    **{k: _unary(v) for k, v in UNARY.items()},
    **dict.fromkeys(["hardtanh", "clamp", "clip", "clamp_min", "threshold", "pow", "float_power"], h_param_activation),
    "prelu": h_prelu,
    "glu": h_glu,
    **dict.fromkeys(["add", "sub", "subtract", "rsub"], h_add),
    **dict.fromkeys(["mul", "multiply"], h_mul),
    **dict.fromkeys(["truediv", "div", "divide", "true_divide"], h_div),
    **dict.fromkeys(["maximum", "minimum", "fmax", "fmin"], h_binary_scale),
    **dict.fromkeys(["floordiv", "floor_divide", "remainder", "fmod", "mod", "atan2", "hypot"], _arith_fallback),
    **dict.fromkeys(sorted(COMPARE), h_compare),
    "where": h_where,
    "masked_fill": h_masked_fill,
    **dict.fromkeys(["fill", "zero"], h_fill),
    "copy": h_copy,
    **dict.fromkeys(["zeros", "ones", "full", "empty", "arange", "linspace", "logspace", "randn", "rand"], h_factory),
    **dict.fromkeys(["randint", "randperm", "eye", "tensor", "scalar_tensor", "zeros_like", "ones_like"], h_factory),
    **dict.fromkeys(["full_like", "empty_like", "rand_like", "randn_like", "randint_like", "new_zeros"], h_factory),
    **dict.fromkeys(["new_ones", "new_full", "new_empty", "new_tensor", "normal", "empty_strided"], h_factory),
    "as_tensor": h_as_tensor,
    **dict.fromkeys(REDUCE, h_reduce),
    **dict.fromkeys(sorted(SCANS), h_scan),
    **dict.fromkeys(["cross_entropy", "nll_loss", "mse_loss", "l1_loss", "binary_cross_entropy"], h_sink),
    **dict.fromkeys(["binary_cross_entropy_with_logits", "kl_div", "smooth_l1_loss", "huber_loss"], h_sink),
    "broadcast_tensors": h_broadcast_tensors,
}
