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

A checkpoint :class:`~pyro_symmetry.collections.Collection` (or its dask-backed tree) is
reported from streamed computations only (:mod:`._report_collection`): R-hat/ESS block by
block, posterior moments, MMD over the files; what needs every draw or a model is skipped
with a note.

With ``out_dir`` it writes one self-contained HTML page (figures embedded), a markdown
version, and the draws before and after alignment as ArviZ trees in netCDF, into an
empty or new folder (see :func:`symmetry_report` for ``overwrite``).

Laurent, Aldea, Franchi (ICLR 2024); Rossi, Singh, Hannagan (NeurIPS 2023);
Gelberg et al. (2024); Vehtari et al. (2021).
"""

from __future__ import annotations

import html
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

from .._validation import check_callable, check_int
from ..alignment import BarrierResult, align_many
from ..estimators import MIEstimate
from ..groups import SpecError
from . import _report_parts as parts
from ._report_collection import is_streamed, moments_table, streamed_sections
from ._report_format import (
    COLUMNS,
    FILES_NOTE,
    REPORT_FILES,
    check_out_dir,
    format_row,
    html_figure,
    html_table,
    md_table,
    write_file,
)
from ._runs import check_enough_chains, describe_skipped
from .convergence import ConvergenceComparison, rhat_ess
from .draws import align_draws, gather_draws
from .inference_data import draws_to_datatree
from .kernel_mmd import MMDResult

__all__ = ["SymmetryReport", "symmetry_report"]

_format_row = format_row  # the formatted row of one layer (kept under its old name)


@dataclass(frozen=True)
class SymmetryReport:
    """The result of :func:`symmetry_report`.

    Attributes
    ----------
    rows : list of dict
        One row per layer and a last row ``"all"``; raw numbers (see :meth:`table`
        for the formatted table), keys such as ``rhat_max_before``,
        ``frac_rhat>1.01_after``, ``mi_mean``, ``mmd2_before``, ``barrier_after``.
    convergence : ConvergenceComparison
        With the draws before and after alignment (``draws_before``, ``draws_after``). For a
        checkpoint collection the draws stay in their files (both None), and ``after`` is None
        unless ``after=`` was given.
    mutual_information : dict ``name -> list of MIEstimate`` (one per run)
        ``"all"`` (whole network) and each hidden layer (its own subgroup).
    barriers : list of ``(label, before, after)`` BarrierResults
    mmd : dict ``layer -> (before, after)`` MMDResults for runs 0 and 1
        (``CollectionMMD`` s of chains 0 and 1 for a collection; ``after`` None without ``after=``)
    figures : dict ``name -> bytes``
        The figures as PNG (embedded in :meth:`to_html`).
    info : dict of summary facts (runs, draws, log|G|, alignment, canonical form)
    notes : list of str
        What was skipped and why (failed runs, sections that could not be computed), and
        which layers' R-hat/ESS rest on degenerate draws.
    runs : list of int
        The index in ``runs`` of each run the report uses (failed runs are skipped).
    moments : dict ``"before"``/``"after"`` -> ``site -> (mean, variance)``
        Posterior means and variances over every draw (filled for a checkpoint collection,
        where they are streamed).
    files : dict ``name -> Path``
        The files the last :meth:`save` wrote (empty before).
    """

    rows: list[dict[str, Any]]
    convergence: ConvergenceComparison
    mutual_information: dict[str, list[MIEstimate]]
    barriers: list[tuple[str, BarrierResult, BarrierResult]]
    mmd: dict[str, tuple[MMDResult, MMDResult]]
    figures: dict[str, bytes] = field(default_factory=dict)
    info: dict[str, Any] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)
    title: str = "Symmetry report"
    runs: list[int] = field(default_factory=list)
    files: dict[str, Path] = field(default_factory=dict)
    moments: dict[str, dict[str, tuple[Any, Any]]] = field(default_factory=dict)

    def table(self) -> list[list[str]]:
        """The formatted table: a header row, then one row per layer and ``"all"``."""
        return [list(COLUMNS)] + [format_row(r) for r in self.rows]

    def __str__(self) -> str:
        table = self.table()
        widths = [max(len(row[i]) for row in table) for i in range(len(COLUMNS))]
        lines = ["  ".join(cell.ljust(w) for cell, w in zip(row, widths)).rstrip() for row in table]
        lines.insert(1, "  ".join("-" * w for w in widths))
        return "\n".join(lines + [f"note: {n}" for n in self.notes])

    def __repr__(self) -> str:
        return (
            f"SymmetryReport({self.title!r}, {len(self.runs) or self.convergence.before.num_chains} runs, "
            f"{len(self.rows)} rows, figures={sorted(self.figures)}, notes={len(self.notes)})"
        )

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
        if self.moments:
            layers = [r["layer"] for r in self.rows[:-1]]
            out.append(("Posterior means and standard deviations", moments_table(self.moments, layers)))
        return out

    def _has_draws(self) -> bool:
        return self.convergence.draws_before is not None

    def to_markdown(self, extra_notes: tuple[str, ...] = ()) -> str:
        """Markdown: facts, the table, per-run tables and notes (the figures are in the HTML page)."""
        lines = [f"# {self.title}", ""]
        lines += [f"- {k}: {v}" for k, v in self.info.items()] + [""]
        lines += md_table(self.table()) + [""]
        for caption, table in self._sections():
            lines += [f"## {caption}", ""] + md_table(table) + [""]
        if self.figures:
            names = ", ".join(self.figures)
            lines += ["## Figures", "", f"Embedded in report.html: {names}.", ""]
        notes = [*self.notes, *extra_notes]
        if notes:
            lines += ["## Notes", ""] + [f"- {n}" for n in notes] + [""]
        lines += [FILES_NOTE, ""] if self._has_draws() else []
        return "\n".join(lines)

    def to_html(self, extra_notes: tuple[str, ...] = ()) -> str:
        """One self-contained HTML page (figures embedded as ``data:`` URIs), same content as
        :meth:`to_markdown` plus the figures."""
        esc = html.escape
        parts_ = [
            "<!DOCTYPE html>",
            f"<html><head><meta charset='utf-8'><title>{esc(self.title)}</title>",
            "<style>body{font-family:sans-serif;max-width:1100px;margin:auto}table{border-collapse:collapse}"
            "td,th{border:1px solid #bbb;padding:3px 8px;text-align:right}th{background:#eee}"
            "img{max-width:100%}</style>",
            f"</head><body><h1>{esc(self.title)}</h1><ul>",
        ]
        parts_ += [f"<li>{esc(str(k))}: {esc(str(v))}</li>" for k, v in self.info.items()] + ["</ul>"]
        parts_.append(html_table(self.table()))
        for caption, table in self._sections():
            parts_ += [f"<h2>{esc(caption)}</h2>", html_table(table)]
        if self.figures:
            parts_.append("<h2>Figures</h2>")
            parts_ += [html_figure(name, png) for name, png in self.figures.items()]
        notes = [*self.notes, *extra_notes]
        if notes:
            parts_ += ["<h2>Notes</h2><ul>"] + [f"<li>{esc(n)}</li>" for n in notes] + ["</ul>"]
        parts_ += [f"<p>{esc(FILES_NOTE)}</p>"] if self._has_draws() else []
        parts_.append("</body></html>")
        return "\n".join(parts_)

    def save(self, out_dir: str | Path, *, overwrite: bool = False) -> dict[str, Path]:
        """Write the report's files (:data:`REPORT_FILES`) into ``out_dir``.

        ``report.html`` (self-contained), ``report.md``, and the draws before and after
        alignment as ArviZ trees (``draws.nc``, ``draws_aligned.nc``: reopen with
        ``xarray.open_datatree``). ``out_dir`` must be empty or new, unless
        ``overwrite=True``: then these four names are replaced and every other file is
        left alone. A draws file that cannot be written (no netCDF engine) is named in the
        notes of the page, and an earlier report's file of that name is removed (it would
        look current).

        Returns
        -------
        dict ``name -> Path`` of the files written (``markdown``, ``html``, ``draws``,
        ``draws_aligned``).

        Raises
        ------
        FileExistsError
            ``out_dir`` is not empty and ``overwrite`` is False (nothing is written).
        """
        out = Path(out_dir)
        check_out_dir(out, overwrite)
        out.mkdir(parents=True, exist_ok=True)
        paths, extra = {}, []
        trees = {"draws": self.convergence.draws_before, "draws_aligned": self.convergence.draws_after}
        for name, draws in trees.items():
            path = out / REPORT_FILES[name]
            if draws is None:  # a collection's draws stay in their files
                if overwrite and path.is_file():
                    path.unlink()  # an earlier report's draws would look like this one's
                continue
            try:
                tree = draws_to_datatree(draws)
                paths[name] = write_file(path, lambda tmp, tree=tree: tree.to_netcdf(tmp), overwrite)
            except FileExistsError:
                raise
            except Exception as e:  # noqa: BLE001 - no netCDF engine, an unwritable value: the page says so
                extra.append(parts.failure(f"Saving {REPORT_FILES[name]}", e))
                if overwrite and path.is_file():
                    path.unlink()  # an earlier report's file of this name would look current
        texts = {"markdown": self.to_markdown(tuple(extra)), "html": self.to_html(tuple(extra))}
        for name, text in texts.items():
            data = text.encode("utf-8")
            paths[name] = write_file(out / REPORT_FILES[name], lambda tmp, data=data: tmp.write_bytes(data), overwrite)
        self.files.clear()  # frozen: the dict is the report's own, updated in place
        self.files.update(paths)
        return paths


# ---------------------------------------------------------------------- public
def _check_options(align: str, data: Any, loss_fn: Any, seed: Any, **counts: Any) -> None:
    if align not in ("barycenter", "reference"):
        raise ValueError(f"align must be 'barycenter' or 'reference', got {align!r}")
    minimum = {"barrier_pairs": 0, "barrier_points": 2, "num_weights_plotted": 0}
    for name, value in counts.items():
        check_int(name, value, minimum=minimum.get(name, 1))
    check_int("seed", seed)
    if loss_fn is not None:
        check_callable("loss_fn", loss_fn)
    if data is not None and (not isinstance(data, (tuple, list)) or len(data) != 2):
        raise TypeError(f"data must be a pair (x, y) of held-out tensors, got {type(data).__name__}")


def _renamed_options(reference: Any, mi_estimator: str, align: Any, mi_method: Any) -> tuple[Any, str]:
    """The new spellings, from the deprecated ``align=`` and ``mi_method=`` when given."""
    if align is not None:
        warnings.warn(
            "symmetry_report: align= is deprecated and will be removed; use reference= "
            "('barycenter', or 0 for the first run)",
            DeprecationWarning,
            stacklevel=3,
        )
        reference = 0 if align == "reference" else align
    if mi_method is not None:
        warnings.warn(
            "symmetry_report: mi_method= is deprecated and will be removed; use mi_estimator= (the same names)",
            DeprecationWarning,
            stacklevel=3,
        )
        mi_estimator = mi_method
    if reference == "reference":  # align_draws' and rhat_ess_before_after's name for run 0
        reference = 0
    if reference not in ("barycenter", 0) or isinstance(reference, bool):
        raise ValueError(f"reference must be 'barycenter', or 'reference' or 0 (the first run), got {reference!r}")
    return reference, mi_estimator


def symmetry_report(
    runs: Any,
    spec: Any = None,
    data: tuple[torch.Tensor, torch.Tensor] | None = None,
    out_dir: str | Path | None = None,
    *,
    num_samples: int = 100,
    reference: str | int = "barycenter",
    loss_fn: Callable[[Any], float] | None = None,
    model: Any = None,
    barrier_pairs: int = 3,
    barrier_points: int = 25,
    mi_estimator: str = "auto",
    mi_samples: int = 64,
    mi_permutations: int = 16,
    mmd_permutations: int = 200,
    num_weights_plotted: int = 4,
    seed: int = 0,
    progress: bool = True,
    title: str = "Symmetry report",
    overwrite: bool = False,
    figures: bool | None = None,
    chains: Any = None,
    after: Any = None,
    max_bytes: int = 256 << 20,
    align: str | None = None,
    mi_method: str | None = None,
) -> SymmetryReport:
    """Measure how much of the disagreement between runs is weight-space symmetry.

    Parameters
    ----------
    runs : list, one MCMC / ArviZ tree, or a checkpoint Collection
        As :func:`~pyro_symmetry.diagnostics.to_inference_data`: at least 2 runs (chains). An
        ArviZ ``DataTree``/``InferenceData`` (e.g. the ``draws.nc`` of an earlier report,
        reopened with ``xarray.open_datatree``) is re-aligned draw by draw. A
        :class:`~pyro_symmetry.collections.Collection`, or the dask-backed tree
        ``ps.diagnostics.collections.to_inference_data(collection, chains=...)``, is reported
        from streamed computations only (never every checkpoint at once): R-hat/ESS block by
        block, posterior means/variances, MMD between chains 0 and 1 (Collection only);
        alignment, barriers, ``I(g; w)`` and the per-weight figures are skipped with a note,
        and no draws files are written (the checkpoints are the draws).
    spec : PermutationSpec, optional
        Default: the model's ``.spec``.
    data : ``(x, y)``, optional
        Held-out data for the loss barriers, passed to the model as ``model(x, y)``. The
        default loss is the Monte Carlo predictive NLL of the model run by Pyro at the
        posterior's draws (:func:`~pyro_symmetry.nll_loss`; any Pyro model, every latent
        site of which must be in the runs), or a ``ps.models`` network's faster
        ``functional`` path. When barriers cannot be computed, the notes say why.
    out_dir : path, optional
        Where ``report.html`` (one self-contained page, figures embedded), ``report.md``
        and the draws before/after alignment (``draws.nc``, ``draws_aligned.nc``) are
        written. It must be empty or new (checked before any work), unless ``overwrite``.
    num_samples : int
        Draws per run for R-hat/ESS and MMD.
    reference : {"barycenter", "reference", 0}
        What the runs are aligned to: their barycenter, or run 0 (``"reference"`` or ``0``,
        as in :func:`align_draws`).
    loss_fn : callable ``posterior -> float``, optional
        Loss for the barriers (overrides the default built from ``data``).
    model : Pyro model, optional
        For the default loss when the runs do not carry it (``(loc, scale)`` mappings);
        default: the runs' model (a guide's, a ``TrainedRun``'s).
    barrier_pairs, barrier_points : int
        Pairs ``(r, r + 1)`` of runs and points on each interpolation path.
    mi_estimator, mi_samples, mi_permutations
        Estimator of ``I(g; w)`` (:func:`~pyro_symmetry.mutual_information`'s ``estimator``,
        ``num_samples`` and ``num_permutations``).
    mmd_permutations : int
    num_weights_plotted : int
    seed : int
    progress : bool
        Progress bars: over the report's steps, and inside the long ones (alignment sweeps,
        ``I(g; w)`` draws, barrier points, the model run draw by draw).
    title : str
    overwrite : bool
        Write into a non-empty ``out_dir``, replacing the report's own files there (and
        only those: other files are never touched).
    figures : bool, optional
        Render the figures (matplotlib); default: when ``out_dir`` is given.
    chains : optional
        For a Collection: how checkpoints form chains (see
        :func:`~pyro_symmetry.diagnostics.collections.chain_groups`: an int, index lists, or
        ``name -> run label``).
    after : Collection or dask-backed tree, optional
        For a collection: its aligned or canonical copy (``collection.align(reference,
        out_dir)`` / ``collection.canonicalize(out_dir)``, reopened with
        ``ps.collections.from_files``), checkpoint for checkpoint; fills the 'after' columns.
    max_bytes : int
        For a collection: working-memory budget of one streamed block (R-hat/ESS, MMD).

    align : {"barycenter", "reference"}, optional
        Deprecated: use ``reference=`` (``"reference"`` is ``reference=0``).
    mi_method : str, optional
        Deprecated: use ``mi_estimator=``.

    Returns
    -------
    SymmetryReport
        ``str(report)`` is the table; ``.to_markdown()``, ``.to_html()``, ``.figures``, ``.files``.

    Raises
    ------
    FileExistsError
        ``out_dir`` is not empty and ``overwrite`` is False.

    Examples
    --------
    >>> runs = ps.train_runs(make_model, make_guide, (x, y), 8, steps=2000)
    >>> report = ps.diagnostics.symmetry_report(runs, data=(x_test, y_test), out_dir="report")
    >>> print(report)
    """
    reference, mi_estimator = _renamed_options(reference, mi_estimator, align, mi_method)
    align = "reference" if reference == 0 else reference
    _check_options(
        align=align,
        data=data,
        loss_fn=loss_fn,
        seed=seed,
        barrier_pairs=barrier_pairs,
        barrier_points=barrier_points,
        mi_samples=mi_samples,
        mi_permutations=mi_permutations,
        mmd_permutations=mmd_permutations,
        num_weights_plotted=num_weights_plotted,
    )
    check_int("max_bytes", max_bytes, minimum=1)
    if out_dir is not None:
        check_out_dir(Path(out_dir), overwrite)
    if is_streamed(runs):
        options = {"seed": seed, "mmd_permutations": mmd_permutations, "max_bytes": max_bytes, "progress": progress}
        report = _collection_report(runs, spec, chains, after, options, title)
        return _finish(report, figures, out_dir, overwrite, 0)
    if chains is not None or after is not None:
        raise TypeError("chains= and after= apply to a checkpoint Collection (or its dask-backed DataTree) only")
    steps = ["draws", "alignment", "R-hat/ESS", "I(g;w)", "barriers", "MMD", "figures", "files"]
    bar = tqdm(steps, desc="symmetry report", disable=not progress, leave=False)
    step = iter(bar)

    next(step)
    with warnings.catch_warnings():  # failed runs become notes of the report instead
        warnings.filterwarnings("ignore", message=r"run \d+ skipped")
        draws = gather_draws(runs, num_samples=num_samples, spec=spec, seed=seed, model=model)
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
        reference = 0 if align == "reference" else "barycenter"
        many = align_many(posteriors, spec, reference=reference, seed=seed, progress=progress)
    aligned = align_draws(draws, spec, align, alignment=many, **({} if many else {"progress": progress}))

    next(step)
    convergence = ConvergenceComparison(rhat_ess(draws), rhat_ess(aligned), draws, aligned)
    notes += parts.degenerate_notes(convergence)

    next(step)
    mi = parts.mi_section(posteriors, spec, (mi_estimator, mi_samples, mi_permutations), seed, progress, notes)

    next(step)
    options = {"pairs": barrier_pairs, "points": barrier_points, "seed": seed, "progress": progress}
    curves = parts.barriers(posteriors, many, loss_fn, data, draws.model, run_ids, options, notes)

    next(step)
    mmd_results, canonical = parts.mmd_section(draws, spec, mmd_permutations, seed, notes)
    shapes = {site: tuple(v.shape[2:]) for site, v in draws.samples.items()}
    rows = parts.rows(spec, convergence, mi, mmd_results, curves, shapes)
    info = parts.info(draws, rows, mi, align, canonical)
    report = SymmetryReport(rows, convergence, mi, curves, mmd_results, {}, info, notes, title, run_ids)

    next(step)
    report = _finish(report, figures, out_dir, overwrite, num_weights_plotted, curves)
    bar.close()
    return report


def _collection_report(runs: Any, spec: Any, chains: Any, after: Any, options: dict, title: str) -> SymmetryReport:
    """The report of a checkpoint collection (or its dask-backed tree), streamed."""
    got = streamed_sections(runs, spec, chains, after, options)
    return SymmetryReport(
        rows=got["rows"],
        convergence=got["convergence"],
        mutual_information={},
        barriers=[],
        mmd=got["mmd"],
        info=got["info"],
        notes=got["notes"],
        title=title,
        moments=got["moments"],
    )


def _finish(
    report: SymmetryReport, figures: bool | None, out_dir: Any, overwrite: bool, num_weights: int, curves: list = ()
) -> SymmetryReport:
    """Render the figures (when asked, or by default with ``out_dir``) and save."""
    if figures or (figures is None and out_dir is not None):
        try:
            report.figures.update(parts.figures(report.convergence, list(curves), num_weights))
        except Exception as e:  # noqa: BLE001 - e.g. matplotlib missing: the report without figures
            report.notes.append(parts.failure("The figures", e))
    if out_dir is not None:
        report.save(out_dir, overwrite=overwrite)
    return report
