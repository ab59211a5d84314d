"""Reusable Hypothesis strategies: random architectures and group elements.

Every module's property tests draw from these so that "random architecture" means
the same thing everywhere (depth 1-4 hidden layers, widths 1-8).
"""

from __future__ import annotations

import torch
from hypothesis import strategies as st

import pyro_symmetry as ps

widths = st.integers(min_value=1, max_value=8)
hidden_sizes = st.lists(widths, min_size=1, max_size=4).map(tuple)
dtypes = st.sampled_from([torch.float32, torch.float64])
seeds = st.integers(min_value=0, max_value=2**31 - 1)
activations = st.sampled_from(["relu", "tanh", "gelu", "identity"])


@st.composite
def mlp_architectures(draw, max_in: int = 6, max_out: int = 4):
    """``(in_features, hidden_sizes, out_features)``."""
    return (
        draw(st.integers(1, max_in)),
        draw(hidden_sizes),
        draw(st.integers(1, max_out)),
    )


@st.composite
def batch_shapes(draw, max_ndim: int = 2, max_size: int = 3):
    return tuple(draw(st.lists(st.integers(1, max_size), min_size=0, max_size=max_ndim)))


@st.composite
def broadcastable_batch_shapes(draw, max_ndim: int = 2, max_size: int = 3):
    """Two batch shapes that broadcast: each keeps a suffix of a common shape, with some dims set to 1."""
    full = draw(batch_shapes(max_ndim, max_size))

    def one():
        keep = draw(st.integers(0, len(full)))
        sub = full[len(full) - keep :]
        return tuple(d if draw(st.booleans()) else 1 for d in sub)

    return one(), one()


def mlp_params(
    sizes: list[int], batch_shape=(), dtype=torch.float64, seed: int = 0, names=None, bias: bool = True
) -> dict[str, torch.Tensor]:
    """Random Gaussian weights ``site -> (*batch, *shape)`` for an MLP with ``sizes``."""
    g = torch.Generator().manual_seed(seed)
    names = names or [f"fc{i + 1}" for i in range(len(sizes) - 1)]
    out = {}
    for name, n_in, n_out in zip(names, sizes[:-1], sizes[1:]):
        out[f"{name}.weight"] = torch.randn(tuple(batch_shape) + (n_out, n_in), generator=g, dtype=dtype)
        if bias:
            out[f"{name}.bias"] = torch.randn(tuple(batch_shape) + (n_out,), generator=g, dtype=dtype)
    return out


def group_element(spec: ps.PermutationSpec, seed: int, batch_shape=(), signed: bool = True):
    """A reproducible uniform (signed) group element."""
    return spec.sample(batch_shape, generator=torch.Generator().manual_seed(seed), signed=signed)


def model_params(model, batch_shape=(), dtype=torch.float64, seed: int = 0) -> dict[str, torch.Tensor]:
    """Random weights for every site of a ``BayesianMLP``/``BayesianCNN``."""
    g = torch.Generator().manual_seed(seed)
    shapes = model.spec.shapes
    return {k: torch.randn(tuple(batch_shape) + shapes[k], generator=g, dtype=dtype) for k in model.site_names}
