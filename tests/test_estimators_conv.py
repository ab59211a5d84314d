"""Estimators of log S(w) and I(g; w) on conv specs (issue 12, item 13).

``BayesianCNN`` permutes (and, with tanh, sign-flips) output channels: axis 0 of a conv
weight and bias, axis 1 of the next conv's weight, and blocks of ``H' W'`` flattened columns
of the final linear layer. References: an enumeration written with explicit channel
indexing (not the spec's action), the permanent (one conv layer), and the identity
``E_{g ~ pi}[q(g^{-1} w) / (|G| pi(g | w))] = q_sym(w) / q(w)`` that makes the stochastic
bounds valid, checked with standard errors.
"""

import itertools
import math

import pytest
import torch
from pyro.infer.autoguide.initialization import init_to_sample
from strategies_estimators import mean_field

import pyro_symmetry as ps
from pyro_symmetry.estimators import (
    BaseDensity,
    contrastive_log_ratio,
    exact_log_ratio,
    importance_log_ratio,
    permanent_log_ratio,
)
from pyro_symmetry.estimators.importance import plackett_luce_proposal, proposal_log_prob
from pyro_symmetry.groups import decode_signed
from pyro_symmetry.models import BayesianCNN


def _signed_perms(n, signed):
    for p in itertools.permutations(range(n)):
        for s in itertools.product([1.0, -1.0], repeat=n) if signed else [(1.0,) * n]:
            yield torch.tensor(p), torch.tensor(s, dtype=torch.float64)


def _act_by_hand(w, p1, s1, p2, s2, spatial):
    """Channel j of conv1 takes channel p1[j] (times s1[j]), and so on down the net."""
    out = dict(w)
    out["conv1.weight"] = s1.view(-1, 1, 1, 1) * w["conv1.weight"][p1]
    out["conv1.bias"] = s1 * w["conv1.bias"][p1]
    w2 = w["conv2.weight"][p2][:, p1] * s2.view(-1, 1, 1, 1) * s1.view(1, -1, 1, 1)
    out["conv2.weight"], out["conv2.bias"] = w2, s2 * w["conv2.bias"][p2]
    fc = w["fc.weight"].reshape(w["fc.weight"].shape[0], len(p2), spatial)
    out["fc.weight"] = (fc[:, p2] * s2.view(1, -1, 1)).reshape(w["fc.weight"].shape)
    return out


@pytest.mark.parametrize("act", ["relu", "tanh"])
def test_exact_equals_enumeration_by_hand(act):
    model = BayesianCNN(2, (4, 4), [3, 2], 2, activation=act)
    q = mean_field(model.spec.shapes, 0)
    base = BaseDensity(q, model.spec)
    torch.manual_seed(0)
    w = base.sample((2,))
    signed = act == "tanh"
    for i in range(2):
        wi = {k: v[i] for k, v in w.items()}
        logs = [
            sum(q[k].log_prob(v) for k, v in _act_by_hand(wi, p1, s1, p2, s2, model.spatial).items())
            for p1, s1 in _signed_perms(3, signed)
            for p2, s2 in _signed_perms(2, signed)
        ]
        assert len(logs) == (384 if signed else 12)
        expected = torch.logsumexp(torch.stack(logs), 0) - math.log(len(logs)) - base.log_prob(wi)
        assert float(exact_log_ratio(base, wi)) == pytest.approx(float(expected), abs=1e-9)


@pytest.mark.parametrize("act", ["relu", "tanh"])
def test_permanent_equals_exact_on_one_conv_layer(act):
    model = BayesianCNN(2, (4, 4), [5], 3, activation=act)  # inner blocks of 4 fc columns
    base = BaseDensity(mean_field(model.spec.shapes, 1, loc_scale=1.0), model.spec)
    torch.manual_seed(1)
    w = base.sample((4,))
    assert torch.allclose(permanent_log_ratio(base, w), exact_log_ratio(base, w), atol=1e-8)


@pytest.mark.parametrize("method", ["contrastive", "importance"])
@pytest.mark.parametrize("act", ["relu", "tanh"])
def test_weights_are_unbiased_for_q_sym_on_conv(method, act):
    """The K - 1 non-identity terms of each bound average to S(w) / |G| (5 standard errors)."""
    model = BayesianCNN(2, (4, 4), [3, 2], 2, activation=act)
    base = BaseDensity(mean_field(model.spec.shapes, 2, loc_scale=0.25, min_scale=0.8), model.spec)
    torch.manual_seed(2)
    w = base.sample(())
    target = float(exact_log_ratio(base, w).exp())  # q_sym(w) / q(w)
    M = 20000
    gen = torch.Generator().manual_seed(3)
    if method == "importance":
        perm, log_pi = plackett_luce_proposal(base, w, M + 1, 1.0, gen)
        perm, log_pi = {g: p[1:] for g, p in perm.items()}, log_pi[1:]
    else:
        perm = model.spec.sample((M,), generator=gen)
        log_pi = torch.full((M,), -model.spec.log_order, dtype=torch.float64)
    ratio = (base.log_prob_acted(w, perm) - base.log_kernel(w) - log_pi - model.spec.log_order).exp()
    mean, se = float(ratio.mean()), float(ratio.std() / math.sqrt(M))
    assert se > 0 and abs(mean - target) < 5 * se, (mean, se, target)


@pytest.mark.parametrize("act", ["relu", "tanh"])
def test_bounds_stay_below_exact_on_conv(act):
    """Paired over the same draws w ~ q: each bound's I_K is at most the exact I (4 se), the
    importance bound at K = 32 is at least the uniform one at K = 4, and both lie in [0, log|G|]."""
    model = BayesianCNN(2, (4, 4), [3, 2], 2, activation=act)
    base = BaseDensity(
        mean_field(model.spec.shapes, 3, loc_scale=0.25, min_scale=0.8), model.spec
    )  # I ~ 0.5-0.8 log|G|
    torch.manual_seed(4)
    w = base.sample((400,))
    exact = -exact_log_ratio(base, w)  # I per draw
    gen = torch.Generator().manual_seed(5)
    bounds = {
        ("contrastive", 4): -contrastive_log_ratio(base, w, 4, gen),
        ("contrastive", 32): -contrastive_log_ratio(base, w, 32, gen),
        ("importance", 4): -importance_log_ratio(base, w, 4, 1.0, gen),
        ("importance", 32): -importance_log_ratio(base, w, 32, 1.0, gen),
    }
    n = len(exact)
    for key, b in bounds.items():
        d = b - exact
        assert float(d.mean()) <= 4 * float(d.std()) / math.sqrt(n) + 1e-12, key
        assert float(b.mean()) <= model.spec.log_order + 1e-9
    d = bounds[("importance", 32)] - bounds[("contrastive", 4)]
    assert float(d.mean()) >= -4 * float(d.std()) / math.sqrt(n)
    assert 0 < float(exact.mean()) < model.spec.log_order


def test_mutual_information_on_conv_guides():
    """A fitted guide on a conv net: every method runs on it, exact = permanent on the same
    draws of w, and the bounds stay below the exact value."""
    model = BayesianCNN(1, (4, 4), [3], 2)
    x, y = torch.randn(8, 1, 4, 4), torch.randint(0, 2, (8,))
    guide = ps.AutoSymmetrizedNormal(model, num_permutations=4, init_loc_fn=init_to_sample, init_scale=3.0)
    guide(x, y)  # distinct channels (the default init makes them all equal: I = 0)

    def mi(method):
        torch.manual_seed(0)  # the same draws of w for every method
        return ps.mutual_information(
            guide, estimator=method, num_samples=300, generator=torch.Generator().manual_seed(0)
        )

    est = {m: mi(m) for m in ("exact", "permanent", "contrastive", "importance")}
    assert est["exact"].value == pytest.approx(est["permanent"].value, abs=1e-5)
    assert 0.1 < est["exact"].value < est["exact"].log_order - 0.1
    for m in ("contrastive", "importance"):
        assert est[m].value <= est["exact"].value + 4 * math.hypot(est[m].stderr, est["exact"].stderr), m
        assert 0 <= est[m].value <= est[m].log_order + 1e-6


def test_passive_axes_are_permuted_but_not_flipped_by_the_factors():
    """A layer that feeds a BatchNorm, then tanh: the layer's rows are passive (permuted with
    the channel, never negated; the sign flip acts on the norm's affine parameters). The
    permanent, built from per-neuron factors, must equal enumeration through the spec."""
    spec = ps.PermutationSpec(
        {
            "h": ps.NeuronGroup(
                3,
                incoming=[("bn.weight", 0), ("bn.bias", 0)],
                outgoing=[("out.weight", 1)],
                activation_symmetry="sign",
                passive=[("lin.weight", 0), ("lin.bias", 0)],
            )
        },
        {"lin.weight": (3, 2), "lin.bias": (3,), "bn.weight": (3,), "bn.bias": (3,), "out.weight": (1, 3)},
    )
    base = BaseDensity(mean_field(spec.shapes, 0, loc_scale=1.0), spec)
    torch.manual_seed(0)
    w = base.sample((5,))
    g = spec.sample((5,), generator=torch.Generator().manual_seed(1))
    src, neg = decode_signed(g["h"])
    moved = spec.apply(w, g)
    assert neg.any()  # flips happen, and leave the passive rows unnegated
    assert torch.equal(moved["lin.bias"], w["lin.bias"].gather(-1, src))
    exact = exact_log_ratio(base, w)
    assert torch.allclose(permanent_log_ratio(base, w), exact, atol=1e-9)
    perm, log_pi = plackett_luce_proposal(base, w, 6, 1.0, torch.Generator().manual_seed(2))
    assert torch.allclose(log_pi, proposal_log_prob(base, w, perm), atol=1e-9)


def test_factor_estimators_refuse_sliced_axes_by_name():
    """A group on a slice of an axis (a fused projection's part): its neurons' factors are not
    whole rows, so 'permanent' and 'importance' refuse it naming the group and the site."""
    spec = ps.PermutationSpec(
        {
            "q": ps.NeuronGroup(2, incoming=[ps.Axis("qk.weight", 0, start=0)], outgoing=[("o.weight", 1)]),
            "k": ps.NeuronGroup(2, incoming=[ps.Axis("qk.weight", 0, start=2)]),
        },
        {"qk.weight": (4, 3), "o.weight": (1, 2)},
    )
    base = BaseDensity(mean_field(spec.shapes, 0), spec)
    w = base.sample((2,))
    with pytest.raises(ps.SpecError, match="'q'.*slice.*'qk.weight'"):
        importance_log_ratio(base, w, 4)
    elements = spec.elements()  # enumeration by hand still works on the same spec
    expected = torch.logsumexp(base.log_prob_acted(w, {g: p.unsqueeze(1) for g, p in elements.items()}), 0)
    assert torch.allclose(exact_log_ratio(base, w), expected - base.log_kernel(w) - spec.log_order)
