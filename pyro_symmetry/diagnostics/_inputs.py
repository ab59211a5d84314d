"""Draws from whatever a diagnostics function is given: tensors and sample dicts as they are;
a :class:`~pyro_symmetry.diagnostics.RunDraws`, an ArviZ ``DataTree`` (also loaded from
netCDF/zarr), a legacy ``InferenceData``, an xarray ``Dataset``, a Pyro ``MCMC`` or anything
else :func:`~pyro_symmetry.as_posterior` reads as draws through that one reader."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch

from ..posteriors import as_posterior
from ._trees import is_arviz

__all__ = ["chain_draws", "sample_set"]


def chain_draws(x: Any, name: str) -> dict[str, torch.Tensor]:
    """``site -> (chain, draw, *shape)``: a mapping as given, else the draws of ``x``."""
    if isinstance(x, Mapping) and not is_arviz(x):  # (a DataTree and a Dataset are mappings too)
        return dict(x)
    samples = getattr(x, "samples", None)
    if isinstance(samples, Mapping) and hasattr(x, "num_chains"):  # RunDraws
        return dict(samples)
    post = as_posterior(x, name=name)
    if post.form != "draws":
        raise TypeError(
            f"{name} is a {post.form} posterior, not a set of draws: pass draws (an ArviZ tree, an MCMC, "
            "RunDraws, or a mapping site -> (chain, draw, *shape)), e.g. collect_draws(runs)"
        )
    return post.draws()


def sample_set(x: Any, name: str) -> Any:
    """A tensor or a sample dict ``site -> (n, *shape)`` as given; draws of ``x`` with chains
    pooled (``n = chain * draw``) otherwise."""
    if torch.is_tensor(x) or (isinstance(x, Mapping) and not is_arviz(x)):
        return x
    return {k: v.reshape((-1, *v.shape[2:])) for k, v in chain_draws(x, name).items()}
