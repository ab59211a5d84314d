"""Minimum-mass rescaling (``ps.min_mass``): optimality, uniqueness, invariance, batching."""

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from scipy.optimize import minimize
from strategies import mlp_architectures, model_params, seeds
from test_scaling import random_log_scales, rel_err

import pyro_symmetry as ps
from pyro_symmetry.models import BayesianCNN, BayesianMLP


def mass_gradient(params, spec, sites=None):
    """``dM/du`` at ``u = 0`` by autograd through ``rescale`` (independent of the solver)."""
    u = {k: torch.zeros(params[f"{k}.bias"].shape, dtype=torch.float64, requires_grad=True) for k in spec.groups}
    m = ps.mass(ps.rescale(params, spec, u), spec, sites).sum()
    return dict(zip(u, torch.autograd.grad(m, list(u.values()))))


@given(arch=mlp_architectures(), seed=seeds)
def test_min_mass_is_optimal_and_keeps_the_function(arch, seed):
    n_in, hidden, n_out = arch
    model = BayesianMLP(n_in, hidden, n_out)
    spec = model.spec
    params = ps.rescale(model_params(model, (3,), seed=seed), spec, random_log_scales(spec, seed, (3,), 1.5))
    res = ps.min_mass(params, spec)
    x = torch.randn(6, n_in, dtype=torch.float64, generator=torch.Generator().manual_seed(seed))
    assert rel_err(model.functional(res.params, x), model.functional(params, x)) < 1e-8
    assert (res.mass_after <= res.mass_before * (1 + 1e-12)).all()
    assert res.converged and (res.residual <= 1e-10).all()
    torch.testing.assert_close(res.mass_before, ps.mass(params, spec))
    torch.testing.assert_close(res.mass_after, ps.mass(res.params, spec))
    # the gradient of the mass with respect to the log-scales vanishes at the solution
    for g, grad in mass_gradient(res.params, spec).items():
        assert (grad.abs().amax(-1) <= 1e-8 * res.mass_after).all(), g
    # and the result is the rescaling by the reported log-scales
    again = ps.rescale(params, spec, res.log_scales)
    for k in params:
        torch.testing.assert_close(again[k], res.params[k], rtol=1e-12, atol=1e-14)


@given(arch=mlp_architectures(), seed=seeds)
def test_min_mass_representative_is_unique(arch, seed):
    """Two random rescalings of one network reach the same minimum-mass network."""
    n_in, hidden, n_out = arch
    spec = BayesianMLP(n_in, hidden, n_out).spec
    params = model_params(BayesianMLP(n_in, hidden, n_out), seed=seed)
    a = ps.min_mass(ps.rescale(params, spec, random_log_scales(spec, seed + 1, scale=2.0)), spec)
    b = ps.min_mass(ps.rescale(params, spec, random_log_scales(spec, seed + 2, scale=2.0)), spec)
    for k in params:
        assert rel_err(a.params[k], b.params[k]) < 1e-8, k


@settings(max_examples=8)  # conv nets are slow to evaluate; 8 draws cover the shapes
@given(seed=seeds, sites=st.sampled_from(["all", "weights"]))
def test_min_mass_matches_scipy_on_a_tiny_network(seed, sites):
    """The minimum equals an independent L-BFGS minimization of ``mass(rescale(w, u))``."""
    model = BayesianMLP(3, [4, 3], 2)
    spec = model.spec
    params = ps.rescale(model_params(model, seed=seed), spec, random_log_scales(spec, seed, scale=1.0))
    site_list = None if sites == "all" else [k for k in model.site_names if k.endswith("weight")]

    def objective(flat):
        v = torch.tensor(flat, dtype=torch.float64, requires_grad=True)
        u = {"fc1": v[:4], "fc2": v[4:]}
        m = ps.mass(ps.rescale(params, spec, u), spec, site_list)
        (g,) = torch.autograd.grad(m, v)
        return m.item(), g.numpy()

    ref = minimize(objective, np.zeros(7), jac=True, method="L-BFGS-B", options=dict(ftol=1e-16, gtol=1e-12))
    res = ps.min_mass(params, spec, sites=site_list)
    assert res.mass_after.item() == pytest.approx(ref.fun, rel=1e-9)
    assert res.mass_after.item() <= ref.fun * (1 + 1e-12)
    u = torch.cat([res.log_scales["fc1"], res.log_scales["fc2"]]).numpy()
    np.testing.assert_allclose(u, ref.x, atol=1e-4)


@given(seed=seeds, include_biases=st.booleans())
def test_min_mass_balances_each_neuron(seed, include_biases):
    """At the minimum each neuron's incoming mass (its weight row, plus its bias when the
    biases are counted) equals its outgoing mass (its weight column)."""
    model = BayesianMLP(5, [6, 4], 3)
    res = ps.min_mass(model_params(model, seed=seed), model.spec, include_biases=include_biases)
    p = res.params
    bias = (lambda k: p[k].square()) if include_biases else (lambda k: 0.0)
    in1 = p["fc1.weight"].square().sum(-1) + bias("fc1.bias")
    out1 = p["fc2.weight"].square().sum(-2)
    in2 = p["fc2.weight"].square().sum(-1) + bias("fc2.bias")
    out2 = p["fc3.weight"].square().sum(-2)
    torch.testing.assert_close(in1, out1, rtol=1e-9, atol=0)
    torch.testing.assert_close(in2, out2, rtol=1e-9, atol=0)


@given(seed=seeds, chunk=st.integers(1, 4))
def test_batched_min_mass_equals_per_sample(seed, chunk):
    model = BayesianMLP(4, [5, 3], 2)
    params = ps.rescale(model_params(model, (2, 3), seed=seed), model.spec, random_log_scales(model.spec, seed, (2, 3)))
    res = ps.min_mass(params, model.spec, chunk_size=chunk)
    assert res.residual.shape == (2, 3) and res.log_scales["fc1"].shape == (2, 3, 5)
    for i in range(2):
        for j in range(3):
            one = ps.min_mass({k: v[i, j] for k, v in params.items()}, model.spec)
            for k in params:
                assert rel_err(res.params[k][i, j], one.params[k]) < 1e-9
            assert res.mass_after[i, j].item() == pytest.approx(one.mass_after.item(), rel=1e-12)


def test_min_mass_broadcasts_shared_sites():
    """An unbatched site (shared by every sample) broadcasts against batched ones."""
    model = BayesianMLP(4, [5], 2)
    params = model_params(model, (3,), seed=1)
    params["fc1.bias"] = params["fc1.bias"][0]
    res = ps.min_mass(params, model.spec)
    assert res.params["fc1.bias"].shape == (3, 5) and res.converged is True
    assert res.converged_per_draw.shape == (3,) and bool(res.converged_per_draw.all())
    x = torch.randn(4, 4, dtype=torch.float64)
    assert rel_err(model.functional(res.params, x), model.functional(params, x)) < 1e-8


@settings(max_examples=8)  # conv nets are slow to evaluate; 8 draws cover the shapes
@given(seed=seeds)
def test_min_mass_on_a_cnn(seed):
    """Per-channel scales; conv kernels summed; flatten blocks scale together."""
    model = BayesianCNN(2, (8, 8), [3, 4], 3, activation="relu")
    spec = model.spec
    params = ps.rescale(model_params(model, (2,), seed=seed), spec, random_log_scales(spec, seed, (2,), 1.5))
    res = ps.min_mass(params, spec)
    x = torch.randn(4, 2, 8, 8, dtype=torch.float64, generator=torch.Generator().manual_seed(seed))
    assert rel_err(model.functional(res.params, x), model.functional(params, x)) < 1e-8
    assert res.converged and (res.mass_after <= res.mass_before).all()
    u = {k: torch.zeros(2, g.size, dtype=torch.float64, requires_grad=True) for k, g in spec.groups.items()}
    m = ps.mass(ps.rescale(res.params, spec, u), spec).sum()
    for grad in torch.autograd.grad(m, list(u.values())):
        assert (grad.abs().amax(-1) <= 1e-8 * res.mass_after).all()


def test_dead_neurons_are_pinned_and_reported():
    model = BayesianMLP(3, [4, 4], 2)
    params = model_params(model, (2,), seed=3)
    params["fc1.weight"][0, 1] = 0.0  # neuron 1 of layer 1: no incoming weights or bias
    params["fc1.bias"][0, 1] = 0.0
    params["fc3.weight"][1, :, 2] = 0.0  # neuron 2 of layer 2: no outgoing weights
    params = ps.rescale(params, model.spec, random_log_scales(model.spec, 0, (2,)))
    res = ps.min_mass(params, model.spec)
    assert res.dead["fc1"].tolist() == [[False, True, False, False], [False] * 4]
    assert res.dead["fc2"].tolist() == [[False] * 4, [False, False, True, False]]
    assert res.log_scales["fc1"][0, 1] == 0 and res.log_scales["fc2"][1, 2] == 0
    assert res.converged and (res.mass_after <= res.mass_before).all()
    x = torch.randn(5, 3, dtype=torch.float64)
    assert rel_err(model.functional(res.params, x), model.functional(params, x)) < 1e-8


def test_float32_and_deep_networks_converge():
    model = BayesianMLP(6, [8] * 6, 3)
    params = ps.rescale(model_params(model, (4,), seed=0), model.spec, random_log_scales(model.spec, 1, (4,)))
    res64 = ps.min_mass(params, model.spec)
    assert res64.converged and res64.iterations < 500
    res32 = ps.min_mass({k: v.float() for k, v in params.items()}, model.spec)
    assert res32.params["fc1.weight"].dtype == torch.float32 and res32.converged
    assert (res32.residual <= 1e-5).all()
    torch.testing.assert_close(res32.mass_after.double(), res64.mass_after, rtol=1e-5, atol=0)


def test_relaxation_and_plain_sweeps_reach_the_same_point():
    model = BayesianMLP(5, [7, 7, 7], 2)
    params = ps.rescale(model_params(model, (3,), seed=4), model.spec, random_log_scales(model.spec, 2, (3,)))
    a, b = ps.min_mass(params, model.spec, relax=True), ps.min_mass(params, model.spec, relax=False)
    for k in params:
        assert rel_err(a.params[k], b.params[k]) < 1e-8


def test_min_mass_errors():
    tanh = BayesianMLP(3, [4], 2, activation="tanh")
    with pytest.raises(ps.SpecError, match="needs a group with a positively homogeneous activation"):
        ps.min_mass(model_params(tanh), tanh.spec)
    model = BayesianMLP(3, [4], 2)
    params = model_params(model)
    with pytest.raises(ValueError, match="tol must be positive"):
        ps.min_mass(params, model.spec, tol=0.0)
    with pytest.raises(ValueError, match="max_iters"):
        ps.min_mass(params, model.spec, max_iters=-1)
    del params["fc2.weight"]
    with pytest.raises(ps.SpecError, match="'fc2.weight'.* missing"):
        ps.min_mass(params, model.spec)


def test_max_iters_caps_the_sweeps_and_reports_non_convergence():
    model = BayesianMLP(4, [6, 6], 2)
    params = ps.rescale(model_params(model, seed=5), model.spec, random_log_scales(model.spec, 5, scale=3.0))
    res = ps.min_mass(params, model.spec, max_iters=1)
    assert res.iterations == 1 and not res.converged and res.residual > 1e-10
    assert res.mass_after <= res.mass_before
