"""Read a posterior in any of the forms users hold it: fitted autoguides,
mappings of ``(loc, scale)`` pairs, mappings of Normal distributions, or point
estimates. Every higher layer (alignment, diagnostics) goes through here.
"""

from __future__ import annotations

import contextlib
from collections.abc import Mapping
from typing import Any

import torch

from ._validation import check_devices, check_finite, check_same_device_dtype
from .groups import FlatLayout, SpecError

__all__ = ["gaussian_params", "is_gaussian_mapping", "point_params", "posterior_kind", "read"]


def _autoguides():
    from pyro.infer import autoguide

    return autoguide


def _check_fitted(guide: Any, name: str = "the guide") -> None:
    if getattr(guide, "prototype_trace", None) is None:
        raise SpecError(
            f"{name} ({type(guide).__name__}) is not fitted: it has not traced the model yet "
            "(run at least one SVI step or call the guide once)"
        )


def posterior_kind(q: Any, name: str = "the posterior") -> str:
    """``"guide"``, ``"gaussian"`` (mapping of ``(loc, scale)`` / Normal) or ``"point"``;
    errors name the posterior as ``name``."""
    if isinstance(q, torch.nn.Module) and hasattr(q, "prototype_trace"):
        return "guide"
    if isinstance(q, Mapping):
        if not q:
            raise SpecError(f"{name} is an empty mapping: it needs at least one site")
        if is_gaussian_mapping(q):
            return "gaussian"
        if all(torch.is_tensor(v) for v in q.values()):
            return "point"
        points = [k for k, v in q.items() if torch.is_tensor(v)]
        bad = [k for k, v in q.items() if k not in points and not is_gaussian_mapping({k: v})]
        if bad:
            raise SpecError(
                f"site {bad[0]!r} of {name} is a {type(q[bad[0]]).__name__}: neither a tensor, a (loc, scale) "
                "pair of tensors nor a Normal distribution"
            )
        raise SpecError(
            f"{name} mixes point tensors (sites {points}) with (loc, scale) pairs; use one form for all sites"
        )
    raise SpecError(
        f"{name} must be a fitted AutoNormal/AutoDiagonalNormal-family guide, a mapping "
        f"site -> (loc, scale), or a mapping site -> tensor; got {type(q).__name__}"
    )


def is_gaussian_mapping(q: Mapping[str, Any]) -> bool:
    import torch.distributions as td

    def one(v: Any) -> bool:
        if isinstance(v, (tuple, list)) and len(v) == 2 and all(torch.is_tensor(t) for t in v):
            return True
        base = v
        while isinstance(base, td.Independent):
            base = base.base_dist
        return isinstance(base, td.Normal)

    return bool(q) and all(one(v) for v in q.values())


def gaussian_params(q: Any, *, detach: bool = True) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """``site -> (loc, scale)`` (marginal standard deviations) of a posterior.

    Accepts ``AutoNormal`` and the ``AutoContinuous`` family (``AutoDiagonalNormal``;
    for ``AutoLowRankMultivariateNormal``/``AutoMultivariateNormal`` the marginal
    standard deviations), mappings of ``(loc, scale)`` pairs or of (Independent)
    Normal distributions. Values are detached unless ``detach=False`` (then a guide's
    live parameters and tensors that require grad keep their graph). All tensors must
    hold values on one device: a meta-device or mixed-device posterior raises a
    ``ValueError`` naming the site.
    """
    kind, loc, scale = read(q, detach=detach)
    if kind == "point":
        raise SpecError("a Gaussian posterior is needed (loc and scale) but got a mapping of point tensors")
    return {k: (loc[k], scale[k]) for k in loc}


def point_params(q: Any, *, detach: bool = True) -> dict[str, torch.Tensor]:
    """``site -> tensor`` point values: the posterior means of a guide or of a
    Gaussian mapping, or the tensors of a point mapping themselves (detached unless
    ``detach=False``; on one device, none on the meta device)."""
    return read(q, detach=detach)[1]


def read(
    q: Any, name: str | None = None, *, detach: bool = True
) -> tuple[str, dict[str, torch.Tensor], dict[str, torch.Tensor] | None]:
    """``(form, means or points, standard deviations or None)`` of any posterior form.

    ``form`` is ``"point"`` or ``"gaussian"``. Every tensor is checked to hold values
    (not on the meta device), to share one device with the others, and to be finite;
    error messages name ``name[site]`` (or ``loc[site]``/``params[site]`` without a
    name). With ``detach`` (the default) the values carry no autograd graph, so that
    tensors that require grad (``dict(net.named_parameters())``, a guide's live
    parameters) are read as plain values.
    """
    who = "the posterior" if name is None else name
    kind = posterior_kind(q, who)
    if kind == "point":
        label = (lambda k: f"params[{k!r}]") if name is None else (lambda k: f"{name}[{k!r}]")
        check_devices({label(k): v for k, v in q.items()})
        return "point", {k: check_finite(label(k), v.detach() if detach else v) for k, v in q.items()}, None
    out = _gaussian(q, detach, who)
    if name is None:
        labels = {k: (f"loc[{k!r}]", f"scale[{k!r}]") for k in out}
    else:
        labels = {k: (f"{name}[{k!r}] loc", f"{name}[{k!r}] scale") for k in out}
    check_devices({lab: t for k, pair in out.items() for lab, t in zip(labels[k], pair)})
    for k, (loc, scale) in out.items():
        check_finite(labels[k][0], loc)
        check_finite(labels[k][1], scale)
        if not (loc.is_floating_point() and scale.is_floating_point()):
            raise TypeError(
                f"site {k!r} of {who}: loc and scale must be floating-point, got {loc.dtype} and {scale.dtype}"
            )
        check_same_device_dtype({labels[k][0]: loc, labels[k][1]: scale})
        if loc.shape != scale.shape:
            raise SpecError(f"site {k!r} of {who}: loc has shape {tuple(loc.shape)} but scale has {tuple(scale.shape)}")
        if (scale < 0).any():
            raise SpecError(f"site {k!r} of {who}: scale has negative entries")
    return "gaussian", {k: v[0] for k, v in out.items()}, {k: v[1] for k, v in out.items()}


def _gaussian(q: Any, detach: bool, who: str) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """``site -> (loc, scale)`` of a guide or of a Gaussian mapping, unchecked."""
    if posterior_kind(q, who) != "guide":
        out = {}
        for k, v in q.items():
            out[k] = tuple(v) if isinstance(v, (tuple, list)) else (v.mean, v.stddev)
    else:
        out = _guide_gaussian(q, detach, who)
    # A guide's unconstrained parameter is returned as it is (a leaf that requires grad,
    # even under no_grad): detach explicitly.
    return {k: (loc.detach(), scale.detach()) for k, (loc, scale) in out.items()} if detach else out


def _guide_gaussian(q: Any, detach: bool, who: str) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    _check_fitted(q, who)
    ag = _autoguides()
    with torch.no_grad() if detach else contextlib.nullcontext():
        if isinstance(q, ag.AutoNormal):
            return {name: q._get_loc_and_scale(name) for name in q.prototype_trace.nodes if name in q._event_dims}
        if isinstance(q, ag.AutoContinuous):
            try:
                loc, std = q._loc_scale()  # marginal standard deviations
            except NotImplementedError:
                raise SpecError(f"{who} ({type(q).__name__}) has no Gaussian (loc, scale) to read") from None
            layout = FlatLayout.from_guide(q)
            locs, stds = layout.from_flat(loc), layout.from_flat(std)
            return {k: (locs[k], stds[k]) for k in layout.shapes}
    raise SpecError(f"cannot read a Gaussian posterior from {who}, a {type(q).__name__} guide")
