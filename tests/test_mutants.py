"""Tests that kill the planted bugs of ``tools/mutation.py`` which once survived the suite
(issue 12, item 13): chunk boundaries of the group action and of exact enumeration.

Chunk sizes are made small (module constants read at call time) so that batches split at
every boundary, and the chunked result is compared with a loop over single samples (which
never chunks) and with an independent reference: explicit signed permutation matrices for
the action, brute-force enumeration of ``G`` with matrices for ``log q_sym``. One test also
runs the action at its real chunk size, on a batch of more than 4 MB.
"""

import functools
import math

import pytest
import torch
from strategies import group_element, mlp_params, model_params
from strategies_estimators import brute_force_log_q_sym, mean_field

import pyro_symmetry as ps
from pyro_symmetry.estimators import BaseDensity, exact, exact_log_ratio
from pyro_symmetry.groups import _indexing, decode_signed
from pyro_symmetry.models import BayesianCNN, BayesianMLP


def _matrix(index):
    """Signed permutation matrix ``P`` with ``(P x)[i] = s_i x[src_i]`` for a signed index ``(n,)``."""
    src, neg = decode_signed(index)
    n = src.shape[0]
    m = torch.zeros(n, n, dtype=torch.float64)
    m[torch.arange(n), src] = torch.where(neg, -1.0, 1.0).to(torch.float64)
    return m


def _by_matrices(params, perm, hidden):
    """``W_l -> P_l W_l P_{l-1}^T``, ``b_l -> P_l b_l`` for one unbatched sample."""
    mats = [None, *(_matrix(perm[f"fc{i + 1}"]) for i in range(len(hidden))), None]
    out = {}
    for l in range(1, len(hidden) + 2):
        w, b = params[f"fc{l}.weight"], params[f"fc{l}.bias"]
        if mats[l] is not None:
            w, b = mats[l] @ w, mats[l] @ b
        if mats[l - 1] is not None:
            w = w @ mats[l - 1].T
        out[f"fc{l}.weight"], out[f"fc{l}.bias"] = w, b
    return out


def _set_samples_per_chunk(monkeypatch, params, samples):
    """Make one chunk of :func:`gather_axes` hold ``samples`` samples of the largest site."""
    per_sample = max(v[0].numel() * v.element_size() for v in params.values())
    monkeypatch.setattr(_indexing, "CHUNK_BYTES", samples * per_sample)


@pytest.mark.parametrize("samples", [1, 2, 3, 5])
@pytest.mark.parametrize("broadcast", ["both", "weights", "elements"])
def test_apply_in_small_chunks_equals_a_loop_and_matrices(monkeypatch, samples, broadcast):
    hidden = [3, 4]
    sizes = [2, *hidden, 3]
    spec = ps.mlp_spec(["fc1", "fc2", "fc3"], hidden, activation_symmetry="sign")
    B = 7  # not a multiple of the chunk sizes: the last chunk is partial
    params = mlp_params(sizes, batch_shape=() if broadcast == "elements" else (B,), seed=1)
    perm = group_element(spec, 2, batch_shape=() if broadcast == "weights" else (B,))
    _set_samples_per_chunk(monkeypatch, params, samples)
    out = spec.apply(params, perm)
    for i in range(B):
        w_i = {k: v if broadcast == "elements" else v[i] for k, v in params.items()}
        g_i = {k: p if broadcast == "weights" else p[i] for k, p in perm.items()}
        one = spec.apply(w_i, g_i)  # a single sample is never chunked
        ref = _by_matrices(w_i, g_i, hidden)
        for k in spec.sites:
            assert torch.equal(out[k][i], one[k]), (k, i)
            assert torch.equal(out[k][i], ref[k]), (k, i)


@pytest.mark.parametrize("samples", [1, 2, 3])
def test_conv_apply_in_small_chunks_equals_a_loop(monkeypatch, samples):
    """Conv weights move along two axes and the flattened linear layer in blocks (``inner > 1``)."""
    model = BayesianCNN(2, (4, 4), [3, 2], 2, activation="tanh")
    spec = model.spec
    params = model_params(model, batch_shape=(5,), seed=3)
    perm = group_element(spec, 4, batch_shape=(5,))
    expected = [spec.apply({k: v[i] for k, v in params.items()}, {k: p[i] for k, p in perm.items()}) for i in range(5)]
    _set_samples_per_chunk(monkeypatch, params, samples)
    out = spec.apply(params, perm)
    for i in range(5):
        for k in spec.sites:
            assert torch.equal(out[k][i], expected[i][k]), (k, i)


def test_apply_on_a_batch_over_the_real_chunk_size():
    """A batch of ~8 MB for the hidden-to-hidden weight: several chunks at the default
    :data:`CHUNK_BYTES` (4 MB); every sample is moved by its own element."""
    hidden = [48, 48]
    spec = ps.mlp_spec(["fc1", "fc2", "fc3"], hidden, activation_symmetry="sign")
    B = 2 * _indexing.CHUNK_BYTES // (48 * 48 * 4) + 1  # float32 fc2.weight: > 2 chunks
    params = mlp_params([3, *hidden, 2], batch_shape=(B,), dtype=torch.float32, seed=5)
    assert params["fc2.weight"].numel() * 4 > 2 * _indexing.CHUNK_BYTES
    perm = group_element(spec, 6, batch_shape=(B,))
    out = spec.apply(params, perm)
    for i in [0, B // 2 - 1, B // 2, B - 2, B - 1] + list(range(1, B, 97)):
        one = spec.apply({k: v[i] for k, v in params.items()}, {k: p[i] for k, p in perm.items()})
        for k in spec.sites:
            assert torch.equal(out[k][i], one[k]), (k, i)


@functools.cache
def _exact_case(batch):
    """A mean-field ``q`` on widths (3, 2) with tanh (|G| = 384), draws ``w`` and the
    brute-force ``log q_sym(w) - log q(w)`` (computed once per batch shape)."""
    hidden = (3, 2)
    spec = BayesianMLP(2, list(hidden), 2, activation="tanh").spec
    q = mean_field(spec.shapes, seed=7)
    base = BaseDensity(q, spec)
    gen = torch.Generator().manual_seed(8)
    w = {k: torch.randn(batch + s, generator=gen, dtype=torch.float64) * 0.6 for k, s in spec.shapes.items()}
    flat = {k: v.reshape((-1,) + spec.shapes[k]) for k, v in w.items()}
    rows = next(iter(flat.values())).shape[0]
    brute = torch.stack(
        [brute_force_log_q_sym(q, {k: v[i] for k, v in flat.items()}, hidden, True) for i in range(rows)]
    )
    return base, w, brute.reshape(batch) - base.log_prob(w)


@pytest.mark.parametrize("elements", [1, 7, 50, 383])
@pytest.mark.parametrize("batch", [(), (3,)])
def test_exact_enumeration_in_small_chunks_equals_brute_force(monkeypatch, elements, batch):
    """|G| = 384 enumerated ``elements`` at a time (the last chunk partial): any chunk left
    out or repeated changes ``log q_sym``."""
    base, w, expected = _exact_case(batch)
    assert base.spec.order == 384
    dim = sum(torch.Size(s).numel() for s in base.spec.shapes.values())
    monkeypatch.setattr(exact, "_CHUNK_ELEMENTS", elements * dim * max(1, math.prod(batch)))
    got = exact_log_ratio(base, w)
    assert got.shape == torch.Size(batch)
    assert torch.allclose(got, expected, rtol=0, atol=1e-10), (got, expected)
