"""Reference architectures for ``PermutationSpec.from_module``, written out in full.

Each is small but keeps the structure of the network it stands for: torchvision's ResNet-18
layout (torchvision itself is not installable against the CPU torch wheel), a CIFAR ResNet-20,
a pre-norm ViT, a transformer with attention written by hand, norm nets, grouped and depthwise
convolutions, DenseNet- and U-Net-style concatenation, and tutorial-style Pyro BNNs.
"""

from __future__ import annotations

import math

import pyro
import pyro.distributions as dist
import torch
import torch.nn.functional as F
from pyro.nn import PyroModule, PyroSample
from torch import nn

__all__ = [
    "AffineAfterNorm",
    "AttentionTransformer",
    "BasicBlock",
    "ChannelsLastFlatten",
    "DenseNetTiny",
    "DepthwiseNet",
    "GroupNormNet",
    "GatedBias",
    "GroupedConvNet",
    "LayerScaleNet",
    "NormMLP",
    "ResNet18",
    "ResNet20",
    "ResidualPyroBNN",
    "SqueezeExciteNet",
    "TiedEmbeddingLM",
    "TutorialBNN",
    "UNetTiny",
    "ViT",
    "WeightNormMLP",
]


# ------------------------------------------------------------------------------------ ResNets
class BasicBlock(nn.Module):
    """torchvision's ``BasicBlock``: conv-bn-relu-conv-bn, ``out += identity``, relu."""

    expansion = 1

    def __init__(self, inplanes: int, planes: int, stride: int = 1, downsample: nn.Module | None = None):
        super().__init__()
        self.conv1 = nn.Conv2d(inplanes, planes, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.relu = nn.ReLU(inplace=True)
        self.conv2 = nn.Conv2d(planes, planes, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.downsample = downsample
        self.stride = stride

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        identity = x
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        if self.downsample is not None:
            identity = self.downsample(x)
        out += identity
        return self.relu(out)


class ResNet18(nn.Module):
    """torchvision's ``resnet18`` layout with base width ``width`` (64 in torchvision)."""

    def __init__(self, width: int = 64, num_classes: int = 10, in_channels: int = 3):
        super().__init__()
        self.inplanes = width
        self.conv1 = nn.Conv2d(in_channels, width, 7, 2, 3, bias=False)
        self.bn1 = nn.BatchNorm2d(width)
        self.relu = nn.ReLU(inplace=True)
        self.maxpool = nn.MaxPool2d(3, 2, 1)
        self.layer1 = self._make_layer(width, 2)
        self.layer2 = self._make_layer(2 * width, 2, stride=2)
        self.layer3 = self._make_layer(4 * width, 2, stride=2)
        self.layer4 = self._make_layer(8 * width, 2, stride=2)
        self.avgpool = nn.AdaptiveAvgPool2d((1, 1))
        self.fc = nn.Linear(8 * width, num_classes)

    def _make_layer(self, planes: int, blocks: int, stride: int = 1) -> nn.Sequential:
        downsample = None
        if stride != 1 or self.inplanes != planes:
            downsample = nn.Sequential(nn.Conv2d(self.inplanes, planes, 1, stride, bias=False), nn.BatchNorm2d(planes))
        layers = [BasicBlock(self.inplanes, planes, stride, downsample)]
        self.inplanes = planes
        layers += [BasicBlock(planes, planes) for _ in range(1, blocks)]
        return nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        return self.fc(torch.flatten(self.avgpool(x), 1))


class ResNet20(nn.Module):
    """CIFAR ResNet-20 (He et al. 2016): 3 stages of 3 basic blocks, widths ``16k, 32k, 64k``,
    option-B (1x1 conv + BN) downsampling between stages."""

    def __init__(self, k: int = 1, num_classes: int = 10, blocks: int = 3):
        super().__init__()
        w = [16 * k, 32 * k, 64 * k]
        self.conv = nn.Conv2d(3, w[0], 3, 1, 1, bias=False)
        self.bn = nn.BatchNorm2d(w[0])
        stages, inplanes = [], w[0]
        for i, planes in enumerate(w):
            blks = []
            for b in range(blocks):
                stride = 2 if (i > 0 and b == 0) else 1
                down = None
                if stride != 1 or inplanes != planes:
                    down = nn.Sequential(nn.Conv2d(inplanes, planes, 1, stride, bias=False), nn.BatchNorm2d(planes))
                blks.append(BasicBlock(inplanes, planes, stride, down))
                inplanes = planes
            stages.append(nn.Sequential(*blks))
        self.stages = nn.Sequential(*stages)
        self.fc = nn.Linear(w[2], num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.relu(self.bn(self.conv(x)))
        x = self.stages(x)
        return self.fc(F.adaptive_avg_pool2d(x, 1).flatten(1))


# ------------------------------------------------------------------------------------ ViT
class ViTBlock(nn.Module):
    def __init__(self, dim: int, heads: int, mlp: int, dropout: float = 0.1):
        super().__init__()
        self.ln1 = nn.LayerNorm(dim)
        self.attn = nn.MultiheadAttention(dim, heads, dropout=dropout, batch_first=True)
        self.ln2 = nn.LayerNorm(dim)
        self.mlp = nn.Sequential(nn.Linear(dim, mlp), nn.GELU(), nn.Dropout(dropout), nn.Linear(mlp, dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.ln1(x)
        x = x + self.attn(h, h, h, need_weights=False)[0]
        return x + self.mlp(self.ln2(x))


class ViT(nn.Module):
    """Pre-norm ViT: patch embedding conv, class token, learned position embedding, blocks of
    ``x + MHA(LN(x))`` and ``x + MLP(LN(x))``, final LN, linear head on the class token."""

    def __init__(self, image: int = 8, patch: int = 4, dim: int = 12, depth: int = 2, heads: int = 3,
                 mlp: int = 24, num_classes: int = 5, channels: int = 3):  # fmt: skip
        super().__init__()
        n = (image // patch) ** 2
        self.patch = nn.Conv2d(channels, dim, patch, patch)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, dim))
        self.pos_embed = nn.Parameter(torch.zeros(1, n + 1, dim))
        self.blocks = nn.ModuleList(ViTBlock(dim, heads, mlp) for _ in range(depth))
        self.norm = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.patch(x).flatten(2).transpose(1, 2)
        x = torch.cat([self.cls_token.expand(x.shape[0], -1, -1), x], dim=1) + self.pos_embed
        for blk in self.blocks:
            x = blk(x)
        return self.head(self.norm(x)[:, 0])


# ------------------------------------------------------------------------------------ transformer
class HandAttention(nn.Module):
    """Multi-head self-attention written out: q/k/v projections (separate or one fused
    ``qkv`` Linear split with ``chunk``), ``view``/``transpose``, ``softmax``, ``matmul`` (or
    ``F.scaled_dot_product_attention``), ``transpose``/``reshape``, output projection."""

    def __init__(self, dim: int, heads: int, fused: bool = False, sdpa: bool = False):
        super().__init__()
        self.h, self.d, self.fused, self.sdpa = heads, dim // heads, fused, sdpa
        if fused:
            self.qkv = nn.Linear(dim, 3 * dim)
        else:
            self.q, self.k, self.v = nn.Linear(dim, dim), nn.Linear(dim, dim), nn.Linear(dim, dim)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, T, E = x.shape
        if self.fused:
            q, k, v = self.qkv(x).chunk(3, dim=-1)
        else:
            q, k, v = self.q(x), self.k(x), self.v(x)
        q, k, v = (t.view(B, T, self.h, self.d).transpose(1, 2) for t in (q, k, v))
        if self.sdpa:
            out = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        else:
            att = (q @ k.transpose(-2, -1)) / math.sqrt(self.d)
            mask = torch.ones(T, T, dtype=torch.bool).tril()
            att = att.masked_fill(~mask, float("-inf")).softmax(dim=-1)
            out = att @ v
        return self.proj(out.transpose(1, 2).reshape(B, T, E))


class AttentionTransformer(nn.Module):
    """Token embedding + learned positions, pre-norm blocks with hand-written attention and a
    SiLU MLP, final LayerNorm, mean pooling over tokens, linear head."""

    def __init__(self, vocab: int = 11, dim: int = 12, heads: int = 3, mlp: int = 20, depth: int = 2,
                 max_len: int = 5, num_classes: int = 4, fused: bool = False, sdpa: bool = False):  # fmt: skip
        super().__init__()
        self.tok = nn.Embedding(vocab, dim)
        self.pos = nn.Parameter(torch.zeros(1, max_len, dim))
        self.blocks = nn.ModuleList(
            nn.ModuleDict(
                {
                    "ln1": nn.LayerNorm(dim),
                    "attn": HandAttention(dim, heads, fused, sdpa),
                    "ln2": nn.LayerNorm(dim),
                    "fc1": nn.Linear(dim, mlp),
                    "fc2": nn.Linear(mlp, dim),
                }
            )
            for _ in range(depth)
        )
        self.norm = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, num_classes)

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        x = self.tok(idx) + self.pos[:, : idx.shape[1]]
        for b in self.blocks:
            x = x + b["attn"](b["ln1"](x))
            x = x + b["fc2"](F.silu(b["fc1"](b["ln2"](x))))
        return self.head(self.norm(x).mean(dim=1))


# ------------------------------------------------------------------------------------ norms, convs
class NormMLP(nn.Module):
    """``Linear -> norm -> act`` twice, then a ``Linear`` (norm: layer, rms, batch or none)."""

    def __init__(self, sizes=(3, 5, 4, 2), norm: str = "layer", act: type = nn.ReLU, dropout: float = 0.2):
        super().__init__()
        layers = []
        for a, b in zip(sizes[:-2], sizes[1:-1]):
            layers.append(nn.Linear(a, b))
            if norm == "layer":
                layers.append(nn.LayerNorm(b))
            elif norm == "rms":
                layers.append(nn.RMSNorm(b))
            elif norm == "batch":
                layers.append(nn.BatchNorm1d(b))
            layers += [act(), nn.Dropout(dropout)]
        layers.append(nn.Linear(sizes[-2], sizes[-1]))
        self.net = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


class GroupNormNet(nn.Module):
    """``conv -> GroupNorm(G, C) -> act`` twice, global average pooling, linear head."""

    def __init__(self, channels=(6, 4), groups=(2, 1), act: type = nn.ReLU, in_channels: int = 2):
        super().__init__()
        c1, c2 = channels
        self.conv1, self.gn1 = nn.Conv2d(in_channels, c1, 3, padding=1), nn.GroupNorm(groups[0], c1)
        self.conv2, self.gn2 = nn.Conv2d(c1, c2, 3, padding=1), nn.GroupNorm(groups[1], c2)
        self.act = act()
        self.fc = nn.Linear(c2, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.act(self.gn1(self.conv1(x)))
        x = self.act(self.gn2(self.conv2(x)))
        return self.fc(F.adaptive_avg_pool2d(x, 1).flatten(1))


class DepthwiseNet(nn.Module):
    """``conv -> act -> depthwise conv (multiplier m) -> act -> pointwise conv -> act``, pooling, head."""

    def __init__(self, c: int = 4, mult: int = 1, c2: int = 5, act: type = nn.ReLU):
        super().__init__()
        self.conv1 = nn.Conv2d(2, c, 3, padding=1)
        self.dw = nn.Conv2d(c, c * mult, 3, padding=1, groups=c)
        self.pw = nn.Conv2d(c * mult, c2, 1)
        self.act = act()
        self.fc = nn.Linear(c2, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.act(self.conv1(x))
        x = self.act(self.dw(x))
        x = self.act(self.pw(x))
        return self.fc(x.mean(dim=(2, 3)))


class GroupedConvNet(nn.Module):
    """``conv -> act -> grouped conv (g groups) -> act -> 1x1 conv``, max pooling, head."""

    def __init__(self, c_in: int = 4, c_out: int = 6, g: int = 2, c2: int = 3, act: type = nn.ReLU):
        super().__init__()
        self.conv1 = nn.Conv2d(2, c_in, 3, padding=1)
        self.gconv = nn.Conv2d(c_in, c_out, 3, padding=1, groups=g)
        self.pw = nn.Conv2d(c_out, c2, 1)
        self.act = act()
        self.fc = nn.Linear(c2, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.act(self.conv1(x))
        x = self.act(self.gconv(x))
        x = self.pw(x)
        return self.fc(F.adaptive_max_pool2d(x, 1).flatten(1))


class DenseNetTiny(nn.Module):
    """DenseNet-style: every layer reads the concatenation of all earlier feature maps."""

    def __init__(self, c0: int = 4, growth: int = 3, layers: int = 2, batchnorm: bool = False):
        super().__init__()
        self.stem = nn.Conv2d(2, c0, 3, padding=1)
        self.convs = nn.ModuleList(nn.Conv2d(c0 + i * growth, growth, 3, padding=1) for i in range(layers))
        c = c0 + layers * growth
        self.norms = nn.ModuleList(nn.BatchNorm2d(c0 + i * growth) for i in range(layers)) if batchnorm else None
        self.fc = nn.Linear(c, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        feats = F.relu(self.stem(x))
        for i, conv in enumerate(self.convs):
            h = self.norms[i](feats) if self.norms is not None else feats
            feats = torch.cat([feats, conv(F.relu(h))], dim=1)
        return self.fc(F.adaptive_avg_pool2d(feats, 1).flatten(1))


class UNetTiny(nn.Module):
    """A two-level U-Net: encoder, max-pool, bottleneck, upsampling (nearest interpolation or a
    transposed conv), skip concatenation, decoder conv, 1x1 output conv (a per-pixel map)."""

    def __init__(self, c1: int = 3, c2: int = 4, c3: int = 3, out: int = 2, transposed: bool = False):
        super().__init__()
        self.enc = nn.Conv2d(2, c1, 3, padding=1)
        self.mid = nn.Conv2d(c1, c2, 3, padding=1)
        self.up = nn.ConvTranspose2d(c2, c2, 2, stride=2) if transposed else None
        self.dec = nn.Conv2d(c1 + c2, c3, 3, padding=1)
        self.out = nn.Conv2d(c3, out, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        e = F.relu(self.enc(x))
        m = F.relu(self.mid(F.max_pool2d(e, 2)))
        u = self.up(m) if self.up is not None else F.interpolate(m, scale_factor=2, mode="nearest")
        d = F.relu(self.dec(torch.cat([u, e], dim=1)))
        return self.out(d)


# ------------------------------------------------------------------------------------ Pyro BNNs
class TutorialBNN(PyroModule):
    """The common tutorial BNN: the activation registered *before* the layers, ``PyroModule``
    linear layers with ``PyroSample`` priors, Pyro statements in ``forward``."""

    def __init__(self, in_dim: int = 1, out_dim: int = 1, hid_dim: int = 5, n_hid_layers: int = 2,
                 prior_scale: float = 5.0):  # fmt: skip
        super().__init__()
        self.activation = nn.Tanh()
        self.layer_sizes = [in_dim] + n_hid_layers * [hid_dim] + [out_dim]
        layers = [PyroModule[nn.Linear](a, b) for a, b in zip(self.layer_sizes[:-1], self.layer_sizes[1:])]
        self.layers = PyroModule[nn.ModuleList](layers)
        for i, layer in enumerate(self.layers):
            a, b = self.layer_sizes[i], self.layer_sizes[i + 1]
            layer.weight = PyroSample(dist.Normal(0.0, prior_scale * math.sqrt(2 / a)).expand([b, a]).to_event(2))
            layer.bias = PyroSample(dist.Normal(0.0, prior_scale).expand([b]).to_event(1))

    def forward(self, x: torch.Tensor, y: torch.Tensor | None = None) -> torch.Tensor:
        x = x.reshape(-1, self.layer_sizes[0])
        x = self.activation(self.layers[0](x))
        for layer in self.layers[1:-1]:
            x = self.activation(layer(x))
        mu = self.layers[-1](x).squeeze(-1)
        sigma = pyro.sample("sigma", dist.Gamma(0.5, 1.0))
        with pyro.plate("data", x.shape[0]):
            pyro.sample("obs", dist.Normal(mu, sigma * sigma), obs=y)
        return mu


class ResidualPyroBNN(PyroModule):
    """A residual forward with Pyro statements: ``h = fc_in(x); h = h + fc2(tanh(fc1(h)))``."""

    def __init__(self, d_in: int = 3, d: int = 4, hidden: int = 6):
        super().__init__()
        self.fc_in = PyroModule[nn.Linear](d_in, d)
        self.fc1 = PyroModule[nn.Linear](d, hidden)
        self.fc2 = PyroModule[nn.Linear](hidden, d)
        self.out = PyroModule[nn.Linear](d, 1)
        for layer in (self.fc_in, self.fc1, self.fc2, self.out):
            o, i = layer.weight.shape
            layer.weight = PyroSample(dist.Normal(0.0, 1.0).expand([o, i]).to_event(2))
            layer.bias = PyroSample(dist.Normal(0.0, 1.0).expand([o]).to_event(1))

    def forward(self, x: torch.Tensor, y: torch.Tensor | None = None) -> torch.Tensor:
        h = self.fc_in(x)
        h = h + self.fc2(torch.tanh(self.fc1(h)))
        mu = self.out(torch.tanh(h)).squeeze(-1)
        with pyro.plate("data", x.shape[0]):
            pyro.sample("obs", dist.Normal(mu, 0.5), obs=y)
        return mu


# ------------------------------------------------------------------------------------ corner cases
class AffineAfterNorm(nn.Module):
    """A LayerNorm without affine weight, the affine written out after it."""

    def __init__(self, d: int = 5):
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(3, d), nn.Linear(d, 2)
        self.g, self.b = nn.Parameter(torch.randn(d)), nn.Parameter(torch.randn(d))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = F.layer_norm(self.fc1(x), (self.g.shape[0],))
        return self.fc2(torch.relu(h * self.g + self.b))


class GatedBias(nn.Module):
    """One parameter used both as a per-channel gate and as a bias: ``h * g + g``."""

    def __init__(self, d: int = 4):
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(3, d), nn.Linear(d, 2)
        self.g = nn.Parameter(torch.randn(d))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(torch.relu(self.fc1(x) * self.g + self.g))


class LayerScaleNet(nn.Module):
    """A residual block with LayerScale: ``h + gamma * fc2(relu(fc1(h)))``."""

    def __init__(self, d: int = 4, hidden: int = 6):
        super().__init__()
        self.inp, self.fc1, self.fc2, self.out = (
            nn.Linear(3, d),
            nn.Linear(d, hidden),
            nn.Linear(hidden, d),
            nn.Linear(d, 2),
        )
        self.gamma = nn.Parameter(torch.full((d,), 0.1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.inp(x)
        h = h + self.gamma * self.fc2(torch.relu(self.fc1(h)))
        return self.out(torch.relu(h))


class WeightNormMLP(nn.Module):
    """``nn.utils.parametrizations.weight_norm`` on a hidden layer."""

    def __init__(self, d: int = 5):
        super().__init__()
        self.net = nn.Sequential(nn.utils.parametrizations.weight_norm(nn.Linear(3, d)), nn.ReLU(), nn.Linear(d, 2))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


class SqueezeExciteNet(nn.Module):
    """conv -> relu -> squeeze-and-excitation (channel gates from a bottleneck MLP) -> pool -> head."""

    def __init__(self, c: int = 6, r: int = 3):
        super().__init__()
        self.conv = nn.Conv2d(2, c, 3, padding=1)
        self.se1, self.se2 = nn.Linear(c, r), nn.Linear(r, c)
        self.fc = nn.Linear(c, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.relu(self.conv(x))
        s = torch.sigmoid(self.se2(F.relu(self.se1(x.mean((2, 3))))))
        x = x * s[:, :, None, None]
        return self.fc(x.mean((2, 3)))


class TiedEmbeddingLM(nn.Module):
    """Token embedding whose weight is also the output head (``logits = h @ E.T``)."""

    def __init__(self, vocab: int = 7, d: int = 4, hidden: int = 5):
        super().__init__()
        self.tok = nn.Embedding(vocab, d)
        self.fc1, self.fc2 = nn.Linear(d, hidden), nn.Linear(hidden, d)
        self.norm = nn.LayerNorm(d)

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        h = self.tok(idx)
        h = h + self.fc2(torch.relu(self.fc1(h)))
        return self.norm(h) @ self.tok.weight.T


class ChannelsLastFlatten(nn.Module):
    """conv -> tanh -> ``permute(0, 2, 3, 1).flatten(1)`` -> linear: each channel is read by one
    column per pixel, strided (one slice of the axis per pixel)."""

    def __init__(self, c: int = 3, h: int = 5):
        super().__init__()
        self.conv = nn.Conv2d(2, c, 3, padding=1)
        self.fc, self.out = nn.Linear(4 * 4 * c, h), nn.Linear(h, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.tanh(self.conv(x)).permute(0, 2, 3, 1).flatten(1)
        return self.out(torch.tanh(self.fc(h)))
