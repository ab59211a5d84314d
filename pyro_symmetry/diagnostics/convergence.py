"""R-hat and ESS across runs, per layer and overall, before and after alignment.

Independent runs of a Bayesian network disagree about *which* neuron is which:
run ``r`` sits in the mode ``g_r # q``. Treated as MCMC chains, the runs then
have R-hat far above 1 for almost every weight. Aligning the runs (one group
element each, :func:`pyro_symmetry.align_many` to a barycenter) removes exactly
that disagreement; what R-hat still flags afterwards is real multi-modality
(different functions), not symmetry.

R-hat is the rank-normalized split R-hat and ESS the bulk ESS of
``arviz-stats`` (Vehtari et al., 2021), by default computed for all weights at once
(:mod:`pyro_symmetry.diagnostics._rank`, checked against ``arviz-stats``).
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from .._validation import check_real
from . import _trees
from ._layout import layer_of
from ._runs import check_enough_chains
from .inference_data import RunDraws, align_draws, collect_draws, draws_to_datatree

__all__ = ["ConvergenceComparison", "ConvergenceSummary", "layer_of", "rhat_ess", "rhat_ess_before_after"]

THRESHOLDS = (1.01, 1.1)


def _as_inf(x: np.ndarray) -> np.ndarray:
    """Undefined R-hats (NaN) as ``+inf``: never below a threshold, never dropped from a max."""
    return np.where(np.isnan(x), np.inf, x)


def _low_order_stat(x: np.ndarray, stat: Callable[[np.ndarray], Any]) -> float:
    """``stat`` (``np.min``, ``np.median``) of ESS values with NaN (undefined) ranked lowest.

    An undefined ESS can never raise an aggregate: the result is NaN when the
    statistic lands on (or averages with) an undefined value.
    """
    if not x.size:
        return float("nan")
    with np.errstate(invalid="ignore"):
        v = float(stat(np.where(np.isnan(x), -np.inf, x)))
    return v if np.isfinite(v) else float("nan")


def _fmt(x: float, fmt: str) -> str:
    return "n/a" if math.isnan(x) else format(x, fmt)


@dataclass(frozen=True, repr=False, eq=False)
class ConvergenceSummary:
    """Per-weight R-hat and bulk ESS with per-layer aggregates.

    Its ``repr`` is one line of overall aggregates (``str()`` prints the per-layer table).

    Degenerate draws never read as converged. A weight whose every (split) run is
    constant (point estimates, ``AutoDelta``, Gaussians with tiny scales) has R-hat
    ``inf`` when the runs differ and NaN (undefined) when every draw is equal; its
    ESS is NaN (undefined: a constant run says nothing about mixing; ArviZ's number
    there is the total draw count, or more). Aggregates treat them pessimistically:

    * :meth:`fraction_above` counts a NaN R-hat as above every threshold (as ``inf``);
    * :meth:`row` takes ``rhat_max``/``rhat_median`` with NaN as ``inf``, and
      ``ess_min``/``ess_median`` with NaN ranked lowest (so ``ess_min`` is NaN as soon
      as one weight is degenerate), and counts the ``degenerate`` weights.

    Attributes
    ----------
    rhat, ess : dict ``site -> ndarray (*site_shape)``
    layers : dict ``site -> layer name``
    num_chains, num_draws : int
    degenerate : dict ``site -> bool ndarray (*site_shape)``, optional
        Weights with zero within-run variance (default: where R-hat is not finite).
    """

    rhat: dict[str, np.ndarray]
    ess: dict[str, np.ndarray]
    layers: dict[str, str]
    num_chains: int
    num_draws: int
    degenerate: dict[str, np.ndarray] | None = None

    def __post_init__(self) -> None:
        if self.degenerate is None:
            object.__setattr__(self, "degenerate", {s: ~np.isfinite(np.asarray(r)) for s, r in self.rhat.items()})

    def _values(self, which: dict[str, np.ndarray], layer: str | None) -> np.ndarray:
        sites = [s for s in which if layer is None or self.layers[s] == layer]
        return np.concatenate([np.ravel(which[s]) for s in sites]) if sites else np.empty(0)

    @property
    def layer_names(self) -> list[str]:
        return list(dict.fromkeys(self.layers.values()))

    def fraction_above(self, threshold: float, layer: str | None = None) -> float:
        """Fraction of the weights (of one layer, or all) with R-hat above ``threshold``.

        A weight whose R-hat is ``inf`` (constant runs that differ) or undefined (NaN:
        every draw equal) counts as above every threshold: it is not shown converged.
        """
        threshold = check_real("threshold", threshold)
        r = self._values(self.rhat, layer).astype(float)
        return float(np.mean(_as_inf(r) > threshold)) if r.size else float("nan")

    def num_degenerate(self, layer: str | None = None) -> int:
        """Number of weights (of one layer, or all) whose runs are all constant."""
        return int(self._values(self.degenerate, layer).sum())

    def row(self, layer: str | None = None) -> dict[str, Any]:
        """Aggregates of one layer (``None``: every weight); see the class notes on
        degenerate draws."""
        r, e = _as_inf(self._values(self.rhat, layer).astype(float)), self._values(self.ess, layer).astype(float)
        return {
            "layer": "all" if layer is None else layer,
            "num_weights": int(r.size),
            "rhat_max": float(r.max()) if r.size else float("nan"),
            "rhat_median": float(np.median(r)) if r.size else float("nan"),
            **{f"frac_rhat>{t}": self.fraction_above(t, layer) for t in THRESHOLDS},
            "ess_min": _low_order_stat(e, np.min),
            "ess_median": _low_order_stat(e, np.median),
            "degenerate": self.num_degenerate(layer),
        }

    def table(self) -> list[dict[str, Any]]:
        """One row per layer and a last row ``"all"``."""
        return [self.row(layer) for layer in self.layer_names] + [self.row(None)]

    def __repr__(self) -> str:
        row = self.row(None)
        return (
            f"ConvergenceSummary(chains={self.num_chains}, draws={self.num_draws}, weights={row['num_weights']}, "
            f"layers={len(self.layer_names)}, rhat_max={_fmt(row['rhat_max'], '.4g')}, "
            f"frac_rhat>1.01={row['frac_rhat>1.01']:.3g}, ess_min={_fmt(row['ess_min'], '.4g')}, "
            f"degenerate={row['degenerate']})"
        )

    def __str__(self) -> str:
        head = (
            f"{'layer':<12}{'weights':>9}{'Rhat max':>10}{'Rhat med':>10}{'>1.01':>8}{'>1.1':>8}{'ESS min':>9}"
            f"{'degenerate':>12}"
        )
        lines = [head]
        for row in self.table():
            lines.append(
                f"{row['layer']:<12}{row['num_weights']:>9}{_fmt(row['rhat_max'], '.3f'):>10}"
                f"{_fmt(row['rhat_median'], '.3f'):>10}{row['frac_rhat>1.01']:>8.1%}{row['frac_rhat>1.1']:>8.1%}"
                f"{_fmt(row['ess_min'], '.1f'):>9}{row['degenerate']:>12}"
            )
        return "\n".join(lines)


def _posterior_dataset(data: Any) -> Any:
    """The posterior as an xarray Dataset: of a DataTree (also loaded from netCDF/zarr), a
    legacy InferenceData, a Dataset, RunDraws, or draws of anything ``collect_draws`` reads."""
    if isinstance(data, RunDraws):
        data = draws_to_datatree(data)
    if _trees.is_arviz(data):
        ds = _trees.group(data, "posterior")
        if ds is None:
            raise ValueError(f"the {type(data).__name__} has no 'posterior' group")
        return ds
    try:
        draws = collect_draws(data)
    except TypeError:
        raise TypeError(
            "expected an ArviZ DataTree/InferenceData with a 'posterior' group, an xarray Dataset, RunDraws, "
            f"or draws (a Pyro MCMC, a list of sample dicts); got {type(data).__name__}"
        ) from None
    return _posterior_dataset(draws)


def rhat_ess(
    data: Any,
    *,
    var_names: Sequence[str] | None = None,
    layers: Mapping[str, str] | None = None,
    method: str = "rank",
    engine: str = "vectorized",
    chains: Any = None,
) -> ConvergenceSummary:
    """R-hat and bulk ESS of every weight, treating runs as chains.

    A checkpoint :class:`~pyro_symmetry.collections.Collection`, or an ArviZ tree whose draws
    are dask arrays (``to_inference_data(collection, chains=...)``), is computed by streaming
    (:func:`pyro_symmetry.diagnostics.collections.rhat_ess`: a block of weights at a time,
    never the whole collection in memory), with the same numbers.

    Parameters
    ----------
    data : xarray.DataTree (from :func:`to_inference_data`, or loaded from netCDF/zarr), a legacy
        ``arviz.InferenceData``, an xarray Dataset, RunDraws, or draws (a Pyro MCMC)
        Needs at least 2 chains and 4 draws per chain (split R-hat halves chains).
    var_names : sequence of str, optional
        Sites to include (default: all posterior variables).
    layers : mapping ``site -> layer``, optional
        Grouping for the per-layer rows (default :func:`layer_of`).
    method : str
        R-hat method of ``arviz_stats.rhat`` (default rank-normalized split R-hat).
    engine : {"vectorized", "arviz"}
        ``"vectorized"`` (default, ``method="rank"`` only) computes the same
        rank-normalized split R-hat and bulk ESS as ``arviz_stats`` for every weight at
        once; ``"arviz"`` calls ``arviz_stats.rhat``/``ess``, which loop over the
        weights in Python (about 2 ms each: minutes for a network's worth; see
        ``benchmarks/rhat.py``).
    chains : optional
        For a Collection: which checkpoints form each chain (see
        :func:`pyro_symmetry.diagnostics.collections.chain_groups`).

    Returns
    -------
    ConvergenceSummary
        Weights whose runs are all constant are flagged ``degenerate``: R-hat ``inf``
        (runs differ) or NaN (undefined: all equal), ESS NaN; both count as not
        converged (see :class:`ConvergenceSummary`).

    Raises
    ------
    ValueError
        Fewer than 2 chains or 4 draws, unknown ``var_names``, or NaN/Inf draws.
    """
    if engine not in ("vectorized", "arviz"):
        raise ValueError(f"engine must be 'vectorized' or 'arviz', got {engine!r}")
    if _streamed(data):
        if (method, engine) != ("rank", "vectorized"):
            raise ValueError("a collection (or a dask-backed tree) is streamed with method='rank', engine='vectorized'")
        from ._collection_data import rhat_ess as streamed_rhat_ess

        return streamed_rhat_ess(data, chains=chains, var_names=var_names, layers=layers)
    if chains is not None:
        raise TypeError("chains= applies to a checkpoint Collection only (runs and trees already have chains)")
    if engine == "vectorized" and method != "rank":
        raise ValueError(f"engine='vectorized' computes method='rank' only; use engine='arviz' for {method!r}")

    ds = _posterior_dataset(data)
    names = list(ds.data_vars) if var_names is None else list(var_names)
    missing = [v for v in names if v not in ds.data_vars]
    if missing:
        raise ValueError(f"var_names {missing} are not in the posterior (have {list(ds.data_vars)})")
    ds = ds[names]
    num_chains, num_draws = int(ds.sizes.get("chain", 0)), int(ds.sizes.get("draw", 0))
    if num_chains < 2 or num_draws < 4:
        raise ValueError(f"R-hat needs >= 2 chains (runs) of >= 4 draws, got {num_chains} chains of {num_draws} draws")
    from ._rank import degenerate, ess_bulk, rhat_rank  # scipy.stats: imported on first use, not with the package

    rhat, ess, degen = {}, {}, {}
    for v in names:  # one variable at a time: peak memory is one site's draws
        da = ds[v].transpose("chain", "draw", ...)
        x = np.asarray(da.values, dtype=float).reshape(num_chains, num_draws, -1)
        bad = int(x.size - np.count_nonzero(np.isfinite(x)))
        if bad:
            raise ValueError(
                f"the draws of {v!r} hold {bad} NaN or Inf values: R-hat/ESS of non-finite draws are meaningless "
                "(a diverged run? drop it or fix it first)"
            )
        degen[v] = degenerate(x).reshape(da.shape[2:])
        if engine == "vectorized":
            rhat[v], ess[v] = rhat_rank(x).reshape(da.shape[2:]), ess_bulk(x).reshape(da.shape[2:])
    if engine == "arviz":
        import arviz_stats as azs

        r, e = azs.rhat(ds, method=method), azs.ess(ds, method="bulk")
        rhat = {v: np.asarray(r[v].values, dtype=float) for v in names}
        ess = {v: np.asarray(e[v].values, dtype=float) for v in names}
    for v in names:  # ESS of constant runs is undefined, whatever the estimator returns there
        ess[v] = np.where(degen[v], np.nan, ess[v])
    layers = dict(layers) if layers is not None else {}
    return ConvergenceSummary(
        rhat=rhat,
        ess=ess,
        layers={v: layers.get(v, layer_of(v)) for v in names},
        num_chains=num_chains,
        num_draws=num_draws,
        degenerate=degen,
    )


@dataclass(frozen=True, repr=False, eq=False)
class ConvergenceComparison:
    """R-hat/ESS of the same draws before and after alignment.

    Its ``repr`` is one line: the largest R-hat and the share of weights above 1.01,
    before -> after (the draws themselves are not printed).
    """

    before: ConvergenceSummary
    after: ConvergenceSummary
    draws_before: RunDraws
    draws_after: RunDraws

    def table(self) -> list[dict[str, Any]]:
        """Per-layer rows with ``*_before`` and ``*_after`` columns."""
        rows = []
        for b, a in zip(self.before.table(), self.after.table()):
            row = {"layer": b["layer"], "num_weights": b["num_weights"]}
            for k in b:
                if k not in row:
                    row[f"{k}_before"], row[f"{k}_after"] = b[k], a[k]
            rows.append(row)
        return rows

    def __repr__(self) -> str:
        b = self.before.row(None)
        a = self.after.row(None) if self.after is not None else None  # a collection report without after=
        after_max = _fmt(a["rhat_max"], ".4g") if a is not None else "-"
        after_frac = f"{a['frac_rhat>1.01']:.3g}" if a is not None else "-"
        return (
            f"ConvergenceComparison(chains={self.before.num_chains}, draws={self.before.num_draws}, "
            f"weights={b['num_weights']}, rhat_max={_fmt(b['rhat_max'], '.4g')} -> {after_max}, "
            f"frac_rhat>1.01={b['frac_rhat>1.01']:.3g} -> {after_frac})"
        )


def rhat_ess_before_after(
    runs: Any,
    spec: Any = None,
    *,
    reference: str = "barycenter",
    num_samples: int = 100,
    seed: int = 0,
    draws: RunDraws | None = None,
    **align_kwargs: Any,
) -> ConvergenceComparison:
    """R-hat/ESS across runs before and after removing the permutation symmetry.

    Parameters
    ----------
    runs : as :func:`to_inference_data` (ignored when ``draws`` is given)
        Also one ArviZ tree (``DataTree``, ``InferenceData``, loaded from netCDF) or MCMC: its
        chains are re-aligned draw by draw. Failed runs (``run.error`` set) are skipped with a
        warning; ``ValueError`` if fewer than 2 remain.
    spec : PermutationSpec, optional (default: the model's ``.spec``)
    reference : {"barycenter", "reference"}
        What the runs are aligned to (as :func:`align_draws`): an iteratively refined
        barycenter, or run 0. ``align=`` is a deprecated spelling.
    num_samples : int
        Draws of the weights per run.
    seed : int
        Seeds the draws of the weights and the alignment (unless ``align_kwargs`` has its
        own ``seed``); torch's global RNG is left as found.
    draws : RunDraws, optional
        Reuse draws already collected with :func:`collect_draws`.
    **align_kwargs : passed to :func:`align_draws`.

    Returns
    -------
    ConvergenceComparison
        ``.before``/``.after`` summaries; ``.after.fraction_above(1.01)`` is the
        share of weights still unconverged once symmetry is removed.
    """
    if "align" in align_kwargs:
        warnings.warn(
            "rhat_ess_before_after(align=...) is deprecated; use reference=...", DeprecationWarning, stacklevel=2
        )
        reference = align_kwargs.pop("align")
    if draws is None:
        draws = collect_draws(runs, num_samples=num_samples, spec=spec, seed=seed)
    check_enough_chains(draws, 2, "R-hat across runs")
    align_kwargs.setdefault("seed", seed)  # the alignment's random restarts too: torch's RNG is left as found
    aligned = align_draws(draws, spec, reference, **align_kwargs)  # positional: align_draws' own name may differ
    return ConvergenceComparison(rhat_ess(draws), rhat_ess(aligned), draws, aligned)


def _streamed(data: Any) -> bool:
    """A checkpoint Collection, or an ArviZ tree / Dataset whose draws are dask arrays."""
    from ..collections import Collection

    if isinstance(data, Collection):
        return True
    post = data["posterior"] if getattr(data, "children", None) and "posterior" in data.children else data
    values = getattr(post, "data_vars", None)
    return bool(values) and any(type(v.data).__module__.startswith("dask") for v in values.values())
