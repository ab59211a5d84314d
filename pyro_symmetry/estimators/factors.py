"""Per-neuron factor log-densities ``A[i, j] = log q_j(w_i)`` of a factorized ``q``.

For a neuron group of size ``n`` and a mean-field Gaussian ``q``, the density of the
coordinates the group moves factorizes over neurons: neuron ``j`` owns its incoming
row, bias and outgoing column, and ``q_j`` is the product of their Normal factors.
``A[i, j]`` evaluates neuron ``j``'s factor at the coordinates that neuron ``i``
holds in ``w``; for a sign-flip group also at their negation. These matrices drive
the permanent (exact ``S(w)`` for one hidden layer) and the Plackett-Luce proposal.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping

import torch

from ..groups import PermutationSpec, SpecError
from ._base import Marginals

__all__ = ["neuron_log_factors", "group_axes", "group_sites"]


def group_sites(spec: PermutationSpec, group: str) -> list[tuple[str, int, int]]:
    """``[(site, event_axis, inner)]`` the group acts on; one entry per site (see
    :func:`group_axes`)."""
    return [(site, axis, inner) for site, axis, inner, _ in group_axes(spec, group)]


def group_axes(spec: PermutationSpec, group: str) -> list[tuple[str, int, int, bool]]:
    """``[(site, event_axis, inner, passive)]`` the group acts on; one entry per site.

    ``event_axis`` is negative; ``passive`` marks an axis that is permuted but never
    sign-flipped (rows before a BatchNorm, running statistics). Read from
    ``spec.action(site)``.

    Raises :class:`SpecError` if the group acts on two axes of one site (a square
    recurrent weight), where a coordinate belongs to two neurons of the group, or on a
    slice of an axis or as a nested group (the neurons' factors are then not whole rows).
    """
    out = []
    for site in spec.sites:
        action = spec.action(site)
        spans = action.spans_of(group)
        if len(spans) > 1:
            raise SpecError(f"group {group!r} acts on {len(spans)} axes of site {site!r}: its neurons do not factorize")
        if spans:
            span = spans[0]
            if len(span.shape) > 1 or span.start or span.stop != spec.shapes[site][span.axis]:
                raise SpecError(
                    f"group {group!r} acts on a slice of axis {span.axis} of site {site!r} or is nested: the "
                    "factorized estimators ('permanent', 'importance') need whole axes; use 'exact' or 'contrastive'"
                )
            out.append((site, span.axis - action.event_ndim, span.inner, span.role == "passive"))
    return out


def _rows(x: torch.Tensor, axis: int, n: int, ndim: int) -> torch.Tensor:
    """``(*lead, *shape)`` with the neuron axis ``axis`` (negative) -> ``(*lead, n, m)``."""
    x = x.movedim(axis, -ndim)
    return x.reshape(*x.shape[: x.dim() - ndim], n, -1)


def neuron_log_factors(
    values: Mapping[str, torch.Tensor],
    marginals: Marginals,
    spec: PermutationSpec,
    group: str,
    *,
    sites: Iterable[str] | None = None,
    dtype: torch.dtype | None = None,
) -> torch.Tensor:
    """Factor log-densities of one neuron group.

    Parameters
    ----------
    values : mapping ``site -> Tensor (*batch, *site_shape)``
        The weights ``w`` (other groups' axes already aligned if needed).
    marginals : Marginals
        Normal factors of ``q`` (``(C, *site_shape)`` with ``log_weights`` for a
        mixture, where each neuron's factor becomes ``log sum_c pi_c q_{c,j}(w_i)``).
    spec : PermutationSpec
    group : str
    sites : iterable of str, optional
        Sites to include (default: every site the group acts on).
    dtype : torch.dtype, optional
        Compute dtype (default: the values' dtype).

    Returns
    -------
    Tensor ``(*batch, n, S, n)``
        ``A[..., i, s, j] = log q_j(sign_s * w_i)``, ``S = 2`` for a sign-flip group
        (``s = 1`` negates neuron ``i``'s coordinates, except on passive axes), else ``S = 1``. Computed with
        one batched matrix product per site (quadratic expansion of the Gaussian).
    """
    if group not in spec.groups:
        raise SpecError(f"unknown group {group!r}; groups are {sorted(spec.groups)}")
    n, signed = spec.groups[group].size, spec.groups[group].signed
    chosen = None if sites is None else set(sites)
    entries = [e for e in group_axes(spec, group) if chosen is None or e[0] in chosen]
    mixture = marginals.log_weights is not None
    ref = next(iter(values.values()))
    dtype = dtype or ref.dtype
    total = None
    for site, axis, _, passive in entries:
        nd = len(spec.shapes[site])
        v = _rows(values[site].to(dtype), axis, n, nd)
        loc = _rows(marginals.loc[site].to(dtype), axis, n, nd)
        lam = _rows(marginals.scale[site].to(dtype), axis, n, nd).pow(-2)
        if mixture:
            v = v.unsqueeze(-3)
        m = v.shape[-1]
        quad = -0.5 * (v * v) @ lam.transpose(-1, -2)
        cross = v @ (loc * lam).transpose(-1, -2)
        const = -0.5 * (loc * loc * lam).sum(-1) + 0.5 * lam.log().sum(-1) - 0.5 * m * math.log(2 * math.pi)
        plus = quad + cross + const.unsqueeze(-2)
        if not signed:
            term = plus.unsqueeze(-2)  # (*batch, [C,] n, 1, n)
        elif passive:  # permuted with its neuron but never negated
            term = torch.stack([plus, plus], -2)
        else:
            term = torch.stack([plus, quad - cross + const.unsqueeze(-2)], -2)  # (*batch, [C,] n, 2, n)
        total = term if total is None else total + term
    S = 2 if signed else 1
    if total is None:
        batch = torch.broadcast_shapes(*(v.shape[: v.dim() - len(spec.shapes[k])] for k, v in values.items()))
        return torch.zeros(*batch, n, S, n, dtype=dtype, device=ref.device)
    if mixture:
        lw = marginals.log_weights.to(dtype).reshape(-1, 1, 1, 1)
        total = torch.logsumexp(total + lw, dim=-4)
    return total
