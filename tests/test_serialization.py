"""Serialization: fitted guides through the Pyro param store, and specs and every result
object through ``torch.save``/``torch.load`` and ``pickle``; the copies still work."""

import io
import pickle

import pyro
import pytest
import torch
from pyro.infer import SVI, Trace_ELBO
from pyro.infer.autoguide import AutoDiagonalNormal, AutoNormal

import pyro_symmetry as ps
from pyro_symmetry.models import BayesianMLP

D = ps.diagnostics


def via_torch(obj):
    buf = io.BytesIO()
    torch.save(obj, buf)
    buf.seek(0)
    return torch.load(buf, weights_only=False)


def via_pickle(obj):
    return pickle.loads(pickle.dumps(obj))


round_trips = pytest.mark.parametrize("trip", [via_torch, via_pickle], ids=["torch", "pickle"])


def _equal(a, b):
    if torch.is_tensor(a):
        return torch.is_tensor(b) and a.dtype == b.dtype and torch.equal(a, b)
    if isinstance(a, dict):
        return isinstance(b, dict) and a.keys() == b.keys() and all(_equal(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)):
        return type(a) is type(b) and len(a) == len(b) and all(_equal(x, y) for x, y in zip(a, b))
    return a == b or (a != a and b != b)


def _data(n=16, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 3, generator=g), torch.randint(0, 2, (n,), generator=g)


def _fit(model, guide, x, y, steps=5):
    svi = SVI(model, guide, pyro.optim.Adam({"lr": 0.05}), Trace_ELBO())
    for _ in range(steps):
        svi.step(x, y)
    return guide


def _gaussians(model, seed):
    g = torch.Generator().manual_seed(seed)
    return {k: (torch.randn(s, generator=g), torch.rand(s, generator=g) + 0.2) for k, s in model.spec.shapes.items()}


@pytest.mark.parametrize(
    "make_guide",
    [AutoNormal, AutoDiagonalNormal, lambda m: ps.AutoSymmetrizedNormal(m, num_permutations=4)],
    ids=["AutoNormal", "AutoDiagonalNormal", "AutoSymmetrizedNormal"],
)
def test_fitted_guides_round_trip_through_the_param_store(tmp_path, make_guide):
    x, y = _data()
    pyro.set_rng_seed(0)
    model = BayesianMLP(3, [4], 2, activation="tanh")
    guide = _fit(model, make_guide(model), x, y)
    median = {k: v.detach().clone() for k, v in guide.median().items()}
    gaussian = ps.gaussian_params(guide)
    pyro.get_param_store().save(tmp_path / "params.pt")

    pyro.clear_param_store()
    untrained = make_guide(BayesianMLP(3, [4], 2, activation="tanh"))
    with torch.no_grad():
        untrained(x, y)
    assert not _equal({k: v.detach() for k, v in untrained.median().items()}, median)  # the load matters

    pyro.clear_param_store()
    fresh_model = BayesianMLP(3, [4], 2, activation="tanh")
    fresh = make_guide(fresh_model)
    pyro.get_param_store().load(tmp_path / "params.pt")
    with torch.no_grad():
        fresh(x, y)  # set-up: the guide's modules take the loaded values
    assert _equal({k: v.detach() for k, v in fresh.median().items()}, median)
    assert _equal(ps.gaussian_params(fresh), gaussian)
    # and the loaded guide aligns exactly like the original one
    assert _equal(ps.align(guide, fresh, model.spec).permutation, model.spec.identity())


@round_trips
def test_trained_runs_and_specs(trip):
    x, y = _data()
    runs = ps.train_runs(lambda: BayesianMLP(3, [4], 2), AutoNormal, (x, y), 2, steps=3, progress=False)
    copy = trip(runs)
    for a, b in zip(runs, copy):
        assert _equal(a.losses, b.losses) and _equal(a.guide.median(), b.guide.median())
    model = BayesianMLP(3, [4, 5], 2, activation="tanh")
    spec = trip(model.spec)
    assert spec == model.spec and repr(spec) == repr(model.spec) and spec.log_order == model.spec.log_order
    w = {k: torch.randn(s) for k, s in model.spec.shapes.items()}
    perm = model.spec.sample(generator=torch.Generator().manual_seed(0))
    assert _equal(spec.apply(w, perm), model.spec.apply(w, perm))
    assert _equal(trip(ps.FlatLayout(spec.shapes)).to_flat(w), ps.FlatLayout(spec.shapes).to_flat(w))


@round_trips
def test_alignment_results(trip):
    model = BayesianMLP(3, [5, 4], 2, activation="tanh")
    q = [_gaussians(model, r) for r in range(3)]
    res = ps.align(q[0], q[1], model.spec, seed=0)
    copy = trip(res)
    assert type(copy) is ps.AlignmentResult and _equal(copy.__dict__, res.__dict__)
    # still usable: its permutation maps q1 onto its aligned form
    moved = model.spec.apply({k: v[0] for k, v in q[1].items()}, copy.permutation)
    assert _equal(moved, {k: v[0] for k, v in res.aligned.items()})

    many = ps.align_many(q, model.spec, reference="barycenter", seed=0)
    copy = trip(many)
    assert type(copy) is ps.ManyAlignment and _equal(copy.__dict__, many.__dict__)

    samples = {k: torch.randn((2, 3) + s) for k, s in model.spec.shapes.items()}
    sa = ps.align_samples(samples, model.spec, "barycenter", seed=0)
    copy = trip(sa)
    assert type(copy) is ps.SampleAlignment and _equal(copy.__dict__, sa.__dict__)
    assert _equal(model.spec.apply(samples, copy.permutation), sa.aligned)

    x, y = _data()
    loss = ps.gaussian_nll_loss(model, x, y, num_samples=4)
    barrier = ps.loss_barrier(loss, q[0], res.aligned, 5)
    copy = trip(barrier)
    assert type(copy) is ps.BarrierResult and _equal(copy.__dict__, barrier.__dict__)
    assert trip(loss)(q[0]) == loss(q[0])  # the loss helper itself is picklable


@round_trips
def test_scaling_results(trip):
    relu = BayesianMLP(3, [5, 4], 2)
    w = {k: torch.randn((4,) + s) for k, s in relu.spec.shapes.items()}
    res = ps.min_mass(w, relu.spec)
    copy = trip(res)
    assert type(copy) is ps.MinMassResult and _equal(copy.__dict__, res.__dict__)
    assert _equal(ps.rescale(w, relu.spec, copy.log_scales), res.params)
    canon = ps.canonicalize(w, relu.spec)
    copy = trip(canon)
    assert type(copy) is ps.CanonicalForm and _equal(copy.__dict__, canon.__dict__)
    # canonicalizing the copy's output again changes nothing (idempotent): the copy works
    again = ps.canonicalize(copy.params, relu.spec, reference=copy.reference)
    assert all(torch.allclose(again.params[k], canon.params[k], atol=1e-4) for k in relu.spec.sites)


@round_trips
def test_diagnostics_results(trip, tmp_path):
    model = BayesianMLP(3, [4], 2)
    x = {k: torch.randn((8,) + s) for k, s in model.spec.shapes.items()}
    y = {k: torch.randn((8,) + s) + 0.3 for k, s in model.spec.shapes.items()}
    res = D.mmd(x, y, num_permutations=20, symmetry_aware=True, spec=model.spec)
    copy = trip(res)
    assert type(copy) is D.MMDResult and _equal(copy.__dict__, res.__dict__)

    runs = [_gaussians(model, r) for r in range(3)]
    report = D.symmetry_report(
        runs, model.spec, num_samples=8, mi_samples=8, mi_permutations=4, mmd_permutations=20, progress=False
    )
    copy = trip(report)
    assert type(copy) is D.SymmetryReport
    assert str(copy) == str(report) and copy.to_markdown() == report.to_markdown()
    assert _equal(copy.rows, report.rows)
    assert copy.convergence.after.table() == report.convergence.after.table()
    paths = copy.save(tmp_path)
    assert paths["markdown"].read_text() == report.to_markdown()
