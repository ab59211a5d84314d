"""Bad inputs to every public entry point fail early with a clear error naming the culprit.

Hypothesis draws *which* argument, site, axis, entry or neuron is bad and *how* (NaN or
Inf, a wrong length, a wrong dtype, a count below its minimum, a corrupted group
element, ...). Every case asserts the exception type (``SpecError`` / ``ValueError`` /
``TypeError``, never a ``RuntimeError``/``IndexError``/``KeyError`` from deep inside
torch) and, with ``match=``, that the message names the argument, site, group or value.
"""

import math
import re

import pyro
import pyro.distributions as dist
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from pyro.infer import SVI, Trace_ELBO
from pyro.infer.autoguide import AutoDiagonalNormal, AutoNormal
from torch import nn

import pyro_symmetry as ps
from pyro_symmetry.models import BayesianCNN, BayesianMLP

pytestmark = pytest.mark.usefixtures("global_state_unchanged")


# Test data comes from this generator, not torch's global RNG, so that the test's own code
# leaves the global state alone (global_state_unchanged checks the library around it).
_DATA = torch.Generator().manual_seed(0)


def randn(*shape, **kwargs):
    return torch.randn(*shape, generator=_DATA, **kwargs)


def rand(*shape, **kwargs):
    return torch.rand(*shape, generator=_DATA, **kwargs)


def randint(low, high, size, **kwargs):
    return torch.randint(low, high, size, generator=_DATA, **kwargs)


D, M = ps.diagnostics, ps.diagnostics.metrics
BAD = (TypeError, ValueError)  # SpecError is a ValueError
nonfinite = st.sampled_from([math.nan, math.inf, -math.inf])
small_hidden = st.lists(st.integers(2, 5), min_size=1, max_size=3).map(tuple)
activations = st.sampled_from(["relu", "tanh"])


def names(*parts):
    """A regex that finds every part (literally, in any order) in the message."""
    return "(?s)" + "".join(f"(?=.*{re.escape(str(p))})" for p in parts)


def bad_count(minimum):
    """Values that are not an int >= ``minimum``: too small, non-integral, bool, str, None."""
    return st.one_of(
        st.integers(minimum - 5, minimum - 1),
        st.floats(allow_nan=True, allow_infinity=True),
        st.booleans(),
        st.text(max_size=2),
        st.none(),
    )


def params_of(model, seed=0, batch=(), dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    return {k: torch.randn(batch + s, generator=g, dtype=dtype) for k, s in model.spec.shapes.items()}


def gaussian_of(model, seed=0):
    g = torch.Generator().manual_seed(seed)
    return {k: (torch.randn(s, generator=g), torch.rand(s, generator=g) + 0.1) for k, s in model.spec.shapes.items()}


def poke(t, data, value):
    """``t`` with one entry, drawn by Hypothesis, set to ``value``."""
    t = t.clone()
    t.view(-1)[data.draw(st.integers(0, t.numel() - 1), label="entry")] = value
    return t


def moved_axis(spec, site, data):
    """An event axis of ``site`` that a group acts on."""
    return data.draw(st.sampled_from([ax for ax, _, _ in spec.site_moves(site)[1]]), label="axis")


def reshaped(t, axis, delta):
    shape = list(t.shape)
    shape[axis] += delta
    return randn(shape, dtype=t.dtype)


def fitted(guide_cls, model, x, y):
    guide = guide_cls(model)
    SVI(model, guide, pyro.optim.Adam({"lr": 1e-3}), Trace_ELBO()).step(x, y)
    return guide


# ---------------------------------------------------------------------------------- groups
@given(size=st.one_of(st.integers(-5, 0), st.floats(allow_nan=True), st.booleans(), st.text(max_size=2)))
def test_neuron_group_size(size):
    with pytest.raises(ps.SpecError, match="size"):
        ps.NeuronGroup(size, incoming=[("w", 0)])


bad_axis_entries = st.one_of(
    st.tuples(st.integers(), st.integers()),
    st.tuples(st.just("w"), st.floats()),
    st.tuples(st.just("w"), st.integers(-2, 2), st.integers(-3, 0)),
    st.tuples(st.just("w"), st.integers(-2, 2), st.just(1), st.integers(-3, -1)),
    st.tuples(st.just("w")),
    st.text(max_size=3),
    st.none(),
)


@given(entry=bad_axis_entries, position=st.integers(0, 2), where=st.sampled_from(["incoming", "outgoing"]))
def test_neuron_group_axis_entries(entry, position, where):
    entries = [("a", 0), ("b", -1)]
    entries.insert(position, entry)
    with pytest.raises(ps.SpecError, match=names(f"{where}[{position}]")):
        ps.NeuronGroup(2, **{where: entries})


@pytest.mark.parametrize(
    "kw, pattern",
    [({}, "at least one"), ({"incoming": "w"}, "incoming"), ({"outgoing": None}, "outgoing")],
)
def test_neuron_group_without_axes(kw, pattern):
    with pytest.raises(ps.SpecError, match=pattern):
        ps.NeuronGroup(2, **kw)


@given(sym=st.text(max_size=6).filter(lambda s: s not in ps.groups.ACTIVATION_SYMMETRIES))
def test_neuron_group_activation_symmetry(sym):
    with pytest.raises(ps.SpecError, match="activation_symmetry"):
        ps.NeuronGroup(2, incoming=[("w", 0)], activation_symmetry=sym)


@given(hidden=small_hidden, data=st.data())
def test_spec_shapes_that_do_not_match_the_groups(hidden, data):
    spec = BayesianMLP(3, hidden, 2).spec
    shapes = {k: list(v) for k, v in spec.shapes.items()}
    kind = data.draw(st.sampled_from(["length", "negative", "float", "extra dim"]), label="kind")
    # a site's length or rank can only be wrong on an axis a group moves; any dim can be negative
    site = data.draw(st.sampled_from(sorted(shapes) if kind in ("negative", "float") else spec.sites), label="site")
    if kind == "length":
        shapes[site][moved_axis(spec, site, data)] += data.draw(st.integers(1, 3))
    elif kind == "negative":
        shapes[site][data.draw(st.integers(0, len(shapes[site]) - 1))] = -data.draw(st.integers(1, 3))
    elif kind == "float":
        shapes[site][data.draw(st.integers(0, len(shapes[site]) - 1))] = 2.5
    else:
        shapes[site].append(1)
    with pytest.raises(ps.SpecError, match=names(repr(site))):
        spec.with_shapes(shapes)


@given(hidden=small_hidden, data=st.data())
def test_spec_checked_against_a_model_of_other_widths(hidden, data):
    layer = data.draw(st.integers(0, len(hidden) - 1), label="layer")
    other = list(hidden)
    other[layer] += data.draw(st.integers(1, 3))
    spec = ps.mlp_spec([f"fc{i + 1}" for i in range(len(hidden) + 1)], other)
    with pytest.raises(ps.SpecError, match=names(f"'fc{layer + 1}'", other[layer])):
        spec.check(BayesianMLP(3, hidden, 2))


corruptions = st.sampled_from(["duplicate", "out of range", "float", "length", "flip", "missing", "extra", "list"])
element_users = st.sampled_from(["apply", "inverse", "compose a", "compose b", "validate", "flat", "Pushforward"])


@given(hidden=small_hidden, kind=corruptions, user=element_users, data=st.data())
def test_corrupted_group_elements(hidden, kind, user, data):
    model = BayesianMLP(3, hidden, 2, activation="relu")  # unsigned groups: a flip is an error
    spec, w = model.spec, params_of(model)
    perm = spec.sample(generator=torch.Generator().manual_seed(data.draw(st.integers(0, 99))))
    g = data.draw(st.sampled_from(sorted(perm)), label="group")
    n = spec.groups[g].size
    bad = dict(perm)
    expect = {"missing": "has groups", "extra": "has groups", "float": "integer", "list": "integer"}
    if kind == "duplicate":
        i, j = data.draw(st.permutations(range(n)))[:2]
        bad[g] = perm[g].clone()
        bad[g][i] = perm[g][j]
    elif kind == "out of range":
        bad[g] = poke(perm[g], data, n + data.draw(st.integers(0, 5)))
    elif kind == "float":
        bad[g] = perm[g].float()
    elif kind == "length":
        bad[g] = torch.arange(n + data.draw(st.sampled_from([-1, 1])))
    elif kind == "flip":
        bad[g] = poke(perm[g], data, -1 - data.draw(st.integers(0, n - 1)))
    elif kind == "missing":
        del bad[g]
    elif kind == "extra":
        bad["nope"] = torch.arange(2)
    else:
        bad[g] = perm[g].tolist()
    message = expect.get(kind, {"length": "has shape", "flip": "flips signs"}.get(kind, "not a permutation"))
    who = {"compose a": "a", "compose b": "b"}.get(user, "perm")
    layout = ps.FlatLayout(spec.shapes)
    call = {
        "apply": lambda: spec.apply(w, bad),
        "inverse": lambda: spec.inverse(bad),
        "compose a": lambda: spec.compose(bad, perm),
        "compose b": lambda: spec.compose(perm, bad),
        "validate": lambda: spec.validate(bad),
        "flat": lambda: ps.flat_permutation(spec, bad, layout),
        "Pushforward": lambda: ps.Pushforward(dist.Normal(torch.zeros(layout.dim), 1.0).to_event(1), spec, bad, layout),
    }[user]
    pattern = names(message) if kind in ("missing", "extra") else names(f"{who}[{g!r}]", message)
    with pytest.raises(ps.SpecError, match=pattern):
        call()


@given(hidden=small_hidden, data=st.data())
def test_apply_to_params_of_the_wrong_shape(hidden, data):
    model = BayesianMLP(3, hidden, 2, activation="tanh")
    spec, w = model.spec, params_of(model)
    site = data.draw(st.sampled_from(spec.sites), label="site")
    kind = data.draw(st.sampled_from(["axis length", "missing", "not a tensor", "batch"]), label="kind")
    if kind == "axis length":
        w[site] = reshaped(w[site], moved_axis(spec, site, data), data.draw(st.sampled_from([-1, 1, 2])))
    elif kind == "missing":
        del w[site]
    elif kind == "not a tensor":
        w[site] = w[site].tolist()
    perm = spec.sample((3,), generator=_DATA) if kind == "batch" else spec.sample(generator=_DATA)
    if kind == "batch":
        w[site] = w[site].expand((2,) + w[site].shape)
    with pytest.raises(ps.SpecError, match=names(repr(site))):
        spec.apply(w, perm)


bad_batch_shapes = st.one_of(
    st.lists(st.integers(-3, 3), min_size=1, max_size=3).filter(lambda b: min(b) < 0),
    st.lists(st.floats(allow_nan=True), min_size=1, max_size=2),
    st.text(min_size=1, max_size=3),
    st.floats(allow_nan=True),
)


@given(batch=bad_batch_shapes, how=st.sampled_from(["sample", "identity"]))
def test_sample_and_identity_batch_shapes(batch, how):
    spec = ps.mlp_spec(["a", "b"], [3])
    with pytest.raises(BAD, match="batch_shape"):
        getattr(spec, how)(batch)


@given(size=st.integers(9, 12), signed=st.booleans(), max_order=st.one_of(st.none(), st.integers(1, 10**5)))
def test_group_too_large_to_enumerate(size, signed, max_order):
    spec = ps.mlp_spec(["a", "b"], [size - 2 if signed else size], activation_symmetry="sign" if signed else "none")
    kw = {} if max_order is None else {"max_order": max_order}
    with pytest.raises(ps.SpecError, match=names("enumeration limit", spec.order)):
        spec.elements(**kw)


@given(max_order=bad_count(1))
def test_elements_max_order(max_order):
    with pytest.raises(BAD, match="max_order"):
        ps.mlp_spec(["a", "b"], [2]).elements(max_order=max_order)


@pytest.mark.parametrize(
    "names_, pattern",
    [
        ("fc1", "sequence of group names"),
        (["fc1"], "at least two"),
        (["fc1", "zz"], "'zz'"),
        (["fc1", "fc1"], "repeated"),
        (["fc1", "fc2"], "different sizes"),
    ],
)
def test_tie(names_, pattern):
    with pytest.raises(BAD, match=pattern):
        BayesianMLP(2, [3, 4], 1).spec.tie(names_)


@given(
    case=st.sampled_from(["names str", "name not str", "duplicate", "count", "width", "bias", "symmetry"]),
    width=st.one_of(st.integers(-3, 0), st.floats(0.5, 3.5).filter(lambda v: v != int(v))),
)
def test_mlp_spec(case, width):
    args, kw = (["a", "b", "c"], [2, 3]), {}
    pattern = {
        "names str": "layer_names",
        "name not str": r"layer_names\[1\]",
        "duplicate": "distinct",
        "count": "one hidden size per layer boundary",
        "width": "size|hidden_sizes",
        "bias": "bias",
        "symmetry": "activation_symmetry",
    }[case]
    if case == "names str":
        args = ("abc", [2, 3])
    elif case == "name not str":
        args = (["a", 1, "c"], [2, 3])
    elif case == "duplicate":
        args = (["a", "b", "a"], [2, 3])
    elif case == "count":
        args = (["a", "b", "c"], [2])
    elif case == "width":
        args = (["a", "b", "c"], [2, width])
    elif case == "bias":
        kw = {"bias": "yes"}
    else:
        kw = {"activation_symmetry": "relu"}
    with pytest.raises(BAD, match=pattern):
        ps.mlp_spec(*args, **kw)


@given(hidden=small_hidden, data=st.data())
def test_from_module_unsupported_or_mismatched_layers(hidden, data):
    sizes = [3, *hidden, 2]
    layers = []
    with torch.random.fork_rng(devices=[]):  # nn.Linear's initialization draws from torch's RNG
        for a, b in zip(sizes[:-1], sizes[1:]):
            layers += [nn.Linear(a, b), nn.ReLU()]
        layers = layers[:-1]
        i = data.draw(st.integers(0, len(hidden)), label="layer") * 2
        if data.draw(st.booleans(), label="mismatch"):
            layers[i] = nn.Linear(sizes[i // 2] + 1, sizes[i // 2 + 1])
            pattern = f"'{i}'" if i else "no Linear"
            if i == 0:  # the first layer's input width is free: break the next one instead
                layers[2] = nn.Linear(sizes[1] + 1, sizes[2]) if len(layers) > 2 else layers[2]
                pattern = "'2'" if len(layers) > 2 else None
        else:
            layers.insert(i + 1, nn.Bilinear(2, 2, 2))
            pattern = f"'{i + 1}'"
    if pattern is None:
        return
    with pytest.raises(ps.SpecError, match=names(pattern)):
        ps.PermutationSpec.from_module(nn.Sequential(*layers))


def test_from_module_needs_a_module_with_layers():
    with pytest.raises(TypeError, match="torch.nn.Module"):
        ps.PermutationSpec.from_module(3)
    with pytest.raises(ps.SpecError, match="no Linear or Conv layer"):
        ps.PermutationSpec.from_module(nn.Sequential(nn.ReLU()))


# ---------------------------------------------------------------------------------- flat
@given(hidden=small_hidden, data=st.data())
def test_flat_layout_and_packing(hidden, data):
    model = BayesianMLP(3, hidden, 2)
    layout, w = ps.FlatLayout(model.spec.shapes), params_of(model)
    site = data.draw(st.sampled_from(sorted(w)), label="site")
    kind = data.draw(st.sampled_from(["negative shape", "missing", "shape", "dtype", "not a tensor"]), label="kind")
    if kind == "negative shape":
        with pytest.raises(ps.SpecError, match=names(f"shapes[{site!r}]")):
            ps.FlatLayout({**model.spec.shapes, site: (-1,)})
        return
    if kind == "missing":
        del w[site]
    elif kind == "shape":
        w[site] = randn(tuple(s + 1 for s in w[site].shape))
    elif kind == "dtype":
        w[site] = w[site].double()
    else:
        w[site] = w[site].tolist()
    with pytest.raises(BAD, match=names(repr(site))):
        layout.to_flat(w)


@given(delta=st.integers(-3, 3).filter(bool), kind=st.sampled_from(["length", "float", "range", "batch"]))
def test_apply_flat_and_from_flat(delta, kind):
    spec = BayesianMLP(3, [4], 2, activation="tanh").spec
    layout = ps.FlatLayout(spec.shapes)
    idx = ps.flat_permutation(spec, spec.sample(generator=_DATA), layout)
    flat = randn(layout.dim)
    if kind == "length":
        with pytest.raises(ps.SpecError, match=names("length", layout.dim + delta)):
            ps.apply_flat(randn(layout.dim + delta), idx)
        with pytest.raises(ps.SpecError, match=names("length", layout.dim + delta)):
            layout.from_flat(randn(layout.dim + delta))
    elif kind == "float":
        with pytest.raises(ps.SpecError, match="index must be an integer"):
            ps.apply_flat(flat, idx.float())
    elif kind == "range":
        with pytest.raises(ps.SpecError, match="outside the signed range"):
            ps.apply_flat(flat, idx + delta * layout.dim)
    else:
        with pytest.raises(ps.SpecError, match="do not broadcast"):
            ps.apply_flat(flat.expand(2, -1), idx.expand(abs(delta) + 2, -1))


# ---------------------------------------------------------------------------------- push-forward
@given(hidden=small_hidden, data=st.data())
def test_pushforward_bases(hidden, data):
    spec = BayesianMLP(3, hidden, 2).spec
    base = {k: dist.Normal(torch.zeros(s), 1.0).to_event(len(s)) for k, s in spec.shapes.items()}
    site = data.draw(st.sampled_from(spec.sites), label="site")
    kind = data.draw(st.sampled_from(["missing", "tensor", "log_prob missing", "batch"]), label="kind")
    perm = spec.sample(generator=_DATA)
    if kind == "missing":
        del base[site]
    elif kind == "tensor":
        base[site] = torch.zeros(spec.shapes[site])
    elif kind == "batch":
        base[site] = dist.Normal(torch.zeros((2,) + spec.shapes[site]), 1.0).to_event(len(spec.shapes[site]))
        perm = spec.sample((3,), generator=_DATA)
    if kind == "log_prob missing":
        value = params_of(BayesianMLP(3, hidden, 2))
        del value[site]
        with pytest.raises(ps.SpecError, match=names(repr(site))):
            ps.Pushforward(base, spec, perm).log_prob(value)
        return
    with pytest.raises(BAD, match=names(repr(site))):
        ps.Pushforward(base, spec, perm)


@pytest.mark.parametrize("case", ["no layout", "event shape", "layout type"])
def test_pushforward_flat_base(case):
    spec = BayesianMLP(3, [4], 2).spec
    layout = ps.FlatLayout(spec.shapes)
    base = dist.Normal(torch.zeros(layout.dim + (case == "event shape")), 1.0).to_event(1)
    kw = {"no layout": {}, "event shape": {"layout": layout}, "layout type": {"layout": dict(spec.shapes)}}[case]
    with pytest.raises(BAD, match="layout"):
        ps.Pushforward(base, spec, spec.sample(generator=_DATA), **kw)


@given(case=st.sampled_from(["unfitted", "batched", "other widths", "not a guide"]), extra=st.integers(1, 3))
@settings(max_examples=8)
@pytest.mark.changes_global_state("torch_rng", "param_store")  # the test fits a guide
def test_pushforward_guide(case, extra):
    model = BayesianMLP(3, [4], 2)
    x, y = randn(6, 3), randint(0, 2, (6,))
    guide = AutoNormal(model) if case == "unfitted" else fitted(AutoNormal, model, x, y)
    spec, perm, pattern = model.spec, model.spec.sample(generator=_DATA), None
    if case == "unfitted":
        pattern = "not fitted"
    elif case == "batched":
        perm, pattern = spec.sample((extra,), generator=_DATA), "unbatched"
    elif case == "other widths":
        spec = ps.mlp_spec(["fc1", "fc2"], [4 + extra])
        perm, pattern = spec.sample(generator=_DATA), names("'fc1'", 4 + extra)
    else:
        guide, pattern = 3, "guide"
    with pytest.raises(BAD, match=pattern):
        ps.pushforward_guide(guide, spec, perm)


# ---------------------------------------------------------------------------------- models
mlp_arguments = st.sampled_from(
    ["in_features", "hidden_sizes", "out_features", "prior_scale", "obs_scale", "likelihood", "activation", "bias"]
)


@given(arg=mlp_arguments, data=st.data())
def test_bayesian_mlp_constructor(arg, data):
    kw = dict(in_features=3, hidden_sizes=[4], out_features=2)
    bad = {
        "in_features": bad_count(1).filter(lambda v: v is not None),
        "out_features": bad_count(1).filter(lambda v: v is not None),
        "hidden_sizes": st.one_of(bad_count(1).map(lambda v: [4, v]), st.integers(1, 3)),
        "prior_scale": st.one_of(st.floats(max_value=0.0), nonfinite, st.booleans(), st.text(max_size=2)),
        "obs_scale": st.one_of(st.floats(max_value=0.0), nonfinite, st.text(max_size=2)),
        "likelihood": st.text(max_size=5).filter(lambda v: v not in ("classification", "regression")),
        "activation": st.one_of(st.integers(), st.sampled_from(["swishy", "reLU"])),
        "bias": st.one_of(st.integers(), st.text(max_size=2)),
    }[arg]
    kw[arg] = data.draw(bad, label=arg)
    pattern = {"hidden_sizes": "hidden_sizes|layer sizes", "in_features": "in_features|layer sizes"}.get(arg, arg)
    pattern = {"out_features": "out_features|layer sizes"}.get(arg, pattern)
    with pytest.raises(BAD, match=pattern):
        BayesianMLP(**kw)


@given(
    arg=st.sampled_from(["in_channels", "image_size", "channels", "out_features"]),
    value=st.one_of(st.integers(-2, 0), st.floats(0.5, 2.5), st.text(max_size=2)),
)
def test_bayesian_cnn_constructor(arg, value):
    kw = dict(in_channels=1, image_size=(8, 8), channels=[2], out_features=3)
    kw[arg] = {"image_size": (8, value), "channels": [2, value]}.get(arg, value)
    with pytest.raises(BAD, match=arg):
        BayesianCNN(**kw)


@given(hidden=small_hidden, data=st.data())
def test_model_forward_data(hidden, data):
    model = BayesianMLP(3, hidden, 2)
    x, y = randn(5, 3), randint(0, 2, (5,))
    kind = data.draw(st.sampled_from(["features", "int x", "nan x", "1-d x", "y length", "label", "num_data"]))
    kw = {}
    if kind == "features":
        x, pattern = randn(5, 3 + data.draw(st.sampled_from([-2, -1, 1, 2]))), "x has shape"
    elif kind == "int x":
        x, pattern = x.long(), "x must be a floating-point"
    elif kind == "nan x":
        x, pattern = poke(x, data, data.draw(nonfinite)), "x contains NaN or Inf"
    elif kind == "1-d x":
        x, pattern = x[0], "x has shape"
    elif kind == "y length":
        y, pattern = y[: data.draw(st.integers(0, 4))], "y has shape"
    elif kind == "label":
        y, pattern = poke(y, data, data.draw(st.sampled_from([-1, 2, 7]))), "class labels"
    else:
        kw, pattern = {"num_data": data.draw(st.integers(-2, 4))}, "num_data"
    with pytest.raises(BAD, match=pattern):
        model(x, y, **kw)


@given(channels=small_hidden, data=st.data())
def test_cnn_forward_images(channels, data):
    model = BayesianCNN(2, (4, 4), list(channels[:2]), 3)
    shape = [5, 2, 4, 4]
    axis = data.draw(st.integers(1, 3), label="axis")
    shape[axis] += data.draw(st.sampled_from([-1, 1, 2]))
    x = randn(shape) if data.draw(st.booleans(), label="4-d") else randn(shape[1:])
    with pytest.raises(ps.SpecError, match=names("x has shape", "(N, 2, 4, 4)")):
        model(x)


@given(hidden=small_hidden, cnn=st.booleans(), data=st.data())
def test_functional_params(hidden, cnn, data):
    model = BayesianCNN(1, (4, 4), list(hidden[:2]), 2) if cnn else BayesianMLP(3, hidden, 2)
    x = randn(5, 1, 4, 4) if cnn else randn(5, 3)
    w = params_of(model)
    site = data.draw(st.sampled_from(model.site_names), label="site")
    kind = data.draw(st.sampled_from(["missing", "shape", "dtype", "batch"]), label="kind")
    if kind == "missing":
        del w[site]
    elif kind == "shape":
        w[site] = reshaped(w[site], data.draw(st.integers(0, w[site].dim() - 1)), 1)
    elif kind == "dtype":
        w[site] = w[site].double()
    else:
        other = data.draw(st.sampled_from([s for s in model.site_names if s != site]))
        w[site], w[other] = w[site].expand((2,) + w[site].shape), w[other].expand((3,) + w[other].shape)
        site = "do not broadcast"
    with pytest.raises(BAD, match=names(site)):
        model.functional(w, x)


# ---------------------------------------------------------------------------------- posteriors
@given(hidden=small_hidden, data=st.data())
def test_gaussian_and_point_params(hidden, data):
    model = BayesianMLP(3, hidden, 2)
    q = gaussian_of(model)
    site = data.draw(st.sampled_from(sorted(q)), label="site")
    loc, scale = q[site]
    kind = data.draw(st.sampled_from(["nan loc", "nan scale", "negative scale", "shape", "int loc", "point nan"]))
    reader = ps.gaussian_params
    if kind == "nan loc":
        q[site], pattern = (poke(loc, data, data.draw(nonfinite)), scale), f"loc[{site!r}]"
    elif kind == "nan scale":
        q[site], pattern = (loc, poke(scale, data, data.draw(nonfinite))), f"scale[{site!r}]"
    elif kind == "negative scale":
        q[site], pattern = (loc, poke(scale, data, -data.draw(st.floats(1e-3, 10.0)))), repr(site)
    elif kind == "shape":
        q[site], pattern = (loc, scale.reshape(-1)[:-1] if scale.numel() > 1 else scale.expand(2)), repr(site)
    elif kind == "int loc":
        q[site], pattern = (loc.long(), scale), repr(site)
    else:
        q = {k: v[0] for k, v in q.items()}
        q[site], pattern, reader = poke(q[site], data, data.draw(nonfinite)), f"params[{site!r}]", ps.point_params
    with pytest.raises(BAD, match=names(pattern)):
        reader(q)


@pytest.mark.parametrize("guide_cls", [AutoNormal, AutoDiagonalNormal])
def test_unfitted_guides(guide_cls):
    model = BayesianMLP(3, [4], 2)
    guide = guide_cls(model)
    for call in (ps.gaussian_params, ps.point_params, lambda g: ps.align(g, g, model.spec)):
        with pytest.raises(ps.SpecError, match="not fitted"):
            call(guide)
    with pytest.raises(ps.SpecError, match="not fitted"):
        D.to_inference_data([guide, guide], num_samples=4)


@pytest.mark.parametrize(
    "q, pattern",
    [({}, "empty"), ({"a": (torch.zeros(2), torch.ones(2)), "b": torch.zeros(2)}, "mixes"), ({"a": [1.0]}, "'a'")],
)
def test_posterior_forms(q, pattern):
    with pytest.raises(ps.SpecError, match=pattern):
        ps.point_params(q)


# ---------------------------------------------------------------------------------- alignment
@given(hidden=small_hidden, act=activations, data=st.data())
def test_align_posteriors(hidden, act, data):
    model = BayesianMLP(3, hidden, 2, activation=act)
    q0, q1 = gaussian_of(model, 0), gaussian_of(model, 1)
    site = data.draw(st.sampled_from(model.spec.sites), label="site")
    loc, scale = q1[site]
    kind = data.draw(st.sampled_from(["nan", "shape", "dtype", "int", "missing"]), label="kind")
    if kind == "nan":
        q1[site] = (poke(loc, data, data.draw(nonfinite)), scale)
    elif kind == "shape":
        ax = moved_axis(model.spec, site, data)
        q1[site] = (reshaped(loc, ax, 1), reshaped(scale, ax, 1).abs())
    elif kind == "dtype":
        q1[site] = (loc.double(), scale.double())
    elif kind == "int":
        q1 = {k: v[0].long() for k, v in q1.items()}
        q0 = {k: v[0].long() for k, v in q0.items()}
    else:
        del q1[site]
    who = data.draw(st.sampled_from(["align", "align_many", "interpolate"]), label="entry point")
    label = {"align_many": "posteriors[1]"}.get(who, "q1")
    if kind == "int" and who == "interpolate":
        return  # integer points interpolate by picking an endpoint (BatchNorm counters)
    call = {
        "align": lambda: ps.align(q0, q1, model.spec, method="weights" if kind == "int" else "wasserstein"),
        "align_many": lambda: ps.align_many([q0, q1], model.spec, method="weights" if kind == "int" else "wasserstein"),
        "interpolate": lambda: ps.interpolate(q0, q1, 0.5),
    }[who]
    pattern = names(repr(site)) if kind != "int" else names("floating-point")
    if kind in ("nan", "dtype") or (kind == "shape" and who != "interpolate"):
        pattern = names(label, repr(site))
    with pytest.raises(BAD, match=pattern):
        call()


align_options = st.sampled_from(["max_sweeps", "seed", "compute_dtype", "method", "init", "signs", "max_iters"])


@given(option=align_options, data=st.data())
def test_alignment_options(option, data):
    model = BayesianMLP(3, [4, 3], 2)
    q0, q1 = gaussian_of(model, 0), gaussian_of(model, 1)
    value = data.draw(
        {
            "max_sweeps": bad_count(0),
            "max_iters": bad_count(1),
            "seed": st.one_of(st.floats(allow_nan=True), st.text(min_size=1, max_size=2)),
            "compute_dtype": st.sampled_from([torch.int64, torch.bool, "float32", 32]),
            "method": st.text(max_size=5).filter(lambda m: m not in ("wasserstein", "weights")),
            "init": st.one_of(
                st.text(max_size=4).filter(lambda s: s not in ("greedy", "identity")),
                st.just({"fc1": torch.tensor([0, 0, 1, 2]), "fc2": torch.arange(3)}),
                st.just({"fc1": torch.arange(4)}),
            ),
            "signs": st.sampled_from(["yes", 1, None]),
        }[option],
        label=option,
    )
    if option == "max_iters":
        call = lambda: ps.align_many([q0, q1], model.spec, reference="barycenter", max_iters=value)  # noqa: E731
    else:
        call = lambda: ps.align(q0, q1, model.spec, **{option: value})  # noqa: E731
    with pytest.raises(BAD, match=option):
        call()


@pytest.mark.parametrize("case", ["empty spec", "spec type", "other widths", "empty runs", "reference", "not a list"])
def test_alignment_specs_and_runs(case):
    model = BayesianMLP(3, [4], 2)
    q = [gaussian_of(model, 0), gaussian_of(model, 1)]
    call, pattern = {
        "empty spec": (lambda: ps.align(*q, ps.PermutationSpec({})), "no neuron groups"),
        "spec type": (lambda: ps.align(*q, "fc1"), "PermutationSpec"),
        "other widths": (lambda: ps.align(*q, ps.mlp_spec(["fc1", "fc2"], [5])), names("'fc1'", 5)),
        "empty runs": (lambda: ps.align_many([], model.spec), "empty"),
        "reference": (lambda: ps.align_many(q, model.spec, reference=2), "reference"),
        "not a list": (lambda: ps.align_many(q[0], model.spec), "sequence"),
    }[case]
    with pytest.raises(BAD, match=pattern):
        call()


@given(hidden=small_hidden, data=st.data())
def test_align_samples(hidden, data):
    model = BayesianMLP(3, hidden, 2, activation="tanh")
    samples = params_of(model, batch=(2, 3))
    site = data.draw(st.sampled_from(model.spec.sites), label="site")
    kind = data.draw(st.sampled_from(["nan", "int", "batch", "event", "reference"]), label="kind")
    reference = None
    if kind == "nan":
        samples[site] = poke(samples[site], data, data.draw(nonfinite))
    elif kind == "int":
        samples[site] = samples[site].long()
    elif kind == "batch":
        samples[site] = randn((3, 2) + model.spec.shapes[site])
    elif kind == "event":
        samples[site] = reshaped(samples[site], 2 + moved_axis(model.spec, site, data), 1)
    else:
        reference = params_of(model)
        reference[site] = reshaped(reference[site], moved_axis(model.spec, site, data), 1)
    with pytest.raises(BAD, match=names(repr(site))):
        ps.align_samples(samples, model.spec, reference)


@given(t=st.one_of(st.floats(1.0, 10.0, exclude_min=True), st.floats(max_value=0.0, exclude_max=True), nonfinite))
def test_interpolate_t(t):
    q = gaussian_of(BayesianMLP(2, [3], 1))
    with pytest.raises(ValueError, match="t must"):
        ps.interpolate(q, q, t)


@given(
    case=st.sampled_from(["num_points", "nonfinite loss", "tensor loss", "not callable"]),
    num_points=bad_count(2),
    bad=nonfinite,
    size=st.integers(2, 4),
)
def test_loss_barrier(case, num_points, bad, size):
    q = gaussian_of(BayesianMLP(2, [3], 1))
    loss, n, pattern = (lambda p: 1.0), 3, "loss_fn"
    if case == "num_points":
        n, pattern = num_points, "num_points"
    elif case == "nonfinite loss":
        loss = lambda p: bad  # noqa: E731
    elif case == "tensor loss":
        loss = lambda p: torch.ones(size)  # noqa: E731
    else:
        loss = "nll"
    with pytest.raises(BAD, match=pattern):
        ps.loss_barrier(loss, q, q, n)


@given(
    case=st.sampled_from(["rows", "nan x", "labels", "num_samples", "seed", "obs_scale", "x type"]),
    data=st.data(),
)
def test_predictive_losses(case, data):
    model = BayesianMLP(3, [4], 2)
    x, y = randn(6, 3), randint(0, 2, (6,))
    kw, make = {}, ps.gaussian_nll_loss
    if case == "rows":
        y, pattern = y[: data.draw(st.integers(1, 5))], "rows"
    elif case == "nan x":
        x, pattern = poke(x, data, data.draw(nonfinite)), "x contains NaN"
    elif case == "labels":
        y, pattern = poke(y, data, data.draw(st.sampled_from([-1, 2, 5]))), "class labels"
    elif case == "num_samples":
        kw, pattern = {"num_samples": data.draw(bad_count(1))}, "num_samples"
    elif case == "seed":
        kw, pattern = {"seed": data.draw(st.text(min_size=1, max_size=2))}, "seed"
    elif case == "obs_scale":
        model = BayesianMLP(3, [4], 1, likelihood="regression")
        y, pattern = randn(6), "obs_scale"
        kw = {"obs_scale": data.draw(st.one_of(st.floats(max_value=0.0), nonfinite))}
    else:
        x, pattern = x.tolist(), "x must be a torch.Tensor"
    with pytest.raises(BAD, match=pattern):
        make(model, x, y, **kw)


# ---------------------------------------------------------------------------------- scaling
@given(hidden=small_hidden, data=st.data())
def test_flip_signs_and_rescale(hidden, data):
    tanh, relu = BayesianMLP(3, hidden, 2, activation="tanh"), BayesianMLP(3, hidden, 2, activation="relu")
    g = data.draw(st.sampled_from(sorted(tanh.spec.groups)), label="group")
    n = tanh.spec.groups[g].size
    kind = data.draw(st.sampled_from(["sign value", "sign on relu", "scale on tanh", "nan scale", "int params"]))
    if kind == "sign value":
        signs = poke(torch.ones(n), data, data.draw(st.sampled_from([0.0, 2.0, -0.5, math.nan])))
        call = lambda: ps.flip_signs(params_of(tanh), tanh.spec, {g: signs})  # noqa: E731
        pattern = names(f"signs[{g!r}]", "+1/-1")
    elif kind == "sign on relu":
        call = lambda: ps.flip_signs(params_of(relu), relu.spec, {g: rand(n) < 0.5})  # noqa: E731
        pattern = names(f"signs[{g!r}]", "activation_symmetry='scale'")
    elif kind == "scale on tanh":
        call = lambda: ps.rescale(params_of(tanh), tanh.spec, {g: torch.zeros(n)})  # noqa: E731
        pattern = names(f"log_scales[{g!r}]", "activation_symmetry='sign'")
    elif kind == "nan scale":
        u = poke(torch.zeros(n), data, data.draw(nonfinite))
        call = lambda: ps.rescale(params_of(relu), relu.spec, {g: u})  # noqa: E731
        pattern = names(f"log_scales[{g!r}]", "NaN or Inf")
    else:
        w = {k: v.round().long() for k, v in params_of(relu).items()}
        call = lambda: ps.rescale(w, relu.spec, {g: torch.zeros(n)})  # noqa: E731
        pattern = names("floating-point")
    with pytest.raises(BAD, match=pattern):
        call()


@given(hidden=small_hidden, data=st.data())
def test_min_mass_and_canonicalize_weights(hidden, data):
    model = BayesianMLP(3, hidden, 2, activation="relu")
    w = params_of(model, batch=(2,))
    site = data.draw(st.sampled_from(model.spec.sites), label="site")
    kind = data.draw(st.sampled_from(["nan", "int", "shape", "batch"]), label="kind")
    if kind == "nan":
        w[site] = poke(w[site], data, data.draw(nonfinite))
    elif kind == "int":
        w[site] = w[site].long()
    elif kind == "shape":
        w[site] = reshaped(w[site], 1 + moved_axis(model.spec, site, data), 1)
    else:
        w[site] = randn((3,) + model.spec.shapes[site])
    call = data.draw(st.sampled_from(["min_mass", "canonicalize sort", "canonicalize align"]), label="entry point")
    fn = {
        "min_mass": lambda: ps.min_mass(w, model.spec),
        "canonicalize sort": lambda: ps.canonicalize(w, model.spec, permutation="sort"),
        "canonicalize align": lambda: ps.canonicalize(w, model.spec, scaling=False),
    }[call]
    with pytest.raises(BAD, match=names("batch shapes") if kind == "batch" else names(repr(site))):
        fn()


scaling_options = st.sampled_from(["tol", "max_iters", "chunk_size", "sites", "permutation", "reference", "seed"])


@given(option=scaling_options, data=st.data())
def test_scaling_options(option, data):
    model = BayesianMLP(3, [4], 2, activation="relu")
    w = params_of(model, batch=(2,))
    value = data.draw(
        {
            "tol": st.one_of(st.floats(max_value=0.0), st.just(math.nan), st.text(min_size=1, max_size=2)),
            "max_iters": bad_count(0).filter(lambda v: v is not None),
            "chunk_size": bad_count(1).filter(lambda v: v is not None),
            "sites": st.just("fc1.weight"),
            "permutation": st.text(max_size=4).filter(lambda p: p not in ("align", "sort")),
            "reference": st.one_of(st.integers(), st.text(max_size=3).filter(lambda r: r != "barycenter")),
            "seed": st.one_of(st.floats(allow_nan=True), st.text(min_size=1, max_size=2)),
        }[option],
        label=option,
    )
    if option in ("tol", "max_iters", "chunk_size", "sites"):
        call = lambda: ps.min_mass(w, model.spec, **{option: value})  # noqa: E731
    else:
        call = lambda: ps.canonicalize(w, model.spec, **{option: value})  # noqa: E731
    with pytest.raises(BAD, match=option):
        call()


@pytest.mark.parametrize(
    "case",
    [
        "no scale group",
        "empty batch",
        "empty mapping",
        "spec type",
        "sort groups",
        "apply to nothing",
        "mmd of nothing",
    ],
)
def test_empty_and_mismatched_inputs(case):
    relu, tanh = BayesianMLP(3, [4], 2), BayesianMLP(3, [4], 2, activation="tanh")
    call, pattern = {
        "no scale group": (lambda: ps.min_mass(params_of(tanh), tanh.spec), "activation_symmetry='scale'"),
        "empty batch": (lambda: ps.min_mass(params_of(relu, batch=(0,)), relu.spec), "empty batch"),
        "empty mapping": (lambda: ps.canonicalize({}, relu.spec), "non-empty mapping"),
        "spec type": (lambda: ps.flip_signs(params_of(tanh), tanh.spec.groups, {}), "PermutationSpec"),
        "sort groups": (lambda: ps.sort_permutation(params_of(relu), relu.spec, groups=["fc7"]), "'fc7'"),
        "apply to nothing": (lambda: relu.spec.apply({}, relu.spec.identity()), "empty"),
        "mmd of nothing": (lambda: D.mmd({}, {}), "empty"),
    }[case]
    with pytest.raises(BAD, match=pattern):
        call()


# ---------------------------------------------------------------------------------- diagnostics
@given(data=st.data())
def test_mmd(data):
    g = torch.Generator().manual_seed(data.draw(st.integers(0, 9)))
    x, y = torch.randn(8, 3, generator=g), torch.randn(9, 3, generator=g)
    kind = data.draw(st.sampled_from(["nan", "perms", "bandwidths", "num_bandwidths", "ratio", "seed", "dim", "n"]))
    kw, side = {"num_permutations": 20}, data.draw(st.sampled_from(["x", "y"]))
    if kind == "nan":
        pattern = f"{side} contains NaN"
        if side == "x":
            x = poke(x, data, data.draw(nonfinite))
        else:
            y = poke(y, data, data.draw(nonfinite))
    elif kind == "perms":
        kw, pattern = {"num_permutations": data.draw(bad_count(1))}, "num_permutations"
    elif kind == "bandwidths":
        bw = data.draw(st.lists(st.one_of(st.floats(max_value=0.0), nonfinite), min_size=0, max_size=2))
        kw, pattern = {**kw, "bandwidths": bw}, "bandwidths"
    elif kind == "num_bandwidths":
        kw, pattern = {**kw, "num_bandwidths": data.draw(bad_count(1))}, "num_bandwidths"
    elif kind == "ratio":
        kw, pattern = {**kw, "bandwidth_ratio": data.draw(st.one_of(st.floats(max_value=0.0), nonfinite))}, "ratio"
    elif kind == "seed":
        kw, pattern = {**kw, "seed": data.draw(st.text(min_size=1, max_size=2))}, "seed"
    elif kind == "dim":
        y, pattern = y[:, : data.draw(st.integers(1, 2))], "dimension"
    else:
        x, pattern = x[: data.draw(st.integers(0, 1))], "at least 2 samples"
    with pytest.raises(BAD, match=pattern):
        D.mmd(x, y, **kw)


@given(hidden=small_hidden, data=st.data())
def test_mmd_sample_dicts(hidden, data):
    model = BayesianMLP(3, hidden, 2)
    x, y = params_of(model, 0, (6,)), params_of(model, 1, (6,))
    site = data.draw(st.sampled_from(sorted(x)), label="site")
    if data.draw(st.booleans(), label="drop"):
        del y[site]
    else:
        y[site] = randn((6,) + tuple(s + 1 for s in model.spec.shapes[site]))
    with pytest.raises(ps.SpecError, match=names(repr(site))):
        D.mmd(x, y, num_permutations=10, symmetry_aware=data.draw(st.booleans()), spec=model.spec)


metric_functions = st.sampled_from(["accuracy", "nll", "brier_score", "expected_calibration_error", "evaluate"])


@given(fn=metric_functions, data=st.data())
def test_metrics(fn, data):
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(3, 6, 4, generator=g)
    probs, labels = logits.softmax(-1), torch.randint(0, 4, (6,), generator=g)
    kind = data.draw(st.sampled_from(["logits", "unnormalized", "nan", "int", "labels", "label count"]))
    if kind == "logits":
        probs, pattern = logits - 3.0, r"\[0, 1\]"
    elif kind == "unnormalized":
        probs, pattern = probs * data.draw(st.floats(0.2, 0.9)), "sum to 1"
    elif kind == "nan":
        probs, pattern = poke(probs, data, math.nan), r"\[0, 1\]"
    elif kind == "int":
        probs, pattern = (probs > 0.5).long(), "floating-point"
    elif kind == "labels":
        labels, pattern = poke(labels, data, data.draw(st.sampled_from([-1, 4, 9]))), "labels"
    else:
        labels, pattern = labels[: data.draw(st.integers(0, 5))], "labels"
    with pytest.raises(BAD, match=pattern):
        getattr(M, fn)(probs, labels)


@given(case=st.sampled_from(["num_bins", "tpr", "nan score", "ood classes"]), data=st.data())
def test_metric_options(case, data):
    probs = randn(2, 5, 3).softmax(-1)
    labels = torch.tensor([0, 1, 2, 0, 1])
    if case == "num_bins":
        call, pattern = lambda: M.expected_calibration_error(probs, labels, data.draw(bad_count(1))), "num_bins"
    elif case == "tpr":
        tpr = data.draw(st.one_of(st.floats(max_value=0.0), st.floats(1.0, 5.0, exclude_min=True), nonfinite))
        call, pattern = lambda: M.fpr_at_tpr(rand(5), rand(4), tpr), "tpr"
    elif case == "nan score":
        call, pattern = lambda: M.aupr(rand(5), poke(rand(4), data, math.nan)), "scores_out"
    else:
        ood = randn(2, 4, data.draw(st.sampled_from([2, 4]))).softmax(-1)
        call, pattern = lambda: M.evaluate(probs, labels, ood), "classes"
    with pytest.raises(BAD, match=pattern):
        call()


@given(hidden=small_hidden, data=st.data())
@settings(max_examples=15)
def test_to_inference_data(hidden, data):
    model = BayesianMLP(3, hidden, 2)
    runs = [gaussian_of(model, r) for r in range(3)]
    kind = data.draw(st.sampled_from(["num_samples", "seed", "align", "nan chain", "sites", "scale", "runs"]))
    kw, pattern = {"num_samples": 4}, None
    if kind == "num_samples":
        kw, pattern = {"num_samples": data.draw(bad_count(1))}, "num_samples"
    elif kind == "seed":
        kw, pattern = {**kw, "seed": data.draw(st.text(min_size=1, max_size=2))}, "seed"
    elif kind == "align":  # the reference (align= is its deprecated spelling)
        kw, pattern = {**kw, "reference": data.draw(st.text(max_size=4))}, "reference"
    elif kind == "nan chain":
        r, site = data.draw(st.integers(0, 2)), data.draw(st.sampled_from(sorted(runs[0])))
        runs = [params_of(model, i, (4,)) for i in range(3)]
        runs[r][site] = poke(runs[r][site], data, data.draw(nonfinite))
        pattern = names(f"chain {r}", repr(site))
    elif kind == "sites":
        site = data.draw(st.sampled_from(sorted(runs[0])))
        del runs[2][site]
        pattern = names("chain 2", site)
    elif kind == "scale":
        site = data.draw(st.sampled_from(sorted(runs[0])))
        loc, scale = runs[1][site]
        runs[1][site], pattern = (loc, -scale), names(repr(site), "negative")
    else:
        runs, pattern = data.draw(st.sampled_from([[], runs[0], [3, 4]])), "runs"
    with pytest.raises(BAD, match=pattern):
        D.to_inference_data(runs, **kw)


def test_rhat_needs_chains_and_draws():
    model = BayesianMLP(3, [4], 2)
    with pytest.raises(ValueError, match="2 chains"):
        D.rhat_ess(D.collect_draws([gaussian_of(model)], num_samples=8))
    with pytest.raises(ValueError, match="4 draws"):
        D.rhat_ess(D.collect_draws([gaussian_of(model, r) for r in range(3)], num_samples=3))
    with pytest.raises(ValueError, match="var_names"):
        D.rhat_ess(D.collect_draws([gaussian_of(model, r) for r in range(3)], num_samples=5), var_names=["fc9"])


report_options = st.sampled_from(
    ["reference", "barrier_points", "barrier_pairs", "mi_samples", "mmd_permutations", "num_samples", "loss_fn", "data"]
)


@given(option=report_options, data=st.data())
@settings(max_examples=15)
def test_symmetry_report_options(option, data):
    model = BayesianMLP(3, [4], 2)
    runs = [gaussian_of(model, r) for r in range(3)]
    value = data.draw(
        {
            "reference": st.text(max_size=4),
            "barrier_points": bad_count(2),
            "barrier_pairs": bad_count(0),
            "mi_samples": bad_count(1),
            "mmd_permutations": bad_count(1),
            "num_samples": bad_count(1),
            "loss_fn": st.sampled_from(["nll", 3]),
            "data": st.sampled_from([torch.zeros(3), (torch.zeros(3, 3),), "xy"]),
        }[option],
        label=option,
    )
    with pytest.raises(BAD, match=option):
        D.symmetry_report(runs, model.spec, progress=False, **{option: value})


# ---------------------------------------------------------------------------------- training
def _make_model():
    return BayesianMLP(3, [4], 2)


train_options = st.sampled_from(["num_runs", "steps", "seed", "num_threads", "optim", "make_model", "make_guide"])


@given(option=train_options, data=st.data())
@settings(max_examples=15)
def test_train_runs_options(option, data):
    kw = dict(make_model=_make_model, make_guide=AutoNormal, num_runs=2, steps=2)
    value = data.draw(
        {
            "num_runs": bad_count(1),
            "steps": bad_count(1),
            "seed": st.one_of(st.floats(allow_nan=True), st.text(min_size=1, max_size=2)),
            "num_threads": bad_count(1).filter(lambda v: v is not None),
            "optim": st.sampled_from([3, "adam", torch.optim.Adam]),
            "make_model": st.sampled_from([3, "mlp", lambda: 3]),
            "make_guide": st.sampled_from([3, lambda m: "guide"]),
        }[option],
        label=option,
    )
    kw[option] = value
    x, y = randn(5, 3), randint(0, 2, (5,))
    with pytest.raises(BAD, match=option):
        ps.train_runs(data=(x, y), progress=False, vectorize=False, **kw)


@given(data=st.data())
@settings(max_examples=8)
def test_train_runs_data_and_divergence(data):
    x, y = randn(5, 3), randint(0, 2, (5,))
    if data.draw(st.booleans(), label="nan data"):
        x = poke(x, data, data.draw(nonfinite))
        with pytest.raises(ValueError, match=names("data[0]", "NaN or Inf")):
            ps.train_runs(_make_model, AutoNormal, (x, y), 2, steps=2, progress=False)
        return
    # A learning rate of 1e30 sends the parameters (and the loss) to Inf/NaN within a few steps.
    optim = pyro.optim.Adam({"lr": 1e30})
    vectorize = data.draw(st.booleans(), label="vectorize")
    with pytest.raises(ValueError, match="diverged"):
        ps.train_runs(_make_model, AutoNormal, (x, y), 2, steps=4, optim=optim, progress=False, vectorize=vectorize)
