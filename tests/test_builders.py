"""Specs built from modules: conv nets with norms, flatten blocks, residual streams."""

import copy

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from strategies import seeds
from torch import nn

import pyro_symmetry as ps


def _randomize(module: nn.Module, seed: int) -> nn.Module:
    """Random parameters *and* random BatchNorm running statistics (eval mode)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, t in list(module.named_parameters()) + list(module.named_buffers()):
            if t.dtype.is_floating_point:
                new = torch.randn(t.shape, generator=g, dtype=t.dtype)
                t.copy_(new.abs() + 0.5 if name.endswith("running_var") else new)
    return module.eval().double()


def _check_invariance(net: nn.Module, spec: ps.PermutationSpec, x: torch.Tensor, seed: int) -> None:
    """A drawn (signed) element, and a positive rescaling of the groups that have one, keep
    the function; the element really moves something."""
    state = net.state_dict()
    perm = spec.sample(generator=torch.Generator().manual_seed(seed))
    moved = spec.apply(state, perm)
    net2 = copy.deepcopy(net)
    net2.load_state_dict(moved)
    with torch.no_grad():
        y0, y1 = net(x), net2(x)
    assert torch.allclose(y0, y1, atol=1e-10, rtol=1e-10)
    moved_any = any(not torch.equal(state[k], moved[k]) for k in spec.sites)
    is_identity = all(torch.equal(p, torch.arange(p.shape[-1])) for p in perm.values())
    assert moved_any or is_identity
    scales = {k: torch.randn(g.size, dtype=torch.float64) for k, g in spec.groups.items() if g.scalable}
    if scales:
        net2.load_state_dict(spec.rescale(state, scales))
        with torch.no_grad():
            assert torch.allclose(net(x), net2(x), atol=1e-10, rtol=1e-9)


@given(
    c1=st.integers(1, 5),
    c2=st.integers(1, 5),
    h=st.integers(1, 6),
    seed=seeds,
    act=st.sampled_from([nn.ReLU, nn.Tanh]),
    pool=st.sampled_from(["max", "avg"]),
)
def test_cnn_with_batchnorm_invariance(c1, c2, h, seed, act, pool):
    Pool = nn.MaxPool2d if pool == "max" else nn.AvgPool2d
    net = nn.Sequential(
        nn.Conv2d(2, c1, 3, padding=1),
        nn.BatchNorm2d(c1),
        act(),
        Pool(2),
        nn.Conv2d(c1, c2, 3, padding=1),
        nn.BatchNorm2d(c2),
        act(),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(c2, h),
        nn.LayerNorm(h),
        act(),
        nn.Linear(h, 3),
    )
    _randomize(net, seed)
    spec = ps.PermutationSpec.from_module(net)
    # the symmetry is decided by what follows the norm
    relu = act is nn.ReLU
    first = "scale" if relu else ("sign" if pool == "avg" else "none")
    expected = {"0": first, "4": "scale" if relu else "sign", "9": "scale" if relu else "sign"}
    sizes = {"0": c1, "4": c2, "9": h}
    expected = {k: v for k, v in expected.items() if sizes[k] > 1 or v != "none"}  # one unit, nothing to flip
    assert {k: g.activation_symmetry for k, g in spec.groups.items()} == expected
    assert spec.sizes == {k: sizes[k] for k in expected}
    # BatchNorm parameters and running statistics follow the channels: the affine weight and
    # bias carry the channel's scale (incoming), the conv rows before it and the statistics
    # are only permuted (passive).
    if "0" in spec.groups:
        g0 = spec.groups["0"]
        assert {a.site for a in g0.incoming} == {"1.weight", "1.bias"}
        assert {a.site for a in g0.passive} >= {"0.weight", "0.bias", "1.running_mean", "1.running_var"}
    x = torch.randn(4, 2, 8, 8, dtype=torch.float64, generator=torch.Generator().manual_seed(seed))
    _check_invariance(net, spec, x, seed)


@given(c=st.integers(1, 4), seed=seeds, act=st.sampled_from([nn.ReLU, nn.Tanh]))
def test_conv_flatten_linear_blocks(c, seed, act):
    """Flatten without global pooling: each channel is a block of H*W columns."""
    net = nn.Sequential(nn.Conv2d(1, c, 3, padding=1), act(), nn.AvgPool2d(2), nn.Flatten(), nn.Linear(c * 9, 2))
    _randomize(net, seed)
    spec = ps.PermutationSpec.from_module(net)
    (out_axis,) = spec.groups["0"].outgoing
    assert out_axis.inner == 9
    expected = "scale" if act is nn.ReLU else "sign"
    assert spec.groups["0"].activation_symmetry == expected
    x = torch.randn(3, 1, 6, 6, dtype=torch.float64, generator=torch.Generator().manual_seed(seed))
    _check_invariance(net, spec, x, seed)


@pytest.mark.parametrize(
    "acts, expected",
    [
        ((nn.ReLU(),), "scale"),
        ((nn.Tanh(),), "sign"),
        ((nn.GELU(),), "none"),
        ((nn.Tanh(), nn.Unflatten(1, (4, 1)), nn.MaxPool1d(1), nn.Flatten()), "none"),
        ((nn.ReLU(), nn.Dropout(0.1)), "scale"),
        ((), "scale"),
    ],
)
def test_activation_symmetry_inference(acts, expected):
    net = nn.Sequential(nn.Linear(3, 4), *acts, nn.Linear(4, 2))
    assert ps.PermutationSpec.from_module(net).groups["0"].activation_symmetry == expected


class _Residual(nn.Module):
    """x -> inp -> [h + fc2(act(fc1(h)))] x 2 -> out: one residual stream of width d."""

    def __init__(self, d_in, d, d_hidden, d_out, act):
        super().__init__()
        self.inp = nn.Linear(d_in, d)
        self.blocks = nn.ModuleList(
            nn.ModuleDict({"fc1": nn.Linear(d, d_hidden), "fc2": nn.Linear(d_hidden, d)}) for _ in range(2)
        )
        self.out = nn.Linear(d, d_out)
        self.act = act

    def forward(self, x):
        h = self.inp(x)
        for b in self.blocks:
            h = h + b["fc2"](self.act(b["fc1"](h)))
        return self.out(h)


def _residual_spec(d, d_hidden, act_sym):
    """Per-layer groups, then the residual stream tied into one group."""
    G, A = ps.NeuronGroup, ps.Axis
    groups = {"stream_in": G(d, [A("inp.weight", 0), A("inp.bias", 0)], [A("blocks.0.fc1.weight", 1)])}
    for i in range(2):
        nxt = "blocks.1.fc1.weight" if i == 0 else "out.weight"
        groups[f"stream_{i}"] = G(d, [A(f"blocks.{i}.fc2.weight", 0), A(f"blocks.{i}.fc2.bias", 0)], [A(nxt, 1)])
        groups[f"hidden_{i}"] = G(
            d_hidden,
            [A(f"blocks.{i}.fc1.weight", 0), A(f"blocks.{i}.fc1.bias", 0)],
            [A(f"blocks.{i}.fc2.weight", 1)],
            activation_symmetry=act_sym,
        )
    return ps.PermutationSpec(groups)


@given(d=st.integers(1, 5), dh=st.integers(1, 5), seed=seeds, act=st.sampled_from(["relu", "tanh"]))
def test_residual_stream_tie(d, dh, seed, act):
    module = nn.ReLU() if act == "relu" else nn.Tanh()
    net = _randomize(_Residual(3, d, dh, 2, module), seed)
    # the per-layer groups are not a symmetry until tied: bind shapes only (spec.check verifies)
    spec = _residual_spec(d, dh, "scale" if act == "relu" else "sign").with_shapes(
        {k: tuple(v.shape) for k, v in net.state_dict().items()}
    )
    tied = spec.tie(["stream_in", "stream_0", "stream_1"], name="stream")
    assert set(tied.groups) == {"stream", "hidden_0", "hidden_1"}
    x = torch.randn(5, 3, dtype=torch.float64, generator=torch.Generator().manual_seed(seed))
    _check_invariance(net, tied, x, seed)
    if d > 1:
        # Untied, the stream permutations disagree and the function changes.
        perm = spec.identity()
        perm["stream_0"] = torch.roll(torch.arange(d), 1)
        net2 = copy.deepcopy(net)
        net2.load_state_dict(spec.apply(net.state_dict(), perm))
        with torch.no_grad():
            assert not torch.allclose(net(x), net2(x))


def test_tie_errors():
    spec = _residual_spec(3, 2, "none")
    with pytest.raises(ps.SpecError, match="different sizes"):
        spec.tie(["stream_in", "hidden_0"])
    with pytest.raises(ps.SpecError, match="unknown group 'nope'"):
        spec.tie(["stream_in", "nope"])


def test_from_module_refuses_forwards_that_fail_naming_the_module():
    with pytest.raises(ps.SpecError, match=r"module '1' \(Embedding\)"):
        ps.PermutationSpec.from_module(nn.Sequential(nn.Linear(3, 4), nn.Embedding(4, 4)))
    with pytest.raises(ps.SpecError, match=r"module '2' \(Linear\).*shapes cannot be multiplied"):
        ps.PermutationSpec.from_module(nn.Sequential(nn.Linear(3, 4), nn.ReLU(), nn.Linear(5, 2)))
    with pytest.raises(ps.SpecError, match="no Linear or Conv layer"):
        ps.PermutationSpec.from_module(nn.Sequential(nn.ReLU()))


def test_from_module_on_pyro_module_sites():
    """A PyroModule BNN: sites are the PyroSample names, shapes from the priors."""
    import pyro.distributions as dist
    from pyro.nn import PyroModule, PyroSample

    net = PyroModule[nn.Sequential](PyroModule[nn.Linear](3, 4), nn.Tanh(), PyroModule[nn.Linear](4, 2))
    net[0].weight = PyroSample(dist.Normal(0.0, 1.0).expand([4, 3]).to_event(2))
    net[0].bias = PyroSample(dist.Normal(0.0, 1.0).expand([4]).to_event(1))
    spec = ps.PermutationSpec.from_module(net)
    assert spec.shapes["0.weight"] == (4, 3) and spec.groups["0"].activation_symmetry == "sign"
    spec.check(net, torch.randn(2, 3))


class _Functional(nn.Module):
    """Layers registered first, the activation registered last or applied functionally."""

    def __init__(self, act):
        super().__init__()
        self.fc1, self.fc2, self.out = nn.Linear(3, 5), nn.Linear(5, 4), nn.Linear(4, 2)
        self.act = act  # a module, or a torch function

    def forward(self, x):
        return self.out(self.act(self.fc2(self.act(self.fc1(x)))).flatten(1))


@pytest.mark.parametrize(
    "act, expected",
    [(nn.Tanh(), "sign"), (torch.tanh, "sign"), (torch.sin, "sign"), (torch.relu, "scale"), (nn.GELU(), "none")],
)
def test_execution_order_not_registration_order(act, expected):
    """The chain is read from a trace of forward: symmetries of activations registered
    after the layers (or functional ones) are inferred, and the function is invariant
    under a random signed permutation and, for ReLU, rescaling."""
    net = _randomize(_Functional(act), 0)
    spec = ps.PermutationSpec.from_module(net)
    assert {g.activation_symmetry for g in spec.groups.values()} == {expected}
    x = torch.randn(6, 3, dtype=torch.float64)
    _check_invariance(net, spec, x, 1)
    if expected == "scale":
        scales = {k: torch.randn(n, dtype=torch.float64) for k, n in spec.sizes.items()}
        net2 = copy.deepcopy(net)
        net2.load_state_dict({**net.state_dict(), **ps.rescale(net.state_dict(), spec, scales)})
        with torch.no_grad():
            torch.testing.assert_close(net(x), net2(x))


def test_hardtanh_is_odd_only_when_symmetric():
    sym = {
        (-1.0, 1.0): "sign",
        (-2.0, 2.0): "sign",
        (0.0, 6.0): "none",
    }
    for (lo, hi), expected in sym.items():
        net = nn.Sequential(nn.Linear(3, 4), nn.Hardtanh(lo, hi), nn.Linear(4, 2))
        assert ps.PermutationSpec.from_module(net).groups["0"].activation_symmetry == expected
    assert ps.models.activation_symmetry(nn.ReLU6()) == "none"


def test_residual_and_shared_layers_are_read_from_the_executed_forward():
    """A skip connection ties the stream (fc1's rows with fc2's rows and columns); a layer
    called twice on its own output cannot be permuted; a scan along the channels fixes them."""

    class Skip(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc1, self.fc2, self.out = nn.Linear(3, 4), nn.Linear(4, 4), nn.Linear(4, 1)

        def forward(self, x):
            h = torch.relu(self.fc1(x))
            return self.out(h + self.fc2(h))

    net = _randomize(Skip(), 0)
    spec = ps.PermutationSpec.from_module(net)
    assert list(spec.groups) == ["fc1"] and spec.groups["fc1"].scalable
    assert {(a.site, a.axis) for a in spec.groups["fc1"].axes} == {
        ("fc1.weight", -2), ("fc1.bias", -1), ("fc2.weight", -2), ("fc2.weight", -1), ("fc2.bias", -1),
        ("out.weight", -1),
    }  # fmt: skip
    _check_invariance(net, spec, torch.randn(5, 3, dtype=torch.float64), 1)

    class Shared(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc1, self.fc2 = nn.Linear(4, 4), nn.Linear(4, 1)

        def forward(self, x):
            return self.fc2(self.fc1(torch.relu(self.fc1(x))))

    assert ps.PermutationSpec.from_module(Shared()).groups == {}

    class Scan(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc1, self.fc2, self.fc3 = nn.Linear(4, 4), nn.Linear(4, 3), nn.Linear(3, 1)

        def forward(self, x):
            return self.fc3(torch.relu(self.fc2(torch.cumsum(self.fc1(x), -1))))

    assert list(ps.PermutationSpec.from_module(Scan()).groups) == ["fc2"]


def test_unknown_operations_are_refused_naming_them():
    class Spectral(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc1, self.fc2 = nn.Linear(4, 4), nn.Linear(4, 1)

        def forward(self, x):
            h = self.fc1(x)
            return self.fc2(h + torch.fft.fft(h).real)

    with pytest.raises(ps.SpecError, match=r"cannot read operation 'fft_fft' in module '<root>' \(Spectral\)"):
        ps.PermutationSpec.from_module(Spectral())


def test_pyro_module_is_read_from_its_executed_forward_and_can_be_overridden():
    """A PyroModule whose forward holds Pyro statements and a functional tanh: the executed
    forward is recorded, so the tanh's sign symmetry is found. Callable priors are fine."""
    import pyro
    import pyro.distributions as dist
    from pyro.nn import PyroModule, PyroSample

    class Net(PyroModule):
        def __init__(self):
            super().__init__()
            self.fc1 = PyroModule[nn.Linear](3, 4)
            self.fc1.weight = PyroSample(lambda m: dist.Normal(0.0, 1.0).expand([4, 3]).to_event(2))
            self.fc2 = PyroModule[nn.Linear](4, 1)

        def forward(self, x, y=None):
            out = self.fc2(torch.tanh(self.fc1(x))).squeeze(-1)
            with pyro.plate("data", x.shape[0]):
                pyro.sample("obs", dist.Normal(out, 1.0), obs=y)
            return out

    net = Net()
    spec = ps.PermutationSpec.from_module(net)
    assert spec.groups["fc1"].activation_symmetry == "sign"
    assert spec.shapes["fc1.weight"] == (4, 3) and spec.shapes["fc1.bias"] == (4,)
    spec.check(net, torch.randn(2, 3))
    declared = ps.PermutationSpec.from_module(net, activation_symmetry={"fc1": "none"})
    assert not declared.groups["fc1"].signed
    with pytest.raises(ps.SpecError, match=r"activation_symmetry names groups \['fc9'\]"):
        ps.PermutationSpec.from_module(net, activation_symmetry={"fc9": "sign"})
    with pytest.raises(ps.SpecError, match="group 'fc1' of the spec changes the model"):
        ps.PermutationSpec.from_module(net, activation_symmetry={"fc1": "scale"})
    model = ps.models.BayesianMLP(3, [4], 2)
    assert ps.PermutationSpec.from_module(model) is model.spec


def test_check_names_a_bias_the_spec_leaves_out():
    model = ps.models.BayesianMLP(3, [5], 2)
    G, A = ps.NeuronGroup, ps.Axis
    spec = ps.PermutationSpec({"h": G(5, [A("fc1.weight", 0)], [A("fc2.weight", 1)])})
    with pytest.raises(ps.SpecError, match="permutes the rows of 'fc1.weight' but not 'fc1.bias'"):
        spec.check(model, torch.randn(2, 3))
    model.spec.check(model, torch.randn(2, 3))


@pytest.mark.parametrize(
    "op, expected",
    [
        (lambda h: 2.0 * h, "scale"),
        (lambda h: h / 2, "scale"),
        (lambda h: torch.mul(h, 3.0), "scale"),
        (lambda h: h + 1, "none"),
    ],
)
def test_scalar_arithmetic_on_the_chain(op, expected):
    """Multiplying by a constant keeps ReLU's scaling symmetry; adding one keeps only permutations."""

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc1, self.fc2 = nn.Linear(3, 4), nn.Linear(4, 1)

        def forward(self, x):
            return self.fc2(op(torch.relu(self.fc1(x))))

    assert ps.PermutationSpec.from_module(Net()).groups["fc1"].activation_symmetry == expected
