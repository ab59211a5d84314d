"""The importance proposal's sequential assignment loop (``estimators/_assign.py``).

The compiled loop (numba, the ``fast`` extra) must give the NumPy reference's draws and
normalizers bit for bit, for every layout the estimator passes (shared or per-element
scores, signed options, forced identity rows, zero-mass options); the estimator must then
not depend on whether numba is installed. The reference itself is checked against a
plain one-row-at-a-time loop written from its definition.
"""

import numpy as np
import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from strategies import seeds
from strategies_estimators import mean_field

import pyro_symmetry.estimators._assign as assign
from pyro_symmetry.estimators import BaseDensity
from pyro_symmetry.estimators import importance as imp
from pyro_symmetry.models import BayesianMLP


@pytest.fixture
def numpy_only(monkeypatch):
    monkeypatch.setattr(assign, "_COMPILED", None)


def _problem(seed: int, n: int, S: int, kc: int, nbc: int, shared: bool, forced: bool, zeros: float):
    """Probabilities relative to each row's best option (one entry is exactly 1), some of
    them exactly zero, uniforms in (0, 1], and the identity's options for the first rows."""
    rng = np.random.default_rng(seed)
    R = nbc if shared else kc * nbc
    A = rng.random((n, R, S * n)) ** 3
    A[rng.random(A.shape) < zeros] = 0.0
    A[np.arange(n)[:, None], np.arange(R)[None], rng.integers(0, S * n, (n, R))] = 1.0
    A /= A.max(-1, keepdims=True)
    u = 1.0 - rng.random((n, kc * nbc))
    given_ = None
    if forced:
        given_ = np.stack([rng.permutation(n) + n * rng.integers(0, S, n) for _ in range(nbc)], 1)
    return np.ascontiguousarray(A), u, kc, given_


def _by_definition(A, u, kc, given_):
    """One row and one step at a time: open options' masses, their running sum, the first
    option whose running sum reaches ``u`` times the total."""
    n, R, O = A.shape
    N = u.shape[1]
    nbc = N // kc
    chosen, norm = np.empty((n, N), dtype=np.int64), np.empty((n, N))
    for r in range(N):
        taken = set()
        for t in range(n):
            row = A[t, r % nbc if R == nbc else r]
            mass = np.array([0.0 if o % n in taken else row[o] for o in range(O)])
            c = np.cumsum(mass)
            o = int(np.argmax(c >= u[t, r] * c[-1]))
            if given_ is not None and r < given_.shape[1]:
                o = int(given_[t, r])
            chosen[t, r], norm[t, r] = o, c[-1]
            taken.add(o % n)
    return chosen, norm


layouts = st.tuples(
    seeds,
    st.integers(1, 9),  # n
    st.sampled_from([1, 2]),  # S: signed options
    st.integers(1, 4),  # kc
    st.integers(1, 3),  # nbc
    st.booleans(),  # scores shared by the kc elements
    st.booleans(),  # forced identity rows
    st.sampled_from([0.0, 0.3, 0.8]),  # fraction of zero-mass options
)


@given(layout=layouts)
def test_reference_follows_the_definition(layout):
    A, u, kc, given_ = _problem(*layout)
    chosen, norm = assign.steps_numpy(A, u, kc, given_, stable=False)
    ref_chosen, ref_norm = _by_definition(A, u, kc, given_)
    assert np.array_equal(chosen, ref_chosen)
    assert np.allclose(norm, ref_norm, rtol=1e-12, atol=0)
    # every row's options cover each column once (an assignment), unless some step found
    # no open mass: then the caller reruns in the log domain (_TINY in importance.py)
    n = A.shape[0]
    assert (norm == 0).any() or all(sorted(chosen[:, r] % n) == list(range(n)) for r in range(chosen.shape[1]))


@given(layout=layouts)
def test_compiled_loop_is_the_reference_bit_for_bit(layout):
    pytest.importorskip("numba")
    assert assign.compiled_available()
    A, u, kc, given_ = _problem(*layout)
    chosen, norm = assign.steps(A, u, kc, given_, stable=False)
    ref_chosen, ref_norm = assign.steps_numpy(A, u, kc, given_, stable=False)
    assert np.array_equal(chosen, ref_chosen)
    assert np.array_equal(norm, ref_norm)  # the same additions in the same order


def test_log_domain_pass_stays_in_numpy(monkeypatch):
    """``exp`` of the log-domain rerun is NumPy's in both configurations."""
    calls = []
    reference = assign.steps_numpy
    monkeypatch.setattr(assign, "steps_numpy", lambda *a, stable: calls.append(stable) or reference(*a, stable=stable))
    A, u, kc, given_ = _problem(0, 5, 2, 3, 2, False, True, 0.0)
    assign.steps(np.log(A), u, kc, given_, stable=True)
    assert calls == [True]


@pytest.mark.parametrize("activation", ["relu", "tanh"])
def test_estimate_does_not_depend_on_numba(monkeypatch, activation):
    pytest.importorskip("numba")
    model = BayesianMLP(3, [6, 5], 2, activation=activation)
    base = BaseDensity(mean_field(model.spec.shapes, 3, dtype=torch.float64), model.spec)
    torch.manual_seed(0)
    w = base.sample((4,))

    def run():
        perm, log_pi = imp.plackett_luce_proposal(base, w, 9, 1.0, torch.Generator().manual_seed(1))
        est = imp.importance_log_ratio(base, w, 9, 1.0, torch.Generator().manual_seed(1))
        return perm, log_pi, est

    compiled = run()
    monkeypatch.setattr(assign, "_COMPILED", None)
    reference = run()
    for g in compiled[0]:
        assert torch.equal(compiled[0][g], reference[0][g])
    assert torch.equal(compiled[1], reference[1]) and torch.equal(compiled[2], reference[2])


def test_environment_variable_turns_the_compiled_loop_off(monkeypatch):
    monkeypatch.setattr(assign, "_COMPILED", False)
    monkeypatch.setenv("PYRO_SYMMETRY_NUMBA", "0")
    assert not assign.compiled_available()
    A, u, kc, given_ = _problem(1, 4, 1, 2, 1, True, False, 0.0)
    compiled, reference = assign.steps(A, u, kc, given_, False), assign.steps_numpy(A, u, kc, given_, False)
    assert np.array_equal(compiled[0], reference[0])


def test_a_numba_that_cannot_compile_warns_and_falls_back(monkeypatch):
    numba = pytest.importorskip("numba")

    def broken(**_):
        raise RuntimeError("no LLVM here")

    monkeypatch.setattr(assign, "_COMPILED", False)
    monkeypatch.setattr(numba, "njit", broken)
    with pytest.warns(RuntimeWarning, match="numba could not compile.*no LLVM here.*NumPy"):
        assert not assign.compiled_available()
    A, u, kc, given_ = _problem(2, 4, 2, 2, 2, False, True, 0.3)
    compiled, reference = assign.steps(A, u, kc, given_, False), assign.steps_numpy(A, u, kc, given_, False)
    assert np.array_equal(compiled[0], reference[0])


def test_importance_estimator_runs_without_numba(numpy_only):
    model = BayesianMLP(2, [4], 1)
    base = BaseDensity(mean_field(model.spec.shapes, 0, dtype=torch.float64), model.spec)
    w = base.sample((3,))
    est = imp.importance_log_ratio(base, w, 6, 1.0, torch.Generator().manual_seed(0))
    assert est.shape == (3,) and torch.isfinite(est).all()


def test_a_missing_numba_is_silent_and_a_broken_one_warns(monkeypatch, recwarn):
    import builtins
    import sys

    monkeypatch.setattr(assign, "_COMPILED", False)
    monkeypatch.setitem(sys.modules, "numba", None)  # import numba -> ModuleNotFoundError
    assert not assign.compiled_available()
    assert not [w for w in recwarn if "numba" in str(w.message)]

    real_import = builtins.__import__

    def broken(name, *args, **kwargs):
        if name == "numba":
            raise ImportError("Numba needs NumPy 2.3 or less")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(assign, "_COMPILED", False)
    monkeypatch.setattr(builtins, "__import__", broken)
    with pytest.warns(RuntimeWarning, match="numba did not import.*NumPy 2.3.*runs in NumPy"):
        assert not assign.compiled_available()


def test_numba_disable_jit_means_the_numpy_loop(monkeypatch):
    """Under NUMBA_DISABLE_JIT=1 numba's "compiled" function is the Python loop: far slower
    than the NumPy reference, so the reference runs."""
    numba = pytest.importorskip("numba")
    monkeypatch.setattr(assign, "_COMPILED", False)
    monkeypatch.setattr(numba.config, "DISABLE_JIT", True)
    assert not assign.compiled_available()
