"""BayesianModule, BayesianResNet and BayesianTransformer: sites, batched functional, refusals."""

from __future__ import annotations

import pyro
import pytest
import torch
from pyro.infer import SVI, Trace_ELBO
from pyro.infer.autoguide import AutoNormal
from torch import nn

import pyro_symmetry as ps


def _batched_equals_loop(model, x, batch=3):
    gen = torch.Generator().manual_seed(0)
    params = {
        k: torch.randn((batch, *s), generator=gen, dtype=torch.float64) * 0.3 for k, s in model._site_shapes.items()
    }
    out = model.functional(params, x)
    for i in range(batch):
        torch.testing.assert_close(out[i], model.functional({k: v[i] for k, v in params.items()}, x))
    return out


@pytest.mark.parametrize("norm", ["batchnorm", "frn", "none"])
def test_resnet_sites_and_batched_functional(norm):
    model = ps.models.BayesianResNet(1, (8, 8), 10, blocks=(1, 1, 1), norm=norm).double()
    assert "layer2.0.downsample.0.weight" in model.site_names
    assert all(k in model.site_names for k in ["conv1.weight", "fc.weight", "layer3.0.conv2.weight"])
    out = _batched_equals_loop(model, torch.randn(4, 1, 8, 8, dtype=torch.float64))
    assert out.shape == (3, 4, 10)


def test_transformer_sites_and_batched_functional():
    model = ps.models.BayesianTransformer(8, 8, 10, dim=8, depth=1, heads=2, mlp=12).double()
    assert {"cls_token", "pos_embed", "blocks.0.attn.in_proj_weight", "blocks.0.attn.out_proj.weight"} <= set(
        model.site_names
    )
    assert _batched_equals_loop(model, torch.randn(5, 8, 8, dtype=torch.float64)).shape == (3, 5, 10)


def test_svi_steps_with_vectorized_particles():
    model = ps.models.BayesianResNet(1, (8, 8), 3, blocks=(1, 1, 1))
    x, y = torch.randn(8, 1, 8, 8), torch.randint(0, 3, (8,))
    guide = AutoNormal(model)
    svi = SVI(model, guide, pyro.optim.Adam({"lr": 1e-2}), Trace_ELBO(num_particles=3, vectorize_particles=True))
    losses = [svi.step(x, y) for _ in range(3)]
    assert all(torch.isfinite(torch.tensor(losses)))


def test_running_statistics_are_refused():
    net = nn.Sequential(nn.Conv2d(1, 4, 3), nn.BatchNorm2d(4), nn.Flatten(), nn.LazyLinear(2))
    with pytest.raises(ps.SpecError, match="running statistics"):
        ps.models.BayesianModule(net, (1, 5, 5), 2)
