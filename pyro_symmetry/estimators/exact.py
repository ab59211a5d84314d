"""Exact ``log S(w)`` by enumerating the group (small networks only)."""

from __future__ import annotations

import torch

from ..groups import SpecError
from ._base import BaseDensity

__all__ = ["MAX_EXACT_ORDER", "exact_log_ratio"]

#: Largest ``|G|`` enumerated by default (e.g. widths (8,): 40320; tanh widths (3, 2): 384).
MAX_EXACT_ORDER = 100_000
_CHUNK_ELEMENTS = 1 << 23


def exact_log_ratio(base: BaseDensity, value, max_order: int = MAX_EXACT_ORDER) -> torch.Tensor:
    """``log q_sym(w) - log q(w) = logsumexp_g [log q(g^{-1} w) - log q(w)] - log|G|``.

    Parameters
    ----------
    base : BaseDensity
        Any ``q`` (site mapping or flat; mixtures and correlated Gaussians too).
    value : weights ``w`` ``(*batch, ...)``
    max_order : int
        Refuse (:class:`~pyro_symmetry.SpecError`) when ``|G|`` exceeds it.

    Returns
    -------
    Tensor ``(*batch,)``, differentiable in ``w`` and in ``q``'s parameters.

    Notes
    -----
    ``q(g^{-1} w)`` is evaluated for every ``g`` (the set of inverses is the group
    itself), in chunks of elements so that memory stays bounded; cost ``O(|G| D)``
    per ``w``.
    """
    spec = base.spec
    if spec.order > max_order:
        raise SpecError(
            f"exact enumeration over |G| = {spec.order} elements exceeds max_order={max_order}; use "
            "method='permanent' (one hidden layer) or a bound ('importance', 'contrastive')"
        )
    ref = base.reference(value)
    batch = base.batch_shape_of(value)
    elements = spec.elements(device=ref.device, max_order=max_order)
    dim = base.layout.dim if base.is_flat else sum(ref.new_empty(spec.shapes[s]).numel() for s in spec.sites)
    chunk = max(1, _CHUNK_ELEMENTS // max(1, dim * max(1, batch.numel())))
    lead = (1,) * len(batch)
    logs = []
    for start in range(0, spec.order, chunk):
        perm = {k: p[start : start + chunk].reshape(-1, *lead, p.shape[-1]) for k, p in elements.items()}
        logs.append(base.log_prob_acted(value, perm).expand(-1, *batch))
    log_all = torch.cat(logs, 0)  # (|G|, *batch)
    return torch.logsumexp(log_all, 0) - base.log_kernel(value) - spec.log_order
