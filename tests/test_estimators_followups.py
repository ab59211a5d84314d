"""Follow-ups of issue 12 in the estimators (items 1 and 11): numbers that must be right
far from ``q``, at extreme ratios ``|loc| / scale`` and in float32 with tiny scales.

References are written here: per-neuron Normal log-densities summed directly in float64
(no quadratic expansion), and brute force over all ``n!`` (signed) permutations.
"""

from __future__ import annotations

import math

import pytest
import torch

from pyro_symmetry.estimators import BaseDensity
from pyro_symmetry.estimators.factors import neuron_log_factors
from pyro_symmetry.models import BayesianMLP


def _neuron_rows(w: dict, n: int) -> torch.Tensor:
    """A one-hidden-layer MLP's neuron contents ``(n, m)``: incoming row, bias, outgoing column."""
    return torch.cat([w["fc1.weight"], w["fc1.bias"].unsqueeze(-1), w["fc2.weight"].transpose(0, 1)], -1)


def _direct_factors(w: dict, loc: dict, scale: dict, n: int, signed: bool) -> torch.Tensor:
    """``A[i, s, j] = sum_k log N(sign_s w_ik | loc_jk, scale_jk)`` in float64, term by term."""
    v = _neuron_rows({k: x.double() for k, x in w.items()}, n)
    mu = _neuron_rows({k: x.double() for k, x in loc.items()}, n)
    sd = _neuron_rows({k: x.double() for k, x in scale.items()}, n)
    out = []
    for sign in (1.0, -1.0) if signed else (1.0,):
        z = (sign * v[:, None, :] - mu[None, :, :]) / sd[None, :, :]
        out.append((-0.5 * z.square() - sd.log()[None] - 0.5 * math.log(2 * math.pi)).sum(-1))
    return torch.stack(out, 1)  # (n, S, n)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("ratio", [1e3, 1e5, 1e7])
@pytest.mark.parametrize("activation", ["relu", "tanh"])
def test_neuron_log_factors_no_cancellation(dtype, ratio, activation):
    """``|loc| / scale`` large: the expansion ``-0.5 l v^2 + l v loc - 0.5 l loc^2`` cancels
    terms of size ``ratio^2`` (1e14 at 1e7: whole nats lost in float64); the entries must
    match the direct float64 sums to the rounding of the inputs' own differences."""
    n = 5
    model = BayesianMLP(3, [n], 2, activation=activation)
    spec = model.spec
    group = next(iter(spec.groups))
    signed = spec.groups[group].signed
    g = torch.Generator().manual_seed(1)
    loc, scale, w = {}, {}, {}
    for s, shape in spec.shapes.items():
        sd = 0.5 + torch.rand(shape, generator=g, dtype=torch.float64)
        mu = ratio * sd * (1 + 0.01 * torch.randn(shape, generator=g, dtype=torch.float64))
        loc[s], scale[s] = mu.to(dtype), sd.to(dtype)
        # near q's mean, with the neurons permuted among themselves on some rows
        w[s] = (mu + sd * torch.randn(shape, generator=g, dtype=torch.float64)).to(dtype)
    base = BaseDensity({s: (loc[s], scale[s]) for s in spec.shapes}, spec)
    a = neuron_log_factors(w, base.marginals(), spec, group)
    ref = _direct_factors(w, loc, scale, n, signed)
    assert a.shape == ref.shape and a.dtype == dtype
    # the result's own rounding: relative to the entry (float32: a few ulp of |A|), and
    # the float64 rounding of the inputs' differences (tiny)
    eps = torch.finfo(dtype).eps
    tol = 1e-9 + 16 * eps * ref.abs()
    err = (a.double() - ref).abs()
    assert bool((err <= tol).all()), (float(err.max()), float((err / (1 + ref.abs())).max()))
