"""Activation matching: align two networks by the correlation of their hidden activations.

For every neuron group, the activations of the layers that write its neurons are recorded
on the same inputs in both networks (forward hooks), and the neurons are matched by one
linear assignment maximizing the summed Pearson correlation ``C[i, j] = corr(a0_i, a1_j)``
(Git Re-Basin's activation matching, Ainsworth, Hayase, Srinivasa, ICLR 2023; Entezari,
Sedghi, Saukh, Neyshabur, ICLR 2022). A residual stream (a tied group) sums the correlations
of every layer writing it (the stem, each block's last layer, the downsample branches).
Sign-flip groups (odd activations) match ``|C|`` and take the sign of ``C``. Every group is
matched on the networks' own activations, so each assignment is independent of the others.
"""

from __future__ import annotations

import copy
from collections.abc import Mapping
from typing import Any

import torch

from ..groups import PermutationSpec, SpecError
from .assign import assign
from .bnreset import as_batches

__all__ = ["activation_matching", "writers"]

#: Layers whose output is indexed by the neurons they write, and the output's channel dim.
_CHANNEL_DIM = (
    (torch.nn.Linear, -1),
    (torch.nn.LayerNorm, -1),
    (torch.nn.modules.conv._ConvNd, 1),
    (torch.nn.modules.batchnorm._BatchNorm, 1),
    (torch.nn.GroupNorm, 1),
)


def _channel_dim(module: torch.nn.Module) -> int | None:
    for cls, dim in _CHANNEL_DIM:
        if isinstance(module, cls):
            return dim
    return None


def writers(spec: PermutationSpec, module: torch.nn.Module) -> dict[str, list[tuple[str, int]]]:
    """``group -> [(module name, channel dim)]``: the layers whose outputs are the group's
    neurons (a weight's rows, or a norm layer's parameters, indexed by the group's units).

    Raises :class:`SpecError` naming a group whose writing layer cannot be found (or a
    nested group: heads are not matched by activations)."""
    mods = dict(module.named_modules())
    found: dict[str, list[tuple[str, int]]] = {g: [] for g in spec.groups}
    for site in spec.sites:
        name, _, leaf = site.rpartition(".")
        m = mods.get(name)
        dim = None if m is None or leaf not in ("weight", "bias") else _channel_dim(m)
        if dim is None:
            continue
        for span in spec.action(site).spans:
            # the rows of the layer (axis 0 of a weight or of a 1-d parameter): its outputs
            if span.axis == 0 and span.role != "outgoing" and len(span.shape) == 1 and span.whole and span.inner == 1:
                if (name, dim) not in found[span.group]:
                    found[span.group].append((name, dim))
    for g, group in spec.groups.items():
        if group.parent is not None or spec.children(g):
            raise SpecError(
                f"method='activations' does not match nested groups (group {g!r}); use method='weights' or "
                "'wasserstein'"
            )
        if not found[g]:
            raise SpecError(
                f"method='activations' cannot find the layer that writes the neurons of group {g!r} in the "
                f"{type(module).__name__} (a Linear/Conv/norm layer whose weight rows or bias are the group's); "
                "use method='weights' or 'wasserstein'"
            )
    return found


def _record(module: torch.nn.Module, params: Mapping[str, torch.Tensor], data: Any, names: set) -> dict:
    """``name -> list of outputs`` of the named submodules on every batch of ``data``."""
    out: dict[str, list[torch.Tensor]] = {n: [] for n in names}
    mods = dict(module.named_modules())
    handles = [mods[n].register_forward_hook(lambda _m, _i, o, n=n: out[n].append(o.detach().double())) for n in names]
    try:
        with torch.no_grad():
            for args in as_batches(data):
                torch.func.functional_call(module, dict(params), args)
    finally:
        for h in handles:
            h.remove()
    return out


def _columns(outputs: list[torch.Tensor], dim: int) -> torch.Tensor:
    """Activations ``(samples, n)``: the channel dim last, everything else samples."""
    x = torch.cat([o.movedim(dim, -1).reshape(-1, o.shape[dim]) for o in outputs])
    x = x - x.mean(0)
    norm = x.norm(dim=0)
    # A constant unit (a dead ReLU) correlates with nothing: its column is zero, not NaN.
    return x / torch.where(norm > 0, norm, torch.ones_like(norm))


def activation_matching(
    spec: PermutationSpec,
    module: torch.nn.Module,
    p0: Mapping[str, torch.Tensor],
    p1: Mapping[str, torch.Tensor],
    data: Any,
) -> dict[str, torch.Tensor]:
    """The element ``g`` (``group -> (n,)``) matching network ``p1``'s neurons to ``p0``'s by the
    correlation of their activations on ``data`` (``module`` run in eval mode at each point)."""
    found = writers(spec, module)
    net = copy.deepcopy(module).eval()
    names = {n for ws in found.values() for n, _ in ws}
    full0 = {**dict(net.state_dict()), **p0}
    full1 = {**dict(net.state_dict()), **p1}
    a0, a1 = _record(net, full0, data, names), _record(net, full1, data, names)
    if not any(a0[n] for n in names):
        raise ValueError("data holds no batch: no activations to match")
    perm = {}
    for g, ws in found.items():
        corr = sum(_columns(a0[n], d).T @ _columns(a1[n], d) for n, d in ws)  # (n, n): ref i, target j
        if not bool(torch.isfinite(corr).all()):
            raise ValueError(f"the activations of group {g!r} are not finite on data; cannot match them")
        parts = [corr, None] if spec.groups[g].signed else [corr]
        perm[g] = assign(parts, spec.groups[g].signed)[0]
    return perm
