"""Rank-normalized split R-hat and bulk ESS, vectorized over every weight at once.

The same statistics as ``arviz_stats.rhat(method="rank")`` and
``arviz_stats.ess(method="bulk")`` (Vehtari, Gelman, Simpson, Carpenter, Bürkner 2021,
"Rank-normalization, folding, and localization: an improved R-hat"), computed for all
elements of a ``(chain, draw, n)`` array in a few numpy calls. ArviZ evaluates them one
element at a time in Python (about 2 ms per weight), which is minutes for the tens of
thousands of weights of a BNN; here the cost is a sort and an FFT over the whole array.
``tests/test_diagnostics_convergence.py`` checks the results against ``arviz_stats``.

Degenerate draws (zero within-chain variance) are handled exactly, not by round-off:

* every split chain constant but the chains differ (MAP runs, ``AutoDelta``, tiny
  scales): R-hat is ``inf`` (not converged). ArviZ returns ``inf`` or, when
  ``np.var`` of identical values rounds to ~1e-34 instead of 0, a finite ~1e16;
  variances here are taken about the first element, so identical values give 0;
* every draw of every chain equal: R-hat is NaN (undefined), as in ArviZ;
* the bulk R-hat defined and the folded one 0/0 (two-valued draws symmetric about
  their median): R-hat is the bulk one, as ArviZ's ``max(bulk, tail)`` gives (a plain
  ``np.maximum`` would return NaN, which callers then miscount as converged).

:func:`degenerate` flags the weights whose split chains are all constant; bulk ESS
there is ArviZ's number (the total draw count when all draws agree, a number
unrelated to mixing otherwise), which callers should not read as an ESS.
"""

from __future__ import annotations

import numpy as np
from scipy import stats
from scipy.fft import irfft, next_fast_len, rfft
from scipy.special import ndtri

__all__ = ["degenerate", "ess_bulk", "rhat_rank"]


def _split_chains(x: np.ndarray) -> np.ndarray:
    """``(C, N, n) -> (2C, N // 2, n)``: first and last halves (the middle draw of an odd N is dropped)."""
    half = x.shape[1] // 2
    return np.concatenate([x[:, :half], x[:, x.shape[1] - half :]], axis=0)


def _z_scale(x: np.ndarray) -> np.ndarray:
    """Normal scores of the ranks pooled over chains and draws (average ranks for ties, Blom's offset)."""
    c, d, n = x.shape
    # Rank along a contiguous last axis (one row per element): several times faster than axis 0.
    pooled = np.ascontiguousarray(x.reshape(c * d, n).T)
    ranks = stats.rankdata(pooled, method="average", axis=-1)
    return ndtri((ranks - 3 / 8) / (c * d - 2 * 3 / 8 + 1)).T.reshape(c, d, n)


def _var(x: np.ndarray, axis: int) -> np.ndarray:
    """``np.var(x, axis, ddof=1)`` taken about the first element along ``axis``.

    The same value up to round-off, but exactly 0 for identical values (``np.var`` of
    n copies of one float is often ~1e-34, which turns a zero within-chain variance
    into a finite R-hat of ~1e16 instead of ``inf``).
    """
    return np.var(x - np.take(x, [0], axis=axis), axis=axis, ddof=1)


def _rhat(x: np.ndarray) -> np.ndarray:
    """Classic R-hat of ``(chains, draws, n)``: ``inf`` for constant chains that differ,
    NaN when every value is equal."""
    d = x.shape[1]
    between = d * _var(x.mean(1), axis=0)
    within = _var(x, axis=1).mean(0)
    with np.errstate(divide="ignore", invalid="ignore"):  # 0/0 -> NaN, b/0 -> inf
        return np.sqrt((between / within + d - 1) / d)


def rhat_rank(x: np.ndarray) -> np.ndarray:
    """Rank-normalized split R-hat, the larger of the bulk and the folded (tail) one.

    Parameters
    ----------
    x : ndarray ``(chains, draws, n)``, finite, ``chains >= 2``, ``draws >= 4``

    Returns
    -------
    ndarray ``(n,)``
        ``inf`` where every split chain is constant but they differ (not converged),
        NaN where every draw is equal (undefined).
    """
    split = _split_chains(np.asarray(x, dtype=float))
    bulk = _rhat(_z_scale(split))
    folded = np.abs(split - np.median(split.reshape(-1, split.shape[-1]), axis=0))
    # fmax: a 0/0 folded R-hat must not hide a defined bulk one (ArviZ's max(bulk, tail)).
    return np.fmax(bulk, _rhat(_z_scale(folded)))


def degenerate(x: np.ndarray) -> np.ndarray:
    """``(n,)`` bool: every split chain of the weight is constant (zero within-chain variance).

    R-hat is then ``inf`` (the chains differ) or NaN (all equal) and ESS is undefined.

    Parameters
    ----------
    x : ndarray ``(chains, draws, n)``
    """
    split = _split_chains(np.asarray(x, dtype=float))
    return (split.max(1) == split.min(1)).all(0)


def _autocov(x: np.ndarray) -> np.ndarray:
    """Biased autocovariance of every chain at every lag, along the draw axis."""
    d = x.shape[1]
    f = rfft(x - x.mean(1, keepdims=True), n=next_fast_len(2 * d), axis=1)
    return irfft(f * np.conjugate(f), n=next_fast_len(2 * d), axis=1)[:, :d] / d


def _ess(z: np.ndarray) -> np.ndarray:
    """ESS of ``(chains, draws, n)`` with Geyer's initial monotone sequence.

    The lag loops follow ArviZ step by step (the truncation point differs per element),
    each step a vector operation over all elements.
    """
    m, d, n = z.shape
    acov = _autocov(z)
    mean_var = acov[:, 0].mean(0) * d / (d - 1.0)
    var_plus = mean_var * (d - 1.0) / d
    if m > 1:
        var_plus = var_plus + np.var(z.mean(1), axis=0, ddof=1)
    with np.errstate(divide="ignore", invalid="ignore"):
        rho = 1.0 - (mean_var - acov.mean(0)) / var_plus  # (d, n): autocorrelation estimate at every lag
    rho_t = np.zeros((d, n))
    rho_t[0] = 1.0
    rho_t[1] = rho[1]
    even, odd = np.ones(n), rho[1].copy()
    steps = np.zeros(n, dtype=int)  # iterations of Geyer's initial positive sequence per element
    t = 1
    while t < d - 3:
        active = (even + odd) > 0.0
        if not active.any():
            break
        # an element that stopped keeps its last pair (the sequence has ended there)
        even, odd = np.where(active, rho[t + 1], even), np.where(active, rho[t + 2], odd)
        keep = active & (even + odd >= 0)
        rho_t[t + 1] = np.where(keep, even, rho_t[t + 1])
        rho_t[t + 2] = np.where(keep, odd, rho_t[t + 2])
        steps += active
        t += 2
    max_t = 2 * steps - 1  # ArviZ's "t - 2" after the loop
    cols = np.arange(n)
    rho_t[max_t + 1, cols] = np.where(even > 0, even, rho_t[max_t + 1, cols])
    t = 1
    while t <= max_t.max() - 2:  # Geyer's initial monotone sequence, pair by pair
        live = t <= max_t - 2
        prev = rho_t[t - 1] + rho_t[t]
        fix = live & (rho_t[t + 1] + rho_t[t + 2] > prev)
        rho_t[t + 1] = np.where(fix, prev / 2.0, rho_t[t + 1])
        rho_t[t + 2] = np.where(fix, prev / 2.0, rho_t[t + 2])
        t += 2
    csum = np.concatenate([np.zeros((1, n)), np.cumsum(rho_t, axis=0)])
    tail = np.where(max_t + 1 < d, rho_t[np.minimum(max_t + 1, d - 1), cols], 0.0)
    tau = -1.0 + 2.0 * csum[max_t + 1, cols] + tail
    size = m * d
    ess = size / np.maximum(tau, 1.0 / np.log10(size))
    ess = np.where(np.isnan(rho_t).any(0), np.nan, ess)
    constant = (z.max((0, 1)) - z.min((0, 1))) < np.finfo(float).resolution
    return np.where(constant, float(size), ess)


def ess_bulk(x: np.ndarray) -> np.ndarray:
    """Bulk effective sample size (rank-normalized split chains).

    Parameters
    ----------
    x : ndarray ``(chains, draws, n)``, finite, ``draws >= 4``

    Returns
    -------
    ndarray ``(n,)``
    """
    return _ess(_z_scale(_split_chains(np.asarray(x, dtype=float))))
