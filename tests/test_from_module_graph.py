"""``PermutationSpec.from_module`` on real architectures (issue 11, items 2 and 3).

For each architecture of ``tests/architectures.py``: the spec is built without hand work,
``log|G|`` equals a count written out here from the architecture's widths (conventions: a
group counts ``lgamma(n + 1)``, plus ``n log 2`` when it has sign flips; a nested group counts
once per slot of its parent; scaling symmetries add nothing to ``|G|``), and Hypothesis-drawn
group elements (and, for groups with a scaling symmetry, positive rescalings) leave the
eval-mode function unchanged in float32 and float64.
"""

from __future__ import annotations

import math
from functools import cache

import pyro.poutine as poutine
import pytest
import torch
from architectures import (
    AttentionTransformer,
    DenseNetTiny,
    DepthwiseNet,
    GroupedConvNet,
    GroupNormNet,
    NormMLP,
    ResidualPyroBNN,
    ResNet18,
    ResNet20,
    TutorialBNN,
    UNetTiny,
    ViT,
)
from hypothesis import given, settings
from pyro.nn import PyroModule
from strategies import dtypes, group_element, seeds
from torch import nn

import pyro_symmetry as ps

LOG2 = math.log(2.0)


def lg(n: int) -> float:
    return math.lgamma(n + 1)


def signed(n: int) -> float:
    return lg(n) + n * LOG2


def attention_block(E: int, H: int, M: int) -> float:
    """Heads (no sign: softmax), q/k dims and v dims per head (sign flips), MLP hidden (none)."""
    d = E // H
    return lg(H) + 2 * H * signed(d) + lg(M)


def image(c: int, s: int = 8):
    return lambda: torch.randn(2, c, s, s)


# name -> (module factory, hand count of log|G|, input factory)
CASES = {
    "resnet18": (lambda: ResNet18(width=4), 3 * (lg(4) + lg(8) + lg(16) + lg(32)), image(3)),
    "resnet20": (lambda: ResNet20(k=1, blocks=2), 3 * (lg(16) + lg(32) + lg(64)), image(3)),
    "vit": (lambda: ViT(dim=12, depth=2, heads=3, mlp=24), lg(12) + 2 * attention_block(12, 3, 24), image(3)),
    "transformer": (
        lambda: AttentionTransformer(dim=12, heads=3, mlp=20, depth=2),
        lg(12) + 2 * attention_block(12, 3, 20),
        lambda: torch.randint(0, 11, (2, 5)),
    ),
    "transformer_fused_qkv": (
        lambda: AttentionTransformer(dim=8, heads=2, mlp=6, depth=1, fused=True),
        lg(8) + attention_block(8, 2, 6),
        lambda: torch.randint(0, 11, (2, 5)),
    ),
    "transformer_sdpa": (
        lambda: AttentionTransformer(dim=8, heads=4, mlp=5, depth=1, sdpa=True),
        lg(8) + attention_block(8, 4, 5),
        lambda: torch.randint(0, 11, (2, 5)),
    ),
    "layernorm_mlp": (lambda: NormMLP(norm="layer"), lg(5) + lg(4), lambda: torch.randn(4, 3)),
    "layernorm_tanh_mlp": (
        lambda: NormMLP(norm="layer", act=nn.Tanh),
        signed(5) + signed(4),
        lambda: torch.randn(4, 3),
    ),
    "rmsnorm_mlp": (lambda: NormMLP(norm="rms"), lg(5) + lg(4), lambda: torch.randn(4, 3)),
    "batchnorm_mlp": (lambda: NormMLP(norm="batch", act=nn.Tanh), signed(5) + signed(4), lambda: torch.randn(4, 3)),
    "gelu_mlp": (lambda: NormMLP(norm="none", act=nn.GELU), lg(5) + lg(4), lambda: torch.randn(4, 3)),
    "silu_mlp": (lambda: NormMLP(sizes=(3, 6, 2), norm="none", act=nn.SiLU), lg(6), lambda: torch.randn(4, 3)),
    "groupnorm_2_of_6_and_1": (lambda: GroupNormNet((6, 4), (2, 1)), lg(2) + 2 * lg(3) + lg(4), image(2)),
    "groupnorm_tanh_3_of_6_and_4_of_4": (
        lambda: GroupNormNet((6, 4), (3, 4), act=nn.Tanh),
        lg(3) + 3 * signed(2) + signed(4),
        image(2),
    ),
    "depthwise": (lambda: DepthwiseNet(4, 1, 5), lg(4) + lg(5), image(2)),
    "depthwise_tanh": (lambda: DepthwiseNet(4, 1, 5, act=nn.Tanh), signed(4) + signed(5), image(2)),
    "depthwise_multiplier_2": (lambda: DepthwiseNet(3, 2, 4, act=nn.Tanh), lg(3) + 3 * signed(2) + signed(4), image(2)),
    "grouped_conv": (lambda: GroupedConvNet(4, 6, 2, 3), lg(2) + 2 * lg(3) + lg(3), image(2)),
    "grouped_conv_tanh": (lambda: GroupedConvNet(6, 6, 3, 2, act=nn.Tanh), lg(3) + 3 * signed(2) + lg(2), image(2)),
    "densenet": (lambda: DenseNetTiny(4, 3, 2), lg(4) + 2 * lg(3), image(2)),
    "densenet_batchnorm": (lambda: DenseNetTiny(4, 3, 2, batchnorm=True), lg(4) + 2 * lg(3), image(2)),
    "unet_interpolate": (lambda: UNetTiny(3, 4, 3), lg(3) + lg(4) + lg(3), image(2)),
    "unet_transposed_conv": (lambda: UNetTiny(3, 4, 3, transposed=True), lg(3) + 2 * lg(4) + lg(3), image(2)),
    "tutorial_bnn": (lambda: TutorialBNN(1, 1, 5, 2), 2 * signed(5), lambda: torch.randn(6, 1)),
    "residual_pyro_bnn": (lambda: ResidualPyroBNN(3, 4, 6), signed(4) + signed(6), lambda: torch.randn(6, 3)),
}


@cache
def spec_of(name: str) -> ps.PermutationSpec:
    torch.manual_seed(0)
    return ps.PermutationSpec.from_module(CASES[name][0]())


def randomized(net: nn.Module, seed: int, dtype: torch.dtype) -> nn.Module:
    """Random parameters and buffers (positive running variances), eval mode, ``dtype``."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, t in list(net.named_parameters()) + list(net.named_buffers()):
            if t.is_floating_point():
                new = torch.randn(t.shape, generator=g) / math.sqrt(max(1, t[0].numel() if t.dim() > 1 else 4))
                t.copy_(new.abs() + 0.5 if name.endswith("running_var") else new)
    return net.to(dtype).eval()


def evaluate(net: nn.Module, state: dict, sites: dict, x: torch.Tensor) -> torch.Tensor:
    out = torch.func.functional_call if not sites else None
    with torch.no_grad():
        if out is not None:
            return out(net, state, (x,))
        net.load_state_dict(state, strict=False)
        return poutine.condition(net, data=sites)(x)


def prior_sites(net: nn.Module, x: torch.Tensor, seed: int, dtype: torch.dtype) -> dict:
    torch.manual_seed(seed)
    tr = poutine.trace(net).get_trace(x)
    return {k: s["value"].to(dtype) for k, s in tr.nodes.items() if s["type"] == "sample" and not s["is_observed"]}


@pytest.mark.parametrize("name", list(CASES))
def test_log_order_matches_the_hand_count(name):
    spec = spec_of(name)
    assert spec.log_order == pytest.approx(CASES[name][1], rel=1e-12, abs=1e-9), spec


@pytest.mark.parametrize("name", list(CASES))
@settings(max_examples=6)
@given(seed=seeds, dtype=dtypes)
def test_drawn_elements_keep_the_function(name, seed, dtype):
    make, _, inputs = CASES[name]
    spec = spec_of(name)
    torch.manual_seed(seed % 1000)
    default = torch.get_default_dtype()
    torch.set_default_dtype(dtype)  # Pyro priors are built in the default dtype
    try:
        _check_drawn_element(make, inputs, spec, seed, dtype)
    finally:
        torch.set_default_dtype(default)


def _check_drawn_element(make, inputs, spec, seed, dtype):
    net = randomized(make(), seed, dtype)
    x = inputs()
    x = x.to(dtype) if x.is_floating_point() else x
    sites = prior_sites(net, x, seed, dtype) if isinstance(net, PyroModule) else {}
    state = {**dict(net.state_dict()), **{k: v for k, v in sites.items() if k in spec.sites}}
    g = group_element(spec, seed)
    moved = spec.apply(state, g)
    scales = {k: torch.rand(grp.size, generator=torch.Generator().manual_seed(seed)) * 2 - 1
              for k, grp in spec.groups.items() if grp.scalable}  # fmt: skip
    if scales:
        moved = spec.rescale(moved, scales)
    state_keys = set(net.state_dict())
    y0 = evaluate(net, {k: state[k] for k in state_keys}, sites, x)
    y1 = evaluate(net, {k: moved[k] for k in state_keys}, {**sites, **{k: moved[k] for k in sites if k in moved}}, x)
    tol = 2e-4 if dtype == torch.float32 else 1e-10
    torch.testing.assert_close(y1, y0, atol=tol * (1 + float(y0.abs().max())), rtol=tol)
    if any(not torch.equal(p, torch.arange(p.shape[-1]).expand_as(p)) for p in g.values()):
        assert any(not torch.equal(state[k], moved[k]) for k in spec.sites)
