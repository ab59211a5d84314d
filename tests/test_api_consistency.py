"""One vocabulary across the public API (issue 13, item 7), checked on signatures and
docstrings with :mod:`inspect`, and short readable ``repr`` s of every public result type.

One name per concept:

* the number of group elements is ``num_permutations`` (``num_samples``/``num_draws`` are
  draws of the weights ``w``: a ``num_samples`` documented as group elements is a leftover);
* the choice of ``I(g; w)`` / ``log q_sym`` estimator is ``estimator=`` (or ``<prefix>_estimator``);
* the alignment reference (run 0, a barycenter, a given point) is ``reference=``;
* the random stream is ``seed=``; progress bars are ``progress=``.

The callables are every public function and class of ``ps.__all__``,
``ps.diagnostics.__all__``, ``ps.diagnostics.metrics.__all__`` and ``ps.models.__all__``
(classes with the public methods they define). A check that fails on purpose is listed in
``KNOWN`` with its reason and marked ``xfail(strict=True)``: it turns red once fixed, to be
removed from the list.
"""

from __future__ import annotations

import dataclasses
import functools
import inspect
import re
import typing

import pytest
import torch
from pyro.infer.autoguide import AutoNormal

import pyro_symmetry as ps

D, M = ps.diagnostics, ps.diagnostics.metrics
MODULES = (("ps", ps), ("ps.diagnostics", D), ("ps.diagnostics.metrics", M), ("ps.models", ps.models))

#: Estimator names: a parameter choosing among them is the estimator choice.
ESTIMATORS = {"auto", "exact", "enumerate", "permanent", "contrastive", "importance"}
#: Names other libraries use for concepts that have one name here.
OTHER_NAMES = {
    "num_permutations": {"num_perms", "n_permutations", "n_perms", "num_elements", "num_group_elements", "K", "k"},
    "seed": {"rng", "random_state", "random_seed", "rng_seed", "rng_key"},
    "progress": {"verbose", "show_progress", "progress_bar", "pbar", "quiet", "silent", "tqdm"},
    "reference": {"align", "align_to", "alignment_method", "ref", "target"},
}
#: A ``num_samples`` documented with these words counts group elements, not draws of ``w``.
GROUP_ELEMENT_WORDS = re.compile(r"group element|permutations?\b|``K``|terms of the|contrastive", re.IGNORECASE)

#: ``(check, callable) -> reason``: checks failing on purpose (xfail strict); see the module docstring.
KNOWN: dict[tuple[str, str], str] = {}


def _public_callables() -> dict[str, typing.Any]:
    out = {}
    for prefix, module in MODULES:
        for name in module.__all__:
            obj = getattr(module, name)
            if inspect.ismodule(obj) or not callable(obj) or (inspect.isclass(obj) and issubclass(obj, BaseException)):
                continue
            out[f"{prefix}.{name}"] = obj
            if inspect.isclass(obj):
                for attr, value in vars(obj).items():
                    if not attr.startswith("_") and inspect.isfunction(value):
                        out[f"{prefix}.{name}.{attr}"] = value
    return out


PUBLIC = _public_callables()


def _signature(obj: typing.Any) -> inspect.Signature | None:
    try:
        return inspect.signature(obj)
    except (TypeError, ValueError):  # builtins without a signature
        return None


def _param_docs(obj: typing.Any) -> dict[str, str]:
    """``name -> type line and description`` from the numpy-style ``Parameters`` sections
    of ``obj``'s docstring (and its ``__init__``'s, for a class)."""
    docs = [inspect.getdoc(obj) or ""]
    if inspect.isclass(obj):
        docs.append(inspect.getdoc(obj.__init__) or "")
    out: dict[str, str] = {}
    for doc in docs:
        lines, section, current = doc.splitlines(), None, []
        for i, line in enumerate(lines):
            if line.strip() and i + 1 < len(lines) and set(lines[i + 1].strip()) == {"-"}:
                section, current = line.strip(), []
                continue
            if section not in ("Parameters", "Other Parameters") or set(line.strip()) == {"-"}:
                continue
            head = re.match(r"^(\*{0,2}[A-Za-z_][\w, *]*?)\s*(:.*)?$", line)
            if line and not line[0].isspace() and head:
                current = [n.strip().lstrip("*") for n in head.group(1).split(",")]
                for n in current:
                    out[n] = out.get(n, "") + (head.group(2) or "") + "\n"
            else:
                for n in current:
                    out[n] += line + "\n"
    return out


def _params(name: str) -> list[inspect.Parameter]:
    sig = _signature(PUBLIC[name])
    if sig is None:
        return []
    return [p for p in sig.parameters.values() if p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD)]


def _cases(check: str) -> list:
    return [
        pytest.param(n, marks=pytest.mark.xfail(strict=True, reason=KNOWN[(check, n)])) if (check, n) in KNOWN else n
        for n in sorted(PUBLIC)
    ]


def _deprecated(doc: str) -> bool:
    return "deprecated" in doc.lower()


# ---------------------------------------------------------------------- one name per concept
@pytest.mark.parametrize("name", _cases("other_names"))
def test_no_other_name_for_a_concept_that_has_one(name):
    bad = [
        f"{p.name!r} (the name is {concept!r})"
        for p in _params(name)
        for concept, others in OTHER_NAMES.items()
        if p.name in others and not _deprecated(_param_docs(PUBLIC[name]).get(p.name, ""))
    ]
    assert not bad, f"{name} takes {', '.join(bad)}"


@pytest.mark.parametrize("name", _cases("num_permutations"))
def test_num_samples_never_counts_group_elements(name):
    """``num_samples`` is draws of ``w``; the number of group elements is ``num_permutations``."""
    docs = _param_docs(PUBLIC[name])
    for p in _params(name):
        if p.name in ("num_samples", "num_draws"):
            doc = docs.get(p.name, "")
            said = re.sub(r"\bnot (?:the |of )?(?:group elements?|permutations?)", "", doc)  # "not group elements"
            assert _deprecated(doc) or not GROUP_ELEMENT_WORDS.search(said), (
                f"{name}({p.name}=...) is documented as counting group elements ({doc.strip()!r}); "
                "call it num_permutations"
            )


@pytest.mark.parametrize("name", _cases("estimator"))
def test_the_estimator_choice_is_called_estimator(name):
    docs = _param_docs(PUBLIC[name])
    for p in _params(name):
        if p.name == "estimator" or p.name.endswith("_estimator"):
            continue
        doc = docs.get(p.name, "")
        choices = set(re.findall(r"[\"']([a-z_]+)[\"']", doc.splitlines()[0] if doc else ""))
        by_default = isinstance(p.default, str) and p.default in ESTIMATORS
        by_doc = len(choices & (ESTIMATORS - {"auto"})) >= 2
        assert _deprecated(doc) or not (by_default or by_doc), (
            f"{name}({p.name}={p.default!r}) chooses an estimator; call it estimator (or <prefix>_estimator)"
        )


@pytest.mark.parametrize("name", _cases("reference"))
def test_the_alignment_reference_is_called_reference(name):
    docs = _param_docs(PUBLIC[name])
    for p in _params(name):
        if p.name == "reference" or p.name.endswith("_reference"):
            continue
        doc = docs.get(p.name, "")
        first = doc.splitlines()[0] if doc else ""
        by_default = p.default == "barycenter"
        by_doc = bool(re.search(r"[\"']barycenter[\"']", first))
        assert _deprecated(doc) or not (by_default or by_doc), (
            f"{name}({p.name}={p.default!r}) chooses the alignment reference; call it reference"
        )


#: Public callables that draw random numbers at the top level (not a distribution's own
#: ``sample``/``rsample``, which follow torch's ``generator=`` convention).
RANDOM = [
    "ps.align",
    "ps.align_many",
    "ps.align_samples",
    "ps.canonicalize",
    "ps.check_invariance",
    "ps.diagnostics.collect_draws",
    "ps.diagnostics.mmd",
    "ps.diagnostics.rhat_ess_before_after",
    "ps.diagnostics.symmetry_report",
    "ps.diagnostics.to_inference_data",
    "ps.mutual_information",
    "ps.nll_loss",
    "ps.symmetry_log_ratio",
    "ps.train_runs",
]


@pytest.mark.parametrize(
    "name",
    [
        pytest.param(n, marks=pytest.mark.xfail(strict=True, reason=KNOWN[("seed", n)])) if ("seed", n) in KNOWN else n
        for n in RANDOM
    ],
)
def test_randomness_is_controlled_by_seed(name):
    sig = _signature(PUBLIC[name])
    assert sig is not None and "seed" in sig.parameters, f"{name} draws random numbers but takes no seed="


#: Callables with a long loop a user waits on.
LONG = [
    "ps.align",
    "ps.align_many",
    "ps.align_samples",
    "ps.diagnostics.collect_draws",
    "ps.diagnostics.symmetry_report",
    "ps.diagnostics.to_inference_data",
    "ps.loss_barrier",
    "ps.min_mass",
    "ps.mutual_information",
    "ps.train_runs",
]


@pytest.mark.parametrize("name", LONG)
def test_long_steps_take_progress(name):
    sig = _signature(PUBLIC[name])
    assert sig is not None and "progress" in sig.parameters, f"{name} takes no progress="


#: The callables whose number of group elements is a parameter, and those choosing an estimator.
TAKES = {
    "num_permutations": [
        "ps.AutoSymmetrizedMeanField",
        "ps.AutoSymmetrizedNormal",
        "ps.Symmetrize",
        "ps.Symmetrized",
        "ps.mutual_information",
        "ps.symmetry_log_ratio",
    ],
    "estimator": [
        "ps.AutoSymmetrizedMeanField",
        "ps.AutoSymmetrizedNormal",
        "ps.Symmetrize",
        "ps.Symmetrized",
        "ps.log_q_sym",
        "ps.log_s",
        "ps.mutual_information",
        "ps.symmetry_log_ratio",
    ],
    "reference": ["ps.align_many", "ps.align_samples", "ps.canonicalize", "ps.diagnostics.align_draws"],
}


@pytest.mark.parametrize(
    "concept, name",
    [
        pytest.param(c, n, marks=pytest.mark.xfail(strict=True, reason=KNOWN[(f"takes {c}", n)]))
        if (f"takes {c}", n) in KNOWN
        else (c, n)
        for c, names in TAKES.items()
        for n in names
    ],
)
def test_the_concept_has_its_name(concept, name):
    sig = _signature(PUBLIC[name])
    assert sig is not None and concept in sig.parameters, f"{name} should take {concept}= ({sig})"


# ---------------------------------------------------------------------- deprecated aliases
def test_metrics_predictive_mutual_information_has_its_own_name():
    probs = torch.softmax(torch.randn(5, 7, 3, generator=torch.Generator().manual_seed(0)), -1)
    assert "predictive_mutual_information" in M.__all__ and "mutual_information" not in M.__all__
    with pytest.deprecated_call(match="predictive_mutual_information"):
        old = M.mutual_information(probs)
    assert torch.equal(old, M.predictive_mutual_information(probs))
    y = torch.arange(7) % 3
    with pytest.deprecated_call(match="ood_score"):
        old = M.evaluate(probs, y, probs.flip(1), ood_score="mutual_information")
    assert old == M.evaluate(probs, y, probs.flip(1), ood_score="predictive_mutual_information")
    # the metric's key: the new name, the old one reads with a warning and is not listed
    out = M.evaluate(probs, y)
    assert "predictive_mutual_information" in out and "mutual_information" not in out
    with pytest.deprecated_call(match="'predictive_mutual_information'"):
        assert out["mutual_information"] == out["predictive_mutual_information"]
    with pytest.raises(KeyError):
        out["no_such_metric"]


def test_predictive_summary_mutual_information_is_a_deprecated_alias():
    from pyro_symmetry.diagnostics._collection_predictive import PredictiveSummary

    mi = torch.rand(4, dtype=torch.float64)
    res = PredictiveSummary(torch.full((4, 2), 0.5, dtype=torch.float64), mi, None, None, None)
    with pytest.deprecated_call(match="predictive_mutual_information"):
        assert res.mutual_information is res.predictive_mutual_information


def test_rhat_ess_before_after_align_is_a_deprecated_alias_of_reference(examples):
    draws = examples["RunDraws"]()
    new = D.rhat_ess_before_after(None, draws.spec, reference="reference", draws=draws)
    with pytest.deprecated_call(match="reference="):
        old = D.rhat_ess_before_after(None, draws.spec, align="reference", draws=draws)
    for site in new.after.rhat:
        assert (new.after.rhat[site] == old.after.rhat[site]).all()


def test_reference_and_its_deprecated_alias_must_agree(world):
    draws = D.collect_draws(world[2], num_samples=3)
    with pytest.deprecated_call(match="reference="), pytest.raises(ValueError, match="method='reference'"):
        D.align_draws(draws, world[3], reference="barycenter", method="reference")
    with pytest.deprecated_call(match="reference="), pytest.raises(ValueError, match="align='barycenter'"):
        D.to_inference_data(world[2], num_samples=3, reference="reference", align="barycenter")


def test_seed_of_the_estimators_is_reproducible_and_leaves_the_global_rng(world):
    guide, spec, draws = world[2][0].guide, world[3], {k: v[:4] for k, v in world[4].items()}
    q = ps.gaussian_params(guide)
    state = torch.get_rng_state()
    one = ps.mutual_information(guide, spec, estimator="contrastive", num_samples=8, seed=3)
    two = ps.mutual_information(guide, spec, estimator="contrastive", num_samples=8, seed=3)
    assert one.value == two.value and torch.equal(state, torch.get_rng_state())
    ratio = ps.symmetry_log_ratio(q, spec, draws, "contrastive", 4, seed=5)
    assert torch.equal(ratio, ps.symmetry_log_ratio(q, spec, draws, "contrastive", 4, generator=_seeded(5)))
    assert torch.equal(state, torch.get_rng_state())
    with pytest.raises(ValueError, match="seed= or generator="):
        ps.symmetry_log_ratio(q, spec, draws, "contrastive", 4, seed=5, generator=_seeded(5))
    with pytest.raises(ValueError, match="seed= or generator="):
        ps.mutual_information(guide, spec, num_samples=8, seed=5, generator=_seeded(5))
    with pytest.raises(TypeError, match="seed"):
        ps.mutual_information(guide, spec, num_samples=8, seed=1.5)


def _seeded(seed):
    return torch.Generator().manual_seed(seed)


def _gaussian_base(world):
    import pyro.distributions as dist

    _, _, runs, spec, _ = world
    q = ps.gaussian_params(runs[0].guide)
    return {k: dist.Normal(loc, scale).to_event(loc.dim()) for k, (loc, scale) in q.items()}, spec


def _gen():
    return torch.Generator().manual_seed(0)


#: ``name -> (old spelling, new spelling)``: calls on :func:`world` that must give the same
#: result, the old one with a ``DeprecationWarning`` (issue 13: aliases kept for one release).
OLD_SPELLINGS = {
    "ps.Symmetrized(num_samples=)": (
        lambda w: ps.Symmetrized(*_gaussian_base(w), estimator="contrastive", num_samples=4).num_permutations,
        lambda w: ps.Symmetrized(*_gaussian_base(w), estimator="contrastive", num_permutations=4).num_permutations,
    ),
    "ps.mutual_information(method=)": (
        lambda w: (
            ps.mutual_information(w[2][0].guide, w[3], method="contrastive", num_samples=8, generator=_gen()).value
        ),
        lambda w: (
            ps.mutual_information(w[2][0].guide, w[3], estimator="contrastive", num_samples=8, generator=_gen()).value
        ),
    ),
    "ps.log_s(method=)": (
        lambda w: ps.log_s(
            ps.gaussian_params(w[2][0].guide), w[3], {k: v[:3] for k, v in w[4].items()}, method="exact"
        ),
        lambda w: ps.log_s(
            ps.gaussian_params(w[2][0].guide), w[3], {k: v[:3] for k, v in w[4].items()}, estimator="exact"
        ),
    ),
    "ps.diagnostics.align_draws(method=)": (
        lambda w: D.align_draws(D.collect_draws(w[2], num_samples=5), w[3], method="reference").samples,
        lambda w: D.align_draws(D.collect_draws(w[2], num_samples=5), w[3], reference="reference").samples,
    ),
    "ps.diagnostics.to_inference_data(align=)": (
        lambda w: D.to_inference_data(w[2], num_samples=5, align="reference")["posterior"]["fc1.weight"].values,
        lambda w: D.to_inference_data(w[2], num_samples=5, reference="reference")["posterior"]["fc1.weight"].values,
    ),
}


def _equal(a, b) -> bool:
    if isinstance(a, dict):
        return a.keys() == b.keys() and all(_equal(a[k], b[k]) for k in a)
    return bool((torch.as_tensor(a) == torch.as_tensor(b)).all())


@pytest.mark.parametrize(
    "name",
    [
        pytest.param(n, marks=pytest.mark.xfail(strict=True, reason=KNOWN[("alias", n)]))
        if ("alias", n) in KNOWN
        else n
        for n in OLD_SPELLINGS
    ],
)
def test_old_spellings_warn_and_give_the_same_result(name, world):
    old, new = OLD_SPELLINGS[name]
    torch.manual_seed(0)  # draws of w come from torch's global RNG
    with pytest.deprecated_call():
        before = old(world)
    torch.manual_seed(0)
    assert _equal(before, new(world))


# ---------------------------------------------------------------------- result types
#: Public dataclasses and named tuples that are not results (inputs, specs, losses).
NOT_RESULTS = {"Axis", "FlatLayout", "ModelLoss", "NeuronGroup", "PermutationSpec", "PredictiveLoss"}


def _result_types() -> dict[str, type]:
    out = {}
    for _, module in MODULES:
        for name in module.__all__:
            obj = getattr(module, name)
            record = dataclasses.is_dataclass(obj) or (inspect.isclass(obj) and issubclass(obj, tuple))
            if inspect.isclass(obj) and record and name not in NOT_RESULTS:
                out[name] = obj
    return out


RESULT_TYPES = _result_types()


@pytest.fixture(scope="module")
def world():
    """A 4-6-5-3 ReLU MLP classifier, three short SVI runs, 100 draws of the first."""
    torch.manual_seed(0)
    gen = torch.Generator().manual_seed(0)
    x, y = torch.randn(64, 4, generator=gen), torch.randint(0, 3, (64,), generator=gen)
    make_model = functools.partial(ps.models.BayesianMLP, 4, [6, 5], 3)
    runs = ps.train_runs(
        make_model, functools.partial(AutoNormal, init_scale=0.05), (x, y), 3, steps=30, progress=False
    )
    spec = runs[0].model.spec
    draws = {k: v[0] for k, v in ps.as_posterior(runs[0].guide, spec).draws(100).items()}
    return x, y, runs, spec, draws


@pytest.fixture(scope="module")
def examples(world, tmp_path_factory):
    """One realistic instance of every public result type (see :func:`world`)."""
    x, y, runs, spec, draws = world
    gen = torch.Generator().manual_seed(1)
    other = {k: v + 0.01 * torch.randn(v.shape, generator=gen) for k, v in draws.items()}
    comparison = D.rhat_ess_before_after(runs, spec, num_samples=20)
    probs = torch.softmax(torch.randn(10, 64, 3, generator=gen), -1)
    out = {
        "AlignmentResult": lambda: ps.align(runs[0], runs[1], spec, seed=0),
        "ManyAlignment": lambda: ps.align_many(runs, spec, seed=0),
        "SampleAlignment": lambda: ps.align_samples(draws, spec, seed=0),
        "BarrierResult": lambda: ps.loss_barrier(ps.nll_loss(runs[0].model, x, y, num_samples=4), runs[0], runs[1]),
        "MIEstimate": lambda: ps.mutual_information(runs[0].guide, spec, num_samples=32),
        "CanonicalForm": lambda: ps.canonicalize(draws, spec),
        "MinMassResult": lambda: ps.min_mass(draws, spec),
        "TrainedRun": lambda: runs[0],
        "ConvergenceComparison": lambda: comparison,
        "ConvergenceSummary": lambda: comparison.before,
        "RunDraws": lambda: comparison.draws_before,
        "MMDResult": lambda: D.mmd(draws, other, num_permutations=100),
        "ReliabilityDiagram": lambda: M.reliability_diagram(probs, y),
        "SymmetryReport": lambda: D.symmetry_report(
            runs,
            spec,
            data=(x, y),
            out_dir=tmp_path_factory.mktemp("report"),
            num_samples=20,
            barrier_pairs=1,
            barrier_points=5,
            mi_samples=16,
            mmd_permutations=20,
            progress=False,
            figures=False,
        ),
    }
    return {name: functools.cache(build) for name, build in out.items()}  # built once, on first use


def test_every_public_result_type_has_an_example(examples):
    """A new public record fails here until it gets an example in ``examples``."""
    assert set(RESULT_TYPES) == set(examples)


def _cases_by_type(check: str) -> list:
    return [
        pytest.param(n, marks=pytest.mark.xfail(strict=True, reason=KNOWN[(check, n)])) if (check, n) in KNOWN else n
        for n in sorted(RESULT_TYPES)
    ]


@pytest.mark.parametrize("name", _cases_by_type("repr"))
def test_result_repr_is_short(name, examples):
    value = examples[name]()
    assert isinstance(value, RESULT_TYPES[name])
    text = repr(value)
    assert len(text) < 300, f"repr({name}) is {len(text)} characters: {text[:300]}..."
    assert "tensor([" not in text or len(text) < 200, f"repr({name}) prints tensors: {text}"


@pytest.mark.parametrize("name", _cases_by_type("frozen"))
def test_result_is_a_frozen_dataclass(name):
    cls = RESULT_TYPES[name]
    assert dataclasses.is_dataclass(cls) and cls.__dataclass_params__.frozen, f"{name} is not a frozen dataclass"


@pytest.mark.parametrize("name", _cases_by_type("fields"))
def test_result_fields_are_consistent(name, examples):
    """``converged`` a bool, ``objective`` a float tensor (or a list of floats), the
    estimator recorded as ``estimator``."""
    value = examples[name]()
    fields = {f.name for f in dataclasses.fields(value)} if dataclasses.is_dataclass(value) else set(value._fields)
    if "converged" in fields:
        assert type(value.converged) is bool, f"{name}.converged is {type(value.converged).__name__}, not bool"
    if "objective" in fields:
        obj = value.objective
        ok = (torch.is_tensor(obj) and obj.is_floating_point()) or (
            isinstance(obj, list) and all(isinstance(v, float) for v in obj)
        )
        assert ok, f"{name}.objective is {type(obj).__name__}"
    assert "method" not in fields or name not in ("MIEstimate",), f"{name} records its estimator as 'method'"
