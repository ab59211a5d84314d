"""interpolate, loss_barrier and the predictive loss helpers."""

import math
import pickle

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given
from hypothesis import strategies as st
from strategies import mlp_architectures, seeds

import pyro_symmetry as ps
from pyro_symmetry.models import BayesianCNN, BayesianMLP


def _gaussian(model, seed, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    shapes = model.spec.shapes
    return {
        k: (
            torch.randn(shapes[k], generator=g, dtype=dtype),
            0.1 + 0.5 * torch.rand(shapes[k], generator=g, dtype=dtype),
        )
        for k in model.site_names
    }


def _points(q):
    return {k: v[0] for k, v in q.items()}


@given(arch=mlp_architectures(), seed=seeds, t=st.floats(0.0, 1.0))
def test_interpolate_endpoints_and_geodesic(arch, seed, t):
    model = BayesianMLP(*arch)
    q0, q1 = _gaussian(model, seed), _gaussian(model, seed + 1)
    for a, b in ((q0, q1), (_points(q0), _points(q1))):
        start, end = ps.interpolate(a, b, 0.0), ps.interpolate(a, b, 1.0)
        mid = ps.interpolate(a, b, t)
        for k in a:
            if isinstance(a[k], tuple):
                assert torch.equal(start[k][0], a[k][0]) and torch.equal(start[k][1], a[k][1])
                assert torch.equal(end[k][0], b[k][0]) and torch.equal(end[k][1], b[k][1])
                # W2 geodesic: linear in means and in standard deviations
                assert torch.allclose(mid[k][0], (1 - t) * a[k][0] + t * b[k][0], atol=1e-12)
                assert torch.allclose(mid[k][1], (1 - t) * a[k][1] + t * b[k][1], atol=1e-12)
            else:
                assert torch.equal(start[k], a[k]) and torch.equal(end[k], b[k])
                assert torch.allclose(mid[k], (1 - t) * a[k] + t * b[k], atol=1e-12)


def test_interpolate_w2_distance_is_linear_along_the_path():
    """On a geodesic ``W2(q0, q_t) = t W2(q0, q1)`` (diagonal Gaussians, closed form)."""
    model = BayesianMLP(3, [4], 2)
    q0, q1 = _gaussian(model, 0), _gaussian(model, 1)

    def w2(a, b):
        return math.sqrt(sum(float((a[k][0] - b[k][0]).pow(2).sum() + (a[k][1] - b[k][1]).pow(2).sum()) for k in a))

    total = w2(q0, q1)
    for t in (0.1, 0.37, 0.8):
        assert w2(q0, ps.interpolate(q0, q1, t)) == pytest.approx(t * total, rel=1e-12)


def test_interpolate_errors():
    model = BayesianMLP(3, [4], 2)
    q = _gaussian(model, 0)
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        ps.interpolate(q, q, 1.5)
    with pytest.raises(ValueError, match="both must be Gaussian or both points"):
        ps.interpolate(q, _points(q), 0.5)
    with pytest.raises(ps.SpecError, match="fc2.bias"):
        ps.interpolate(q, {k: v for k, v in q.items() if k != "fc2.bias"}, 0.5)


@given(arch=mlp_architectures(), seed=seeds, act=st.sampled_from(["tanh", "relu"]))
def test_barrier_of_a_network_with_itself_is_zero(arch, seed, act):
    model = BayesianMLP(*arch, activation=act)
    q = _gaussian(model, seed)
    x = torch.randn(7, arch[0], generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    y = torch.randint(0, arch[2], (7,), generator=torch.Generator().manual_seed(seed))
    for loss in (ps.gaussian_nll_loss(model, x, y, num_samples=4), ps.point_error_loss(model, x, y)):
        res = ps.loss_barrier(loss, q, q, num_points=5)
        assert res.barrier == 0.0
        assert torch.equal(res.losses, res.losses[0].expand(5))
        assert torch.equal(res.t, torch.linspace(0, 1, 5, dtype=torch.float64))


def test_barrier_definition_on_a_known_curve():
    """``B = max_t L(q_t) - ((1-t) L0 + t L1)`` for a loss whose path values are known."""

    def loss(q):  # L(q_t) = t^2 - t + 3 along the path from 0 to 1 below
        t = float(q["w"][0])
        return t * t - t + 3.0

    res = ps.loss_barrier(loss, {"w": torch.zeros(1)}, {"w": torch.ones(1)}, num_points=5)
    assert res.losses.tolist() == pytest.approx([3.0, 2.8125, 2.75, 2.8125, 3.0])
    assert res.barrier == 0.0  # a convex path has no barrier
    res = ps.loss_barrier(lambda q: -loss(q), {"w": torch.zeros(1)}, {"w": torch.ones(1)}, num_points=5)
    assert res.barrier == pytest.approx(0.25)
    with pytest.raises(ValueError, match="num_points"):
        ps.loss_barrier(loss, {"w": torch.zeros(1)}, {"w": torch.ones(1)}, num_points=1)


def test_point_losses_match_direct_formulas():
    model = BayesianMLP(4, [5], 3)
    q = _gaussian(model, 2)
    x = torch.randn(20, 4, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    y = torch.randint(0, 3, (20,), generator=torch.Generator().manual_seed(1))
    logits = model.functional(_points(q), x)
    assert ps.point_nll_loss(model, x, y)(q) == pytest.approx(float(F.cross_entropy(logits, y)), rel=1e-12)
    assert ps.point_error_loss(model, x, y)(q) == pytest.approx(float((logits.argmax(-1) != y).double().mean()))
    reg = BayesianMLP(4, [5], 1, likelihood="regression", obs_scale=0.7)
    qr = _gaussian(reg, 3)
    yr = torch.randn(20, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    out = reg.functional(_points(qr), x).squeeze(-1)
    nll = -torch.distributions.Normal(out, 0.7).log_prob(yr).mean()
    assert ps.point_nll_loss(reg, x, yr)(qr) == pytest.approx(float(nll), rel=1e-12)
    assert ps.point_error_loss(reg, x, yr)(qr) == pytest.approx(float((out - yr).pow(2).mean()), rel=1e-12)


def test_gaussian_losses_monte_carlo():
    """Zero variance gives the point loss exactly; with variance the predictive NLL is
    the log of a Monte Carlo mean of likelihoods, checked against its own draws."""
    model = BayesianCNN(1, (4, 4), [2], 3)
    q = _gaussian(model, 4)
    x = torch.randn(6, 1, 4, 4, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    y = torch.randint(0, 3, (6,), generator=torch.Generator().manual_seed(1))
    q_dirac = {k: (v[0], torch.zeros_like(v[1])) for k, v in q.items()}
    loss = ps.gaussian_nll_loss(model, x, y, num_samples=8, seed=3)
    assert loss(q_dirac) == pytest.approx(ps.point_nll_loss(model, x, y)(q), rel=1e-12)
    out = loss.outputs(q)  # (S, N, C) from the fixed draws
    probs = out.softmax(-1).gather(-1, y.expand(8, 6).unsqueeze(-1)).squeeze(-1)
    assert loss(q) == pytest.approx(float(-probs.mean(0).log().mean()), rel=1e-10)
    err = ps.gaussian_error_loss(model, x, y, num_samples=8, seed=3)(q)
    assert err == pytest.approx(float((out.softmax(-1).mean(0).argmax(-1) != y).double().mean()))
    assert loss(q) == loss(q)  # common random numbers: deterministic
    assert pickle.loads(pickle.dumps(loss))(q) == loss(q)


def test_loss_helper_errors():
    model = BayesianMLP(2, [3], 1, likelihood="regression", obs_scale=None)
    x, y = torch.randn(4, 2), torch.randn(4)
    with pytest.raises(ValueError, match="obs_scale"):
        ps.gaussian_nll_loss(model, x, y)
    assert ps.gaussian_nll_loss(model, x, y, obs_scale=0.5).obs_scale == 0.5
    with pytest.raises(ValueError, match="rows"):
        ps.point_nll_loss(BayesianMLP(2, [3], 2), x, y[:3])
    with pytest.raises(TypeError, match="functional"):
        ps.point_nll_loss(object(), x, y)
    with pytest.raises(ValueError, match="Gaussian posterior"):
        ps.gaussian_nll_loss(model, x, y, obs_scale=1.0)({k: torch.zeros(s) for k, s in model.spec.shapes.items()})


def test_alignment_removes_the_barrier_between_relabeled_networks():
    """A network and a relabeled copy have a large barrier before alignment and none after."""
    model = BayesianMLP(4, [16], 3, activation="tanh")
    q0 = _gaussian(model, 5)
    g = model.spec.sample(generator=torch.Generator().manual_seed(0))
    loc = model.spec.apply(_points(q0), g)
    scale = model.spec.apply({k: v[1] for k, v in q0.items()}, {k: ps.decode_signed(p)[0] for k, p in g.items()})
    q1 = {k: (loc[k], scale[k]) for k in q0}
    x = torch.randn(64, 4, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    y = model.functional(_points(q0), x).argmax(-1)
    loss = ps.gaussian_nll_loss(model, x, y, num_samples=16)
    before = ps.loss_barrier(loss, q0, q1, num_points=9)
    after = ps.loss_barrier(loss, q0, ps.align(q0, q1, model.spec).aligned, num_points=9)
    assert before.barrier > 0.1
    assert after.barrier == 0.0
