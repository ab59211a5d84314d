"""Diagnostics: ArviZ data, R-hat/ESS before and after alignment, symmetry-aware
MMD, uncertainty metrics and the symmetry report.

This package is the only part of ``pyro_symmetry`` that imports ArviZ
(``arviz-base``, ``arviz-stats``) and, lazily inside plotting functions,
matplotlib::

    ps.diagnostics.to_inference_data(runs, data=(x, y))        # xarray.DataTree, ArviZ groups
    ps.diagnostics.rhat_ess_before_after(runs, spec)           # R-hat/ESS per layer
    ps.diagnostics.mmd(x, y, symmetry_aware=True, spec=spec)   # MMDResult
    ps.diagnostics.metrics.expected_calibration_error(probs, y)
    ps.diagnostics.symmetry_report(runs, spec, data=(x, y), out_dir="report")

Checkpoint collections (:mod:`pyro_symmetry.collections`, read lazily) are accepted by
``to_inference_data`` (a tree backed by dask arrays) and ``mmd`` (streamed estimators);
the rest of their streamed diagnostics (R-hat/ESS block by block, moments, predictive
metrics and ensemble diversity) are in ``ps.diagnostics.collections``.
"""

from . import collections, convergence, draws, inference_data, kernel_mmd, metrics, plots, report
from .convergence import ConvergenceComparison, ConvergenceSummary, rhat_ess, rhat_ess_before_after
from .draws import RunDraws, align_draws, collect_draws, with_model_data
from .inference_data import draws_to_datatree, site_dims, to_inference_data
from .kernel_mmd import MMDResult, canonical_form, mmd, mmd2_unbiased
from .report import SymmetryReport, symmetry_report

__all__ = [
    "ConvergenceComparison",
    "ConvergenceSummary",
    "MMDResult",
    "RunDraws",
    "SymmetryReport",
    "align_draws",
    "canonical_form",
    "collect_draws",
    "collections",
    "convergence",
    "draws",
    "draws_to_datatree",
    "inference_data",
    "kernel_mmd",
    "metrics",
    "mmd",
    "mmd2_unbiased",
    "plots",
    "report",
    "rhat_ess",
    "rhat_ess_before_after",
    "site_dims",
    "symmetry_report",
    "to_inference_data",
    "with_model_data",
]
