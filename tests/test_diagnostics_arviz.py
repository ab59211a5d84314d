"""Runs as ArviZ chains: structure of the DataTree, named dims, log_q/log_p, and the
structure legacy ``arviz.InferenceData.from_datatree`` relies on."""

import numpy as np
import pyro
import pyro.distributions as dist
import pytest
import torch
import xarray as xr
from pyro.infer import MCMC, NUTS
from pyro.infer.autoguide import AutoDiagonalNormal, AutoNormal

import pyro_symmetry as ps

D = ps.diagnostics


def _make_model():
    return ps.models.BayesianMLP(3, [4, 5], 2)


def _data():
    g = torch.Generator().manual_seed(0)
    return torch.randn(20, 3, generator=g), torch.randint(0, 2, (20,), generator=g)


def _gaussian_posterior(model, seed, scale=0.1):
    g = torch.Generator().manual_seed(seed)
    return {k: (torch.randn(s, generator=g), torch.full(s, scale)) for k, s in model.spec.shapes.items()}


@pytest.mark.parametrize("guide_cls", [AutoNormal, AutoDiagonalNormal])
def test_guides_become_chains_with_named_dims_and_log_densities(guide_cls):
    x, y = _data()
    runs = ps.train_runs(_make_model, lambda m: guide_cls(m, init_scale=0.05), (x, y), 3, steps=5, progress=False)
    tree = D.to_inference_data(runs, num_samples=6, data=(x, y))
    post = tree["posterior"].to_dataset()
    assert post.sizes["chain"] == 3 and post.sizes["draw"] == 6
    assert post["fc1.weight"].dims == ("chain", "draw", "fc1_neuron", "fc1_input")
    assert post["fc2.weight"].dims == ("chain", "draw", "fc2_neuron", "fc1_neuron")
    assert post["fc2.bias"].dims == ("chain", "draw", "fc2_neuron")
    assert post["fc3.weight"].dims == ("chain", "draw", "fc3_neuron", "fc2_neuron")
    assert post.attrs["log_order"] == pytest.approx(runs[0].model.spec.log_order)

    draws = D.collect_draws(runs, num_samples=6, data=(x, y))
    stats = tree["sample_stats"].to_dataset()
    assert torch.allclose(torch.as_tensor(stats["log_q"].values), draws.log_q)
    for r, run in enumerate(runs):
        q = ps.gaussian_params(run.guide)
        exact = sum(dist.Normal(*q[k]).log_prob(draws.samples[k][r]).flatten(1).sum(-1) for k in q)
        assert torch.allclose(draws.log_q[r], exact.double(), rtol=1e-5, atol=1e-3)
        w = {k: v[r, 2] for k, v in draws.samples.items()}
        trace = pyro.poutine.trace(pyro.poutine.condition(run.model, data=w)).get_trace(x, y)
        assert float(draws.log_p[r, 2]) == pytest.approx(float(trace.log_prob_sum()), rel=1e-5)
    # Draws of one guide follow its own parameters (runs share parameter names).
    means = draws.samples["fc1.weight"].mean(1)
    for r, run in enumerate(runs):
        loc, scale = ps.gaussian_params(run.guide)["fc1.weight"]
        assert ((means[r] - loc).abs() <= 5 * scale / 6**0.5 + 1e-6).all()


def test_tree_has_the_structure_legacy_arviz_from_datatree_reads():
    # Legacy arviz 0.2x: InferenceData.from_datatree(tree) builds one group per child of
    # the root from child.to_dataset(); this test checks what that conversion relies on.
    model = _make_model()
    runs = [_gaussian_posterior(model, s) for s in range(2)]
    tree = D.to_inference_data(runs, num_samples=5, spec=model.spec)
    assert isinstance(tree, xr.DataTree)
    assert set(tree.children) == {"posterior", "sample_stats"}
    groups = {name: child.to_dataset() for name, child in tree.children.items()}
    for name, child in tree.children.items():
        assert not child.children, f"group {name} must be flat"
        ds = groups[name]
        assert isinstance(ds, xr.Dataset)
        for var in ds.data_vars.values():
            assert var.dims[:2] == ("chain", "draw")
    assert set(groups["posterior"].data_vars) == set(model.spec.shapes)
    draws = D.collect_draws(runs, num_samples=5)
    assert (torch.as_tensor(groups["posterior"]["fc2.weight"].values) == draws.samples["fc2.weight"]).all()


def test_sample_dicts_mcmc_and_symmetric_draws():
    model = _make_model()
    spec = model.spec
    g = torch.Generator().manual_seed(3)
    chains = [{k: torch.randn(4, *s, generator=g) for k, s in spec.shapes.items()} for _ in range(3)]
    tree = D.to_inference_data(chains, spec=spec)
    assert tree["posterior"].to_dataset().sizes["draw"] == 4 and "sample_stats" not in tree.children

    def tiny(y=None):
        a = pyro.sample("a", dist.Normal(torch.zeros(2), 1.0).to_event(1))
        pyro.sample("y", dist.Normal(a.sum(), 1.0), obs=y)

    mcmc = MCMC(NUTS(tiny), num_samples=5, warmup_steps=5, num_chains=1, disable_progbar=True)
    mcmc.run(torch.tensor(0.5))
    post = D.to_inference_data([mcmc, mcmc], data=(torch.tensor(0.5),))
    assert post["posterior"].to_dataset()["a"].shape == (2, 5, 2)
    stats = post["sample_stats"].to_dataset()
    assert stats["lp"].shape == (2, 5) and stats["diverging"].dtype == bool and stats["step_size"].shape == (2, 5)

    # Symmetric draws: every draw is the loc moved by some group element (tiny scale).
    q = {k: (loc, scale * 1e-6) for k, (loc, scale) in _gaussian_posterior(model, 0).items()}
    sym = D.collect_draws([q, q], num_samples=8, spec=spec, symmetric=True)
    assert sym.log_q is None and sym.symmetric
    rows = sym.samples["fc1.weight"].reshape(16, 4, 3)
    loc_rows = q["fc1.weight"][0]
    match = torch.cdist(rows, loc_rows[None].expand(16, -1, -1)) < 1e-4  # (16, 4, 4)
    assert (match.sum(-1) == 1).all() and (match.sum(-2) == 1).all()
    assert not (match.float().argmax(-1) == torch.arange(4)).all(), "16 uniform permutations were all the identity"


def test_errors_and_the_global_rng_is_left_alone():
    model = _make_model()
    runs = [_gaussian_posterior(model, s) for s in range(2)]
    state = torch.get_rng_state()
    D.to_inference_data(runs, num_samples=3)
    assert torch.equal(state, torch.get_rng_state())
    with pytest.raises(ValueError, match="reference"):
        D.to_inference_data(runs, reference="nearest")
    with pytest.raises(ps.SpecError, match="spec"):
        D.to_inference_data(runs, num_samples=3, reference="barycenter")
    with pytest.raises(ps.SpecError, match="spec"):
        D.to_inference_data(runs, symmetric=True)
    with pytest.raises(TypeError, match="runs"):
        D.to_inference_data({"a": torch.zeros(3)})  # one sample dict is not a list of runs
    with pytest.raises(ps.SpecError, match="same number of draws"):
        D.to_inference_data([{"a": torch.zeros(3, 2)}, {"a": torch.zeros(4, 2)}])
    with pytest.raises(ps.SpecError, match="not fitted"):
        D.to_inference_data([AutoNormal(model)])


def test_site_dims_fall_back_when_a_name_would_get_two_lengths():
    shapes = {"fc1.weight": (4, 3), "fc1.gate": (4, 5), "fc1.bias": (4,)}
    group = ps.NeuronGroup(4, incoming=[("fc1.weight", 0), ("fc1.gate", 0), ("fc1.bias", 0)])
    dims = D.site_dims(shapes, ps.PermutationSpec({"h": group}, shapes))
    assert dims["fc1.weight"] == ["h_neuron", "fc1_input"]
    assert dims["fc1.gate"] == ["h_neuron", "fc1_gate_dim1"]  # fc1_input already has length 3
    assert dims["fc1.bias"] == ["h_neuron"]


def test_site_dims_without_a_spec_name_no_axis_a_neuron_or_an_input():
    dims = D.site_dims({"fc1.weight": (4, 3), "fc1.bias": (4,)})
    assert dims == {"fc1.weight": ["fc1_weight_dim0", "fc1_weight_dim1"], "fc1.bias": ["fc1_bias_dim0"]}


# ---------------------------------------------------------------------- shapes are read, not guessed
@pytest.mark.parametrize("parallel", [False, True])
def test_predictive_output_with_a_plate_dim_gets_the_right_dims(parallel):
    """``Predictive`` returns weights as ``(S, 1, *site)`` (the data plate): the singleton is
    dropped, not read as the neuron axis."""
    x, y = _data()
    model = _make_model()
    guide = AutoNormal(model)
    guide(x, y)
    sites = list(model.spec.shapes)
    runs = []
    for seed in range(2):
        pyro.set_rng_seed(seed)
        runs.append(pyro.infer.Predictive(model, guide=guide, num_samples=5, return_sites=sites, parallel=parallel)(x))
    assert runs[0]["fc1.weight"].shape == (5, 1, 4, 3)
    for spec in (model.spec, None):  # the spec's shapes, or the model's
        tree = D.to_inference_data(runs, spec=spec, model=model)
        post = tree["posterior"].to_dataset()
        assert post["fc1.weight"].dims == ("chain", "draw", "fc1_neuron", "fc1_input")
        assert post["fc2.weight"].dims == ("chain", "draw", "fc2_neuron", "fc1_neuron")
        assert post["fc2.bias"].dims == ("chain", "draw", "fc2_neuron")
        assert post["fc3.weight"].dims == ("chain", "draw", "fc3_neuron", "fc2_neuron")
        np.testing.assert_array_equal(post["fc1.weight"].values[1], runs[1]["fc1.weight"][:, 0].numpy())
    draws = D.collect_draws(runs, spec=model.spec)
    assert {k: tuple(v.shape) for k, v in draws.samples.items()} == {
        k: (2, 5, *s) for k, s in model.spec.shapes.items()
    }


def test_draws_that_do_not_end_with_the_site_shape_are_refused():
    model = _make_model()
    spec = model.spec
    g = torch.Generator().manual_seed(0)
    good = {k: torch.randn(4, *s, generator=g) for k, s in spec.shapes.items()}
    transposed = dict(good, **{"fc1.weight": good["fc1.weight"].transpose(-1, -2)})
    with pytest.raises(ps.SpecError, match=r"runs\[1\], site 'fc1.weight': draws of shape \(4, 3, 4\).*\(4, 3\)"):
        D.to_inference_data([good, transposed], spec=spec)
    point = {k: v[0] for k, v in good.items()}  # a point estimate without a draw dim
    with pytest.raises(ps.SpecError, match=r"site 'fc1.weight'.*value\[None\]"):
        D.collect_draws([point, point], spec=spec)
    plated = dict(good, **{"fc1.weight": good["fc1.weight"][:, None].expand(4, 3, 4, 3)})  # a non-singleton extra dim
    with pytest.raises(ps.SpecError, match=r"site 'fc1.weight': draws of shape \(4, 3, 4, 3\)"):
        D.collect_draws([good, plated], spec=spec)
    with pytest.raises(ps.SpecError, match="fc1.weight"):  # the model's shapes when there is no spec
        D.collect_draws([good, transposed], model=model)


def _functional_model(x, y=None):
    """A NumPyro-style network: weights laid out ``(in, out)``."""
    w1 = pyro.sample("w1", dist.Normal(0.0, 1.0).expand([3, 4]).to_event(2))
    b1 = pyro.sample("b1", dist.Normal(0.0, 1.0).expand([4]).to_event(1))
    w2 = pyro.sample("w2", dist.Normal(0.0, 1.0).expand([4, 2]).to_event(2))
    b2 = pyro.sample("b2", dist.Normal(0.0, 1.0).expand([2]).to_event(1))
    out = torch.tanh(x @ w1 + b1) @ w2 + b2
    with pyro.plate("data", x.shape[0]):
        pyro.sample("y", dist.Normal(out, 1.0).to_event(1), obs=y)


FUNCTIONAL_SHAPES = {"w1": (3, 4), "b1": (4,), "w2": (4, 2), "b2": (2,)}


def _functional_spec():
    group = ps.NeuronGroup(4, incoming=[("w1", 1), ("b1", 0)], outgoing=[("w2", 0)], activation_symmetry="sign")
    return ps.PermutationSpec({"h": group}, FUNCTIONAL_SHAPES)


def test_in_out_layout_dims_come_from_the_spec():
    spec = _functional_spec()
    g = torch.Generator().manual_seed(0)
    runs = [{k: torch.randn(6, 1, *s, generator=g) for k, s in FUNCTIONAL_SHAPES.items()} for _ in range(2)]
    post = D.to_inference_data(runs, spec=spec)["posterior"].to_dataset()
    assert post["w1"].dims == ("chain", "draw", "w1_input", "h_neuron")
    assert post["b1"].dims == ("chain", "draw", "h_neuron")
    assert post["w2"].dims == ("chain", "draw", "h_neuron", "w2_neuron")
    assert post["b2"].dims == ("chain", "draw", "b2_dim0")
    # No spec: the model's own trace gives the shapes (the plate dim goes), no dim is guessed.
    x, y = torch.randn(5, 3, generator=g), torch.randn(5, 2, generator=g)
    post = D.to_inference_data(runs, model=_functional_model, data=(x, y))["posterior"].to_dataset()
    assert post["w1"].dims == ("chain", "draw", "w1_dim0", "w1_dim1") and post["w1"].shape == (2, 6, 3, 4)


# ---------------------------------------------------------------------- failed runs
class _Run:
    """A TrainedRun-like record, as ``train_runs(on_error="keep")`` returns them."""

    def __init__(self, posterior=None, error=None):
        self.guide, self.state, self.model, self.error = posterior, {}, None, error


def test_failed_runs_are_skipped_with_a_warning_naming_them():
    model = _make_model()
    ok = [_Run(_gaussian_posterior(model, s)) for s in range(3)]
    failed = _Run(None, RuntimeError("loss is NaN at step 7"))
    runs = [ok[0], failed, ok[1], ok[2]]
    with pytest.warns(UserWarning, match=r"run 1 skipped: RuntimeError: loss is NaN at step 7"):
        draws = D.collect_draws(runs, num_samples=5, spec=model.spec)
    assert draws.num_chains == 3 and draws.run_index == (0, 2, 3) and draws.skipped[0][0] == 1
    reference = D.collect_draws([r.guide for r in ok], num_samples=5, spec=model.spec)
    for k in reference.samples:
        assert torch.equal(draws.samples[k], reference.samples[k])
    with pytest.warns(UserWarning, match="run 1 skipped"):
        tree = D.to_inference_data(runs, num_samples=5, spec=model.spec)
    assert tree["posterior"].to_dataset().sizes["chain"] == 3
    with pytest.warns(UserWarning), pytest.raises(ValueError, match="all 2 runs failed"):
        D.collect_draws([failed, failed])
    with pytest.warns(UserWarning), pytest.raises(ValueError, match=r"at least 2 runs, got 1 after skipping 1 failed"):
        D.rhat_ess_before_after([ok[0], failed], model.spec, num_samples=5)


def test_log_q_of_a_symmetrized_guide_is_log_q_sym_by_enumeration():
    x, y = _data()
    make_model = lambda: ps.models.BayesianMLP(3, [3], 2)  # noqa: E731
    runs = ps.train_runs(
        make_model,
        lambda m: ps.AutoSymmetrizedNormal(m, num_permutations=4, estimator="exact", init_scale=0.3),
        (x, y),
        2,
        steps=3,
        progress=False,
    )
    draws = D.collect_draws(runs, num_samples=5)
    spec = runs[0].model.spec
    elements = spec.elements()
    inverse = spec.inverse(elements)
    order = elements["fc1"].shape[0]
    for r, run in enumerate(runs):
        q = ps.gaussian_params(run.guide)
        for i in range(5):
            moved = spec.apply({k: v[r, i] for k, v in draws.samples.items()}, inverse)
            log_q = sum(
                dist.Normal(*q[k]).log_prob(moved[k].expand(order, *q[k][0].shape)).reshape(order, -1).sum(-1)
                for k in q
            )
            exact = torch.logsumexp(log_q.double(), 0) - torch.log(torch.tensor(float(order), dtype=torch.float64))
            assert float(draws.log_q[r, i]) == pytest.approx(float(exact), abs=1e-4)


def test_legacy_arviz_converts_the_tree_with_from_datatree():
    """What a user of legacy ``arviz`` 0.2x does with our ``xarray.DataTree``."""
    az = pytest.importorskip("arviz")
    if not az.__version__.startswith("0."):
        pytest.skip("arviz 1.x reads the DataTree directly")
    model = _make_model()
    runs = [_gaussian_posterior(model, s) for s in range(3)]
    tree = D.to_inference_data(runs, num_samples=40, spec=model.spec)
    idata = az.InferenceData.from_datatree(tree)
    assert set(idata.groups()) == {"posterior", "sample_stats"}
    assert idata.posterior["fc1.weight"].shape == tree["posterior"]["fc1.weight"].shape
    np.testing.assert_array_equal(idata.posterior["fc1.weight"].values, tree["posterior"]["fc1.weight"].values)
    # legacy R-hat on the converted data equals ours (arviz-stats) on the tree
    legacy = az.rhat(idata, var_names=["fc2.bias"])["fc2.bias"].values
    np.testing.assert_allclose(legacy, D.rhat_ess(tree).rhat["fc2.bias"], rtol=1e-6)


def test_train_runs_keep_failed_runs_end_to_end():
    """``train_runs(on_error="keep")`` marks a diverged run; the converter skips it with a one-line note."""
    import inspect

    if "on_error" not in inspect.signature(ps.train_runs).parameters:
        pytest.skip("train_runs has no on_error yet")
    from pyro.infer.autoguide import init_to_value

    x, y = _data()
    made = []

    def make_guide(m):
        made.append(m)
        if len(made) == 2:  # the second run starts from NaN weights: its loss is NaN
            nan = {k: torch.full(s, float("nan")) for k, s in m.spec.shapes.items()}
            return AutoNormal(m, init_loc_fn=init_to_value(values=nan))
        return AutoNormal(m, init_scale=0.05)

    with pytest.warns(UserWarning):
        runs = ps.train_runs(
            _make_model, make_guide, (x, y), 3, steps=2, progress=False, on_error="keep", vectorize=False
        )
    assert runs[1].error is not None and runs[0].error is None and runs[2].error is None
    with pytest.warns(UserWarning, match=r"^run 1 skipped: \w+: ") as record:
        tree = D.to_inference_data(runs, num_samples=4)
    assert "\n" not in str(record[0].message)
    assert tree["posterior"].to_dataset().sizes["chain"] == 2


def test_conv_dims_and_widths_come_from_the_spec():
    from pyro_symmetry.diagnostics._layout import layer_widths

    model = ps.models.BayesianCNN(1, (8, 8), [3, 4], 2)
    dims = D.site_dims(model.spec.shapes, model.spec)
    assert dims["conv2.weight"][:2] == ["conv2_neuron", "conv1_neuron"]
    assert dims["conv1.weight"][1:] == ["conv1_weight_dim1", "conv1_weight_dim2", "conv1_weight_dim3"]
    # fc.weight (2, 16) reads conv2's 4 channels in blocks of 4 (inner > 1): its other axis is fc's units.
    assert dims["fc.weight"] == ["fc_neuron", "fc_weight_dim1"]
    assert layer_widths(model.spec, model.spec.shapes) == {"conv1": 3, "conv2": 4, "fc": 2}
