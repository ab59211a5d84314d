"""What users naturally pass to the alignment entry points: tensors that require grad
(``dict(net.named_parameters())``, a guide's live parameters), meta-device and
mixed-device tensors, renamed, extra and reshaped sites. Each case either works (results
detached, except :func:`interpolate`, which is differentiable) or raises an error that
names the argument, the site and what is wrong."""

import re
from operator import attrgetter

import pyro
import pytest
import torch
from pyro.infer.autoguide import AutoNormal
from torch import nn

import pyro_symmetry as ps
from pyro_symmetry import _validation
from pyro_symmetry.models import BayesianMLP


def _net(seed=0):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 5), nn.Tanh(), nn.Linear(5, 2)).double()


def _names(*parts):
    return "(?s)" + "".join(f"(?=.*{re.escape(str(p))})" for p in parts)


def _no_grad(tree):
    """Every tensor in a nested result is detached."""
    if torch.is_tensor(tree):
        return not tree.requires_grad
    if isinstance(tree, dict):
        return all(_no_grad(v) for v in tree.values())
    if isinstance(tree, (list, tuple)):
        return all(_no_grad(v) for v in tree)
    return True


class _OnCuda(torch.Tensor):
    """A CPU tensor that reports a CUDA device: exercises the mixed-device checks without a GPU."""

    @property
    def device(self):
        return torch.device("cuda", 0)


# ---------------------------------------------------------------------------- requires grad
@pytest.mark.filterwarnings("error")  # e.g. "Converting a tensor with requires_grad=True to a scalar"
def test_named_parameters_align_detached():
    """``dict(net.named_parameters())`` aligns like its detached values; results carry no graph."""
    net0, net1 = _net(0), _net(1)
    spec = ps.PermutationSpec.from_module(net0)
    p0, p1 = dict(net0.named_parameters()), dict(net1.named_parameters())
    d0, d1 = ({k: v.detach() for k, v in p.items()} for p in (p0, p1))
    res, ref = ps.align(p0, p1, spec, method="weights", seed=0), ps.align(d0, d1, spec, method="weights", seed=0)
    assert res.objective == ref.objective and all(
        torch.equal(res.permutation[g], ref.permutation[g]) for g in spec.groups
    )
    assert _no_grad(res.aligned) and all(torch.equal(res.aligned[k], ref.aligned[k]) for k in d1)
    # the documented way to carry a gradient: apply the permutation to the live tensors
    moved = spec.apply(p1, res.permutation)
    assert moved["0.weight"].requires_grad and torch.equal(moved["0.weight"].detach(), ref.aligned["0.weight"])

    many = ps.align_many([p0, p1, d1], spec, method="weights", reference="barycenter", seed=0)
    assert _no_grad(many.aligned) and _no_grad(many.barycenter) and not many.objective.requires_grad
    assert all(torch.equal(many.aligned[1][k], many.aligned[2][k]) for k in d1)

    samples = {k: torch.stack([p0[k], p1[k]]) for k in p0}  # a (2, *shape) batch that requires grad
    for reference in (None, "barycenter", p0):
        res = ps.align_samples(samples, spec, reference, seed=0)
        assert _no_grad(res.aligned) and _no_grad(res.reference) and not res.objective.requires_grad
        assert torch.equal(
            res.aligned["0.weight"][1],
            ps.align_samples({k: v.detach() for k, v in samples.items()}, spec, reference, seed=0).aligned["0.weight"][
                1
            ],
        )


def _fitted_autonormal():
    model = BayesianMLP(3, [4], 2, activation="tanh")
    x, y = torch.randn(10, 3, generator=torch.Generator().manual_seed(0)), torch.tensor([0, 1] * 5)
    pyro.set_rng_seed(0)
    guide = AutoNormal(model)
    svi = pyro.infer.SVI(model, guide, pyro.optim.Adam({"lr": 0.05}), pyro.infer.Trace_ELBO())
    for _ in range(3):
        svi.step(x, y)
    return model, guide


@pytest.mark.filterwarnings("error")
def test_guide_live_parameters_align_and_give_a_detached_barrier():
    """An AutoNormal's live ``locs`` (leaves that require grad) and softplus scales (not leaves)."""
    model, guide = _fitted_autonormal()
    locs = {k: attrgetter(k)(guide.locs) for k in model.site_names}
    pairs = {k: (locs[k], attrgetter(k)(guide.scales)) for k in model.site_names}
    assert all(v.requires_grad for v in locs.values()) and all(v[1].requires_grad for v in pairs.values())
    g = model.spec.sample(generator=torch.Generator().manual_seed(1))
    moved = ps.align(pairs, pairs, model.spec).aligned  # identity, detached copies
    moved_loc = model.spec.apply({k: v[0] for k, v in moved.items()}, g)
    for q0, q1, method in ((locs, moved_loc, "weights"), (pairs, pairs, "wasserstein"), (guide, pairs, "wasserstein")):
        res = ps.align(q0, q1, model.spec, method=method)
        assert _no_grad(res.aligned) and _no_grad(res.permutation)
    res = ps.align(locs, moved_loc, model.spec, method="weights")
    assert all(torch.equal(res.permutation[k], model.spec.inverse(g)[k]) for k in g)
    assert ps.align_many([pairs, guide], model.spec).objective.tolist() == [0.0, 0.0]

    seen = []

    def loss(q):  # the barrier's loss gets values, not a graph to build on
        seen.append(_no_grad(q))
        return float(sum(v[0].sum() + v[1].sum() for v in q.values()))

    res = ps.loss_barrier(loss, pairs, guide, num_points=3)
    assert seen == [True] * 3 and res.barrier == pytest.approx(0.0, abs=1e-5)
    # a loss that returns a tensor built on parameters that require grad: its value, no warning
    weight = torch.nn.Parameter(torch.tensor(2.0))
    res = ps.loss_barrier(lambda q: weight * q["fc1.bias"][0].sum(), pairs, pairs, num_points=3)
    assert res.barrier == 0.0 and res.losses[0] == 2 * float(pairs["fc1.bias"][0].detach().sum())


def test_interpolate_is_differentiable_in_both_forms():
    """``q_t`` keeps the inputs' graph: d q_t / d q0 = 1 - t and d q_t / d q1 = t, for
    points and for (loc, scale) pairs alike (the pairs were detached before)."""
    gen = torch.Generator().manual_seed(0)
    a, b = (torch.randn(3, 2, generator=gen, dtype=torch.float64).requires_grad_() for _ in range(2))
    s0, s1 = (torch.rand(3, 2, generator=gen, dtype=torch.float64).requires_grad_() for _ in range(2))
    t = 0.3
    for q0, q1, leaves in (({"w": a}, {"w": b}, (a, b)), ({"w": (a, s0)}, {"w": (b, s1)}, (a, b, s0, s1))):
        out = ps.interpolate(q0, q1, t)["w"]
        total = out.sum() if torch.is_tensor(out) else out[0].sum() + 2 * out[1].sum()
        grads = torch.autograd.grad(total, leaves)
        expect = [1 - t, t, 2 * (1 - t), 2 * t]
        for gr, e in zip(grads, expect):
            assert torch.allclose(gr, torch.full_like(gr, e), rtol=1e-12)


# ---------------------------------------------------------------------------- devices
def _entry_points(q0, q1, spec):
    return {
        "align": (lambda: ps.align(q0, q1, spec, method="weights"), "q1"),
        "align_many": (lambda: ps.align_many([q0, q1], spec, method="weights"), "posteriors[1]"),
        "align_samples": (lambda: ps.align_samples({k: v.unsqueeze(0) for k, v in q1.items()}, spec), "samples"),
        "align_samples reference": (
            lambda: ps.align_samples({k: v.unsqueeze(0) for k, v in q0.items()}, spec, q1),
            "reference",
        ),
        "interpolate": (lambda: ps.interpolate(q0, q1, 0.5), "q1"),
        "loss_barrier": (lambda: ps.loss_barrier(lambda q: 0.0, q0, q1, num_points=3), "q1"),
    }


@pytest.mark.parametrize("site", ["0.weight", "2.bias", "4.bias"])
@pytest.mark.parametrize(
    "who", ["align", "align_many", "align_samples", "align_samples reference", "interpolate", "loss_barrier"]
)
def test_meta_tensors_are_refused_with_the_argument_and_site(who, site):
    """``nn.Module`` built under ``torch.device("meta")`` (or from ``to_empty``-less loading)
    holds no values: a ValueError that says so, not torch's RuntimeError from ``.item()``."""
    net = _net()
    spec = ps.PermutationSpec.from_module(net)
    q0 = {k: v.detach() for k, v in net.named_parameters()}
    q1 = {**q0, site: torch.empty(q0[site].shape, dtype=q0[site].dtype, device="meta")}
    call, label = _entry_points(q0, q1, spec)[who]
    with pytest.raises(ValueError, match=_names(f"{label}[{site!r}]", "meta device", "holds no values")):
        call()


def test_a_whole_meta_network_and_gaussian_pairs():
    with torch.device("meta"):
        net = _net()
    spec = ps.PermutationSpec.from_module(_net())
    q = dict(net.named_parameters())
    with pytest.raises(ValueError, match=_names("q0['0.weight']", "meta device")):
        ps.align(q, q, spec, method="weights")
    pairs = {k: (v, v.abs()) for k, v in q.items()}
    with pytest.raises(ValueError, match=_names("q0['0.weight'] loc", "meta device")):
        ps.align(pairs, pairs, spec)
    with pytest.raises(ValueError, match=_names("loc['0.weight']", "meta device")):
        ps.gaussian_params(pairs)
    with pytest.raises(ValueError, match=_names("params['0.weight']", "meta device")):
        ps.point_params(q)


@pytest.mark.parametrize(
    "who", ["align", "align_many", "align_samples reference", "interpolate", "loss_barrier", "within q1"]
)
def test_mixed_devices_name_both_arguments_and_devices(who):
    net = _net()
    spec = ps.PermutationSpec.from_module(net)
    q0 = {k: v.detach() for k, v in net.named_parameters()}
    q1 = {k: v.as_subclass(_OnCuda) for k, v in q0.items()}
    if who == "within q1":  # one posterior on two devices; a site no group moves
        call, first, second = lambda: ps.align(q0, {**q0, "4.bias": q1["4.bias"]}, spec, method="weights"), "q1", "q1"
    else:
        call, label = _entry_points(q0, q1, spec)[who]
        first, second = label, {"align_many": "posteriors[0]", "align_samples reference": "samples"}.get(who, "q0")
    with pytest.raises(ValueError, match=_names(first, second, "cuda:0", "cpu", "one device")):
        call()


def test_shared_device_check():
    """``check_devices`` is the one place meta and mixed devices are refused; the other
    validation helpers go through it."""
    check_devices, check_finite = _validation.check_devices, _validation.check_finite
    check_params, check_same_device_dtype = _validation.check_params, _validation.check_same_device_dtype
    cpu, meta = torch.zeros(2), torch.zeros(2, device="meta")
    fake = torch.zeros(2).as_subclass(_OnCuda)
    assert check_devices({}) is None and check_devices({"a": cpu, "b": 1.0}) == torch.device("cpu")
    with pytest.raises(ValueError, match=_names("params['w']", "meta device", "materialize")):
        check_devices({"x": cpu, "params['w']": meta})
    with pytest.raises(ValueError, match=_names("y is on device cuda:0", "x is on cpu")):
        check_devices({"x": cpu, "y": fake})
    with pytest.raises(ValueError, match="meta device"):
        check_finite("w", meta)
    with pytest.raises(ValueError, match="meta device"):
        check_same_device_dtype({"w": meta})
    spec = ps.mlp_spec(["fc1", "fc2"], [2])
    params = {"fc1.weight": torch.zeros(2, 3), "fc1.bias": torch.zeros(2), "fc2.weight": torch.zeros(1, 2)}
    with pytest.raises(ValueError, match=_names("params['fc1.bias']", "meta device")):
        check_params({**params, "fc1.bias": torch.zeros(2, device="meta")}, spec)
    with pytest.raises(ValueError, match=_names("params['fc2.weight']", "cuda:0", "params['fc1.weight']", "cpu")):
        check_params({**params, "fc2.weight": params["fc2.weight"].as_subclass(_OnCuda)}, spec)


# ---------------------------------------------------------------------------- sites
def _points(seed=0):
    net = _net(seed)
    return ps.PermutationSpec.from_module(net), {k: v.detach() for k, v in net.named_parameters()}


def test_renamed_sites_are_named_with_the_posterior_and_its_sites():
    spec, q = _points()
    renamed = {k.replace("2.", "mid."): v for k, v in q.items()}
    have, have_q = str(sorted(renamed)), str(sorted(q))
    for call, message, sites in (
        (lambda: ps.align(q, renamed, spec, method="weights"), "'2.weight' is missing from q1", have),
        (lambda: ps.align(renamed, q, spec, method="weights"), "'2.weight' is missing from q0", have),
        (
            lambda: ps.align_many([q, q, renamed], spec, method="weights"),
            "'2.weight' is missing from posteriors[2]",
            have,
        ),
        (
            lambda: ps.align_samples({k: v[None] for k, v in q.items()}, spec, renamed),
            "'2.weight' is missing from reference",
            have,
        ),
        (
            lambda: ps.align_samples({k: v[None] for k, v in renamed.items()}, spec),
            "'2.weight' is missing from samples",
            have,
        ),
        (lambda: ps.interpolate(q, renamed, 0.5), "'2.weight' is missing from q1", have),
        (lambda: ps.interpolate(renamed, q, 0.5), "'mid.weight' is missing from q1", have_q),
    ):
        with pytest.raises(ps.SpecError, match=_names("site " + message, sites)):
            call()


def test_extra_and_reshaped_sites_are_errors_not_silently_left_out():
    """A site only one posterior has, or a site no group moves with two shapes, would drop
    out of the objective (and of the aligned result) without a word."""
    spec, q = _points()
    extra = {**q, "noise": torch.ones(2, dtype=torch.float64)}
    reshaped = {**q, "4.bias": torch.zeros(3, dtype=torch.float64)}
    for call, pattern in (
        (lambda: ps.align(q, extra, spec, method="weights"), ("site 'noise' is missing from q0", "q1 has it")),
        (lambda: ps.align(extra, q, spec, method="weights"), ("site 'noise' is missing from q1", "q0 has it")),
        (lambda: ps.align_many([q, extra], spec, method="weights"), ("'noise'", "posteriors[0]")),
        (lambda: ps.interpolate(q, extra, 0.5), ("site 'noise' is missing from q0",)),
        (lambda: ps.align(q, reshaped, spec, method="weights"), ("site '4.bias'", "(3,) in q1", "(2,) in q0")),
        (lambda: ps.align_many([q, reshaped], spec, method="weights"), ("'4.bias'", "(3,) in posteriors[1]")),
        (lambda: ps.interpolate(q, reshaped, 0.5), ("site '4.bias'", "(3,) in q1", "(2,) in q0")),
        (
            lambda: ps.align(q, {**q, "0.weight": torch.zeros(4, 2, dtype=torch.float64)}, spec, method="weights"),
            ("site '0.weight'", "(4, 2) in q1", "(4, 3) in q0"),
        ),
        (
            lambda: ps.align_samples({k: v[None] for k, v in q.items()}, spec, {**q, "2.bias": torch.zeros(4)}),
            ("site '2.bias'", "(4,) in reference", "event shape (5,)"),
        ),
    ):
        with pytest.raises(ps.SpecError, match=_names(*pattern)):
            call()


def test_posterior_form_errors_name_the_argument():
    spec, q = _points()
    model = BayesianMLP(3, [4], 2)
    for call, pattern in (
        (lambda: ps.align(q, [1, 2], spec, method="weights"), ("q1 must be a fitted", "list")),
        (lambda: ps.align_many([q, {}], spec, method="weights"), ("posteriors[1] is an empty mapping",)),
        (lambda: ps.align(q, {**q, "0.bias": "x"}, spec, method="weights"), ("site '0.bias' of q1 is a str",)),
        (lambda: ps.interpolate(AutoNormal(model), q, 0.5), ("q0 (AutoNormal) is not fitted",)),
        (
            lambda: ps.align({k: (v, -v.abs()) for k, v in q.items()}, q, spec, method="weights"),
            ("site '0.weight' of q0", "negative"),
        ),
    ):
        with pytest.raises(ps.SpecError, match=_names(*pattern)):
            call()
