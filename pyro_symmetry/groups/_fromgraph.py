"""``PermutationSpec.from_module``: record the forward, analyse it, verify the result.

Example inputs, when not given, are built from the first layer that can read the input
(a ``Linear``: ``(2, in_features)``; a conv: ``(2, C, s, s)`` for a few sizes ``s``; an
``Embedding``: integer tokens ``(2, T)``), trying each candidate until the forward runs.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import torch
from torch import nn

from .._state import isolated
from ._attention import HANDLERS as ATTENTION_HANDLERS
from ._graph import analyze
from ._layers import HANDLERS as LAYER_HANDLERS
from ._ops import HANDLERS as OP_HANDLERS
from ._resolve import build_groups
from ._shape import HANDLERS as SHAPE_HANDLERS
from ._trace import Recording, record
from .spec import PermutationSpec, SpecError

__all__ = ["HANDLERS", "example_inputs", "module_dtype", "spec_from_graph"]

HANDLERS = {**OP_HANDLERS, **SHAPE_HANDLERS, **LAYER_HANDLERS, **ATTENTION_HANDLERS}

_SMALL = (*range(1, 8), *range(9, 16), 20, 24, 48, 96)
_CONV_SIZES = {1: (16, 32, 64, 8, 128, 256, *_SMALL), 2: (8, 16, 32, 28, 64, 224, *_SMALL), 3: (8, 16, 32, 4, 12)}
_SEQ_LENGTHS = (5, 8, 16, 32, 64, 10, 12, 128, 256, 512)
MAX_ATTEMPTS = 48


def module_dtype(module: nn.Module) -> torch.dtype:
    """The dtype of the module's first floating parameter or buffer (else its priors', else the default)."""
    for t in list(module.parameters()) + list(module.buffers()):
        if t.is_floating_point():
            return t.dtype
    dt = getattr(module, "_dtype", None)
    return dt if isinstance(dt, torch.dtype) else torch.get_default_dtype()


def example_inputs(module: nn.Module, gen: torch.Generator) -> Iterator[tuple]:
    """Candidate input tuples, most plausible first."""
    dtype = module_dtype(module)

    def randn(*shape: int) -> torch.Tensor:
        return torch.randn(shape, generator=gen, dtype=dtype)

    shape = getattr(module, "input_shape", None)
    if isinstance(shape, tuple) and shape and all(isinstance(s, int) and s > 0 for s in shape):
        yield (randn(2, *shape),)
    for m in module.modules():
        if isinstance(m, nn.MultiheadAttention):
            x = randn(2, 5, m.embed_dim) if m.batch_first else randn(5, 2, m.embed_dim)
            yield (x, x, x) if m is module else (x,)
        elif isinstance(m, nn.Linear):
            yield (randn(2, m.in_features),)
        elif isinstance(m, (nn.Conv1d, nn.Conv2d, nn.Conv3d)):
            k = len(m.kernel_size)
            for s in _CONV_SIZES[k]:
                yield (randn(2, m.in_channels, *([s] * k)),)
        elif isinstance(m, nn.Embedding):
            for t in _SEQ_LENGTHS:
                yield (torch.randint(0, m.num_embeddings, (2, t), generator=gen),)
        elif isinstance(m, (nn.LayerNorm, nn.RMSNorm)) and m.normalized_shape:
            yield (randn(2, *m.normalized_shape),)
            yield (randn(2, 5, *m.normalized_shape),)


def _record_any(module: nn.Module, candidates: Iterator[tuple]) -> tuple[Recording, tuple]:
    first: SpecError | None = None
    tried = 0
    for inputs in candidates:
        tried += 1
        try:
            return record(module, inputs), inputs
        except SpecError as e:
            first = first or e
        if tried >= MAX_ATTEMPTS:
            break
    if first is None:
        raise SpecError(
            f"module {type(module).__name__} has no Linear or Conv layer (nor Embedding or attention) to build "
            "example inputs from; pass example_inputs=(x, ...)"
        )
    raise SpecError(f"{first} (tried {tried} input shapes built from the module's layers)") from first


def record_module(module: nn.Module, inputs: Any = None) -> tuple[Recording, tuple]:
    """Record ``module``'s forward on ``inputs`` (a tensor or tuple), or on built ones."""
    if inputs is not None:
        inputs = inputs if isinstance(inputs, tuple) else (inputs,)
        return record(module, inputs), inputs
    gen = torch.Generator().manual_seed(0)
    return _record_any(module, example_inputs(module, gen))


def spec_from_graph(module: nn.Module, inputs: Any = None) -> tuple[PermutationSpec, tuple, Recording]:
    """The spec read from the executed forward (not yet verified), and the inputs used."""
    with isolated():
        rec, inputs = record_module(module, inputs)
    ctx = analyze(rec, HANDLERS)
    groups = build_groups(ctx)
    shapes = {k: tuple(v.shape) for k, v in module.state_dict().items()}
    shapes.update(rec.site_shapes)
    return PermutationSpec(groups, shapes), inputs, rec
