"""Predictions of any Pyro model at given weight draws, with Pyro's own machinery.

Everything that needs predictions (loss barriers, interpolation curves, metrics, the
report, ArviZ's ``log_likelihood`` group) runs the user's model with its latent sites
conditioned on each draw (``poutine.condition``) and reads the observed sites' densities
from the trace. No ``functional(params, x)`` method is needed: a ``PyroModule`` with
``PyroModule[nn.Linear]`` layers, a functional model with ``(in, out)`` weights and a
model with extra global latents (a learned noise scale: it must be among the draws) all
work the same way.

The draws are evaluated in one vectorized trace when the model broadcasts over an outer
``pyro.plate`` of draws, and one draw at a time otherwise (``nn.Linear`` does not take a
batch of weights). The vectorized result is checked against the loop on the first two
draws before it is trusted, so a model that broadcasts silently wrong falls back to the
loop instead of returning wrong numbers.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import pyro
import pyro.poutine as poutine
import torch
from pyro.poutine.util import site_is_subsample

from .._state import isolated
from .._validation import check_mapping

__all__ = ["Predictions", "latent_sites", "plate_nesting", "predict", "trace_over_draws"]

DRAW_PLATE = "_ps_draws"


@dataclass(frozen=True)
class Predictions:
    """What a model predicts at ``S`` weight draws.

    Attributes
    ----------
    log_likelihood : dict ``obs site -> Tensor (S, *obs_batch)``
        Pointwise log-density of each observation (event dims summed, unscaled).
    observed : dict ``obs site -> Tensor (*obs_shape)``
        The observed values.
    mean : dict ``obs site -> Tensor (S, *obs_shape[, C])``
        Class probabilities ``(S, N, C)`` for categorical sites, else the predictive mean.
    categorical : dict ``obs site -> bool``
    vectorized : bool
        Whether one vectorized trace was used (else one trace per draw).
    """

    log_likelihood: dict[str, torch.Tensor]
    observed: dict[str, torch.Tensor]
    mean: dict[str, torch.Tensor]
    categorical: dict[str, bool]
    vectorized: bool = field(default=False)

    def __repr__(self) -> str:
        sites = ", ".join(f"{k}: {tuple(v.shape)}" for k, v in self.log_likelihood.items())
        return f"Predictions({sites}, vectorized={self.vectorized})"


def plate_nesting(trace: poutine.Trace) -> int:
    """How many batch dims (counted from the right) the vectorized plates of ``trace`` use."""
    dims = [
        -f.dim
        for s in trace.nodes.values()
        if s["type"] == "sample"
        for f in s["cond_indep_stack"]
        if f.vectorized and f.dim is not None
    ]
    return max(dims, default=0)


def _trace(model: Callable, data: Mapping[str, torch.Tensor], args: tuple, kwargs: dict) -> poutine.Trace:
    return poutine.trace(poutine.condition(model, data=dict(data))).get_trace(*args, **kwargs)


def latent_sites(model: Callable, *args: Any, **kwargs: Any) -> dict[str, Any]:
    """``site -> sample-site message`` of the model's latent sites (one prior trace, run in isolation)."""
    with isolated(), torch.no_grad():
        tr = poutine.trace(model).get_trace(*args, **kwargs)
    return {
        n: s for n, s in tr.nodes.items() if s["type"] == "sample" and not s["is_observed"] and not site_is_subsample(s)
    }


def _observed(trace: poutine.Trace, names: tuple[str, ...]) -> dict[str, Any]:
    return {n: trace.nodes[n] for n in names}


def _check_full_data(trace: poutine.Trace) -> None:
    for s in trace.nodes.values():
        if s["type"] != "sample" or not s["is_observed"]:
            continue
        for f in s["cond_indep_stack"]:
            if f.full_size is not None and f.full_size != f.size:
                raise ValueError(
                    f"plate {f.name!r} subsamples {f.size} of {f.full_size} data points: predictions and "
                    "log-likelihoods need the full data (call the model without subsampling / num_data)"
                )


def _read(site: dict) -> tuple[torch.Tensor, torch.Tensor, bool]:
    """``(pointwise log-lik, mean or class probabilities, categorical)`` of an observed site."""
    fn, value = site["fn"], site["value"]
    base = fn
    while isinstance(base, torch.distributions.Independent):
        base = base.base_dist
    categorical = isinstance(base, torch.distributions.Categorical)
    mean = base.probs if categorical else fn.mean
    return fn.log_prob(value).detach(), mean.detach(), categorical


def _to_draws(t: torch.Tensor, num: int, per_draw: torch.Size) -> torch.Tensor:
    """A vectorized result ``(num, 1.., *per_draw)`` (or broadcastable) as ``(num, *per_draw)``."""
    want = (num, *per_draw)
    if t.numel() == torch.Size(want).numel():
        return t.reshape(want)
    return t.expand(want)  # a result that does not depend on the draw; raises if it does not broadcast


def _looped(
    model: Callable, values: Mapping[str, torch.Tensor], num: int, args: tuple, kwargs: dict, obs: tuple, progress: bool
):
    lls: dict[str, list] = {}
    means: dict[str, list] = {}
    observed, categorical = {}, {}
    steps = range(num)
    if progress:
        from tqdm.auto import tqdm

        steps = tqdm(steps, desc="model predictions", leave=False)
    for s in steps:
        tr = _trace(model, {k: v[s] for k, v in values.items()}, args, kwargs)
        for name, site in _observed(tr, obs).items():
            lp, mean, cat = _read(site)
            lls.setdefault(name, []).append(lp)
            means.setdefault(name, []).append(mean)
            observed[name], categorical[name] = site["value"].detach(), cat
    return (
        {k: torch.stack(v) for k, v in lls.items()},
        {k: torch.stack(v) for k, v in means.items()},
        observed,
        categorical,
    )


def trace_over_draws(
    model: Callable, values: Mapping[str, torch.Tensor], num: int, args: tuple, kwargs: dict, first: poutine.Trace
) -> poutine.Trace:
    """One trace of ``model`` conditioned on all ``num`` draws at once, under a plate over draws.

    ``values[site]`` is ``(num, *site_value_shape)``; ``first`` is the trace at draw 0 (it
    gives each site's value shape and the model's plate nesting). Each draw dim is placed left
    of every plate of the model, so the model's own batch dims keep their places.
    """
    nest = plate_nesting(first)
    batched = {}
    for k, v in values.items():
        site = first.nodes[k]
        own = tuple(site["value"].shape)
        batch_nd = len(own) - site["fn"].event_dim
        batched[k] = v.reshape((num,) + (1,) * (nest - batch_nd) + own)
    with pyro.plate(DRAW_PLATE, num, dim=-(nest + 1)):
        return _trace(model, batched, args, kwargs)


def _vectorized(
    model: Callable, values: Mapping[str, torch.Tensor], num: int, args: tuple, kwargs: dict, obs: tuple, first
):
    tr = trace_over_draws(model, values, num, args, kwargs, first)
    lls, means, observed, categorical = {}, {}, {}, {}
    for name, site in _observed(tr, obs).items():
        lp1, mean1, cat = _read(first.nodes[name])
        lp, mean, _ = _read(site)
        lls[name] = _to_draws(lp, num, lp1.shape)
        means[name] = _to_draws(mean, num, mean1.shape)
        observed[name], categorical[name] = first.nodes[name]["value"].detach(), cat
    return lls, means, observed, categorical


def predict(
    model: Callable,
    values: Mapping[str, torch.Tensor],
    *args: Any,
    vectorize: bool | str = "auto",
    progress: bool = False,
    **kwargs: Any,
) -> Predictions:
    """Run ``model(*args, **kwargs)`` with its latent sites set to each of ``S`` draws.

    Parameters
    ----------
    model : Pyro model (a callable or ``PyroModule``)
        Its observed sites (``pyro.sample(..., obs=y)``) are read; pass the data so that
        they are observed.
    values : mapping ``site -> Tensor (S, *site_shape)``
        Draws in the model's constrained space, for every latent site of the model (sites
        the model does not have are ignored).
    vectorize : {"auto", True, False}
        ``"auto"`` tries one trace under an outer plate of draws (checked against the loop
        on two draws) and falls back to a loop; ``True`` requires it; ``False`` loops.
    progress : bool
        A progress bar over draws when looping.

    Returns
    -------
    Predictions

    Raises
    ------
    SpecError
        A latent site of the model has no value in ``values``, or a value has the wrong shape.
    ValueError
        The model has no observed site, or subsamples its data.
    """
    from ..groups import SpecError

    check_mapping("values", values)
    num = None
    for k, v in values.items():
        if not torch.is_tensor(v) or v.dim() < 1:
            raise TypeError(f"values[{k!r}] must be a tensor (S, *site_shape), got {type(v).__name__}")
        if num is None:
            num = v.shape[0]
        elif v.shape[0] != num:
            raise SpecError(f"values[{k!r}] has {v.shape[0]} draws, another site has {num}")
    values = {k: v.detach() for k, v in values.items()}
    with isolated(), torch.no_grad():
        prior = poutine.trace(model).get_trace(*args, **kwargs)
        samples = [(n, st) for n, st in prior.nodes.items() if st["type"] == "sample" and not site_is_subsample(st)]
        latents = [n for n, st in samples if not st["is_observed"]]
        obs = tuple(n for n, st in samples if st["is_observed"])
        if not obs:
            raise ValueError("the model has no observed sample site (pyro.sample(..., obs=y)): pass the data with y")
        missing = [n for n in latents if n not in values]
        if missing:
            raise SpecError(
                f"the draws have no values for the model's latent sites {missing} (have {sorted(values)}); "
                "a prediction at a draw needs every latent (a learned noise scale included)"
            )
        for n in latents:
            own = tuple(prior.nodes[n]["value"].shape)
            if tuple(values[n].shape[1:]) != own:
                got = tuple(values[n].shape[1:])
                raise SpecError(f"values[{n!r}] has draws of shape {got}, the model's site has shape {own}")
        _check_full_data(prior)
        values = {k: v for k, v in values.items() if k in latents}
        out = None
        if vectorize and num > 1:
            try:
                first = _trace(model, {k: v[0] for k, v in values.items()}, args, kwargs)
                out = _vectorized(model, values, num, args, kwargs, obs, first)
                check = _looped(model, {k: v[:2] for k, v in values.items()}, 2, args, kwargs, obs, False)
                for name, lp in check[0].items():
                    if not torch.allclose(out[0][name][:2], lp, rtol=1e-4, atol=1e-5):
                        raise RuntimeError("vectorized and looped log-likelihoods differ")
            except Exception:  # noqa: BLE001 - any failure of the vectorized trace: loop instead
                if vectorize is True:
                    raise
                out = None
        vectorized = out is not None
        if out is None:
            out = _looped(model, values, num, args, kwargs, obs, progress)
    lls, means, observed, categorical = out
    return Predictions(lls, observed, means, categorical, vectorized)
