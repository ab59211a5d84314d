"""The sections of the symmetry report: I(g; w), loss barriers, MMD, figures and the table rows.

Every section that can fail on the user's runs or model (a posterior the estimator cannot
read, a model that cannot be run at the runs' draws) records why in the report's notes and
leaves the other sections' results intact; a section is never skipped silently.
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import torch

from ..alignment import BarrierResult, gaussian_nll_loss, loss_barrier
from ..estimators import MIEstimate, mutual_information
from ..groups import PermutationSpec
from ..posteriors import as_posterior, nll_loss
from ..posteriors.predict import latent_sites
from . import plots
from ._layout import layer_groups, layer_of, layer_widths
from .convergence import ConvergenceComparison
from .kernel_mmd import canonical_form, mmd

__all__ = [
    "barriers",
    "degenerate_notes",
    "estimate_mi",
    "failure",
    "figures",
    "info",
    "mi_section",
    "mmd_by_layer",
    "mmd_section",
    "rows",
]


def failure(what: str, error: BaseException) -> str:
    """A one-line note: ``what`` failed with the first line of the error (cut at 200 characters)."""
    lines = str(error).strip().splitlines()
    msg = lines[0][:200] if lines else ""
    return f"{what} failed ({type(error).__name__}: {msg}); the other sections are kept."


def group_log_order(spec: PermutationSpec, name: str) -> float:
    g = spec.groups[name]
    return math.lgamma(g.size + 1) + (g.size * math.log(2.0) if g.signed else 0.0)


def estimate_mi(
    posteriors: list,
    spec: PermutationSpec,
    method: str,
    num_samples: int,
    num_permutations: int,
    seed: int,
    progress: bool,
) -> dict[str, list[MIEstimate]]:
    """``name -> [MIEstimate per run]`` for the whole network and each hidden group."""
    specs = {"all": spec}
    if len(spec.groups) > 1:
        specs.update({k: spec.replace_groups({k: g}) for k, g in spec.groups.items()})
    out: dict[str, list[MIEstimate]] = {}
    for name, sub in specs.items():
        out[name] = []
        for r, q in enumerate(posteriors):
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(seed + 7919 * r)
                gen = torch.Generator().manual_seed(seed + r)
                out[name].append(
                    mutual_information(
                        q,
                        sub,
                        estimator=method,
                        num_samples=num_samples,
                        num_permutations=num_permutations,
                        generator=gen,
                        progress=progress,
                    )
                )
    return out


def mi_section(
    posteriors: list | None, spec: PermutationSpec, estimator: tuple, seed: int, progress: bool, notes: list[str]
) -> dict[str, list[MIEstimate]]:
    """:func:`estimate_mi` of variational runs (``estimator = (method, samples, permutations)``);
    why not, in ``notes``."""
    if posteriors is None:
        notes.append("I(g; w) needs variational runs (guides or (loc, scale) mappings): skipped for sample sets.")
        return {}
    try:
        return estimate_mi(posteriors, spec, *estimator, seed, progress)
    except Exception as e:  # noqa: BLE001 - e.g. point runs have no density: keep the rest
        notes.append(failure("I(g; w)", e))
        return {}


def info(draws: Any, rows: list[dict], mi: dict, align: str, canonical: str) -> dict[str, Any]:
    """The report's summary facts."""
    run_ids = list(draws.run_index) or list(range(draws.num_chains))
    out = {
        "runs": draws.num_chains,
        "draws per run": draws.num_draws,
        "weights": rows[-1]["num_weights"],
        "log|G|": f"{draws.spec.log_order:.2f}",
        "alignment": f"align_many to the {align}" if draws.posteriors is not None else f"align_samples ({align})",
        "MMD": f"runs {run_ids[0]} vs {run_ids[1]}, Gaussian kernel, canonical form after: {canonical}",
    }
    if mi:
        est = mi["all"][0]
        k = f", K = {est.num_permutations}" if est.num_permutations else ""
        out["I(g;w) estimator"] = f"{est.estimator} ({est.num_samples} draws{k})"
    return out


# ---------------------------------------------------------------------- barriers
def default_loss(model: Any, data: Sequence, seed: int, progress: bool) -> Callable[[Any], float]:
    """The predictive test NLL: a ``ps.models`` network's fast ``functional`` path when it
    applies, else the model run by Pyro at each draw (:func:`~pyro_symmetry.nll_loss`)."""
    if callable(getattr(model, "functional", None)):
        try:
            return gaussian_nll_loss(model, *data, seed=seed)
        except (TypeError, ValueError):  # e.g. a learned noise scale: the functional path does not apply
            pass
    return nll_loss(model, *data, seed=seed, progress=progress)


def _missing_latents(model: Any, data: Sequence, posterior: Any) -> list[str]:
    sites = as_posterior(posterior, name="runs[0]").sites
    return [s for s in latent_sites(model, *data) if s not in sites]


def barriers(
    posteriors: list | None,
    many: Any,
    loss_fn: Callable[[Any], float] | None,
    data: Sequence | None,
    model: Any,
    run_ids: list[int],
    options: dict[str, Any],
    notes: list[str],
) -> list[tuple[str, BarrierResult, BarrierResult]]:
    """Barriers between runs ``(r, r + 1)`` before and after alignment; why not, in ``notes``.

    ``options``: ``pairs``, ``points``, ``seed``, ``progress``.
    """
    if posteriors is None:
        notes.append(
            "Loss barriers interpolate between variational runs (guides, (loc, scale) mappings or points); these "
            "runs are draws (sample sets, MCMC, an ArviZ tree): skipped."
        )
        return []
    if loss_fn is None:
        if data is None:
            notes.append("Loss barriers need held-out data (data=(x, y)) or a loss (loss_fn=): skipped.")
            return []
        if model is None:
            notes.append(
                "Loss barriers: data were given but no model is known (the runs are mappings, not guides or "
                "TrainedRuns): pass model= or loss_fn=; skipped."
            )
            return []
        try:
            missing = _missing_latents(model, data, posteriors[0])
        except Exception as e:  # noqa: BLE001 - the model cannot be traced with the data: say so
            notes.append(failure("Loss barriers: running the model with data=", e))
            return []
        if missing:
            notes.append(
                f"Loss barriers: the model's latent sites {missing} are not in the runs (the model is run at draws "
                "of every latent, a learned noise scale included): pass loss_fn= to evaluate the runs another way; "
                "skipped."
            )
            return []
        loss_fn = default_loss(model, data, options["seed"], options["progress"])
    out = []
    for r in range(min(options["pairs"], len(posteriors) - 1)):
        label = f"runs {run_ids[r]}-{run_ids[r + 1]}"
        try:
            kw = {"progress": options["progress"]}
            before = loss_barrier(loss_fn, posteriors[r], posteriors[r + 1], options["points"], **kw)
            after = loss_barrier(loss_fn, many.aligned[r], many.aligned[r + 1], options["points"], **kw)
        except Exception as e:  # noqa: BLE001 - keep the other pairs and sections
            notes.append(failure(f"The loss barrier between {label}", e))
            continue
        out.append((label, before, after))
    return out


# ---------------------------------------------------------------------- MMD
def mmd_by_layer(draws: Any, spec: PermutationSpec, layers: Sequence[str], num_permutations: int, seed: int):
    """MMD between runs 0 and 1 per layer and overall, before and after canonicalization."""
    x, y = draws.chain(0), draws.chain(1)
    n = next(iter(x.values())).shape[0]
    pooled = {k: torch.cat([x[k], y[k]]) for k in x}
    canon, label = canonical_form(pooled, spec)
    cx, cy = {k: v[:n] for k, v in canon.items()}, {k: v[n:] for k, v in canon.items()}
    out = {}
    for layer in [*layers, "all"]:
        sites = [k for k in x if layer == "all" or layer_of(k) == layer]
        before = mmd({k: x[k] for k in sites}, {k: y[k] for k in sites}, num_permutations=num_permutations, seed=seed)
        after = mmd({k: cx[k] for k in sites}, {k: cy[k] for k in sites}, num_permutations=num_permutations, seed=seed)
        out[layer] = (before, after)
    return out, label


def mmd_section(draws: Any, spec: PermutationSpec, num_permutations: int, seed: int, notes: list[str]):
    """:func:`mmd_by_layer` (``({}, "–")`` with a note when it fails)."""
    layers = list(layer_groups(spec, list(draws.samples)))
    try:
        return mmd_by_layer(draws, spec, layers, num_permutations, seed)
    except Exception as e:  # noqa: BLE001 - keep the other sections
        notes.append(failure("MMD", e))
        return {}, "–"


# ---------------------------------------------------------------------- figures
def figures(convergence: ConvergenceComparison, curves: list, num_weights: int) -> dict[str, bytes]:
    """``name -> PNG bytes`` of the report's figures."""
    if convergence.after is None:  # a collection without after=: no before/after to draw
        return {}
    before, after = convergence.draws_before, convergence.draws_after
    out = {"rhat_hist": plots.png_bytes(plots.plot_rhat_hist(convergence.before.rhat, convergence.after.rhat))}
    if before is None:  # a collection: the draws stay in their files, the per-weight figures need them
        return out
    # The weights whose R-hat drops most under alignment: where symmetry was the disagreement.
    with np.errstate(invalid="ignore"):  # inf - inf: degenerate before and after, no drop to show
        drop = {k: convergence.before.rhat[k] - convergence.after.rhat[k] for k in convergence.before.rhat}
    weights = plots.select_weights(drop, num_weights)
    if weights:
        out["marginals"] = plots.png_bytes(plots.plot_marginals(before.samples, after.samples, weights))
        out["ranks"] = plots.png_bytes(plots.plot_ranks(before.samples, after.samples, weights))
    if curves:
        out["barriers"] = plots.png_bytes(plots.plot_barriers(curves, ylabel="test loss"))
    return out


# ---------------------------------------------------------------------- table
def degenerate_notes(convergence: ConvergenceComparison) -> list[str]:
    """Say which layers' R-hat/ESS rest on degenerate draws (every run constant)."""
    notes = []
    for label, summary in (("before", convergence.before), ("after", convergence.after)):
        if summary is None:  # a collection's report without after=: nothing after alignment
            continue
        counts = {layer: summary.num_degenerate(layer) for layer in summary.layer_names}
        counts = {layer: c for layer, c in counts.items() if c}
        if counts:
            total = summary.row()["num_weights"]
            per_layer = ", ".join(f"{layer} {c}" for layer, c in counts.items())
            notes.append(
                f"R-hat/ESS {label} alignment rest on degenerate draws (every run constant: point estimates, "
                f"AutoDelta or tiny scales) for {sum(counts.values())} of {total} weights ({per_layer}): they count "
                "as not converged (R-hat inf where runs differ, undefined where all agree) and their ESS is n/a."
            )
    return notes


def rows(spec, convergence, mi, mmd_results, curves, shapes) -> list[dict[str, Any]]:
    """One row of raw numbers per layer and a last row ``"all"`` (``shapes``: ``site -> shape``
    of one draw; ``convergence.after`` None and MMD ``after`` None leave the 'after' cells empty)."""
    widths, groups = layer_widths(spec, shapes), layer_groups(spec, list(shapes))
    out = []
    for layer, group in [*groups.items(), ("all", None)]:
        key = None if layer == "all" else layer
        b = convergence.before.row(key)
        a = convergence.after.row(key) if convergence.after is not None else {}
        row: dict[str, Any] = {"layer": layer, "num_weights": b["num_weights"]}
        for k in ("rhat_max", "rhat_median", "frac_rhat>1.01", "frac_rhat>1.1", "ess_min", "ess_median", "degenerate"):
            row[f"{k}_before"], row[f"{k}_after"] = b[k], a.get(k)
        if layer == "all":
            row["width"] = sum(spec.sizes.values())
            row["log_order"], row["log_order_share"] = spec.log_order, 1.0
        elif group is not None:
            row["width"] = spec.groups[group].size
            row["log_order"] = group_log_order(spec, group)
            row["log_order_share"] = row["log_order"] / spec.log_order if spec.log_order > 0 else 0.0
        else:  # no group: its neurons are not interchangeable; the width only where the spec says it
            row["width"], row["log_order"], row["log_order_share"] = widths.get(layer), 0.0, 0.0
        name = "all" if layer == "all" else (group if len(spec.groups) > 1 else ("all" if group else None))
        if name is not None and name in mi:
            values = [e.value for e in mi[name]]
            row["mi_mean"] = statistics.fmean(values)
            row["mi_sd"] = statistics.stdev(values) if len(values) > 1 else 0.0
        if mmd_results:
            before, after = mmd_results[layer]
            row.update(mmd2_before=before.mmd2, mmd_p_before=before.p_value)
            if after is not None:
                row.update(mmd2_after=after.mmd2, mmd_p_after=after.p_value)
        if layer == "all" and curves:
            row["barrier_before"] = statistics.fmean(b.barrier for _, b, _ in curves)
            row["barrier_after"] = statistics.fmean(a.barrier for _, _, a in curves)
        out.append(row)
    return out
