"""Alignment on real architectures: attention (nested groups on axis slices), residual
networks, activation matching, BatchNorm resets along interpolation paths.

The references are independent of the engine: costs of every element of the wreath
product (``spec.elements()`` of the attention family, applied with ``spec.apply`` in
float64), planted elements recovered exactly, and functions evaluated with the network.
"""

import pytest
import torch
from architectures import ViT

import pyro_symmetry as ps
from pyro_symmetry.groups import Axis, NeuronGroup, PermutationSpec

H, D = 3, 2  # heads, head dim (the default)


def _shapes(h=H, d=D):
    e = h * d
    return {"in_w": (3 * e, e), "in_b": (3 * e,), "out_w": (e, e)}


def _attention_family(v_signed=False, h=H, d=D):
    """Heads of a fused in-projection ``(3E, E)`` (+ bias) and out-projection ``(E, E)``: heads
    move as blocks of ``D`` rows of the q, k and v slices and ``D`` columns of ``out``; within each
    head the q and k rows share one signed permutation, the v rows and out columns another."""
    sl = lambda site, k, inner=d, axis=0: Axis(site, axis, inner=inner, start=k * h * d)  # noqa: E731
    return {
        "heads": NeuronGroup(
            h,
            incoming=[sl("in_w", 0), sl("in_w", 1), sl("in_w", 2), sl("in_b", 0), sl("in_b", 1), sl("in_b", 2)],
            outgoing=[Axis("out_w", 1, inner=d)],
        ),
        "qk": NeuronGroup(
            d,
            incoming=[sl("in_w", 0, 1), sl("in_b", 0, 1)],
            outgoing=[sl("in_w", 1, 1), sl("in_b", 1, 1)],
            activation_symmetry="sign",
            parent="heads",
        ),
        "v": NeuronGroup(
            d,
            incoming=[sl("in_w", 2, 1), sl("in_b", 2, 1)],
            outgoing=[Axis("out_w", 1)],
            activation_symmetry="sign" if v_signed else "none",
            parent="heads",
        ),
    }


SHAPES = _shapes()


def _family_spec(v_signed=False, h=H, d=D):
    return PermutationSpec(_attention_family(v_signed, h, d), _shapes(h, d))


def _full_spec():
    """The family plus a stream group reading the in-projection's columns, writing out's rows."""
    groups = _attention_family()
    groups["stream"] = NeuronGroup(H * D, incoming=[Axis("out_w", 0)], outgoing=[Axis("in_w", 1)])
    return PermutationSpec(groups, SHAPES)


def _random(shapes, gen, dtype=torch.float64):
    return {k: torch.randn(s, generator=gen, dtype=dtype) for k, s in shapes.items()}


def _costs(spec, q0, q1, elements, sd=None):
    """``||q0 - g.q1||^2`` (+ the sds' term) for every stacked element, float64."""
    moved = spec.apply(q1, elements)
    out = sum((q0[k] - moved[k]).pow(2).flatten(1).sum(-1) for k in q0)
    if sd is not None:
        sd0, sd1 = sd
        unsigned = {k: ps.decode_signed(p)[0] for k, p in elements.items()}
        msd = spec.apply(sd1, unsigned)
        out = out + sum((sd0[k] - msd[k]).pow(2).flatten(1).sum(-1) for k in sd0)
    return out


@pytest.mark.parametrize("v_signed,h", [(False, 3), (True, 2)])
@pytest.mark.parametrize("method", ["weights", "wasserstein"])
@pytest.mark.parametrize("seed", range(3))
def test_one_family_step_is_the_brute_force_optimum(v_signed, h, method, seed):
    """With the family as the only group, one joint step from the identity reaches the minimum
    over all of ``S_D wr S_H`` (q/k signed, v signed or not)."""
    spec = _family_spec(v_signed, h)
    SHAPES = _shapes(h)
    gen = torch.Generator().manual_seed(seed)
    mu0, mu1 = _random(SHAPES, gen), _random(SHAPES, gen)
    if method == "wasserstein":
        sd0 = {k: torch.rand(s, generator=gen, dtype=torch.float64) for k, s in SHAPES.items()}
        sd1 = {k: torch.rand(s, generator=gen, dtype=torch.float64) for k, s in SHAPES.items()}
        q0 = {k: (mu0[k], sd0[k]) for k in SHAPES}
        q1 = {k: (mu1[k], sd1[k]) for k in SHAPES}
        sd = (sd0, sd1)
    else:
        q0, q1, sd = mu0, mu1, None
    elements = spec.elements()
    assert next(iter(elements.values())).shape[0] == spec.order
    costs = _costs(spec, mu0, mu1, elements, sd)
    res = ps.align(q0, q1, spec, method=method, init="identity", max_sweeps=1)
    got = _costs(spec, mu0, mu1, {k: v.unsqueeze(0) for k, v in res.permutation.items()}, sd)[0]
    assert abs(res.objective[-1] - float(got)) < 1e-9 * float(got)
    assert float(got) <= float(costs.min()) * (1 + 1e-12)
    # the greedy start ends at the same optimum (the family is solved jointly, exactly)
    greedy = ps.align(q0, q1, spec, method=method)
    assert greedy.objective[-1] <= float(costs.min()) * (1 + 1e-12)


@pytest.mark.parametrize("seed", range(3))
def test_alignment_with_a_stream_is_a_coordinate_wise_optimum(seed):
    """Each block of coordinates (the family; the stream group) is optimal with the other held
    at the returned solution, against enumeration of that block."""
    spec = _full_spec()
    gen = torch.Generator().manual_seed(seed)
    q0, q1 = _random(SHAPES, gen), _random(SHAPES, gen)
    res = ps.align(q0, q1, spec, method="weights", seed=seed)
    assert res.converged
    sol = res.permutation
    best = res.objective[-1]
    fam = _family_spec().elements()
    n = next(iter(fam.values())).shape[0]
    trial = {**{k: v.expand(n, *v.shape) for k, v in sol.items()}, **fam}
    assert float(_costs(spec, q0, q1, trial).min()) >= best * (1 - 1e-12)
    stream = PermutationSpec({"stream": spec.groups["stream"]}, SHAPES).elements()["stream"]
    trial = {**{k: v.expand(stream.shape[0], *v.shape) for k, v in sol.items()}, "stream": stream}
    assert float(_costs(spec, q0, q1, trial).min()) >= best * (1 - 1e-12)


def _planted(spec, params, seed, noise):
    gen = torch.Generator().manual_seed(seed)
    g = spec.sample(generator=gen)
    moved = spec.apply(params, g)
    noisy = {
        k: v + noise * v.abs().mean() * torch.randn(v.shape, generator=gen, dtype=v.dtype) for k, v in moved.items()
    }
    return g, noisy


def _is_identity(spec, element):
    return all(torch.equal(element[k], v) for k, v in spec.identity().items())


def _vit_and_transformer():
    torch.manual_seed(0)
    vit = ViT(image=8, patch=4, dim=8, depth=2, heads=2, mlp=12).eval()
    vit_spec = PermutationSpec.from_module(vit, example_inputs=(torch.randn(2, 3, 8, 8),))
    tr = ps.models.transformer(5, 4, 3, dim=8, depth=2, heads=2, mlp=12).eval()
    tr_spec = ps.models.BayesianTransformer(5, 4, 3, dim=8, depth=2, heads=2, mlp=12).spec
    return [(vit, vit_spec, torch.randn(4, 3, 8, 8)), (tr, tr_spec, torch.randn(4, 5, 4))]


@pytest.mark.parametrize("which", [0, 1])
@pytest.mark.parametrize("method", ["weights", "wasserstein"])
def test_planted_element_of_a_transformer_is_recovered(which, method):
    net, spec, x = _vit_and_transformer()[which]
    assert any(spec.children(g) for g in spec.top_level)  # nested heads present
    params = {k: v.detach().double() for k, v in net.named_parameters()}
    for seed in range(3):
        g, moved = _planted(spec, params, seed, 1e-3)
        if method == "wasserstein":
            sd = {k: 0.1 + 0.01 * v.abs() for k, v in params.items()}
            sd1 = spec.apply(sd, {k: ps.decode_signed(p)[0] for k, p in g.items()})
            q0 = {k: (params[k], sd[k]) for k in params}
            q1 = {k: (moved[k], sd1[k]) for k in params}
        else:
            q0, q1 = params, moved
        res = ps.align(q0, q1, spec, method=method, seed=seed)
        assert _is_identity(spec, spec.compose(res.permutation, g)), f"seed {seed}"
        assert res.converged


def test_planted_element_keeps_the_function():
    """The recovered element maps the moved network back to the original function."""
    net, spec, x = _vit_and_transformer()[0]
    params = {k: v.detach() for k, v in net.named_parameters()}
    g, _ = _planted(spec, params, 0, 0.0)
    moved = spec.apply(params, g)
    res = ps.align(params, moved, spec, method="weights")
    back = spec.apply(moved, res.permutation)
    with torch.no_grad():
        expected = net(x)
        got = torch.func.functional_call(net, back, (x,))
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)


def test_alignment_reads_the_group_action_only():
    """No module of alignment/ imports a private name of groups/ or reads the raw axis tuples,
    ``spec.site_moves`` or the activation-symmetry string (it asks ``spec.action(site)`` and
    ``group.signed``/``group.scalable``)."""
    import ast
    import pathlib

    root = pathlib.Path(ps.__file__).parent / "alignment"
    banned = {"incoming", "outgoing", "site_moves", "activation_symmetry", "_check_element", "_resolved"}
    for path in sorted(root.glob("*.py")):
        tree = ast.parse(path.read_text())
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom):
                parts = (node.module or "").split(".")
                if "groups" in parts:
                    after = parts[parts.index("groups") + 1 :]
                    assert not any(p.startswith("_") for p in after), (path.name, node.module)
                    assert not any(a.name.startswith("_") for a in node.names), (path.name, node.module)
            if isinstance(node, ast.Attribute):
                assert node.attr not in banned, (path.name, node.lineno, node.attr)


# ---------------------------------------------------------------------------- constrained latents
def _noise_model(x, y=None):
    import pyro
    import pyro.distributions as dist

    w = pyro.sample("w", dist.Normal(0.0, 1.0).expand([3]).to_event(1))
    sigma = pyro.sample("sigma", dist.LogNormal(0.0, 1.0))
    with pyro.plate("data", x.shape[0]):
        pyro.sample("obs", dist.Normal(x @ w, sigma), obs=y)


def _fit(seed, x, y):
    import pyro
    from pyro.infer.autoguide import AutoNormal

    pyro.set_rng_seed(seed)
    guide = AutoNormal(_noise_model, init_scale=0.5)
    svi = pyro.infer.SVI(_noise_model, guide, pyro.optim.Adam({"lr": 0.05}), pyro.infer.Trace_ELBO())
    for _ in range(5):
        svi.step(x, y)
    return guide


def test_interpolated_points_keep_the_guides_transforms():
    """A learned positive noise scale: its (loc, scale) live in the guide's unconstrained space;
    the interpolated point, the aligned run and the barrier's path map draws to the model's space
    with the guide's transform (before: the loss saw the unconstrained value)."""
    import pyro

    gen = torch.Generator().manual_seed(0)
    x = torch.randn(20, 3, generator=gen)
    y = x @ torch.tensor([1.0, -2.0, 0.5]) + 0.1 * torch.randn(20, generator=gen)
    with pyro.get_param_store().scope():
        g0 = _fit(0, x, y)
    with pyro.get_param_store().scope():
        g1 = _fit(1, x, y)
    # Push the noise scale's unconstrained loc below zero: exp(loc) is still a valid scale.
    for g, v in ((g0, -2.0), (g1, -1.0)):
        g.locs.sigma.data.fill_(v)
    mid = ps.interpolate(g0, g1, 0.5)
    assert isinstance(mid["sigma"], tuple)  # still a mapping site -> (loc, scale)
    assert float(mid["sigma"][0].detach()) == pytest.approx(-1.5)
    draws = ps.as_posterior(mid).draws(200, generator=torch.Generator().manual_seed(0))
    assert bool((draws["sigma"] > 0).all())
    loss = ps.nll_loss(_noise_model, x, y, num_samples=8)
    res = ps.loss_barrier(loss, g0, g1, num_points=3)
    assert torch.isfinite(res.losses).all()
    assert float(res.losses[0]) == pytest.approx(loss(g0), rel=1e-12)
    assert float(res.losses[-1]) == pytest.approx(loss(g1), rel=1e-12)
    # aligned runs and barycenters keep them too (no group acts on these sites)
    spec = PermutationSpec({"h": NeuronGroup(3, incoming=[("w", -1)])})
    aligned = ps.align(g0, g1, spec).aligned
    assert set(ps.as_posterior(aligned).transforms) == {"sigma"}
    many = ps.align_many([g0, g1], spec)
    assert set(ps.as_posterior(many.barycenter).transforms) == {"sigma"}
    assert float(ps.loss_barrier(loss, many.aligned[0], many.aligned[1], 3).losses[0]) == pytest.approx(loss(g0))


def test_posteriors_in_different_spaces_are_refused():
    from pyro_symmetry.alignment.inputs import Marginals

    q = {"s": (torch.zeros(2), torch.ones(2))}
    a = Marginals(q, {"s": torch.distributions.ExpTransform()})
    b = Marginals(q, {"s": torch.distributions.SigmoidTransform()})
    with pytest.raises(ValueError, match="site 's' is mapped"):
        ps.interpolate(a, b, 0.5)
    assert ps.as_posterior(ps.interpolate(a, q, 0.5)).transforms == {"s": torch.distributions.ExpTransform()}


# ---------------------------------------------------------------------------- ResNets, many runs
def _resnet_runs(num_runs, noise, seed=0):
    """A small BatchNorm ResNet (``ps.models.resnet``, spec of ``BayesianResNet``) with random
    running statistics, and ``num_runs`` copies moved by planted elements (plus noise)."""
    torch.manual_seed(seed)
    net = ps.models.resnet(1, 4, blocks=(1, 1, 1), norm="batchnorm").double().eval()
    for m in net.modules():
        if isinstance(m, torch.nn.BatchNorm2d) and m.running_mean is not None:
            m.running_mean.normal_()
            m.running_var.uniform_(0.5, 2.0)
    spec = ps.models.BayesianResNet(1, (8, 8), 4, blocks=(1, 1, 1)).spec
    params = {k: v.clone() for k, v in net.state_dict().items()}
    gen = torch.Generator().manual_seed(seed + 1)
    planted = [spec.identity()] + [spec.sample(generator=gen) for _ in range(num_runs - 1)]
    runs = []
    for g in planted:
        moved = spec.apply(params, g)
        runs.append(
            {
                k: v + noise * torch.randn(v.shape, generator=gen, dtype=v.dtype) if v.is_floating_point() else v
                for k, v in moved.items()
            }
        )
    return net, spec, params, planted, runs


def test_align_many_recovers_planted_resnet_runs_and_keeps_the_function():
    net, spec, params, planted, runs = _resnet_runs(3, 1e-4)
    x = torch.randn(5, 1, 8, 8, dtype=torch.float64)
    for reference in (0, "barycenter"):
        res = ps.align_many(runs, spec, reference=reference, method="weights", seed=0)
        for r, g in enumerate(planted):
            assert _is_identity(spec, spec.compose(res.permutations[r], g)), (reference, r)
        assert res.converged and res.objective.dtype == torch.float64 and res.objective.shape == (3,)
        with torch.no_grad():
            for r in range(3):
                got = torch.func.functional_call(net, res.aligned[r], (x,))
                torch.testing.assert_close(got, net(x), rtol=1e-2, atol=1e-2)
        assert len(repr(res)) < 200


def test_align_samples_on_a_resnet_undoes_label_switching():
    net, spec, params, planted, runs = _resnet_runs(4, 0.0)
    stacked = {k: torch.stack([r[k] for r in runs]) for k in spec.sites}
    res = ps.align_samples(stacked, spec)
    for b in range(4):
        assert _is_identity(spec, spec.compose({k: v[b] for k, v in res.permutation.items()}, planted[b]))
        for k in spec.sites:
            torch.testing.assert_close(res.aligned[k][b], params[k], rtol=0, atol=1e-12)
    assert res.converged is True and res.objective.dtype == torch.float64
    assert len(repr(res)) < 200


def test_result_reprs_are_short():
    net, spec, params, planted, runs = _resnet_runs(2, 0.0)
    res = ps.align(runs[0], runs[1], spec, method="weights")
    assert repr(res).startswith("AlignmentResult(") and len(repr(res)) < 200
    assert isinstance(res.objective, list) and all(isinstance(v, float) for v in res.objective)
    assert repr(res.aligned).startswith("Marginals(point") and len(repr(res.aligned)) < 300
    barrier = ps.loss_barrier(lambda q: float(sum(v.double().sum() for v in q.values())), runs[0], runs[1], 3)
    assert repr(barrier).startswith("BarrierResult(") and len(repr(barrier)) < 200


# ---------------------------------------------------------------------------- BatchNorm reset
def _bn_net(seed):
    torch.manual_seed(seed)
    net = torch.nn.Sequential(
        torch.nn.Conv2d(1, 3, 3), torch.nn.BatchNorm2d(3), torch.nn.ReLU(), torch.nn.Flatten(), torch.nn.Linear(12, 2)
    ).double()
    net[1].running_mean.normal_()
    net[1].running_var.uniform_(0.5, 2.0)
    net[1].weight.data.normal_()
    return net.eval()


def _hand_reset(net0, net1, t, x):
    """The conv output's batch mean and unbiased variance per channel, at the lerped conv."""
    w = torch.lerp(net0[0].weight, net1[0].weight, t).detach()
    b = torch.lerp(net0[0].bias, net1[0].bias, t).detach()
    h = torch.nn.functional.conv2d(x, w, b)
    return h.mean((0, 2, 3)), h.var((0, 2, 3), unbiased=True)


def test_barrier_recomputes_batchnorm_statistics_at_every_point():
    net0, net1 = _bn_net(0), _bn_net(1)
    x = torch.randn(16, 1, 4, 4, dtype=torch.float64)
    from pyro_symmetry._state import snapshot

    stats0 = net0[1].running_mean.clone()
    before = snapshot()
    mid = ps.interpolate(net0, net1, 0.5, data=x)
    mean, var = _hand_reset(net0, net1, 0.5, x)
    torch.testing.assert_close(mid["1.running_mean"], mean, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(mid["1.running_var"], var, rtol=1e-12, atol=1e-12)
    plain = ps.interpolate(net0, net1, 0.5, data=x, reset_bn=False)
    torch.testing.assert_close(plain["1.running_mean"], (net0[1].running_mean + net1[1].running_mean) / 2)
    seen = []

    def loss(q):
        seen.append({k: v.clone() for k, v in q.items()})
        with torch.no_grad():
            return float(torch.func.functional_call(net0, dict(q), (x,)).pow(2).mean())

    res = ps.loss_barrier(loss, net0, net1, num_points=3, data=x)
    for t, q in zip((0.0, 0.5, 1.0), seen):
        mean, var = _hand_reset(net0, net1, t, x)
        torch.testing.assert_close(q["1.running_mean"], mean, rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(q["1.running_var"], var, rtol=1e-12, atol=1e-12)
    # the barrier is computed from those losses; without data, from the interpolated statistics
    assert float(res.losses[1]) == pytest.approx(loss(seen[1]))
    stale = ps.loss_barrier(loss, net0, net1, num_points=3)
    assert float(stale.losses[1]) != pytest.approx(float(res.losses[1]))
    assert not net0.training and torch.equal(net0[1].running_mean, stats0)  # the caller's network: untouched
    assert snapshot() == before
    with pytest.raises(ValueError, match="needs data="):
        ps.interpolate(net0, net1, 0.5, reset_bn=True)
    with pytest.raises(ValueError, match="nn.Module with BatchNorm"):
        ps.interpolate(dict(net0.state_dict()), net1, 0.5, data=x, reset_bn=True)


# ---------------------------------------------------------------------------- activation matching
def _moved_copy(net, spec, g):
    import copy

    other = copy.deepcopy(net)
    other.load_state_dict(spec.apply(dict(net.state_dict()), g))
    return other


@pytest.mark.parametrize("act", [torch.nn.ReLU, torch.nn.Tanh])
def test_activation_matching_recovers_a_planted_mlp_permutation(act):
    torch.manual_seed(0)
    net = torch.nn.Sequential(
        torch.nn.Linear(4, 8), act(), torch.nn.Linear(8, 6), act(), torch.nn.Linear(6, 3)
    ).double()
    spec = PermutationSpec.from_module(net)
    x = torch.randn(64, 4, dtype=torch.float64)
    for seed in range(3):
        g = spec.sample(generator=torch.Generator().manual_seed(seed))
        other = _moved_copy(net, spec, g)
        res = ps.align(net, other, spec, method="activations", data=x)
        assert _is_identity(spec, spec.compose(res.permutation, g))
        assert res.objective[-1] == pytest.approx(0.0, abs=1e-20) and res.objective[0] > 0
        with torch.no_grad():
            got = torch.func.functional_call(net, dict(res.aligned), (x,))
            torch.testing.assert_close(got, net(x), rtol=1e-12, atol=1e-12)


def test_activation_matching_on_a_resnet_sums_the_stream():
    net, spec, params, planted, runs = _resnet_runs(2, 0.0)
    x = torch.randn(32, 1, 8, 8, dtype=torch.float64)
    other = _moved_copy(net, spec, planted[1])
    res = ps.align(net, other, spec, method="activations", data=[x[:16], x[16:]])
    assert _is_identity(spec, spec.compose(res.permutation, planted[1]))
    with torch.no_grad():
        got = torch.func.functional_call(net, dict(res.aligned), (x,))
        torch.testing.assert_close(got, net(x), rtol=1e-10, atol=1e-10)
    # points of the network (a state dict) with module=
    res2 = ps.align(dict(net.state_dict()), dict(other.state_dict()), spec, method="activations", data=x, module=net)
    assert _is_identity(spec, spec.compose(res2.permutation, planted[1]))


def test_activation_matching_says_what_it_cannot_do():
    net, spec, *_ = _vit_and_transformer()[0]
    with pytest.raises(ps.SpecError, match="nested groups"):
        ps.align(net, net, spec, method="activations", data=torch.randn(2, 3, 8, 8))
    mlp = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.ReLU(), torch.nn.Linear(4, 2))
    spec = ps.mlp_spec(["a", "b"], [4])  # its sites are not the module's parameters
    params = {"a.weight": torch.randn(4, 3), "a.bias": torch.randn(4), "b.weight": torch.randn(2, 4)}
    params["b.bias"] = torch.randn(2)
    with pytest.raises(ps.SpecError, match="group 'a'"):
        ps.align(params, params, spec, method="activations", data=torch.randn(5, 3), module=mlp)
    with pytest.raises(ValueError, match="needs data="):
        ps.align(mlp, mlp, ps.PermutationSpec.from_module(mlp), method="activations")


@pytest.mark.parametrize("seed", range(3))
def test_a_parent_with_its_own_entries_is_solved_with_its_nested_groups(seed):
    """Heads with a per-head gate (``(H,)``, no nested group on it) and a per-head block of
    ``D`` columns no nested group covers: the parent's own similarity and the nested groups'
    assignments are optimized jointly, one step from the identity reaching the brute-force minimum."""
    groups = _attention_family(False, 3, 2)
    heads = groups["heads"]
    groups["heads"] = NeuronGroup(
        heads.size,
        incoming=[*heads.incoming, Axis("gate", 0)],
        outgoing=[*heads.outgoing, Axis("extra", 1, inner=2)],
    )
    shapes = {**_shapes(3, 2), "gate": (3,), "extra": (4, 6)}
    spec = PermutationSpec(groups, shapes)
    gen = torch.Generator().manual_seed(seed)
    q0, q1 = _random(shapes, gen), _random(shapes, gen)
    q1["gate"] = 5 * q1["gate"]  # the gate matters: the heads' own similarity is not negligible
    elements = spec.elements()
    best = float(_costs(spec, q0, q1, elements).min())
    res = ps.align(q0, q1, spec, method="weights", init="identity", max_sweeps=1)
    assert res.objective[-1] <= best * (1 + 1e-12)
