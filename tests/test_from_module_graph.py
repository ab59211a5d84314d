"""``PermutationSpec.from_module`` on real architectures (issue 11, items 2 and 3).

For each architecture of ``tests/architectures.py``: the spec is built without hand work,
``log|G|`` equals a count written out here from the architecture's widths (conventions: a
group counts ``lgamma(n + 1)``, plus ``n log 2`` when it has sign flips; a nested group counts
once per slot of its parent; scaling symmetries add nothing to ``|G|``), and Hypothesis-drawn
group elements (and, for groups with a scaling symmetry, positive rescalings) leave the
eval-mode function unchanged in float32 and float64.
"""

from __future__ import annotations

import math
from functools import cache

import pyro.poutine as poutine
import pytest
import torch
from architectures import (
    AffineAfterNorm,
    AttentionTransformer,
    ChannelsLastFlatten,
    DenseNetTiny,
    DepthwiseNet,
    GatedBias,
    GroupedConvNet,
    GroupNormNet,
    LayerScaleNet,
    NormMLP,
    ResidualPyroBNN,
    ResNet18,
    ResNet20,
    SqueezeExciteNet,
    TiedEmbeddingLM,
    TutorialBNN,
    UNetTiny,
    ViT,
    WeightNormMLP,
)
from hypothesis import given, settings
from pyro.nn import PyroModule
from strategies import dtypes, group_element, seeds
from torch import nn

import pyro_symmetry as ps

LOG2 = math.log(2.0)


def lg(n: int) -> float:
    return math.lgamma(n + 1)


def signed(n: int) -> float:
    return lg(n) + n * LOG2


def attention_block(E: int, H: int, M: int) -> float:
    """Heads (no sign: softmax), q/k dims and v dims per head (sign flips), MLP hidden (none)."""
    d = E // H
    return lg(H) + 2 * H * signed(d) + lg(M)


def image(c: int, s: int = 8):
    return lambda: torch.randn(2, c, s, s)


# name -> (module factory, hand count of log|G|, input factory)
CASES = {
    "resnet18": (lambda: ResNet18(width=4), 3 * (lg(4) + lg(8) + lg(16) + lg(32)), image(3)),
    "resnet20": (lambda: ResNet20(k=1, blocks=2), 3 * (lg(16) + lg(32) + lg(64)), image(3)),
    "vit": (lambda: ViT(dim=12, depth=2, heads=3, mlp=24), lg(12) + 2 * attention_block(12, 3, 24), image(3)),
    "transformer": (
        lambda: AttentionTransformer(dim=12, heads=3, mlp=20, depth=2),
        lg(12) + 2 * attention_block(12, 3, 20),
        lambda: torch.randint(0, 11, (2, 5)),
    ),
    "transformer_fused_qkv": (
        lambda: AttentionTransformer(dim=8, heads=2, mlp=6, depth=1, fused=True),
        lg(8) + attention_block(8, 2, 6),
        lambda: torch.randint(0, 11, (2, 5)),
    ),
    "transformer_sdpa": (
        lambda: AttentionTransformer(dim=8, heads=4, mlp=5, depth=1, sdpa=True),
        lg(8) + attention_block(8, 4, 5),
        lambda: torch.randint(0, 11, (2, 5)),
    ),
    "layernorm_mlp": (lambda: NormMLP(norm="layer"), lg(5) + lg(4), lambda: torch.randn(4, 3)),
    "layernorm_tanh_mlp": (
        lambda: NormMLP(norm="layer", act=nn.Tanh),
        signed(5) + signed(4),
        lambda: torch.randn(4, 3),
    ),
    "rmsnorm_mlp": (lambda: NormMLP(norm="rms"), lg(5) + lg(4), lambda: torch.randn(4, 3)),
    "batchnorm_mlp": (lambda: NormMLP(norm="batch", act=nn.Tanh), signed(5) + signed(4), lambda: torch.randn(4, 3)),
    "gelu_mlp": (lambda: NormMLP(norm="none", act=nn.GELU), lg(5) + lg(4), lambda: torch.randn(4, 3)),
    "silu_mlp": (lambda: NormMLP(sizes=(3, 6, 2), norm="none", act=nn.SiLU), lg(6), lambda: torch.randn(4, 3)),
    "groupnorm_2_of_6_and_1": (lambda: GroupNormNet((6, 4), (2, 1)), lg(2) + 2 * lg(3) + lg(4), image(2)),
    "groupnorm_tanh_3_of_6_and_4_of_4": (
        lambda: GroupNormNet((6, 4), (3, 4), act=nn.Tanh),
        lg(3) + 3 * signed(2) + signed(4),
        image(2),
    ),
    "depthwise": (lambda: DepthwiseNet(4, 1, 5), lg(4) + lg(5), image(2)),
    "depthwise_tanh": (lambda: DepthwiseNet(4, 1, 5, act=nn.Tanh), signed(4) + signed(5), image(2)),
    "depthwise_multiplier_2": (lambda: DepthwiseNet(3, 2, 4, act=nn.Tanh), lg(3) + 3 * signed(2) + signed(4), image(2)),
    "grouped_conv": (lambda: GroupedConvNet(4, 6, 2, 3), lg(2) + 2 * lg(3) + lg(3), image(2)),
    "grouped_conv_tanh": (lambda: GroupedConvNet(6, 6, 3, 2, act=nn.Tanh), lg(3) + 3 * signed(2) + lg(2), image(2)),
    "channels_last_flatten": (lambda: ChannelsLastFlatten(3, 5), signed(3) + signed(5), image(2, 4)),
    "densenet": (lambda: DenseNetTiny(4, 3, 2), lg(4) + 2 * lg(3), image(2)),
    "densenet_batchnorm": (lambda: DenseNetTiny(4, 3, 2, batchnorm=True), lg(4) + 2 * lg(3), image(2)),
    "unet_interpolate": (lambda: UNetTiny(3, 4, 3), lg(3) + lg(4) + lg(3), image(2)),
    "unet_transposed_conv": (lambda: UNetTiny(3, 4, 3, transposed=True), lg(3) + 2 * lg(4) + lg(3), image(2)),
    # corner cases: these keep permutations only where the scale would need two factors
    "affine_after_layernorm_without_weight": (lambda: AffineAfterNorm(5), lg(5), lambda: torch.randn(4, 3)),
    "parameter_used_as_gate_and_bias": (lambda: GatedBias(4), lg(4), lambda: torch.randn(4, 3)),
    "layerscale": (lambda: LayerScaleNet(4, 6), lg(4) + lg(6), lambda: torch.randn(4, 3)),
    "weight_norm": (lambda: WeightNormMLP(5), lg(5), lambda: torch.randn(4, 3)),
    "squeeze_excite": (lambda: SqueezeExciteNet(6, 3), lg(6) + lg(3), image(2)),
    "tied_embedding_head": (lambda: TiedEmbeddingLM(7, 4, 5), lg(4) + lg(5), lambda: torch.randint(0, 7, (2, 5))),
    "tutorial_bnn": (lambda: TutorialBNN(1, 1, 5, 2), 2 * signed(5), lambda: torch.randn(6, 1)),
    "residual_pyro_bnn": (lambda: ResidualPyroBNN(3, 4, 6), signed(4) + signed(6), lambda: torch.randn(6, 3)),
}


@cache
def spec_of(name: str) -> ps.PermutationSpec:
    torch.manual_seed(0)
    return ps.PermutationSpec.from_module(CASES[name][0]())


def randomized(net: nn.Module, seed: int, dtype: torch.dtype) -> nn.Module:
    """Random parameters and buffers (positive running variances), eval mode, ``dtype``."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, t in list(net.named_parameters()) + list(net.named_buffers()):
            if t.is_floating_point():
                new = torch.randn(t.shape, generator=g) / math.sqrt(max(1, t[0].numel() if t.dim() > 1 else 4))
                t.copy_(new.abs() + 0.5 if name.endswith("running_var") else new)
    return net.to(dtype).eval()


def evaluate(net: nn.Module, state: dict, sites: dict, x: torch.Tensor) -> torch.Tensor:
    out = torch.func.functional_call if not sites else None
    with torch.no_grad():
        if out is not None:
            return out(net, state, (x,))
        net.load_state_dict(state, strict=False)
        return poutine.condition(net, data=sites)(x)


def prior_sites(net: nn.Module, x: torch.Tensor, seed: int, dtype: torch.dtype) -> dict:
    torch.manual_seed(seed)
    tr = poutine.trace(net).get_trace(x)
    return {k: s["value"].to(dtype) for k, s in tr.nodes.items() if s["type"] == "sample" and not s["is_observed"]}


@pytest.mark.parametrize("name", list(CASES))
def test_log_order_matches_the_hand_count(name):
    spec = spec_of(name)
    assert spec.log_order == pytest.approx(CASES[name][1], rel=1e-12, abs=1e-9), spec


LARGE = ("resnet18", "resnet20")  # slower to evaluate: fewer draws


@pytest.mark.parametrize("name", [k for k in CASES if k not in LARGE])
@settings(max_examples=6)
@given(seed=seeds, dtype=dtypes)
def test_drawn_elements_keep_the_function(name, seed, dtype):
    _check_case(name, seed, dtype)


@pytest.mark.parametrize("name", LARGE)
@settings(max_examples=3)
@given(seed=seeds, dtype=dtypes)
def test_drawn_elements_keep_the_function_large(name, seed, dtype):
    _check_case(name, seed, dtype)


def _check_case(name, seed, dtype):
    make, _, inputs = CASES[name]
    spec = spec_of(name)
    torch.manual_seed(seed % 1000)
    default = torch.get_default_dtype()
    torch.set_default_dtype(dtype)  # Pyro priors are built in the default dtype
    try:
        _check_drawn_element(make, inputs, spec, seed, dtype)
    finally:
        torch.set_default_dtype(default)


def _check_drawn_element(make, inputs, spec, seed, dtype):
    net = randomized(make(), seed, dtype)
    x = inputs()
    x = x.to(dtype) if x.is_floating_point() else x
    sites = prior_sites(net, x, seed, dtype) if isinstance(net, PyroModule) else {}
    state = {**dict(net.state_dict()), **{k: v for k, v in sites.items() if k in spec.sites}}
    g = group_element(spec, seed)
    moved = spec.apply(state, g)
    scales = {k: torch.rand(grp.size, generator=torch.Generator().manual_seed(seed)) * 2 - 1
              for k, grp in spec.groups.items() if grp.scalable}  # fmt: skip
    if scales:
        moved = spec.rescale(moved, scales)
    state_keys = set(net.state_dict())
    y0 = evaluate(net, {k: state[k] for k in state_keys}, sites, x)
    y1 = evaluate(net, {k: moved[k] for k in state_keys}, {**sites, **{k: moved[k] for k in sites if k in moved}}, x)
    tol = 2e-4 if dtype == torch.float32 else 1e-10
    torch.testing.assert_close(y1, y0, atol=tol * (1 + float(y0.abs().max())), rtol=tol)
    if any(not torch.equal(p, torch.arange(p.shape[-1]).expand_as(p)) for p in g.values()):
        assert any(not torch.equal(state[k], moved[k]) for k in spec.sites)


# ---------------------------------------------------------------------------------- structure
def _spans(spec: ps.PermutationSpec) -> set[tuple]:
    """Every (group, site, axis, start, unit shape, inner, role) of a spec, by site action. A
    parent of nested groups has no sign or scale of its own: only whether its span is passive
    matters (its nested group's flips follow it)."""
    out = set()
    for site in spec.sites:
        for s in spec.action(site).spans:
            role = (s.role == "passive") if spec.children(s.group) else s.role
            out.add((s.group, s.site, s.axis, s.start, s.shape, s.inner, role))
    return out


def test_multihead_attention_gives_the_hand_built_heads_and_dims():
    """``nn.MultiheadAttention`` alone: heads over the q, k and v slices of the fused
    in-projection and the out-projection's columns, q/k dims and v dims nested and signed:
    the same spans and roles as the hand-built spec of the v2 data model tests."""
    from test_groups_structured import attention_spec

    E, H = 6, 2
    mha = nn.MultiheadAttention(E, H)
    spec = ps.PermutationSpec.from_module(mha)
    shapes = {k: tuple(v.shape) for k, v in mha.state_dict().items()}
    assert _spans(spec) == _spans(attention_spec(E, H).with_shapes(shapes))
    assert spec.log_order == pytest.approx(lg(H) + 2 * H * signed(E // H))


@pytest.mark.parametrize(
    "model",
    [
        lambda: ps.models.BayesianMLP(3, [4, 5], 2, activation="tanh"),
        lambda: ps.models.BayesianMLP(3, [4], 1, activation="relu", likelihood="regression", obs_scale=None),
        lambda: ps.models.BayesianCNN(1, (8, 8), [3, 2], 4, activation="tanh"),
    ],
)
def test_models_carry_the_spec_the_analysis_finds(model):
    model = model()
    assert ps.PermutationSpec.from_module(model) is model.spec
    read = ps.PermutationSpec.from_module(model, use_spec_attribute=False)
    assert read.sizes == model.spec.sizes
    assert {k: g.activation_symmetry for k, g in read.groups.items()} == {
        k: g.activation_symmetry for k, g in model.spec.groups.items()
    }
    assert _spans(read) == _spans(model.spec)


def test_fused_qkv_split_by_reshape_and_unbind_ties_the_v_dims_to_the_qk_dims():
    """timm's ``qkv.reshape(B, T, 3, H, d).permute(2, 0, 3, 1, 4).unbind(0)``: one reshape puts
    q, k and v in one tensor whose per-head dims carry one atom, so the v dims share the q/k
    dims' permutation (a subgroup of the full group; ``chunk`` along channels gives all of it)."""

    class Timm(nn.Module):
        def __init__(self):
            super().__init__()
            self.inp, self.qkv = nn.Linear(3, 8), nn.Linear(8, 24)
            self.proj, self.out = nn.Linear(8, 8), nn.Linear(8, 2)

        def forward(self, x):
            h = self.inp(x)
            B, T, E = h.shape
            q, k, v = self.qkv(h).reshape(B, T, 3, 2, 4).permute(2, 0, 3, 1, 4).unbind(0)
            a = (q @ k.transpose(-2, -1)).softmax(-1) @ v
            h = h + self.proj(a.transpose(1, 2).reshape(B, T, E))
            return self.out(h.mean(1))

    spec = ps.PermutationSpec.from_module(Timm(), example_inputs=torch.randn(2, 5, 3))
    assert spec.log_order == pytest.approx(lg(8) + lg(2) + 2 * signed(4))


def test_unread_positions_of_a_position_table_are_not_a_group():
    """Tokens of length 5 read 5 of the 8 rows of the position table: the other rows are not
    permuted (a longer input would read them)."""
    net = AttentionTransformer(dim=8, heads=2, mlp=6, depth=1, max_len=8)
    spec = ps.PermutationSpec.from_module(net)
    assert spec.log_order == pytest.approx(lg(8) + attention_block(8, 2, 6))
    assert all(ax.axis == -1 for g in spec.groups.values() for ax in g.axes if ax.site == "pos")


# ---------------------------------------------------------------------------------- Pyro modules
def test_tutorial_bnn_keeps_its_sign_symmetry_and_sites():
    """The activation is registered before the layers: the executed forward still gives every
    hidden layer its tanh sign flips; sites are the PyroSample names."""
    net = TutorialBNN(1, 1, 5, 2)
    spec = ps.PermutationSpec.from_module(net)
    assert {k: g.activation_symmetry for k, g in spec.groups.items()} == {"layers.0": "sign", "layers.1": "sign"}
    assert spec.shapes["layers.0.weight"] == (5, 1) and spec.shapes["layers.1.weight"] == (5, 5)
    assert set(spec.sites) == {f"layers.{i}.{p}" for i in range(3) for p in ("weight", "bias")} - {"layers.2.bias"}
    spec.check(net, torch.randn(4, 1))


def test_residual_pyro_module_is_read_not_refused():
    spec = ps.PermutationSpec.from_module(ResidualPyroBNN(3, 4, 6))
    assert list(spec.groups) == ["fc_in", "fc1"]
    stream = {(a.site, a.axis) for a in spec.groups["fc_in"].axes}
    assert stream == {
        ("fc_in.weight", -2), ("fc_in.bias", -1), ("fc2.weight", -2), ("fc2.bias", -1),
        ("fc1.weight", -1), ("out.weight", -1),
    }  # fmt: skip


# ---------------------------------------------------------------------------------- refusals
def test_forwards_that_cannot_be_recorded_are_refused_naming_the_module():
    class TwoInputs(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc, self.skip = nn.Linear(3, 4), nn.Linear(3, 4)

        def forward(self, x, z):  # z cannot be built from the layers
            return self.fc(x) + self.skip(z)

    with pytest.raises(ps.SpecError, match=r"forward of TwoInputs failed .* module '<root>' \(TwoInputs\)"):
        ps.PermutationSpec.from_module(TwoInputs())
    spec = ps.PermutationSpec.from_module(TwoInputs(), example_inputs=(torch.randn(2, 3), torch.randn(2, 3)))
    assert spec.groups == {}  # the sum is the output: nothing to permute

    class Opaque(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc1, self.fc2 = nn.Linear(3, 4), nn.Linear(4, 1)

        def forward(self, x):
            h = self.fc1(x)
            return self.fc2(h + torch.special.bessel_j0(h))

    with pytest.raises(ps.SpecError, match=r"cannot read operation 'special_bessel_j0' in module '<root>'"):
        ps.PermutationSpec.from_module(Opaque())

    class ViewUpdate(nn.Module):
        """An in-place update through a view changes the base behind the record's back."""

        def __init__(self):
            super().__init__()
            self.fc1, self.fc2 = nn.Linear(3, 4), nn.Linear(4, 1)

        def forward(self, x):
            h = self.fc1(x)
            h[:, :2].mul_(0.5).relu_()
            return self.fc2(h)

    with pytest.raises(ps.SpecError, match=r"in module 'fc2' \(Linear\), a tensor is read after an in-place"):
        ps.PermutationSpec.from_module(ViewUpdate())


def test_example_inputs_for_sizes_the_builder_does_not_try():
    net = ViT(image=40, patch=4, dim=8, depth=1, heads=2, mlp=6)
    with pytest.raises(ps.SpecError, match="pos_embed|size|shape"):
        ps.PermutationSpec.from_module(net)
    spec = ps.PermutationSpec.from_module(net, example_inputs=torch.randn(2, 3, 40, 40))
    assert spec.log_order == pytest.approx(lg(8) + attention_block(8, 2, 6))


def test_no_side_effects_and_training_flags_restored():
    from pyro_symmetry._state import snapshot

    for net in (ResNet20(k=1, blocks=1).train(), TutorialBNN().train(), ViT().train()):
        before = snapshot()
        ps.PermutationSpec.from_module(net)
        assert snapshot().diff(before) == []
        assert all(m.training for m in net.modules())


# ---------------------------------------------------------------------------------- spec.check
class _Residual(nn.Module):
    def __init__(self):
        super().__init__()
        self.inp, self.fc1, self.fc2, self.out = nn.Linear(3, 4), nn.Linear(4, 5), nn.Linear(5, 4), nn.Linear(4, 2)

    def forward(self, x):
        h = self.inp(x)
        return self.out(h + self.fc2(torch.relu(self.fc1(h))))


def _untied_residual_spec() -> ps.PermutationSpec:
    G, A = ps.NeuronGroup, ps.Axis
    return ps.PermutationSpec(
        {
            "stream_in": G(4, [A("inp.weight", 0), A("inp.bias", 0)], [A("fc1.weight", 1)]),
            "hidden": G(5, [A("fc1.weight", 0), A("fc1.bias", 0)], [A("fc2.weight", 1)], "scale"),
            "stream_out": G(4, [A("fc2.weight", 0), A("fc2.bias", 0)], [A("out.weight", 1)]),
        }
    )


def test_check_fails_on_a_spec_that_changes_the_function_naming_the_group():
    from pyro_symmetry.groups._verify import check_spec_against

    net = _Residual()
    untied = _untied_residual_spec()
    with pytest.raises(ps.SpecError, match=r"group 'stream_in' of the spec changes the model.*output 0"):
        check_spec_against(untied, net, torch.randn(3, 3))
    tied = untied.tie(["stream_in", "stream_out"], name="stream")
    check_spec_against(tied, net, torch.randn(3, 3))
    check_spec_against(tied, net)  # inputs built from the first layer
    read = ps.PermutationSpec.from_module(net)
    assert {g.size for g in read.groups.values()} == {4, 5}
    check_spec_against(read, net)


def test_check_of_a_pyro_model_names_the_first_site_that_changes():
    """A Pyro model: the likelihood changes under a broken spec (named: 'obs'), the prior under
    a spec that moves a non-iid prior (named: the weight site)."""
    import pyro
    import pyro.distributions as dist

    from pyro_symmetry.groups._verify import check_spec_against

    def model(x, row_scales=None):
        scale = torch.ones(4, 1) if row_scales is None else row_scales
        w = pyro.sample("w", dist.Normal(0.0, scale.expand(4, 3)).to_event(2))
        v = pyro.sample("v", dist.Normal(0.0, 1.0).expand([2, 4]).to_event(2))
        with pyro.plate("data", x.shape[0]):
            pyro.sample("obs", dist.Normal(torch.tanh(x @ w.T) @ v.T, 1.0).to_event(1))

    G, A = ps.NeuronGroup, ps.Axis
    good = ps.PermutationSpec({"h": G(4, [A("w", -2)], [A("v", -1)], "sign")})
    x = torch.randn(5, 3)
    check_spec_against(good, model, x)
    broken = ps.PermutationSpec({"h": G(4, [A("w", -2)], [], "sign")})
    with pytest.raises(ps.SpecError, match=r"group 'h' .* site 'obs'"):
        check_spec_against(broken, model, x)
    with pytest.raises(ps.SpecError, match=r"site 'w' \(prior log-density"):
        check_spec_against(good, model, x, torch.arange(1.0, 5.0).unsqueeze(-1))


# ---------------------------------------------------------------------------------- brute force
def _grouped_conv_valid_permutations(net: nn.Module, x: torch.Tensor) -> set[tuple]:
    """Every pair (permutation of conv1's output channels, of gconv's output channels) for
    which some arrangement of gconv's kernel keeps the function, by enumeration: new row ``r``
    of gconv (original row ``p_out[r]``, of conv group ``b``) sits in conv group ``r // cin``
    and must read, through its columns, original channels of block ``b`` only."""
    import itertools

    y0 = net(x)
    w, cin = net.gconv.weight, net.gconv.weight.shape[1]
    ok = set()
    for p_in, p_out in itertools.product(itertools.permutations(range(4)), repeat=2):
        new_w = w[list(p_out)].clone()
        feasible = True
        for r, src_row in enumerate(p_out):
            for i in range(cin):
                c = p_in[(r // cin) * cin + i]  # original channel in the new column i of row r
                feasible &= c // cin == src_row // cin
                new_w[r, i] = w[src_row, c % cin]
        if not feasible:
            continue
        state = dict(net.state_dict())
        state["conv1.weight"], state["conv1.bias"] = state["conv1.weight"][list(p_in)], state["conv1.bias"][list(p_in)]
        state["gconv.weight"], state["gconv.bias"] = new_w, state["gconv.bias"][list(p_out)]
        state["head.weight"] = state["head.weight"][:, list(p_out)]
        if torch.allclose(torch.func.functional_call(net, state, (x,)), y0, atol=1e-10, rtol=1e-9):
            ok.add((p_in, p_out))
    return ok


def _spec_permutations(spec: ps.PermutationSpec, layers: list[str], sizes: list[int]) -> set[tuple]:
    codes = {site: torch.zeros(spec.shapes[site], dtype=torch.float64) for site in spec.sites}
    codes.update({f"{n}.bias": torch.arange(s, dtype=torch.float64) for n, s in zip(layers, sizes)})
    els = spec.elements()
    moved = spec.apply(codes, els)
    count = next(iter(els.values())).shape[0]
    return {tuple(tuple(int(v) for v in moved[f"{n}.bias"][i]) for n in layers) for i in range(count)}


def test_grouped_conv_spec_is_the_expressible_part_of_the_exact_group():
    """conv1 (4 channels) -> ReLU -> conv(groups=2, 4 -> 4) -> ReLU -> 1x1 conv. The
    permutations that keep the function (enumerated: 4! x 4! pairs) are exactly the group of
    the derivation: conv groups move as whole blocks on both sides, output and input channels
    permute within each block, one permutation per block: ``2! (2!)^2 (2!)^2 = 32``. The spec
    keeps the blocks and the per-block output permutations (``2! (2!)^2 = 8``), all of them
    valid: the per-block input permutations act on the kernel's columns with a permutation
    that depends on the row's block, which no axis span can express."""

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv1 = nn.Conv2d(1, 4, 1)
            self.gconv = nn.Conv2d(4, 4, 1, groups=2)
            self.head = nn.Conv2d(4, 1, 1)

        def forward(self, x):
            return self.head(torch.relu(self.gconv(torch.relu(self.conv1(x))))).flatten(1)

    torch.manual_seed(0)
    net = Net().double().eval()
    x = torch.randn(3, 1, 2, 2, dtype=torch.float64)
    with torch.no_grad():
        valid = _grouped_conv_valid_permutations(net, x)
    assert len(valid) == 32
    spec = ps.PermutationSpec.from_module(net)
    assert spec.order == 8
    assert _spec_permutations(spec.without_signs(), ["conv1", "gconv"], [4, 4]) <= valid


def test_groupnorm_spec_is_exactly_the_function_preserving_permutations():
    """conv (4 channels) -> GroupNorm(2, 4) -> ReLU -> 1x1 conv: the channel permutations that
    keep the function (of 4! = 24) are the 8 that permute within and across the two groups,
    exactly the spec's group."""

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv1 = nn.Conv2d(1, 4, 1)
            self.gn = nn.GroupNorm(2, 4)
            self.head = nn.Conv2d(4, 1, 1)

        def forward(self, x):
            return self.head(torch.relu(self.gn(self.conv1(x)))).flatten(1)

    torch.manual_seed(1)
    net = Net().double().eval()
    with torch.no_grad():
        net.gn.weight.normal_()
        net.gn.bias.normal_()
    x = torch.randn(3, 1, 2, 2, dtype=torch.float64)

    def valid_perms():
        import itertools

        y0 = net(x)
        out = set()
        for p in itertools.permutations(range(4)):
            p_t = torch.tensor(p)
            state = dict(net.state_dict())
            for k in ("conv1.weight", "conv1.bias", "gn.weight", "gn.bias"):
                state[k] = state[k][p_t]
            state["head.weight"] = state["head.weight"][:, p_t]
            if torch.allclose(torch.func.functional_call(net, state, (x,)), y0, atol=1e-10, rtol=1e-9):
                out.add((p,))
        return out

    with torch.no_grad():
        valid = valid_perms()
    spec = ps.PermutationSpec.from_module(net)
    assert len(valid) == 8 and spec.order == 8
    assert _spec_permutations(spec, ["conv1"], [4]) == valid


def test_check_sees_through_zero_initialized_parameters():
    """The ViT's class token and position table start at zero, so permuting them alone does
    not change the function of a freshly built module; the check replaces constant
    parameters by distinct values and catches it."""
    from pyro_symmetry.groups._verify import check_spec_against

    net = ViT(dim=8, depth=1, heads=2, mlp=6)
    assert float(net.pos_embed.detach().abs().max()) == 0.0
    G, A = ps.NeuronGroup, ps.Axis
    wrong = ps.PermutationSpec({"pos_only": G(8, [A("pos_embed", -1), A("cls_token", -1)], [])})
    with pytest.raises(ps.SpecError, match="group 'pos_only' of the spec changes the model"):
        check_spec_against(wrong, net, torch.randn(2, 3, 8, 8))
