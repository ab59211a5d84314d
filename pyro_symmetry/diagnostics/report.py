"""One call from several runs to a report on weight-space symmetry.

:func:`symmetry_report` takes independent runs of one network (fitted guides,
:class:`~pyro_symmetry.training.TrainedRun` s, ``(loc, scale)`` mappings, sample
sets or an MCMC) and measures, per layer and overall, how much of the runs'
apparent disagreement is symmetry:

* R-hat/ESS across runs before and after aligning them (``align_many`` to a
  barycenter); what stays above 1.01 after alignment is real multi-modality;
* ``I(g; w)`` of every variational run (the ELBO gap between ``q`` and its
  symmetrization) against its maximum ``log|G|``, per hidden layer (the subgroup
  of that layer) and for the whole network;
* loss barriers between pairs of runs before and after alignment (with data);
* MMD between two runs before and after mapping samples to a canonical form.

Laurent, Aldea, Franchi (ICLR 2024); Rossi, Singh, Hannagan (NeurIPS 2023);
Gelberg et al. (2024); Vehtari et al. (2021).
"""

from __future__ import annotations

import html
import math
import statistics
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm.auto import tqdm

from .._validation import check_callable, check_int
from ..alignment import BarrierResult, align_many, gaussian_nll_loss, loss_barrier
from ..estimators import MIEstimate, mutual_information
from ..groups import PermutationSpec, SpecError
from . import plots
from ._layout import layer_groups, layer_of, layer_widths
from ._runs import check_enough_chains, describe_skipped
from .convergence import ConvergenceComparison, rhat_ess
from .inference_data import align_draws, collect_draws
from .kernel_mmd import MMDResult, canonical_form, mmd

__all__ = ["SymmetryReport", "symmetry_report"]

COLUMNS = (
    "layer",
    "width",
    "log|G| share",
    "R-hat max",
    "R-hat > 1.01",
    "R-hat > 1.1",
    "ESS median",
    "I(g;w) / log|G|",
    "MMD² before (p)",
    "MMD² after (p)",
    "barrier",
)
FIGURE_CAPTIONS = {
    "rhat_hist": "R-hat of every weight across runs, before and after alignment.",
    "marginals": "Per-run marginals of the weights whose R-hat drops most under alignment, before (top) and after "
    "(bottom) alignment.",
    "ranks": "Rank plots of the same weights: flat per-run rank histograms mean the runs agree.",
    "barriers": "Test loss along the interpolation between pairs of runs, before (dashed) and after (solid) alignment.",
}


@dataclass
class SymmetryReport:
    """The result of :func:`symmetry_report`.

    Attributes
    ----------
    rows : list of dict
        One row per layer and a last row ``"all"``; raw numbers (see :meth:`table`
        for the formatted table), keys such as ``rhat_max_before``,
        ``frac_rhat>1.01_after``, ``mi_mean``, ``mmd2_before``, ``barrier_after``.
    convergence : ConvergenceComparison
    mutual_information : dict ``name -> list of MIEstimate`` (one per run)
        ``"all"`` (whole network) and each hidden layer (its own subgroup).
    barriers : list of ``(label, before, after)`` BarrierResults
    mmd : dict ``layer -> (before, after)`` MMDResults for runs 0 and 1
    figures : dict ``name -> Path`` of the saved PNGs
    info : dict of summary facts (runs, draws, log|G|, alignment, canonical form)
    notes : list of str
        What was skipped and why (failed runs, sections), and which layers' R-hat/ESS
        rest on degenerate draws.
    runs : list of int
        The index in ``runs`` of each run the report uses (failed runs are skipped).
    """

    rows: list[dict[str, Any]]
    convergence: ConvergenceComparison
    mutual_information: dict[str, list[MIEstimate]]
    barriers: list[tuple[str, BarrierResult, BarrierResult]]
    mmd: dict[str, tuple[MMDResult, MMDResult]]
    figures: dict[str, Path] = field(default_factory=dict)
    info: dict[str, Any] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)
    title: str = "Symmetry report"
    runs: list[int] = field(default_factory=list)

    def table(self) -> list[list[str]]:
        """The formatted table: a header row, then one row per layer and ``"all"``."""
        return [list(COLUMNS)] + [_format_row(r) for r in self.rows]

    def __str__(self) -> str:
        table = self.table()
        widths = [max(len(row[i]) for row in table) for i in range(len(COLUMNS))]
        lines = ["  ".join(cell.ljust(w) for cell, w in zip(row, widths)).rstrip() for row in table]
        lines.insert(1, "  ".join("-" * w for w in widths))
        return "\n".join(lines + [f"note: {n}" for n in self.notes])

    def _sections(self) -> list[tuple[str, list[list[str]]]]:
        """Secondary tables: I(g; w) per run and the barrier of every pair."""
        out = []
        if self.mutual_information:
            names = list(self.mutual_information)
            runs = len(self.mutual_information[names[0]])
            head = ["run"] + [f"I(g;w) {n} (log|G| = {self.mutual_information[n][0].log_order:.1f})" for n in names]
            body = [
                [str(self.runs[r] if r < len(self.runs) else r)]
                + [
                    f"{self.mutual_information[n][r].value:.2f} ± {self.mutual_information[n][r].stderr:.2f}"
                    for n in names
                ]
                for r in range(runs)
            ]
            out.append(("I(g; w) per run (nats, ± Monte Carlo standard error)", [head] + body))
        if self.barriers:
            head = ["pair", "barrier before", "barrier after"]
            body = [[label, f"{b.barrier:.3f}", f"{a.barrier:.3f}"] for label, b, a in self.barriers]
            out.append(("Loss barriers between pairs of runs", [head] + body))
        return out

    def to_markdown(self) -> str:
        """Markdown: facts, the table, per-run tables, figures (relative links) and notes."""
        lines = [f"# {self.title}", ""]
        lines += [f"- {k}: {v}" for k, v in self.info.items()] + [""]
        lines += _md_table(self.table()) + [""]
        for caption, table in self._sections():
            lines += [f"## {caption}", ""] + _md_table(table) + [""]
        if self.figures:
            lines += ["## Figures", ""]
            for name, path in self.figures.items():
                lines += [f"![{name}]({path.name})", "", FIGURE_CAPTIONS.get(name, name), ""]
        if self.notes:
            lines += ["## Notes", ""] + [f"- {n}" for n in self.notes] + [""]
        return "\n".join(lines)

    def to_html(self) -> str:
        """A standalone HTML page with the same content as :meth:`to_markdown`."""
        esc = html.escape
        parts = [
            "<!DOCTYPE html>",
            f"<html><head><meta charset='utf-8'><title>{esc(self.title)}</title>",
            "<style>body{font-family:sans-serif;max-width:1100px;margin:auto}table{border-collapse:collapse}"
            "td,th{border:1px solid #bbb;padding:3px 8px;text-align:right}th{background:#eee}</style>",
            f"</head><body><h1>{esc(self.title)}</h1><ul>",
        ]
        parts += [f"<li>{esc(str(k))}: {esc(str(v))}</li>" for k, v in self.info.items()] + ["</ul>"]
        parts.append(_html_table(self.table()))
        for caption, table in self._sections():
            parts += [f"<h2>{esc(caption)}</h2>", _html_table(table)]
        if self.figures:
            parts.append("<h2>Figures</h2>")
            for name, path in self.figures.items():
                caption = esc(FIGURE_CAPTIONS.get(name, name))
                parts.append(
                    f"<figure><img src='{esc(path.name)}' alt='{esc(name)}'><figcaption>{caption}</figcaption></figure>"
                )
        if self.notes:
            parts += ["<h2>Notes</h2><ul>"] + [f"<li>{esc(n)}</li>" for n in self.notes] + ["</ul>"]
        parts.append("</body></html>")
        return "\n".join(parts)

    def save(self, out_dir: str | Path) -> dict[str, Path]:
        """Write ``report.md`` and ``report.html`` (figures are saved by :func:`symmetry_report`)."""
        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        paths = {"markdown": out / "report.md", "html": out / "report.html"}
        paths["markdown"].write_text(self.to_markdown())
        paths["html"].write_text(self.to_html())
        return paths


# ---------------------------------------------------------------------- formatting
def _num(x: Any, fmt: str, nan: str = "–") -> str:
    if x is None:
        return "–"
    if isinstance(x, float) and math.isnan(x):
        return nan
    if isinstance(x, float) and math.isinf(x):
        return "inf" if x > 0 else "-inf"
    return format(x, fmt)


def _pair(row: dict, key: str, fmt: str, nan: str = "–") -> str:
    b, a = row.get(f"{key}_before"), row.get(f"{key}_after")
    return "–" if b is None else f"{_num(b, fmt, nan)} → {_num(a, fmt, nan)}"


def _format_row(r: dict[str, Any]) -> list[str]:
    mi = "–"
    if r.get("mi_mean") is not None:  # a NaN estimate shows as NaN, never as a blank
        spread = f" ± {_num(r['mi_sd'], '.1f', 'NaN')}" if r.get("mi_sd") != 0.0 else ""
        mi = f"{_num(r['mi_mean'], '.1f', 'NaN')}{spread} / {r['log_order']:.1f}"
    mmd_b = "–" if r.get("mmd2_before") is None else f"{r['mmd2_before']:.3f} ({r['mmd_p_before']:.3f})"
    mmd_a = "–" if r.get("mmd2_after") is None else f"{r['mmd2_after']:.3f} ({r['mmd_p_after']:.3f})"
    return [
        r["layer"],
        _num(r.get("width"), "d"),
        _num(r.get("log_order_share"), ".0%"),
        _pair(r, "rhat_max", ".3f", "n/a"),
        _pair(r, "frac_rhat>1.01", ".0%"),
        _pair(r, "frac_rhat>1.1", ".0%"),
        _pair(r, "ess_median", ".0f", "n/a (degenerate)"),
        mi,
        mmd_b,
        mmd_a,
        _pair(r, "barrier", ".3f", "NaN"),
    ]


def _md_table(rows: list[list[str]]) -> list[str]:
    def line(row: list[str]) -> str:
        return "| " + " | ".join(c.replace("|", "\\|") for c in row) + " |"

    return [line(rows[0]), "|" + "|".join("---" for _ in rows[0]) + "|"] + [line(row) for row in rows[1:]]


def _html_table(rows: list[list[str]]) -> str:
    esc = html.escape
    head = "".join(f"<th>{esc(c)}</th>" for c in rows[0])
    body = "".join("<tr>" + "".join(f"<td>{esc(c)}</td>" for c in row) + "</tr>" for row in rows[1:])
    return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


# ---------------------------------------------------------------------- pieces
def _group_log_order(spec: PermutationSpec, name: str) -> float:
    g = spec.groups[name]
    return math.lgamma(g.size + 1) + (g.size * math.log(2.0) if g.signed else 0.0)


def _estimate_mi(
    posteriors: list, spec: PermutationSpec, method: str, num_samples: int, num_permutations: int, seed: int
):
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
                        q, sub, method=method, num_samples=num_samples, num_permutations=num_permutations, generator=gen
                    )
                )
    return out


def _mmd_by_layer(draws: Any, spec: PermutationSpec, layers: Sequence[str], num_permutations: int, seed: int):
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


# ---------------------------------------------------------------------- public
def symmetry_report(
    runs: Any,
    spec: PermutationSpec | None = None,
    data: tuple[torch.Tensor, torch.Tensor] | None = None,
    out_dir: str | Path | None = None,
    *,
    num_samples: int = 100,
    align: str = "barycenter",
    loss_fn: Callable[[Any], float] | None = None,
    barrier_pairs: int = 3,
    barrier_points: int = 25,
    mi_method: str = "auto",
    mi_samples: int = 64,
    mi_permutations: int = 16,
    mmd_permutations: int = 200,
    num_weights_plotted: int = 4,
    seed: int = 0,
    progress: bool = True,
    title: str = "Symmetry report",
) -> SymmetryReport:
    """Measure how much of the disagreement between runs is weight-space symmetry.

    Parameters
    ----------
    runs : list (or MCMC)
        As :func:`~pyro_symmetry.diagnostics.to_inference_data`: at least 2 runs.
    spec : PermutationSpec, optional
        Default: the model's ``.spec``.
    data : ``(x, y)``, optional
        Held-out data for the loss barriers (default loss: the Monte Carlo predictive
        NLL, :func:`~pyro_symmetry.gaussian_nll_loss`, which needs a model with
        ``functional``). Without data and ``loss_fn`` no barriers are computed.
    out_dir : path, optional
        Where ``report.md``, ``report.html`` and the PNG figures are written.
    num_samples : int
        Draws per run for R-hat/ESS and MMD.
    align : {"barycenter", "reference"}
    loss_fn : callable ``posterior -> float``, optional
        Loss for the barriers (overrides the default built from ``data``).
    barrier_pairs, barrier_points : int
        Pairs ``(r, r + 1)`` of runs and points on each interpolation path.
    mi_method, mi_samples, mi_permutations
        Estimator of ``I(g; w)`` (:func:`~pyro_symmetry.mutual_information`).
    mmd_permutations : int
    num_weights_plotted : int
    seed : int
    progress : bool
        Show a progress bar over the report's steps.
    title : str

    Returns
    -------
    SymmetryReport
        ``str(report)`` is the table; ``.to_markdown()``, ``.to_html()``, ``.figures``.

    Examples
    --------
    >>> runs = ps.train_runs(make_model, make_guide, (x, y), 8, steps=2000)
    >>> report = ps.diagnostics.symmetry_report(runs, data=(x_test, y_test), out_dir="report")
    >>> print(report)
    """
    if align not in ("barycenter", "reference"):
        raise ValueError(f"align must be 'barycenter' or 'reference', got {align!r}")
    check_int("barrier_pairs", barrier_pairs, minimum=0)
    check_int("barrier_points", barrier_points, minimum=2)
    check_int("mi_samples", mi_samples, minimum=1)
    check_int("mi_permutations", mi_permutations, minimum=1)
    check_int("mmd_permutations", mmd_permutations, minimum=1)
    check_int("num_weights_plotted", num_weights_plotted, minimum=0)
    check_int("seed", seed)
    if loss_fn is not None:
        check_callable("loss_fn", loss_fn)
    if data is not None and (not isinstance(data, (tuple, list)) or len(data) != 2):
        raise TypeError(f"data must be a pair (x, y) of held-out tensors, got {type(data).__name__}")
    steps = ["draws", "alignment", "R-hat/ESS", "I(g;w)", "barriers", "MMD", "figures"]
    bar = tqdm(steps, desc="symmetry report", disable=not progress, leave=False)
    step = iter(bar)

    next(step)
    with warnings.catch_warnings():  # failed runs become notes of the report instead
        warnings.filterwarnings("ignore", message=r"run \d+ skipped")
        draws = collect_draws(runs, num_samples=num_samples, spec=spec, seed=seed)
    spec = draws.spec
    if spec is None:
        raise SpecError("symmetry_report needs a spec (pass spec=... or use a model with a .spec)")
    check_enough_chains(draws, 2, "symmetry_report")
    posteriors = draws.posteriors
    run_ids = list(draws.run_index) or list(range(draws.num_chains))
    notes: list[str] = describe_skipped(draws.skipped)

    next(step)
    many = None
    if posteriors is not None:
        many = align_many(posteriors, spec, reference=0 if align == "reference" else "barycenter", seed=seed)
    aligned = align_draws(draws, spec, align, alignment=many)

    next(step)
    convergence = ConvergenceComparison(rhat_ess(draws), rhat_ess(aligned), draws, aligned)
    notes += _degenerate_notes(convergence)

    next(step)
    mi: dict[str, list[MIEstimate]] = {}
    if posteriors is not None:
        mi = _estimate_mi(posteriors, spec, mi_method, mi_samples, mi_permutations, seed)
    else:
        notes.append("I(g; w) needs variational runs (guides or (loc, scale) mappings): skipped for sample sets.")

    next(step)
    barriers: list[tuple[str, BarrierResult, BarrierResult]] = []
    if loss_fn is None and data is not None and callable(getattr(draws.model, "functional", None)):
        loss_fn = gaussian_nll_loss(draws.model, data[0], data[1], seed=seed)
    if posteriors is None or many is None:
        notes.append("Loss barriers need variational runs: skipped.")
    elif loss_fn is None:
        notes.append("Loss barriers need held-out data and a model with .functional (or loss_fn=): skipped.")
    else:
        for r in range(min(barrier_pairs, len(posteriors) - 1)):
            before = loss_barrier(loss_fn, posteriors[r], posteriors[r + 1], barrier_points)
            after = loss_barrier(loss_fn, many.aligned[r], many.aligned[r + 1], barrier_points)
            barriers.append((f"runs {run_ids[r]}-{run_ids[r + 1]}", before, after))

    next(step)
    layers = list(layer_groups(spec, list(draws.samples)))
    mmd_results, canonical = _mmd_by_layer(draws, spec, layers, mmd_permutations, seed)

    rows = _rows(spec, convergence, mi, mmd_results, barriers, draws)
    info = {
        "runs": draws.num_chains,
        "draws per run": draws.num_draws,
        "weights": rows[-1]["num_weights"],
        "log|G|": f"{spec.log_order:.2f}",
        "alignment": f"align_many to the {align}" if posteriors is not None else f"align_samples ({align})",
        "MMD": f"runs {run_ids[0]} vs {run_ids[1]}, Gaussian kernel, canonical form after: {canonical}",
    }
    if mi:
        est = mi["all"][0]
        k = f", K = {est.num_permutations}" if est.num_permutations else ""
        info["I(g;w) estimator"] = f"{est.method} ({est.num_samples} draws{k})"
    report = SymmetryReport(rows, convergence, mi, barriers, mmd_results, {}, info, notes, title, run_ids)

    next(step)
    if out_dir is not None:
        out = Path(out_dir)
        figs = {"rhat_hist": out / "rhat_hist.png", "marginals": out / "marginals.png", "ranks": out / "ranks.png"}
        plots.plot_rhat_hist(convergence.before.rhat, convergence.after.rhat, figs["rhat_hist"])
        # The weights whose R-hat drops most under alignment: where symmetry was the disagreement.
        with np.errstate(invalid="ignore"):  # inf - inf: degenerate before and after, no drop to show
            drop = {k: convergence.before.rhat[k] - convergence.after.rhat[k] for k in convergence.before.rhat}
        weights = plots.select_weights(drop, num_weights_plotted)
        plots.plot_marginals(draws.samples, aligned.samples, weights, figs["marginals"])
        plots.plot_ranks(draws.samples, aligned.samples, weights, figs["ranks"])
        if barriers:
            figs["barriers"] = out / "barriers.png"
            plots.plot_barriers(barriers, figs["barriers"], ylabel="test loss")
        report.figures = figs
        report.save(out)
    bar.close()
    return report


def _degenerate_notes(convergence: ConvergenceComparison) -> list[str]:
    """Say which layers' R-hat/ESS rest on degenerate draws (every run constant)."""
    notes = []
    for label, summary in (("before", convergence.before), ("after", convergence.after)):
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


def _rows(spec, convergence, mi, mmd_results, barriers, draws) -> list[dict[str, Any]]:
    shapes = {site: tuple(v.shape[2:]) for site, v in draws.samples.items()}
    widths, groups = layer_widths(spec, shapes), layer_groups(spec, list(shapes))
    rows = []
    for layer, group in [*groups.items(), ("all", None)]:
        key = None if layer == "all" else layer
        b, a = convergence.before.row(key), convergence.after.row(key)
        row: dict[str, Any] = {"layer": layer, "num_weights": b["num_weights"]}
        for k in ("rhat_max", "rhat_median", "frac_rhat>1.01", "frac_rhat>1.1", "ess_min", "ess_median", "degenerate"):
            row[f"{k}_before"], row[f"{k}_after"] = b[k], a[k]
        if layer == "all":
            row["width"] = sum(spec.sizes.values())
            row["log_order"], row["log_order_share"] = spec.log_order, 1.0
        elif group is not None:
            row["width"] = spec.groups[group].size
            row["log_order"] = _group_log_order(spec, group)
            row["log_order_share"] = row["log_order"] / spec.log_order if spec.log_order > 0 else 0.0
        else:  # no group: its neurons are not interchangeable; the width only where the spec says it
            row["width"], row["log_order"], row["log_order_share"] = widths.get(layer), 0.0, 0.0
        name = "all" if layer == "all" else (group if len(spec.groups) > 1 else ("all" if group else None))
        if name is not None and name in mi:
            values = [e.value for e in mi[name]]
            row["mi_mean"] = statistics.fmean(values)
            row["mi_sd"] = statistics.stdev(values) if len(values) > 1 else 0.0
        before, after = mmd_results[layer]
        row.update(
            mmd2_before=before.mmd2, mmd_p_before=before.p_value, mmd2_after=after.mmd2, mmd_p_after=after.p_value
        )
        if layer == "all" and barriers:
            row["barrier_before"] = statistics.fmean(b.barrier for _, b, _ in barriers)
            row["barrier_after"] = statistics.fmean(a.barrier for _, _, a in barriers)
        rows.append(row)
    return rows
