"""The v2 data model: axis slices, nested groups (attention heads), passive axes.

Checked against the functions they must leave unchanged (``nn.MultiheadAttention``, a
conv -> BatchNorm -> ReLU -> conv chain) and against the group law by brute force.
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given
from hypothesis import strategies as st
from strategies import seeds
from torch import nn

import pyro_symmetry as ps
from pyro_symmetry.groups import Axis, NeuronGroup


def attention_spec(E: int, H: int, signed: bool = True) -> ps.PermutationSpec:
    """Heads of an ``nn.MultiheadAttention`` (fused in-projection), with the q/k and v dims
    permuted (and sign-flipped) within each head; the input and output streams fixed."""
    d = E // H
    sym = "sign" if signed else "none"
    heads = NeuronGroup(
        H,
        incoming=[
            Axis("in_proj_weight", 0, d, 2, 0),
            Axis("in_proj_bias", 0, d, 1, 0),
            Axis("in_proj_weight", 0, d, 2, E),
            Axis("in_proj_bias", 0, d, 1, E),
            Axis("in_proj_weight", 0, d, 2, 2 * E),
            Axis("in_proj_bias", 0, d, 1, 2 * E),
        ],
        outgoing=[Axis("out_proj.weight", 1, d, 2)],
    )
    qk = NeuronGroup(
        d,
        incoming=[Axis("in_proj_weight", 0, 1, 2, 0), Axis("in_proj_bias", 0, 1, 1, 0)],
        outgoing=[Axis("in_proj_weight", 0, 1, 2, E), Axis("in_proj_bias", 0, 1, 1, E)],
        activation_symmetry=sym,
        parent="heads",
    )
    v = NeuronGroup(
        d,
        incoming=[Axis("in_proj_weight", 0, 1, 2, 2 * E), Axis("in_proj_bias", 0, 1, 1, 2 * E)],
        outgoing=[Axis("out_proj.weight", 1, 1, 2)],
        activation_symmetry=sym,
        parent="heads",
    )
    return ps.PermutationSpec({"heads": heads, "qk": qk, "v": v})


def _mha(params: dict, x: torch.Tensor, E: int, H: int) -> torch.Tensor:
    out, _ = F.multi_head_attention_forward(
        x, x, x, E, H, params["in_proj_weight"], params["in_proj_bias"], None, None, False, 0.0,
        params["out_proj.weight"], params["out_proj.bias"], training=False, need_weights=False,
    )  # fmt: skip
    return out


@given(
    seed=seeds, heads=st.integers(1, 3), dim=st.integers(1, 3), dtype=st.sampled_from([torch.float32, torch.float64])
)
def test_attention_heads_and_dims_keep_the_function(seed, heads, dim, dtype):
    E = heads * dim
    torch.manual_seed(seed % 1000)
    mha = nn.MultiheadAttention(E, heads).to(dtype).eval()
    with torch.no_grad():
        mha.in_proj_bias.normal_()
        mha.out_proj.bias.normal_()
    params = {k: v.detach() for k, v in mha.state_dict().items()}
    spec = attention_spec(E, heads).with_shapes({k: tuple(v.shape) for k, v in params.items()})
    x = torch.randn(4, 2, E, dtype=dtype)
    g = spec.sample(generator=torch.Generator().manual_seed(seed))
    moved = spec.apply(params, g)
    tol = 1e-4 if dtype == torch.float32 else 1e-10
    torch.testing.assert_close(_mha(moved, x, E, heads), _mha(params, x, E, heads), atol=tol, rtol=tol)
    for element in spec.moving_elements():
        torch.testing.assert_close(_mha(spec.apply(params, element), x, E, heads), _mha(params, x, E, heads))


def test_attention_log_order_counts_heads_and_signed_dims_per_head():
    spec = attention_spec(12, 3)
    d = 4
    expected = math.lgamma(4) + 2 * 3 * (math.lgamma(d + 1) + d * math.log(2))
    assert spec.log_order == pytest.approx(expected)
    assert spec.order == math.factorial(3) * (math.factorial(d) * 2**d) ** 6


def test_breaking_the_q_k_tie_changes_the_function():
    """The control: a q-only permutation (not shared with k) must change the output."""
    E, H = 6, 2
    torch.manual_seed(0)
    mha = nn.MultiheadAttention(E, H).double().eval()
    params = {k: v.detach() for k, v in mha.state_dict().items()}
    broken = ps.PermutationSpec(
        {
            "heads": NeuronGroup(H, incoming=[Axis("in_proj_weight", 0, 3, 2, 0)], outgoing=[]),
            "qk": NeuronGroup(3, incoming=[Axis("in_proj_weight", 0, 1, 2, 0)], parent="heads"),
        }
    )
    x = torch.randn(4, 2, E, dtype=torch.float64)
    moved = broken.apply(params, broken.moving_elements()[0])
    assert not torch.allclose(_mha(moved, x, E, H), _mha(params, x, E, H))


def _positions(spec: ps.PermutationSpec, E: int) -> dict[str, torch.Tensor]:
    """Distinct 1-based codes so that every entry and its sign can be read back."""
    shapes = {"in_proj_weight": (3 * E, E), "in_proj_bias": (3 * E,), "out_proj.weight": (E, E)}
    out, start = {}, 1
    for k, s in shapes.items():
        n = math.prod(s)
        out[k] = torch.arange(start, start + n, dtype=torch.float64).reshape(s)
        start += n
    return out


@given(seed=seeds)
def test_nested_group_law_compose_and_inverse(seed):
    E, H = 6, 3
    spec = attention_spec(E, H)
    w = _positions(spec, E)
    gen = torch.Generator().manual_seed(seed)
    a, b = spec.sample(generator=gen), spec.sample(generator=gen)
    lhs = spec.apply(spec.apply(w, b), a)
    rhs = spec.apply(w, spec.compose(a, b))
    for k in w:
        assert torch.equal(lhs[k], rhs[k])
        assert torch.equal(spec.apply(spec.apply(w, a), spec.inverse(a))[k], w[k])


def test_nested_elements_are_all_distinct_and_complete():
    spec = attention_spec(4, 2)  # heads 2, dims 2 signed: |G| = 2 * (2! 2^2)^4 = 8192
    assert spec.order == 2 * 8**4
    els = spec.elements()
    w = _positions(spec, 4)
    moved = spec.apply(w, els)
    flat = torch.cat([moved[k].flatten(1) for k in sorted(moved)], 1)
    assert flat.shape[0] == spec.order
    assert torch.unique(flat, dim=0).shape[0] == spec.order


def test_moving_elements_move_every_unit():
    spec = attention_spec(6, 3)
    w = _positions(spec, 6)
    shift = spec.moving_elements()[0]
    moved = spec.apply(w, shift)
    # Every in-projection row moves (q, k, v all belong to a head), out_proj columns too.
    assert bool((moved["in_proj_weight"] != w["in_proj_weight"]).all())
    assert bool((moved["out_proj.weight"] != w["out_proj.weight"]).all())


def test_slices_must_be_disjoint_and_nesting_must_match():
    with pytest.raises(ps.SpecError, match="claimed by groups"):
        ps.PermutationSpec(
            {
                "a": NeuronGroup(4, incoming=[Axis("w", 0, 1, 2, 0)]),
                "b": NeuronGroup(4, incoming=[Axis("w", 0, 1, 2, 2)]),
            }
        )
    with pytest.raises(ps.SpecError, match="blocks on axis 0"):
        ps.PermutationSpec(
            {
                "a": NeuronGroup(2, incoming=[Axis("w", 0, 3, 2, 0)]),
                "b": NeuronGroup(2, incoming=[Axis("w", 0, 1, 2, 0)], parent="a"),
            }
        )
    with pytest.raises(ps.SpecError, match="where 'a' does not act"):
        ps.PermutationSpec(
            {
                "a": NeuronGroup(2, incoming=[Axis("w", 0, 3, 2, 0)]),
                "b": NeuronGroup(3, incoming=[Axis("w", 1, 1, 2)], parent="a"),
            }
        )
    with pytest.raises(ps.SpecError, match="cannot have activation_symmetry='scale'"):
        NeuronGroup(3, incoming=[Axis("w", 0)], activation_symmetry="scale", parent="a")
    with pytest.raises(ps.SpecError, match="length 10"):
        ps.PermutationSpec({"a": NeuronGroup(4, incoming=[Axis("w", 0, 3, None, 0)])}, {"w": (10, 2)})


def test_a_slice_leaves_the_rest_of_the_axis_in_place():
    spec = ps.PermutationSpec({"a": NeuronGroup(3, incoming=[Axis("w", 0, 1, 1, 2)])})
    w = {"w": torch.arange(7.0)}
    out = spec.apply(w, {"a": torch.tensor([2, 0, 1])})["w"]
    assert out.tolist() == [0, 1, 4, 2, 3, 5, 6]


class _ConvBN(nn.Module):
    def __init__(self, act: nn.Module):
        super().__init__()
        self.c1 = nn.Conv2d(2, 4, 3, padding=1)
        self.bn = nn.BatchNorm2d(4)
        self.act = act
        self.c2 = nn.Conv2d(4, 3, 3, padding=1)

    def forward(self, x):
        return self.c2(self.act(self.bn(self.c1(x))))


def _conv_bn_spec(sym: str) -> ps.PermutationSpec:
    return ps.PermutationSpec(
        {
            "h": NeuronGroup(
                4,
                incoming=[("bn.weight", 0), ("bn.bias", 0)],
                outgoing=[("c2.weight", 1)],
                activation_symmetry=sym,
                passive=[("c1.weight", 0), ("c1.bias", 0), ("bn.running_mean", 0), ("bn.running_var", 0)],
            )
        }
    )


@pytest.mark.parametrize("act, sym", [(nn.ReLU(), "scale"), (nn.Tanh(), "sign")])
def test_passive_axes_before_batchnorm(act, sym):
    torch.manual_seed(1)
    net = _ConvBN(act).double()
    with torch.no_grad():
        net.bn.running_mean.normal_()
        net.bn.running_var.uniform_(0.5, 2.0)
        net.bn.weight.normal_()
        net.bn.bias.normal_()
    net.eval()
    params = {k: v.detach().clone() for k, v in net.state_dict().items()}
    spec = _conv_bn_spec(sym).with_shapes({k: tuple(v.shape) for k, v in params.items()})
    x = torch.randn(2, 2, 5, 5, dtype=torch.float64)
    ref = torch.func.functional_call(net, params, (x,))
    g = spec.sample(generator=torch.Generator().manual_seed(3))
    moved = spec.apply(params, g)
    torch.testing.assert_close(torch.func.functional_call(net, moved, (x,)), ref)
    if sym == "scale":
        u = {"h": torch.tensor([0.3, -1.0, 2.0, 0.1], dtype=torch.float64)}
        scaled = spec.rescale(params, u)
        torch.testing.assert_close(torch.func.functional_call(net, scaled, (x,)), ref)
        assert torch.equal(scaled["c1.weight"], params["c1.weight"])  # passive: untouched
        assert torch.equal(scaled["bn.running_var"], params["bn.running_var"])
    else:
        flips = {"h": torch.tensor([True, False, True, True])}
        flipped = spec.apply(params, spec.sign_element(flips))
        torch.testing.assert_close(torch.func.functional_call(net, flipped, (x,)), ref)
        assert torch.equal(flipped["c1.weight"], params["c1.weight"])


def test_blocks_of_a_nested_group_are_per_head_per_dim():
    E, H = 6, 2
    spec = attention_spec(E, H)
    w = _positions(spec, E)
    action = spec.action("in_proj_weight")
    (q_span,) = [s for s in action.spans_of("qk") if s.start == 0]
    blocks = action.blocks(w["in_proj_weight"], q_span)
    assert blocks.shape == (H, 3, E)
    torch.testing.assert_close(blocks[1, 2], w["in_proj_weight"][5])
    top = action.unit_blocks(w["in_proj_weight"], "heads")
    assert top.shape == (H, 3 * 3 * E)


def test_from_module_on_a_sub_module_names_the_model_sites_and_prefix_hint():
    from pyro.nn import PyroModule
    from user_models import DeepBNN, deep_spec

    class Wrapper(PyroModule):
        def __init__(self):
            super().__init__()
            self.net = DeepBNN()

        def forward(self, x, y=None):
            return self.net(x, y)

    model = Wrapper()
    x, y = torch.randn(5, 8), torch.randint(0, 3, (5,))
    assert ps.PermutationSpec.from_module(model.net).sites[0] == "net.layers.0.weight"
    with pytest.raises(ps.SpecError, match=r"prefix 'net\.': use spec.with_prefix\('net\.'\)"):
        deep_spec().check(model, x, y)
    bound = deep_spec().with_prefix("net.").check(model, x, y)
    assert set(bound.groups) == {"net.layers.0", "net.layers.1"}
    assert bound.log_order == deep_spec().log_order


def test_site_action_scale_batched_on_a_later_axis_matches_rescale():
    """Batched log-scales on an outgoing axis (axis 1 of ``fc2.weight``) line up with that axis,
    not with the first event axis (it raised, or was silently wrong when sizes coincided)."""
    from pyro_symmetry.models import BayesianMLP

    model = BayesianMLP(3, [4], 4)
    gen = torch.Generator().manual_seed(0)
    w = {k: torch.randn(2, *s, generator=gen, dtype=torch.float64) for k, s in model.spec.shapes.items()}
    u = {"fc1": torch.randn(2, 4, generator=gen, dtype=torch.float64)}
    for site, x in w.items():
        if site not in model.spec.sites:
            continue
        got = model.spec.action(site).scale(x, u)
        want = torch.stack([model.spec.action(site).scale(x[b], {"fc1": u["fc1"][b]}) for b in range(2)])
        torch.testing.assert_close(got, want)
    torch.testing.assert_close(
        model.spec.action("fc2.weight").scale(w["fc2.weight"], u)[1, :, 2],
        w["fc2.weight"][1, :, 2] * (-u["fc1"][1, 2]).exp(),
    )
