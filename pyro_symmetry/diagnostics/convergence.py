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

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from .inference_data import RunDraws, align_draws, collect_draws, draws_to_datatree

__all__ = ["ConvergenceComparison", "ConvergenceSummary", "layer_of", "rhat_ess", "rhat_ess_before_after"]

THRESHOLDS = (1.01, 1.1)


def layer_of(site: str) -> str:
    """The layer a site belongs to: its name without the last part (``fc1.weight -> fc1``)."""
    return site.rsplit(".", 1)[0] if "." in site else site


@dataclass(frozen=True)
class ConvergenceSummary:
    """Per-weight R-hat and bulk ESS with per-layer aggregates.

    Attributes
    ----------
    rhat, ess : dict ``site -> ndarray (*site_shape)``
    layers : dict ``site -> layer name``
    num_chains, num_draws : int
    """

    rhat: dict[str, np.ndarray]
    ess: dict[str, np.ndarray]
    layers: dict[str, str]
    num_chains: int
    num_draws: int

    def _values(self, which: dict[str, np.ndarray], layer: str | None) -> np.ndarray:
        sites = [s for s in which if layer is None or self.layers[s] == layer]
        return np.concatenate([np.ravel(which[s]) for s in sites]) if sites else np.empty(0)

    @property
    def layer_names(self) -> list[str]:
        return list(dict.fromkeys(self.layers.values()))

    def fraction_above(self, threshold: float, layer: str | None = None) -> float:
        """Fraction of the weights (of one layer, or all) with R-hat above ``threshold``.

        Weights whose R-hat is undefined (constant draws) count as not above.
        """
        r = self._values(self.rhat, layer)
        return float(np.mean(np.nan_to_num(r, nan=0.0) > threshold)) if r.size else float("nan")

    def row(self, layer: str | None = None) -> dict[str, Any]:
        """Aggregates of one layer (``None``: every weight)."""
        r, e = self._values(self.rhat, layer), self._values(self.ess, layer)
        finite = r[np.isfinite(r)]
        return {
            "layer": "all" if layer is None else layer,
            "num_weights": int(r.size),
            "rhat_max": float(finite.max()) if finite.size else float("nan"),
            "rhat_median": float(np.median(finite)) if finite.size else float("nan"),
            **{f"frac_rhat>{t}": self.fraction_above(t, layer) for t in THRESHOLDS},
            "ess_min": float(np.nanmin(e)) if e.size else float("nan"),
            "ess_median": float(np.nanmedian(e)) if e.size else float("nan"),
        }

    def table(self) -> list[dict[str, Any]]:
        """One row per layer and a last row ``"all"``."""
        return [self.row(layer) for layer in self.layer_names] + [self.row(None)]

    def __str__(self) -> str:
        head = f"{'layer':<12}{'weights':>9}{'Rhat max':>10}{'Rhat med':>10}{'>1.01':>8}{'>1.1':>8}{'ESS min':>9}"
        lines = [head]
        for row in self.table():
            lines.append(
                f"{row['layer']:<12}{row['num_weights']:>9}{row['rhat_max']:>10.3f}{row['rhat_median']:>10.3f}"
                f"{row['frac_rhat>1.01']:>8.1%}{row['frac_rhat>1.1']:>8.1%}{row['ess_min']:>9.1f}"
            )
        return "\n".join(lines)


def _posterior_dataset(data: Any) -> Any:
    if isinstance(data, RunDraws):
        data = draws_to_datatree(data)
    if hasattr(data, "children") and "posterior" in data.children:
        return data["posterior"].to_dataset()
    if hasattr(data, "data_vars"):
        return data
    raise TypeError(
        f"expected an ArviZ DataTree with a 'posterior' group, an xarray Dataset or RunDraws; got {type(data).__name__}"
    )


def rhat_ess(
    data: Any,
    *,
    var_names: Sequence[str] | None = None,
    layers: Mapping[str, str] | None = None,
    method: str = "rank",
    engine: str = "vectorized",
) -> ConvergenceSummary:
    """R-hat and bulk ESS of every weight, treating runs as chains.

    Parameters
    ----------
    data : xarray.DataTree (from :func:`to_inference_data`), xarray.Dataset, or RunDraws
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

    Returns
    -------
    ConvergenceSummary
    """
    if engine not in ("vectorized", "arviz"):
        raise ValueError(f"engine must be 'vectorized' or 'arviz', got {engine!r}")
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
    if engine == "arviz":
        import arviz_stats as azs

        r, e = azs.rhat(ds, method=method), azs.ess(ds, method="bulk")
        rhat = {v: np.asarray(r[v].values, dtype=float) for v in names}
        ess = {v: np.asarray(e[v].values, dtype=float) for v in names}
    else:
        from ._rank import ess_bulk, rhat_rank  # scipy.stats: imported on first use, not with the package

        rhat, ess = {}, {}
        for v in names:
            da = ds[v].transpose("chain", "draw", ...)
            x = np.asarray(da.values, dtype=float).reshape(num_chains, num_draws, -1)
            shape = da.shape[2:]
            rhat[v], ess[v] = rhat_rank(x).reshape(shape), ess_bulk(x).reshape(shape)
    layers = dict(layers) if layers is not None else {}
    return ConvergenceSummary(
        rhat=rhat,
        ess=ess,
        layers={v: layers.get(v, layer_of(v)) for v in names},
        num_chains=num_chains,
        num_draws=num_draws,
    )


@dataclass(frozen=True)
class ConvergenceComparison:
    """R-hat/ESS of the same draws before and after alignment."""

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


def rhat_ess_before_after(
    runs: Any,
    spec: Any = None,
    *,
    align: str = "barycenter",
    num_samples: int = 100,
    seed: int = 0,
    draws: RunDraws | None = None,
    **align_kwargs: Any,
) -> ConvergenceComparison:
    """R-hat/ESS across runs before and after removing the permutation symmetry.

    Parameters
    ----------
    runs : as :func:`to_inference_data` (ignored when ``draws`` is given)
    spec : PermutationSpec, optional (default: the model's ``.spec``)
    align : {"barycenter", "reference"}
    num_samples : int
        Draws per run.
    seed : int
    draws : RunDraws, optional
        Reuse draws already collected with :func:`collect_draws`.
    **align_kwargs : passed to :func:`align_draws`.

    Returns
    -------
    ConvergenceComparison
        ``.before``/``.after`` summaries; ``.after.fraction_above(1.01)`` is the
        share of weights still unconverged once symmetry is removed.
    """
    if draws is None:
        draws = collect_draws(runs, num_samples=num_samples, spec=spec, seed=seed)
    aligned = align_draws(draws, spec, align, **align_kwargs)
    return ConvergenceComparison(rhat_ess(draws), rhat_ess(aligned), draws, aligned)
