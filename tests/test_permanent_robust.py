"""The permanent and the exact ``log q_sym`` on badly scaled inputs (issue 12, items 1 and 13).

References written here, independent of the package: brute force over all ``n!``
permutations (a logsumexp, ``n <= 9``) and a dynamic program over column subsets in log
space (numpy, ``O(2^n n)``), used up to ``n = 20``.
"""

import itertools
import math

import numpy as np
import pyro.distributions as dist
import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from strategies import seeds
from strategies_estimators import brute_force_log_q_sym

import pyro_symmetry as ps
from pyro_symmetry.estimators import BaseDensity, exact_log_ratio, log_permanent, permanent_log_ratio
from pyro_symmetry.estimators import permanent as permanent_module
from pyro_symmetry.models import BayesianMLP

SCALES = [1.0, 10.0, 100.0, 1e3, 1e4]
EPS32 = torch.finfo(torch.float32).eps


def brute_log_perm(a: torch.Tensor) -> torch.Tensor:
    """``log perm(exp a)`` over all ``n!`` permutations, float64, differentiable."""
    a = a.double()
    n = a.shape[-1]
    perms = torch.tensor(list(itertools.permutations(range(n))), dtype=torch.long).reshape(-1, n)
    return torch.logsumexp(a[..., torch.arange(n), perms].sum(-1), -1)


def subset_dp_log_perm(log_a) -> float:
    """``log perm(exp log_a)`` of one ``(n, n)`` matrix: ``f[S] = logsumexp_{j in S} f[S - j] + a[|S|-1, j]``."""
    a = np.asarray(log_a, dtype=np.float64)
    n = a.shape[0]
    masks = np.arange(1 << n, dtype=np.int64)
    popcount = sum((masks >> j) & 1 for j in range(n))
    f = np.full(1 << n, -np.inf)
    f[0] = 0.0
    for k in range(1, n + 1):
        level = masks[popcount == k]
        terms = np.full((n, level.size), -np.inf)
        for j in range(n):
            has = ((level >> j) & 1).astype(bool)
            terms[j, has] = f[level[has] ^ (1 << j)] + a[k - 1, j]
        f[level] = np.logaddexp.reduce(terms, axis=0)
    return float(f[-1])


def _close(out: torch.Tensor, ref: torch.Tensor, dtype: torch.dtype, atol: float = 1e-9) -> None:
    """float64: ``atol`` plus 1e-13 relative; float32: the output's own rounding (a few ulp)."""
    ref = ref.double()
    tol = atol + 1e-13 * ref.abs() if dtype == torch.float64 else 1e-5 + 4 * EPS32 * ref.abs()
    err = (out.double() - ref).abs()
    assert bool((err <= tol).all()), (err.max().item(), ref)


# ---------------------------------------------------------------- log_permanent vs brute force
@pytest.mark.parametrize("scale", SCALES)
@pytest.mark.parametrize("n", [8, 9])
def test_log_permanent_any_scale_matches_brute_force(n, scale, dtype):
    # entries of size 300-1000 made the old Sinkhorn pre-scaling stop unconverged: NaN or wrong values
    g = torch.Generator().manual_seed(n)
    a = (torch.randn(3, n, n, generator=g, dtype=torch.float64) * scale).to(dtype)
    out = log_permanent(a)
    assert out.dtype == dtype and out.shape == (3,)
    _close(out, brute_log_perm(a), dtype)


@given(
    n=st.integers(1, 7),
    scale=st.sampled_from([1e-3, 0.3, *SCALES]),
    shift=st.sampled_from([0.0, -1e4, 3e4]),
    dtype=st.sampled_from([torch.float32, torch.float64]),
    seed=seeds,
)
def test_log_permanent_property_matches_brute_force(n, scale, shift, dtype, seed):
    g = torch.Generator().manual_seed(seed)
    a = (torch.randn(2, n, n, generator=g, dtype=torch.float64) * scale + shift).to(dtype)
    _close(log_permanent(a), brute_log_perm(a), dtype)


@given(n=st.integers(1, 7), density=st.sampled_from([0.2, 0.5, 0.8]), scale=st.sampled_from([1.0, 1e3]), seed=seeds)
def test_log_permanent_with_zero_entries_matches_brute_force(n, density, scale, seed):
    # -inf entries: the permanent is -inf exactly when no perfect matching survives
    g = torch.Generator().manual_seed(seed)
    a = torch.randn(2, n, n, generator=g, dtype=torch.float64) * scale
    a = a.masked_fill(torch.rand(2, n, n, generator=g) > density, -math.inf)
    ref = brute_log_perm(a)
    out = log_permanent(a)
    assert torch.equal(torch.isinf(out), torch.isinf(ref))
    finite = torch.isfinite(ref)
    _close(out[finite], ref[finite], torch.float64)


def _structured(n: int) -> dict[str, torch.Tensor]:
    """Matrices on which diagonal scalings converge slowly or entries span many orders."""
    g = torch.Generator().manual_seed(n)
    i = torch.arange(n)
    below = i[None, :] < i[:, None]
    out = {}
    for gap in (3.0, 30.0, 300.0, 1e4, math.inf):
        out[f"triangular-{gap}"] = torch.where(below, -gap, 0.0).double()
        out[f"noisy-triangular-{gap}"] = out[f"triangular-{gap}"] + 0.1 * torch.randn(n, n, generator=g).double()
    x, y = torch.randn(2, n, generator=g, dtype=torch.float64) * 1e3
    out["rank-one-1e3"] = x[:, None] + y[None, :]  # perm = n! exp(sum x + sum y)
    s = 10 ** torch.linspace(-3, 4, n, dtype=torch.float64)
    out["row-scales"] = s[:, None] * torch.randn(n, n, generator=g, dtype=torch.float64)
    out["column-scales"] = s[None, :] * torch.randn(n, n, generator=g, dtype=torch.float64)
    out["constant-1e5"] = torch.full((n, n), 1e5, dtype=torch.float64)
    for link in (-40.0, -1e4):
        b = torch.full((n, n), link, dtype=torch.float64)
        h = n // 2
        b[:h, :h] = 0.0
        b[h:, h:] = 0.0
        out[f"blocks-{link}"] = b
    sparse = torch.randn(n, n, generator=g, dtype=torch.float64).masked_fill(
        torch.rand(n, n, generator=g) > 0.3, -math.inf
    )
    out["sparse-with-diagonal"] = sparse.fill_diagonal_(0.0)
    return out


@pytest.mark.parametrize("n", [6, 12, 16])
def test_log_permanent_structured_matrices(n):
    for name, a in _structured(n).items():
        ref = subset_dp_log_perm(a.numpy())
        out = float(log_permanent(a))
        if ref == -math.inf:
            assert out == -math.inf, name
        else:
            assert abs(out - ref) <= 1e-9 + 1e-13 * abs(ref), (name, out, ref)
        if name == "rank-one-1e3":
            assert ref == pytest.approx(math.lgamma(n + 1) + float(a.diagonal().sum()), abs=1e-9)


# ---------------------------------------------------------------- n = 13-20 against the subset program
@pytest.mark.parametrize("n", range(13, 21))
def test_log_permanent_n13_to_20_matches_subset_dp(n):
    g = torch.Generator().manual_seed(100 + n)
    for scale in (0.1, 1.0, 3.0):
        a = torch.randn(n, n, generator=g, dtype=torch.float64) * scale
        assert not torch.allclose(a, a.T)  # a transposition bug cannot hide
        ref = subset_dp_log_perm(a.numpy())
        # Glynn's sum on the scaled matrix keeps about 1e-13 (the reference's own rounding is ~n eps)
        assert float(log_permanent(a)) == pytest.approx(ref, abs=1e-10), (n, scale)


@pytest.mark.parametrize("chunk", [1, 7, 64, 1000])
def test_log_permanent_chunk_boundaries(monkeypatch, chunk):
    # tiny chunks: the batch is split, and the high rows are walked a few subsets at a time
    monkeypatch.setattr(permanent_module, "_CHUNK_ELEMENTS", chunk)
    monkeypatch.setattr(permanent_module, "_LOW_BITS", 3)
    g = torch.Generator().manual_seed(chunk)
    for n in (1, 2, 5, 9, 13):
        a = torch.randn(5, n, n, generator=g, dtype=torch.float64).requires_grad_(True)
        out = log_permanent(a)
        ref = torch.tensor([subset_dp_log_perm(x.detach().numpy()) for x in a], dtype=torch.float64)
        assert torch.allclose(out, ref, rtol=1e-13, atol=1e-11), (n, chunk)
        if n <= 7:
            (grad,) = torch.autograd.grad(out.sum(), a)
            (gref,) = torch.autograd.grad(brute_log_perm(a).sum(), a)
            assert torch.allclose(grad, gref, atol=1e-12), (n, chunk)


@pytest.mark.parametrize("n", [20, 22, 24, 25])
def test_log_permanent_all_ones_worst_case(n):
    # perm(ones) = n!: after scaling, the least permanent of a doubly stochastic matrix, the hardest
    # case for an alternating sum (Ryser's was off by 2e-4 at n = 24)
    out = float(log_permanent(torch.zeros(n, n, dtype=torch.float64)))
    assert out == pytest.approx(math.lgamma(n + 1), abs=1e-10)


def test_log_permanent_invariances():
    g = torch.Generator().manual_seed(7)
    a = torch.randn(4, 11, 11, generator=g, dtype=torch.float64) * 300
    ref = log_permanent(a)
    rows, cols = torch.randperm(11, generator=g), torch.randperm(11, generator=g)
    x, y = torch.randn(2, 4, 11, generator=g, dtype=torch.float64) * 1e3
    assert torch.allclose(log_permanent(a.transpose(-1, -2)), ref, rtol=1e-13, atol=1e-9)
    assert torch.allclose(log_permanent(a[:, rows][:, :, cols]), ref, rtol=1e-13, atol=1e-9)
    scaled = a + x.unsqueeze(-1) + y.unsqueeze(-2)  # perm(D1 A D2) = perm(A) det D1 det D2
    assert torch.allclose(log_permanent(scaled), ref + x.sum(-1) + y.sum(-1), rtol=1e-13, atol=1e-8)


# ---------------------------------------------------------------- gradients
@pytest.mark.parametrize("scale", [1.0, 100.0, 1e4])
@pytest.mark.parametrize("sinkhorn_iters", [100, 0])
def test_log_permanent_gradient_matches_brute_force(scale, sinkhorn_iters, dtype):
    g = torch.Generator().manual_seed(3)
    n = 6
    a = (torch.randn(3, n, n, generator=g, dtype=torch.float64) * scale).to(dtype)
    a[0] = torch.where(torch.arange(n)[None, :] < torch.arange(n)[:, None], -30.0, 0.0)  # slow scalings
    a.requires_grad_(True)
    (grad,) = torch.autograd.grad(log_permanent(a, sinkhorn_iters).sum(), a)
    (ref,) = torch.autograd.grad(brute_log_perm(a).sum(), a)
    assert grad.dtype == dtype and torch.isfinite(grad).all()
    # the gradient is the matrix of matching probabilities: rows and columns sum to one
    assert torch.allclose(grad, ref.to(dtype), atol=1e-10 if dtype == torch.float64 else 1e-5)
    ones = torch.ones(3, n, dtype=torch.float64)
    assert torch.allclose(grad.double().sum(-1), ones, atol=1e-6) and torch.allclose(
        grad.double().sum(-2), ones, atol=1e-6
    )


def test_gradient_is_zero_on_zero_entries_and_finite_without_matching():
    a = torch.zeros(2, 3, 3, dtype=torch.float64)
    a[0, 0, 1:] = -math.inf
    a[1, :2, :2] = -math.inf  # rows 0 and 1 both need column 2: no perfect matching
    a.requires_grad_(True)
    out = log_permanent(a)
    assert out[0].detach().item() == pytest.approx(math.log(2)) and out[1].detach().item() == -math.inf
    (grad,) = torch.autograd.grad(out[0], a)
    expected = torch.tensor([[1.0, 0, 0], [0, 0.5, 0.5], [0, 0.5, 0.5]], dtype=torch.float64)
    assert torch.equal(grad[1], torch.zeros(3, 3, dtype=torch.float64)) and torch.allclose(grad[0], expected)


# ---------------------------------------------------------------- the subset-program fallback
def brute_perm(m: torch.Tensor) -> torch.Tensor:
    """``perm(m)`` over all ``n!`` permutations, linear domain (zero entries allowed)."""
    n = m.shape[-1]
    perms = torch.tensor(list(itertools.permutations(range(n))), dtype=torch.long).reshape(-1 if n else 1, n)
    return m[..., torch.arange(n), perms].prod(-1).sum(-1)


@pytest.mark.parametrize("n", range(0, 8))
def test_dp_permanent_matches_brute_force_with_gradient(n):
    m = torch.rand(3, n, n, generator=torch.Generator().manual_seed(n), dtype=torch.float64)
    if n > 2:
        m[..., 0, 2:] = 0.0  # zero entries are allowed
    m.requires_grad_(True)
    from pyro_symmetry.estimators._subset_dp import dp_permanent

    out = dp_permanent(m)
    assert torch.allclose(out, brute_perm(m), rtol=1e-13, atol=0)
    if n:
        (grad,) = torch.autograd.grad(out.sum(), m)
        (ref,) = torch.autograd.grad(brute_perm(m).sum(), m)
        assert torch.allclose(grad, ref, rtol=1e-12, atol=1e-15)


def test_dp_permanent_in_groups_of_matrices(monkeypatch):
    from pyro_symmetry.estimators import _subset_dp

    monkeypatch.setattr(_subset_dp, "_TABLE_ELEMENTS", 1 << 5)  # two 4 x 4 tables at a time
    m = torch.rand(7, 4, 4, generator=torch.Generator().manual_seed(0), dtype=torch.float64).requires_grad_(True)
    out = _subset_dp.dp_permanent(m)
    assert torch.allclose(out, brute_perm(m), rtol=1e-13, atol=0)
    (grad,) = torch.autograd.grad(out.sum(), m)
    (ref,) = torch.autograd.grad(brute_perm(m).sum(), m)
    assert torch.allclose(grad, ref, rtol=1e-12, atol=1e-15)


def test_badly_conditioned_scaling_goes_to_the_subset_program(monkeypatch):
    # Without sweeps the triangular matrix stays far from doubly stochastic: Glynn's sum would be
    # too small to trust, and the exact program takes over.
    from pyro_symmetry.estimators._subset_dp import dp_permanent

    calls = []

    def spy(m):
        calls.append(m.shape[0])
        return dp_permanent(m)

    monkeypatch.setattr(permanent_module, "dp_permanent", spy)
    n = 12
    tri = torch.where(torch.arange(n)[None, :] < torch.arange(n)[:, None], -3.0, 0.0).double()
    a = torch.stack([tri, torch.randn(n, n, dtype=torch.float64, generator=torch.Generator().manual_seed(0))])
    out = log_permanent(a, sinkhorn_iters=0)
    assert calls == [1]  # only the badly conditioned matrix
    ref = torch.tensor([subset_dp_log_perm(x.numpy()) for x in a], dtype=torch.float64)
    assert torch.allclose(out, ref, rtol=1e-13, atol=1e-10)
    assert torch.allclose(log_permanent(a), ref, rtol=1e-13, atol=1e-10)


# ---------------------------------------------------------------- log q_sym far from q
def _narrow_q(model, dtype, scale=0.05, seed=0):
    g = torch.Generator().manual_seed(seed)
    return {
        k: dist.Normal(torch.randn(s, generator=g, dtype=dtype), torch.full(s, scale, dtype=dtype)).to_event(len(s))
        for k, s in model.spec.shapes.items()
    }


def _points(q, n, spread, seed):
    """``n`` points: ``spread * N(0, 1)`` around 0 (``spread = 50``: far from every mode of q)."""
    g = torch.Generator().manual_seed(seed)
    return {k: spread * torch.randn(n, *d.event_shape, generator=g, dtype=d.base_dist.loc.dtype) for k, d in q.items()}


def _double(q, w):
    q64 = {
        k: dist.Normal(d.base_dist.loc.double(), d.base_dist.scale.double()).to_event(d.event_dim) for k, d in q.items()
    }
    return q64, {k: v.double() for k, v in w.items()}


@pytest.mark.parametrize("spread", [1.0, 5.0, 50.0])
def test_symmetrized_log_prob_far_from_q_matches_exact_enumeration(spread, dtype):
    # width 8: the default ("auto") estimator is the permanent; exact enumeration is the reference
    model = BayesianMLP(3, [8], 2)
    q = _narrow_q(model, dtype)
    default = ps.Symmetrized(q, model.spec)
    assert default.estimator == "permanent"
    w = _points(q, 3, spread, seed=1)
    out = default.log_prob(w)
    q64, w64 = _double(q, w)
    ref = ps.Symmetrized(q64, model.spec, estimator="exact").log_prob(w64)
    assert out.dtype == dtype and torch.isfinite(out).all()
    if dtype == torch.float64:
        assert torch.allclose(out, ref, rtol=1e-12, atol=1e-9)
    else:  # float32: the rounding of log q (a float32 sum of D terms of the result's size)
        assert bool(((out.double() - ref).abs() <= 1e-3 + 16 * EPS32 * ref.abs()).all())


@pytest.mark.parametrize("act", ["relu", "tanh"])
@pytest.mark.parametrize("spread", [1.0, 50.0])
def test_permanent_and_exact_far_from_q_match_explicit_brute_force(act, spread):
    hidden = [4]
    model = BayesianMLP(2, hidden, 2, activation=act)
    q = _narrow_q(model, torch.float64, seed=2)
    w = _points(q, 2, spread, seed=3)
    base = BaseDensity(q, model.spec)
    expected = torch.stack(
        [brute_force_log_q_sym(q, {k: v[i] for k, v in w.items()}, hidden, signed=act == "tanh") for i in range(2)]
    ) - base.log_prob(w)
    for ratio in (permanent_log_ratio(base, w), exact_log_ratio(base, w)):
        assert torch.allclose(ratio, expected, rtol=1e-12, atol=1e-9)


def test_permanent_gradient_far_from_q_matches_exact():
    # training differentiates the permanent through w and q: finite and equal to enumeration's gradient
    model = BayesianMLP(2, [5], 2, activation="tanh")
    g = torch.Generator().manual_seed(4)
    locs = {k: torch.randn(s, generator=g, dtype=torch.float64).requires_grad_() for k, s in model.spec.shapes.items()}
    w = _points({k: dist.Normal(v.detach(), 1.0).to_event(v.dim()) for k, v in locs.items()}, 2, 30.0, seed=5)
    w = {k: v.requires_grad_() for k, v in w.items()}
    grads = []
    for fn in (permanent_log_ratio, exact_log_ratio):
        base = BaseDensity({k: dist.Normal(v, 0.05).to_event(v.dim()) for k, v in locs.items()}, model.spec)
        leaves = [locs[s] for s in model.spec.sites] + [w[s] for s in model.spec.sites]
        grads.append(torch.autograd.grad(fn(base, w).sum(), leaves))
    for gp, ge in zip(*grads, strict=True):
        assert torch.isfinite(gp).all() and ge.abs().max() > 0
        assert torch.allclose(gp, ge, rtol=1e-9, atol=1e-6 * float(ge.abs().max()))


# ---------------------------------------------------------------- extreme magnitudes
@pytest.mark.parametrize("magnitude", [1e15, 1e30, 1e100])
def test_log_permanent_huge_entries_to_relative_precision(magnitude):
    # beyond 1/eps the scaled entries a - u - v are pure rounding: the result must still be the
    # heaviest assignment's weight to float64's relative precision, never NaN
    g = torch.Generator().manual_seed(11)
    a = torch.randn(3, 6, 6, generator=g, dtype=torch.float64) * magnitude
    a.requires_grad_(True)
    out = log_permanent(a)
    ref = brute_log_perm(a.detach())
    assert torch.all((out.detach() - ref).abs() <= 1e-13 * ref.abs())
    (grad,) = torch.autograd.grad(out.sum(), a)
    assert torch.isfinite(grad).all() and torch.allclose(grad.sum(-1), torch.ones(3, 6, dtype=torch.float64))


@pytest.mark.parametrize(("w_scale", "q_scale"), [(1e20, 1.0), (1.0, 1e-20), (1e10, 1e-6)])
def test_float32_log_q_overflow_is_evaluated_in_float64(w_scale, q_scale):
    # (w - loc) / scale above ~1e19 overflows float32's square: every log q(g^-1 w) was -inf and the
    # exact ratio NaN; it must be the float64 ratio, rounded to float32
    model = BayesianMLP(2, [3], 2)
    q = _narrow_q(model, torch.float32, scale=q_scale)
    w = _points(q, 2, w_scale, seed=6)
    base = BaseDensity(q, model.spec)
    q64, w64 = _double(q, w)
    base64 = BaseDensity(q64, model.spec)
    ref = exact_log_ratio(base64, w64)
    scale = base64.log_prob(w64).abs()  # the magnitude whose float32 rounding bounds the ratio's error
    beyond = torch.isinf(ref.float())  # a ratio beyond float32's range rounds to +-inf
    for ratio in (exact_log_ratio(base, w), permanent_log_ratio(base, w)):
        assert ratio.dtype == torch.float32 and not torch.isnan(ratio).any()
        assert torch.equal(ratio[beyond], ref.float()[beyond])
        assert bool(((ratio.double() - ref).abs() <= 4 * EPS32 * scale)[~beyond].all())
    assert torch.allclose(permanent_log_ratio(base64, w64), ref, rtol=0, atol=1e-12 * float(scale.max()))


def test_undefined_ratios_raise():
    model = BayesianMLP(2, [3], 2)
    tiny = {
        k: (torch.zeros(s, dtype=torch.float64), torch.full(s, 1e-200, dtype=torch.float64))
        for k, s in model.spec.shapes.items()
    }
    base = BaseDensity(tiny, model.spec)
    w = {k: torch.ones(2, *s, dtype=torch.float64) for k, s in model.spec.shapes.items()}  # z = 1e200
    with pytest.raises(ValueError, match=r"group 'fc1' are not finite in float64 at draw \(0,\)"):
        permanent_log_ratio(base, w)
    with pytest.raises(ValueError, match=r"log q\(w\) is not finite at draw \(0,\)"):
        exact_log_ratio(base, w)
    # outside a bounded support: q(g^-1 w) = 0 for every g, 0/0
    layout = ps.FlatLayout(model.spec.shapes)
    ones = torch.ones(layout.dim, dtype=torch.float64)
    box = BaseDensity(dist.Uniform(-ones, ones, validate_args=False).to_event(1), model.spec, layout)
    v = torch.zeros(2, layout.dim, dtype=torch.float64)
    v[1, 0] = 5.0
    with pytest.raises(ValueError, match=r"draw \(1,\).*outside q's support"):
        exact_log_ratio(box, v)
    assert torch.isfinite(exact_log_ratio(box, v[:1])).all()
