"""Exact ``log S(w)`` by enumerating the group (small networks only)."""

from __future__ import annotations

import torch

from .._shapes import broadcast_shapes
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
    Tensor ``(*batch,)`` in the value's dtype, differentiable in ``w`` and in ``q``'s
    parameters.

    Raises
    ------
    SpecError
        ``|G| > max_order``.
    ValueError
        ``log q(w)`` is ``-inf`` or NaN even in float64 (``w`` outside ``q``'s support, or
        ``|w - loc| / scale`` beyond float64's range), so that the ratio is undefined.

    Notes
    -----
    ``q(g^{-1} w)`` is evaluated for every ``g`` (the set of inverses is the group
    itself), in chunks of elements so that memory stays bounded; cost ``O(|G| D)``
    per ``w``. Far from ``q`` a lower-precision ``log q`` can overflow (in float32 once
    ``|w - loc| / scale`` exceeds about ``1e19``): then every term is ``-inf`` and the
    ratio would be NaN, so such a value is evaluated again with the value in float64 (a
    float32 diagonal Normal ``q`` then computes in float64) and the result cast back.
    """
    spec = base.spec
    if spec.order > max_order:
        raise SpecError(
            f"exact enumeration over |G| = {spec.order} elements exceeds max_order={max_order}; use "
            "estimator='permanent' (one hidden layer) or a bound ('importance', 'contrastive')"
        )
    ref = base.reference(value)
    out = _enumerate(base, value)
    if bool(torch.isfinite(out).all()):
        return out
    if ref.dtype != torch.float64:
        try:
            wide = _enumerate(base, _to_double(base, value))
        except (RuntimeError, TypeError):  # a q whose log_prob takes only its own dtype
            wide = None
        if wide is not None:
            out = torch.where(torch.isfinite(out), out, wide.to(out.dtype))
    bad = torch.isnan(out) | (out == -torch.inf)
    if bool(bad.any()):
        where = tuple(bad.nonzero()[0].tolist())
        raise ValueError(
            f"log q(w) is not finite at draw {where} of the value (dtype {ref.dtype}"
            f"{', also in float64' if ref.dtype != torch.float64 else ''}): the value lies outside q's support "
            "or |w - loc| / scale is beyond float64's range, so log q_sym(w) - log q(w) is undefined there"
        )
    return out


def _to_double(base: BaseDensity, value):
    if base.is_flat:
        return value.double()
    return {k: v.double() if k in base.spec.sites else v for k, v in value.items()}


def _enumerate(base: BaseDensity, value) -> torch.Tensor:
    """``logsumexp_g log q(g^{-1} w) - log q(w) - log|G|`` in the value's dtype, ``(*batch,)``."""
    spec = base.spec
    ref = base.reference(value)
    batch = base.batch_shape_of(value) if ref.dtype == base.dtype else _batch_shape(base, value)
    elements = spec.elements(device=ref.device, max_order=spec.order)
    dim = base.layout.dim if base.is_flat else sum(ref.new_empty(spec.shapes[s]).numel() for s in spec.sites)
    chunk = max(1, _CHUNK_ELEMENTS // max(1, dim * max(1, batch.numel())))
    lead = (1,) * len(batch)
    logs = []
    for start in range(0, spec.order, chunk):
        perm = {k: p[start : start + chunk].reshape(-1, *lead, p.shape[-1]) for k, p in elements.items()}
        logs.append(base.log_prob_acted(value, perm).expand(-1, *batch))
    log_all = torch.cat(logs, 0)  # (|G|, *batch)
    return torch.logsumexp(log_all, 0) - base.log_kernel(value) - spec.log_order


def _batch_shape(base: BaseDensity, value) -> torch.Size:
    """The value's batch shape without the dtype check (the float64 retry of a float32 ``q``)."""
    if base.is_flat:
        return value.shape[:-1]
    shapes = [value[s].shape[: value[s].dim() - len(base.spec.shapes[s])] for s in base.spec.sites]
    return broadcast_shapes(*shapes)
