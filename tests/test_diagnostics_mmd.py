"""MMD: the unbiased estimator against a brute-force double sum, the permutation
test's level and power, and symmetry-aware MMD between a posterior and its
permuted copy."""

import itertools

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

import pyro_symmetry as ps
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
