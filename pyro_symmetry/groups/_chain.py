"""The execution order of a module, as the chain of steps that ``spec_from_module`` reads.

A step is ``(name, module)`` for a submodule call, or ``(name, kind)`` for a functional
operation, ``kind`` being the set of activation symmetries (``"sign"``, ``"scale"``) that
survive it. The order comes from a ``torch.fx`` trace when the module can be traced
(functional activations such as ``torch.tanh`` are then seen, and a residual connection
is refused rather than read as a chain); otherwise from the registration order of the
leaf modules, which is the execution order only for ``nn.Sequential`` containers.
"""

from __future__ import annotations

import math
import operator
from typing import Any

import torch
import torch.nn.functional as F
from torch import fx, nn

from .spec import SpecError

__all__ = ["BOTH", "LAYERS", "NONE", "NORMS", "POINTWISE", "Step", "execution_steps", "pointwise_kind"]

BOTH = frozenset({"sign", "scale"})
SCALE = frozenset({"scale"})
SIGN = frozenset({"sign"})
NONE: frozenset = frozenset()

# Effect of each pointwise module on the extra activation symmetries that survive
# between two layers: the intersection over the chain decides the group's symmetry.
POINTWISE: dict[type, frozenset] = {
    nn.Identity: BOTH,
    nn.Flatten: BOTH,
    nn.Dropout: BOTH,
    nn.Dropout1d: BOTH,
    nn.Dropout2d: BOTH,
    nn.AvgPool1d: BOTH,
    nn.AvgPool2d: BOTH,
    nn.AdaptiveAvgPool1d: BOTH,
    nn.AdaptiveAvgPool2d: BOTH,
    nn.ReLU: SCALE,
    nn.LeakyReLU: SCALE,
    nn.MaxPool1d: SCALE,
    nn.MaxPool2d: SCALE,
    nn.AdaptiveMaxPool1d: SCALE,
    nn.AdaptiveMaxPool2d: SCALE,
    nn.Tanh: SIGN,
    nn.Softsign: SIGN,
    nn.Tanhshrink: SIGN,
    nn.Hardtanh: SIGN,  # only when symmetric, see pointwise_kind
    nn.ReLU6: NONE,
    nn.ELU: NONE,
    nn.SELU: NONE,
    nn.CELU: NONE,
    nn.GELU: NONE,
    nn.SiLU: NONE,
    nn.Mish: NONE,
    nn.Sigmoid: NONE,
    nn.Softplus: NONE,
    nn.Hardswish: NONE,
    nn.Hardsigmoid: NONE,
    nn.LogSigmoid: NONE,
    nn.Softmax: NONE,
    nn.LogSoftmax: NONE,
}
NORMS = (nn.BatchNorm1d, nn.BatchNorm2d, nn.LayerNorm, nn.GroupNorm)
LAYERS = (nn.Linear, nn.Conv1d, nn.Conv2d)

# Functional forms (torch functions, ``F`` functions and tensor methods by name).
_FUNCTIONS: dict[Any, frozenset] = {
    **dict.fromkeys([torch.relu, F.relu, F.leaky_relu, F.max_pool1d, F.max_pool2d], SCALE),
    **dict.fromkeys([F.adaptive_max_pool1d, F.adaptive_max_pool2d], SCALE),
    **dict.fromkeys([torch.tanh, F.tanh, torch.sin, torch.erf, torch.special.erf, F.softsign, F.tanhshrink], SIGN),
    **dict.fromkeys([torch.sinh, torch.arcsinh, torch.arctan, torch.atan, torch.asinh], SIGN),
    **dict.fromkeys([torch.flatten, F.dropout, F.dropout1d, F.dropout2d, F.avg_pool1d, F.avg_pool2d], BOTH),
    **dict.fromkeys([F.adaptive_avg_pool1d, F.adaptive_avg_pool2d, operator.neg, torch.neg], BOTH),
    **dict.fromkeys([torch.sigmoid, F.sigmoid, F.gelu, F.silu, F.elu, F.selu, F.celu, F.softplus, F.mish], NONE),
    **dict.fromkeys([F.relu6, F.hardswish, F.hardsigmoid, F.logsigmoid, torch.exp, torch.cos, torch.square], NONE),
    **dict.fromkeys([torch.softmax, F.softmax, F.log_softmax, torch.log_softmax], NONE),
}
_METHODS: dict[str, frozenset] = {
    **dict.fromkeys(["relu", "relu_"], SCALE),
    **dict.fromkeys(["tanh", "tanh_", "sin", "erf"], SIGN),
    **dict.fromkeys(["neg", "flatten", "view", "reshape", "contiguous", "clone", "squeeze", "unsqueeze"], BOTH),
    **dict.fromkeys(["sigmoid", "exp", "softmax", "log_softmax", "cos"], NONE),
}
# Metadata queries: they read a chain tensor without continuing the chain.
_META_METHODS = {"size", "dim", "numel", "ndimension"}
_SCALAR_OPS = {operator.mul: BOTH, operator.truediv: BOTH, operator.add: NONE, operator.sub: NONE}
_TORCH_ARITH = {torch.mul: operator.mul, torch.div: operator.truediv, torch.add: operator.add, torch.sub: operator.sub}

Step = tuple[str, Any]  # (name, nn.Module) or (name, frozenset of surviving symmetries)


def pointwise_kind(m: nn.Module) -> frozenset | None:
    """The symmetries a pointwise module keeps, or None if it is not a known one."""
    if isinstance(m, nn.Hardtanh):  # also covers ReLU6's parent class
        return SIGN if (m.min_val == -m.max_val and not isinstance(m, nn.ReLU6)) else NONE
    for cls, kind in POINTWISE.items():
        if isinstance(m, cls):
            return kind
    return None


class _Tracer(fx.Tracer):
    """Keep every layer, norm and known activation whole (``PyroModule`` layers included)."""

    def is_leaf_module(self, m: nn.Module, qualname: str) -> bool:
        return isinstance(m, LAYERS + NORMS) or pointwise_kind(m) is not None or super().is_leaf_module(m, qualname)


def _is_chain_value(a: Any) -> bool:
    return isinstance(a, fx.Node)


def _fx_steps(module: nn.Module) -> list[Step] | None:
    try:
        # A forward that samples (a PyroModule reading its priors) must not move the user's RNG.
        with torch.random.fork_rng(devices=[]):
            graph = _Tracer().trace(module)
    except Exception:  # noqa: BLE001 - untraceable code (Pyro statements, data-dependent control flow)
        return None
    steps: list[Step] = []
    chain: set[fx.Node] = set()  # tensors on the chain
    last: fx.Node | None = None  # the chain's current end
    called: set[str] = set()
    for node in graph.nodes:
        if node.op == "placeholder":
            if last is None:
                last = node
                chain.add(node)
            continue
        if node.op == "output":
            break
        inputs = [a for a in node.all_input_nodes if a in chain]
        if node.op == "call_method" and node.target in _META_METHODS:
            continue
        if node.op == "call_function" and node.target is getattr and len(node.args) > 1:
            if node.args[1] in ("shape", "dtype", "device", "ndim"):
                continue
        if node.op == "get_attr":
            raise SpecError(
                f"{type(module).__name__}.forward uses the tensor {node.target!r} directly; spec_from_module reads "
                "chains of Linear/Conv modules only: build the PermutationSpec by hand with NeuronGroup(...)"
            )
        if not inputs:
            continue  # constants, shape arithmetic
        if len(inputs) > 1 or inputs[0] is not last:
            raise SpecError(
                f"{type(module).__name__} is not a chain of layers: {node.op} {_describe(node)!r} combines "
                f"{[str(n) for n in inputs]} (a residual or skip connection?). Build per-layer groups by hand and "
                "tie the groups of one residual stream with PermutationSpec.tie"
            )
        if node.op == "call_module":
            sub = module.get_submodule(node.target)
            has_params = any(True for _ in sub.parameters()) or bool(getattr(sub, "_pyro_samples", None))
            if node.target in called and has_params:
                raise SpecError(
                    f"module {node.target!r} is called twice in {type(module).__name__}.forward (shared weights): "
                    "build the PermutationSpec by hand"
                )
            called.add(node.target)
            steps.append((node.target, sub))
        else:
            steps.append((_describe(node), _function_kind(node)))
        last = node
        chain.add(node)
    return steps


def _describe(node: fx.Node) -> str:
    t = node.target
    return t if isinstance(t, str) else getattr(t, "__name__", str(t))


def _function_kind(node: fx.Node) -> frozenset:
    t = node.target
    if node.op == "call_method" and t in _METHODS:
        return _METHODS[t]
    if node.op == "call_function":
        if t in _FUNCTIONS:
            return _FUNCTIONS[t]
        op = _TORCH_ARITH.get(t, t)
        if op in _SCALAR_OPS and len(node.args) == 2 and not node.kwargs:
            a, b = node.args
            # x * c, c * x and x / c scale every neuron alike (both symmetries survive);
            # x + c, x - c, c + x only keep permutations. c / x is not a scalar op here.
            scalar = b if isinstance(a, fx.Node) else a
            chain_first = isinstance(a, fx.Node)
            if (
                isinstance(scalar, (int, float))
                and math.isfinite(scalar)
                and (chain_first or op is not operator.truediv)
            ):
                return _SCALAR_OPS[op]
    raise SpecError(
        f"cannot infer the symmetry of the operation {_describe(node)!r} ({node.op}); build the PermutationSpec by "
        "hand with NeuronGroup(...), or use a supported activation module"
    )


def _all_sequential(module: nn.Module) -> bool:
    return all(isinstance(m, nn.Sequential) for m in module.modules() if list(m.children()))


def execution_steps(module: nn.Module) -> tuple[list[Step], bool]:
    """``(steps, exact)``: the chain in execution order, and whether that order is known.

    ``exact`` is False when the module could not be traced and is not made of
    ``nn.Sequential`` containers: its leaves are then read in registration order, and
    a gap between two layers with no activation module in it may hide a functional one.
    """
    steps = _fx_steps(module)
    if steps is not None:
        return steps, True
    leaves = [(n, m) for n, m in module.named_modules() if not list(m.children())]
    return leaves, _all_sequential(module)
