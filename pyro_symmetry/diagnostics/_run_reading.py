"""One run (a fitted guide, a posterior, draws, an MCMC, an ArviZ tree) as chains of draws.

Every run is read by :func:`~pyro_symmetry.as_posterior`; what this module adds is what a
chain of the ArviZ data needs beyond the posterior itself:

- a fitted guide is sampled through its own trace (vectorized under a plate of draws,
  one trace per draw when the guide does not broadcast), because the trace gives the
  guide's exact ``log q`` of each draw *in the model's space* (the Jacobians of the
  guide's transforms for constrained sites such as a learned noise scale) and, for a
  symmetrized guide, the ``log q_sym`` it declares;
- a density given as a mapping (``(loc, scale)`` pairs, distributions) is sampled with its
  own ``log_prob`` (its sites are real-valued: no transform);
- draws (an MCMC, a ``get_samples(group_by_chain=True)`` dict, an ArviZ tree) keep their
  chains and their per-draw statistics (divergences, step sizes, ``log_q``, ``lp``), and a
  tree keeps its ``log_likelihood``, ``observed_data`` and ``posterior_predictive`` groups;
- a sample dict ``site -> (num_draws, *shape)`` in a list of runs is one chain, its shapes
  read against the sites' own shapes later (``_runs.fit_site_shapes``).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, NamedTuple

import pyro
import pyro.poutine as poutine
import torch
from pyro.poutine.util import site_is_subsample

from .._state import fork_rng
from ..posteriors import as_posterior
from ..posteriors.predict import DRAW_PLATE, plate_nesting  # one plate over draws, one reading of plates
from . import _trees

__all__ = ["Chain", "is_guide", "read_run", "sum_per_draw"]


class Chain(NamedTuple):
    """One chain: draws ``site -> (num_draws, *shape)`` and what is known per draw.

    ``stats`` holds ``(num_draws,)`` per-draw statistics (``log_q``, ``log_p``, MCMC
    ``diverging``/``step_size``, ...); ``groups`` a tree's ``log_likelihood`` and
    ``posterior_predictive`` variables ``(num_draws, ...)``; ``raw`` marks draws whose
    shapes are still to be read against the sites' own shapes.
    """

    label: str
    draws: dict[str, torch.Tensor]
    stats: dict[str, torch.Tensor]
    groups: dict[str, dict[str, torch.Tensor]]
    raw: bool = False


def is_guide(x: Any) -> bool:
    """A Pyro autoguide (or a guide-like module that traces its model)."""
    return isinstance(x, torch.nn.Module) and hasattr(x, "prototype_trace")


def sum_per_draw(trace: Any, num: int) -> torch.Tensor:
    """``(num,)`` float64 sum of the scaled log-probs of all sample sites (factors included)
    of a trace run under the outermost plate of ``num`` draws."""
    trace.compute_log_prob()
    total = torch.zeros(num, dtype=torch.float64)
    for name, site in trace.nodes.items():
        if site["type"] == "sample" and not site_is_subsample(site):
            lp = site["log_prob"]
            if lp.dim() == 0 or lp.shape[0] != num:
                raise ValueError(
                    f"site {name!r} has log-prob shape {tuple(lp.shape)} under a plate of {num} draws; "
                    "the model or guide does not vectorize over draws"
                )
            total = total + lp.reshape(num, -1).sum(-1).double()
    return total


def _latent_values(trace: Any) -> dict[str, torch.Tensor]:
    return {
        n: s["value"]
        for n, s in trace.nodes.items()
        if s["type"] == "sample"
        and not s["is_observed"]
        and not site_is_subsample(s)
        and not s["infer"].get("is_auxiliary")
    }


def _guide_vectorized(guide: Any, num: int, args: tuple, kwargs: dict) -> tuple[dict, torch.Tensor]:
    tr0 = poutine.trace(guide).get_trace(*args, **kwargs)
    with pyro.plate(DRAW_PLATE, num, dim=-(plate_nesting(tr0) + 1)):
        tr = poutine.trace(guide).get_trace(*args, **kwargs)
    shapes = {k: tuple(v.shape) for k, v in _latent_values(tr0).items()}
    values = {k: v.reshape((num, *shapes[k])) for k, v in _latent_values(tr).items()}
    return values, sum_per_draw(tr, num)


def _guide_looped(guide: Any, num: int, args: tuple, kwargs: dict) -> tuple[dict, torch.Tensor]:
    values: dict[str, list] = {}
    log_q = []
    for _ in range(num):
        tr = poutine.trace(guide).get_trace(*args, **kwargs)
        for k, v in _latent_values(tr).items():
            values.setdefault(k, []).append(v)
        log_q.append(float(tr.log_prob_sum()))
    return {k: torch.stack(v) for k, v in values.items()}, torch.tensor(log_q, dtype=torch.float64)


def guide_draws(guide: Any, num: int, args: tuple, kwargs: dict, seed: int) -> tuple[dict, torch.Tensor]:
    """``num`` draws of a fitted guide (the model's space) and the guide's own ``log q`` of each.

    One trace under an outer plate of draws when the guide broadcasts over it, else one
    trace per draw. Runs in an empty parameter-store scope (the guide reads its own
    module parameters, never another run's with the same names) with a forked RNG
    seeded by ``seed``.
    """
    with torch.no_grad(), pyro.get_param_store().scope(), fork_rng():
        torch.manual_seed(seed)
        try:
            return _guide_vectorized(guide, num, args, kwargs)
        except Exception:  # noqa: BLE001 - a guide that does not broadcast over draws: one trace per draw
            torch.manual_seed(seed)
            return _guide_looped(guide, num, args, kwargs)


def _stats_split(stats: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A posterior's ``sample_stats`` with the log joint under one name (``log_p``; trees
    call it ``lp``)."""
    out = dict(stats)
    if "lp" in out:
        out["log_p"] = out.pop("lp")
    return out


def read_run(
    run: Any, i: int, num_samples: int, args: tuple, kwargs: dict, generator: torch.Generator
) -> tuple[list[Chain], Any, Any, dict]:
    """``(chains, posterior or None, model or None, tree extras)`` of ``runs[i]``.

    ``posterior`` is what alignment, ``I(g; w)`` and barriers read for a variational run
    (the guide or mapping itself, a point as a mapping); ``None`` for draws. ``tree
    extras`` are an ArviZ tree's ``observed_data`` and observation dims.
    """
    label = f"runs[{i}]"
    seed = int(torch.randint(2**62, (), generator=generator))
    if isinstance(run, Mapping) and run and all(torch.is_tensor(v) for v in run.values()):
        return [Chain(label, dict(run), {}, {}, raw=True)], None, None, {}
    target = run.guide if hasattr(run, "guide") and hasattr(run, "state") and not isinstance(run, Mapping) else run
    model = getattr(run, "model", None) if not isinstance(run, Mapping) else None
    try:
        post = as_posterior(run, name=label)
    except TypeError:
        if not is_guide(target):
            raise
        post = None  # a guide as_posterior cannot read: its own trace still samples it
    if model is None and post is not None:
        model = post.model
    if post is not None and post.form == "draws":
        return _draw_chains(run, post, label), None, model, _trees.observations(run)
    if post is not None and post.form == "point":
        point = post.point()
        draws = {k: v.expand((num_samples, *v.shape)).clone() for k, v in point.items()}
        return [Chain(label, draws, {}, {})], point, model, {}
    if is_guide(target):
        draws, log_q = guide_draws(target, num_samples, args, kwargs, seed)
        if bool(torch.isnan(log_q).any()):
            raise ValueError(f"{label}: the guide's log q is NaN at {int(torch.isnan(log_q).sum())} draws")
        return [Chain(label, draws, {"log_q": log_q}, {})], target, model, {}
    with torch.no_grad():
        draws = post.sample((num_samples,), generator=torch.Generator().manual_seed(seed))
        log_q = post.log_prob(draws).double()
    return [Chain(label, draws, {"log_q": log_q}, {})], target, model, {}


def _draw_chains(run: Any, post: Any, label: str) -> list[Chain]:
    """The chains of a draws-form posterior (MCMC, tree, chain-grouped dict)."""
    draws = post.draws()
    num = next(iter(draws.values())).shape[0]
    stats = _stats_split(post.sample_stats)
    groups = _trees.chain_groups(run) if _trees.is_arviz(run) else {}
    raw = not _trees.is_arviz(run)  # MCMC draws: read against the sites' shapes like sample dicts
    kind = "MCMC chain" if type(run).__name__ == "MCMC" else "chain"
    return [
        Chain(
            f"{label} ({kind} {c})" if num > 1 or kind == "MCMC chain" else label,
            {k: v[c] for k, v in draws.items()},
            {k: v[c] for k, v in stats.items()},
            {g: {k: v[c] for k, v in part.items()} for g, part in groups.items()},
            raw,
        )
        for c in range(num)
    ]
