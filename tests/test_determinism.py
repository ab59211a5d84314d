"""Determinism: with a fixed seed every stochastic public result is reproducible, whatever
the global RNG state in between (each call disturbs it on purpose)."""

import pyro
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from pyro.infer import SVI, Trace_ELBO
from pyro.infer.autoguide import AutoNormal

import pyro_symmetry as ps
from pyro_symmetry.models import BayesianMLP

D = ps.diagnostics


def _equal(a, b):
    """Exact equality of (nested) results: tensors, mappings, sequences, numbers."""
    if torch.is_tensor(a):
        return torch.is_tensor(b) and a.dtype == b.dtype and a.shape == b.shape and torch.equal(a, b)
    if isinstance(a, dict):
        return isinstance(b, dict) and a.keys() == b.keys() and all(_equal(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)):
        return len(a) == len(b) and all(_equal(x, y) for x, y in zip(a, b))
    return a == b or (a != a and b != b)  # NaN == NaN for this purpose


def twice(fn, *args, **kwargs):
    """Call ``fn`` twice with the global torch/pyro RNG moved to unrelated states in between."""
    pyro.set_rng_seed(123)
    first = fn(*args, **kwargs)
    pyro.set_rng_seed(456)
    torch.rand(17)
    second = fn(*args, **kwargs)
    return first, second


def _points(model, seed, batch=()):
    g = torch.Generator().manual_seed(seed)
    return {k: torch.randn(batch + s, generator=g, dtype=torch.float64) for k, s in model.spec.shapes.items()}


def _gaussians(model, seed):
    g = torch.Generator().manual_seed(seed)
    return {k: (torch.randn(s, generator=g), torch.rand(s, generator=g) + 0.2) for k, s in model.spec.shapes.items()}


def _data(n=12, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 3, generator=g), torch.randint(0, 2, (n,), generator=g)


@given(seed=st.integers(0, 2**31 - 1), signed=st.booleans(), batch=st.lists(st.integers(1, 3), max_size=2))
def test_spec_sample_with_a_generator(seed, signed, batch):
    spec = BayesianMLP(3, [4, 5], 2, activation="tanh").spec
    a, b = twice(lambda: spec.sample(batch, generator=torch.Generator().manual_seed(seed), signed=signed))
    assert _equal(a, b)


@given(seed=st.integers(0, 1000), act=st.sampled_from(["relu", "tanh"]), method=st.sampled_from(["weights", "w2"]))
@settings(max_examples=10)
def test_align_align_many_align_samples(seed, act, method):
    model = BayesianMLP(3, [5, 4], 2, activation=act)
    q = [_gaussians(model, seed + r) for r in range(3)]
    kw = {"method": "weights" if method == "weights" else "wasserstein", "seed": seed}
    a, b = twice(ps.align, q[0], q[1], model.spec, init="identity", **kw)
    assert _equal(a.permutation, b.permutation) and a.objective == b.objective and _equal(a.aligned, b.aligned)
    a, b = twice(ps.align_many, q, model.spec, reference="barycenter", **kw)
    assert _equal(a.permutations, b.permutations) and _equal(a.barycenter, b.barycenter)
    assert _equal(a.objective, b.objective) and a.iterations == b.iterations
    samples = _points(model, seed, (2, 3))
    a, b = twice(ps.align_samples, samples, model.spec, "barycenter", seed=seed)
    assert _equal(a.permutation, b.permutation) and _equal(a.aligned, b.aligned) and _equal(a.objective, b.objective)


def test_alignment_without_a_seed_is_still_reproducible_under_a_fixed_global_seed():
    model = BayesianMLP(3, [5, 4], 2)
    q0, q1 = _gaussians(model, 0), _gaussians(model, 1)
    runs = []
    for _ in range(2):
        pyro.set_rng_seed(7)
        runs.append(ps.align(q0, q1, model.spec, init="identity"))
    assert _equal(runs[0].permutation, runs[1].permutation) and runs[0].objective == runs[1].objective


@pytest.mark.parametrize("permutation", ["align", "sort"])
@pytest.mark.parametrize("act", ["relu", "tanh"])
def test_canonicalize_and_min_mass(permutation, act):
    model = BayesianMLP(3, [5, 4], 2, activation=act)
    w = _points(model, 3, (6,))
    reference = "barycenter" if permutation == "align" else None
    a, b = twice(ps.canonicalize, w, model.spec, permutation=permutation, reference=reference)
    assert _equal(a.params, b.params) and _equal(a.permutation, b.permutation) and _equal(a.signs, b.signs)
    if act == "relu":
        a, b = twice(ps.min_mass, w, model.spec)
        assert _equal(a.params, b.params) and _equal(a.log_scales, b.log_scales) and a.iterations == b.iterations


@given(seed=st.integers(0, 2**31 - 1), kernel=st.sampled_from(["gaussian", "laplace", "both"]))
@settings(max_examples=10)
def test_mmd_with_a_seed(seed, kernel):
    g = torch.Generator().manual_seed(seed)
    x, y = torch.randn(9, 2, generator=g), torch.randn(11, 2, generator=g) + 0.4
    a, b = twice(D.mmd, x, y, kernel=kernel, num_permutations=50, seed=seed)
    assert a.mmd2 == b.mmd2 and a.p_value == b.p_value and _equal(a.p_values, b.p_values)


def test_symmetry_aware_mmd_and_draws():
    model = BayesianMLP(3, [4], 2, activation="tanh")
    x, y = _points(model, 0, (8,)), _points(model, 1, (8,))
    a, b = twice(D.mmd, x, y, spec=model.spec, symmetry_aware=True, num_permutations=30, seed=1)
    assert a.mmd2 == b.mmd2 and a.p_value == b.p_value
    runs = [_gaussians(model, r) for r in range(2)]
    a, b = twice(D.collect_draws, runs, num_samples=6, spec=model.spec, symmetric=True, seed=3)
    assert _equal(a.samples, b.samples)
    ta, tb = twice(D.to_inference_data, runs, num_samples=6, seed=3)
    assert all((ta["posterior"][k].values == tb["posterior"][k].values).all() for k in model.site_names)


def test_loss_barrier_with_a_seed():
    model = BayesianMLP(3, [4], 2)
    x, y = _data()
    q0, q1 = _gaussians(model, 0), _gaussians(model, 1)
    a, b = twice(lambda: ps.loss_barrier(ps.gaussian_nll_loss(model, x, y, num_samples=8, seed=5), q0, q1, 5))
    assert _equal(a.losses, b.losses) and a.barrier == b.barrier


@pytest.mark.parametrize("vectorize", [True, False])
def test_train_runs_with_seeds(vectorize):
    x, y = _data()

    def train():
        return ps.train_runs(
            lambda: BayesianMLP(3, [4], 2), AutoNormal, (x, y), 2, steps=5, seed=11, vectorize=vectorize, progress=False
        )

    a, b = twice(train)
    for ra, rb in zip(a, b):
        assert _equal(ra.losses, rb.losses) and _equal(ra.guide.median(), rb.guide.median())
    # different seeds are different runs
    assert not _equal(a[0].guide.median(), a[1].guide.median())


@pytest.mark.parametrize("estimator", ["contrastive", "importance"])
def test_symmetrized_guide_training_under_pyro_set_rng_seed(estimator):
    x, y = _data()

    def train():
        pyro.clear_param_store()
        pyro.set_rng_seed(2)
        model = BayesianMLP(3, [4], 2)
        guide = ps.AutoSymmetrizedNormal(model, num_permutations=4, estimator=estimator)
        svi = SVI(model, guide, pyro.optim.Adam({"lr": 0.02}), Trace_ELBO())
        losses = [svi.step(x, y) for _ in range(5)]
        return losses, {k: v.detach().clone() for k, v in guide.median().items()}

    (la, ma), (lb, mb) = train(), train()
    assert la == lb and _equal(ma, mb)
