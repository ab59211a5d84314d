"""Handlers of attention: ``nn.MultiheadAttention`` (recorded as one operation) and
``scaled_dot_product_attention``.

Heads move as blocks of ``head_dim`` entries; within each head the q and k dims share one
permutation (a nested group: ``q_j . k_j`` is summed over ``j``, so permuting and negating q
and k alike keeps the scores), the v dims another (carried linearly to the output
projection's columns). The softmax over keys leaves the heads no sign or scale.
"""

from __future__ import annotations

from ._graph import NONE, Ctx, Handler
from ._layers import batch_dims
from ._trace import Op, Ref
from .spec import SpecError

__all__ = ["HANDLERS"]


def h_sdpa(ctx: Ctx, op: Op) -> None:
    """``softmax(q k^T * scale + mask) v``: q and k dims contracted, heads (batch dims) shared
    by q, k and v (through a softmax: no sign or scale), v dims carried to the output."""
    q, k, v = op.args[0], op.arg(1, "key"), op.arg(2, "value")
    if op.kwargs.get("enable_gqa"):
        raise SpecError(f"cannot read {op.describe()}: grouped-query attention (enable_gqa=True) is not supported")
    mask = op.arg(3, "attn_mask")
    out = op.outs[0]
    nq, nk, nv, no = (len(ctx.shape(r)) for r in (q, k, v, out))
    ctx.contract(q, nq - 1, k, nk - 1)
    ctx.tie(ctx.dims(k)[nk - 2], ctx.dims(v)[nv - 2])
    ctx.kind(k, NONE, [nk - 2])
    ctx.kind(v, NONE, [nv - 2])
    bo = list(range(no - 2))
    batch = batch_dims(ctx, out, bo, [(q, list(range(nq - 2))), (k, list(range(nk - 2))), (v, list(range(nv - 2)))])
    ctx.set(out, [*batch, ctx.dims(q)[nq - 2], ctx.dims(v)[nv - 1]])
    ctx.kind(out, NONE, bo)
    ctx.eq((out, no - 2, ()), (q.node, nq - 2, ()))
    ctx.kind(out, NONE, [no - 2])
    ctx.eq((out, no - 1, ()), (v.node, nv - 1, ()))
    if isinstance(mask, Ref):
        ctx.fix(mask)


def h_mha(ctx: Ctx, op: Op) -> None:
    """``nn.MultiheadAttention``: heads move as blocks of ``head_dim`` entries of the q, k and v
    slices of the in-projection and of the out-projection's columns; within each head the q and
    k dims share one permutation (nested group ``qk``), the v dims another (``v``, shared with
    the out-projection's columns). The inputs' channels are read by the in-projection's columns,
    the out-projection's rows write the output's."""
    m = op.module
    name = op.kwargs.get("__name__", "")
    P = op.kwargs["__params__"]
    if "bias_k" in P or getattr(m, "add_zero_attn", False):
        raise SpecError(f"cannot read {op.describe()}: add_bias_kv/add_zero_attn are not supported")
    q, k, v = op.args[0], op.arg(1, "key"), op.arg(2, "value")
    E, H = m.embed_dim, m.num_heads
    d = E // H
    f = ctx.f
    pre = f"{name}." if name else ""
    heads, qk, vv = f.new(H, f"{pre}heads"), f.new(d, f"{pre}qk"), f.new(d, f"{pre}v")
    f.nested_in[qk] = f.nested_in[vv] = heads
    seg_qk, seg_v = f.new(E, state="prod", parts=(heads, qk)), f.new(E, state="prod", parts=(heads, vv))
    _in_projection(ctx, P, (q, k, v), (seg_qk, seg_v))
    wo = P["out_proj.weight"]
    ctx.tie(ctx.dims(wo)[1], seg_v)
    ctx.role(wo, 1, (), "outgoing")
    ctx.atom_kinds.append((heads, NONE))
    ctx.seen.extend([heads, qk, vv])
    _mha_outputs(ctx, op, q, k, wo, heads)


def _in_projection(ctx: Ctx, P: dict, xs: tuple, segs: tuple) -> None:
    """The q, k, v slices of the in-projection (fused or separate): rows in blocks per head
    (q and k sharing their nested dims), columns reading the inputs."""
    seg_qk, seg_v = segs
    q, k, v = xs
    qkv = ctx.f.new(3 * ctx.f.size[seg_qk], state="sum", parts=(seg_qk, seg_qk, seg_v))
    roles = ("incoming", "outgoing", "incoming")
    if "in_proj_weight" in P:
        w = P["in_proj_weight"]
        ctx.tie(ctx.dims(w)[0], qkv)
        for i, r in enumerate(roles):
            ctx.role(w, 0, (i,), r)
        for x in (q, k, v):
            ctx.contract(x, len(ctx.shape(x)) - 1, w, 1)
    else:
        keys = ("q_proj_weight", "k_proj_weight", "v_proj_weight")
        for x, key, seg, r in zip((q, k, v), keys, (seg_qk, seg_qk, seg_v), roles):
            w = P[key]
            ctx.tie(ctx.dims(w)[0], seg)
            ctx.role(w, 0, (), r)
            ctx.contract(x, len(ctx.shape(x)) - 1, w, 1)
    if "in_proj_bias" in P:
        ctx.tie(ctx.dims(P["in_proj_bias"])[0], qkv)
        for i, r in enumerate(roles):
            ctx.role(P["in_proj_bias"], 0, (i,), r)


def _mha_outputs(ctx: Ctx, op: Op, q: Ref, k: Ref, wo: Ref, heads: int) -> None:
    """The output (its channels written by the out-projection's rows) and the attention
    weights (heads as a dim when not averaged)."""
    P = op.kwargs["__params__"]
    out = op.outs[0]
    nq = len(ctx.shape(q))
    ctx.set(out, [ctx.dims(q)[j] for j in range(nq - 1)] + [ctx.dims(wo)[0]])
    for j in range(nq - 1):
        ctx.eq((out, j, ()), (q.node, j, ()))
        if ctx.shape(k)[j] == ctx.shape(q)[j]:
            ctx.tie(ctx.dims(q)[j], ctx.dims(k)[j])
    ctx.kind(out, NONE, range(nq - 1))
    ctx.eq((out, nq - 1, ()), (wo.node, 0, ()))
    if "out_proj.bias" in P:
        ctx.eq_dims(P["out_proj.bias"], 0, out, nq - 1)
    for n in op.outs[1:]:
        shp = ctx.shape(n)
        atoms = [ctx.fixed(s) for s in shp]
        if len(shp) == 4:
            atoms[1] = heads
        ctx.set(n, atoms)


HANDLERS: dict[str, Handler] = {
    "scaled_dot_product_attention": h_sdpa,
    "module:MultiheadAttention": h_mha,
}
