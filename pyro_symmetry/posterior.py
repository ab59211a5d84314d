"""Read a posterior in any of the forms users hold it: fitted autoguides,
mappings of ``(loc, scale)`` pairs, mappings of Normal distributions, or point
estimates. Every higher layer (alignment, diagnostics) goes through here.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch

from ._validation import check_finite, check_same_device_dtype
from .groups import FlatLayout, SpecError

__all__ = ["gaussian_params", "is_gaussian_mapping", "point_params", "posterior_kind"]


def _autoguides():
    from pyro.infer import autoguide

    return autoguide


def _check_fitted(guide: Any) -> None:
    if getattr(guide, "prototype_trace", None) is None:
        raise SpecError(
            f"{type(guide).__name__} is not fitted: it has not traced the model yet "
            "(run at least one SVI step or call the guide once)"
        )


def _check_finite(name: str, t: torch.Tensor, what: str) -> torch.Tensor:
    return check_finite(f"{what}[{name!r}]", t)


def posterior_kind(q: Any) -> str:
    """``"guide"``, ``"gaussian"`` (mapping of ``(loc, scale)`` / Normal) or ``"point"``."""
    if isinstance(q, torch.nn.Module) and hasattr(q, "prototype_trace"):
        return "guide"
    if isinstance(q, Mapping):
        if not q:
            raise SpecError("the posterior is an empty mapping: it needs at least one site")
        if is_gaussian_mapping(q):
            return "gaussian"
        if all(torch.is_tensor(v) for v in q.values()):
            return "point"
        points = [k for k, v in q.items() if torch.is_tensor(v)]
        bad = [k for k, v in q.items() if k not in points and not is_gaussian_mapping({k: v})]
        if bad:
            raise SpecError(
                f"site {bad[0]!r} of the posterior is a {type(q[bad[0]]).__name__}: neither a tensor, a (loc, scale) "
                "pair of tensors nor a Normal distribution"
            )
        raise SpecError(
            f"the posterior mixes point tensors (sites {points}) with (loc, scale) pairs; use one form for all sites"
        )
    raise SpecError(
        "a posterior must be a fitted AutoNormal/AutoDiagonalNormal-family guide, a mapping "
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


def gaussian_params(q: Any) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """``site -> (loc, scale)`` (marginal standard deviations) of a posterior.

    Accepts ``AutoNormal`` and the ``AutoContinuous`` family (``AutoDiagonalNormal``;
    for ``AutoLowRankMultivariateNormal``/``AutoMultivariateNormal`` the marginal
    standard deviations), mappings of ``(loc, scale)`` pairs or of (Independent)
    Normal distributions. Values are detached.
    """
    kind = posterior_kind(q)
    if kind == "point":
        raise SpecError("a Gaussian posterior is needed (loc and scale) but got a mapping of point tensors")
    out: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
    if kind == "guide":
        _check_fitted(q)
        ag = _autoguides()
        with torch.no_grad():
            if isinstance(q, ag.AutoNormal):
                for name in q.prototype_trace.nodes:
                    if name in q._event_dims:
                        loc, scale = q._get_loc_and_scale(name)
                        out[name] = (loc.detach(), scale.detach())
            elif isinstance(q, ag.AutoContinuous):
                try:
                    loc, std = q._loc_scale()  # marginal standard deviations
                except NotImplementedError:
                    raise SpecError(f"{type(q).__name__} has no Gaussian (loc, scale) to read") from None
                layout = FlatLayout.from_guide(q)
                locs, stds = layout.from_flat(loc.detach()), layout.from_flat(std.detach())
                out = {k: (locs[k], stds[k]) for k in layout.shapes}
            else:
                raise SpecError(f"cannot read a Gaussian posterior from a {type(q).__name__} guide")
    else:
        for k, v in q.items():
            if isinstance(v, (tuple, list)):
                loc, scale = v
            else:
                loc, scale = v.mean, v.stddev
            out[k] = (loc.detach(), scale.detach())
    for k, (loc, scale) in out.items():
        _check_finite(k, loc, "loc")
        _check_finite(k, scale, "scale")
        if not (loc.is_floating_point() and scale.is_floating_point()):
            raise TypeError(f"site {k!r}: loc and scale must be floating-point, got {loc.dtype} and {scale.dtype}")
        check_same_device_dtype({f"loc[{k!r}]": loc, f"scale[{k!r}]": scale})
        if loc.shape != scale.shape:
            raise SpecError(f"site {k!r}: loc has shape {tuple(loc.shape)} but scale has {tuple(scale.shape)}")
        if (scale < 0).any():
            raise SpecError(f"site {k!r}: scale has negative entries")
    return out


def point_params(q: Any) -> dict[str, torch.Tensor]:
    """``site -> tensor`` point values: the posterior means of a guide or of a
    Gaussian mapping, or the tensors of a point mapping themselves."""
    kind = posterior_kind(q)
    if kind == "point":
        return {k: _check_finite(k, v, "params") for k, v in q.items()}
    return {k: loc for k, (loc, _) in gaussian_params(q).items()}
