"""PermutationSpec: group laws, the action on parameters, invariance of networks."""

import math

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from strategies import (
    activations,
    broadcastable_batch_shapes,
    dtypes,
    group_element,
    mlp_architectures,
    mlp_params,
    model_params,
    seeds,
)

import pyro_symmetry as ps
from pyro_symmetry.models import BayesianMLP


def _close(a, b, dtype):
    tol = 1e-10 if dtype == torch.float64 else 1e-4
    return torch.allclose(a, b, atol=tol, rtol=tol)


def _perm_matrix(p: torch.Tensor, dtype) -> torch.Tensor:
    """Signed permutation matrix with ``P[i, src_i] = s_i`` (test-only reference)."""
    n = p.shape[-1]
    P = torch.zeros(n, n, dtype=dtype)
    for i, v in enumerate(p.tolist()):
        src, s = (v, 1.0) if v >= 0 else (~v, -1.0)
        P[i, src] = s
    return P


@given(arch=mlp_architectures(), act=activations, seed=seeds, dtype=dtypes)
def test_mlp_function_invariance(arch, act, seed, dtype):
    n_in, hidden, n_out = arch
    model = BayesianMLP(n_in, hidden, n_out, activation=act)
    params = model_params(model, dtype=dtype, seed=seed)
    x = torch.randn(5, n_in, dtype=dtype, generator=torch.Generator().manual_seed(seed + 1))
    perm = group_element(model.spec, seed)
    out0 = model.functional(params, x)
    out1 = model.functional(model.spec.apply(params, perm), x)
    assert _close(out0, out1, dtype)


@given(arch=mlp_architectures(), seed=seeds)
def test_apply_matches_permutation_matrices(arch, seed):
    """``W_l -> P_l W_l P_{l-1}^T``, ``b_l -> P_l b_l`` with explicit matrices."""
    n_in, hidden, n_out = arch
    sizes = [n_in, *hidden, n_out]
    spec = ps.mlp_spec([f"fc{i + 1}" for i in range(len(sizes) - 1)], hidden, activation_symmetry="sign")
    params = mlp_params(sizes, seed=seed)
    perm = group_element(spec, seed)
    moved = spec.apply(params, perm)
    mats = [torch.eye(n_in, dtype=torch.float64)]
    mats += [_perm_matrix(perm[f"fc{i + 1}"], torch.float64) for i in range(len(hidden))]
    mats += [torch.eye(n_out, dtype=torch.float64)]
    for i in range(len(sizes) - 1):
        w, b = params[f"fc{i + 1}.weight"], params[f"fc{i + 1}.bias"]
        assert torch.allclose(moved[f"fc{i + 1}.weight"], mats[i + 1] @ w @ mats[i].T)
        assert torch.allclose(moved[f"fc{i + 1}.bias"], mats[i + 1] @ b)


@given(arch=mlp_architectures(), seed=seeds, shapes=broadcastable_batch_shapes())
def test_batched_apply_equals_loop(arch, seed, shapes):
    wb, gb = shapes
    n_in, hidden, n_out = arch
    sizes = [n_in, *hidden, n_out]
    spec = ps.mlp_spec([f"fc{i + 1}" for i in range(len(sizes) - 1)], hidden, activation_symmetry="sign")
    params = mlp_params(sizes, batch_shape=wb, seed=seed)
    perm = group_element(spec, seed, batch_shape=gb)
    out = spec.apply(params, perm)
    batch = torch.broadcast_shapes(wb, gb)
    flat_w = {k: v.expand(batch + v.shape[len(wb) :]).reshape((-1,) + v.shape[len(wb) :]) for k, v in params.items()}
    flat_g = {k: v.expand(batch + v.shape[-1:]).reshape(-1, v.shape[-1]) for k, v in perm.items()}
    for i in range(math.prod(batch)):
        ref = spec.apply({k: v[i] for k, v in flat_w.items()}, {k: v[i] for k, v in flat_g.items()})
        for k in spec.sites:
            assert out[k].shape == batch + ref[k].shape
            assert torch.equal(out[k].reshape((-1,) + ref[k].shape)[i], ref[k])


@given(hidden=st.lists(st.integers(1, 6), min_size=1, max_size=4), seed=seeds, signed=st.booleans())
def test_group_laws(hidden, seed, signed):
    spec = ps.mlp_spec([f"fc{i}" for i in range(len(hidden) + 1)], hidden, activation_symmetry="sign")
    a, b, c = (group_element(spec, seed + i, batch_shape=(3,), signed=signed) for i in range(3))
    e = spec.identity()
    eq = lambda u, v: all(torch.equal(u[k], v[k]) for k in spec.groups)  # noqa: E731
    assert eq(spec.compose(spec.compose(a, b), c), spec.compose(a, spec.compose(b, c)))
    assert eq(spec.compose(a, spec.inverse(a)), spec.identity((3,)))
    assert eq(spec.compose(spec.inverse(a), a), spec.identity((3,)))
    assert eq(spec.compose(a, e), a) and eq(spec.compose(e, a), a)
    spec.validate(spec.compose(a, b))


@given(arch=mlp_architectures(), seed=seeds)
def test_compose_matches_sequential_apply(arch, seed):
    n_in, hidden, n_out = arch
    sizes = [n_in, *hidden, n_out]
    spec = ps.mlp_spec([f"fc{i + 1}" for i in range(len(sizes) - 1)], hidden, activation_symmetry="sign")
    params = mlp_params(sizes, seed=seed)
    a, b = group_element(spec, seed), group_element(spec, seed + 1)
    lhs = spec.apply(spec.apply(params, b), a)
    rhs = spec.apply(params, spec.compose(a, b))
    back = spec.apply(spec.apply(params, a), spec.inverse(a))
    for k in params:
        assert torch.equal(lhs[k], rhs[k])
        assert torch.equal(back[k], params[k])


@pytest.mark.parametrize("sym", ["none", "sign", "scale"])
def test_log_order_and_enumeration(sym):
    spec = ps.mlp_spec(["a", "b", "c"], [3, 2], activation_symmetry=sym)
    expected = math.lgamma(4) + math.lgamma(3) + (5 * math.log(2) if sym == "sign" else 0.0)
    assert spec.log_order == pytest.approx(expected)
    elems = spec.elements()
    n = elems["a"].shape[0]
    assert n == spec.order == round(math.exp(expected))
    keys = {tuple(elems["a"][i].tolist()) + tuple(elems["b"][i].tolist()) for i in range(n)}
    assert len(keys) == n  # all distinct
    spec.validate(elems)


def test_enumeration_refuses_large_groups():
    spec = ps.mlp_spec(["a", "b"], [12])
    with pytest.raises(ps.SpecError, match="enumeration limit"):
        spec.elements()


def test_sample_is_uniform():
    """Chi-square check of the 3! * 2^3 = 48 signed permutations, fixed seed."""
    spec = ps.mlp_spec(["a", "b"], [3], activation_symmetry="sign")
    n = 48 * 200
    draws = spec.sample((n,), generator=torch.Generator().manual_seed(1))["a"]
    codes = torch.unique(draws, dim=0, return_counts=True)[1]
    assert codes.numel() == 48
    chi2 = (((codes - 200.0) ** 2) / 200.0).sum().item()
    # 47 degrees of freedom: the 0.999 quantile is about 82.7.
    assert chi2 < 82.7


def test_sample_reproducible_and_unsigned_option():
    spec = ps.mlp_spec(["a", "b"], [5], activation_symmetry="sign")
    g1 = spec.sample((4,), generator=torch.Generator().manual_seed(3))
    g2 = spec.sample((4,), generator=torch.Generator().manual_seed(3))
    assert torch.equal(g1["a"], g2["a"])
    assert (spec.sample((50,), signed=False)["a"] >= 0).all()


def test_validate_rejects_bad_elements():
    spec = ps.mlp_spec(["a", "b"], [3])
    with pytest.raises(ps.SpecError, match="not a permutation"):
        spec.validate({"a": torch.tensor([0, 0, 1])})
    with pytest.raises(ps.SpecError, match="flips signs"):
        spec.validate({"a": torch.tensor([0, ~1, 2])})
    with pytest.raises(ps.SpecError, match=r"shape \(2,\), expected"):
        spec.apply(mlp_params([2, 3, 1]), {"a": torch.tensor([0, 1])})
    with pytest.raises(ps.SpecError, match="has groups"):
        spec.apply(mlp_params([2, 3, 1]), {"b": torch.tensor([0, 1, 2])})


def test_apply_rejects_mismatched_params():
    spec = ps.mlp_spec(["fc1", "fc2"], [3])
    params = mlp_params([2, 4, 1])
    with pytest.raises(
        ps.SpecError, match=r"params\['fc1.weight'\] has length 4 on axis -2 but group 'fc1' has size 3"
    ):
        spec.apply(params, spec.identity())
    params = mlp_params([2, 3, 1])
    del params["fc2.weight"]
    with pytest.raises(ps.SpecError, match="site 'fc2.weight' of the spec is missing"):
        spec.apply(params, spec.identity())


def test_nonnegative_axes_need_shapes():
    spec = ps.PermutationSpec({"h": ps.NeuronGroup(3, incoming=[("fc1.weight", 0)], outgoing=[("fc2.weight", 1)])})
    with pytest.raises(ps.SpecError, match="does not know the site.s shape"):
        spec.apply(mlp_params([2, 3, 1], bias=False), spec.identity())
    bound = spec.with_shapes({"fc1.weight": (3, 2), "fc2.weight": (1, 3)})
    params = mlp_params([2, 3, 1], batch_shape=(4,), bias=False)
    out = bound.apply(params, bound.sample())
    assert out["fc1.weight"].shape == (4, 3, 2)


def test_spec_construction_errors():
    with pytest.raises(ps.SpecError, match="positive int"):
        ps.NeuronGroup(0, incoming=[("w", -1)])
    with pytest.raises(ps.SpecError, match="activation_symmetry"):
        ps.NeuronGroup(2, incoming=[("w", -1)], activation_symmetry="odd")
    with pytest.raises(ps.SpecError, match="claimed by groups"):
        ps.PermutationSpec({"a": ps.NeuronGroup(2, [("w", -1)]), "b": ps.NeuronGroup(2, [("w", -1)])})
    with pytest.raises(ps.SpecError, match="not among the model's sites"):
        ps.PermutationSpec({"a": ps.NeuronGroup(2, [("w", 0)])}, shapes={"v": (2,)})
    with pytest.raises(ps.SpecError, match="one hidden size per layer boundary"):
        ps.mlp_spec(["a", "b"], [2, 3])


def test_check_against_model_names_the_site():
    model = BayesianMLP(4, [5, 3], 2)
    x = torch.randn(6, 4)
    bound = model.spec.check(model, x)
    assert bound.shapes["fc2.weight"] == (3, 5)
    wrong_size = ps.mlp_spec(["fc1", "fc2", "fc3"], [5, 4])
    with pytest.raises(ps.SpecError, match="group 'fc2' has size 4.*'fc2.weight' has length 3"):
        wrong_size.check(model, x)
    wrong_site = ps.mlp_spec(["fc1", "layer2", "fc3"], [5, 3])
    with pytest.raises(ps.SpecError, match="'layer2.weight', which is not among the model's sites"):
        wrong_site.check(model, x)
    wrong_axis = ps.PermutationSpec({"h": ps.NeuronGroup(5, incoming=[("fc1.weight", 2)])})
    with pytest.raises(ps.SpecError, match="axis 2 is out of range for site 'fc1.weight'"):
        wrong_axis.check(model, x)


@pytest.mark.parametrize("act", ["relu", "tanh", "gelu"])
def test_three_hidden_layer_bayesian_mlp_acceptance(act):
    """Issue 2 acceptance: outputs equal to 1e-6 in float64; log_order formula."""
    model = BayesianMLP(7, [6, 5, 4], 3, activation=act)
    import pyro.poutine as poutine

    x = torch.randn(11, 7, dtype=torch.float64)
    tr = poutine.trace(model).get_trace(x.float())
    params = {k: tr.nodes[k]["value"].double() for k in model.site_names}
    perm = model.spec.sample(generator=torch.Generator().manual_seed(0))
    y0 = model.functional(params, x)
    y1 = model.functional(model.spec.apply(params, perm), x)
    assert (y0 - y1).abs().max() < 1e-6
    expected = sum(math.lgamma(d + 1) for d in (6, 5, 4)) + (15 * math.log(2) if act == "tanh" else 0)
    assert model.spec.log_order == pytest.approx(expected)
