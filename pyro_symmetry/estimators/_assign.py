"""The sequential assignment draw of the importance proposal (SPEC estimator 4).

At step ``t`` every row picks one still-open option by inverse CDF, from one uniform per
row and step. Each neuron chooses among the columns left with its own weights (an
assignment, not one Plackett-Luce ranking of items), so the ``n`` steps of a group depend
on each other and stay a loop; the exact distribution is pinned by
``tests/test_importance_proposal.py``.

Two implementations of the same loop:

* :func:`steps_numpy`, the reference: every step is a fixed handful of NumPy calls on
  all rows at once. At training sizes (8 rows, 128 options) the cost is the calls, about
  10 us a step, not the data.
* a compiled loop (`numba <https://numba.pydata.org>`_, the optional ``fast`` extra, as
  ArviZ uses it): the same floating-point operations in the same order, one row at a time,
  so its draws and normalizers are **bit for bit** those of the reference
  (``tests/test_estimators_assign.py``); about 10x faster at those sizes. Only the fast
  (probability-domain) pass is compiled: the log-domain rerun after an underflow, which
  calls ``exp``, stays in NumPy, whose ``exp`` the compiled one need not match to the bit.

:func:`steps` dispatches: the compiled loop when numba imports and the environment
variable ``PYRO_SYMMETRY_NUMBA`` is not ``0`` (read once, at first use), else the
reference (also under ``NUMBA_DISABLE_JIT=1``, where the "compiled" loop would be pure
Python). Compilation happens once per process, on first use (about a second), and
writes no cache file. A numba that is installed but fails to import or to compile gives a
``RuntimeWarning`` and the reference; a missing one, silently the reference (the same
numbers, only slower).
"""

from __future__ import annotations

import os
import warnings

import numpy as np

__all__ = ["compiled_available", "steps", "steps_numpy"]

#: The compiled fast pass, ``False`` until first use, ``None`` when unavailable.
_COMPILED: object = False


def steps_numpy(
    A: np.ndarray, u: np.ndarray, kc: int, given: np.ndarray | None, stable: bool
) -> tuple[np.ndarray, np.ndarray]:
    """The sequential draw: at step ``t`` every row picks an open option by inverse CDF.

    Parameters
    ----------
    A : ndarray ``(n, R, O)``, float64, C-contiguous
        The probabilities relative to each row's best option (``exp(V - max)``), or with
        ``stable`` the scores ``V`` themselves (then every step renormalizes by the best
        open option). ``O = S * n`` options ``s * n + j`` (``S = 2``: signed); ``R`` is
        ``nbc`` (shared by the ``kc`` elements) or ``kc * nbc``.
    u : ndarray ``(n, N)``, float64
        One uniform in ``(0, 1]`` per step and row; the ``N = kc * nbc`` rows are
        element-major.
    kc : int
    given : ndarray ``(n, F)``, int64, optional
        The options of the first ``F`` rows (the identity's): they take these instead of
        drawing, and only their normalizers are computed.
    stable : bool

    Returns
    -------
    chosen : ndarray ``(n, N)``, int64
        The option of each step and row.
    norm : ndarray ``(n, N)``
        Per step the open mass relative to the row's best option (tiny means underflow)
        or, with ``stable``, the log normalizer.
    """
    n, R, O = A.shape
    N = u.shape[1]
    S, nbc = O // n, N // kc
    F = 0 if given is None else given.shape[1]
    A4 = A.reshape(n, 1 if R == nbc else kc, nbc, S, n)
    u3 = u[:, :, None]
    opened = np.ones((N, n))
    rows = np.arange(N)
    chosen = np.empty((n, N), dtype=np.int64)
    norm = np.empty((n, N))
    e, c, thr, below = np.empty((N, O)), np.empty((N, O)), np.empty((N, 1)), np.empty((N, O), dtype=bool)
    column = np.empty(N, dtype=np.int64)
    shaped, last = e.reshape(kc, nbc, S, n), c[:, -1:]
    open4 = opened.reshape(kc, nbc, 1, n)
    closed = np.zeros((N, n))  # log domain: 0 open, -inf taken
    closed4 = closed.reshape(kc, nbc, 1, n)
    mul, less, count = np.multiply, np.less, np.add.reduce
    for t in range(n):
        if stable:
            np.add(A4[t], closed4, out=shaped)
            m = e.max(1)
            np.exp(e - m[:, None], out=e)
        else:
            mul(A4[t], open4, out=shaped)
        e.cumsum(1, out=c)
        # The first option whose cumulative mass reaches u * total: it has positive mass.
        mul(u3[t], last, out=thr)
        less(c, thr, out=below)
        o = chosen[t]
        count(below, 1, out=o)
        if given is not None:
            o[:F] = given[t]
        col = o if S == 1 else np.remainder(o, n, out=column)
        opened[rows, col] = 0.0
        if stable:
            closed[rows, col] = -np.inf
            norm[t] = m + np.log(last[:, 0])
        else:
            norm[t] = last[:, 0]
    return chosen, norm


def _fast_pass_source(A, u, kc, given, F, chosen, norm):  # pragma: no cover - compiled by numba
    """:func:`steps_numpy`'s fast pass, one row at a time (the body numba compiles).

    Same operations in the same order: the masked product ``A * open``, its running sum,
    the threshold ``u * total`` and the count of cumulative masses below it (the masses are
    nondecreasing, so the count is the first index reaching the threshold).
    """
    n, R, O = A.shape
    N = u.shape[1]
    S = O // n
    nbc = N // kc
    opened = np.empty(n)
    c = np.empty(O)
    for r in range(N):
        src = r % nbc if R == nbc else r
        opened[:] = 1.0
        for t in range(n):
            acc = 0.0
            for s in range(S):
                for j in range(n):
                    acc += A[t, src, s * n + j] * opened[j]
                    c[s * n + j] = acc
            thr = u[t, r] * acc
            o = 0
            while o < O and c[o] < thr:
                o += 1
            if r < F:
                o = given[t, r]
            chosen[t, r] = o
            norm[t, r] = acc
            opened[o % n] = 0.0


def _compiled():
    """The compiled fast pass, or ``None`` (numba missing, disabled, or failing to compile)."""
    global _COMPILED
    if _COMPILED is False:
        _COMPILED = None
        if os.environ.get("PYRO_SYMMETRY_NUMBA", "1") != "0":
            try:
                import numba
            except ModuleNotFoundError:  # the `fast` extra is not installed: the reference is exact
                return None
            except Exception as err:  # installed but broken (e.g. built for another NumPy): say so
                warnings.warn(
                    f"numba did not import ({err}); the importance sampler runs in NumPy", RuntimeWarning, stacklevel=3
                )
                return None
            if getattr(getattr(numba, "config", None), "DISABLE_JIT", False):
                return None  # NUMBA_DISABLE_JIT=1: "compiled" would be the loop in pure Python
            try:
                fn = numba.njit(nogil=True, cache=False)(_fast_pass_source)
                out = np.empty((1, 1), dtype=np.int64), np.empty((1, 1))
                fn(np.ones((1, 1, 1)), np.ones((1, 1)), 1, np.zeros((1, 1), dtype=np.int64), 1, *out)
            except Exception as err:  # a numba that cannot compile here: the reference is exact
                warnings.warn(
                    f"numba could not compile the importance proposal's sampler ({err}); using NumPy",
                    RuntimeWarning,
                    stacklevel=3,
                )
                return None
            _COMPILED = fn
    return _COMPILED


def compiled_available() -> bool:
    """Whether :func:`steps` runs its fast pass compiled (numba, the ``fast`` extra)."""
    return _compiled() is not None


def steps(
    A: np.ndarray, u: np.ndarray, kc: int, given: np.ndarray | None, stable: bool
) -> tuple[np.ndarray, np.ndarray]:
    """:func:`steps_numpy`, with the fast pass compiled when numba is available (the same
    result bit for bit)."""
    fn = None if stable else _compiled()
    if fn is None:
        return steps_numpy(A, u, kc, given, stable=stable)
    n, N = u.shape
    chosen, norm = np.empty((n, N), dtype=np.int64), np.empty((n, N))
    F = 0 if given is None else given.shape[1]
    given = np.zeros((n, 0), dtype=np.int64) if given is None else np.ascontiguousarray(given, dtype=np.int64)
    fn(np.ascontiguousarray(A, dtype=np.float64), np.ascontiguousarray(u, dtype=np.float64), kc, given, F, chosen, norm)
    return chosen, norm
