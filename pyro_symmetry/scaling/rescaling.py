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

import math
from collections.abc import Mapping, Sequence

import torch

from .._shapes import broadcast_shapes
from .._validation import check_devices, check_finite, check_mapping, check_params, check_spec, check_tensor
from ..groups import PermutationSpec, SpecError
from ._axes import SiteAxis, check_group_tensors, groups_with, narrow, pieces, site_axes, split_event

__all__ = ["mass", "mass_of_site", "mass_sites", "rescale", "scale_site"]


def _centered_exponents(axes: list[SiteAxis], log_scales: Mapping[str, torch.Tensor], x: torch.Tensor):
    """``direction * u`` per axis, shifted by per-sample constants that sum to zero.

    The factors are multiplied into ``x`` one after the other. Without the shifts, a
    layer-wide offset of the log-scales (``u_a`` and ``u_b`` both near 40, whose product
    ``e^{u_a - u_b}`` is moderate) would overflow or underflow the intermediate
    ``x * e^{u_a}`` in float32 although the result is representable. With every factor
    after the first centred on its own range, the intermediate differs from the result by
    at most ``e^{spread / 2}`` of the later groups' log-scales.
    """
    exps = [a.direction * log_scales[a.group].to(dtype=x.dtype, device=x.device) for a in axes]
    if len(exps) < 2:
        return exps
    centres = []
    for e in exps[1:]:
        # a constant shift: no gradient is meant to flow through it (it cancels exactly)
        lo, hi = torch.aminmax(e.detach(), dim=-1, keepdim=True)
        centres.append(0.5 * (lo + hi))
    first = exps[0] + sum(centres)
    return [first] + [e - c for e, c in zip(exps[1:], centres)]


def scale_site(
    x: torch.Tensor,
    nd: int,
    axes: list[SiteAxis],
    log_scales: Mapping[str, torch.Tensor],
    out: torch.Tensor | None = None,
) -> torch.Tensor:
    """``x`` times ``exp(direction * u_group)`` along each axis (into ``out`` if given).

    The factors are exponentiated at their own (small) size and multiplied in one
    after the other, so no tensor of the size of ``x`` is exponentiated; the factors
    are shifted so that no intermediate product leaves the dtype's range where the
    result does not (see :func:`_centered_exponents`).
    """
    if any(a.length is not None for a in axes):
        return _scale_pieces(x, nd, axes, log_scales, out)
    nb = x.dim() - nd
    split, pos = split_event(x.shape[nb:], axes)
    ne = len(split)
    xs = x.reshape(tuple(x.shape[:nb]) + tuple(split))
    factors = []
    for a, e in zip(axes, _centered_exponents(axes, log_scales, x)):
        p = pos[a.axis]
        shape = tuple(e.shape[:-1]) + (1,) * p + (e.shape[-1],) + (1,) * (ne - p - 1)
        factors.append(torch.exp(e).reshape(shape))
    target = None if out is None else out.view(tuple(out.shape[: out.dim() - nd]) + tuple(split))
    if target is not None and broadcast_shapes(xs.shape, *(f.shape for f in factors)) == target.shape:
        res = torch.mul(xs, factors[0], out=target)
    else:
        res = xs * factors[0]
    for f in factors[1:]:  # ``res`` is a fresh tensor (or ``out``): scale it in place when shapes allow
        res = res.mul_(f) if broadcast_shapes(res.shape, f.shape) == res.shape else res * f
    if target is not None:
        if res is not target:
            target.copy_(res)
        return out
    return res.reshape(tuple(res.shape[: res.dim() - ne]) + tuple(x.shape[nb:]))


def _scale_pieces(
    x: torch.Tensor,
    nd: int,
    axes: list[SiteAxis],
    log_scales: Mapping[str, torch.Tensor],
    out: torch.Tensor | None,
) -> torch.Tensor:
    """:func:`scale_site` on a site some groups act on through axis slices: each block on
    which every scaled axis is whole (:func:`~._axes.pieces`) is scaled on its own and
    written into its place; blocks no group scales are copied."""
    parts = []
    for ranges, sub in pieces(x.shape[x.dim() - nd :], axes):
        part = narrow(x, nd, ranges)
        parts.append((ranges, scale_site(part, nd, sub, log_scales) if sub else part))
    if out is None:
        batch = broadcast_shapes(*(p.shape[: p.dim() - nd] for _, p in parts))
        out = torch.empty(tuple(batch) + tuple(x.shape[x.dim() - nd :]), dtype=x.dtype, device=x.device)
    for ranges, p in parts:
        narrow(out, nd, ranges).copy_(p)
    return out


def rescale(
    params: Mapping[str, torch.Tensor], spec: PermutationSpec, log_scales: Mapping[str, torch.Tensor]
) -> dict[str, torch.Tensor]:
    """Rescale hidden neurons by ``exp(log_scales)``, keeping a ReLU network's function.

    Every incoming axis of group ``g`` (its layer's weight rows, its bias) is multiplied
    by ``exp(u_g)`` and every outgoing axis (the next layer's columns, blocks of
    flattened columns after a conv) divided by it; conv channels are scaled as a whole.
    A group acting on a slice of an axis (the channels a concatenation takes from one
    branch) scales only its slice; passive axes (rows before a BatchNorm) are never scaled.

    **Differentiable** in ``params`` and ``log_scales`` (a plain tensor map: tensors
    that require grad keep their graph).

    Parameters
    ----------
    params : mapping ``site -> Tensor (*batch_w, *site_shape)``
        Sites no listed group touches pass through unchanged.
    spec : PermutationSpec
    log_scales : mapping ``group -> Tensor (*batch_u, n)``
        Log-scales ``u`` of some or all groups with a scaling symmetry
        (:attr:`NeuronGroup.scalable`, ``activation_symmetry="scale"``); groups left out
        are not rescaled.

    Returns
    -------
    dict ``site -> Tensor (*broadcast(batch_w, batch_u), *site_shape)``
        In the dtype of each site. Entries too small for the dtype round to zero as in
        any floating-point product; a layer-wide offset of the log-scales does not make
        an intermediate product overflow (the factors are centred).

    Raises
    ------
    SpecError
        If ``log_scales`` names a group whose activation is not positively
        homogeneous (not :attr:`NeuronGroup.scalable`: tanh, GELU, or a group
        followed by a norm layer), an unknown group, or has the wrong size.
    ValueError
        If a tensor is on the meta device or the tensors are on different devices, or
        if a rescaled entry overflows the dtype (e.g. float32 weights of ``1e30`` times
        ``e^{20}``) where the input was finite.

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
    table = site_axes(spec, list(log_scales))
    check_mapping("params", params)
    check_devices(
        {**{f"params[{s!r}]": params.get(s) for s in table}, **{f"log_scales[{k!r}]": u for k, u in log_scales.items()}}
    )
    for k, u in log_scales.items():
        check_finite(f"log_scales[{k!r}]", u)
    # Rescaling multiplies by exp(u): integer weights would be silently turned into floats.
    batch = check_params(params, spec, list(table), finite=False)
    for k, u in log_scales.items():
        try:
            broadcast_shapes(batch, u.shape[:-1])
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
            have = x.shape[x.dim() - nd + a.axis]
            if (a.length is None and have != n * a.inner) or (a.length is not None and a.start + a.length > have):
                want = f"length {n * a.inner}" if a.length is None else f"at least {a.start + a.length} entries"
                raise SpecError(
                    f"params[{site!r}] has shape {tuple(x.shape)}: axis {a.axis - nd} should have {want} for "
                    f"group {a.group!r}"
                )
        out[site] = scale_site(x, nd, axes, log_scales)
        _check_no_overflow(site, x, out[site])
    return out


def _check_no_overflow(site: str, x: torch.Tensor, y: torch.Tensor) -> None:
    """Raise if rescaling turned finite entries of ``x`` into Inf/NaN (dtype overflow)."""
    if not y.numel():
        return
    lo, hi = torch.aminmax(y.detach().reshape(-1))
    if math.isfinite(lo) and math.isfinite(hi):
        return
    bad = ~torch.isfinite(y.detach())
    if bool((bad & torch.isfinite(x.detach()).expand_as(bad)).any()):
        raise ValueError(
            f"rescaling params[{site!r}] overflows {y.dtype} (largest |entry| {x.detach().abs().max().item():.3g} "
            f"times exp(u)): the rescaled weights are not representable; use smaller log-scales or float64 params"
        )


def _is_bias(spec: PermutationSpec, site: str) -> bool:
    """A bias: a site with one event dim (a vector over one layer's neurons) whose name
    does not end in ``"weight"`` (a norm layer's scale ``"bn.weight"`` is a weight, as in
    Laurent et al.'s code, which counts batch-norm weights but no biases)."""
    return spec.action(site).event_ndim == 1 and not site.endswith("weight")


def mass_sites(spec: PermutationSpec, include_biases: bool = False) -> tuple[str, ...]:
    """The sites whose squared entries make up the mass by default.

    Every site a ``"scale"`` group rescales except the biases: weight matrices, conv
    kernels and norm-layer scales (Laurent et al.'s mass counts the weights only). A bias
    is a one-dimensional site whose name does not end in ``"weight"`` (``fc1.bias``,
    ``0.bias``). With ``include_biases=True`` the biases are counted too. Sites a group
    acts on only *passively* (a stem conv whose output goes straight into a BatchNorm,
    running statistics) are not rescaled and so not counted by default.
    """
    if not isinstance(include_biases, bool):
        raise TypeError(f"include_biases must be a bool, got {include_biases!r}")
    sites = site_axes(spec, groups_with(spec, "scale"))
    return tuple(s for s in sites if include_biases or not _is_bias(spec, s))


def mass_of_site(x: torch.Tensor, nd: int) -> torch.Tensor:
    """``sum x**2`` over the last ``nd`` dims in float64, without overflow or underflow.

    float32 squares always fit float64. A float64 site whose largest entry is beyond
    ``2**±450`` is first scaled by a power of two (exact), and the sum scaled back.
    """
    dims = list(range(x.dim() - nd, x.dim()))
    if x.dtype != torch.float64:
        return torch.linalg.vector_norm(x, dim=dims, dtype=torch.float64).square() if nd else x.double().square()
    if not x.numel():
        return torch.linalg.vector_norm(x, dim=dims).square() if nd else x.square()
    with torch.no_grad():
        big = x.abs().amax(dim=dims, keepdim=True) if nd else x.abs()
    if bool(((big == 0) | ((big > 2.0**-450) & (big < 2.0**450))).all()):
        return torch.linalg.vector_norm(x, dim=dims).square() if nd else x.square()
    e = torch.frexp(big).exponent.masked_fill(big == 0, 0)
    m = torch.linalg.vector_norm(torch.ldexp(x, -e), dim=dims).square() if nd else torch.ldexp(x, -e).square()
    return torch.ldexp(m, 2 * (e.reshape(m.shape) if nd else e))


def mass(
    params: Mapping[str, torch.Tensor],
    spec: PermutationSpec,
    sites: Sequence[str] | None = None,
    *,
    include_biases: bool = False,
) -> torch.Tensor:
    """Mass of a network: the sum of its squared weights (Laurent et al., ICLR 2024).

    .. math:: M(w) = \\sum_{s \\in \\text{sites}} \\lVert w_s \\rVert_2^2

    **Differentiable** in ``params``. Computed and returned in float64 whatever the
    params' dtype: float32 weights around ``1e20`` have a mass beyond float32's range,
    weights around ``1e-25`` one below it.

    Parameters
    ----------
    params : mapping ``site -> Tensor (*batch, *site_shape)``
    spec : PermutationSpec
    sites : sequence of str, optional
        Sites to sum over. Default :func:`mass_sites`: every weight a ``"scale"``
        group rescales (weight matrices, conv kernels, norm-layer scales; not the
        biases, which rescaling moves but Laurent et al. do not count).
    include_biases : bool
        With the default ``sites``, also count the hidden biases (the one-dimensional
        sites a ``"scale"`` group rescales whose name does not end in ``"weight"``; the
        output bias, which no rescaling changes, is never included by default). Not
        allowed with ``sites``.

    Returns
    -------
    Tensor ``(*batch,)``, float64

    Raises
    ------
    ValueError
        If the mass is beyond float64's range (float64 weights beyond about
        ``1e150`` or below ``1e-150`` in magnitude), if a tensor is on the meta device,
        or the tensors are on different devices.
    """
    check_spec(spec)
    check_mapping("params", params)
    if isinstance(sites, str):
        raise TypeError(f"sites must be a sequence of site names, got {sites!r}")
    if sites is not None and include_biases:
        raise ValueError("pass either sites or include_biases=True, not both (sites lists the counted sites itself)")
    sites = mass_sites(spec, include_biases) if sites is None else tuple(sites)
    if not sites:
        raise SpecError("no sites to measure: the spec has no group with activation_symmetry='scale'")
    for site in sites:
        if site not in params:
            raise SpecError(f"site {site!r} is missing from params (have {sorted(params)})")
    check_devices({f"params[{s!r}]": params[s] for s in sites})
    total, nds = None, {}
    for site in sites:
        x = params[site]
        check_tensor(f"params[{site!r}]", x, floating=True)
        nd = spec.action(site).event_ndim if site in spec.sites else None
        if nd is None:
            if spec.shapes is None or site not in spec.shapes:
                raise SpecError(f"the spec does not know the shape of site {site!r}; use spec.with_shapes(...)")
            nd = len(spec.shapes[site])
        nds[site] = nd
        m = mass_of_site(x, nd)
        total = m if total is None else total + m
    _check_mass_range(total, {s: (params[s], nd) for s, nd in nds.items()})
    return total


def _check_mass_range(total: torch.Tensor, sites: Mapping[str, tuple[torch.Tensor, int]]) -> None:
    """Raise if the float64 mass overflowed, or fell below float64's normal range for a
    network whose weights are not all zero (then it is not representable)."""
    t = total.detach()
    if bool(torch.isinf(t).any()):
        raise ValueError("the mass of params overflows float64 (weights beyond about 1e150 in magnitude)")
    small = t < torch.finfo(torch.float64).tiny
    if not bool(small.any()):
        return
    for x, nd in sites.values():
        nonzero = x.detach().ne(0)
        if nd:
            nonzero = nonzero.flatten(x.dim() - nd).any(-1)
        if bool((small & nonzero).any()):
            raise ValueError(
                "the mass of params underflows float64 (weights below about 1e-150 in magnitude): it is not "
                "representable"
            )
