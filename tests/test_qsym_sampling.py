"""Draws from q_sym are g . w with w ~ q and g ~ Uniform(G), a fresh g per draw (issue 12, item 13).

``q`` is a narrow mean-field Gaussian (scale 1e-3) whose hidden neurons have biases 1, 2, 3, ...
so that each draw reveals its group element exactly: slot ``j`` of a layer holds neuron
``src`` (nearest bias magnitude) with sign ``sign(bias)``, and the whole draw must then equal
``g . mean`` on every site (one element per draw, acting on all sites alike). Chi-square tests
(scipy) then check that the element is uniform over G (per slot and jointly) and that the
elements of different draws are independent (pairs of draws within a batch, along every batch
dim, and across calls). Planted bugs that these catch: draws of ``q`` passed for draws of
``q_sym`` (never permuting), and one ``g`` shared by all draws of a batch.
"""

import itertools

import pyro
import pyro.distributions as dist
import pytest
import scipy.stats
import torch
from pyro.infer.autoguide import AutoDiagonalNormal

import pyro_symmetry as ps
from pyro_symmetry.groups import encode_signed
from pyro_symmetry.models import BayesianMLP

ALPHA = 1e-4  # every chi-square below must reach at least this p-value (fixed seeds: deterministic)
M = 4000  # draws per test


def _model():
    return BayesianMLP(2, [3, 2], 1, activation="tanh", likelihood="regression")  # |G| = 3! 2^3 * 2! 2^2 = 384


def _means(model, dtype=torch.float64):
    g = torch.Generator().manual_seed(0)
    loc = {k: torch.randn(s, generator=g, dtype=dtype) for k, s in model.spec.shapes.items()}
    loc["fc1.bias"] = torch.tensor([1.0, 2.0, 3.0], dtype=dtype)
    loc["fc2.bias"] = torch.tensor([1.0, 2.0], dtype=dtype)
    return loc


def _q(model, scale=1e-3):
    return {k: dist.Normal(v, scale).to_event(v.dim()) for k, v in _means(model).items()}


def _elements(model, draws):
    """The group element of each draw ``site -> (M, *shape)``, checked against every site."""
    means = _means(model, draws["fc1.bias"].dtype)
    perm = {}
    for g, bias in (("fc1", draws["fc1.bias"]), ("fc2", draws["fc2.bias"])):
        src = (bias.abs().unsqueeze(-1) - means[f"{g}.bias"]).abs().argmin(-1)
        perm[g] = encode_signed(src, bias < 0)
    model.spec.validate(perm)
    expected = model.spec.apply({k: v.expand(len(perm["fc1"]), *v.shape) for k, v in means.items()}, perm)
    for k in model.spec.sites:  # one element moves every site of the draw
        assert (draws[k] - expected[k]).abs().max() < 0.05, k
    return perm


def _codes(model, perm):
    """Each draw's element as an index into the enumeration of G, shape (M,)."""
    elements = model.spec.elements()
    table = {tuple(itertools.chain(*(elements[g][e].tolist() for g in ("fc1", "fc2")))): e for e in range(384)}
    rows = torch.cat([perm["fc1"], perm["fc2"]], -1).tolist()
    return torch.tensor([table[tuple(r)] for r in rows])


def _assert_uniform(counts, what):
    counts = torch.as_tensor(counts, dtype=torch.float64).flatten()
    p = scipy.stats.chisquare(counts.numpy()).pvalue
    assert p > ALPHA, (what, p, counts.tolist())


def _check_uniform(model, perm):
    """Which (neuron, sign) lands in each slot: uniform over the 2n choices; and the whole
    element: uniform over the 384 elements of G."""
    for g, p in perm.items():
        n = p.shape[-1]
        for j in range(n):
            idx = torch.where(p[:, j] < 0, ~p[:, j] + n, p[:, j])
            _assert_uniform(torch.bincount(idx, minlength=2 * n), f"{g} slot {j}")
    _assert_uniform(torch.bincount(_codes(model, perm), minlength=384), "G")


def _check_independent(a, b, what):
    """Pairs (slot 0 of fc1 in draw a, in draw b): uniform over the 6 x 6 pairs."""
    n = 3

    def cell(p):
        return torch.where(p[:, 0] < 0, ~p[:, 0] + n, p[:, 0])

    _assert_uniform(torch.bincount(cell(a["fc1"]) * 2 * n + cell(b["fc1"]), minlength=36), what)
    same = (_codes_fc(a) == _codes_fc(b)).double().mean()  # P(g_a = g_b) = 1 / 48 for fc1
    assert abs(float(same) - 1 / 48) < 5 * (1 / 48 * 47 / 48 / len(a["fc1"])) ** 0.5, (what, float(same))


def _codes_fc(p):
    return (p["fc1"] + 3).matmul(torch.tensor([1, 7, 49]))  # distinct signed tuples -> distinct codes


def _flat(model, q):
    layout = ps.FlatLayout(model.spec.shapes)
    loc = layout.to_flat({k: d.base_dist.loc for k, d in q.items()})
    scale = layout.to_flat({k: d.base_dist.scale for k, d in q.items()})
    return dist.Normal(loc, scale).to_event(1), layout


def _draws(model, how, shape):
    q = _q(model)
    if how in ("sample", "rsample"):
        q_sym = ps.Symmetrized(q, model.spec, estimator="exact")
        return lambda: getattr(q_sym, how)(shape)
    fq, layout = _flat(model, q)
    q_sym = ps.Symmetrized(fq, model.spec, estimator="exact", layout=layout)
    return lambda: layout.from_flat(getattr(q_sym, how.split("-")[1])(shape))


@pytest.mark.parametrize("how", ["sample", "rsample", "flat-sample", "flat-rsample"])
def test_symmetrized_draws_are_uniform_over_the_group(how):
    model = _model()
    torch.manual_seed(0)
    w = _draws(model, how, (M,))()
    _check_uniform(model, _elements(model, w))


@pytest.mark.parametrize("how", ["sample", "flat-rsample"])
def test_symmetrized_draws_have_independent_elements(how):
    model = _model()
    torch.manual_seed(1)
    draw = _draws(model, how, (M // 4, 2, 2))
    w = draw()
    perm = _elements(model, {k: v.reshape(M, *v.shape[3:]) for k, v in w.items()})
    p = {g: x.reshape(M // 4, 2, 2, -1) for g, x in perm.items()}
    _check_uniform(model, perm)
    _check_independent({g: x[:, 0, 0] for g, x in p.items()}, {g: x[:, 1, 0] for g, x in p.items()}, "dim 1")
    _check_independent({g: x[:, 0, 1] for g, x in p.items()}, {g: x[:, 0, 0] for g, x in p.items()}, "dim 2")
    half = M // 8
    first = {g: x[:half, 1, 1] for g, x in p.items()}
    second = {g: x[half : 2 * half, 1, 1] for g, x in p.items()}
    _check_independent(first, second, "dim 0")
    # a second call draws new elements
    again = _elements(model, {k: v.reshape(M, *v.shape[3:]) for k, v in draw().items()})
    _check_independent(perm, again, "calls")


def _fitted_guide(kind, model):
    """A fitted guide whose q has the narrow q's means (set through its parameters), scale 1e-3."""
    x, y = torch.randn(4, 2), torch.randn(4)
    means = _means(model, torch.float32)
    if kind == "normal":
        guide = ps.AutoSymmetrizedNormal(model, num_permutations=2, init_scale=1e-3)
        guide(x, y)
        params = dict(guide.named_parameters())
        with torch.no_grad():
            for k, v in means.items():
                params[f"locs.{k}_unconstrained"].copy_(v)
        return guide, x
    guide = ps.Symmetrize(AutoDiagonalNormal(model, init_scale=1e-3), model.spec, num_permutations=2)
    guide(x, y)
    with torch.no_grad():
        guide.guide.loc.copy_(ps.FlatLayout.from_guide(guide.guide).to_flat(means))
    return guide, x


@pytest.mark.parametrize("kind", ["normal", "symmetrize"])
@pytest.mark.parametrize("how", ["sample_posterior", "symmetrized"])
def test_guides_draw_q_sym(kind, how):
    model = _model()
    guide, x = _fitted_guide(kind, model)
    torch.manual_seed(2)
    if how == "sample_posterior":
        w = guide.sample_posterior(M)
    else:
        with pyro.plate("draws", M, dim=-1):  # vectorized draws, as Predictive(parallel=True) makes
            w = guide.symmetrized()(x)
        w = {k: w[k].reshape(M, *model.spec.shapes[k]) for k in model.spec.sites}
    perm = _elements(model, w)
    _check_uniform(model, perm)
    _check_independent({g: x[: M // 2] for g, x in perm.items()}, {g: x[M // 2 :] for g, x in perm.items()}, how)
