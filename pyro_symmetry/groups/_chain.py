"""The activation symmetry of pointwise activation modules (used by the ready models).

``PermutationSpec.from_module`` reads the executed forward (:mod:`._trace`, :mod:`._graph`);
this table only answers "which symmetries does this activation module keep" for models that
build their spec by hand from their activation (:func:`pyro_symmetry.models.activation_symmetry`).
"""

from __future__ import annotations

from torch import nn

__all__ = ["BOTH", "NONE", "POINTWISE", "SCALE", "SIGN", "pointwise_kind"]

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


def pointwise_kind(m: nn.Module) -> frozenset | None:
    """The symmetries a pointwise module keeps, or None if it is not a known one."""
    if isinstance(m, nn.Hardtanh):  # also covers ReLU6's parent class
        return SIGN if (m.min_val == -m.max_val and not isinstance(m, nn.ReLU6)) else NONE
    for cls, kind in POINTWISE.items():
        if isinstance(m, cls):
            return kind
    return None
