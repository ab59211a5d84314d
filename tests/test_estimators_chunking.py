"""Chunk boundaries of the estimators (issue 12, items 9 and 13).

``CHUNK_BYTES`` (pyro_symmetry/estimators/_base.py) is made small so that the rows of
elements x draws split at every boundary (1, 2, 3, 7 rows per chunk, and one chunk), and
the results are compared with one-row-at-a-time loops, explicit permutation matrices and
the unchunked evaluation (same random numbers: the same result, to the last bit).
"""

import math

import pyro.distributions as dist
import pytest
import torch
from strategies_estimators import brute_force_log_q_sym, mean_field

import pyro_symmetry as ps
from pyro_symmetry.estimators import (
    BaseDensity,
    _base,
    contrastive_log_ratio,
    exact_log_ratio,
    importance,
    importance_log_ratio,
    information,
)
from pyro_symmetry.estimators.importance import plackett_luce_proposal, proposal_log_prob
from pyro_symmetry.groups import decode_signed
from pyro_symmetry.models import BayesianCNN, BayesianMLP

ROWS = [1, 2, 3, 7, None]  # rows per chunk (None: everything at once)


def _model(kind):
    if kind == "mlp-relu":
        return BayesianMLP(3, [4], 2)
    if kind == "mlp-tanh":
        return BayesianMLP(2, [3, 2], 2, activation="tanh")
    return BayesianCNN(2, (4, 4), [3, 2], 2, activation="tanh")


def _base_of(model, flat, seed=0):
    q = mean_field(model.spec.shapes, seed)
    if not flat:
        return q, BaseDensity(q, model.spec)
    layout = ps.FlatLayout(model.spec.shapes)
    loc = layout.to_flat({k: d.base_dist.loc for k, d in q.items()})
    scale = layout.to_flat({k: d.base_dist.scale for k, d in q.items()})
    return q, BaseDensity(dist.Normal(loc, scale).to_event(1), model.spec, layout)


def _set_rows(monkeypatch, base, rows, itemsize=8, extra=0):
    """Make one chunk hold exactly ``rows`` rows (``extra`` bytes each on top of the copy)."""
    if rows is not None:
        monkeypatch.setattr(_base, "CHUNK_BYTES", rows * (base.row_bytes(itemsize) + extra))


def _set_block_rows(monkeypatch, base, rows, itemsize=8):
    """Make one block of the importance estimator hold ``rows`` rows of elements x draws."""
    if rows is not None:
        row, draw = importance._block_costs(base, itemsize)
        monkeypatch.setattr(_base, "CHUNK_BYTES", rows * row + draw)


def _spy_rows(monkeypatch):
    """Record the number of rows of every permuted copy made."""
    seen = []
    act = BaseDensity.act

    def spy(self, value, perm):
        out = act(self, value, perm)
        ref = self.reference(out) if self.is_flat else out[self.spec.sites[0]]
        nd = 1 if self.is_flat else len(self.spec.shapes[self.spec.sites[0]])
        seen.append(math.prod(ref.shape[: ref.dim() - nd]))
        return out

    monkeypatch.setattr(BaseDensity, "act", spy)
    return seen


def _matrix(p, signed):
    """The signed permutation matrix M with (M x)[j] = +-x[src_j]."""
    src, neg = decode_signed(p)
    m = torch.zeros(len(p), len(p), dtype=torch.float64)
    m[torch.arange(len(p)), src] = torch.where(neg, -1.0, 1.0).double() if signed else 1.0
    return m


def _explicit_log_q(q, w, spec, perm):
    """``log q(g . w)`` of an MLP by explicit matrices: ``W_l -> M_l W_l M_{l-1}^T``, ``b_l -> M_l b_l``."""
    names = sorted({k.split(".")[0] for k in q})
    perm = perm or spec.identity()
    mats = [None] + [_matrix(perm[n], spec.groups[n].signed) for n in names[:-1]] + [None]
    total = 0.0
    for i, name in enumerate(names, start=1):
        W, b = w[f"{name}.weight"], w[f"{name}.bias"]
        if mats[i] is not None:
            W, b = mats[i] @ W, mats[i] @ b
        if mats[i - 1] is not None:
            W = W @ mats[i - 1].T
        total = total + q[f"{name}.weight"].log_prob(W) + q[f"{name}.bias"].log_prob(b)
    return total


@pytest.mark.parametrize("rows", ROWS)
@pytest.mark.parametrize("flat", [False, True], ids=["sites", "flat"])
@pytest.mark.parametrize("kind", ["mlp-relu", "mlp-tanh", "cnn-tanh"])
def test_log_prob_acted_in_chunks_equals_a_row_loop_and_matrices(monkeypatch, kind, flat, rows):
    model = _model(kind)
    q, base = _base_of(model, flat)
    torch.manual_seed(0)
    w = base.sample((4,))
    gen = torch.Generator().manual_seed(1)
    perm = model.spec.sample((5, 4), generator=gen)
    perm_b = model.spec.sample((3, 1), generator=gen)  # broadcast over the draws
    unchunked = base.log_prob_acted(w, perm), base.log_prob_acted(w, perm_b), base.log_kernel(w)
    _set_rows(monkeypatch, base, rows)
    seen = _spy_rows(monkeypatch)
    chunked = base.log_prob_acted(w, perm), base.log_prob_acted(w, perm_b), base.log_kernel(w)
    for a, b in zip(chunked, unchunked):
        assert torch.equal(a, b)
    assert chunked[0].shape == (5, 4) and chunked[1].shape == (3, 4)
    if rows is not None:
        assert max(seen) <= rows  # no chunk holds more permuted copies than it may
    sites = base.layout.from_flat(w) if flat else w
    for e in range(5):
        for b in range(4):
            wb = {k: v[b] for k, v in sites.items()}
            pb = {g: p[e, b] for g, p in perm.items()}
            one = base.log_prob_acted(w[b] if flat else wb, pb)
            assert torch.equal(one, chunked[0][e, b])  # a loop over single rows: the same numbers
            if kind != "cnn-tanh":
                expected = _explicit_log_q(q, wb, model.spec, pb) - _explicit_log_q(q, wb, model.spec, {})
                assert float(chunked[0][e, b] - chunked[2][b]) == pytest.approx(float(expected), abs=1e-9)


@pytest.mark.parametrize("rows", [2, 7, None])
@pytest.mark.parametrize("kind", ["mlp-tanh", "cnn-tanh"])
def test_exact_enumeration_in_chunks_equals_brute_force(monkeypatch, kind, rows):
    model = _model(kind)
    q, base = _base_of(model, False, seed=2)
    torch.manual_seed(1)
    w = base.sample((3,))
    reference = exact_log_ratio(base, w)
    if kind == "mlp-tanh":
        brute = torch.stack(
            [brute_force_log_q_sym(q, {k: v[i] for k, v in w.items()}, (3, 2), signed=True) for i in range(3)]
        )
        assert torch.allclose(reference, brute - base.log_prob(w), atol=1e-9)
    _set_rows(monkeypatch, base, rows)
    assert torch.allclose(exact_log_ratio(base, w), reference, rtol=0, atol=1e-12)


@pytest.mark.parametrize("rows", [1, 3, None])
@pytest.mark.parametrize("flat", [False, True], ids=["sites", "flat"])
@pytest.mark.parametrize("kind", ["mlp-relu", "mlp-tanh", "cnn-tanh"])
def test_stochastic_estimators_in_chunks_equal_unchunked(monkeypatch, kind, flat, rows):
    model = _model(kind)
    _, base = _base_of(model, flat, seed=3)
    torch.manual_seed(2)
    w = base.sample((2, 2))  # two batch dims

    def run():
        con = contrastive_log_ratio(base, w, 6, torch.Generator().manual_seed(5))
        imp = importance_log_ratio(base, w, 6, 1.0, torch.Generator().manual_seed(5))
        perm, log_pi = plackett_luce_proposal(base, w, 6, 1.0, torch.Generator().manual_seed(5))
        return con, imp, perm, log_pi

    con, imp, perm, log_pi = run()
    _set_rows(monkeypatch, base, rows)
    seen = _spy_rows(monkeypatch)
    con2, imp2, perm2, log_pi2 = run()
    assert con.shape == imp.shape == (2, 2)
    assert torch.equal(con, con2) and all(torch.equal(perm[g], perm2[g]) for g in perm)
    # the proposal's scores come from batched matrix products, exact to float rounding
    assert torch.allclose(imp, imp2, rtol=1e-12, atol=1e-12)
    assert torch.allclose(log_pi, log_pi2, rtol=1e-12, atol=1e-12)
    if rows is not None:
        assert max(seen) <= rows
    # the importance estimate, rebuilt draw by draw from its proposal
    for i in range(2):
        for j in range(2):
            wij = w[i, j] if flat else {k: v[i, j] for k, v in w.items()}
            pij = {g: p[:, i, j] for g, p in perm.items()}
            assert torch.allclose(proposal_log_prob(base, wij, pij), log_pi[:, i, j], atol=1e-9)
            logs = base.log_prob_acted(wij, pij) - base.log_kernel(wij) - log_pi[:, i, j] - model.spec.log_order
            assert float(imp[i, j]) == pytest.approx(float(torch.logsumexp(logs, 0) - math.log(6)), abs=1e-9)


@pytest.mark.parametrize("rows", [1, 3, 4, 9, 20, None])
def test_importance_blocks(monkeypatch, rows):
    """Blocks of elements x draws: part of one draw's K = 4 elements (1, 3 rows), whole draws
    (4 rows: one draw, 9: two, 20: five, the last block partial), or everything at once."""
    model = _model("mlp-tanh")
    _, base = _base_of(model, False)
    torch.manual_seed(0)
    w = base.sample((6,))
    reference = importance_log_ratio(base, w, 4, 0.5, torch.Generator().manual_seed(0))
    ref_perm, ref_lp = plackett_luce_proposal(base, w, 4, 0.5, torch.Generator().manual_seed(0))
    _set_block_rows(monkeypatch, base, rows)
    chunked = importance_log_ratio(base, w, 4, 0.5, torch.Generator().manual_seed(0))
    assert torch.allclose(chunked, reference, rtol=1e-12, atol=1e-12)
    perm, lp = plackett_luce_proposal(base, w, 4, 0.5, torch.Generator().manual_seed(0))
    assert all(torch.equal(perm[g], ref_perm[g]) for g in perm)
    assert torch.allclose(lp, ref_lp, rtol=1e-12, atol=1e-12)
    for p in perm.values():  # slot 0 of every draw is the identity, and only slot 0
        assert torch.equal(p[0], torch.arange(p.shape[-1]).expand_as(p[0]))
        assert not (p[1:] == torch.arange(p.shape[-1])).all(-1).all()


@pytest.mark.parametrize("method", ["contrastive", "importance"])
def test_gradients_through_chunks_equal_unchunked(monkeypatch, method):
    """Under autograd each chunk is recomputed in the backward pass; the gradients are the same."""
    model = _model("mlp-tanh")
    q = mean_field(model.spec.shapes, 0)
    params = {k: (d.base_dist.loc.clone().requires_grad_(), d.base_dist.scale.clone()) for k, d in q.items()}

    def grads():
        base = BaseDensity(params, model.spec)
        torch.manual_seed(0)
        w = base.sample((5,), reparam=True)
        fn = contrastive_log_ratio if method == "contrastive" else importance_log_ratio
        extra = () if method == "contrastive" else (1.0,)
        out = fn(base, w, 6, *extra, torch.Generator().manual_seed(0))
        return torch.autograd.grad(out.sum(), [params[k][0] for k in model.spec.sites]), out

    g0, out0 = grads()
    monkeypatch.setattr(_base, "CHUNK_BYTES", 2 * BaseDensity(params, model.spec).row_bytes(8))
    calls = []
    ckpt = torch.utils.checkpoint.checkpoint
    monkeypatch.setattr(torch.utils.checkpoint, "checkpoint", lambda *a, **k: calls.append(1) or ckpt(*a, **k))
    g1, out1 = grads()
    assert calls  # the chunks were checkpointed, not kept
    assert torch.equal(out0, out1)
    for a, b in zip(g0, g1):
        assert torch.allclose(a, b, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("method", ["exact", "contrastive", "importance"])
@pytest.mark.parametrize("batch_size", [1, 3, 7, 20])
def test_mutual_information_batches_equal_a_loop(method, batch_size):
    """Every draw is estimated once, in batches of ``batch_size`` (the last one partial)."""
    model = _model("mlp-tanh")
    q, base = _base_of(model, False, seed=4)
    kwargs = {"num_permutations": 5} if method != "exact" else {}
    torch.manual_seed(batch_size)  # the global RNG plays no part: the generator seeds the draws of w
    est = ps.mutual_information(
        q, model.spec, method, 20, batch_size=batch_size, generator=torch.Generator().manual_seed(1), **kwargs
    )
    gen = torch.Generator().manual_seed(1)
    torch.manual_seed(int(torch.randint(2**62, (1,), generator=gen)))  # the draws' forked RNG
    terms = []
    for start in range(0, 20, batch_size):
        w = base.sample((min(batch_size, 20 - start),))
        if method == "exact":
            terms += [-exact_log_ratio(base, {k: v[i] for k, v in w.items()}) for i in range(len(w["fc1.bias"]))]
        elif method == "contrastive":
            terms += list(-contrastive_log_ratio(base, w, 5, gen))
        else:
            terms += list(-importance_log_ratio(base, w, 5, 1.0, gen))
    t = torch.stack(terms).double()
    assert len(terms) == 20
    assert est.value == pytest.approx(float(t.mean()), abs=1e-12)
    assert est.stderr == pytest.approx(float(t.std() / math.sqrt(20)), abs=1e-12)


@pytest.mark.parametrize("method", ["contrastive", "importance"])
def test_mutual_information_does_not_depend_on_the_chunk_size(monkeypatch, method):
    model = _model("cnn-tanh")
    q, base = _base_of(model, False, seed=5)

    def run():
        torch.manual_seed(0)
        return ps.mutual_information(q, model.spec, method, 12, 8, generator=torch.Generator().manual_seed(0))

    reference = run()
    _set_block_rows(monkeypatch, base, 5)  # 5 rows of elements x draws per block
    assert run() == reference


def test_progress_bar(monkeypatch, capsys):
    model = _model("mlp-relu")
    q, _ = _base_of(model, False)

    def run(**kw):
        torch.manual_seed(0)
        return ps.mutual_information(q, model.spec, "importance", 12, 4, batch_size=5, **kw)

    quiet = run()
    assert capsys.readouterr().err == ""  # a quick estimate shows no bar by default
    assert run(progress=True) == quiet
    assert "I(g; w), importance" in capsys.readouterr().err  # the bar (tqdm, stderr)
    assert run(progress=False) == quiet and capsys.readouterr().err == ""
    monkeypatch.setattr(information, "PROGRESS_AFTER", 0.0)
    monkeypatch.setattr(information, "PROGRESS_LONGER_THAN", 0.0)
    assert run() == quiet  # "long": the bar appears after the first batch
    assert "I(g; w), importance" in capsys.readouterr().err
    with pytest.raises(TypeError, match="progress"):
        run(progress="yes")
