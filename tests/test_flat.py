"""Flat latent vectors of AutoContinuous guides: the index map of a group element."""

import pyro
import pytest
import torch
from hypothesis import given
from pyro.infer import SVI, Trace_ELBO
from pyro.infer.autoguide import AutoDiagonalNormal, AutoLowRankMultivariateNormal, AutoMultivariateNormal
from strategies import group_element, mlp_architectures, seeds

import pyro_symmetry as ps
from pyro_symmetry.models import BayesianMLP


def _fitted(guide_cls, model, x, y):
    guide = guide_cls(model)
    SVI(model, guide, pyro.optim.Adam({"lr": 1e-3}), Trace_ELBO()).step(x, y)
    return guide


@pytest.mark.parametrize("guide_cls", [AutoDiagonalNormal, AutoLowRankMultivariateNormal, AutoMultivariateNormal])
def test_layout_matches_what_the_guide_packs(guide_cls):
    model = BayesianMLP(3, [4, 2], 2, likelihood="regression", obs_scale=None)  # + a non-spec site
    x, y = torch.randn(10, 3), torch.randn(10, 2)
    guide = _fitted(guide_cls, model, x, y)
    layout = ps.FlatLayout.from_guide(guide)
    assert "obs_scale" in layout.shapes
    latent = torch.randn(layout.dim)
    unpacked = {site["name"]: v for site, v in guide._unpack_latent(latent)}
    mine = layout.from_flat(latent)
    for k in layout.shapes:
        assert torch.equal(mine[k], unpacked[k])
    assert torch.equal(layout.to_flat(mine), latent)


@given(arch=mlp_architectures(), seed=seeds)
def test_flat_index_equals_site_action(arch, seed):
    n_in, hidden, n_out = arch
    model = BayesianMLP(n_in, hidden, n_out, activation="tanh")
    layout = ps.FlatLayout(model.spec.shapes)
    perm = group_element(model.spec, seed, batch_shape=(2,))
    idx = ps.flat_permutation(model.spec, perm, layout)
    assert idx.shape == (2, layout.dim)
    flat = torch.randn(3, 1, layout.dim, dtype=torch.float64, generator=torch.Generator().manual_seed(seed))
    via_index = ps.apply_flat(flat, idx)
    via_sites = layout.to_flat(model.spec.apply(layout.from_flat(flat), perm))
    assert torch.equal(via_index, via_sites)
    # one group element is one index vector: a bijection of positions
    src, _ = ps.decode_signed(idx)
    assert torch.equal(src.sort(-1).values, torch.arange(layout.dim).expand(2, -1))


def test_flat_permutation_reuses_pyro_permute():
    """For a plain permutation the index is exactly what pyro's Permute transform takes."""
    from pyro.distributions.transforms import Permute

    model = BayesianMLP(3, [4], 2)
    layout = ps.FlatLayout(model.spec.shapes)
    perm = model.spec.sample(generator=torch.Generator().manual_seed(0))
    idx = ps.flat_permutation(model.spec, perm, layout)
    v = torch.randn(layout.dim)
    assert torch.equal(Permute(idx)(v), ps.apply_flat(v, idx))


def test_layout_errors():
    model = BayesianMLP(3, [4], 2)
    layout = ps.FlatLayout(model.spec.shapes)
    with pytest.raises(ps.SpecError, match="flat vector has length 5"):
        layout.from_flat(torch.zeros(5))
    with pytest.raises(ps.SpecError, match="'fc1.bias' of the flat layout is missing"):
        layout.to_flat({"fc1.weight": torch.zeros(4, 3)})
    with pytest.raises(ps.SpecError, match="no latent layout yet"):
        ps.FlatLayout.from_guide(AutoDiagonalNormal(model))
    small = ps.FlatLayout({"fc1.weight": (4, 3)})
    with pytest.raises(ps.SpecError, match="not in the flat layout"):
        ps.flat_permutation(model.spec, model.spec.identity(), small)
