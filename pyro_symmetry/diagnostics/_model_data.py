"""What the model says about each draw, for ArviZ's ``sample_stats.lp``, ``log_likelihood``,
``observed_data`` and ``posterior_predictive`` groups.

Any Pyro model works (a ``PyroModule`` with ``nn.Linear`` layers, a functional model, extra
global latents such as a learned noise scale): the model runs with its latent sites
conditioned on each draw (:func:`~pyro_symmetry.posteriors.predict` for the pointwise
log-likelihood; a trace per draw, or one vectorized trace checked against it, for the log
joint). Pointwise dims are named after the observed site's plates (``"data"``), its other
dims ``"{site}_dim{k}"``.
"""

from __future__ import annotations

import copy
from collections.abc import Mapping
from typing import Any, NamedTuple

import pyro.poutine as poutine
import torch
from pyro.poutine.util import site_is_subsample

from .._state import isolated
from ..posteriors import predict
from ._run_reading import sum_per_draw

__all__ = ["ModelData", "model_data", "obs_dims", "split_data"]

RESERVED = ("chain", "draw")


class ModelData(NamedTuple):
    """Per-draw model quantities of ``S`` draws (flattened chains).

    ``log_p`` ``(S,)`` float64 log joint ``log p(data, w)``; ``log_likelihood`` obs site ->
    ``(S, *batch)`` pointwise; ``observed`` obs site -> value; ``obs_dims`` obs site -> dim
    names of its value; ``posterior_predictive`` obs site -> ``(S, *value shape)`` or None.
    """

    log_p: torch.Tensor
    log_likelihood: dict[str, torch.Tensor]
    observed: dict[str, torch.Tensor]
    obs_dims: dict[str, tuple[str, ...]]
    posterior_predictive: dict[str, torch.Tensor] | None


def _float64(x: Any) -> Any:
    """Floating-point tensors (also in a mapping) as float64; anything else as it is."""
    if isinstance(x, Mapping):
        return {k: _float64(v) for k, v in x.items()}
    if torch.is_tensor(x) and x.is_floating_point() and x.dtype != torch.float64:
        return x.double()
    return x


def _float64_model(model: Any) -> Any:
    """A float64 copy (``.double()``: parameters, buffers, and the priors of models whose priors
    follow ``.to(dtype)``) of an ``nn.Module`` model; any other model as it is."""
    if not isinstance(model, torch.nn.Module):
        return model
    try:
        return copy.deepcopy(model).double()
    except Exception:  # noqa: BLE001 - a module that cannot be copied: evaluated in its own dtype
        return model


def split_data(data: Any) -> tuple[tuple, dict]:
    """``data`` as the model's ``(args, kwargs)``: a tuple of args, a mapping of kwargs, or one arg."""
    if data is None:
        return (), {}
    if isinstance(data, Mapping):
        return (), dict(data)
    if isinstance(data, (tuple, list)):
        return tuple(data), {}
    return (data,), {}


def _trace(model: Any, values: Mapping[str, torch.Tensor], args: tuple, kwargs: dict) -> Any:
    return poutine.trace(poutine.condition(model, data=dict(values))).get_trace(*args, **kwargs)


def _observed_sites(trace: Any) -> dict[str, Any]:
    return {
        n: s for n, s in trace.nodes.items() if s["type"] == "sample" and s["is_observed"] and not site_is_subsample(s)
    }


def obs_dims(trace: Any) -> dict[str, tuple[str, ...]]:
    """Dim names of every observed site's value: a batch dim is named after the plate that
    indexes it (``"data"``), any other dim ``"{site}_dim{k}"``."""
    out = {}
    for name, site in _observed_sites(trace).items():
        value = site["value"]
        nb = value.dim() - site["fn"].event_dim
        frames = {f.dim: f.name for f in site["cond_indep_stack"] if f.vectorized and f.dim is not None}
        dims = []
        for j in range(value.dim()):
            plate = frames.get(j - nb) if j < nb else None
            dims.append(f"{name}_{plate}" if plate in RESERVED else (plate or f"{name}_dim{j}"))
        out[name] = tuple(dims)
    return out


def _log_joint_looped(model: Any, values: Mapping[str, torch.Tensor], num: int, args: tuple, kwargs: dict, progress):
    steps = range(num)
    if progress:
        from tqdm.auto import tqdm

        steps = tqdm(steps, desc="log joint (lp)", leave=False)
    out = [float(_trace(model, {k: v[s] for k, v in values.items()}, args, kwargs).log_prob_sum()) for s in steps]
    return torch.tensor(out, dtype=torch.float64)


def _log_joint_vectorized(model: Any, values: Mapping[str, torch.Tensor], num: int, args: tuple, kwargs: dict):
    first = _trace(model, {k: v[0] for k, v in values.items()}, args, kwargs)
    tr = predict.trace_over_draws(model, values, num, args, kwargs, first)
    return sum_per_draw(tr, num)


def log_joint(model: Any, values: Mapping[str, torch.Tensor], args: tuple, kwargs: dict, progress: bool = False):
    """``(S,)`` float64 ``log p(data, w_s)`` (scaled log-probs of every sample site): one
    vectorized trace when the model broadcasts over draws and agrees with one trace per
    draw on the first two, else one trace per draw."""
    num = next(iter(values.values())).shape[0]
    if num > 1:
        try:
            out = _log_joint_vectorized(model, values, num, args, kwargs)
            check = _log_joint_looped(model, {k: v[:2] for k, v in values.items()}, 2, args, kwargs, False)
            if torch.allclose(out[:2], check, rtol=1e-5, atol=1e-4):
                return out
        except Exception:  # noqa: BLE001 - a model that does not broadcast over draws: one trace per draw
            pass
    return _log_joint_looped(model, values, num, args, kwargs, progress)


def _posterior_predictive(
    model: Any, values: Mapping, num: int, args: tuple, kwargs: dict, observed: tuple[str, ...], progress: bool
) -> dict[str, torch.Tensor]:
    """``obs site -> (S, *value shape)``: each observed site drawn from its distribution at each draw."""
    steps = range(num)
    if progress:
        from tqdm.auto import tqdm

        steps = tqdm(steps, desc="posterior predictive", leave=False)
    out: dict[str, list] = {}
    for s in steps:
        trace = _trace(model, {k: v[s] for k, v in values.items()}, args, kwargs)
        for name in observed:
            out.setdefault(name, []).append(trace.nodes[name]["fn"].sample())
    return {k: torch.stack(v) for k, v in out.items()}


def model_data(
    model: Any,
    values: Mapping[str, torch.Tensor],
    args: tuple,
    kwargs: dict,
    *,
    posterior_predictive: bool = False,
    seed: int = 0,
    progress: bool = False,
) -> ModelData:
    """The model's per-draw quantities at ``values`` ``site -> (S, *shape)`` (every latent site
    of the model among them; a missing one raises :class:`SpecError` naming it).

    The model is evaluated in float64 (draws and floating-point data promoted) when it runs
    that way, else in its own dtype: a float32 log-likelihood of a confident prediction is
    exactly 0 at every draw (``log(1 - 1e-8)`` rounds to 0), and PSIS-LOO cannot fit a Pareto
    tail to identical values (``arviz_stats.loo`` raises "All tail values are the same").
    """
    wide = _float64(values), tuple(_float64(a) for a in args), {k: _float64(v) for k, v in kwargs.items()}
    model64 = _float64_model(model)
    try:
        pred = predict(model64, wide[0], *wide[1], progress=progress, **wide[2])
        model, values, args, kwargs = model64, *wide
    except Exception:  # noqa: BLE001 - a model that does not run in float64: its own dtype
        pred = predict(model, values, *args, progress=progress, **kwargs)
    latents = {k: v for k, v in values.items()}
    with isolated(), torch.no_grad():
        torch.manual_seed(seed)
        first = _trace(model, {k: v[0] for k, v in latents.items()}, args, kwargs)
        # (a conditioned site is marked observed in the trace: the model's own observations are pred's)
        latents = {k: v for k, v in latents.items() if k in first.nodes and k not in pred.observed}
        lp = log_joint(model, latents, args, kwargs, progress)
        num = lp.shape[0]
        pp = None
        if posterior_predictive:
            pp = _posterior_predictive(model, latents, num, args, kwargs, tuple(pred.observed), progress)
        dims = {k: d for k, d in obs_dims(first).items() if k in pred.observed}
    lls = {}
    for name, ll in pred.log_likelihood.items():
        value_dims = dims[name]
        nb = ll.dim() - 1
        lls[name] = ll
        if nb > len(value_dims) or tuple(ll.shape[1:]) != tuple(pred.observed[name].shape[:nb]):
            dims[name] = tuple(f"{name}_dim{j}" for j in range(max(nb, pred.observed[name].dim())))
    return ModelData(lp, lls, dict(pred.observed), dims, pp)
