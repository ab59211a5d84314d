"""Property-based invariance tests for users' own models (Hypothesis is an optional extra).

A user who writes a Bayesian network and a spec for it checks in their own pytest suite
that the spec describes the model:

.. code-block:: python

    from hypothesis import given
    import pyro_symmetry as ps
    from pyro_symmetry.testing import assert_invariant, group_elements

    spec = ps.PermutationSpec.from_module(net)

    @given(group_elements(spec))
    def test_my_model_is_invariant(g):
        assert_invariant(model, spec, x, y, elements=[g])

:func:`assert_invariant` compares the model's output (the function), the log-density of
every latent site (the prior) and of every observed site (the likelihood) at a prior draw
and at the draw moved by each element, and fails naming the first site and element that
breaks. :func:`assert_symmetric` checks that a symmetrized posterior's density is invariant.
The strategies (:func:`group_elements`, :func:`posteriors`, :func:`mlp_architectures`) are
the ones the package's own tests use.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch

from ._state import isolated
from .groups import PermutationSpec, SpecError, encode_signed

__all__ = ["assert_invariant", "assert_symmetric", "group_elements", "mlp_architectures", "posteriors"]


def _st():
    try:
        from hypothesis import strategies as st
    except ImportError:  # pragma: no cover - exercised without the extra
        raise ImportError(
            "pyro_symmetry.testing's strategies need Hypothesis: pip install 'pyro-symmetry[testing]'"
        ) from None
    return st


def group_elements(spec: PermutationSpec, *, signed: bool = True) -> Any:
    """A Hypothesis strategy of (unbatched) group elements of ``spec``.

    Every group gets a permutation drawn by Hypothesis (so failures shrink towards the
    identity), with sign flips for sign-flip groups (unless ``signed=False``) and one
    permutation per parent slot for nested groups; tied groups are single groups.
    """
    st = _st()
    if not isinstance(spec, PermutationSpec):
        raise TypeError(f"spec must be a PermutationSpec, got {type(spec).__name__}")

    def one(shape: tuple[int, ...], flips: bool) -> Any:
        n, slots = shape[-1], math.prod(shape[:-1])
        perm = st.permutations(range(n))
        signs = st.lists(st.booleans(), min_size=n, max_size=n) if flips else st.just([False] * n)
        pairs = st.lists(st.tuples(perm, signs), min_size=slots, max_size=slots)
        return pairs.map(
            lambda ps_: encode_signed(
                torch.tensor([p for p, _ in ps_], dtype=torch.long).reshape(shape),
                torch.tensor([s for _, s in ps_], dtype=torch.bool).reshape(shape),
            )
        )

    return st.fixed_dictionaries({k: one(spec.unit_shape(k), signed and g.signed) for k, g in spec.groups.items()})


def posteriors(spec: PermutationSpec, *, form: str = "gaussian", dtype: torch.dtype = torch.float64) -> Any:
    """A strategy of posteriors on ``spec``'s sites (the spec must know its shapes):
    ``form="gaussian"`` gives ``site -> (loc, scale)``, ``form="point"`` ``site -> tensor``."""
    st = _st()
    if spec.shapes is None:
        raise SpecError("posteriors(spec) needs the sites' shapes: spec.with_shapes(...) or spec.check(model, ...)")
    if form not in ("gaussian", "point"):
        raise ValueError(f"form must be 'gaussian' or 'point', got {form!r}")

    def build(seed: int, log_scale: float) -> dict:
        gen = torch.Generator().manual_seed(seed)
        out = {}
        for s in spec.sites:
            loc = torch.randn(spec.shapes[s], generator=gen, dtype=dtype)
            if form == "point":
                out[s] = loc
            else:
                scale = (log_scale + 0.3 * torch.randn(spec.shapes[s], generator=gen, dtype=dtype)).exp()
                out[s] = (loc, scale)
        return out

    return st.builds(build, st.integers(0, 2**31 - 1), st.floats(-3.0, 0.0))


def mlp_architectures(max_width: int = 8, max_depth: int = 4) -> Any:
    """A strategy of ``(in_features, hidden_sizes, out_features)``."""
    st = _st()
    return st.tuples(
        st.integers(1, 6),
        st.lists(st.integers(1, max_width), min_size=1, max_size=max_depth).map(tuple),
        st.integers(1, 4),
    )


# ----------------------------------------------------------------------------- assertions
def _is_pyro_model(model: Any, args: tuple, kwargs: dict) -> Any:
    import pyro.poutine as poutine

    with isolated(), torch.no_grad():
        return poutine.trace(model).get_trace(*args, **kwargs)


def _close(a: torch.Tensor, b: torch.Tensor, rtol: float, atol: float) -> bool:
    return bool(torch.allclose(a.double(), b.double(), rtol=rtol, atol=atol, equal_nan=False))


def _describe(element: Mapping[str, torch.Tensor]) -> str:
    return "{" + ", ".join(f"{k}: {v.tolist()}" for k, v in element.items()) + "}"


def _check_module(module: torch.nn.Module, spec: PermutationSpec, elements, args, kwargs, rtol, atol) -> None:
    params = {k: v.detach() for k, v in module.state_dict().items()}
    was = module.training
    module.eval()
    try:
        with torch.no_grad():
            ref = torch.func.functional_call(module, params, args, kwargs)
            for g in elements:
                out = torch.func.functional_call(module, spec.apply(params, g), args, kwargs)
                if not _close(out, ref, rtol, atol):
                    err = float((out.double() - ref.double()).abs().max())
                    raise AssertionError(
                        f"the module's output changes by {err:.3g} under the group element {_describe(g)}"
                    )
    finally:
        module.train(was)


def assert_invariant(
    model: Callable | torch.nn.Module,
    spec: PermutationSpec,
    *args: Any,
    elements: Sequence[Mapping[str, torch.Tensor]] | None = None,
    rtol: float = 1e-4,
    atol: float = 1e-5,
    **kwargs: Any,
) -> None:
    """Assert that ``model`` is invariant under ``spec``'s group.

    For a Pyro model (anything with sample statements), the latent sites are set to one
    prior draw and to the draw moved by each element; the model's return value (the
    function), every latent site's log-density (the prior) and every observed site's
    (the likelihood) must agree. For a plain ``nn.Module`` the output of
    ``functional_call`` with the moved state dict must agree (eval mode).

    Parameters
    ----------
    model : Pyro model or nn.Module
    spec : PermutationSpec
    *args, **kwargs : passed to the model (data)
    elements : sequence of group elements, optional
        Default: ``spec.moving_elements()`` (move every neuron).

    Raises
    ------
    AssertionError
        Naming the first site (or the output) and the element that breaks invariance.
    """
    import pyro.poutine as poutine
    from pyro.poutine.util import site_is_subsample

    if not isinstance(spec, PermutationSpec):
        raise TypeError(f"spec must be a PermutationSpec, got {type(spec).__name__}")
    elements = list(spec.moving_elements() if elements is None else elements)
    trace = _is_pyro_model(model, args, kwargs)
    samples = {n: s for n, s in trace.nodes.items() if s["type"] == "sample" and not site_is_subsample(s)}
    if not samples:
        if not isinstance(model, torch.nn.Module):
            raise TypeError("model has no Pyro sample sites and is not an nn.Module: nothing to check")
        return _check_module(model, spec, elements, args, kwargs, rtol, atol)
    latents = {n: s["value"].detach() for n, s in samples.items() if not s["is_observed"]}
    missing = [s for s in spec.sites if s not in latents]
    if missing:
        raise SpecError(f"sites {missing} of the spec are not latent sample sites of the model ({sorted(latents)})")

    def run(values: Mapping[str, torch.Tensor]) -> tuple[Any, dict[str, torch.Tensor]]:
        with isolated(), torch.no_grad():
            tr = poutine.trace(poutine.replay(poutine.condition(model, data=dict(values)), trace=trace))
            out = tr.get_trace(*args, **kwargs)
            ret = out.nodes["_RETURN"]["value"]
            lps = {n: out.nodes[n]["fn"].log_prob(out.nodes[n]["value"]).sum() for n in samples}
        return ret, lps

    ref_out, ref_lp = run(latents)
    for g in elements:
        moved = {**latents, **spec.apply({s: latents[s] for s in spec.sites}, g)}
        out, lp = run(moved)
        for n in samples:
            if not _close(lp[n], ref_lp[n], rtol, atol):
                kind = "likelihood" if samples[n]["is_observed"] else "prior"
                raise AssertionError(
                    f"the {kind} at site {n!r} changes from {float(ref_lp[n]):.6g} to {float(lp[n]):.6g} under the "
                    f"group element {_describe(g)}"
                )
        if torch.is_tensor(out) and torch.is_tensor(ref_out) and not _close(out, ref_out, rtol, atol):
            raise AssertionError(f"the model's return value changes under the group element {_describe(g)}")


def assert_symmetric(
    q_sym: Any,
    spec: PermutationSpec,
    *,
    num_draws: int = 8,
    elements: Sequence[Mapping[str, torch.Tensor]] | None = None,
    rtol: float = 1e-5,
    atol: float = 1e-6,
) -> None:
    """Assert that a symmetrized posterior's density is invariant: ``log q_sym(g . w) ==
    log q_sym(w)`` at draws ``w`` of it, for every element (default: ``spec.moving_elements()``).

    ``q_sym`` is a distribution over ``site -> tensor`` values with ``sample`` and
    ``log_prob`` (e.g. :class:`~pyro_symmetry.Symmetrized` with an exact estimator; the
    stochastic estimators are only invariant in expectation).
    """
    if not (callable(getattr(q_sym, "log_prob", None)) and callable(getattr(q_sym, "sample", None))):
        raise TypeError(f"q_sym must have sample() and log_prob(), got {type(q_sym).__name__}")
    elements = list(spec.moving_elements() if elements is None else elements)
    with isolated(), torch.no_grad():
        w = q_sym.sample((num_draws,))
        ref = q_sym.log_prob(w)
        for g in elements:
            moved = {**w, **spec.apply({s: w[s] for s in spec.sites}, g)} if isinstance(w, Mapping) else None
            if moved is None:
                raise TypeError("assert_symmetric needs draws as a mapping site -> tensor")
            lp = q_sym.log_prob(moved)
            if not _close(lp, ref, rtol, atol):
                err = float((lp.double() - ref.double()).abs().max())
                raise AssertionError(f"log q_sym changes by up to {err:.3g} under the group element {_describe(g)}")
