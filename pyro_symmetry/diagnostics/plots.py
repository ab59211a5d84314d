"""Figures of the symmetry report (matplotlib, imported lazily).

Every function returns a ``matplotlib.figure.Figure`` built without ``pyplot``
(no global state, no display backend needed) and, with ``path``, saves it as PNG;
:func:`png_bytes` renders one for embedding (the report's HTML is one self-contained
file). Draws may be given as mappings ``site -> (chain, draw, *shape)`` or as anything
holding draws (an ArviZ ``DataTree``, also loaded from netCDF, a legacy ``InferenceData``,
:class:`~pyro_symmetry.diagnostics.RunDraws`, a Pyro ``MCMC``).
"""

from __future__ import annotations

import io
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ._inputs import chain_draws

__all__ = ["plot_barriers", "plot_marginals", "plot_ranks", "plot_rhat_hist", "png_bytes", "select_weights"]

_DPI = 100


def _figure(nrows: int, ncols: int, size: tuple[float, float]) -> tuple[Any, np.ndarray]:
    try:
        from matplotlib.figure import Figure
    except ImportError as e:  # pragma: no cover - exercised only without matplotlib
        raise ImportError(
            "pyro_symmetry.diagnostics plots need matplotlib: pip install 'pyro-symmetry[plots]' (or matplotlib)"
        ) from e
    fig = Figure(figsize=size, layout="constrained")
    axes = np.atleast_2d(fig.subplots(nrows, ncols, squeeze=False))
    return fig, axes


def _save(fig: Any, path: str | Path | None) -> Any:
    if path is not None:
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        fig.savefig(path, dpi=_DPI)
    return fig


def png_bytes(fig: Any) -> bytes:
    """The figure as PNG bytes (for a ``data:`` URI)."""
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=_DPI)
    return buf.getvalue()


def _rhat_values(x: Any) -> Mapping[str, np.ndarray]:
    """R-hat values: a mapping ``site -> ndarray`` as given, else computed from draws."""
    from ._trees import is_arviz

    plain = isinstance(x, Mapping) and not is_arviz(x)  # (a DataTree is a mapping too)
    if plain and not any(torch.is_tensor(v) for v in x.values()):
        return x
    from .convergence import rhat_ess
    from .draws import RunDraws

    return rhat_ess(RunDraws(dict(x)) if plain else x).rhat


def plot_rhat_hist(before: Any, after: Any, path: str | Path | None = None) -> Any:
    """Histograms of every weight's R-hat before and after alignment (log x axis).

    Parameters
    ----------
    before, after : mapping ``site -> ndarray`` of R-hat values (``ConvergenceSummary.rhat``),
        or the draws themselves (a tree, ``RunDraws``, a mapping ``site -> Tensor (chain, draw, ...)``)
    """
    before, after = _rhat_values(before), _rhat_values(after)
    b_all = np.concatenate([np.ravel(v) for v in before.values()]).astype(float)
    a_all = np.concatenate([np.ravel(v) for v in after.values()]).astype(float)
    b, a = b_all[np.isfinite(b_all)], a_all[np.isfinite(a_all)]
    hi = max(float(b.max(initial=1.2)), float(a.max(initial=1.2)), 1.2)
    lo = min(float(b.min(initial=1.0)), float(a.min(initial=1.0)), 0.99)
    bins = np.geomspace(lo, hi, 50)
    fig, axes = _figure(1, 1, (6.0, 3.2))
    ax = axes[0, 0]
    ax.hist(b, bins=bins, alpha=0.6, label=_rhat_label("before", b_all), color="tab:red")
    ax.hist(a, bins=bins, alpha=0.6, label=_rhat_label("after", a_all), color="tab:blue")
    for t, ls in ((1.01, ":"), (1.1, "--")):
        ax.axvline(t, color="k", lw=0.8, ls=ls, label=f"R-hat = {t}")
    ax.set_xscale("log")
    ticks = [t for t in (1.0, 1.1, 1.5, 2.0, 3.0, 5.0, 10.0) if lo <= t <= hi]
    ax.set_xticks(ticks, [f"{t:g}" for t in ticks])
    ax.minorticks_off()
    ax.set_xlabel("R-hat (rank-normalized split) of each weight across runs")
    ax.set_ylabel("weights")
    ax.legend(fontsize=8)
    return _save(fig, path)


def _rhat_label(when: str, r: np.ndarray) -> str:
    """Legend entry: the share above 1.1 of *all* weights, an infinite or undefined R-hat
    (degenerate draws) counted above, and how many such weights the histogram cannot show."""
    above = np.mean(np.where(np.isnan(r), np.inf, r) > 1.1) if r.size else float("nan")
    hidden = int(r.size - np.isfinite(r).sum())
    return f"{when} alignment ({above:.0%} > 1.1" + (f"; {hidden} inf/undefined not shown)" if hidden else ")")


def select_weights(score: Mapping[str, np.ndarray], num: int = 4) -> list[tuple[str, tuple[int, ...]]]:
    """The ``num`` weights ``(site, index)`` with the largest ``score`` (e.g. R-hat, or
    its drop under alignment), one per site first so the figure shows several layers."""
    ranked = []
    for site, r in score.items():
        flat = np.nan_to_num(np.ravel(r), nan=-np.inf)
        for i in np.argsort(-flat)[:num]:
            ranked.append((float(flat[i]), site, tuple(int(j) for j in np.unravel_index(i, np.shape(r)))))
    ranked.sort(key=lambda t: -t[0])
    picked, seen = [], set()
    for _, site, idx in ranked:
        if site not in seen and len(picked) < num:
            picked.append((site, idx))
            seen.add(site)
    for _, site, idx in ranked:
        if len(picked) >= num:
            break
        if (site, idx) not in picked:
            picked.append((site, idx))
    return picked


def _values(samples: Mapping[str, torch.Tensor], site: str, idx: tuple[int, ...]) -> np.ndarray:
    """``(chains, draws)`` of one weight."""
    return samples[site][(slice(None), slice(None), *idx)].detach().cpu().double().numpy()


def plot_marginals(
    before: Any,
    after: Any,
    weights: Sequence[tuple[str, tuple[int, ...]]],
    path: str | Path | None = None,
) -> Any:
    """Per-run marginals of a few weights, before (top row) and after (bottom) alignment.

    Parameters
    ----------
    before, after : mapping ``site -> Tensor (chains, draws, *shape)``, or draws (an ArviZ tree,
        ``RunDraws``, an MCMC)
    weights : sequence of ``(site, index)``
    """
    before, after = chain_draws(before, "before"), chain_draws(after, "after")
    fig, axes = _figure(2, len(weights), (2.6 * len(weights), 4.4))
    for col, (site, idx) in enumerate(weights):
        for row, (samples, label) in enumerate(((before, "before"), (after, "after"))):
            v = _values(samples, site, idx)
            ax = axes[row, col]
            bins = np.linspace(v.min(), v.max(), 30) if v.max() > v.min() else 10
            for c in range(v.shape[0]):
                ax.hist(v[c], bins=bins, histtype="step", density=True, color=f"C{c % 10}", lw=1.0)
            ax.set_title(f"{site}{list(idx)}\n{label} alignment", fontsize=8)
            ax.tick_params(labelsize=7)
    axes[0, 0].set_ylabel("density (one colour per run)", fontsize=8)
    return _save(fig, path)


def plot_ranks(
    before: Any,
    after: Any,
    weights: Sequence[tuple[str, tuple[int, ...]]],
    path: str | Path | None = None,
    num_bins: int = 10,
) -> Any:
    """Rank plots (Vehtari et al., 2021): for each run, the histogram of its draws'
    ranks among the pooled draws. Converged runs give flat histograms. ``before``/``after``
    as in :func:`plot_marginals`."""
    from scipy.stats import rankdata

    before, after = chain_draws(before, "before"), chain_draws(after, "after")
    fig, axes = _figure(2, len(weights), (2.6 * len(weights), 4.4))
    for col, (site, idx) in enumerate(weights):
        for row, (samples, label) in enumerate(((before, "before"), (after, "after"))):
            v = _values(samples, site, idx)
            ranks = rankdata(v.ravel()).reshape(v.shape)
            edges = np.linspace(0.5, v.size + 0.5, num_bins + 1)
            ax = axes[row, col]
            for c in range(v.shape[0]):
                counts, _ = np.histogram(ranks[c], bins=edges)
                ax.stairs(counts, edges, color=f"C{c % 10}", lw=1.0)
            ax.axhline(v.shape[1] / num_bins, color="k", lw=0.8, ls="--")  # uniform ranks
            ax.set_title(f"{site}{list(idx)}\n{label} alignment", fontsize=8)
            ax.tick_params(labelsize=7)
    axes[1, 0].set_xlabel("rank among all draws", fontsize=8)
    axes[0, 0].set_ylabel("draws per rank bin (one colour per run)", fontsize=8)
    return _save(fig, path)


def plot_barriers(curves: Sequence[tuple[str, Any, Any]], path: str | Path | None = None, ylabel: str = "loss") -> Any:
    """Loss along the interpolation path between pairs of runs, before and after alignment.

    Parameters
    ----------
    curves : sequence of ``(label, before, after)`` with ``BarrierResult`` s
    """
    fig, axes = _figure(1, 1, (5.5, 3.4))
    ax = axes[0, 0]
    for i, (label, before, after) in enumerate(curves):
        ax.plot(before.t.numpy(), before.losses.numpy(), ls="--", color=f"C{i}", label=f"{label}: before")
        ax.plot(after.t.numpy(), after.losses.numpy(), ls="-", color=f"C{i}", label=f"{label}: after")
    ax.set_xlabel("t (interpolation from run a to run b)")
    ax.set_ylabel(ylabel)
    ax.legend(fontsize=7, ncol=2)
    return _save(fig, path)
