"""The vectorized Plackett-Luce proposal of the importance estimator (SPEC section 2, estimator 4).

References: enumeration of the whole group (normalization), a step-by-step softmax product
written from the SPEC's definition, and the sequential sampler of commit 05ca4eb (copied
below) whose distribution the vectorized one must equal.
"""

import math

import pytest
import scipy.stats
import torch
from hypothesis import given
from hypothesis import strategies as st
from strategies import seeds
from strategies_estimators import mean_field

from pyro_symmetry.estimators import BaseDensity
from pyro_symmetry.estimators import importance as imp
from pyro_symmetry.estimators.factors import neuron_log_factors
from pyro_symmetry.groups import decode_signed, encode_signed
from pyro_symmetry.models import BayesianCNN, BayesianMLP

ARCHS = [  # (in, hidden, out, activation): every group of width <= 5
    (2, (1,), 1, "relu"),
    (2, (4,), 2, "relu"),
    (3, (5,), 2, "relu"),
    (2, (3,), 1, "tanh"),
    (2, (4,), 2, "tanh"),
    (2, (3, 2), 2, "tanh"),
    (3, (2, 3), 1, "relu"),
]


def _base(arch, seed=0, dtype=torch.float64, **kw):
    n_in, hidden, n_out, act = arch
    model = BayesianMLP(n_in, list(hidden), n_out, activation=act)
    return BaseDensity(mean_field(model.spec.shapes, seed, dtype=dtype, **kw), model.spec)


def _stepwise_log_pi(base, w, perm, beta):
    """``log pi(g | w)`` of one element by the SPEC's definition, one neuron at a time."""
    spec = base.spec
    marg = base.marginals()
    drawn, total = {}, 0.0
    for g, group in spec.groups.items():
        n = group.size
        static, moved = imp._site_plan(spec, g, set(drawn))
        usable = static + moved
        partial = {k: drawn.get(k, torch.arange(spec.sizes[k])) for k in spec.groups}
        aligned = spec.apply(w, partial)
        a = neuron_log_factors({k: aligned[k] for k in usable} or aligned, marg, spec, g, sites=usable)
        a = beta * a.double().reshape(n, -1)  # (n, S * n), option s * n + j
        src, neg = decode_signed(perm[g])
        option = {int(src[j]): j + n * int(neg[j]) for j in range(n)}  # w-neuron -> option
        taken = set()
        for i in a.amax(-1).argsort(descending=True).tolist():
            open_ = [o for o in range(a.shape[1]) if o % n not in taken]
            total += float(a[i, option[i]] - torch.logsumexp(a[i, open_], 0))
            taken.add(option[i] % n)
        drawn[g] = perm[g]
    return total


def _old_sample_assignment(scores, num_forced, beta, generator):
    """The sequential sampler of commit 05ca4eb (pyro_symmetry/estimators/importance.py)."""
    N, n, S, _ = scores.shape
    O = S * n
    flat = scores.reshape(N, n, O)
    order = flat.amax(-1).argsort(-1, descending=True)
    visit = beta * flat.gather(1, order.unsqueeze(-1).expand(N, n, O))
    u = torch.rand((N, n, O), generator=generator, dtype=scores.dtype)
    gumbel = -torch.log(-torch.log(u.clamp(1e-20, 1.0 - 1e-7)))
    if S == 2:
        flipped = visit.argmax(-1) >= n
        gumbel = torch.where(flipped.unsqueeze(-1), gumbel.roll(n, -1), gumbel)
    rows = torch.arange(N)
    forced = rows < num_forced
    used = torch.zeros(N, n, dtype=torch.bool)
    chosen = torch.empty(N, n, dtype=torch.long)
    for t in range(n):
        s = visit[:, t].masked_fill(used.repeat(1, S), float("-inf"))
        o = torch.where(forced, order[:, t], (s + gumbel[:, t]).argmax(-1))
        used[rows, o % n] = True
        chosen[:, t] = o
    rank = torch.empty_like(chosen).scatter_(1, chosen % n, torch.arange(n).expand(N, n))
    closed = (rank.repeat(1, S).unsqueeze(1) < torch.arange(n).view(1, n, 1)).expand(N, n, O)
    log_pi = (
        visit.gather(-1, chosen.unsqueeze(-1)).squeeze(-1)
        - torch.logsumexp(visit.masked_fill(closed, float("-inf")), -1)
    ).sum(-1)
    return torch.empty_like(chosen).scatter_(1, order, chosen), log_pi


def _old_proposal(base, w, K, beta, generator):
    """``plackett_luce_proposal`` of commit 05ca4eb, for one draw ``w`` (unbatched)."""
    spec = base.spec
    marg = base.marginals()
    drawn, log_pi = {}, torch.zeros(K, dtype=torch.float64)
    for g, group in spec.groups.items():
        n = group.size
        static, moved = imp._site_plan(spec, g, set(drawn))
        usable = static + moved
        aligned = spec.apply(w, {k: drawn.get(k, torch.arange(spec.sizes[k])) for k in spec.groups}) if drawn else w
        a = neuron_log_factors({k: aligned[k] for k in usable} or aligned, marg, spec, g, sites=usable)
        a = a.expand(K, *a.shape[-3:])
        choice, lp = _old_sample_assignment(a, 1, beta, generator)
        src = torch.arange(n).expand_as(choice)
        drawn[g] = torch.empty_like(choice).scatter_(-1, choice % n, encode_signed(src, choice >= n))
        log_pi = log_pi + lp
    return drawn, log_pi


def _key(perm, k):
    return tuple(tuple(p[k].tolist()) for _, p in sorted(perm.items()))


@pytest.mark.parametrize("arch", ARCHS, ids=str)
@pytest.mark.parametrize("beta", [0.0, 0.4, 1.0, 3.0])
def test_proposal_is_normalized_over_the_whole_group(arch, beta):
    base = _base(arch, seed=1)
    torch.manual_seed(0)
    w = base.sample((2,))
    elements = base.spec.elements()  # every element, (|G|, n) per group
    E = next(iter(elements.values())).shape[0]
    lp = imp.proposal_log_prob(base, w, {g: p.unsqueeze(1).expand(E, 2, -1) for g, p in elements.items()}, beta)
    assert lp.shape == (E, 2) and torch.isfinite(lp).all()
    assert torch.allclose(torch.logsumexp(lp, 0), torch.zeros(2, dtype=torch.float64), atol=1e-10)
    if beta == 0.0:  # uniform
        assert torch.allclose(lp, torch.full_like(lp, -base.spec.log_order), atol=1e-10)


@pytest.mark.parametrize("arch", ARCHS[3:6], ids=str)
def test_log_prob_equals_the_stepwise_definition_and_the_old_sampler(arch):
    base = _base(arch, seed=2)
    torch.manual_seed(1)
    w = base.sample(())
    gen = torch.Generator().manual_seed(3)
    old, old_lp = _old_proposal(base, w, 12, 1.0, gen)
    new_lp = imp.proposal_log_prob(base, w, old, 1.0)
    # the old sampler's own log pi of its draws = the vectorized log pi of the same elements
    assert torch.allclose(new_lp, old_lp.double(), atol=1e-10)
    for k in range(12):
        assert float(new_lp[k]) == pytest.approx(_stepwise_log_pi(base, w, {g: p[k] for g, p in old.items()}, 1.0))


@pytest.mark.parametrize("arch", [(2, (3,), 1, "tanh"), (2, (4,), 1, "relu"), (2, (2, 2), 1, "tanh")], ids=str)
def test_draws_follow_the_log_prob_chi_square(arch):
    """Frequencies of the drawn elements (one draw w) against exp(log pi), old and new sampler."""
    base = _base(arch, seed=4, loc_scale=1.0, min_scale=0.5)
    torch.manual_seed(2)
    w = base.sample(())
    elements = base.spec.elements()
    E = next(iter(elements.values())).shape[0]
    probs = imp.proposal_log_prob(base, w, elements, 1.0).exp()
    index = {_key(elements, e): e for e in range(E)}
    M = 40 * E
    for name, draw in [
        ("new", lambda g: imp.plackett_luce_proposal(base, w, M + 1, 1.0, g)),
        ("old", lambda g: _old_proposal(base, w, M + 1, 1.0, g)),
    ]:
        perm, log_pi = draw(torch.Generator().manual_seed(5))
        counts = torch.zeros(E, dtype=torch.float64)
        for k in range(1, M + 1):  # k = 0 is the identity, kept by the bound
            counts[index[_key(perm, k)]] += 1
        assert torch.allclose(log_pi[1:].double(), probs.log()[[index[_key(perm, k)] for k in range(1, M + 1)]])
        p = scipy.stats.chisquare(counts.numpy(), (M * probs).numpy()).pvalue
        assert p > 1e-4, (name, p)


@given(seed=seeds, arch=st.sampled_from(ARCHS))
def test_sampled_log_pi_is_the_log_prob_of_the_sample(seed, arch):
    base = _base(arch, seed % 1000)
    torch.manual_seed(seed)
    w = base.sample((3,))
    perm, log_pi = imp.plackett_luce_proposal(base, w, 6, 1.3, torch.Generator().manual_seed(seed))
    for g, p in perm.items():  # slot 0 is the identity
        assert torch.equal(p[0], torch.arange(base.spec.sizes[g]).expand_as(p[0]))
    assert torch.allclose(log_pi, imp.proposal_log_prob(base, w, perm, 1.3), atol=1e-9)


@given(seed=seeds, arch=st.sampled_from(ARCHS))
def test_log_prob_is_equivariant(seed, arch):
    """pi(h g | h w) = pi(g | w): with p = g^{-1}, score p h^{-1} at h . w."""
    base = _base(arch, seed % 1000)
    spec = base.spec
    torch.manual_seed(seed)
    w = base.sample((2,))
    gen = torch.Generator().manual_seed(seed)
    h = spec.sample((2,), generator=gen)
    p = spec.sample((5, 2), generator=gen)
    lhs = imp.proposal_log_prob(base, spec.apply(w, h), spec.compose(p, spec.inverse(h)), 0.7)
    assert torch.allclose(lhs, imp.proposal_log_prob(base, w, p, 0.7), atol=1e-9)


def test_underflowing_steps_take_the_log_domain_path(monkeypatch):
    """Narrow factors and far weights: scores thousands of nats apart, so once a row's good
    options are taken the rest underflow exp(.) relative to its best; the sampler must still
    draw open options with the exact log pi."""
    arch = (3, (5,), 2, "tanh")
    base = _base(arch, seed=3, loc_scale=1.0, min_scale=0.01)
    torch.manual_seed(0)
    w = base.sample((4,))
    scale = torch.tensor([1.0, 3.0, -5.0, 0.2], dtype=torch.float64)
    w = {k: v * scale.view(4, *([1] * (v.dim() - 1))) for k, v in w.items()}
    passes = []
    steps = imp._steps
    monkeypatch.setattr(imp, "_steps", lambda *a, stable: passes.append(stable) or steps(*a, stable=stable))
    perm, log_pi = imp.plackett_luce_proposal(base, w, 16, 2.0, torch.Generator().manual_seed(1))
    base.spec.validate({g: p.reshape(-1, p.shape[-1]) for g, p in perm.items()})
    assert torch.isfinite(log_pi).all() and (log_pi <= 1e-9).all()
    assert torch.allclose(log_pi, imp.proposal_log_prob(base, w, perm, 2.0), atol=1e-6, rtol=1e-9)
    assert passes == [False, True]  # the fast pass underflowed, the log-domain pass drew


def test_float32_scores_that_overflow_are_recomputed_in_float64(monkeypatch):
    dtypes = []
    scores = imp._scores
    monkeypatch.setattr(imp, "_scores", lambda *a, dtype=None: dtypes.append(dtype) or scores(*a, dtype=dtype))
    base = _base((2, (3,), 1, "relu"), dtype=torch.float32)
    w = {k: torch.full((2, *s), 3e19) for k, s in base.spec.shapes.items()}
    w["fc1.bias"][1] = -3e19
    perm, log_pi = imp.plackett_luce_proposal(base, w, 4, 1.0, torch.Generator().manual_seed(0))
    assert torch.isfinite(log_pi).all() and dtypes == [None, torch.float64]
    base.spec.validate({g: p.reshape(-1, p.shape[-1]) for g, p in perm.items()})


def test_non_finite_scores_are_refused():
    base = _base((2, (3,), 1, "relu"))
    w = {k: torch.full((1, *s), 1e300, dtype=torch.float64) for k, s in base.spec.shapes.items()}
    with pytest.raises(ValueError, match="not finite"):
        imp.plackett_luce_proposal(base, w, 4, 1.0, torch.Generator().manual_seed(0))


def test_conv_spec_proposal_is_normalized():
    model = BayesianCNN(2, (4, 4), [3], 2, activation="tanh")  # 3 channels, inner 4 columns each
    base = BaseDensity(mean_field(model.spec.shapes, 0), model.spec)
    torch.manual_seed(0)
    w = base.sample((2,))
    elements = model.spec.elements()
    E = next(iter(elements.values())).shape[0]
    lp = imp.proposal_log_prob(base, w, {g: p.unsqueeze(1).expand(E, 2, -1) for g, p in elements.items()})
    assert torch.allclose(torch.logsumexp(lp, 0), torch.zeros(2, dtype=torch.float64), atol=1e-10)
    perm, log_pi = imp.plackett_luce_proposal(base, w, 8, 1.0, torch.Generator().manual_seed(0))
    assert torch.allclose(log_pi, imp.proposal_log_prob(base, w, perm), atol=1e-9)


def test_importance_weights_are_unbiased_for_q_sym():
    """E_{g ~ pi}[q(g^{-1} w) / (|G| pi(g | w))] = q_sym(w) / q(w) (exact, by enumeration), within 5 se."""
    base = _base((2, (3, 2), 1, "tanh"), seed=5, loc_scale=0.8, min_scale=0.4)
    torch.manual_seed(3)
    w = base.sample(())
    elements = base.spec.elements()
    exact = torch.logsumexp(base.log_prob_acted(w, elements) - base.log_kernel(w), 0) - base.spec.log_order
    M = 20000
    perm, log_pi = imp.plackett_luce_proposal(base, w, M + 1, 1.0, torch.Generator().manual_seed(4))
    ratio = (base.log_prob_acted(w, perm) - base.log_kernel(w) - log_pi - base.spec.log_order)[1:].exp()
    mean, se = float(ratio.mean()), float(ratio.std() / math.sqrt(M))
    assert abs(mean - math.exp(float(exact))) < 5 * se, (mean, se, math.exp(float(exact)))


def test_joined_and_separate_scoring_of_static_sites_agree(monkeypatch):
    """A later group's narrow static sites are scored with its aligned sites in one set of
    products (here: fc2.bias and fc3.weight, 6 coordinates, with fc2.weight's 24); the
    proposal is the same as with the two scored apart, and as the SPEC's definition."""
    arch = (2, (8, 3), 1, "tanh")
    base = _base(arch, seed=6)
    torch.manual_seed(4)
    w = base.sample((3,))
    spec = base.spec
    static, moved = imp._site_plan(spec, "fc2", {"fc1"})
    assert 4 * imp._width(spec, static) <= imp._width(spec, moved)  # the joined branch
    p = spec.sample((5, 3), generator=torch.Generator().manual_seed(0))
    joined = imp.proposal_log_prob(base, w, p)
    perm, log_pi = imp.plackett_luce_proposal(base, w, 6, 1.0, torch.Generator().manual_seed(1))
    monkeypatch.setattr(imp, "_width", lambda spec, sites: 10**9 if sites == static else 1)
    assert torch.allclose(imp.proposal_log_prob(base, w, p), joined, atol=1e-10)
    assert torch.allclose(imp.proposal_log_prob(base, w, perm), log_pi, atol=1e-10)
    for k in range(5):
        for b in range(3):
            wb, pk = {s: v[b] for s, v in w.items()}, {g: q[k, b] for g, q in p.items()}
            assert float(joined[k, b]) == pytest.approx(_stepwise_log_pi(base, wb, pk, 1.0))
