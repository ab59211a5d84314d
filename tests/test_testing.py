"""``pyro_symmetry.testing``: what a user writes in their own test suite, on their own models."""

from __future__ import annotations

import dataclasses

import pyro.distributions as dist
import pytest
import torch
from hypothesis import given
from user_models import DeepBNN, TutorialBNN, deep_spec, functional_model, functional_spec, tutorial_spec

import pyro_symmetry as ps
from pyro_symmetry.testing import assert_invariant, assert_symmetric, group_elements, posteriors

X1, Y1 = torch.randn(20, 1, generator=torch.Generator().manual_seed(0)), torch.randn(20)
X3, Y3 = torch.randn(15, 3), torch.randn(15)
X8, Y8 = torch.randn(12, 8), torch.randint(0, 3, (12,))


@given(group_elements(tutorial_spec()))
def test_tutorial_model_is_invariant(g):
    assert_invariant(TutorialBNN(), tutorial_spec(), X1, Y1, elements=[g])


@given(group_elements(functional_spec()))
def test_functional_model_is_invariant(g):
    assert_invariant(functional_model, functional_spec(), X3, Y3, elements=[g])


@given(group_elements(deep_spec()))
def test_modulelist_model_is_invariant(g):
    assert_invariant(DeepBNN(), deep_spec(), X8, Y8, elements=[g])


def test_a_wrong_spec_fails_naming_the_site():
    relu_as_odd = deep_spec().replace_groups(
        {k: dataclasses.replace(g, activation_symmetry="sign") for k, g in deep_spec().groups.items()}
    )
    with pytest.raises(AssertionError, match="likelihood at site 'obs'"):
        assert_invariant(DeepBNN(), relu_as_odd, X8, Y8)
    half = ps.mlp_spec(["layer1", "layer2"], [6])  # misses the bias: the prior still agrees, the function not
    no_bias = half.replace_groups(
        {"layer1": dataclasses.replace(half.groups["layer1"], incoming=(("layer1.weight", -2),))}
    )
    with pytest.raises(AssertionError, match="site 'obs'"):
        assert_invariant(TutorialBNN(), no_bias, X1, Y1)


@given(group_elements(ps.mlp_spec(["a", "b", "c"], [3, 2], activation_symmetry="sign")))
def test_group_elements_are_valid_and_signed(g):
    spec = ps.mlp_spec(["a", "b", "c"], [3, 2], activation_symmetry="sign")
    spec.validate(g)
    assert set(g) == {"a", "b"}


def test_plain_module_and_nested_groups():
    net = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.Tanh(), torch.nn.Linear(4, 2))
    assert_invariant(net, ps.mlp_spec(["0", "2"], [4], activation_symmetry="sign"), torch.randn(5, 3))


def test_assert_symmetric_accepts_exact_and_rejects_stochastic_estimators():
    spec = tutorial_spec().with_shapes({"layer1.weight": (6, 1), "layer1.bias": (6,), "layer2.weight": (1, 6)})
    gen = torch.Generator().manual_seed(1)
    base = {
        s: dist.Normal(torch.randn(spec.shapes[s], generator=gen, dtype=torch.float64), 0.5).to_event(
            len(spec.shapes[s])
        )
        for s in spec.sites
    }
    assert_symmetric(ps.Symmetrized(base, spec, estimator="permanent"), spec)
    with pytest.raises(AssertionError, match="log q_sym changes"):
        assert_symmetric(ps.Symmetrized(base, spec, estimator="contrastive"), spec)


@given(posteriors(tutorial_spec().with_shapes({"layer1.weight": (6, 1), "layer1.bias": (6,), "layer2.weight": (1, 6)})))
def test_posteriors_strategy_gives_valid_gaussians(q):
    for loc, scale in q.values():
        assert loc.shape == scale.shape and bool((scale > 0).all())


def test_imports_and_asserts_without_hypothesis_strategies_name_the_extra():
    """``pyro_symmetry.testing`` imports and its assertions run without Hypothesis; a strategy
    raises an ImportError naming the ``testing`` extra."""
    import subprocess
    import sys

    code = (
        "import sys; sys.modules['hypothesis'] = None\n"
        "import torch, pyro_symmetry as ps, pyro_symmetry.testing as t\n"
        "net = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.Tanh(), torch.nn.Linear(4, 2))\n"
        "spec = ps.mlp_spec(['0', '2'], [4], activation_symmetry='sign')\n"
        "t.assert_invariant(net, spec, torch.randn(5, 3))\n"
        "try:\n"
        "    t.group_elements(spec)\n"
        "except ImportError as e:\n"
        "    print('ImportError:', e)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    assert "ImportError:" in out.stdout and "pyro-symmetry[testing]" in out.stdout


def test_the_docs_testing_page_is_a_passing_test_file():
    """docs/testing.md's test file, as written: its tests pass (Hypothesis included)."""
    import re
    from pathlib import Path

    page = (Path(__file__).resolve().parents[1] / "docs" / "testing.md").read_text()
    (block,) = re.findall(r"```python\n(.*?)```", page, flags=re.S)
    ns: dict = {"__name__": "test_my_bnn"}
    exec(compile(block, "docs/testing.md", "exec"), ns)  # noqa: S102 - the page's own code
    tests = [v for k, v in ns.items() if k.startswith("test_") and callable(v)]
    assert len(tests) == 3
    for test in tests:
        test()
