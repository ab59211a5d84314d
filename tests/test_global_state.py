"""Every public entry point, called once on valid input, leaves the caller's global state
as it found it: torch's, numpy's and Python's RNGs, the thread count, the default dtype and
Pyro's param store (:func:`pyro_symmetry._state.snapshot`).

The names come from ``ps.__all__``, ``ps.diagnostics.__all__`` and
``ps.diagnostics.metrics.__all__``: a new public name fails
:func:`test_every_public_name_is_called_or_classified` until it gets a call here. Functions
that draw (alignment, Monte Carlo estimates, losses) are called with their ``seed`` or
``generator``. Guides are constructed here, not called: a guide creates its parameters
when the *user* calls it, which is the user's change to the store; every library function
that takes a fitted guide (or runs) and calls it must not.
"""

import inspect

import pyro
import pyro.distributions as dist
import pytest
import torch
from hypothesis import settings
from pyro.infer import SVI, Trace_ELBO
from pyro.infer.autoguide import AutoDiagonalNormal, AutoNormal

import pyro_symmetry as ps
from pyro_symmetry._state import snapshot
from pyro_symmetry.models import BayesianMLP

D, M = ps.diagnostics, ps.diagnostics.metrics

#: Result records and exception types: built by the functions, not entry points themselves.
NOT_CALLED = {
    "AlignmentResult",
    "BarrierResult",
    "CanonicalForm",
    "ConvergenceComparison",
    "ConvergenceSummary",
    "MIEstimate",
    "MMDResult",
    "ManyAlignment",
    "MinMassResult",
    "ReliabilityDiagram",
    "RunDraws",
    "SampleAlignment",
    "SpecError",
    "SymmetryReport",
    "TrainedRun",
}


def _public_names():
    names = {}
    for prefix, module in (("ps", ps), ("D", D), ("M", M)):
        for n in module.__all__:
            if not inspect.ismodule(getattr(module, n)):
                names[f"{prefix}.{n}"] = getattr(module, n)
    return names


class Env:
    """Valid inputs, built before any snapshot is taken."""

    def __init__(self):
        g = torch.Generator().manual_seed(0)
        self.g = g
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(0)
            self.model = BayesianMLP(3, [4], 2, activation="tanh")
            self.relu = BayesianMLP(3, [4], 2, activation="relu")
            self.spec, self.relu_spec = self.model.spec, self.relu.spec
            self.layout = ps.FlatLayout(self.spec.shapes)
            self.x, self.y = torch.randn(12, 3, generator=g), torch.randint(0, 2, (12,), generator=g)
            shapes = self.spec.shapes
            self.q0, self.q1 = (
                {k: (torch.randn(s, generator=g), torch.rand(s, generator=g) + 0.2) for k, s in shapes.items()}
                for _ in range(2)
            )
            self.w = {k: torch.randn(s, generator=g) for k, s in shapes.items()}
            self.samples = {k: torch.randn((6, *s), generator=g) for k, s in shapes.items()}
            self.normals = {k: dist.Normal(*v).to_event(len(shapes[k])) for k, v in self.q0.items()}
            self.perm = self.spec.sample(generator=torch.Generator().manual_seed(1))
            self.index = ps.flat_permutation(self.spec, self.perm, self.layout)
            self.guide = self._fitted_guide()
            self.runs = ps.train_runs(
                lambda: BayesianMLP(3, [4], 2, activation="tanh"),
                AutoNormal,
                (self.x, self.y),
                2,
                steps=3,
                progress=False,
            )
            self.draws = D.collect_draws(self.runs, num_samples=5, spec=self.spec)
            self.probs = torch.rand(4, 12, 3, generator=g).softmax(-1)
            self.labels = torch.randint(0, 3, (12,), generator=g)

    def _fitted_guide(self):
        store = pyro.get_param_store()
        with store.scope():
            guide = AutoNormal(self.model)
            svi = SVI(self.model, guide, pyro.optim.Adam({"lr": 0.05}), Trace_ELBO())
            for _ in range(3):
                svi.step(self.x, self.y)
        return guide  # its parameters live in the module; the global store never saw them

    def gen(self):
        return torch.Generator().manual_seed(3)


#: ``name -> call(env)``: one call on valid input (a factory's product is used once too).
CALLS = {
    # groups
    "ps.Axis": lambda e: ps.Axis("fc1.weight", 0),
    "ps.FlatLayout": lambda e: ps.FlatLayout(e.spec.shapes),
    "ps.NeuronGroup": lambda e: ps.NeuronGroup(4, incoming=[("fc1.weight", 0)], outgoing=[("fc2.weight", 1)]),
    "ps.PermutationSpec": lambda e: ps.PermutationSpec(dict(e.spec.groups), e.spec.shapes),
    "ps.apply_flat": lambda e: ps.apply_flat(torch.zeros(e.layout.dim), e.index),
    "ps.decode_signed": lambda e: ps.decode_signed(e.index),
    "ps.encode_signed": lambda e: ps.encode_signed(torch.arange(4), torch.tensor([True, False, True, False])),
    "ps.flat_permutation": lambda e: ps.flat_permutation(e.spec, e.perm, e.layout),
    "ps.mlp_spec": lambda e: ps.mlp_spec(["fc1", "fc2"], [4], activation_symmetry="sign"),
    # posteriors
    "ps.gaussian_params": lambda e: ps.gaussian_params(e.guide),
    "ps.point_params": lambda e: ps.point_params(e.w),
    "ps.as_posterior": lambda e: ps.as_posterior(e.q0, e.spec),
    "ps.Posterior": lambda e: ps.Posterior(dists=e.normals, spec=e.spec),
    # alignment
    "ps.align": lambda e: ps.align(e.q0, e.q1, e.spec, seed=0),
    "ps.align_many": lambda e: ps.align_many([e.q0, e.q1], e.spec, seed=0),
    "ps.align_samples": lambda e: ps.align_samples(e.samples, e.spec, seed=0),
    "ps.interpolate": lambda e: ps.interpolate(e.q0, e.q1, 0.3),
    "ps.loss_barrier": lambda e: ps.loss_barrier(ps.gaussian_nll_loss(e.model, e.x, e.y, seed=0), e.q0, e.q1, 3),
    "ps.PredictiveLoss": lambda e: ps.PredictiveLoss(e.model, e.x, e.y, seed=0)(e.q0),
    "ps.gaussian_error_loss": lambda e: ps.gaussian_error_loss(e.model, e.x, e.y, seed=0)(e.q0),
    "ps.gaussian_nll_loss": lambda e: ps.gaussian_nll_loss(e.model, e.x, e.y, seed=0)(e.q0),
    "ps.point_error_loss": lambda e: ps.point_error_loss(e.model, e.x, e.y)(e.w),
    "ps.point_nll_loss": lambda e: ps.point_nll_loss(e.model, e.x, e.y)(e.w),
    "ps.ModelLoss": lambda e: ps.ModelLoss(e.model, (e.x, e.y), seed=0, num_samples=4)(e.q0),
    "ps.nll_loss": lambda e: ps.nll_loss(e.model, e.x, e.y, seed=0, num_samples=4)(e.q0),
    "ps.error_loss": lambda e: ps.error_loss(e.model, e.x, e.y, seed=0, num_samples=4)(e.q0),
    # distributions
    "ps.Pushforward": lambda e: ps.Pushforward(e.normals, e.spec, e.perm).log_prob(e.w),
    "ps.PushforwardGuide": lambda e: ps.PushforwardGuide(e.guide, e.spec, e.perm).median(),
    "ps.pushforward_guide": lambda e: ps.pushforward_guide(e.guide, e.spec, e.perm).quantiles([0.2, 0.9]),
    "ps.Symmetrized": lambda e: ps.Symmetrized(e.normals, e.spec, estimator="exact").log_prob(e.w),
    # estimators
    "ps.BaseDensity": lambda e: ps.BaseDensity(e.normals, e.spec),
    "ps.log_permanent": lambda e: ps.log_permanent(torch.randn(5, 5, generator=e.gen())),
    "ps.log_q_sym": lambda e: ps.log_q_sym(e.q0, e.spec, e.w, "exact"),
    "ps.log_s": lambda e: ps.log_s(e.q0, e.spec, e.w, "permanent"),
    "ps.symmetry_log_ratio": lambda e: ps.symmetry_log_ratio(e.q0, e.spec, e.w, "importance", 4, generator=e.gen()),
    "ps.mutual_information": lambda e: ps.mutual_information(e.guide, e.spec, "contrastive", 8, generator=e.gen()),
    # guides: constructed (the user calls them)
    "ps.AutoMixtureOfDiagNormals": lambda e: ps.AutoMixtureOfDiagNormals(e.model, num_components=2),
    "ps.AutoSymmetrizedMeanField": lambda e: ps.AutoSymmetrizedMeanField(e.model),
    "ps.AutoSymmetrizedNormal": lambda e: ps.AutoSymmetrizedNormal(e.model, estimator="importance"),
    "ps.Symmetrize": lambda e: ps.Symmetrize(AutoDiagonalNormal(e.model), num_permutations=4),
    "ps.check_invariance": lambda e: ps.check_invariance(e.model, e.spec, e.x, e.y),
    # scaling and canonical forms
    "ps.canonicalize": lambda e: ps.canonicalize(e.samples, e.spec),
    "ps.flip_signs": lambda e: ps.flip_signs(e.w, e.spec, {"fc1": torch.tensor([True, False, True, False])}),
    "ps.mass": lambda e: ps.mass(e.w, e.relu_spec),
    "ps.mass_sites": lambda e: ps.mass_sites(e.relu_spec),
    "ps.min_mass": lambda e: ps.min_mass(e.w, e.relu_spec),
    "ps.rescale": lambda e: ps.rescale(e.w, e.relu_spec, {"fc1": torch.linspace(-1, 1, 4)}),
    "ps.sign_convention": lambda e: ps.sign_convention(e.w, e.spec),
    "ps.sort_permutation": lambda e: ps.sort_permutation(e.w, e.spec),
    # training
    "ps.train_runs": lambda e: ps.train_runs(
        lambda: BayesianMLP(3, [4], 2), AutoDiagonalNormal, (e.x, e.y), 2, steps=2, num_threads=1, progress=False
    ),
    # diagnostics
    "D.align_draws": lambda e: D.align_draws(e.draws, e.spec, seed=0),
    "D.canonical_form": lambda e: D.canonical_form(e.samples, e.spec),
    "D.collect_draws": lambda e: D.collect_draws(e.runs, num_samples=4, spec=e.spec),
    "D.draws_to_datatree": lambda e: D.draws_to_datatree(e.draws, e.spec),
    "D.mmd": lambda e: D.mmd(e.samples, e.samples, num_permutations=20, seed=0),
    "D.mmd2_unbiased": lambda e: D.mmd2_unbiased(torch.randn(6, 3, generator=e.gen()), torch.zeros(5, 3)),
    "D.rhat_ess": lambda e: D.rhat_ess(D.draws_to_datatree(e.draws, e.spec)),
    "D.rhat_ess_before_after": lambda e: D.rhat_ess_before_after(e.runs, e.spec, num_samples=4, seed=0),
    "D.site_dims": lambda e: D.site_dims(e.spec.shapes, e.spec),
    "D.symmetry_report": lambda e: D.symmetry_report(e.runs, e.spec, data=(e.x, e.y), num_samples=4, seed=0),
    "D.to_inference_data": lambda e: D.to_inference_data(e.runs, num_samples=4, spec=e.spec),
    "D.with_model_data": lambda e: D.with_model_data(e.draws, (e.x, e.y), posterior_predictive=True, seed=0),
    # metrics
    "M.accuracy": lambda e: M.accuracy(e.probs[0], e.labels),
    "M.aupr": lambda e: M.aupr(torch.linspace(0, 1, 7), torch.linspace(0.5, 2, 5)),
    "M.brier_score": lambda e: M.brier_score(e.probs[0], e.labels),
    "M.evaluate": lambda e: M.evaluate(e.probs, e.labels, e.probs.flip(-1)),
    "M.expected_calibration_error": lambda e: M.expected_calibration_error(e.probs[0], e.labels),
    "M.fpr_at_tpr": lambda e: M.fpr_at_tpr(torch.linspace(0, 1, 7), torch.linspace(0.5, 2, 5)),
    "M.predictive_mutual_information": lambda e: M.predictive_mutual_information(e.probs),
    "M.nll": lambda e: M.nll(e.probs[0], e.labels),
    "M.predictive_entropy": lambda e: M.predictive_entropy(e.probs[0]),
    "M.reliability_diagram": lambda e: M.reliability_diagram(e.probs[0], e.labels),
}


#: Entry points that still change the state on valid input (owned elsewhere; reported):
#: marked xfail (not strict) so that this module stays green until they are fixed.
KNOWN: dict[str, str] = {}


def test_every_public_name_is_called_or_classified():
    names = _public_names()
    missing = sorted(n for n in names if n not in CALLS and n.split(".", 1)[1] not in NOT_CALLED)
    assert not missing, f"public names without a call in tests/test_global_state.py: {missing}"
    stale = sorted(n for n in CALLS if n not in names)
    assert not stale, f"calls for names that are no longer public: {stale}"


@pytest.fixture(scope="module")
def env():
    before = snapshot()
    e = Env()
    assert snapshot().diff(before) == [], "building the inputs must not change the state either"
    return e


@pytest.mark.parametrize(
    "name", [pytest.param(n, marks=pytest.mark.xfail(reason=KNOWN[n])) if n in KNOWN else n for n in sorted(CALLS)]
)
def test_entry_point_leaves_the_global_state_as_found(name, env):
    if name not in _public_names():
        pytest.skip(f"{name} is not public (any more)")
    pyro.get_param_store()["users_own"] = torch.ones(3)  # a store that is not empty
    torch.set_num_threads(min(2, torch.get_num_threads()))
    before = snapshot()
    CALLS[name](env)
    changed = before.diff(snapshot())
    assert not changed, f"{name} changed the global state: {changed}"


def test_the_explore_profile_is_random_and_larger():
    profile = settings.get_profile("explore")
    assert not profile.derandomize and profile.max_examples >= 500 and profile.deadline is None
