"""The symmetrized posterior q_sym = mean_g g#q as a distribution."""

import math

import pyro.distributions as dist
import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from strategies import seeds
from strategies_estimators import brute_force_log_q_sym, mean_field, small_architectures

import pyro_symmetry as ps
from pyro_symmetry.models import BayesianMLP


def _flat(q, spec):
    layout = ps.FlatLayout(spec.shapes)
    loc = layout.to_flat({k: d.base_dist.loc for k, d in q.items()})
    scale = layout.to_flat({k: d.base_dist.scale for k, d in q.items()})
    return dist.Normal(loc, scale).to_event(1), layout


@pytest.mark.parametrize("hidden", [(3, 2), (4,)])
@pytest.mark.parametrize("act", ["relu", "tanh"])
@pytest.mark.parametrize("flat", [False, True])
def test_exact_log_prob_equals_brute_force(hidden, act, flat):
    model = BayesianMLP(3, list(hidden), 2, activation=act)
    q = mean_field(model.spec.shapes, seed=2)
    q_sym = ps.Symmetrized(q, model.spec, estimator="exact")
    torch.manual_seed(0)
    w = q_sym.sample()
    expected = brute_force_log_q_sym(q, w, hidden, signed=act == "tanh")
    if flat:
        fq, layout = _flat(q, model.spec)
        q_sym = ps.Symmetrized(fq, model.spec, estimator="exact", layout=layout)
        w = layout.to_flat(w)
    assert torch.allclose(q_sym.log_prob(w), expected, atol=1e-9)
    if len(hidden) == 1:
        perm = ps.Symmetrized(q_sym.base, model.spec, estimator="permanent", layout=q_sym.layout)
        assert torch.allclose(perm.log_prob(w), expected, atol=1e-9)


@given(arch=small_architectures(), seed=seeds, estimator=st.sampled_from(["exact", "permanent", "auto"]))
def test_log_prob_is_invariant(arch, seed, estimator):
    n_in, hidden, n_out, act = arch
    if estimator == "permanent":
        hidden = hidden[:1]
    model = BayesianMLP(n_in, list(hidden), n_out, activation=act)
    q_sym = ps.Symmetrized(mean_field(model.spec.shapes, seed), model.spec, estimator=estimator)
    torch.manual_seed(seed)
    w = {k: d.sample((3,)) for k, d in q_sym.base.items()}
    g = model.spec.sample((3,), generator=torch.Generator().manual_seed(seed))
    assert torch.allclose(q_sym.log_prob(model.spec.apply(w, g)), q_sym.log_prob(w), atol=1e-9)
    assert (q_sym.log_s(w) >= -1e-9).all()


def test_normalized_on_a_grid():
    # two interchangeable coordinates: q_sym = (q(a, b) + q(b, a)) / 2 integrates to one
    spec = ps.PermutationSpec({"h": ps.NeuronGroup(2, incoming=[("w", -1)])}, {"w": (2,)})
    q = {
        "w": dist.Normal(
            torch.tensor([0.3, -0.4], dtype=torch.float64), torch.tensor([0.2, 0.5], dtype=torch.float64)
        ).to_event(1)
    }
    q_sym = ps.Symmetrized(q, spec, estimator="exact")
    t = torch.linspace(-4, 4, 401, dtype=torch.float64)
    grid = torch.stack(torch.meshgrid(t, t, indexing="ij"), -1).reshape(-1, 2)
    mass = q_sym.log_prob({"w": grid}).exp().sum() * (t[1] - t[0]) ** 2
    assert float(mass) == pytest.approx(1.0, abs=1e-4)
    expected = torch.logaddexp(q["w"].log_prob(grid), q["w"].log_prob(grid.flip(-1))) - math.log(2)
    assert torch.allclose(q_sym.log_prob({"w": grid}), expected)


def test_sampling_draws_a_uniform_element_per_draw():
    model = BayesianMLP(2, [3], 1)
    g = torch.Generator().manual_seed(0)
    q = {k: dist.Normal(torch.randn(s, generator=g), 0.01).to_event(len(s)) for k, s in model.spec.shapes.items()}
    q_sym = ps.Symmetrized(q, model.spec)
    torch.manual_seed(0)
    n = 6000
    w = q_sym.sample((n,))
    assert w["fc1.weight"].shape == (n, 3, 2) and q_sym.batch_shape == () and q_sym.event_shape == ()
    # each hidden neuron's bias is neuron j's of q with probability 1/3 (q's modes are narrow)
    means = q["fc1.bias"].base_dist.loc
    nearest = (w["fc1.bias"].unsqueeze(-1) - means).abs().argmin(-1)  # (n, 3)
    freq = torch.stack([(nearest[:, 0] == j).double().mean() for j in range(3)])
    assert torch.allclose(freq, torch.full((3,), 1 / 3, dtype=torch.float64), atol=5 * math.sqrt(2 / 9 / n))
    # each draw is g . w for one g: the neurons carry their own rows and columns along
    model.spec.validate({"fc1": nearest})
    locs = {k: d.base_dist.loc.expand(n, *d.event_shape) for k, d in q.items()}
    ref = model.spec.apply(locs, {"fc1": nearest})
    for k in q:
        assert (w[k] - ref[k]).abs().max() < 0.5


def test_rsample_gradients_and_flat_mixture():
    model = BayesianMLP(2, [3], 1, activation="tanh")
    layout = ps.FlatLayout(model.spec.shapes)
    locs = torch.randn(2, layout.dim, dtype=torch.float64, requires_grad=True)
    mix = dist.MixtureOfDiagNormals(
        locs, torch.ones(2, layout.dim, dtype=torch.float64), torch.zeros(2, dtype=torch.float64)
    )
    q_sym = ps.Symmetrized(mix, model.spec, estimator="importance", num_permutations=4, layout=layout)
    assert q_sym.has_rsample and q_sym.event_shape == (layout.dim,)
    w = q_sym.rsample((5,))
    lp = q_sym.log_prob(w)
    assert lp.shape == (5,)
    (w.sum() + lp.sum()).backward()
    assert locs.grad is not None and torch.isfinite(locs.grad).all()
    exact = ps.Symmetrized(mix, model.spec, estimator="exact", layout=layout)
    est = exact.mutual_information(num_samples=300)
    assert est.estimator == "exact" and 0 <= est.value <= model.spec.log_order


def test_errors():
    model = BayesianMLP(2, [3], 1)
    q = mean_field(model.spec.shapes, 0)
    with pytest.raises(ValueError, match="estimator"):
        ps.Symmetrized(q, model.spec, estimator="nope")
    with pytest.raises(ValueError, match="num_permutations"):
        ps.Symmetrized(q, model.spec, num_permutations=0)
    with pytest.raises(ps.SpecError, match="layout"):
        ps.Symmetrized(dist.Normal(torch.zeros(5), 1.0).to_event(1), model.spec)
    with pytest.raises(ps.SpecError, match="no distribution"):
        ps.Symmetrized({"fc1.weight": q["fc1.weight"]}, model.spec)
    with pytest.raises(ps.SpecError, match="event shape"):
        ps.Symmetrized({**q, "fc1.bias": dist.Normal(torch.zeros(4), 1.0).to_event(1)}, model.spec)


def test_mutual_information_of_the_distribution():
    model = BayesianMLP(2, [3], 1)
    q = mean_field(model.spec.shapes, seed=4)
    q_sym = ps.Symmetrized(q, model.spec, estimator="exact")
    torch.manual_seed(0)
    a = ps.mutual_information(q_sym, num_samples=300)
    torch.manual_seed(0)
    b = q_sym.mutual_information(num_samples=300)
    torch.manual_seed(0)
    c = ps.mutual_information(q, model.spec, "exact", num_samples=300)
    assert a == b == c and 0 < a.value < model.spec.log_order
