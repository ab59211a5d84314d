"""ResNet-20-style Bayesian networks (He et al. 2016, the CIFAR variant; the architecture
of Rossi et al.'s ResNet-20 alignment experiments).

``resnet(...)`` builds the deterministic skeleton: a 3x3 stem, three stages of
``blocks`` BasicBlocks (16k, 32k and 64k channels for width multiplier ``k``; stride 2 at
the second and third stage, 1x1 conv + norm on the shortcut where the shape changes),
global average pooling and a linear head. :class:`BayesianResNet` puts iid Normal priors
on every weight (norm affine parameters included).

Normalization: ``"batchnorm"`` uses batch statistics (no running statistics: a BNN's
prediction depends only on its weights and the data), ``"frn"`` is Filter Response
Normalization with a thresholded linear unit (Singh and Krishnan 2020; the choice of
Izmailov et al. 2021 for HMC on ResNet-20), ``"none"`` adds biases to the convolutions.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from .wrapped import BayesianModule

__all__ = ["BasicBlock", "BayesianResNet", "FilterResponseNorm2d", "resnet"]

NORMS = ("batchnorm", "frn", "none")


class FilterResponseNorm2d(nn.Module):
    """``max(gamma * x / sqrt(mean_hw(x^2) + eps) + beta, tau)`` per channel (FRN + TLU)."""

    def __init__(self, channels: int, eps: float = 1e-6) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(channels))
        self.bias = nn.Parameter(torch.zeros(channels))
        self.tau = nn.Parameter(torch.zeros(channels))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        nu2 = x.pow(2).mean(dim=(-2, -1), keepdim=True)
        x = x * torch.rsqrt(nu2 + self.eps)
        shape = (-1, 1, 1)
        return torch.maximum(self.weight.view(shape) * x + self.bias.view(shape), self.tau.view(shape))


def _norm(kind: str, channels: int) -> nn.Module:
    if kind == "batchnorm":
        return nn.BatchNorm2d(channels, track_running_stats=False)
    if kind == "frn":
        return FilterResponseNorm2d(channels)
    return nn.Identity()


class BasicBlock(nn.Module):
    """``relu(norm(conv(relu(norm(conv(x))))) + shortcut(x))``; FRN's TLU replaces the ReLUs."""

    def __init__(self, c_in: int, c_out: int, stride: int, norm: str) -> None:
        super().__init__()
        bias = norm == "none"
        self.conv1 = nn.Conv2d(c_in, c_out, 3, stride, 1, bias=bias)
        self.bn1 = _norm(norm, c_out)
        self.conv2 = nn.Conv2d(c_out, c_out, 3, 1, 1, bias=bias)
        self.bn2 = _norm(norm, c_out)
        self.relu = norm != "frn"
        self.downsample = None
        if stride != 1 or c_in != c_out:
            self.downsample = nn.Sequential(nn.Conv2d(c_in, c_out, 1, stride, bias=bias), _norm(norm, c_out))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.bn1(self.conv1(x))
        h = F.relu(h) if self.relu else h
        h = self.bn2(self.conv2(h))
        h = h + (x if self.downsample is None else self.downsample(x))
        return F.relu(h) if self.relu else h


class _ResNet(nn.Module):
    def __init__(self, in_channels: int, num_classes: int, widths: Sequence[int], blocks: Sequence[int], norm: str):
        super().__init__()
        bias = norm == "none"
        self.conv1 = nn.Conv2d(in_channels, widths[0], 3, 1, 1, bias=bias)
        self.bn1 = _norm(norm, widths[0])
        self.relu = norm != "frn"
        stages, c = [], widths[0]
        for i, (w, n) in enumerate(zip(widths, blocks)):
            layers = [BasicBlock(c if j == 0 else w, w, 2 if (i > 0 and j == 0) else 1, norm) for j in range(n)]
            stages.append(nn.Sequential(*layers))
            c = w
        self.layer1, self.layer2, self.layer3 = stages
        self.fc = nn.Linear(c, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.bn1(self.conv1(x))
        h = F.relu(h) if self.relu else h
        h = self.layer3(self.layer2(self.layer1(h)))
        return self.fc(F.adaptive_avg_pool2d(h, 1).flatten(1))


def resnet(
    in_channels: int = 3,
    num_classes: int = 10,
    *,
    width: int = 1,
    blocks: Sequence[int] = (3, 3, 3),
    norm: str = "batchnorm",
) -> nn.Module:
    """A deterministic ResNet-20-style network (``blocks=(3, 3, 3)``; ``(1, 1, 1)`` for a small one)."""
    if norm not in NORMS:
        raise ValueError(f"norm must be one of {NORMS}, got {norm!r}")
    if len(blocks) != 3 or any(int(b) < 1 for b in blocks):
        raise ValueError(f"blocks must be three positive ints (blocks per stage), got {blocks!r}")
    if int(width) < 1:
        raise ValueError(f"width must be a positive int, got {width!r}")
    widths = [16 * width, 32 * width, 64 * width]
    return _ResNet(in_channels, num_classes, widths, [int(b) for b in blocks], norm)


class BayesianResNet(BayesianModule):
    """A Bayesian ResNet-20-style classifier with iid ``Normal(0, prior_scale)`` priors.

    Parameters
    ----------
    in_channels : int
    image_size : (int, int)
    num_classes : int
    width : int
        Width multiplier ``k`` (16k, 32k, 64k channels).
    blocks : three ints
        BasicBlocks per stage (ResNet-20: ``(3, 3, 3)``).
    norm : {"batchnorm", "frn", "none"}
    prior_scale : float

    Attributes
    ----------
    spec : PermutationSpec
        From :meth:`~pyro_symmetry.PermutationSpec.from_module` on the skeleton: the
        residual streams of each stage are tied groups, the inner channels of each block
        are groups of their own.

    Examples
    --------
    >>> model = BayesianResNet(1, (8, 8), 10, width=1, blocks=(1, 1, 1))
    >>> guide = pyro.infer.autoguide.AutoNormal(model)
    """

    def __init__(
        self,
        in_channels: int,
        image_size: Sequence[int],
        num_classes: int,
        *,
        width: int = 1,
        blocks: Sequence[int] = (3, 3, 3),
        norm: str = "batchnorm",
        prior_scale: float = 1.0,
    ) -> None:
        net = resnet(in_channels, num_classes, width=width, blocks=blocks, norm=norm)
        super().__init__(net, (in_channels, *image_size), num_classes, prior_scale=prior_scale)
        self.norm = norm
