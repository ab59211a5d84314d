"""Reading posteriors for alignment: forms, methods, shapes, and how elements act on them."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch

from ..groups import PermutationSpec, SpecError, decode_signed
from ..posterior import gaussian_params, point_params, posterior_kind

__all__ = ["METHODS", "apply_gaussian", "bind_spec", "check_method", "read_posterior", "rest_distance", "unsigned"]

METHODS = ("wasserstein", "weights")


def sq_norm(x: torch.Tensor) -> torch.Tensor:
    """``||x_b||^2`` per leading index, accumulated in float64 without a float64 copy."""
    return torch.linalg.vector_norm(x.reshape(x.shape[0], -1), dim=-1, dtype=torch.float64).pow(2)


def read_posterior(q: Any, name: str) -> tuple[str, dict[str, torch.Tensor], dict[str, torch.Tensor] | None]:
    """``(form, means or points, standard deviations or None)`` of any posterior form."""
    try:
        kind = posterior_kind(q)
        if kind == "point":
            return "point", point_params(q), None
        gp = gaussian_params(q)
    except SpecError as e:
        raise SpecError(f"{name}: {e}") from None
    return "gaussian", {k: v[0] for k, v in gp.items()}, {k: v[1] for k, v in gp.items()}


def check_method(method: str, forms: Mapping[str, str]) -> None:
    if method not in METHODS:
        raise ValueError(f"method must be one of {METHODS}, got {method!r}")
    if method == "wasserstein":
        for name, form in forms.items():
            if form != "gaussian":
                raise ValueError(
                    f"method='wasserstein' needs Gaussian posteriors (loc, scale) but {name} is a mapping of point "
                    "tensors; use method='weights'"
                )


def bind_spec(spec: PermutationSpec, shapes: Mapping[str, tuple[int, ...]], signs: bool) -> PermutationSpec:
    """Check that every site of ``spec`` is present with a consistent shape; bind shapes."""
    if not isinstance(spec, PermutationSpec):
        raise TypeError(f"spec must be a PermutationSpec, got {type(spec).__name__}")
    missing = [s for s in spec.sites if s not in shapes]
    if missing:
        raise SpecError(f"sites {missing} of the spec are missing from the posterior (it has {sorted(shapes)})")
    if spec.shapes is None:
        spec = spec.with_shapes({s: tuple(shapes[s]) for s in spec.sites})
    else:
        for s in spec.sites:
            if tuple(shapes[s]) != spec.shapes[s]:
                raise SpecError(f"site {s!r} has shape {tuple(shapes[s])}, the spec expects {spec.shapes[s]}")
    return spec if signs else spec.without_signs()


def rest_distance(
    sites: list[str],
    ref_mu: Mapping[str, torch.Tensor],
    ref_sd: Mapping[str, torch.Tensor] | None,
    tgt_mu: Mapping[str, torch.Tensor],
    tgt_sd: Mapping[str, torch.Tensor] | None,
) -> torch.Tensor:
    """``(B,)`` float64 squared distance over sites no group moves (targets ``(B, *shape)``)."""
    total = torch.zeros(next(iter(tgt_mu.values())).shape[0] if tgt_mu else 1, dtype=torch.float64)
    for s in sites:
        if not ref_mu[s].is_floating_point():
            continue
        total = total + sq_norm(ref_mu[s] - tgt_mu[s]).cpu()
        if ref_sd is not None and tgt_sd is not None:
            total = total + sq_norm(ref_sd[s] - tgt_sd[s]).cpu()
    return total


def unsigned(perm: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The permutation part of a signed group element (how standard deviations move)."""
    return {k: decode_signed(p)[0] for k, p in perm.items()}


def apply_gaussian(
    spec: PermutationSpec, loc: Mapping[str, torch.Tensor], scale: Mapping[str, torch.Tensor], perm: Mapping
) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """``g.N(loc, scale^2)``: means move with signs, standard deviations without."""
    new_loc, new_scale = spec.apply(loc, perm), spec.apply(scale, unsigned(perm))
    return {k: (new_loc[k], new_scale[k]) for k in loc}
