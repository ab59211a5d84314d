"""Device and dtype: every main entry point runs in float32 and float64, returns the input
dtype, leaves its inputs untouched, and converts to numpy only at a library boundary."""

import ast
import pathlib

import pyro
import pyro.distributions as dist
import pytest
import torch
from pyro.infer import SVI, Predictive, Trace_ELBO
from pyro.infer.autoguide import AutoDiagonalNormal, AutoNormal

import pyro_symmetry as ps
from pyro_symmetry.models import BayesianCNN, BayesianMLP

D = ps.diagnostics


def _params(model, dtype, batch=(), seed=0):
    g = torch.Generator().manual_seed(seed)
    return {k: torch.randn(batch + s, generator=g, dtype=torch.float64).to(dtype) for k, s in model.spec.shapes.items()}


def _gaussian(model, dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    return {
        k: (torch.randn(s, generator=g).to(dtype), (torch.rand(s, generator=g) + 0.1).to(dtype))
        for k, s in model.spec.shapes.items()
    }


def _frozen(tree):
    """A deep copy of the tensors of a (nested) mapping, to check inputs are not modified."""
    if torch.is_tensor(tree):
        return tree.clone()
    if isinstance(tree, dict):
        return {k: _frozen(v) for k, v in tree.items()}
    return tuple(_frozen(v) for v in tree)


def _same(a, b):
    if torch.is_tensor(a):
        return a.dtype == b.dtype and torch.equal(a, b)
    if isinstance(a, dict):
        return a.keys() == b.keys() and all(_same(a[k], b[k]) for k in a)
    return all(_same(x, y) for x, y in zip(a, b))


def _dtypes(tree):
    if torch.is_tensor(tree):
        return {tree.dtype} if tree.is_floating_point() else set()
    values = tree.values() if isinstance(tree, dict) else tree
    return set().union(*(_dtypes(v) for v in values))


def test_group_actions_keep_the_dtype(dtype):
    model = BayesianMLP(3, [4, 5], 2, activation="tanh")
    spec, w = model.spec, _params(model, dtype, (2,))
    before = _frozen(w)
    perm = spec.sample((2,), generator=torch.Generator().manual_seed(1))
    assert _dtypes(spec.apply(w, perm)) == {dtype}
    assert _dtypes(ps.flip_signs(w, spec, {"fc1": torch.rand(4) < 0.5})) == {dtype}
    layout = ps.FlatLayout(spec.shapes)
    flat = layout.to_flat(w)
    assert flat.dtype == dtype and _dtypes(layout.from_flat(flat)) == {dtype}
    assert ps.apply_flat(flat, ps.flat_permutation(spec, perm, layout)).dtype == dtype
    relu = BayesianMLP(3, [4, 5], 2)
    wr = _params(relu, dtype)
    # log-scales of another dtype act in the weights' dtype: the weights decide
    other = torch.float64 if dtype == torch.float32 else torch.float32
    assert _dtypes(ps.rescale(wr, relu.spec, {"fc1": torch.randn(4, dtype=other)})) == {dtype}
    assert _same(w, before)


@pytest.mark.parametrize("cnn", [False, True])
def test_models_follow_model_to_dtype(dtype, cnn):
    model = (BayesianCNN(1, (4, 4), [2], 3) if cnn else BayesianMLP(3, [4], 3)).to(dtype)
    x = torch.randn(6, 1, 4, 4) if cnn else torch.randn(6, 3)
    x, y = x.to(dtype), torch.randint(0, 3, (6,))
    tr = pyro.poutine.trace(model).get_trace(x, y)
    assert {tr.nodes[s]["value"].dtype for s in model.site_names} == {dtype}
    assert tr.nodes["_RETURN"]["value"].dtype == dtype
    guide = AutoNormal(model)
    SVI(model, guide, pyro.optim.Adam({"lr": 0.01}), Trace_ELBO()).step(x, y)
    assert _dtypes(guide.median()) == {dtype}
    assert Predictive(model, guide=guide, num_samples=2, return_sites=["_RETURN"])(x)["_RETURN"].dtype == dtype
    assert model.functional(_params(model, dtype, (2,)), x).dtype == dtype
    assert _dtypes(ps.gaussian_params(guide)) == {dtype}


def test_regression_model_with_learned_noise(dtype):
    model = BayesianMLP(2, [3], 1, likelihood="regression", obs_scale=None).to(dtype)
    x, y = torch.randn(5, 2, dtype=dtype), torch.randn(5, dtype=dtype)
    guide = AutoDiagonalNormal(model)
    SVI(model, guide, pyro.optim.Adam({"lr": 0.01}), Trace_ELBO()).step(x, y)
    assert _dtypes(ps.gaussian_params(guide)) == {dtype}


def test_pushforward_keeps_the_dtype(dtype):
    spec = BayesianMLP(3, [4], 2, activation="tanh").spec
    layout = ps.FlatLayout(spec.shapes)
    perm = spec.sample((2,))
    base = dist.Normal(torch.zeros(layout.dim, dtype=dtype), torch.ones(layout.dim, dtype=dtype)).to_event(1)
    pf = ps.Pushforward(base, spec, perm, layout)
    v = pf.rsample((3,))
    assert v.dtype == dtype and pf.log_prob(v).dtype == dtype
    assert pf.simplify().mean.dtype == dtype
    sites = {k: dist.Normal(torch.zeros(s, dtype=dtype), 1.0).to_event(len(s)) for k, s in spec.shapes.items()}
    pm = ps.Pushforward(sites, spec, perm)
    value = pm.sample()
    assert _dtypes(value) == {dtype} and pm.log_prob(value).dtype == dtype


@pytest.mark.parametrize("method", ["weights", "wasserstein"])
def test_alignment_keeps_the_dtype(dtype, method):
    model = BayesianMLP(3, [4, 3], 2, activation="tanh")
    q0, q1 = _gaussian(model, dtype, 0), _gaussian(model, dtype, 1)
    if method == "weights":
        q0, q1 = ({k: v[0] for k, v in q.items()} for q in (q0, q1))
    before = _frozen((q0, q1))
    res = ps.align(q0, q1, model.spec, method=method, seed=0)
    assert _dtypes(res.aligned) == {dtype}
    assert all(p.dtype == torch.long for p in res.permutation.values())
    many = ps.align_many([q0, q1, q1], model.spec, reference="barycenter", method=method, seed=0)
    assert _dtypes(many.barycenter) == {dtype} and all(_dtypes(a) == {dtype} for a in many.aligned)
    assert _dtypes(ps.interpolate(q0, q1, 0.3)) == {dtype}
    x, y = torch.randn(7, 3, dtype=dtype), torch.randint(0, 2, (7,))
    make = ps.point_nll_loss if method == "weights" else ps.gaussian_nll_loss
    barrier = ps.loss_barrier(make(model, x, y), q0, res.aligned, 3)
    assert torch.isfinite(barrier.losses).all()
    assert _same((q0, q1), before)


def test_align_samples_keeps_the_dtype(dtype):
    model = BayesianMLP(3, [4], 2, activation="tanh")
    samples = _params(model, dtype, (2, 3))
    before = _frozen(samples)
    res = ps.align_samples(samples, model.spec, "barycenter", seed=0)
    assert _dtypes(res.aligned) == {dtype} and _dtypes(res.reference) == {dtype}
    # a reference of the other dtype is read in the samples' dtype
    other = torch.float64 if dtype == torch.float32 else torch.float32
    ref = {k: v[0, 0].to(other) for k, v in samples.items()}
    assert _dtypes(ps.align_samples(samples, model.spec, ref).aligned) == {dtype}
    assert _same(samples, before)


def test_scaling_keeps_the_dtype(dtype):
    model = BayesianMLP(3, [4, 5], 2)
    w = _params(model, dtype, (3,))
    before = _frozen(w)
    res = ps.min_mass(w, model.spec)
    assert _dtypes(res.params) == {dtype} and _dtypes(res.log_scales) == {dtype}
    # the masses are float64 whatever the input (range-safe: squared weights of float32 inputs overflow)
    assert res.mass_before.dtype == res.mass_after.dtype == torch.float64 and res.residual.dtype == dtype
    for permutation in ("sort", "align"):
        canon = ps.canonicalize(w, model.spec, permutation=permutation)
        assert _dtypes(canon.params) == {dtype} and _dtypes(canon.log_scales) == {dtype}
    tanh = BayesianMLP(3, [4], 2, activation="tanh")
    assert _dtypes(ps.canonicalize(_params(tanh, dtype, (3,)), tanh.spec).params) == {dtype}
    assert _same(w, before)


def test_diagnostics_accept_either_dtype(dtype):
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(10, 3, generator=g), torch.randn(12, 3, generator=g) + 0.3
    res = D.mmd(x.to(dtype), y.to(dtype), num_permutations=50, seed=0)
    ref = D.mmd(x.double(), y.double(), num_permutations=50, seed=0)
    assert res.mmd2 == pytest.approx(ref.mmd2, rel=1e-5, abs=1e-7) and res.p_value == ref.p_value
    probs = torch.randn(4, 9, 3, generator=g).softmax(-1).to(dtype)
    labels = torch.randint(0, 3, (9,), generator=g)
    for fn in (D.metrics.accuracy, D.metrics.nll, D.metrics.brier_score, D.metrics.expected_calibration_error):
        assert fn(probs, labels).dtype == dtype
    assert D.metrics.predictive_mutual_information(probs).dtype == dtype
    model = BayesianMLP(3, [4], 2)
    tree = D.to_inference_data([_gaussian(model, dtype, r) for r in range(2)], num_samples=4, seed=0)
    assert {str(tree["posterior"][k].dtype) for k in model.site_names} == {str(dtype).replace("torch.", "")}


def test_train_runs_in_the_model_dtype(dtype):
    x, y = torch.randn(8, 3, dtype=dtype), torch.randint(0, 2, (8,))
    for vectorize in (True, False):
        runs = ps.train_runs(
            lambda: BayesianMLP(3, [4], 2).to(dtype),
            AutoNormal,
            (x, y),
            2,
            steps=2,
            vectorize=vectorize,
            progress=False,
        )
        assert all(_dtypes(r.guide.median()) == {dtype} for r in runs)


# Where tensors may leave torch: the LAP solver (scipy) and the ArviZ / matplotlib boundary.
NUMPY_ALLOWED = {
    "alignment/assign.py",  # the LAP solver (scipy): one float64 copy of the hard matrices per step
    "diagnostics/inference_data.py",
    "diagnostics/plots.py",
    "diagnostics/_collection_data.py",  # the dask-backed xarray tree of a collection
}
MODULES = [
    "groups",
    "models",
    "posterior.py",
    "distributions/pushforward.py",
    "alignment",
    "scaling",
    "diagnostics",
    "training.py",
    "_validation.py",
]


def _calls_in_loops(tree):
    """``(line, method)`` of ``.numpy()``/``.item()``/``.tolist()`` calls in loop bodies."""
    out = set()
    for node in ast.walk(tree):
        if isinstance(node, (ast.For, ast.While, ast.ListComp, ast.DictComp, ast.SetComp, ast.GeneratorExp)):
            for sub in ast.walk(node):
                if isinstance(sub, ast.Call) and isinstance(sub.func, ast.Attribute):
                    if sub.func.attr in ("numpy", "item", "tolist"):
                        out.add((sub.lineno, sub.func.attr))
    return out


def test_no_numpy_or_host_sync_on_hot_paths():
    root = pathlib.Path(ps.__file__).parent
    files = [p for m in MODULES for p in ((root / m).glob("*.py") if (root / m).is_dir() else [root / m])]
    numpy_users, in_loops = set(), {}
    for path in files:
        rel = path.relative_to(root).as_posix()
        tree = ast.parse(path.read_text())
        if any(isinstance(n, ast.Attribute) and n.attr == "numpy" for n in ast.walk(tree)):
            numpy_users.add(rel)
        loops = _calls_in_loops(tree)
        if loops:
            in_loops[rel] = loops
    assert numpy_users <= NUMPY_ALLOWED, numpy_users - NUMPY_ALLOWED
    # In loops: the ArviZ/matplotlib conversions (one per site or curve), the sweep order of
    # the alignment (a list of group indices per sweep) and an error message; no tensor data.
    allowed = {
        "diagnostics/inference_data.py",
        "diagnostics/plots.py",
        "alignment/core.py",
        "diagnostics/kernel_mmd.py",
        "diagnostics/_collection_data.py",  # one numpy block per checkpoint file read
    }
    assert set(in_loops) <= allowed, {k: v for k, v in in_loops.items() if k not in allowed}
    assert {m for _, m in in_loops.get("alignment/core.py", ())} <= {"tolist"}
