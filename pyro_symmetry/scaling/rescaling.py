"""Positive rescaling of hidden neurons and the mass of a network.

For a positively homogeneous activation (``relu(lam z) = lam relu(z)`` for ``lam > 0``),
scaling neuron ``i`` of a hidden layer by ``lam_i = exp(u_i)`` - its incoming row and
bias times ``lam_i``, its outgoing column divided by ``lam_i`` - keeps the network's
function:

.. math::

    W_l \\to \\mathrm{diag}(e^{u_l})\\, W_l\\, \\mathrm{diag}(e^{-u_{l-1}}), \\qquad
    b_l \\to e^{u_l} \\odot b_l, \\qquad u_0 = u_L = 0.

References
----------
Neyshabur, Salakhutdinov, Srebro (2015), Path-SGD; Laurent, Aldea, Franchi (ICLR 2024),
A Symmetry-Aware Exploration of Bayesian Neural Network Posteriors.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch

from .._validation import check_finite, check_params, check_spec
from ..groups import PermutationSpec, SpecError
from ._axes import SiteAxis, check_group_tensors, groups_with, site_axes, split_event

__all__ = ["mass", "mass_sites", "rescale", "scale_site"]


def scale_site(
    x: torch.Tensor,
    nd: int,
    axes: list[SiteAxis],
    log_scales: Mapping[str, torch.Tensor],
    out: torch.Tensor | None = None,
) -> torch.Tensor:
    """``x`` times ``exp(direction * u_group)`` along each axis (into ``out`` if given).

    The factors are exponentiated at their own (small) size and multiplied in one
    after the other, so no tensor of the size of ``x`` is exponentiated.
    """
    nb = x.dim() - nd
    split, pos = split_event(x.shape[nb:], axes)
    ne = len(split)
    xs = x.reshape(tuple(x.shape[:nb]) + tuple(split))
    factors = []
    for a in axes:
        u = log_scales[a.group].to(dtype=x.dtype, device=x.device)
        p = pos[a.axis]
        shape = tuple(u.shape[:-1]) + (1,) * p + (u.shape[-1],) + (1,) * (ne - p - 1)
        factors.append(torch.exp(a.direction * u).reshape(shape))
    target = None if out is None else out.view(tuple(out.shape[: out.dim() - nd]) + tuple(split))
    if target is not None and torch.broadcast_shapes(xs.shape, *(f.shape for f in factors)) == target.shape:
        res = torch.mul(xs, factors[0], out=target)
    else:
        res = xs * factors[0]
    for f in factors[1:]:  # ``res`` is a fresh tensor (or ``out``): scale it in place when shapes allow
        res = res.mul_(f) if torch.broadcast_shapes(res.shape, f.shape) == res.shape else res * f
    if target is not None:
        if res is not target:
            target.copy_(res)
        return out
    return res.reshape(tuple(res.shape[: res.dim() - ne]) + tuple(x.shape[nb:]))


def rescale(
    params: Mapping[str, torch.Tensor], spec: PermutationSpec, log_scales: Mapping[str, torch.Tensor]
) -> dict[str, torch.Tensor]:
    """Rescale hidden neurons by ``exp(log_scales)``, keeping a ReLU network's function.

    Every incoming axis of group ``g`` (its layer's weight rows, its bias) is multiplied
    by ``exp(u_g)`` and every outgoing axis (the next layer's columns, blocks of
    flattened columns after a conv) divided by it; conv channels are scaled as a whole.

    Parameters
    ----------
    params : mapping ``site -> Tensor (*batch_w, *site_shape)``
        Sites no listed group touches pass through unchanged.
    spec : PermutationSpec
    log_scales : mapping ``group -> Tensor (*batch_u, n)``
        Log-scales ``u`` of some or all groups whose ``activation_symmetry`` is
        ``"scale"``; groups left out are not rescaled.

    Returns
    -------
    dict ``site -> Tensor (*broadcast(batch_w, batch_u), *site_shape)``

    Raises
    ------
    SpecError
        If ``log_scales`` names a group whose activation is not positively
        homogeneous (``activation_symmetry != "scale"``: tanh, GELU, or a group
        followed by a norm layer), an unknown group, or has the wrong size.

    Examples
    --------
    >>> model = ps.models.BayesianMLP(4, [8, 8], 3, activation="relu")
    >>> u = {"fc1": torch.randn(8), "fc2": torch.randn(8)}
    >>> w2 = ps.rescale(w, model.spec, u)   # model.functional(w2, x) == model.functional(w, x)
    """
    check_spec(spec)
    log_scales = check_group_tensors(spec, log_scales, "scale", "log_scales")
    for k, u in log_scales.items():
        if u.dtype == torch.bool or u.is_complex():
            raise TypeError(f"log_scales[{k!r}] must be a real (floating-point) tensor, got dtype {u.dtype}")
        check_finite(f"log_scales[{k!r}]", u)
    table = site_axes(spec, list(log_scales))
    # Rescaling multiplies by exp(u): integer weights would be silently turned into floats.
    batch = check_params(params, spec, list(table), finite=False)
    for k, u in log_scales.items():
        try:
            torch.broadcast_shapes(batch, u.shape[:-1])
        except RuntimeError:
            raise SpecError(
                f"log_scales[{k!r}] has batch shape {tuple(u.shape[:-1])}, which does not broadcast with the "
                f"params' batch shape {tuple(batch)}"
            ) from None
    out = dict(params)
    for site, (nd, axes) in table.items():
        x = params[site]
        for a in axes:
            n = spec.groups[a.group].size
            if x.shape[x.dim() - nd + a.axis] != n * a.inner:
                raise SpecError(
                    f"params[{site!r}] has shape {tuple(x.shape)}: axis {a.axis - nd} should have length "
                    f"{n * a.inner} for group {a.group!r}"
                )
        out[site] = scale_site(x, nd, axes, log_scales)
    return out


def mass_sites(spec: PermutationSpec) -> tuple[str, ...]:
    """The sites whose entries any ``"scale"`` group rescales (the default mass sites)."""
    return tuple(site_axes(spec, groups_with(spec, "scale")))


def mass(params: Mapping[str, torch.Tensor], spec: PermutationSpec, sites: Sequence[str] | None = None) -> torch.Tensor:
    """Mass of a network: the sum of its squared weights (and biases).

    .. math:: M(w) = \\sum_{s \\in \\text{sites}} \\lVert w_s \\rVert_2^2

    Parameters
    ----------
    params : mapping ``site -> Tensor (*batch, *site_shape)``
    spec : PermutationSpec
    sites : sequence of str, optional
        Sites to sum over. Default :func:`mass_sites`: every site a ``"scale"``
        group rescales (all weights and hidden biases of a ReLU MLP, not the output
        bias, which no rescaling changes).

    Returns
    -------
    Tensor ``(*batch,)``
    """
    check_spec(spec)
    if isinstance(sites, str):
        raise TypeError(f"sites must be a sequence of site names, got {sites!r}")
    sites = mass_sites(spec) if sites is None else tuple(sites)
    if not sites:
        raise SpecError("no sites to measure: the spec has no group with activation_symmetry='scale'")
    total = None
    for site in sites:
        if site not in params:
            raise SpecError(f"site {site!r} is missing from params (have {sorted(params)})")
        x = params[site]
        nd = spec.site_moves(site)[0] if site in spec.sites else None
        if nd is None:
            if spec.shapes is None or site not in spec.shapes:
                raise SpecError(f"the spec does not know the shape of site {site!r}; use spec.with_shapes(...)")
            nd = len(spec.shapes[site])
        m = torch.linalg.vector_norm(x, dim=list(range(x.dim() - nd, x.dim()))).square() if nd else x.square()
        total = m if total is None else total + m
    return total
