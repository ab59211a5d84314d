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
