"""Scaling symmetries of networks with norm layers, on specs built by ``from_module``.

The rule (issue 11, item 6; documented in ``min_mass`` and ``canonicalize``): the per-channel
scale of a layer whose output goes straight into a BatchNorm is normalized away (a free
symmetry of the train-mode function, along which the mass is unbounded below: Laurent et al.
note min-mass is degenerate there). ``from_module`` marks those axes (the pre-norm rows, their
bias, the running statistics) *passive*: permuted with the channel, never rescaled. The
channel's scaling symmetry is carried by the norm's affine weight and bias and the next
layers' columns, and that is what ``rescale`` / ``min_mass`` / ``canonicalize`` act on.

Checked here, in float64 and eval mode: any per-group log-scales keep the function of
ResNets and transformers; passive entries never move; ``min_mass`` is finite, converged,
never above the input mass, reports exactly the brute-force mass of its input and output,
and reaches the minimum a generic optimizer (scipy L-BFGS on the brute-force mass of
``rescale``) finds; the canonical form is the same for every element of an orbit (the
attention's nested q/k and v groups get a sign convention per head and dim). DenseNet and
U-Net concatenations make groups act on slices of the next layers' axes: those sites are
cut into blocks on which every scaled axis is whole (``scaling._axes.pieces``).
"""

from __future__ import annotations

import functools

import numpy as np
import pytest
import torch
from architectures import DenseNetTiny, NormMLP, ResNet18, ResNet20, UNetTiny, ViT
from hypothesis import given, settings
from scipy.optimize import minimize
from strategies import seeds
from torch import nn
from torch.func import functional_call

import pyro_symmetry as ps
from pyro_symmetry.models.resnet import resnet
from pyro_symmetry.models.transformer import transformer

ARCHS = {
    "resnet20": (lambda: ResNet20(blocks=1), (4, 3, 8, 8)),
    "resnet18": (lambda: ResNet18(width=4), (2, 3, 32, 32)),
    "models.resnet": (lambda: resnet(3, 10, blocks=(1, 1, 1)), (4, 3, 8, 8)),
    "models.resnet-nonorm": (lambda: resnet(3, 10, blocks=(1, 1, 1), norm="none"), (4, 3, 8, 8)),
    "vit": (lambda: ViT(), (3, 3, 8, 8)),
    "models.transformer": (lambda: transformer(4, 5, 3), (3, 4, 5)),
    "batchnorm-mlp": (lambda: NormMLP(norm="batch"), (5, 3)),
    "layernorm-mlp": (lambda: NormMLP(norm="layer"), (5, 3)),
    # concatenation: groups act on slices of the next BatchNorm / conv / linear's axes
    "densenet-bn": (lambda: DenseNetTiny(batchnorm=True), (3, 2, 6, 6)),
    "densenet": (lambda: DenseNetTiny(), (3, 2, 6, 6)),
    "unet": (lambda: UNetTiny(), (2, 2, 8, 8)),
}
NO_PASSIVE = {"models.resnet-nonorm", "layernorm-mlp", "densenet", "unet"}  # no norm right after a layer
RESNETS = ["resnet20", "resnet18", "models.resnet", "models.resnet-nonorm"]


@functools.cache
def _setup(name: str):
    """``(net, x, spec, state)``: a float64 eval-mode net with random norm affines and
    running statistics (so no scale is trivially 1), its spec from ``from_module``, and its
    parameters and buffers."""
    make, shape = ARCHS[name]
    gen = torch.Generator().manual_seed(sum(map(ord, name)))
    with torch.random.fork_rng():
        torch.manual_seed(0)
        net = make().double().eval()
    with torch.no_grad():
        for m in net.modules():
            if isinstance(m, (nn.BatchNorm1d, nn.BatchNorm2d, nn.LayerNorm)) and m.weight is not None:
                m.weight.copy_(torch.randn(m.weight.shape, generator=gen, dtype=torch.float64))
                m.bias.copy_(torch.randn(m.bias.shape, generator=gen, dtype=torch.float64))
            if getattr(m, "running_mean", None) is not None:
                m.running_mean.copy_(torch.randn(m.running_mean.shape, generator=gen, dtype=torch.float64))
                m.running_var.copy_(torch.rand(m.running_var.shape, generator=gen, dtype=torch.float64) + 0.5)
    x = torch.randn(shape, generator=gen, dtype=torch.float64)
    spec = ps.PermutationSpec.from_module(net, example_inputs=(x,))
    state = {k: v.detach().clone() for k, v in {**dict(net.named_parameters()), **dict(net.named_buffers())}.items()}
    return net, x, spec, state


def _scalable(spec: ps.PermutationSpec) -> list[str]:
    return [k for k, g in spec.groups.items() if g.scalable]


def _out(name: str, params) -> torch.Tensor:
    net, x, _, _ = _setup(name)
    return functional_call(net, params, (x,))


def _brute_mass(params, sites) -> float:
    """``sum of squared entries`` of the sites, in float64 numpy (independent of the library)."""
    return float(sum(np.square(params[s].detach().double().numpy()).sum() for s in sites))


@pytest.mark.parametrize("name", list(ARCHS))
@settings(max_examples=5)
@given(seed=seeds)
def test_any_log_scales_keep_the_function(name, seed):
    net, x, spec, state = _setup(name)
    groups = _scalable(spec)
    assert groups, f"{name}: from_module found no scaling symmetry"
    gen = torch.Generator().manual_seed(seed)
    u = {k: 3 * torch.randn(spec.unit_shape(k), generator=gen, dtype=torch.float64) for k in groups}
    new = ps.rescale(state, spec, u)
    y0, y1 = _out(name, state), _out(name, new)
    assert torch.allclose(y1, y0, rtol=1e-9, atol=1e-9 * float(y0.abs().max())), (y1 - y0).abs().max()
    # the weights did move (the test is not vacuous)
    assert any(not torch.equal(new[s], state[s]) for s in spec.sites)


@pytest.mark.parametrize("name", list(ARCHS))
def test_passive_entries_are_never_rescaled(name):
    """Each group rescaled alone changes no site where it acts only passively (pre-BatchNorm
    rows and biases, running statistics, the residual stream's writers before a norm)."""
    _, _, spec, state = _setup(name)
    checked = 0
    for g in _scalable(spec):
        u = {g: torch.full(spec.unit_shape(g), 0.7, dtype=torch.float64)}
        new = ps.rescale(state, spec, u)
        for site in spec.sites:
            roles = {s.role for s in spec.action(site).spans_of(g)}
            if roles == {"passive"}:
                assert torch.equal(new[site], state[site]), (g, site)
                checked += 1
            elif roles & {"incoming", "outgoing"}:
                assert not torch.equal(new[site], state[site]), (g, site)
    if name not in NO_PASSIVE:
        assert checked, f"{name}: no passive axis found (the spec should mark the pre-norm rows passive)"


@pytest.mark.parametrize("name", list(ARCHS))
def test_min_mass_reports_the_brute_force_mass_and_keeps_the_function(name):
    _, _, spec, state = _setup(name)
    res = ps.min_mass(state, spec)
    sites = ps.mass_sites(spec)
    before, after = _brute_mass(state, sites), _brute_mass(res.params, sites)
    assert bool(res.converged) and res.mass_after.dtype == torch.float64
    assert np.isfinite(float(res.mass_after)) and all(bool(torch.isfinite(v).all()) for v in res.params.values())
    assert float(res.mass_before) == pytest.approx(before, rel=1e-12)
    assert float(res.mass_after) == pytest.approx(after, rel=1e-12)
    assert float(res.mass_after) <= float(res.mass_before) * (1 + 1e-12)
    assert float(ps.mass(state, spec)) == pytest.approx(before, rel=1e-12)
    y0, y1 = _out(name, state), _out(name, res.params)
    assert torch.allclose(y1, y0, rtol=1e-9, atol=1e-9 * float(y0.abs().max()))
    # the result is rescale(state, spec, log_scales), as documented
    again = ps.rescale(state, spec, res.log_scales)
    for s in spec.sites:
        assert torch.allclose(again[s], res.params[s], rtol=1e-12, atol=0), s
    # sites no scaling group touches (running statistics, the stem before its BatchNorm) are untouched
    for s in state:
        if s not in ps.mass_sites(spec, include_biases=True) and not any(
            s in spec.sites and {sp.role for sp in spec.action(s).spans_of(g)} - {"passive"} for g in _scalable(spec)
        ):
            assert torch.equal(res.params[s], state[s]), s


@pytest.mark.parametrize("name", ["resnet20", "models.resnet-nonorm", "vit", "densenet-bn", "unet"])
def test_min_mass_equals_a_generic_optimizer_on_the_brute_force_mass(name):
    """scipy L-BFGS on ``sum of squares of rescale(state, spec, u)`` (autograd gradient)
    finds no lower mass than ``min_mass``, and ``min_mass`` matches its minimum."""
    _, _, spec, state = _setup(name)
    groups = _scalable(spec)
    sizes = [spec.groups[g].size for g in groups]
    sites = ps.mass_sites(spec)

    def objective(flat):
        u = torch.tensor(flat, dtype=torch.float64, requires_grad=True)
        parts = dict(zip(groups, torch.split(u, sizes)))
        new = ps.rescale(state, spec, parts)
        m = sum(new[s].square().sum() for s in sites)
        m.backward()
        return float(m.detach()), u.grad.numpy().copy()

    opt = minimize(objective, np.zeros(sum(sizes)), jac=True, method="L-BFGS-B", options={"gtol": 1e-12, "ftol": 0})
    res = ps.min_mass(state, spec)
    assert float(res.mass_after) <= opt.fun * (1 + 1e-9)
    assert float(res.mass_after) == pytest.approx(opt.fun, rel=1e-6)


@pytest.mark.parametrize("name", RESNETS + ["batchnorm-mlp", "vit", "models.transformer", "densenet-bn", "unet"])
def test_canonical_form_is_the_same_for_every_element_of_an_orbit(name):
    """Random rescalings plus random group elements (signed: the attention's q/k and v dims
    are odd under a flip of both sides) of a ResNet or transformer map to one canonical
    form (min-mass, sign convention, sort by incoming norm), batched, with the same function."""
    _, _, spec, state = _setup(name)
    gen = torch.Generator().manual_seed(1)
    u = {k: torch.randn((2, *spec.unit_shape(k)), generator=gen, dtype=torch.float64) for k in _scalable(spec)}
    moved = spec.apply(ps.rescale(state, spec, u), spec.sample((2,), generator=gen))
    a = ps.canonicalize(state, spec, permutation="sort")
    b = ps.canonicalize(moved, spec, permutation="sort")
    for s in spec.sites:
        assert b.params[s].shape[0] == 2
        assert torch.allclose(a.params[s].expand_as(b.params[s]), b.params[s], rtol=1e-6, atol=1e-9), s
    y0 = _out(name, state)
    assert torch.allclose(_out(name, a.params), y0, rtol=1e-9, atol=1e-9 * float(y0.abs().max()))
    for k in spec.groups:
        assert tuple(b.permutation[k].shape) == (2, *spec.unit_shape(k))


@pytest.mark.parametrize("name", ["vit", "models.transformer"])
def test_sign_convention_of_nested_attention_groups(name):
    """Each (head, dim) of the q/k and v groups gets its own flip: flipping any of them keeps
    the function, and the convention undoes any flips (outgoing sums positive afterwards)."""
    _, _, spec, state = _setup(name)
    signed = [k for k, g in spec.groups.items() if g.signed]
    assert signed and all(len(spec.unit_shape(k)) == 2 for k in signed)
    gen = torch.Generator().manual_seed(2)
    flips = {k: torch.rand(spec.unit_shape(k), generator=gen) < 0.5 for k in signed}
    flipped = ps.flip_signs(state, spec, flips)
    y0 = _out(name, state)
    assert torch.allclose(_out(name, flipped), y0, rtol=1e-9, atol=1e-9 * float(y0.abs().max()))
    a = ps.flip_signs(state, spec, ps.sign_convention(state, spec))
    b = ps.flip_signs(flipped, spec, ps.sign_convention(flipped, spec))
    for s in spec.sites:
        assert torch.equal(a[s], b[s]), s
    with pytest.raises(ps.SpecError, match=r"expected \(\*batch, \d+, \d+\)"):
        ps.flip_signs(state, spec, {signed[0]: torch.zeros(spec.unit_shape(signed[0])[-1], dtype=torch.bool)})


def test_min_mass_on_a_float32_resnet_reports_the_brute_force_mass():
    _, _, spec, state = _setup("resnet20")
    s32 = {k: v.float() for k, v in state.items()}
    res = ps.min_mass(s32, spec)
    sites = ps.mass_sites(spec)
    assert bool(res.converged)
    assert float(res.mass_before) == pytest.approx(_brute_mass(s32, sites), rel=1e-6)
    assert float(res.mass_after) == pytest.approx(_brute_mass(res.params, sites), rel=1e-5)
    assert float(res.mass_after) <= float(res.mass_before)


def test_batched_differentiable_rescale_of_sliced_sites():
    """Per-sample log-scales on a DenseNet (sites cut at the concatenation) equal one
    sample at a time, and gradients reach every input entry that is scaled."""
    _, _, spec, state = _setup("densenet-bn")
    gen = torch.Generator().manual_seed(4)
    u = {k: torch.randn(3, spec.groups[k].size, generator=gen, dtype=torch.float64) for k in _scalable(spec)}
    params = {k: v.clone().requires_grad_(v.is_floating_point()) for k, v in state.items()}
    new = ps.rescale(params, spec, u)
    scaled = [s for s in spec.sites if new[s].dim() > state[s].dim()]  # the others pass through
    assert {"norms.1.weight", "convs.1.weight", "fc.weight"} <= set(scaled)
    for i in range(3):
        one = ps.rescale(state, spec, {k: v[i] for k, v in u.items()})
        for s in scaled:
            assert torch.allclose(new[s][i], one[s], rtol=1e-14, atol=0), (s, i)
    sum(new[s].sum() for s in scaled).backward()
    for s in scaled:
        expect = sum(
            ps.rescale({**state, s: torch.ones_like(state[s])}, spec, {k: v[i] for k, v in u.items()})[s]
            for i in range(3)
        )
        assert torch.allclose(params[s].grad, expect, rtol=1e-12), s
