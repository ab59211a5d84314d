"""The groups of an ArviZ object beyond its posterior (which ``as_posterior`` reads).

A ``DataTree`` (also one loaded from netCDF or zarr), a legacy ``InferenceData`` or an
xarray ``Dataset`` is recognized by the package its class comes from; the
``log_likelihood``, ``posterior_predictive`` and ``observed_data`` groups are read here so
that a tree read back and re-aligned keeps them (they are invariant under the symmetry
group: a relabelled network computes the same function).
"""

from __future__ import annotations

from typing import Any

import torch

__all__ = ["SAMPLE_GROUPS", "chain_groups", "group", "is_arviz", "observations"]

SAMPLE_GROUPS = ("log_likelihood", "posterior_predictive")


def is_arviz(x: Any) -> bool:
    """An xarray ``DataTree``/``Dataset`` or an ArviZ ``InferenceData``."""
    return type(x).__module__.split(".")[0] in ("xarray", "arviz", "arviz_base", "datatree")


def group(x: Any, name: str) -> Any:
    """Group ``name`` of a DataTree / InferenceData as a Dataset, or None (a bare Dataset
    is a posterior and has no other group)."""
    if hasattr(x, "data_vars") and not hasattr(x, "children"):
        return x if name == "posterior" else None
    if hasattr(x, "children"):
        if name not in x.children:
            return None
        return x[name].to_dataset()
    return getattr(x, name, None)


def _tensor(var: Any) -> torch.Tensor:
    return torch.as_tensor(var.values)


def chain_groups(x: Any) -> dict[str, dict[str, torch.Tensor]]:
    """``group -> variable -> Tensor (chain, draw, ...)`` of the tree's sample groups."""
    out = {}
    for name in SAMPLE_GROUPS:
        ds = group(x, name)
        if ds is not None and len(ds.data_vars):
            out[name] = {str(k): _tensor(ds[k].transpose("chain", "draw", ...)) for k in ds.data_vars}
    return out


def observations(x: Any) -> dict[str, Any]:
    """``{"observed": site -> Tensor, "obs_dims": site -> dim names}`` of a tree (empty
    when it has none). The dims of an observed site are those of its ``observed_data``
    variable, else the non-sample dims of its ``log_likelihood``/``posterior_predictive``."""
    if not is_arviz(x):
        return {}
    dims: dict[str, tuple[str, ...]] = {}
    for name in SAMPLE_GROUPS:
        ds = group(x, name)
        for k in ds.data_vars if ds is not None else ():
            own = tuple(str(d) for d in ds[k].dims if d not in ("chain", "draw"))
            if len(own) >= len(dims.get(str(k), ())):  # posterior_predictive has the event dims too
                dims[str(k)] = own
    observed = {}
    ds = group(x, "observed_data")
    for k in ds.data_vars if ds is not None else ():
        observed[str(k)] = _tensor(ds[k])
        dims[str(k)] = tuple(str(d) for d in ds[k].dims)
    return {"observed": observed, "obs_dims": dims} if observed or dims else {}
