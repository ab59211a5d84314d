"""Recomputing BatchNorm running statistics along an interpolation path (REPAIR-style reset).

The running mean and variance of a BatchNorm layer are statistics of the network's own
activations, not parameters: interpolating them linearly between two networks gives
statistics that no network on the path has, and the interpolated network's loss is then
much higher than it should be (Jordan et al., "REPAIR: REnormalizing Permuted Activations
for Interpolation Repair", ICLR 2023, who reset them on training data at every point;
Ainsworth et al. 2023 do the same for Git Re-Basin's ResNet barriers). :func:`reset_batchnorm`
loads a point into a copy of the module and recomputes every tracked BatchNorm's statistics
as the exact average over the given batches (``momentum=None``), the other layers in eval
mode (no dropout).
"""

from __future__ import annotations

import copy
from collections.abc import Iterable, Mapping
from typing import Any

import torch

from .._state import isolated

__all__ = ["as_batches", "has_running_stats", "reset_batchnorm"]


def _batchnorms(module: torch.nn.Module) -> list[torch.nn.Module]:
    return [
        m
        for m in module.modules()
        if isinstance(m, torch.nn.modules.batchnorm._BatchNorm) and m.track_running_stats and m.running_mean is not None
    ]


def has_running_stats(q: Any) -> bool:
    """Whether ``q`` is an ``nn.Module`` with BatchNorm layers that track running statistics."""
    return isinstance(q, torch.nn.Module) and not hasattr(q, "prototype_trace") and bool(_batchnorms(q))


def as_batches(data: Any) -> Iterable[tuple]:
    """``data`` as an iterable of argument tuples: a tensor or a tuple of tensors is one batch;
    a list or another iterable (a ``DataLoader``) yields batches (a batch that is a tuple or list
    is the forward's arguments; a ``(x, y)`` pair from a loader passes ``x`` only)."""
    if torch.is_tensor(data):
        return [(data,)]
    if isinstance(data, tuple):
        return [data]
    if isinstance(data, Iterable) and not isinstance(data, (str, bytes, Mapping)):
        return ((b,) if torch.is_tensor(b) else (b[0],) for b in data)
    raise TypeError(f"data must be a tensor, a tuple of forward arguments or an iterable of batches, got {data!r}")


def reset_batchnorm(module: torch.nn.Module, point: Mapping[str, torch.Tensor], data: Any) -> dict[str, torch.Tensor]:
    """``point`` (a state dict of ``module``) with every tracked BatchNorm's running statistics
    recomputed on ``data``.

    Parameters
    ----------
    module : nn.Module
        The architecture (left untouched: a copy is run).
    point : mapping ``name -> Tensor``
        A state dict of ``module`` (e.g. an interpolated one).
    data : Tensor, tuple of forward arguments, or iterable of batches

    Returns
    -------
    dict
        ``point`` with ``running_mean``, ``running_var`` (the exact average over ``data``:
        cumulative, ``momentum=None``) and ``num_batches_tracked`` of each BatchNorm replaced.
    """
    with isolated(), torch.no_grad():
        net = copy.deepcopy(module)
        missing = [k for k in net.state_dict() if k not in point]
        if missing:
            raise ValueError(f"the point lacks the module's entries {missing[:5]}: a state dict of the module needed")
        net.load_state_dict(dict(point))
        net.eval()
        norms = _batchnorms(net)
        for m in norms:
            m.reset_running_stats()
            m.momentum = None  # cumulative average: the exact statistics of the data
            m.train()
        seen = 0
        for args in as_batches(data):
            net(*args)
            seen += 1
        if not seen:
            raise ValueError("data holds no batch: the BatchNorm statistics cannot be recomputed")
        fresh = net.state_dict()
        out = dict(point)
        for name, m in net.named_modules():
            if m in norms:
                for buf in ("running_mean", "running_var", "num_batches_tracked"):
                    key = f"{name}.{buf}" if name else buf
                    out[key] = fresh[key].detach().clone()
        return out
