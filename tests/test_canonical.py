"""Canonical forms (``ps.canonicalize``): one point per symmetry orbit, idempotent."""

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from strategies import group_element, mlp_architectures, model_params, seeds
from test_scaling import random_log_scales, rel_err

import pyro_symmetry as ps
from pyro_symmetry.models import BayesianCNN, BayesianMLP


def orbit(params, spec, seed, n, scale=1.5):
    """``n`` random elements of the orbit of ``params``: rescaled (ReLU groups) and (signed) permuted."""
    moved = ps.rescale(params, spec, random_log_scales(spec, seed, (n,), scale)) if ps.mass_sites(spec) else params
    return spec.apply(moved, group_element(spec, seed + 1, batch_shape=(n,)))


def assert_single_point(canon, spec, tol=1e-8):
    for k in spec.sites:
        first = canon[k][:1].expand_as(canon[k])
        assert rel_err(canon[k], first) < tol, k


@given(arch=mlp_architectures(), seed=seeds, act=st.sampled_from(["relu", "tanh", "gelu"]))
def test_sort_maps_an_orbit_to_one_point(arch, seed, act):
    n_in, hidden, n_out = arch
    model = BayesianMLP(n_in, hidden, n_out, activation=act)
    samples = orbit(model_params(model, seed=seed), model.spec, seed, 5)
    canon = ps.canonicalize(samples, model.spec, permutation="sort")
    assert_single_point(canon.params, model.spec)
    x = torch.randn(4, n_in, dtype=torch.float64, generator=torch.Generator().manual_seed(seed))
    assert rel_err(model.functional(canon.params, x), model.functional(samples, x)) < 1e-8


def test_sort_on_a_whole_orbit_by_enumeration():
    """Every one of the 2! * 3! = 12 permutations, each with its own random rescaling."""
    model = BayesianMLP(3, [2, 3], 2)
    spec = model.spec
    params = model_params(model, seed=7)
    elements = spec.elements()
    rescaled = ps.rescale(params, spec, random_log_scales(spec, 3, (12,), 2.0))
    samples = spec.apply(rescaled, elements)
    canon = ps.canonicalize(samples, spec, permutation="sort")
    assert_single_point(canon.params, spec)
    # the common point is the minimum-mass network with its neurons sorted by norm
    norms = canon.params["fc1.weight"][0].square().sum(-1) + canon.params["fc1.bias"][0].square()
    assert (norms[:-1] >= norms[1:]).all()


@settings(max_examples=8)  # conv nets are slow to evaluate; 8 draws cover the shapes
@given(seed=seeds)
def test_sort_maps_a_cnn_orbit_to_one_point(seed):
    model = BayesianCNN(1, (4, 4), [3, 2], 2, activation="relu")
    samples = orbit(model_params(model, seed=seed), model.spec, seed, 4)
    assert_single_point(ps.canonicalize(samples, model.spec, permutation="sort").params, model.spec)


@given(arch=mlp_architectures(), seed=seeds, act=st.sampled_from(["relu", "tanh"]))
def test_canonical_form_is_a_group_element_applied_to_the_input(arch, seed, act):
    n_in, hidden, n_out = arch
    model = BayesianMLP(n_in, hidden, n_out, activation=act)
    spec = model.spec
    samples = model_params(model, (3,), seed=seed)
    canon = ps.canonicalize(samples, spec, permutation="sort")
    rebuilt = samples
    if act == "relu":
        rebuilt = ps.rescale(rebuilt, spec, canon.log_scales)
        assert canon.signs == {}
    else:
        rebuilt = ps.flip_signs(rebuilt, spec, canon.signs)
        assert canon.log_scales == {}
    rebuilt = spec.apply(rebuilt, canon.permutation)
    spec.validate(canon.permutation)
    for k in spec.sites:
        torch.testing.assert_close(rebuilt[k], canon.params[k], rtol=1e-12, atol=1e-14)


@given(arch=mlp_architectures(), seed=seeds, act=st.sampled_from(["relu", "tanh"]), key=st.sampled_from(["norm", 0]))
def test_sort_is_idempotent(arch, seed, act, key):
    n_in, hidden, n_out = arch
    model = BayesianMLP(n_in, hidden, n_out, activation=act)
    samples = model_params(model, (3,), seed=seed)
    sort_key = "incoming_norm" if key == "norm" else key
    once = ps.canonicalize(samples, model.spec, permutation="sort", sort_key=sort_key)
    twice = ps.canonicalize(once.params, model.spec, permutation="sort", sort_key=sort_key)
    for k in model.spec.sites:
        assert rel_err(twice.params[k], once.params[k]) < 1e-9
    for g, p in twice.permutation.items():
        assert torch.equal(p, torch.arange(p.shape[-1]).expand_as(p)), g


@given(seed=seeds)
def test_sort_by_an_incoming_weight_is_orbit_invariant(seed):
    """An ``int`` key reads weights indexed by the previous layer, sorted first."""
    model = BayesianMLP(4, [3, 4, 3], 2)
    samples = orbit(model_params(model, seed=seed), model.spec, seed, 6)
    canon = ps.canonicalize(samples, model.spec, permutation="sort", sort_key=1)
    assert_single_point(canon.params, model.spec)
    w = canon.params["fc2.weight"][0, :, 1]
    assert (w[:-1] >= w[1:]).all()


def test_sort_with_a_callable_key_and_batched_equals_per_sample():
    model = BayesianMLP(3, [4, 5], 2)
    samples = model_params(model, (2, 3), seed=2)
    key = lambda p, spec, g: p[f"{g}.bias"]  # noqa: E731
    canon = ps.canonicalize(samples, model.spec, permutation="sort", sort_key=key)
    b = canon.params["fc2.bias"]
    assert (b[..., :-1] >= b[..., 1:]).all()
    for i in range(2):
        for j in range(3):
            one = ps.canonicalize(
                {k: v[i, j] for k, v in samples.items()}, model.spec, permutation="sort", sort_key=key
            )
            for k in model.spec.sites:  # equal up to the min-mass tolerance (the batch may sweep longer)
                assert rel_err(canon.params[k][i, j], one.params[k]) < 1e-9


@pytest.mark.parametrize("act", ["relu", "tanh"])
def test_align_recovers_a_planted_orbit(act):
    """Samples that are symmetric copies of a reference all align to its canonical form."""
    model = BayesianMLP(5, [6, 4], 3, activation=act)
    spec = model.spec
    reference = model_params(model, seed=3)
    samples = orbit(reference, spec, 5, 6, scale=1.0)
    canon = ps.canonicalize(samples, spec, permutation="align", reference=reference)
    assert_single_point(canon.params, spec)
    ref_canon = ps.canonicalize(reference, spec, permutation=None).params
    for k in spec.sites:
        assert rel_err(canon.params[k][0], ref_canon[k]) < 1e-8
        torch.testing.assert_close(canon.reference[k], ref_canon[k])
    # reference=None: the first sample is the reference
    first = ps.canonicalize(samples, spec, permutation="align")
    assert_single_point(first.params, spec)
    x = torch.randn(4, 5, dtype=torch.float64)
    assert rel_err(model.functional(first.params, x), model.functional(samples, x)) < 1e-8


@pytest.mark.parametrize("act", ["relu", "tanh"])
def test_default_align_maps_single_orbit_members_to_one_point(act):
    """With no reference, one network is aligned to its own sorted form: two members of an
    orbit, canonicalized one at a time (or as a batch, in either order), meet."""
    model = BayesianMLP(5, [6, 4], 3, activation=act)
    spec = model.spec
    w = model_params(model, seed=11)
    copies = orbit(w, spec, 2, 12, scale=1.0)
    one = [ps.canonicalize({k: v[i] for k, v in copies.items()}, spec).params for i in range(2)]
    for k in spec.sites:
        assert rel_err(one[0][k], one[1][k]) < 1e-8
    flipped = {k: v.flip(0) for k, v in copies.items()}
    for batch in (copies, flipped):
        canon = ps.canonicalize(batch, spec).params
        for k in spec.sites:
            assert rel_err(canon[k][0], one[0][k]) < 1e-8 and rel_err(canon[k][1], one[0][k]) < 1e-8


@pytest.mark.parametrize("act", ["relu", "tanh"])
@pytest.mark.parametrize("seed", [0, 1, 2, 8])
def test_align_is_idempotent(act, seed):
    """Also with the barycenter passed back as the reference: the mean of min-mass networks
    is not min-mass, so the returned barycenter is put in canonical scaling first (before,
    passing it back re-aligned 3 of these 4 seeds differently)."""
    model = BayesianMLP(4, [5, 5], 2, activation=act)
    samples = model_params(model, (6,), seed=seed)
    once = ps.canonicalize(samples, model.spec, permutation="align")
    twice = ps.canonicalize(once.params, model.spec, permutation="align")
    for k in model.spec.sites:
        assert rel_err(twice.params[k], once.params[k]) < 1e-9
    barycenter = ps.canonicalize(samples, model.spec, permutation="align", reference="barycenter")
    again = ps.canonicalize(barycenter.params, model.spec, permutation="align", reference=barycenter.reference)
    for k in model.spec.sites:
        assert rel_err(again.params[k], barycenter.params[k]) < 1e-9


def test_scaling_only_and_permutation_only():
    model = BayesianMLP(3, [4], 2)
    samples = model_params(model, (3,), seed=1)
    only_scaling = ps.canonicalize(samples, model.spec, permutation=None)
    torch.testing.assert_close(only_scaling.params["fc1.weight"], ps.min_mass(samples, model.spec).params["fc1.weight"])
    only_perm = ps.canonicalize(samples, model.spec, scaling=False, permutation="sort")
    assert only_perm.log_scales == {}
    norms = only_perm.params["fc1.weight"].square().sum(-1) + only_perm.params["fc1.bias"].square()
    assert (norms[..., :-1] >= norms[..., 1:]).all()


def test_canonicalize_errors():
    model = BayesianMLP(3, [4], 2)
    samples = model_params(model, (2,))
    with pytest.raises(ValueError, match="permutation must be 'align', 'sort' or None"):
        ps.canonicalize(samples, model.spec, permutation="random")
    with pytest.raises(ValueError, match="reference is only used with permutation='align'"):
        ps.canonicalize(samples, model.spec, permutation="sort", reference=samples)
    with pytest.raises(ValueError, match="sort_key must be"):
        ps.canonicalize(samples, model.spec, permutation="sort", sort_key="largest")
    with pytest.raises(ValueError, match="sort_key=9 is out of range"):
        ps.canonicalize(samples, model.spec, permutation="sort", sort_key=9)
    with pytest.raises(ps.SpecError, match="sort_key returned"):
        ps.canonicalize(samples, model.spec, permutation="sort", sort_key=lambda p, s, g: torch.zeros(3))
    with pytest.raises(TypeError, match="non-empty mapping"):
        ps.canonicalize([], model.spec)
    del samples["fc1.bias"]
    with pytest.raises(ps.SpecError, match="site 'fc1.bias'.* missing"):
        ps.canonicalize(samples, model.spec)


def test_align_one_network_to_a_gaussian_reference():
    """A single network and a ``(loc, scale)`` reference: aligned to the reference's means."""
    model = BayesianMLP(4, [5, 3], 2)
    reference = model_params(model, seed=1)
    x = orbit(reference, model.spec, 9, 1)
    x = {k: v[0] for k, v in x.items()}
    gaussian = {k: (v, torch.ones_like(v)) for k, v in reference.items()}
    canon = ps.canonicalize(x, model.spec, reference=gaussian)
    expected = ps.canonicalize(reference, model.spec, permutation=None).params
    for k in model.spec.sites:
        assert rel_err(canon.params[k], expected[k]) < 1e-8
