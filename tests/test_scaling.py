"""Positive rescaling of ReLU neurons (``ps.rescale``) and the mass of a network."""

import copy

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from strategies import broadcastable_batch_shapes, mlp_architectures, mlp_params, model_params, seeds
from torch import nn

import pyro_symmetry as ps
from pyro_symmetry.models import BayesianCNN, BayesianMLP


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).abs().max() / b.abs().max().clamp_min(1e-300)).item()


def random_log_scales(spec, seed, batch_shape=(), scale=1.0, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    return {
        k: scale * torch.randn(tuple(batch_shape) + (grp.size,), generator=g, dtype=dtype)
        for k, grp in spec.groups.items()
        if grp.activation_symmetry == "scale"
    }


@given(arch=mlp_architectures(), seed=seeds, shapes=broadcastable_batch_shapes())
def test_rescale_keeps_relu_mlp_function(arch, seed, shapes):
    wb, ub = shapes
    n_in, hidden, n_out = arch
    model = BayesianMLP(n_in, hidden, n_out, activation="relu")
    params = model_params(model, batch_shape=wb, seed=seed)
    u = random_log_scales(model.spec, seed + 1, ub, scale=2.0)
    x = torch.randn(7, n_in, dtype=torch.float64, generator=torch.Generator().manual_seed(seed + 2))
    moved = ps.rescale(params, model.spec, u)
    batch = torch.broadcast_shapes(wb, ub)
    assert moved["fc1.weight"].shape == batch + model.spec.shapes["fc1.weight"]
    y0 = model.functional(params, x).expand(batch + (7, n_out))
    assert rel_err(model.functional(moved, x), y0) < 1e-8


@given(arch=mlp_architectures(), seed=seeds)
def test_rescale_matches_diagonal_matrices(arch, seed):
    """``W_l -> diag(e^{u_l}) W_l diag(e^{-u_{l-1}})``, ``b_l -> e^{u_l} b_l``."""
    n_in, hidden, n_out = arch
    sizes = [n_in, *hidden, n_out]
    spec = ps.mlp_spec([f"fc{i + 1}" for i in range(len(sizes) - 1)], hidden, activation_symmetry="scale")
    params = mlp_params(sizes, seed=seed)
    u = random_log_scales(spec, seed)
    moved = ps.rescale(params, spec, u)
    diags = [torch.zeros(n_in, dtype=torch.float64)] + [u[f"fc{i + 1}"] for i in range(len(hidden))]
    diags += [torch.zeros(n_out, dtype=torch.float64)]
    for i in range(len(sizes) - 1):
        w, b = params[f"fc{i + 1}.weight"], params[f"fc{i + 1}.bias"]
        expected = torch.diag(diags[i + 1].exp()) @ w @ torch.diag((-diags[i]).exp())
        torch.testing.assert_close(moved[f"fc{i + 1}.weight"], expected, rtol=1e-12, atol=0)
        torch.testing.assert_close(moved[f"fc{i + 1}.bias"], diags[i + 1].exp() * b, rtol=1e-12, atol=0)


@settings(max_examples=8)  # conv nets are slow to evaluate; 8 draws cover the shapes
@given(seed=seeds, c1=st.integers(1, 4), c2=st.integers(1, 4))
def test_rescale_keeps_relu_cnn_function(seed, c1, c2):
    """Per-channel scales; the last conv's channels scale blocks of flattened columns."""
    model = BayesianCNN(2, (8, 8), [c1, c2], 3, activation="relu")
    params = model_params(model, batch_shape=(2,), seed=seed)
    u = random_log_scales(model.spec, seed + 1, (2,), scale=1.5)
    x = torch.randn(5, 2, 8, 8, dtype=torch.float64, generator=torch.Generator().manual_seed(seed))
    assert rel_err(model.functional(ps.rescale(params, model.spec, u), x), model.functional(params, x)) < 1e-8


@settings(max_examples=8)  # conv nets are slow to evaluate; 8 draws cover the shapes
@given(seed=seeds, pool=st.sampled_from([nn.MaxPool2d, nn.AvgPool2d]))
def test_rescale_keeps_module_function(seed, pool):
    """A spec from ``nn.Module`` (conv, pooling, flatten to linear) and its state dict."""
    torch.manual_seed(seed)
    net = nn.Sequential(
        nn.Conv2d(2, 3, 3, padding=1), nn.ReLU(), pool(2),
        nn.Conv2d(3, 4, 3, padding=1), nn.ReLU(), nn.Flatten(),
        nn.Linear(4 * 4 * 4, 5), nn.ReLU(), nn.Linear(5, 2),
    ).double()  # fmt: skip
    spec = ps.PermutationSpec.from_module(net)
    assert all(g.activation_symmetry == "scale" for g in spec.groups.values())
    state = net.state_dict()
    moved = ps.rescale(state, spec, random_log_scales(spec, seed, scale=1.5))
    net2 = copy.deepcopy(net)
    net2.load_state_dict(moved)
    x = torch.randn(3, 2, 8, 8, dtype=torch.float64)
    with torch.no_grad():
        assert rel_err(net2(x), net(x)) < 1e-8


@given(arch=mlp_architectures(), seed=seeds)
def test_rescale_is_a_group_action_and_batches(arch, seed):
    n_in, hidden, n_out = arch
    spec = BayesianMLP(n_in, hidden, n_out).spec
    params = mlp_params([n_in, *hidden, n_out], batch_shape=(3,), seed=seed)
    u, v = random_log_scales(spec, seed, (3,)), random_log_scales(spec, seed + 1, (3,))
    twice = ps.rescale(ps.rescale(params, spec, u), spec, v)
    once = ps.rescale(params, spec, {k: u[k] + v[k] for k in u})
    back = ps.rescale(ps.rescale(params, spec, u), spec, {k: -u[k] for k in u})
    for k in params:
        torch.testing.assert_close(twice[k], once[k], rtol=1e-12, atol=1e-14)
        torch.testing.assert_close(back[k], params[k], rtol=1e-12, atol=1e-14)
        for i in range(3):
            one = ps.rescale({s: t[i] for s, t in params.items()}, spec, {g: t[i] for g, t in u.items()})
            torch.testing.assert_close(ps.rescale(params, spec, u)[k][i], one[k], rtol=0, atol=0)


def test_rescale_of_some_groups_only():
    spec = BayesianMLP(3, [4, 5], 2).spec
    params = mlp_params([3, 4, 5, 2])
    moved = ps.rescale(params, spec, {"fc2": torch.ones(5, dtype=torch.float64)})
    torch.testing.assert_close(moved["fc1.weight"], params["fc1.weight"])
    torch.testing.assert_close(moved["fc2.weight"], params["fc2.weight"] * torch.e)
    torch.testing.assert_close(moved["fc3.weight"], params["fc3.weight"] / torch.e)


@pytest.mark.parametrize("act", ["tanh", "gelu", "sigmoid"])
def test_rescale_refuses_activations_that_are_not_homogeneous(act):
    spec = BayesianMLP(3, [4], 2, activation=act).spec
    with pytest.raises(ps.SpecError, match=r"log_scales\['fc1'\]: group 'fc1' has activation_symmetry="):
        ps.rescale(mlp_params([3, 4, 2]), spec, {"fc1": torch.zeros(4)})


def test_rescale_refuses_a_module_group_that_is_not_homogeneous():
    net = nn.Sequential(nn.Linear(3, 4), nn.GELU(), nn.Linear(4, 2))
    spec = ps.PermutationSpec.from_module(net)
    with pytest.raises(ps.SpecError, match="group '0' has activation_symmetry='none'"):
        ps.rescale(net.state_dict(), spec, {"0": torch.zeros(4)})


@pytest.mark.parametrize("norm", [nn.BatchNorm1d, nn.LayerNorm])
def test_a_norm_layers_scale_is_a_weight_of_the_mass(norm):
    """Linear -> norm -> ReLU: the group rescales the norm's scale and shift (the linear
    layer before it is passive). The default mass counts the norm's scale, like Laurent et
    al.'s code (batch-norm weights counted, no biases), not its shift."""
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(3, 4), norm(4), nn.ReLU(), nn.Linear(4, 2))
    net.train()
    net(torch.randn(32, 3))  # running statistics
    net.eval()
    with torch.no_grad():
        net[1].weight.uniform_(0.5, 2.0)
        net[1].bias.normal_()
    spec = ps.PermutationSpec.from_module(net)
    assert ps.mass_sites(spec) == ("1.weight", "3.weight")
    assert set(ps.mass_sites(spec, include_biases=True)) == {"1.weight", "1.bias", "3.weight"}
    res = ps.min_mass(net.state_dict(), spec)
    assert res.converged and not res.dead["0"].any()
    moved = copy.deepcopy(net)
    moved.load_state_dict(res.params)
    x = torch.randn(5, 3)
    with torch.no_grad():
        assert rel_err(moved(x), net(x)) < 1e-5
    w = res.params
    torch.testing.assert_close(w["1.weight"].square(), w["3.weight"].square().sum(0), rtol=1e-4, atol=0)


def test_rescale_rejects_bad_log_scales():
    spec = BayesianMLP(3, [4], 2).spec
    params = mlp_params([3, 4, 2])
    with pytest.raises(ps.SpecError, match="names group 'fc9'"):
        ps.rescale(params, spec, {"fc9": torch.zeros(4)})
    with pytest.raises(ps.SpecError, match=r"log_scales\['fc1'\] has shape \(3,\), expected \(\*batch, 4\)"):
        ps.rescale(params, spec, {"fc1": torch.zeros(3)})
    with pytest.raises(TypeError, match="mapping"):
        ps.rescale(params, spec, [torch.zeros(4)])
    del params["fc2.weight"]
    with pytest.raises(ps.SpecError, match="'fc2.weight'.* missing"):
        ps.rescale(params, spec, {"fc1": torch.zeros(4)})


@given(arch=mlp_architectures(), seed=seeds)
def test_mass_is_the_sum_of_squares_of_rescaled_sites(arch, seed):
    """Default: the squared weights only (Laurent et al.); ``include_biases``: the hidden biases too."""
    n_in, hidden, n_out = arch
    model = BayesianMLP(n_in, hidden, n_out)
    params = model_params(model, batch_shape=(2,), seed=seed)
    weights = [k for k in model.site_names if k.endswith("weight")]
    expected = sum(params[k].square().sum((-2, -1)) for k in weights)
    torch.testing.assert_close(ps.mass(params, model.spec), expected)
    assert ps.mass(params, model.spec).dtype == torch.float64
    assert ps.mass_sites(model.spec) == tuple(weights)
    hidden_biases = [f"fc{i + 1}.bias" for i in range(len(hidden))]  # the output bias is never rescaled
    with_biases = expected + sum(params[k].square().sum(-1) for k in hidden_biases)
    torch.testing.assert_close(ps.mass(params, model.spec, include_biases=True), with_biases)
    assert set(ps.mass_sites(model.spec, include_biases=True)) == set(weights + hidden_biases)
    perm = model.spec.sample((2,), generator=torch.Generator().manual_seed(seed))
    torch.testing.assert_close(ps.mass(model.spec.apply(params, perm), model.spec), expected)
    torch.testing.assert_close(
        ps.mass(params, model.spec, sites=weights[:1]), params["fc1.weight"].square().sum((-2, -1))
    )
    with pytest.raises(ValueError, match="either sites or include_biases"):
        ps.mass(params, model.spec, sites=weights, include_biases=True)


def test_mass_needs_scale_groups():
    with pytest.raises(ps.SpecError, match="no group with activation_symmetry='scale'"):
        ps.mass(mlp_params([3, 4, 2]), BayesianMLP(3, [4], 2, activation="tanh").spec)
