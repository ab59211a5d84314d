"""A small pre-norm transformer classifier (ViT-style: a linear token embedding, a class
token, learned position embeddings, blocks of LayerNorm -> multi-head attention ->
residual and LayerNorm -> GELU MLP -> residual, a final LayerNorm and a linear head on the
class token), and its Bayesian version.

Its symmetries (from :meth:`~pyro_symmetry.PermutationSpec.from_module`): the residual
stream is one group tied across every block; in every attention block the heads are
permuted as blocks with the query/key dims and the value dims permuted within each head;
every MLP's hidden units are a group.
"""

from __future__ import annotations

import torch
from torch import nn

from .wrapped import BayesianModule

__all__ = ["BayesianTransformer", "transformer"]


class _Block(nn.Module):
    def __init__(self, dim: int, heads: int, mlp: int) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(dim)
        self.attn = nn.MultiheadAttention(dim, heads, batch_first=True)
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = nn.Sequential(nn.Linear(dim, mlp), nn.GELU(), nn.Linear(mlp, dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.norm1(x)
        x = x + self.attn(h, h, h, need_weights=False)[0]
        return x + self.mlp(self.norm2(x))


class _Transformer(nn.Module):
    def __init__(self, tokens: int, features: int, num_classes: int, dim: int, depth: int, heads: int, mlp: int):
        super().__init__()
        self.embed = nn.Linear(features, dim)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, dim))
        self.pos_embed = nn.Parameter(torch.zeros(1, tokens + 1, dim))
        self.blocks = nn.Sequential(*[_Block(dim, heads, mlp) for _ in range(depth)])
        self.norm = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.embed(x)
        cls = self.cls_token.expand(h.shape[0], -1, -1)
        h = torch.cat([cls, h], dim=1) + self.pos_embed
        h = self.norm(self.blocks(h))
        return self.head(h[:, 0])


def transformer(
    tokens: int, features: int, num_classes: int, *, dim: int = 16, depth: int = 2, heads: int = 2, mlp: int = 32
) -> nn.Module:
    """A deterministic pre-norm transformer classifier for inputs ``(N, tokens, features)``."""
    if dim % heads:
        raise ValueError(f"dim ({dim}) must be a multiple of heads ({heads})")
    return _Transformer(tokens, features, num_classes, dim, depth, heads, mlp)


class BayesianTransformer(BayesianModule):
    """A Bayesian pre-norm transformer classifier with iid ``Normal(0, prior_scale)`` priors.

    Parameters
    ----------
    tokens, features : int
        Inputs are ``(N, tokens, features)`` (e.g. the 8 rows of an 8x8 digit).
    num_classes : int
    dim, depth, heads, mlp : int
        Embedding width, number of blocks, attention heads, MLP hidden width.
    prior_scale : float
    """

    def __init__(
        self,
        tokens: int,
        features: int,
        num_classes: int,
        *,
        dim: int = 16,
        depth: int = 2,
        heads: int = 2,
        mlp: int = 32,
        prior_scale: float = 1.0,
    ) -> None:
        net = transformer(tokens, features, num_classes, dim=dim, depth=depth, heads=heads, mlp=mlp)
        super().__init__(net, (tokens, features), num_classes, prior_scale=prior_scale)
