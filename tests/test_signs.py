"""Sign flips of odd-activation neurons (``ps.flip_signs``) and the sign convention."""

import copy

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from strategies import group_element, mlp_architectures, mlp_params, model_params, seeds
from test_scaling import rel_err
from torch import nn

import pyro_symmetry as ps
from pyro_symmetry.models import BayesianCNN, BayesianMLP


def random_flips(spec, seed, batch_shape=()):
    g = torch.Generator().manual_seed(seed)
    return {k: torch.rand(tuple(batch_shape) + (grp.size,), generator=g) < 0.5 for k, grp in spec.groups.items()}


@given(arch=mlp_architectures(), seed=seeds, batch=st.sampled_from([(), (3,)]))
def test_tanh_mlp_is_invariant_under_signed_permutations_and_flips(arch, seed, batch):
    n_in, hidden, n_out = arch
    model = BayesianMLP(n_in, hidden, n_out, activation="tanh")
    params = model_params(model, seed=seed)
    x = torch.randn(6, n_in, dtype=torch.float64, generator=torch.Generator().manual_seed(seed))
    y = model.functional(params, x)
    perm = group_element(model.spec, seed, batch_shape=batch)
    assert any((p < 0).any() for p in perm.values()) or sum(hidden) < 3  # signed elements are drawn
    assert rel_err(model.functional(model.spec.apply(params, perm), x), y.expand(batch + y.shape)) < 1e-8
    flipped = ps.flip_signs(params, model.spec, random_flips(model.spec, seed + 1, batch))
    assert rel_err(model.functional(flipped, x), y.expand(batch + y.shape)) < 1e-8


@settings(max_examples=8)  # conv nets are slow to evaluate; 8 draws cover the shapes
@given(seed=seeds, c1=st.integers(1, 4), c2=st.integers(1, 4))
def test_tanh_cnn_is_invariant_under_signed_permutations_and_flips(seed, c1, c2):
    """Channels flip as a whole; average pooling and the flatten blocks are odd too."""
    model = BayesianCNN(2, (8, 8), [c1, c2], 3, activation="tanh")
    assert all(g.signed for g in model.spec.groups.values())
    params = model_params(model, seed=seed)
    x = torch.randn(4, 2, 8, 8, dtype=torch.float64, generator=torch.Generator().manual_seed(seed))
    y = model.functional(params, x)
    perm = group_element(model.spec, seed, batch_shape=(2,))
    assert rel_err(model.functional(model.spec.apply(params, perm), x), y.expand((2,) + y.shape)) < 1e-8
    flipped = ps.flip_signs(params, model.spec, random_flips(model.spec, seed + 1, (2,)))
    assert rel_err(model.functional(flipped, x), y.expand((2,) + y.shape)) < 1e-8


@settings(max_examples=8)  # conv nets are slow to evaluate; 8 draws cover the shapes
@given(seed=seeds, act=st.sampled_from([nn.Tanh, nn.Softsign, nn.Hardtanh]))
def test_module_with_odd_activation_is_invariant_under_flips(seed, act):
    torch.manual_seed(seed)
    net = nn.Sequential(
        nn.Conv2d(1, 3, 3, padding=1), act(), nn.AvgPool2d(2), nn.Flatten(), nn.Linear(3 * 4 * 4, 4), act(),
        nn.Linear(4, 2),
    ).double()  # fmt: skip
    spec = ps.PermutationSpec.from_module(net)
    assert all(g.signed for g in spec.groups.values())
    net2 = copy.deepcopy(net)
    net2.load_state_dict(ps.flip_signs(net.state_dict(), spec, random_flips(spec, seed)))
    x = torch.randn(3, 1, 8, 8, dtype=torch.float64)
    with torch.no_grad():
        assert rel_err(net2(x), net(x)) < 1e-8


@given(arch=mlp_architectures(), seed=seeds)
def test_flip_signs_is_the_signed_identity_and_an_involution(arch, seed):
    n_in, hidden, n_out = arch
    spec = BayesianMLP(n_in, hidden, n_out, activation="tanh").spec
    params = mlp_params([n_in, *hidden, n_out], batch_shape=(2,), seed=seed)
    flips = random_flips(spec, seed, (2,))
    out = ps.flip_signs(params, spec, flips)
    element = {k: ps.encode_signed(torch.arange(f.shape[-1]).expand(f.shape), f) for k, f in flips.items()}
    pm = {k: torch.where(f, -1, 1) for k, f in flips.items()}
    for k in params:
        assert torch.equal(out[k], spec.apply(params, element)[k])
        assert torch.equal(ps.flip_signs(params, spec, pm)[k], out[k])
        assert torch.equal(ps.flip_signs(out, spec, flips)[k], params[k])
    # explicitly: W_l -> S_l W_l S_{l-1}, b_l -> S_l b_l
    signs = [torch.ones(2, n_in, dtype=torch.float64)] + [
        1.0 - 2.0 * flips[f"fc{i + 1}"].double() for i in range(len(hidden))
    ]
    signs.append(torch.ones(2, n_out, dtype=torch.float64))
    for i in range(len(hidden) + 1):
        w = params[f"fc{i + 1}.weight"] * signs[i + 1][..., :, None] * signs[i][..., None, :]
        assert torch.equal(out[f"fc{i + 1}.weight"], w)
        assert torch.equal(out[f"fc{i + 1}.bias"], params[f"fc{i + 1}.bias"] * signs[i + 1])


def test_flip_signs_refuses_groups_without_sign_symmetry():
    spec = BayesianMLP(3, [4], 2, activation="relu").spec
    with pytest.raises(ps.SpecError, match=r"signs\['fc1'\]: group 'fc1' has activation_symmetry='scale'.*not odd"):
        ps.flip_signs(mlp_params([3, 4, 2]), spec, {"fc1": torch.zeros(4, dtype=torch.bool)})
    tanh = BayesianMLP(3, [4], 2, activation="tanh").spec
    with pytest.raises(ValueError, match=r"signs\['fc1'\] must be a bool mask .* or contain only \+1/-1"):
        ps.flip_signs(mlp_params([3, 4, 2]), tanh, {"fc1": torch.tensor([1, 0, -1, 1])})
    with pytest.raises(ps.SpecError, match=r"signs\['fc1'\] has shape \(3,\)"):
        ps.flip_signs(mlp_params([3, 4, 2]), tanh, {"fc1": torch.ones(3)})


def _outgoing_sums(params, n_hidden):
    return [params[f"fc{i + 2}.weight"].sum(-2) for i in range(n_hidden)]


@given(arch=mlp_architectures(), seed=seeds)
def test_sign_convention_makes_outgoing_sums_positive_and_ignores_flips(arch, seed):
    n_in, hidden, n_out = arch
    model = BayesianMLP(n_in, hidden, n_out, activation="tanh")
    params = model_params(model, (2,), seed=seed)
    canon = ps.flip_signs(params, model.spec, ps.sign_convention(params, model.spec))
    assert all((s > 0).all() for s in _outgoing_sums(canon, len(hidden)))
    # every sign-flipped copy of the network reaches the same representative
    other = ps.flip_signs(params, model.spec, random_flips(model.spec, seed + 1, (2,)))
    canon2 = ps.flip_signs(other, model.spec, ps.sign_convention(other, model.spec))
    for k in params:
        torch.testing.assert_close(canon2[k], canon[k], rtol=0, atol=0)
    assert not any(f.any() for f in ps.sign_convention(canon, model.spec).values())  # idempotent


def test_sign_convention_is_constant_on_the_orbit_by_enumeration():
    """All 2! 2^2 * 2! 2^2 = 64 signed permutations, then sorting: one point."""
    model = BayesianMLP(3, [2, 2], 2, activation="tanh")
    spec = model.spec
    params = model_params(model, seed=11)
    elements = spec.elements()
    assert elements["fc1"].shape[0] == spec.order == 64
    orbit = spec.apply(params, elements)  # (64, *shape)
    canon = ps.flip_signs(orbit, spec, ps.sign_convention(orbit, spec))
    canon = spec.apply(canon, ps.sort_permutation(canon, spec))
    for k in spec.sites:
        assert canon[k].shape[0] == 64
        assert (canon[k] - canon[k][:1]).abs().max() < 1e-12, k
    points = torch.cat([orbit[k].flatten(1) for k in spec.sites], dim=1)
    assert len({tuple(v.tolist()) for v in points}) == 64  # the orbit really has 64 distinct points
