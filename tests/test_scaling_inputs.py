"""What users naturally pass to the scaling functions: tensors that require grad, module
parameters, meta-device and mixed-device tensors; and the mass as Laurent et al. define it.

``rescale``, ``flip_signs`` and ``mass`` are simple tensor maps and stay differentiable;
``min_mass``, ``canonicalize``, ``sort_permutation`` and ``sign_convention`` read their
inputs as values and return detached results.
"""

import numpy as np
import pytest
import torch
from scipy.optimize import minimize
from strategies import model_params
from test_scaling import random_log_scales, rel_err
from torch import nn

import pyro_symmetry as ps
from pyro_symmetry.models import BayesianMLP


def live(params):
    """Leaf tensors that require grad, like a guide's live parameters."""
    return {k: v.clone().requires_grad_(True) for k, v in params.items()}


class Elsewhere(torch.Tensor):
    """A CPU tensor that reports another device (there is no second device on CI)."""

    @property
    def device(self):
        return torch.device("cuda", 0)


RELU, TANH = BayesianMLP(3, [4, 4], 2), BayesianMLP(3, [4, 4], 2, activation="tanh")


# ----------------------------------------------------------------------------- requires grad
def test_min_mass_reads_tensors_that_require_grad_and_returns_detached_results():
    params = model_params(RELU, (2,), seed=0)
    res = ps.min_mass(live(params), RELU.spec)
    ref = ps.min_mass(params, RELU.spec)
    for k in params:
        assert not res.params[k].requires_grad
        torch.testing.assert_close(res.params[k], ref.params[k], rtol=0, atol=0)
    for v in (*res.log_scales.values(), res.mass_before, res.mass_after, res.residual):
        assert not v.requires_grad


@pytest.mark.parametrize("model", [RELU, TANH], ids=["relu", "tanh"])
@pytest.mark.parametrize("permutation", ["sort", "align", None])
def test_canonicalize_reads_tensors_that_require_grad(model, permutation):
    params = model_params(model, (3,), seed=1)
    canon = ps.canonicalize(live(params), model.spec, permutation=permutation)
    ref = ps.canonicalize(params, model.spec, permutation=permutation)
    for k in params:
        assert not canon.params[k].requires_grad
        torch.testing.assert_close(canon.params[k], ref.params[k], rtol=0, atol=0)
    reference = {k: v[0] for k, v in live(params).items()}
    out = ps.canonicalize(live(params), model.spec, reference=reference)
    assert not any(v.requires_grad for v in (*out.params.values(), *out.reference.values()))


def test_discrete_choices_read_tensors_that_require_grad():
    params = model_params(TANH, (2,), seed=2)
    signs = ps.sign_convention(live(params), TANH.spec)
    for g, s in ps.sign_convention(params, TANH.spec).items():
        assert torch.equal(signs[g], s) and not signs[g].requires_grad
    perm = ps.sort_permutation(live(params), TANH.spec)
    for g, p in ps.sort_permutation(params, TANH.spec).items():
        assert torch.equal(perm[g], p)


def test_rescale_is_differentiable():
    """Gradients in the params and the log-scales (finite differences by gradcheck)."""
    spec = RELU.spec
    params = model_params(RELU, seed=3)
    u = random_log_scales(spec, 4)
    names, groups = list(params), list(u)

    def fn(*args):
        w = dict(zip(names, args[: len(names)]))
        out = ps.rescale(w, spec, dict(zip(groups, args[len(names) :])))
        return tuple(out[k] for k in names)

    inputs = tuple(live(params).values()) + tuple(v.clone().requires_grad_(True) for v in u.values())
    assert torch.autograd.gradcheck(fn, inputs)


def test_flip_signs_and_mass_are_differentiable():
    spec = TANH.spec
    params = live(model_params(TANH, seed=5))
    flips = {"fc1": torch.tensor([True, False, True, False]), "fc2": torch.tensor([False, True, True, False])}
    out = ps.flip_signs(params, spec, flips)
    total = sum((out[k] * torch.arange(out[k].numel(), dtype=out[k].dtype).reshape(out[k].shape)).sum() for k in out)
    grads = torch.autograd.grad(total, list(params.values()))
    for (k, g), sign in zip(params.items(), _flip_pattern(spec, flips, params)):
        expected = sign * torch.arange(g.numel(), dtype=g.dtype).reshape(g.shape)
        torch.testing.assert_close(grads[list(params).index(k)], expected)
    relu = live(model_params(RELU, seed=6))
    (g,) = torch.autograd.grad(ps.mass(relu, RELU.spec).sum(), [relu["fc2.weight"]])
    torch.testing.assert_close(g, 2 * relu["fc2.weight"].detach())


def _flip_pattern(spec, flips, params):
    """The +-1 factor of every entry of every site under ``flips`` (by flipping ones)."""
    ones = {k: torch.ones_like(v.detach()) for k, v in params.items()}
    out = ps.flip_signs(ones, spec, flips)
    return [out[k] for k in params]


def test_module_parameters_work_directly():
    """``dict(net.named_parameters())`` of a ReLU ``nn.Sequential``: every function accepts it."""
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(3, 5), nn.ReLU(), nn.Linear(5, 4), nn.ReLU(), nn.Linear(4, 2))
    spec = ps.PermutationSpec.from_module(net)
    params = dict(net.named_parameters())
    res = ps.min_mass(params, spec)
    assert res.converged and not any(v.requires_grad for v in res.params.values())
    x = torch.randn(6, 3)
    net2 = nn.Sequential(nn.Linear(3, 5), nn.ReLU(), nn.Linear(5, 4), nn.ReLU(), nn.Linear(4, 2))
    net2.load_state_dict(res.params)
    with torch.no_grad():
        assert rel_err(net2(x), net(x)) < 1e-5
    canon = ps.canonicalize(params, spec, permutation="sort")
    assert not any(v.requires_grad for v in canon.params.values())
    u = {g: torch.zeros(n, requires_grad=True) for g, n in spec.sizes.items()}
    loss = ps.mass(ps.rescale(params, spec, u), spec).sum()
    loss.backward()
    assert all(v.grad is not None for v in u.values()) and net[0].weight.grad is not None


# ----------------------------------------------------------------------------- devices
def _calls(model, params):
    spec = model.spec
    calls = {
        "min_mass": lambda: ps.min_mass(params, spec),
        "canonicalize": lambda: ps.canonicalize(params, spec, permutation="sort"),
        "sort_permutation": lambda: ps.sort_permutation(params, spec),
        "mass": lambda: ps.mass(params, spec),
        "rescale": lambda: ps.rescale(params, spec, {"fc1": torch.zeros(4, dtype=torch.float64)}),
    }
    if model is TANH:
        calls = {
            "canonicalize": calls["canonicalize"],
            "sort_permutation": calls["sort_permutation"],
            "flip_signs": lambda: ps.flip_signs(params, spec, {"fc1": torch.zeros(4, dtype=torch.bool)}),
            "sign_convention": lambda: ps.sign_convention(params, spec),
        }
    return calls


@pytest.mark.parametrize("model", [RELU, TANH], ids=["relu", "tanh"])
def test_meta_tensors_are_refused_by_name(model):
    calls = _calls(model, None)
    for name in calls:
        params = model_params(model, seed=0)
        params["fc2.weight"] = params["fc2.weight"].to("meta")
        with pytest.raises(ValueError, match=r"\['fc2.weight'\] is on the meta device"):
            _calls(model, params)[name]()


@pytest.mark.parametrize("model", [RELU, TANH], ids=["relu", "tanh"])
def test_mixed_devices_are_refused_by_name(model):
    for name in _calls(model, None):
        params = model_params(model, seed=0)
        params["fc2.weight"] = params["fc2.weight"].as_subclass(Elsewhere)
        with pytest.raises(ValueError, match=r"\['fc2.weight'\] is on device cuda:0 but .* is on cpu"):
            _calls(model, params)[name]()


def test_log_scales_and_signs_and_references_on_other_devices_are_refused():
    params = model_params(RELU, seed=0)
    with pytest.raises(ValueError, match=r"log_scales\['fc1'\] is on the meta device"):
        ps.rescale(params, RELU.spec, {"fc1": torch.zeros(4, device="meta")})
    with pytest.raises(ValueError, match=r"log_scales\['fc1'\] is on device cuda:0"):
        ps.rescale(params, RELU.spec, {"fc1": torch.zeros(4, dtype=torch.float64).as_subclass(Elsewhere)})
    tanh = model_params(TANH, seed=0)
    with pytest.raises(ValueError, match=r"signs\['fc1'\] is on the meta device"):
        ps.flip_signs(tanh, TANH.spec, {"fc1": torch.zeros(4, dtype=torch.bool, device="meta")})
    reference = {k: v.to("meta") for k, v in params.items()}
    with pytest.raises(ValueError, match=r"reference\['fc1.weight'\] is on the meta device"):
        ps.canonicalize(params, RELU.spec, reference=reference)


# ----------------------------------------------------------------------------- Laurent et al.'s mass
def test_the_default_mass_is_the_squared_weights_only():
    """Laurent et al. (``symmetries/scale.py``) minimize ``sum_l sum_ij W_l[i,j]^2
    exp(2 (u_l[i] - u_{l-1}[j]))``: the biases are rescaled with their neuron but not
    counted. The default solves exactly that (scipy on the formula, written out here);
    ``include_biases=True`` adds ``sum_i b_l[i]^2 exp(2 u_l[i])``."""
    model = BayesianMLP(3, [4, 3], 2)
    spec = model.spec
    params = ps.rescale(model_params(model, seed=9), spec, random_log_scales(spec, 9, scale=1.0))
    W = [params[f"fc{i}.weight"] for i in (1, 2, 3)]
    b = [params[f"fc{i}.bias"] for i in (1, 2)]

    def formula(flat, biases):
        v = torch.tensor(flat, dtype=torch.float64, requires_grad=True)
        us = [torch.zeros(3, dtype=torch.float64), v[:4], v[4:], torch.zeros(2, dtype=torch.float64)]
        m = sum((W[l].square() * torch.exp(2 * (us[l + 1][:, None] - us[l][None, :]))).sum() for l in range(3))
        if biases:
            m = m + sum((b[l].square() * torch.exp(2 * us[l + 1])).sum() for l in range(2))
        (g,) = torch.autograd.grad(m, v)
        return m.item(), g.numpy()

    for biases in (False, True):
        ref = minimize(formula, np.zeros(7), args=(biases,), jac=True, method="L-BFGS-B",
                       options=dict(ftol=1e-16, gtol=1e-12))  # fmt: skip
        res = ps.min_mass(params, spec, include_biases=biases)
        assert res.mass_after.item() == pytest.approx(ref.fun, rel=1e-9)
        assert res.mass_before.item() == pytest.approx(formula(np.zeros(7), biases)[0], rel=1e-12)
        u = torch.cat([res.log_scales["fc1"], res.log_scales["fc2"]]).numpy()
        np.testing.assert_allclose(u, ref.x, atol=1e-4)
    default = ps.min_mass(params, spec)
    weights_only = ps.min_mass(params, spec, sites=["fc1.weight", "fc2.weight", "fc3.weight"])
    for k in params:
        torch.testing.assert_close(default.params[k], weights_only.params[k], rtol=0, atol=0)
    with pytest.raises(ValueError, match="either sites or include_biases"):
        ps.min_mass(params, spec, sites=["fc1.weight"], include_biases=True)
