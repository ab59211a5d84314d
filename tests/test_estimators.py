"""Estimators of log S(w) and I(g; w): exact, permanent, contrastive, importance."""

import itertools
import math

import pyro.distributions as dist
import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from strategies import seeds
from strategies_estimators import brute_force_log_q_sym, mean_field, small_architectures

import pyro_symmetry as ps
from pyro_symmetry.estimators import (
    BaseDensity,
    contrastive_log_ratio,
    exact_log_ratio,
    importance_log_ratio,
    log_permanent,
    permanent_log_ratio,
    symmetry_log_ratio,
)
from pyro_symmetry.estimators import exact as exact_module
from pyro_symmetry.estimators.importance import plackett_luce_proposal
from pyro_symmetry.models import BayesianMLP


def _brute_log_perm(a):
    n = a.shape[-1]
    terms = [sum(a[..., i, p[i]] for i in range(n)) for p in itertools.permutations(range(n))]
    return torch.logsumexp(torch.stack(terms), 0)


@given(n=st.integers(1, 6), seed=seeds, spread=st.sampled_from([0.1, 3.0, 30.0]))
def test_log_permanent_matches_brute_force(n, seed, spread):
    a = torch.randn(2, n, n, dtype=torch.float64, generator=torch.Generator().manual_seed(seed)) * spread
    assert torch.allclose(log_permanent(a), _brute_log_perm(a), rtol=1e-10, atol=1e-9)


def test_log_permanent_large_and_gradient():
    # perm(ones) = n!: after scaling the least permanent of a doubly stochastic matrix, the hardest case
    for n in (12, 18):
        assert log_permanent(torch.zeros(n, n, dtype=torch.float64)).item() == pytest.approx(
            math.lgamma(n + 1), abs=1e-6
        )
    # d log perm / dA[i, j] = probability that i is matched to j: rows sum to one
    a = torch.randn(5, 5, dtype=torch.float64, requires_grad=True)
    log_permanent(a).backward()
    assert torch.allclose(a.grad.sum(-1), torch.ones(5, dtype=torch.float64))
    assert torch.allclose(a.grad.sum(-2), torch.ones(5, dtype=torch.float64))
    with pytest.raises(ValueError, match="n, n"):
        log_permanent(torch.zeros(3, 4))


@pytest.mark.parametrize("hidden", [(3, 2), (4,)])
@pytest.mark.parametrize("act", ["relu", "tanh"])
def test_exact_matches_independent_brute_force(hidden, act):
    model = BayesianMLP(2, list(hidden), 2, activation=act)
    q = mean_field(model.spec.shapes, seed=1)
    base = BaseDensity(q, model.spec)
    w = base.sample()
    ratio = exact_log_ratio(base, w)
    expected = brute_force_log_q_sym(q, w, hidden, signed=act == "tanh") - base.log_prob(w)
    assert torch.allclose(ratio, expected, atol=1e-9)
    # log S = ratio + log|G| >= 0 (the identity term alone is 1)
    assert ps.log_s(q, model.spec, w, estimator="exact") >= 0


@pytest.mark.parametrize("per_chunk", [1, 5, 7, None])
@pytest.mark.parametrize(("hidden", "act"), [((3, 2), "relu"), ((4,), "tanh"), ((2, 2), "tanh")])
def test_exact_chunk_boundaries_match_brute_force(monkeypatch, per_chunk, hidden, act):
    # Chunks of `per_chunk` elements (the last one partial): every chunk must be enumerated. A bias of
    # 0.05-0.8 nats from dropping chunks was hidden by a 0.1-nat tolerance elsewhere; here it is exact.
    model = BayesianMLP(2, list(hidden), 2, activation=act)
    q = mean_field(model.spec.shapes, seed=2)
    base = BaseDensity(q, model.spec)
    torch.manual_seed(0)
    w = base.sample((3,))
    dim = sum(math.prod(model.spec.shapes[s]) for s in model.spec.sites)
    if per_chunk is not None:
        assert model.spec.order % per_chunk or per_chunk == 1  # a partial last chunk (or one per element)
        monkeypatch.setattr(exact_module, "_CHUNK_ELEMENTS", per_chunk * dim * 3)
    ratio = exact_log_ratio(base, w)
    signed = act == "tanh"
    expected = torch.stack(
        [brute_force_log_q_sym(q, {k: v[i] for k, v in w.items()}, hidden, signed) for i in range(3)]
    ) - base.log_prob(w)
    assert torch.allclose(ratio, expected, rtol=0, atol=1e-9)
    # the same per draw (each call chunked alone)
    singles = torch.stack([exact_log_ratio(base, {k: v[i] for k, v in w.items()}) for i in range(3)])
    assert torch.allclose(singles, expected, rtol=0, atol=1e-9)


@given(width=st.integers(1, 5), act=st.sampled_from(["relu", "tanh"]), seed=seeds, flat=st.booleans())
def test_permanent_equals_exact_for_one_hidden_layer(width, act, seed, flat):
    model = BayesianMLP(2, [width], 2, activation=act)
    q = mean_field(model.spec.shapes, seed)
    base = BaseDensity(q, model.spec)
    if flat:
        layout = ps.FlatLayout(model.spec.shapes)
        loc = layout.to_flat({k: d.base_dist.loc for k, d in q.items()})
        scale = layout.to_flat({k: d.base_dist.scale for k, d in q.items()})
        base = BaseDensity(dist.Normal(loc, scale).to_event(1), model.spec, layout)
    w = base.sample((3,))
    assert torch.allclose(permanent_log_ratio(base, w), exact_log_ratio(base, w), atol=1e-9)


def test_permanent_refuses_coupled_groups_and_mixtures():
    model = BayesianMLP(2, [3, 2], 2)
    base = BaseDensity(mean_field(model.spec.shapes, 0), model.spec)
    with pytest.raises(ps.SpecError, match="decoupled"):
        permanent_log_ratio(base, base.sample())
    one = BayesianMLP(2, [3], 2)
    layout = ps.FlatLayout(one.spec.shapes)
    mix = dist.MixtureOfDiagNormals(torch.randn(2, layout.dim), torch.ones(2, layout.dim), torch.zeros(2))
    mbase = BaseDensity(mix, one.spec, layout)
    with pytest.raises(ps.SpecError, match="factorized"):
        permanent_log_ratio(mbase, mbase.sample())


def test_exact_refuses_large_groups_and_bad_methods():
    model = BayesianMLP(2, [9], 2)
    q = mean_field(model.spec.shapes, 0)
    w = BaseDensity(q, model.spec).sample()
    with pytest.raises(ps.SpecError, match="max_order"):
        symmetry_log_ratio(q, model.spec, w, "exact")
    with pytest.raises(ValueError, match="method must be one of"):
        symmetry_log_ratio(q, model.spec, w, "bogus")
    with pytest.raises(ValueError, match="num_permutations"):
        symmetry_log_ratio(q, model.spec, w, "contrastive", 0)
    with pytest.raises(ps.SpecError, match="missing"):
        symmetry_log_ratio(q, model.spec, {"fc1.weight": w["fc1.weight"]}, "contrastive")


def test_auto_resolution():
    small = BayesianMLP(2, [4], 2)
    one = BayesianMLP(2, [12], 2)
    deep = BayesianMLP(2, [12, 12], 2)
    for model, expected in [(small, "exact"), (one, "permanent"), (deep, "importance")]:
        est = ps.mutual_information(mean_field(model.spec.shapes, 0), model.spec, num_samples=4)
        assert est.estimator == expected


def test_mixture_exact_matches_pushforward_enumeration():
    model = BayesianMLP(2, [3], 1, activation="tanh")
    layout = ps.FlatLayout(model.spec.shapes)
    g = torch.Generator().manual_seed(0)
    mix = dist.MixtureOfDiagNormals(
        torch.randn(3, layout.dim, generator=g, dtype=torch.float64),
        torch.rand(3, layout.dim, generator=g, dtype=torch.float64) + 0.3,
        torch.randn(3, generator=g, dtype=torch.float64),
    )
    base = BaseDensity(mix, model.spec, layout)
    w = base.sample((2,))
    elements = model.spec.elements()
    logs = torch.stack(
        [
            ps.Pushforward(mix, model.spec, {k: v[e] for k, v in elements.items()}, layout=layout).log_prob(w)
            for e in range(model.spec.order)
        ]
    )
    expected = torch.logsumexp(logs, 0) - math.log(model.spec.order) - mix.log_prob(w)
    assert torch.allclose(exact_log_ratio(base, w), expected, atol=1e-9)


def _gaps(base, w, exact, fn, batch=250):
    """Per-draw (bound - exact) estimates of I on the same draws, computed in batches of draws."""
    n = exact.shape[0]
    est = torch.cat([fn(base, {k: v[i : i + batch] for k, v in w.items()}) for i in range(0, n, batch)])
    return -est + exact  # I_bound - I_exact per draw


def _mean_se(d):
    return float(d.mean()), float(d.std() / math.sqrt(d.numel()))


def _paired(base, w, exact, fn):
    """Mean and standard error of (bound - exact) estimates of I on the same draws."""
    return _mean_se(_gaps(base, w, exact, fn))


@pytest.mark.parametrize("act", ["relu", "tanh"])
def test_bounds_below_exact_increase_with_k_and_converge(act):
    model = BayesianMLP(2, [4], 1, activation=act)
    q = mean_field(model.spec.shapes, 3, loc_scale=0.5, min_scale=0.4)
    base = BaseDensity(q, model.spec)
    torch.manual_seed(0)
    w = base.sample((1500,))
    exact = exact_log_ratio(base, w)
    gen = torch.Generator().manual_seed(1)
    for name, fn, ks in [
        ("contrastive", lambda K: lambda b, v: contrastive_log_ratio(b, v, K, gen), [2, 8, 64, 128, 256]),
        ("importance", lambda K: lambda b, v: importance_log_ratio(b, v, K, 1.0, gen), [2, 8, 64, 128]),
    ]:
        gaps = []
        for K in ks:
            gaps.append(_gaps(base, w, exact, fn(K)))
            mean, se = _mean_se(gaps[-1])
            assert mean <= 3 * se + 1e-9, (name, K, mean, se)  # a lower bound on I
            if len(gaps) > 1:
                prev_mean, prev_se = _mean_se(gaps[-2])
                assert mean >= prev_mean - 3 * math.hypot(se, prev_se), (name, K)  # increases with K
        # Tends to the exact I. The gap of a K-term log-mean is c/K + O(1/K^2), so the per-draw
        # extrapolation 2 gap(2K) - gap(K) estimates the K -> infinity limit, which must be zero within
        # 4 of its own standard errors (no allowance in nats).
        limit, se = _mean_se(2 * gaps[-1] - gaps[-2])
        assert ks[-1] == 2 * ks[-2] and abs(limit) <= 4 * se, (name, limit, se)


def test_importance_far_tighter_than_contrastive_at_width_16():
    model = BayesianMLP(3, [16], 2)
    q = mean_field(model.spec.shapes, 0, loc_scale=1.0, min_scale=0.6)
    base = BaseDensity(q, model.spec)
    torch.manual_seed(0)
    w = base.sample((64,))
    exact = permanent_log_ratio(base, w)
    gen = torch.Generator().manual_seed(0)
    imp, se_imp = _paired(base, w, exact, lambda b, v: importance_log_ratio(b, v, 16, 1.0, gen))
    con, se_con = _paired(base, w, exact, lambda b, v: contrastive_log_ratio(b, v, 16, gen))
    I = float(-exact.mean())
    assert I > 10 and con > -I  # a wide layer with a large I; contrastive is capped at log 16
    assert imp <= 3 * se_imp and con <= 3 * se_con + 1e-9
    assert -con > I - math.log(16) - 1e-6
    assert imp > con + 5  # importance: a gap to the truth several nats smaller
    assert imp > -0.1 * I


@given(arch=small_architectures(), seed=seeds)
def test_proposal_is_equivariant(arch, seed):
    n_in, hidden, n_out, act = arch
    model = BayesianMLP(n_in, list(hidden), n_out, activation=act)
    base = BaseDensity(mean_field(model.spec.shapes, seed), model.spec)
    torch.manual_seed(seed)
    w = base.sample((2,))
    h = model.spec.sample((2,), generator=torch.Generator().manual_seed(seed + 1))
    hw = model.spec.apply(w, h)
    p1, lp1 = plackett_luce_proposal(base, w, 5, 1.0, torch.Generator().manual_seed(seed))
    p2, lp2 = plackett_luce_proposal(base, hw, 5, 1.0, torch.Generator().manual_seed(seed))
    # the same random numbers give the same contents at each q-neuron: pi(h g | h w) = pi(g | w)
    assert torch.allclose(lp1[1:], lp2[1:], atol=1e-8)
    a, b = base.act(w, {k: v[1:] for k, v in p1.items()}), base.act(hw, {k: v[1:] for k, v in p2.items()})
    for k in model.spec.sites:
        assert torch.allclose(a[k], b[k])
    # slot 0 is the identity, and every slot is a valid element
    for k, p in p1.items():
        assert torch.equal(p[0], torch.arange(model.spec.sizes[k]).expand_as(p[0]))
        model.spec.validate({k2: v.reshape(-1, v.shape[-1]) for k2, v in p1.items()})


def test_uniform_proposal_has_log_pi_minus_log_order():
    model = BayesianMLP(2, [3, 2], 1, activation="tanh")
    base = BaseDensity(mean_field(model.spec.shapes, 0), model.spec)
    _, log_pi = plackett_luce_proposal(base, base.sample((4,)), 6, beta=0.0)
    assert torch.allclose(log_pi, torch.full_like(log_pi, -model.spec.log_order))


def test_mutual_information_accepts_guides_and_mappings():
    model = BayesianMLP(2, [3], 1)
    q = mean_field(model.spec.shapes, 0)
    pairs = {k: (d.base_dist.loc, d.base_dist.scale) for k, d in q.items()}
    torch.manual_seed(0)
    a = ps.mutual_information(q, model.spec, estimator="exact", num_samples=400)
    torch.manual_seed(0)
    b = ps.mutual_information(pairs, model.spec, estimator="permanent", num_samples=400)
    assert a.estimator == "exact" and b.estimator == "permanent" and a.num_permutations is None
    assert a.value == pytest.approx(b.value, abs=1e-9) and 0 <= a.value <= a.log_order
    assert a.stderr > 0
    with pytest.raises(ps.SpecError, match="spec"):
        ps.mutual_information(q)
    with pytest.raises(ValueError, match="num_samples"):
        ps.mutual_information(q, model.spec, num_samples=1)


def test_estimators_honour_dtype_and_are_reproducible(dtype):
    model = BayesianMLP(2, [4], 2, activation="tanh")
    q = mean_field(model.spec.shapes, 0, dtype=dtype)
    base = BaseDensity(q, model.spec)
    torch.manual_seed(0)
    w = base.sample((5,))
    eps = torch.finfo(dtype).eps
    out = {}
    for method in ("exact", "permanent", "contrastive", "importance"):
        runs = [
            symmetry_log_ratio(q, model.spec, w, method, 8, generator=torch.Generator().manual_seed(s))
            for s in (0, 0, 1)
        ]
        assert runs[0].dtype == dtype and torch.isfinite(runs[0]).all(), method
        assert torch.equal(runs[0], runs[1]), method  # one seed, one result
        out[method] = runs
    # float32: rounding of a sum of a few dozen float32 log-densities of the result's size
    tol = 1e-9 if dtype == torch.float64 else 32 * eps * float(out["exact"][0].abs().max())
    assert torch.allclose(out["permanent"][0], out["exact"][0], rtol=0, atol=tol)
    assert not torch.equal(out["contrastive"][0], out["contrastive"][2])  # the seed matters
    # the float32 and float64 computations agree to float32 precision
    q64 = {
        k: dist.Normal(d.base_dist.loc.double(), d.base_dist.scale.double()).to_event(d.event_dim) for k, d in q.items()
    }
    exact64 = exact_log_ratio(BaseDensity(q64, model.spec), {k: v.double() for k, v in w.items()})
    assert torch.allclose(out["exact"][0].double(), exact64, rtol=0, atol=tol)

    def mi(seed):
        torch.manual_seed(seed)  # the draws of w
        return ps.mutual_information(q, model.spec, "importance", 64, 4, generator=torch.Generator().manual_seed(seed))

    assert mi(3) == mi(3) and mi(3).value != mi(4).value
