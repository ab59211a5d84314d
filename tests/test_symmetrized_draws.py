"""Draws from ``q_sym`` really are draws from the uniform mixture over the group.

``q`` puts its hidden neurons far apart (row ``i`` of ``fc1.weight`` near ``(i + 1) * c``,
scales 0.01), so which source neuron (and sign) lands in each slot of a draw is readable.
Under ``q_sym`` the signed permutation of a draw is uniform over the group and independent
across draws; a sampler that never permutes, or that uses one ``g`` for a whole batch, puts
every draw in one cell. Chi-square tests on fixed seeds (p > 1e-3).
"""

import itertools
import math

import pytest
import torch
from pyro.infer import Predictive
from pyro.infer.autoguide import AutoDiagonalNormal
from scipy import stats

import pyro_symmetry as ps
from pyro_symmetry.models import BayesianMLP

WIDTH = 3
N = 2400  # 48 signed permutations of 3 neurons: 50 draws per cell
CENTRES = torch.tensor([[1.0, 0.5], [2.0, 1.0], [3.0, 1.5]]) * 5.0  # rows of fc1.weight


def _init_loc(site):
    """Separated neurons: row i of fc1.weight near CENTRES[i]; everything else at 0."""
    if site["name"] == "fc1.weight":
        return CENTRES.clone()
    return torch.zeros_like(site["fn"].sample())


def _data():
    g = torch.Generator().manual_seed(0)
    return torch.randn(6, 2, generator=g), torch.randint(0, 2, (6,), generator=g)


def _guide(kind, act):
    model = BayesianMLP(2, [WIDTH], 2, activation=act)
    if kind in ("AutoSymmetrizedNormal", "AutoSymmetrizedMeanField"):
        cls = getattr(ps, kind)
        guide = cls(model, init_loc_fn=_init_loc, init_scale=0.01, num_permutations=2)
    else:
        guide = ps.Symmetrize(AutoDiagonalNormal(model, init_loc_fn=_init_loc, init_scale=0.01), num_permutations=2)
    x, y = _data()
    guide(x, y)
    return model, guide, x, y


def _signed_permutations(w):
    """``(S, WIDTH)`` signed source index of each slot, ``~i`` for a flipped neuron ``i``,
    read off draws ``w`` of ``fc1.weight`` ``(S, WIDTH, 2)``."""
    cand = torch.cat([CENTRES, -CENTRES])  # (2 WIDTH, 2): +i, then -i
    d = (w.unsqueeze(-2) - cand).norm(dim=-1)  # (S, WIDTH, 2 WIDTH)
    best = d.argmin(-1)
    assert float(d.min(-1).values.max()) < 1.0, "a draw is not near any neuron of q"
    src = best % WIDTH
    return torch.where(best < WIDTH, src, ~src)


def _cells(perms, signed):
    """Index of each draw's element among all (signed) permutations."""
    n = WIDTH
    index = {}
    for p in itertools.permutations(range(n)):
        for signs in itertools.product([False, True], repeat=n if signed else 0):
            key = tuple(~i if (signed and s) else i for i, s in zip(p, signs or (False,) * n))
            index[key] = len(index)
    assert len(index) == math.factorial(n) * (2**n if signed else 1)
    return torch.tensor([index[tuple(int(v) for v in row)] for row in perms]), len(index)


def _assert_uniform_and_independent(w, signed):
    perms = _signed_permutations(w.reshape(-1, WIDTH, 2))
    cells, k = _cells(perms, signed)
    counts = torch.bincount(cells, minlength=k).double()
    p = stats.chisquare(counts.numpy()).pvalue
    assert p > 1e-3, f"the draws' group elements are not uniform (chi-square p = {p:.2g}; counts {counts.tolist()})"
    # consecutive draws: the (slot-0 source, sign) of draws 2t and 2t+1 are independent and uniform
    slot0 = perms[:, 0]
    a = (slot0 % WIDTH) + WIDTH * (slot0 < 0) if signed else slot0
    m = 2 * WIDTH if signed else WIDTH
    pairs = a[0::2] * m + a[1::2]
    pair_counts = torch.bincount(pairs, minlength=m * m).double()
    p = stats.chisquare(pair_counts.numpy()).pvalue
    assert p > 1e-3, f"consecutive draws are not independent (chi-square p = {p:.2g})"


@pytest.mark.parametrize("act", ["tanh", "relu"])
@pytest.mark.parametrize("kind", ["AutoSymmetrizedNormal", "AutoSymmetrizedMeanField", "Symmetrize"])
def test_sample_posterior_draws_are_uniform_over_the_group(kind, act):
    _, guide, _, _ = _guide(kind, act)
    draws = guide.sample_posterior(N)
    _assert_uniform_and_independent(draws["fc1.weight"], signed=act == "tanh")
    # and q itself (symmetrized=False) never moves a neuron
    plain = _signed_permutations(guide.sample_posterior(200, symmetrized=False)["fc1.weight"])
    assert torch.equal(plain, torch.arange(WIDTH).expand(200, WIDTH))


@pytest.mark.parametrize("parallel", [True, False])
@pytest.mark.parametrize("kind", ["AutoSymmetrizedNormal", "AutoSymmetrizedMeanField", "Symmetrize"])
def test_symmetrized_sampler_draws_are_uniform_over_the_group(kind, parallel):
    # one guide call per draw without ``parallel``: fewer draws, unsigned (6 cells, 50 draws each)
    act, n = ("tanh", N) if parallel else ("relu", 300)
    model, guide, x, y = _guide(kind, act)
    out = Predictive(model, guide=guide.symmetrized(), num_samples=n, parallel=parallel, return_sites=["fc1.weight"])(x)
    w = out["fc1.weight"].reshape(n, WIDTH, 2)
    _assert_uniform_and_independent(w, signed=act == "tanh")
    # every sample has its own w, not only its own g: undo g and compare the draws
    perms = _signed_permutations(w)
    src, flip = torch.where(perms < 0, ~perms, perms), (perms < 0).unsqueeze(-1)
    unmoved = torch.zeros_like(w).scatter_(1, src.unsqueeze(-1).expand(-1, -1, 2), torch.where(flip, -w, w))
    assert len({tuple(u.flatten().tolist()) for u in unmoved}) == n
