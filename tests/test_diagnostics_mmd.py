"""MMD: the unbiased estimator against a brute-force double sum, the permutation
test's level and power, and symmetry-aware MMD between a posterior and its
permuted copy."""

import itertools

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

import pyro_symmetry as ps
from pyro_symmetry.diagnostics import kernel_mmd
from pyro_symmetry.diagnostics.kernel_mmd import _mmd2_labels

D = ps.diagnostics


def _brute_mmd2(x, y, k):
    n, m = len(x), len(y)
    xx = sum(k(x[i], x[j]) for i, j in itertools.permutations(range(n), 2)) / (n * (n - 1))
    yy = sum(k(y[i], y[j]) for i, j in itertools.permutations(range(m), 2)) / (m * (m - 1))
    xy = sum(k(x[i], y[j]) for i in range(n) for j in range(m)) / (n * m)
    return xx + yy - 2 * xy


@given(seed=st.integers(0, 10_000), n=st.integers(2, 7), m=st.integers(2, 7), d=st.integers(1, 3))
def test_unbiased_mmd2_matches_brute_force(seed, n, m, d):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, d, generator=g, dtype=torch.float64)
    y = torch.randn(m, d, generator=g, dtype=torch.float64) + 0.5
    bw = 0.7
    gauss = lambda a, b: torch.exp(-((a - b) ** 2).sum() / bw**2)  # noqa: E731
    laplace = lambda a, b: torch.exp(-(a - b).abs().sum() / bw)  # noqa: E731
    assert float(D.mmd2_unbiased(x, y, "gaussian", bw)) == pytest.approx(float(_brute_mmd2(x, y, gauss)), abs=1e-12)
    assert float(D.mmd2_unbiased(x, y, "laplace", bw)) == pytest.approx(float(_brute_mmd2(x, y, laplace)), abs=1e-12)


def test_permutation_statistics_equal_recomputation_on_relabelled_data():
    g = torch.Generator().manual_seed(0)
    z = torch.randn(9, 2, generator=g, dtype=torch.float64)
    kmat = torch.exp(-(torch.cdist(z, z) ** 2))
    labels = torch.rand(6, 9, generator=g).argsort(-1) < 4
    stats = _mmd2_labels(kmat, labels, 4, 5)
    for row, s in zip(labels, stats):
        ref = D.mmd2_unbiased(z[row], z[~row], "gaussian", 1.0)
        assert float(s) == pytest.approx(float(ref), abs=1e-12)


def test_level_and_power_of_the_aggregated_test():
    # Under H0 a level-0.05 test rejects Binomial(20, <= 0.05) times: P(>= 5) < 0.003.
    g = torch.Generator().manual_seed(1)
    rejections_h0 = rejections_h1 = 0
    for rep in range(20):
        x, y = torch.randn(40, 3, generator=g), torch.randn(40, 3, generator=g)
        rejections_h0 += D.mmd(x, y, kernel="both", num_permutations=100, seed=rep).p_value < 0.05
        shifted = torch.randn(40, 3, generator=g) + torch.tensor([1.0, 0.0, 0.0])
        rejections_h1 += D.mmd(x, shifted, kernel="both", num_permutations=100, seed=rep).p_value < 0.05
    assert rejections_h0 <= 4
    # A 1-sd mean shift with 40 samples a side is detected almost surely; allow two misses.
    assert rejections_h1 >= 18


def test_mmd_result_fields_and_dict_inputs():
    g = torch.Generator().manual_seed(2)
    x = {"a": torch.randn(30, 2, 2, generator=g), "b": torch.randn(30, generator=g)}
    y = {"b": torch.randn(25, generator=g), "a": torch.randn(25, 2, 2, generator=g)}
    res = D.mmd(x, y, kernel="laplace", num_bandwidths=3, num_permutations=50)
    assert res.kernels == ("laplace",) * 3 and res.bandwidths.shape == (3,)
    assert res.bandwidths[0] * 4 == pytest.approx(float(res.bandwidths[2]))
    assert res.mmd2 == float(res.mmd2_grid[1])  # the median bandwidth
    flat_x = torch.cat([x["a"].reshape(30, -1), x["b"][:, None]], -1)
    flat_y = torch.cat([y["a"].reshape(25, -1), y["b"][:, None]], -1)
    ref = D.mmd(flat_x, flat_y, kernel="laplace", num_bandwidths=3, num_permutations=50)
    assert ref.mmd2 == pytest.approx(res.mmd2) and ref.p_value == res.p_value
    assert 1 / 51 <= res.p_value <= 1
    fixed = D.mmd(flat_x, flat_y, bandwidths=[0.5, 2.0], num_permutations=10)
    assert fixed.bandwidths.tolist() == [0.5, 2.0]
    with pytest.raises(ps.SpecError, match="sites"):
        D.mmd(x, {"a": y["a"]})
    with pytest.raises(ValueError, match="dimension"):
        D.mmd(torch.randn(5, 2), torch.randn(5, 3))
    with pytest.raises(ValueError, match="kernel"):
        D.mmd(flat_x, flat_y, kernel="cosine")
    with pytest.raises(ps.SpecError, match="spec"):
        D.mmd(x, y, symmetry_aware=True)


def _posterior_and_permuted_copy(activation, seed=0, n=60):
    model = ps.models.BayesianMLP(3, [5, 4], 2, activation=activation)
    spec = model.spec
    g = torch.Generator().manual_seed(seed)
    q = {k: (torch.randn(s, generator=g), torch.full(s, 0.1)) for k, s in spec.shapes.items()}

    def draw():
        return {k: loc + scale * torch.randn((n, *loc.shape), generator=g) for k, (loc, scale) in q.items()}

    x = draw()
    h = {k: v[0] for k, v in spec.sample((1,), generator=g).items()}
    copy = spec.apply(draw(), h)  # g#q: the same posterior up to one relabelling
    sym = spec.apply(draw(), spec.sample((n,), generator=g))  # q_sym: a relabelling per draw
    return spec, x, copy, sym


@pytest.mark.parametrize("activation", ["gelu", "tanh"])
def test_symmetry_aware_mmd_is_zero_between_a_posterior_and_its_permuted_copy(activation):
    spec, x, copy, sym = _posterior_and_permuted_copy(activation)
    for y in (copy, sym):
        plain = D.mmd(x, y, num_permutations=200)
        assert plain.p_value < 0.01 and plain.canonical is None
        aware = D.mmd(x, y, symmetry_aware=True, spec=spec, num_permutations=200)
        assert aware.canonical == ("align+scaling" if activation == "tanh" else "align")
        # Both sides are then draws of one distribution: the level-alpha test rejects with
        # probability alpha, so p > 0.01 fails for 1% of seeds; the statistic is ~0.
        assert aware.p_value > 0.01
        assert abs(aware.mmd2) < 0.01 * plain.mmd2
    by_sorting = D.mmd(x, sym, symmetry_aware=True, spec=spec, canonical="sort", num_permutations=200)
    assert by_sorting.p_value > 0.01 and abs(by_sorting.mmd2) < 0.01 * D.mmd(x, sym).mmd2


def test_symmetry_aware_mmd_still_detects_a_different_posterior():
    spec, x, copy, _ = _posterior_and_permuted_copy("gelu")
    shifted = {k: v + (0.3 if k == "fc3.bias" else 0.0) for k, v in copy.items()}  # a bias no group moves
    res = D.mmd(x, shifted, symmetry_aware=True, spec=spec, num_permutations=200)
    assert res.p_value < 0.01


# ---------------------------------------------------------------------- hand-computed cases
def test_median_bandwidth_excludes_the_zero_self_distances():
    """3 + 3 points on the diagonal (t, t), t in {0, 1, 3} and {7, 12, 20}. The 15 distinct
    pairs have |dt| in {1, 2, 3, 4, 5, 6, 7, 8, 9, 11, 12, 13, 17, 19, 20}: median 8, so the
    L2 median is 8 sqrt(2) and the L1 median 16. (With the 6 zero self-distances of the
    diagonal counted, the lower median of the 36 entries would be |dt| = 6.)"""
    t = torch.tensor([0.0, 1.0, 3.0, 7.0, 12.0, 20.0], dtype=torch.float64)
    z = torch.stack([t, t], -1)
    x, y = z[:3], z[3:]
    res = D.mmd(x, y, kernel="both", num_bandwidths=5, bandwidth_ratio=2.0, num_permutations=10)
    ratios = torch.tensor([0.25, 0.5, 1.0, 2.0, 4.0], dtype=torch.float64)
    expected = torch.cat([8 * 2**0.5 * ratios, 16 * ratios])
    torch.testing.assert_close(res.bandwidths, expected, rtol=1e-12, atol=0)
    assert res.kernels == ("gaussian",) * 5 + ("laplace",) * 5
    bw = 8 * 2**0.5
    gauss = lambda a, b: torch.exp(-((a - b) ** 2).sum() / bw**2)  # noqa: E731
    assert res.mmd2 == pytest.approx(float(_brute_mmd2(x, y, gauss)), rel=1e-12)
    # Translated and rescaled copies give the same test (the statistic is scaled by nothing).
    moved = D.mmd(1e8 + 1e-3 * x, 1e8 + 1e-3 * y, kernel="both", num_bandwidths=5, num_permutations=10)
    torch.testing.assert_close(moved.bandwidths, 1e-3 * expected, rtol=1e-6, atol=0)


def _all_splits(n, m):
    """Observed labels (the first n are x) followed by every split of n + m points into n and m."""
    rows = [[i < n for i in range(n + m)]]
    rows += [[i in c for i in range(n + m)] for c in itertools.combinations(range(n + m), n)]
    return torch.tensor(rows)


@pytest.mark.parametrize(
    ("x", "y", "expected"),
    [
        # {0, 1} | {3, 7} is the most separated split: only itself and its mirror {3, 7} | {0, 1}
        # reach its statistic, so p = (1 + 2) / (1 + 6).
        ([0.0, 1.0], [3.0, 7.0], 3 / 7),
        # {0, 7} | {1, 3} is the middle pair of splits: 4 of the 6 reach it, p = (1 + 4) / (1 + 6).
        ([0.0, 7.0], [1.0, 3.0], 5 / 7),
    ],
)
def test_permutation_p_value_counts_the_observed_statistic(monkeypatch, x, y, expected):
    """p = (1 + #{permutation statistics >= observed}) / (1 + B), with the B = 6 relabellings
    being every split of 2 + 2 points (enumerated, so the count is exact)."""
    splits = _all_splits(2, 2)
    monkeypatch.setattr(kernel_mmd, "_permutation_labels", lambda n, m, b, seed, device: splits)
    x, y = torch.tensor(x, dtype=torch.float64), torch.tensor(y, dtype=torch.float64)
    res = D.mmd(x, y, bandwidths=[2.0], num_permutations=6)
    # The count from an independent brute force over the splits (exact ties: mirrored splits).
    z = torch.cat([x, y])[:, None]
    k = lambda a, b: torch.exp(-((a - b) ** 2).sum() / 4.0)  # noqa: E731
    stats = [float(_brute_mmd2(z[row], z[~row], k)) for row in splits[1:]]
    observed = float(_brute_mmd2(x[:, None], y[:, None], k))
    assert (1 + sum(s >= observed - 1e-12 for s in stats)) / 7 == pytest.approx(expected)
    assert res.p_value == pytest.approx(expected, abs=1e-15)
    assert float(res.p_values[0]) == pytest.approx(expected, abs=1e-15)
    assert res.mmd2 == pytest.approx(observed, abs=1e-14)


def test_level_under_h0_is_alpha_within_standard_errors():
    """x and y from one distribution: a permutation test at level alpha rejects with probability
    alpha (exactly, for B = 99 and continuous data). Over 1000 seeded repetitions the rejection
    rate is within 4.5 standard errors sqrt(alpha (1 - alpha) / reps) = 0.043 of alpha = 0.1."""
    alpha, reps = 0.1, 1000
    g = torch.Generator().manual_seed(12)
    rejections = 0
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny tensors: a second intra-op thread makes this 10x slower
    try:
        for rep in range(reps):
            x = torch.randn(8, 2, generator=g, dtype=torch.float64)
            y = torch.randn(8, 2, generator=g, dtype=torch.float64)
            rejections += D.mmd(x, y, kernel="both", num_bandwidths=3, num_permutations=99, seed=rep).p_value <= alpha
    finally:
        torch.set_num_threads(threads)
    se = (alpha * (1 - alpha) / reps) ** 0.5
    assert abs(rejections / reps - alpha) <= 4.5 * se


# ---------------------------------------------------------------------- adversarial inputs
@pytest.mark.parametrize(("loc", "scale"), [(1e8, 1.0), (1e6, 1e-3), (0.0, 1e-200), (0.0, 1e200), (-3e4, 1e-5)])
def test_statistic_and_p_value_do_not_depend_on_location_and_scale(loc, scale):
    """Both kernels see only differences, and the default bandwidths scale with the samples:
    the test of ``loc + scale * z`` is the test of ``z`` (was: a wrong p-value at N(1e8, 1),
    an error for a small spread or huge values)."""
    g = torch.Generator().manual_seed(3)
    x, y = torch.randn(30, 3, generator=g, dtype=torch.float64), torch.randn(30, 3, generator=g, dtype=torch.float64)
    ref = D.mmd(x, y, kernel="both", num_permutations=200)
    res = D.mmd(loc + scale * x, loc + scale * y, kernel="both", num_permutations=200)
    assert res.p_value == ref.p_value
    # The inputs themselves are rounded to eps |loc| / scale of their spread.
    tol = 1e-9 + 100 * torch.finfo(torch.float64).eps * abs(loc) / scale
    torch.testing.assert_close(res.mmd2_grid, ref.mmd2_grid, rtol=tol, atol=tol)
    torch.testing.assert_close(res.bandwidths, scale * ref.bandwidths, rtol=tol, atol=0)


def test_point_masses_and_repeated_draws():
    g = torch.Generator().manual_seed(0)
    point = torch.randn(1, 4, generator=g).expand(10, 4)
    res = D.mmd(point, point.clone(), kernel="both", num_permutations=50)  # one point mass twice
    assert res.mmd2 == 0.0 and res.p_value == 1.0
    other = D.mmd(point, point + 1.0, num_permutations=50)  # two different point masses
    assert other.mmd2 > 0 and other.p_value < 0.05
    # Mostly repeated draws (the median distance of distinct pairs is 0): the bandwidth is the
    # median of the non-zero distances, here all sqrt(4) * 1 = 2.
    x = torch.cat([torch.zeros(9, 4), torch.ones(1, 4)])
    res = D.mmd(x, x.clone(), num_bandwidths=1, num_permutations=20)
    assert float(res.bandwidths[0]) == pytest.approx(2.0) and res.p_value == 1.0


def test_a_non_finite_statistic_is_an_error_not_a_p_value(monkeypatch):
    kernel = kernel_mmd._kernel
    monkeypatch.setattr(kernel_mmd, "_kernel", lambda *a: kernel(*a) * float("nan"))
    with pytest.raises(ValueError, match="not finite"):
        D.mmd(torch.randn(5, 2), torch.randn(5, 2), num_permutations=10)
