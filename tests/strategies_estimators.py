"""Helpers shared by the symmetrized-posterior tests: small architectures whose group
can be enumerated, random mean-field posteriors, and an independent brute force
for ``log q_sym`` written with explicit (signed) permutation matrices."""

from __future__ import annotations

import itertools
import math

import pyro.distributions as dist
import torch
from hypothesis import strategies as st

#: Largest |G| the property tests enumerate.
MAX_TEST_ORDER = 2000


def _order(hidden, signed):
    return math.prod(math.factorial(h) * (2**h if signed else 1) for h in hidden)


@st.composite
def small_architectures(draw, max_order: int = MAX_TEST_ORDER):
    """``(in, hidden, out, activation)`` with ``|G| <= max_order``."""
    act = draw(st.sampled_from(["relu", "tanh"]))
    hidden = tuple(draw(st.lists(st.integers(1, 4), min_size=1, max_size=2)))
    if _order(hidden, act == "tanh") > max_order:
        hidden = hidden[:1]
    return draw(st.integers(1, 3)), hidden, draw(st.integers(1, 3)), act


def mean_field(shapes, seed, dtype=torch.float64, loc_scale=0.6, min_scale=0.3):
    """Random ``site -> Normal(loc, scale).to_event(...)`` over the given shapes."""
    g = torch.Generator().manual_seed(seed)
    out = {}
    for k, s in shapes.items():
        loc = torch.randn(s, generator=g, dtype=dtype) * loc_scale
        scale = torch.rand(s, generator=g, dtype=dtype) * 0.5 + min_scale
        out[k] = dist.Normal(loc, scale).to_event(len(s))
    return out


def _signed_perm_matrices(n, signed, dtype):
    mats = []
    for p in itertools.permutations(range(n)):
        for signs in itertools.product([1.0, -1.0], repeat=n) if signed else [(1.0,) * n]:
            m = torch.zeros(n, n, dtype=dtype)
            m[list(range(n)), list(p)] = torch.tensor(signs, dtype=dtype)
            mats.append(m)
    return torch.stack(mats)


def brute_force_log_q_sym(q, w, hidden, signed, names=None, bias=True):
    """``log (1/|G|) sum_g q(g . w)`` for an MLP, by explicit matrices.

    ``W_l -> P_l W_l P_{l-1}^T``, ``b_l -> P_l b_l`` for every tuple of signed
    permutation matrices ``(P_1, ..., P_{L-1})``; ``w`` is unbatched.
    """
    L = len(hidden) + 1
    names = names or [f"fc{i + 1}" for i in range(L)]
    dtype = w[f"{names[0]}.weight"].dtype
    per_layer = [_signed_perm_matrices(n, signed, dtype) for n in hidden]
    logs = []
    for mats in itertools.product(*per_layer):
        P = [None, *mats, None]
        total = 0.0
        for l, name in enumerate(names, start=1):
            W = w[f"{name}.weight"]
            if P[l] is not None:
                W = P[l] @ W
            if P[l - 1] is not None:
                W = W @ P[l - 1].T
            total = total + q[f"{name}.weight"].log_prob(W)
            if bias:
                b = w[f"{name}.bias"]
                if P[l] is not None:
                    b = P[l] @ b
                total = total + q[f"{name}.bias"].log_prob(b)
        logs.append(total)
    return torch.logsumexp(torch.stack(logs), 0) - math.log(len(logs))
