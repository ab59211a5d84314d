"""Bad inputs to the symmetrized posteriors, their estimators and guides (issue 7, item 3).

Every public entry point of ``pyro_symmetry.distributions.symmetrized``,
``pyro_symmetry.estimators`` and ``pyro_symmetry.guides`` gets generated bad
arguments and must fail with a clear exception whose message names the argument,
site, axis, size or value at fault; nothing may return a silent NaN or hang.
"""

import math
import re

import pyro
import pyro.distributions as dist
import pytest
import torch
from hypothesis import assume, given
from hypothesis import strategies as st
from pyro.infer.autoguide import AutoDiagonalNormal, AutoNormal
from pyro.nn import PyroSample

import pyro_symmetry as ps
from pyro_symmetry.estimators import METHODS
from pyro_symmetry.models import BayesianMLP

pytestmark = pytest.mark.usefixtures("global_state_unchanged")

MODEL = BayesianMLP(2, [3], 1, likelihood="regression")
SITES = list(MODEL.spec.sites)
X = torch.randn(6, 2, generator=torch.Generator().manual_seed(0))
Y = torch.randn(6, generator=torch.Generator().manual_seed(1))

# ---------------------------------------------------------------- strategies
#: Counts that are not ints (TypeError) or ints below 1 (ValueError).
not_ints = st.one_of(
    st.floats(allow_nan=True, allow_infinity=True),
    st.booleans(),
    st.text(max_size=3),
    st.none(),
    st.just([2]),
)
small_ints = st.integers(-(10**6), 0)
#: Names that are not estimators.
bad_names = st.one_of(st.text(max_size=12).filter(lambda s: s not in METHODS), st.sampled_from(["Exact", "mc", ""]))
#: Values that are not positive finite numbers.
bad_positive = st.one_of(
    st.floats(max_value=0.0, allow_nan=False, allow_infinity=True), st.sampled_from([math.nan, math.inf])
)
bad_entries = st.sampled_from([math.nan, math.inf, -math.inf])


def _q(dtype=torch.float32):
    """A mean-field q over MODEL's sites as (loc, scale) tensors."""
    g = torch.Generator().manual_seed(0)
    return {
        k: (torch.randn(s, generator=g, dtype=dtype), torch.rand(s, generator=g, dtype=dtype) + 0.5)
        for k, s in MODEL.spec.shapes.items()
    }


def _normals(q):
    return {k: dist.Normal(loc, scale).to_event(loc.dim()) for k, (loc, scale) in q.items()}


def _value(dtype=torch.float32, batch=()):
    g = torch.Generator().manual_seed(2)
    return {k: torch.randn(*batch, *s, generator=g, dtype=dtype) for k, s in MODEL.spec.shapes.items()}


def _count_error(value):
    return TypeError if not isinstance(value, int) or isinstance(value, bool) else ValueError


# ---------------------------------------------------------------- counts and names
@given(k=st.one_of(not_ints, small_ints))
def test_num_permutations(k):
    err = _count_error(k)
    with pytest.raises(err, match="num_permutations"):
        ps.AutoSymmetrizedNormal(MODEL, num_permutations=k)
    with pytest.raises(err, match="num_permutations"):
        ps.AutoSymmetrizedMeanField(MODEL, num_permutations=k)
    with pytest.raises(err, match="num_permutations"):
        ps.Symmetrize(AutoDiagonalNormal(MODEL), num_permutations=k)
    with pytest.raises(err, match="num_permutations"):
        ps.symmetry_log_ratio(_q(), MODEL.spec, _value(), "contrastive", k)
    with pytest.raises(err, match="num_permutations"):
        ps.mutual_information(_q(), MODEL.spec, "importance", num_samples=4, num_permutations=k)
    with pytest.raises(err, match=r"num_permutations \(K\)"):
        ps.Symmetrized(_normals(_q()), MODEL.spec, num_permutations=k)


@given(n=st.one_of(not_ints, st.integers(-5, 1)), which=st.sampled_from(["num_samples", "batch_size"]))
def test_mutual_information_counts(n, which):
    if which == "batch_size" and isinstance(n, int) and not isinstance(n, bool) and n == 1:
        n = 0  # batch_size = 1 is valid
    err = _count_error(n)
    with pytest.raises(err, match=which):
        ps.mutual_information(_q(), MODEL.spec, "exact", **{"num_samples": 8, which: n})


@given(name=bad_names)
def test_unknown_estimator_and_method_names(name):
    pattern = re.escape(repr(name))
    with pytest.raises(ValueError, match=f"estimator must be one of.*{pattern}"):
        ps.AutoSymmetrizedNormal(MODEL, estimator=name)
    with pytest.raises(ValueError, match=f"estimator must be one of.*{pattern}"):
        ps.Symmetrize(AutoDiagonalNormal(MODEL), estimator=name)
    with pytest.raises(ValueError, match=f"estimator must be one of.*{pattern}"):
        ps.Symmetrized(_normals(_q()), MODEL.spec, estimator=name)
    for fn in (ps.symmetry_log_ratio, ps.log_s, ps.log_q_sym):
        with pytest.raises(ValueError, match=f"method must be one of.*{pattern}"):
            fn(_q(), MODEL.spec, _value(), name)
    with pytest.raises(ValueError, match=f"method must be one of.*{pattern}"):
        ps.mutual_information(_q(), MODEL.spec, name, num_samples=4)
    with pytest.raises(ValueError, match=f"gradient must be one of.*{pattern}"):
        ps.AutoSymmetrizedNormal(MODEL, gradient=name)


@given(
    beta=st.one_of(st.floats(max_value=-1e-9), st.sampled_from([math.nan, math.inf, -math.inf]), st.text(max_size=2))
)
def test_beta(beta):
    err = TypeError if isinstance(beta, str) else ValueError
    with pytest.raises(err, match="beta"):
        ps.AutoSymmetrizedNormal(MODEL, estimator="importance", beta=beta)
    with pytest.raises(err, match="beta"):
        ps.Symmetrized(_normals(_q()), MODEL.spec, estimator="importance", beta=beta)
    with pytest.raises(err, match="beta"):
        ps.mutual_information(_q(), MODEL.spec, "importance", num_samples=4, beta=beta)


@given(scale=bad_positive)
def test_negative_or_non_finite_init_scale(scale):
    with pytest.raises(ValueError, match="init_scale"):
        ps.AutoSymmetrizedNormal(MODEL, init_scale=scale)
    with pytest.raises(ValueError, match="init_scale"):
        ps.AutoSymmetrizedMeanField(MODEL, init_scale=scale)
    with pytest.raises(ValueError, match="init_scale"):
        ps.AutoMixtureOfDiagNormals(MODEL, init_scale=scale)


@given(c=st.one_of(not_ints, small_ints))
def test_mixture_components(c):
    with pytest.raises(_count_error(c), match="num_components"):
        ps.AutoMixtureOfDiagNormals(MODEL, num_components=c)


def test_misc_argument_types():
    with pytest.raises(TypeError, match="generator"):
        ps.mutual_information(_q(), MODEL.spec, "contrastive", num_samples=4, generator=3)
    with pytest.raises(TypeError, match="spec must be a PermutationSpec"):
        ps.AutoSymmetrizedNormal(MODEL, spec="fc1")
    with pytest.raises(TypeError, match="spec must be a PermutationSpec"):
        ps.Symmetrized(_normals(_q()), {"fc1": 3})
    with pytest.raises(TypeError, match="spec must be a PermutationSpec"):
        ps.check_invariance(MODEL, None, X, Y)
    with pytest.raises(TypeError, match="model must be callable"):
        ps.check_invariance(3, MODEL.spec, X, Y)
    with pytest.raises(ValueError, match="rtol"):
        ps.check_invariance(MODEL, MODEL.spec, X, Y, rtol=-1.0)
    with pytest.raises(TypeError, match="check_invariance must be a bool"):
        ps.AutoSymmetrizedNormal(MODEL, check_invariance="yes")
    with pytest.raises(TypeError, match="AutoContinuous"):
        ps.Symmetrize(AutoNormal(MODEL))
    with pytest.raises(ps.SpecError, match="needs a PermutationSpec"):
        ps.AutoSymmetrizedNormal(lambda x, y: None)


# ---------------------------------------------------------------- groups too large
@given(max_order=st.integers(1, 5), width=st.integers(3, 5))
def test_group_too_large_for_exact(max_order, width):
    model = BayesianMLP(2, [width], 1)
    q = {k: (torch.zeros(s), torch.ones(s)) for k, s in model.spec.shapes.items()}
    order = f"{math.factorial(width):.4g}"
    msg = rf"\|G\| = {order}.*max_order={max_order}"
    with pytest.raises(ps.SpecError, match=msg):
        ps.Symmetrized(_normals(q), model.spec, estimator="exact", max_order=max_order)
    with pytest.raises(ps.SpecError, match=msg):
        ps.mutual_information(q, model.spec, "exact", num_samples=4, max_order=max_order)
    w = {k: torch.zeros(s) for k, s in model.spec.shapes.items()}
    with pytest.raises(ps.SpecError, match=msg):
        ps.log_q_sym(q, model.spec, w, "exact", max_order=max_order)


@given(widths=st.sampled_from([[12, 12], [9, 10, 11], [2, 3]]))
@pytest.mark.changes_global_state("torch_rng")  # the test calls guides
def test_guide_refuses_exact_and_permanent_at_set_up(widths):
    pyro.clear_param_store()  # guides of one class share parameter names across examples
    model = BayesianMLP(2, widths, 1, likelihood="regression")
    big = model.spec.order > 100_000
    if big:
        with pytest.raises(ps.SpecError, match=r"method='exact'.*max_order=100000"):
            ps.AutoSymmetrizedNormal(model, estimator="exact")(X, Y)
    with pytest.raises(ps.SpecError, match=r"decoupled.*'fc2.weight'.*'fc1' and 'fc2'"):
        ps.AutoSymmetrizedNormal(model, estimator="permanent")(X, Y)


@given(width=st.integers(26, 40))
def test_group_too_wide_for_the_permanent(width):
    model = BayesianMLP(2, [width], 1)
    q = {k: (torch.zeros(s), torch.ones(s)) for k, s in model.spec.shapes.items()}
    with pytest.raises(ps.SpecError, match=rf"'fc1': {width}.*wider than 25"):
        ps.Symmetrized(_normals(q), model.spec, estimator="permanent")
    with pytest.raises(ValueError, match=rf"{width} x {width}.*at most 25"):
        ps.log_permanent(torch.zeros(width, width))


# ---------------------------------------------------------------- log_permanent
@given(n=st.integers(1, 6), bad=st.sampled_from([math.nan, math.inf]), data=st.data())
def test_log_permanent_nan_and_inf_entries(n, bad, data):
    i, j = data.draw(st.integers(0, n - 1)), data.draw(st.integers(0, n - 1))
    a = torch.zeros(2, n, n, dtype=torch.float64)
    a[1, i, j] = bad
    with pytest.raises(ValueError, match=rf"log_a holds NaN or \+inf entries \(first at index \(1, {i}, {j}\)\)"):
        ps.log_permanent(a)


@given(shape=st.sampled_from([(3,), (2, 3), (4, 2, 3), ()]))
def test_log_permanent_shapes_and_dtypes(shape):
    with pytest.raises(ValueError, match=re.escape(f"(*batch, n, n), got shape {shape}")):
        ps.log_permanent(torch.zeros(shape))
    with pytest.raises(TypeError, match="floating-point.*int64"):
        ps.log_permanent(torch.zeros(3, 3, dtype=torch.long))
    with pytest.raises(ValueError, match="sinkhorn_iters"):
        ps.log_permanent(torch.zeros(3, 3), sinkhorn_iters=-1)


def test_log_permanent_without_a_perfect_matching_is_minus_inf():
    a = torch.zeros(2, 3, 3, dtype=torch.float64)
    a[0, 1] = -math.inf  # row 1 of matrix 0 is all zeros: perm = 0
    out = ps.log_permanent(a)
    assert out[0] == -math.inf and out[1] == pytest.approx(math.lgamma(4))


# ---------------------------------------------------------------- NaN / Inf parameters and values
@given(site=st.sampled_from(SITES), part=st.sampled_from(["loc", "scale"]), bad=bad_entries, data=st.data())
def test_nan_inf_parameters_name_the_site(site, part, bad, data):
    q = _q()
    loc, scale = q[site]
    idx = data.draw(st.integers(0, loc.numel() - 1))
    t = (loc if part == "loc" else scale).clone()
    t.view(-1)[idx] = bad
    q[site] = (t, scale) if part == "loc" else (loc, t)
    msg = re.escape(f"q[{site!r}] {part}")
    with pytest.raises(ValueError, match=msg):
        ps.mutual_information(q, MODEL.spec, "exact", num_samples=4)
    with pytest.raises(ValueError, match=msg):
        ps.log_q_sym(q, MODEL.spec, _value(), "exact")
    with pytest.raises(ValueError, match=msg):
        ps.Symmetrized({k: dist.Normal(*v, validate_args=False).to_event(v[0].dim()) for k, v in q.items()}, MODEL.spec)


@given(site=st.sampled_from(SITES), scale=st.floats(-1e30, 0.0))
def test_non_positive_scales_name_the_site(site, scale):
    q = _q()
    loc, s = q[site]
    q[site] = (loc, s.clone().fill_(scale))
    with pytest.raises(ValueError, match=re.escape(f"q[{site!r}] scale must be positive")):
        ps.log_s(q, MODEL.spec, _value(), "contrastive", num_permutations=4)


@given(
    site=st.sampled_from(SITES), bad=bad_entries, fn=st.sampled_from([ps.symmetry_log_ratio, ps.log_s, ps.log_q_sym])
)
def test_nan_inf_values_name_the_site(site, bad, fn):
    w = _value(batch=(2,))
    w[site] = w[site].clone()
    w[site][1].view(-1)[0] = bad
    with pytest.raises(ValueError, match=re.escape(f"value[{site!r}] contains NaN or Inf")):
        fn(_q(), MODEL.spec, w, "contrastive", num_permutations=3)
    q_sym = ps.Symmetrized(_normals(_q()), MODEL.spec, estimator="exact")
    with pytest.raises(ValueError, match=re.escape(f"value[{site!r}] contains NaN or Inf")):
        q_sym.log_prob(w)


@pytest.mark.changes_global_state("torch_rng", "param_store")  # the test calls and fits guides
def test_nan_parameters_of_a_fitted_guide():
    guide = ps.AutoSymmetrizedNormal(MODEL)
    guide(X, Y)
    with torch.no_grad():
        guide.locs.fc1.bias_unconstrained.fill_(math.nan)
    with pytest.raises(ValueError, match=re.escape("q['fc1.bias'] loc contains NaN or Inf")):
        ps.mutual_information(guide, estimator="exact", num_samples=4)


# ---------------------------------------------------------------- spec vs model / value
@given(site=st.sampled_from(SITES), extra=st.integers(1, 3))
def test_value_shape_not_matching_the_spec(site, extra):
    w = _value()
    shape = list(w[site].shape)
    shape[0] += extra
    w[site] = torch.zeros(shape)
    with pytest.raises(ps.SpecError, match=re.escape(f"value[{site!r}] has shape {tuple(shape)}")):
        ps.log_q_sym(_q(), MODEL.spec, w, "exact")
    del w[site]
    with pytest.raises(ps.SpecError, match=re.escape(f"site {site!r} of the spec is missing")):
        ps.symmetry_log_ratio(_q(), MODEL.spec, w, "exact")


@given(site=st.sampled_from(SITES), extra=st.integers(1, 2))
def test_q_shape_not_matching_the_spec(site, extra):
    q = _q()
    loc, scale = q[site]
    shape = (loc.shape[0] + extra, *loc.shape[1:])
    q[site] = (torch.zeros(shape), torch.ones(shape))
    with pytest.raises(ps.SpecError, match=re.escape(f"q[{site!r}] has event shape {shape}")):
        ps.mutual_information(q, MODEL.spec, "exact", num_samples=4)
    del q[site]
    with pytest.raises(ps.SpecError, match=re.escape(f"sites [{site!r}] of the spec have no distribution in q")):
        ps.Symmetrized(_normals(q), MODEL.spec)


@given(size=st.integers(1, 6), axis=st.sampled_from([0, 1]))
@pytest.mark.changes_global_state("torch_rng")  # the test calls guides
def test_spec_not_matching_the_model_names_site_axis_and_size(size, axis):
    actual = MODEL.spec.shapes["fc1.weight"][axis]
    assume(size != actual)
    pyro.clear_param_store()
    spec = ps.PermutationSpec({"h": ps.NeuronGroup(size, incoming=[("fc1.weight", axis)])})
    with pytest.raises(ps.SpecError, match=rf"size {size}.*axis {axis} of site 'fc1.weight' has length {actual}"):
        ps.AutoSymmetrizedNormal(MODEL, spec=spec)(X, Y)
    with pytest.raises(ps.SpecError, match=rf"size {size}.*axis {axis} of site 'fc1.weight' has length {actual}"):
        ps.Symmetrize(AutoDiagonalNormal(MODEL), spec=spec)(X, Y)


@given(name=st.text(alphabet="abcxyz._", min_size=1, max_size=8).filter(lambda s: s not in SITES))
@pytest.mark.changes_global_state("torch_rng")  # the test calls guides
def test_spec_site_missing_from_the_model(name):
    pyro.clear_param_store()
    spec = ps.PermutationSpec({"h": ps.NeuronGroup(3, incoming=[(name, 0)])}, {name: (3, 2)})
    with pytest.raises(ps.SpecError, match=re.escape(f"site {name!r} of the spec is not")):
        ps.AutoSymmetrizedNormal(MODEL, spec=spec)(X, Y)
    with pytest.raises(ps.SpecError, match=re.escape(f"site {name!r} of the spec is not a sample site")):
        ps.check_invariance(MODEL, spec, X, Y)


# ---------------------------------------------------------------- non-invariant models
class _NonInvariant(BayesianMLP):
    """Prior of hidden neuron ``row`` shifted by ``shift``, or an extra likelihood term that
    reads hidden neuron ``row``'s outgoing weight."""

    def __init__(self, where, row, shift):
        super().__init__(2, [3], 1, likelihood="regression")
        self.where, self.row, self.shift = where, row, shift
        if where == "prior":
            loc = torch.zeros(3, 2)
            loc[row] = shift
            self.fc1.weight = PyroSample(dist.Normal(loc, 1.0).to_event(2))

    def forward(self, x, y=None):
        out = super().forward(x, y)
        if self.where == "likelihood":
            w = self.fc2.weight[..., 0, self.row]
            pyro.sample("probe", dist.Normal(w, 0.1), obs=torch.tensor(self.shift))
        return out


@given(where=st.sampled_from(["prior", "likelihood"]), row=st.integers(0, 2), shift=st.floats(1.0, 5.0))
@pytest.mark.changes_global_state("torch_rng")  # the test calls guides
def test_non_invariant_model_names_the_site(where, row, shift):
    pyro.clear_param_store()
    model = _NonInvariant(where, row, shift)
    site, kind = ("fc1.weight", "prior") if where == "prior" else ("probe", "likelihood")
    msg = rf"not invariant under the spec at site '{re.escape(site)}': its {kind}"
    with pytest.raises(ps.SpecError, match=msg):
        ps.check_invariance(model, model.spec, X, Y)
    with pytest.raises(ps.SpecError, match=msg):
        ps.AutoSymmetrizedNormal(model)(X, Y)
    with pytest.raises(ps.SpecError, match=msg):
        ps.Symmetrize(AutoDiagonalNormal(model))(X, Y)


@pytest.mark.filterwarnings("ignore:Encountered NaN")
def test_non_finite_log_density_in_the_invariance_check():
    class Unchecked(BayesianMLP):
        def forward(self, x, y=None):
            out = super().forward(x, y)
            pyro.sample("extra", dist.Normal(torch.tensor(math.nan), 1.0, validate_args=False), obs=torch.tensor(0.0))
            return out

    model = Unchecked(2, [3], 1, likelihood="regression")
    with pytest.raises(ValueError, match="log-density of site 'extra' is nan"):
        ps.check_invariance(model, model.spec, X, Y)


# ---------------------------------------------------------------- unfitted guides
@pytest.mark.parametrize(
    "make",
    [
        lambda: ps.AutoSymmetrizedNormal(MODEL),
        lambda: ps.AutoSymmetrizedMeanField(MODEL),
        lambda: ps.Symmetrize(AutoDiagonalNormal(MODEL)),
        lambda: ps.Symmetrize(ps.AutoMixtureOfDiagNormals(MODEL, num_components=2)),
    ],
    ids=["normal", "meanfield", "symmetrize", "mixture"],
)
@pytest.mark.changes_global_state("torch_rng", "param_store")  # the test calls and fits guides
def test_unfitted_guides(make):
    guide = make()
    name = type(guide).__name__
    with pytest.raises(ps.SpecError, match=f"{name}.*not fitted"):
        guide.median()
    with pytest.raises(ps.SpecError, match="not fitted"):
        guide.quantiles([0.5])
    with pytest.raises(ps.SpecError, match="not fitted"):
        guide.sample_posterior(3)
    with pytest.raises(ps.SpecError, match="not fitted"):
        guide.symmetrized()
    with pytest.raises(ps.SpecError, match="not fitted"):
        ps.mutual_information(guide, estimator="exact", num_samples=4)
    guide(X, Y)  # once set up, all of them work
    assert guide.sample_posterior(3)["fc1.weight"].shape == (3, 3, 2)
    with pytest.raises(_count_error(0), match="num_samples"):
        guide.sample_posterior(0)


def test_unfitted_mixture_base():
    guide = ps.AutoMixtureOfDiagNormals(MODEL)
    with pytest.raises(ps.SpecError, match="AutoMixtureOfDiagNormals is not fitted"):
        guide.get_posterior()
    with pytest.raises(ps.SpecError, match="AutoMixtureOfDiagNormals is not fitted"):
        guide.median()


# ---------------------------------------------------------------- dtype / device mixes
@given(
    q_dtype=st.sampled_from([torch.float32, torch.float64]),
    fn=st.sampled_from([ps.symmetry_log_ratio, ps.log_s, ps.log_q_sym]),
    site=st.sampled_from(SITES),
)
def test_value_dtype_not_matching_q(q_dtype, fn, site):
    other = torch.float64 if q_dtype == torch.float32 else torch.float32
    w = _value(q_dtype)
    w[site] = w[site].to(other)
    with pytest.raises(
        TypeError, match=re.escape(f"value[{site!r}] has dtype {other} but q's parameters are {q_dtype}")
    ):
        fn(_q(q_dtype), MODEL.spec, w, "exact")
    w[site] = w[site].long()
    with pytest.raises(TypeError, match=re.escape(f"value[{site!r}] must be a floating-point tensor")):
        fn(_q(q_dtype), MODEL.spec, w, "exact")


@given(site=st.sampled_from(SITES))
def test_q_sites_in_mixed_dtypes(site):
    q = _q()
    q[site] = tuple(t.double() for t in q[site])
    with pytest.raises(TypeError, match="torch.float64.*use one dtype for q|use one dtype for q") as err:
        ps.mutual_information(q, MODEL.spec, "exact", num_samples=4)
    assert f"q[{site!r}]" in str(err.value) and "torch.float64" in str(err.value)


@pytest.mark.changes_global_state("torch_rng")  # the test calls guides
def test_flat_value_dtype_and_guide_data_dtype():
    layout = ps.FlatLayout(MODEL.spec.shapes)
    flat = dist.Normal(torch.zeros(layout.dim), torch.ones(layout.dim)).to_event(1)
    q_sym = ps.Symmetrized(flat, MODEL.spec, estimator="exact", layout=layout)
    with pytest.raises(TypeError, match="value has dtype torch.float64 but q's parameters are torch.float32"):
        q_sym.log_prob(torch.zeros(layout.dim, dtype=torch.float64))
    with pytest.raises(TypeError, match="dtype"):  # float64 data for a float32 model
        ps.AutoSymmetrizedNormal(MODEL)(X.double(), Y.double())


# ---------------------------------------------------------------- priors without .to_event, failed set-up
def _model_without_to_event(n_event):
    """MODEL's architecture with fc1.weight's prior declared over ``n_event`` of its 2 dims."""

    def model(x, y=None):
        prior = dist.Normal(0.0, 1.0).expand([3, 2])
        w1 = pyro.sample("fc1.weight", prior.to_event(n_event) if n_event else prior)
        b1 = pyro.sample("fc1.bias", dist.Normal(0.0, 1.0).expand([3]).to_event(1))
        w2 = pyro.sample("fc2.weight", dist.Normal(0.0, 1.0).expand([1, 3]).to_event(2))
        b2 = pyro.sample("fc2.bias", dist.Normal(0.0, 1.0).expand([1]).to_event(1))
        out = torch.tanh(x @ w1.transpose(-1, -2) + b1) @ w2.transpose(-1, -2) + b2
        with pyro.plate("data", x.shape[0]):
            pyro.sample("obs", dist.Normal(out.squeeze(-1), 1.0), obs=y)

    return model


GUIDE_MAKERS = {
    "AutoSymmetrizedNormal": lambda m, spec: ps.AutoSymmetrizedNormal(m, spec),
    "AutoSymmetrizedMeanField": lambda m, spec: ps.AutoSymmetrizedMeanField(m, spec),
    "Symmetrize": lambda m, spec: ps.Symmetrize(AutoDiagonalNormal(m), spec),
    "Symmetrize(mixture)": lambda m, spec: ps.Symmetrize(ps.AutoMixtureOfDiagNormals(m), spec),
}


@pytest.mark.parametrize("n_event", [0, 1])
@pytest.mark.parametrize("make", sorted(GUIDE_MAKERS))
@pytest.mark.changes_global_state("torch_rng", "param_store")  # the test calls and fits guides
def test_prior_without_to_event_names_the_site(make, n_event):
    spec = ps.mlp_spec(["fc1", "fc2"], [3], activation_symmetry="sign")
    model = _model_without_to_event(n_event)
    guide = GUIDE_MAKERS[make](model, spec)
    msg = rf"prior of site 'fc1\.weight'.*add \.to_event\({2 - n_event}\)"
    with pytest.raises(ps.SpecError, match=msg):
        guide(X, Y)
    ps.AutoSymmetrizedNormal(_model_without_to_event(2), spec)(X, Y)  # with .to_event(2): fine


@pytest.mark.parametrize("make", sorted(GUIDE_MAKERS))
@pytest.mark.changes_global_state("torch_rng")  # the test calls guides
def test_a_failed_set_up_is_undone_and_checked_again(make):
    """A guide whose set-up failed (here: a non-invariant model) must not train on its
    next call as if set up: it raises again, and leaves no parameters behind."""
    model = _NonInvariant("prior", 0, 3.0)
    guide = GUIDE_MAKERS[make](model, model.spec)
    for _ in range(2):
        with pytest.raises(ps.SpecError, match="not invariant"):
            guide(X, Y)
        assert list(pyro.get_param_store().keys()) == []
    with pytest.raises(ps.SpecError, match="not fitted"):
        guide.sample_posterior(2)
