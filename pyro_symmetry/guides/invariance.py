"""Numerical check that a model's prior and likelihood are invariant under a spec.

The identity ``ELBO(q_sym) = ELBO(q) + I(g; w)`` and the training of symmetrized
guides with ``w ~ q`` both rest on ``log p(D, g . w) = log p(D, w)``. A spec that
does not match the model (a non-iid prior, a layer the spec misses, an activation
that breaks sign flips) makes them false, so the guides check it at set-up.
"""

from __future__ import annotations

import math
import random
from collections.abc import Callable
from typing import Any

import numpy as np
import pyro.poutine as poutine
import torch
from pyro.poutine.util import site_is_subsample

from .._state import fork_rng, isolated
from .._validation import check_int, check_real
from ..groups import PermutationSpec, SpecError

# ``fork_rng`` lives in ``pyro_symmetry._state``; importable from here as before.
__all__ = ["check_invariance", "fork_rng"]


class _SameRandomness:
    """Restore torch's (CPU and initialized CUDA), numpy's and Python's RNG states to the
    ones at construction: each run of the model then draws the same numbers.

    The check conditions every site it sees, but a site the model hides from outer
    handlers (``poutine.block(model, hide=[...])``, the part an ``AutoGuideList`` gives
    another guide, or a ``with poutine.block()`` in the model's body) is drawn from its
    prior on every run. From the same RNG state it is drawn with the same noise, hence the
    same value wherever its distribution is the same, which it is for an invariant model.
    """

    def __init__(self) -> None:
        self.torch = torch.get_rng_state()
        self.cuda = torch.cuda.get_rng_state_all() if torch.cuda.is_initialized() else None
        self.numpy = np.random.get_state()  # noqa: NPY002 - the legacy global state models use
        self.python = random.getstate()

    def restore(self) -> None:
        torch.set_rng_state(self.torch)
        if self.cuda is not None:
            torch.cuda.set_rng_state_all(self.cuda)
        np.random.set_state(self.numpy)  # noqa: NPY002
        random.setstate(self.python)


def _site_log_probs(
    model: Callable,
    values: dict[str, torch.Tensor],
    subsample: poutine.Trace,
    randomness: _SameRandomness,
    args: tuple,
    kwargs: dict,
) -> dict:
    # Replaying the subsample indices makes every run see the same minibatch, and the same
    # RNG state the same values at the sites the model hides.
    conditioned = poutine.replay(poutine.condition(model, data=values), trace=subsample)
    randomness.restore()
    tr = poutine.trace(conditioned).get_trace(*args, **kwargs)
    tr.compute_log_prob()
    return {
        name: site["log_prob_sum"]
        for name, site in tr.nodes.items()
        if site["type"] == "sample" and not site_is_subsample(site)
    }


def check_invariance(
    model: Callable,
    spec: PermutationSpec,
    *args: Any,
    seed: int = 0,
    rtol: float = 1e-4,
    atol: float = 1e-3,
    **kwargs: Any,
) -> None:
    """Raise :class:`~pyro_symmetry.SpecError` naming the first site whose log-density
    changes when the spec's sites are moved by a group element.

    The spec's sites are set to a fresh prior draw (so that an initialization at
    zero cannot hide a broken symmetry), every other site is held at one trace's
    values, and ``log p`` of every sample site (priors and likelihood) is compared
    at ``w`` and at ``g . w`` for two (signed) elements ``g``: a cyclic shift of
    every group with all signs flipped, which moves every neuron, and a random one.
    Random subsample indices of the model's plates are held fixed, and so are sites
    the model hides from outer handlers (``poutine.block(model, hide=[...])``, as an
    ``AutoGuideList`` part sees it): every run starts from the same RNG state, so they
    are drawn with the same noise (the same value, for an invariant model). The model runs in
    :func:`pyro_symmetry._state.isolated`: the check leaves torch's, numpy's and Python's
    random streams, the thread count, the default dtype and Pyro's param store (a model's
    ``pyro.param``) as it found them, so a guide that runs it at set-up trains exactly as
    one that does not.

    Parameters
    ----------
    model : callable
        A Pyro model, called with ``*args, **kwargs``.
    spec : PermutationSpec
    seed : int
        Seed of the group element (the check is deterministic given the model's draw).
    rtol, atol : float
        Tolerance ``|lp(g.w) - lp(w)| <= atol + rtol |lp(w)|`` per site.

    Raises
    ------
    SpecError
        A site of the spec that is not a latent sample site, or a site whose
        log-density changes (naming it and whether it is a prior or the likelihood).
    ValueError
        A site whose log-density is NaN or infinite at a prior draw (naming it).
    TypeError
        ``spec`` not a ``PermutationSpec``, ``model`` not callable.
    """
    if not isinstance(spec, PermutationSpec):
        raise TypeError(f"spec must be a PermutationSpec, got {type(spec).__name__}")
    if not callable(model):
        raise TypeError(f"model must be callable, got {type(model).__name__}")
    seed = check_int("seed", seed)
    rtol = check_real("rtol", rtol, nonnegative=True)
    atol = check_real("atol", atol, nonnegative=True)
    # The model may draw from any RNG or create params (pyro.param): leave them all as found.
    with isolated(), torch.no_grad(), poutine.block():
        tr = poutine.trace(model).get_trace(*args, **kwargs)
        values = {
            name: site["value"]
            for name, site in tr.nodes.items()
            if site["type"] == "sample" and not site_is_subsample(site)
        }
        for s in spec.sites:
            if s not in tr.nodes or tr.nodes[s]["type"] != "sample":
                raise SpecError(f"site {s!r} of the spec is not a sample site of the model (sites: {sorted(values)})")
            if tr.nodes[s]["is_observed"]:
                raise SpecError(f"site {s!r} of the spec is observed; the group must act on latent sites")
            values[s] = tr.nodes[s]["fn"].sample()
        subsample = poutine.Trace()
        for name, site in tr.nodes.items():
            if site["type"] == "sample" and site_is_subsample(site):
                subsample.add_node(name, **site)
        device = values[spec.sites[0]].device
        randomness = _SameRandomness()
        lp0 = _site_log_probs(model, values, subsample, randomness, args, kwargs)
        lps = []
        for perm in _test_elements(spec, seed):
            moved = spec.apply({s: values[s] for s in spec.sites}, {k: p.to(device) for k, p in perm.items()})
            lps.append(_site_log_probs(model, {**values, **moved}, subsample, randomness, args, kwargs))
    for name, a in lp0.items():
        for lp1 in lps:
            if name in lp1:
                _compare_site(tr, name, float(a), float(lp1[name]), rtol, atol)


def _test_elements(spec: PermutationSpec, seed: int) -> list[dict[str, torch.Tensor]]:
    """A cyclic shift of every group (all signs flipped where signs apply), which moves
    every neuron even of a width-2 or width-1 group, and a random (signed) element."""
    shift = {}
    for k, g in spec.groups.items():
        p = torch.roll(torch.arange(g.size), 1)
        shift[k] = ~p if g.signed else p
    return [shift, spec.sample(generator=torch.Generator().manual_seed(seed))]


def _compare_site(tr: poutine.Trace, name: str, a: float, b: float, rtol: float, atol: float) -> None:
    if not math.isfinite(a):
        raise ValueError(
            f"the log-density of site {name!r} is {a} at a prior draw of the spec's sites: check the data and "
            "the model's parameters for NaN/Inf"
        )
    if not abs(a - b) <= atol + rtol * abs(a):
        kind = "likelihood" if tr.nodes[name]["is_observed"] else "prior"
        raise SpecError(
            f"the model is not invariant under the spec at site {name!r}: its {kind} log-density is {a:.6g} at w "
            f"and {b:.6g} at g.w for a group element g. The symmetrized posterior's identities need a "
            "G-invariant prior and likelihood: check the spec's groups, sites and activation symmetry "
            "(or pass check_invariance=False if you know better)"
        )
