"""align_many and align_samples: batched equals one-by-one, planted recovery,
barycenters, MCMC-shaped inputs, errors."""

import pickle

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from strategies import batch_shapes, group_element, mlp_architectures, mlp_params, seeds

import pyro_symmetry as ps

symmetries = st.sampled_from(["none", "sign"])


def _mlp(arch, sym):
    n_in, hidden, n_out = arch
    sizes = [n_in, *hidden, n_out]
    spec = ps.mlp_spec([f"fc{i + 1}" for i in range(len(sizes) - 1)], hidden, activation_symmetry=sym)
    return sizes, spec


def _equal_perm(a, b):
    return set(a) == set(b) and all(torch.equal(a[k], b[k]) for k in a)


def _row(t, i):
    return {k: v[i] for k, v in t.items()}


# ---------------------------------------------------------------------------- align_samples
@given(arch=mlp_architectures(), sym=symmetries, seed=seeds, batch=batch_shapes(max_ndim=2, max_size=3))
def test_align_samples_batched_equals_one_by_one(arch, sym, seed, batch):
    """Every sample's descent is the single-pair descent (same seed), though all
    similarity products run as one batched op."""
    sizes, spec = _mlp(arch, sym)
    ref = mlp_params(sizes, seed=seed)
    samples = mlp_params(sizes, batch_shape=batch, seed=seed + 1)
    res = ps.align_samples(samples, spec, ref, seed=seed)
    n = int(torch.tensor(batch).prod()) if batch else 1
    flat = {k: v.reshape((n,) + v.shape[len(batch) :]) for k, v in samples.items()}
    perm = {k: p.reshape(n, -1) for k, p in res.permutation.items()}
    obj = res.objective.reshape(n, -1)
    for i in range(n):
        one = ps.align(ref, _row(flat, i), spec, method="weights", seed=seed)
        assert _equal_perm(_row(perm, i), one.permutation)
        assert obj[i, -1].item() == pytest.approx(one.objective[-1], rel=1e-9, abs=1e-12)
    for k, v in res.aligned.items():
        assert v.shape == samples[k].shape
    assert res.converged_per_draw.shape == batch and res.converged is True
    assert all(p.shape == batch + (spec.sizes[g],) for g, p in res.permutation.items())


@given(arch=mlp_architectures(), sym=symmetries, seed=seeds)
def test_align_samples_recovers_label_switching_across_chains(arch, sym, seed):
    """Draws ``g_b.w + small noise`` in (chains, draws) layout all map back onto ``w``."""
    sizes, spec = _mlp(arch, sym)
    w = mlp_params(sizes, seed=seed)
    g = group_element(spec, seed, batch_shape=(3, 4))
    draws = spec.apply({k: v.expand((3, 4) + v.shape) for k, v in w.items()}, g)
    gen = torch.Generator().manual_seed(seed)
    draws = {k: v + 1e-6 * torch.randn(v.shape, generator=gen, dtype=v.dtype) for k, v in draws.items()}
    draws["obs_scale"] = torch.rand(3, 4, generator=gen, dtype=torch.float64)  # an untouched site
    res = ps.align_samples(draws, spec, w)
    assert _equal_perm(res.permutation, spec.inverse(g))
    for k in w:
        assert torch.allclose(res.aligned[k], w[k].expand_as(res.aligned[k]), atol=1e-4)
    assert torch.equal(res.aligned["obs_scale"], draws["obs_scale"])
    # default reference: the first draw; every draw then lands on the first one
    first = ps.align_samples(draws, spec)
    for k in w:
        assert torch.allclose(first.aligned[k], first.aligned[k][0, 0], atol=1e-4)
        assert torch.equal(first.reference[k], draws[k][0, 0])


@given(arch=mlp_architectures(), sym=symmetries, seed=seeds)
def test_align_samples_barycenter_lowers_total_cost_and_is_consistent(arch, sym, seed):
    sizes, spec = _mlp(arch, sym)
    samples = mlp_params(sizes, batch_shape=(2, 3), seed=seed)
    first = ps.align_samples(samples, spec, seed=seed)
    bary = ps.align_samples(samples, spec, "barycenter", seed=seed)
    # the reference is the mean of the aligned samples, which the final permutations give
    for k, v in bary.reference.items():
        assert torch.allclose(v, bary.aligned[k].mean((0, 1)), atol=1e-12)

    # the barycenter is the best single reference for the sum of squared costs
    def total(res):
        return sum(float((res.aligned[k] - res.reference[k]).pow(2).sum()) for k in res.reference)

    mean_ref = {k: first.aligned[k].mean((0, 1)) for k in first.reference}
    first_to_mean = sum(float((first.aligned[k] - mean_ref[k]).pow(2).sum()) for k in mean_ref)
    assert total(bary) <= first_to_mean + 1e-9
    assert total(bary) == pytest.approx(float(bary.objective[..., -1].sum()), rel=1e-9)
    assert 1 <= bary.iterations <= 10


def test_align_samples_signs_option_and_errors():
    sizes, spec = _mlp((3, (5,), 2), "sign")
    w = mlp_params(sizes, seed=0)
    g = group_element(spec, 4, batch_shape=(6,))
    draws = spec.apply(w, g)
    signed = ps.align_samples(draws, spec, w)
    plain = ps.align_samples(draws, spec, w, signs=False)
    assert float(signed.objective[:, -1].max()) < 1e-20
    assert float(plain.objective[:, -1].max()) > 1e-3
    assert all(bool((p >= 0).all()) for p in plain.permutation.values())
    with pytest.raises(ValueError, match="method must be 'weights'"):
        ps.align_samples(draws, spec, w, method="wasserstein")
    with pytest.raises(ps.SpecError, match="fc1.bias"):
        ps.align_samples({k: v for k, v in draws.items() if k != "fc1.bias"}, spec)
    with pytest.raises(ps.SpecError, match="batch shape"):
        ps.align_samples({**draws, "fc1.bias": draws["fc1.bias"][:3]}, spec)
    with pytest.raises(ps.SpecError, match="fc2.weight"):
        ps.align_samples({**draws, "fc2.weight": torch.zeros(6, 2, 4, dtype=torch.float64)}, spec)
    with pytest.raises(ValueError, match="reference"):
        ps.align_samples(draws, spec, "mean")
    res = pickle.loads(pickle.dumps(signed))
    assert _equal_perm(res.permutation, signed.permutation)


@pytest.mark.filterwarnings("ignore:num_chains=2 is more than available_cpu")
def test_align_samples_on_pyro_mcmc_output():
    """``MCMC.get_samples(group_by_chain=True)`` is accepted as it is."""
    import pyro
    from pyro.infer import MCMC, NUTS

    model = ps.models.BayesianMLP(2, [3], 1, activation="tanh", likelihood="regression", obs_scale=0.5)
    x = torch.randn(20, 2, generator=torch.Generator().manual_seed(0))
    y = torch.tanh(x[:, 0]) - x[:, 1]
    pyro.set_rng_seed(0)
    mcmc = MCMC(NUTS(model), num_samples=6, warmup_steps=4, num_chains=2, disable_progbar=True)
    mcmc.run(x, y)
    draws = mcmc.get_samples(group_by_chain=True)
    res = ps.align_samples(draws, model.spec, "barycenter")
    assert res.permutation["fc1"].shape == (2, 6, 3)
    # aligned draws compute the same functions as the raw draws
    assert torch.allclose(model.functional(res.aligned, x), model.functional(draws, x), atol=1e-5)


# ---------------------------------------------------------------------------- align_many
@given(arch=mlp_architectures(), sym=symmetries, seed=seeds, method=st.sampled_from(["weights", "wasserstein"]))
def test_align_many_planted_runs(arch, sym, seed, method):
    """Runs that are relabelings of one posterior align onto it, to run 0 or to the barycenter."""
    sizes, spec = _mlp(arch, sym)
    mu = mlp_params(sizes, seed=seed)
    gen = torch.Generator().manual_seed(seed)
    sd = {k: 0.5 + torch.rand(v.shape, generator=gen, dtype=v.dtype) for k, v in mu.items()}
    gs = [group_element(spec, seed + r) for r in range(3)]
    runs = []
    for g in gs:
        m, s = spec.apply(mu, g), spec.apply(sd, {k: ps.decode_signed(p)[0] for k, p in g.items()})
        runs.append({k: (m[k], s[k]) for k in mu} if method == "wasserstein" else m)
    to0 = ps.align_many(runs, spec, method=method, seed=seed)
    for r, g in enumerate(gs):
        assert _equal_perm(to0.permutations[r], spec.compose(gs[0], spec.inverse(g)))
    bary = ps.align_many(runs, spec, reference="barycenter", method=method, seed=seed)
    assert bary.converged and bary.iterations >= 1
    for r in range(3):
        a, b = bary.aligned[r], bary.aligned[0]
        for k in mu:
            assert torch.allclose(*(x[0] if method == "wasserstein" else x for x in (a[k], bary.barycenter[k])))
            assert torch.allclose(*(x[0] if method == "wasserstein" else x for x in (a[k], b[k])))
    assert float(bary.objective.max()) < 1e-20


@given(arch=mlp_architectures(), seed=seeds)
def test_align_many_to_a_run_equals_pairwise_align(arch, seed):
    sizes, spec = _mlp(arch, "sign")
    runs = [mlp_params(sizes, seed=seed + r) for r in range(3)]
    many = ps.align_many(runs, spec, reference=1, method="weights", seed=seed)
    for r in range(3):
        one = ps.align(runs[1], runs[r], spec, method="weights", seed=seed)
        assert _equal_perm(many.permutations[r], one.permutation)
        assert many.objective[r].item() == pytest.approx(one.objective[-1], rel=1e-9, abs=1e-12)
    assert _equal_perm(many.permutations[1], spec.identity())


def test_align_many_errors_and_pickle():
    sizes, spec = _mlp((3, (4,), 2), "none")
    runs = [mlp_params(sizes, seed=r) for r in range(2)]
    with pytest.raises(ValueError, match="out of range"):
        ps.align_many(runs, spec, reference=5, method="weights")
    with pytest.raises(ValueError, match="reference"):
        ps.align_many(runs, spec, reference="median", method="weights")
    with pytest.raises(ValueError, match="empty"):
        ps.align_many([], spec)
    with pytest.raises(ValueError, match=r"posteriors\[0\] is a mapping of point tensors"):
        ps.align_many(runs, spec)
    with pytest.raises(ps.SpecError, match="fc2.bias"):
        ps.align_many([runs[0], {**runs[1], "fc2.bias": torch.zeros(3, dtype=torch.float64)}], spec, method="weights")
    res = ps.align_many(runs, spec, reference="barycenter", method="weights")
    back = pickle.loads(pickle.dumps(res))
    assert all(torch.equal(back.barycenter[k], res.barycenter[k]) for k in res.barycenter)


# ---------------------------------------------------------------------------- a barycenter still moving
def _runs_needing_two_refinements():
    """Six random 3-8-8-2 runs whose barycenter moves after the first refinement."""
    sizes, spec = _mlp((3, (8, 8), 2), "none")
    runs = [mlp_params(sizes, seed=10 + r) for r in range(6)]
    assert ps.align_many(runs, spec, reference="barycenter", method="weights", seed=0).iterations >= 2
    return spec, runs


def test_align_many_objective_is_the_cost_to_the_returned_barycenter():
    """Stopped by ``max_iters``: not converged, and ``objective[r]`` is still the distance
    of ``aligned[r]`` to ``barycenter`` (it was the distance to the previous barycenter)."""
    spec, runs = _runs_needing_two_refinements()
    for method, qs in (
        ("weights", runs),
        ("wasserstein", [{k: (v, v.abs() + 0.5) for k, v in r.items()} for r in runs]),
    ):
        res = ps.align_many(qs, spec, reference="barycenter", method=method, max_iters=1, seed=0)
        assert not res.converged and res.iterations == 1
        for r in range(len(runs)):
            a, b = res.aligned[r], res.barycenter
            if method == "weights":
                direct = sum(float((a[k] - b[k]).pow(2).sum()) for k in a)
            else:
                direct = sum(float((a[k][0] - b[k][0]).pow(2).sum() + (a[k][1] - b[k][1]).pow(2).sum()) for k in a)
            assert res.objective[r].item() == pytest.approx(direct, rel=1e-12)


def test_align_samples_does_not_report_convergence_while_the_barycenter_moves():
    spec, runs = _runs_needing_two_refinements()
    samples = {k: torch.stack([r[k] for r in runs]) for k in runs[0]}
    res = ps.align_samples(samples, spec, "barycenter", max_iters=1, seed=0)
    assert res.iterations == 1 and not bool(res.converged_per_draw.any()) and res.converged is False
    # the objective is the cost to the reference returned (the one the samples were aligned to)
    direct = sum((res.aligned[k] - res.reference[k]).pow(2).flatten(1).sum(-1) for k in res.reference)
    assert torch.allclose(res.objective[:, -1], direct, rtol=1e-12)
    full = ps.align_samples(samples, spec, "barycenter", seed=0)
    assert full.converged is True and full.iterations >= 2
