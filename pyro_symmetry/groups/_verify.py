"""Numerical invariance checks: a spec's group must leave the model unchanged.

Two entry points share one engine:

- :func:`verify_module`: ``from_module`` runs it before returning a spec. The module (eval
  mode, its parameters and buffers with every constant one replaced by a random one, so that a
  zero-initialized class token or default BatchNorm statistics cannot hide a broken symmetry;
  Pyro sample sites at a prior draw) is evaluated on the example inputs, then with its
  parameters acted on by elements that move every neuron (``spec.moving_elements()``) and
  rescaled by random positive factors for groups with a scaling symmetry; the outputs and the
  parameters of every sample site's distribution (the likelihood) must agree to ``sqrt(eps)``
  of the dtype, relative.
- :func:`check_spec_against`: ``spec.check(model, *args)``. The same for an ``nn.Module`` or a
  Pyro model, and also the prior log-density of the moved sites under permutations.

On failure the element is cut into single groups to name the first group (and the first
output or site) that changes.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Callable, Iterator, Mapping
from typing import Any

import torch
from torch import nn

from .._state import isolated
from ._trace import _dist_tensors, _fastpath_off, _tensors, eval_mode
from .spec import PermutationSpec, SpecError

__all__ = ["check_spec_against", "model_invariance", "tolerance", "verify_module"]


def tolerance(dtype: torch.dtype) -> float:
    """Relative tolerance of a permuted network's output: ``sqrt(eps)`` of the dtype
    (3.5e-4 in float32, 1.5e-8 in float64); a broken symmetry changes outputs by O(1)."""
    return math.sqrt(torch.finfo(dtype).eps)


def test_state(module: nn.Module, gen: torch.Generator) -> dict[str, torch.Tensor]:
    """The module's parameters and buffers, with every constant floating one (all entries
    equal: a zero-initialized class token, a LayerNorm's ones, default BatchNorm statistics)
    replaced by distinct values, so that an initialization cannot hide a broken symmetry: a
    constant ``c != 0`` becomes ``c`` times factors in [0.5, 1.5) (its sign kept, so a
    variance stays positive), a zero becomes ``N(0, 1/4)`` (``N(0, 1/fan_in)`` for matrices)."""
    out: dict[str, torch.Tensor] = {}
    fresh: dict[int, torch.Tensor] = {}  # tied names share one tensor
    for k, v in module.state_dict(keep_vars=True).items():
        t = v.detach()
        if not t.is_floating_point() or t.numel() < 2 or bool((t != t.reshape(-1)[0]).any()):
            out[k] = t
            continue
        if id(v) not in fresh:
            c = float(t.reshape(-1)[0])
            if c != 0:
                x = c * (0.5 + torch.rand(t.shape, generator=gen, dtype=t.dtype))
            else:
                x = torch.randn(t.shape, generator=gen, dtype=t.dtype)
                x = x / math.sqrt(max(1, t[0].numel())) if t.dim() >= 2 else 0.5 * x
            fresh[id(v)] = x.to(t.device)
        out[k] = fresh[id(v)]
    return out


class _Runner:
    """Evaluate a module (or a Pyro model) at given parameters and site values.

    A plain module is called through :func:`torch.func.functional_call` (no copy); a
    ``PyroModule`` (whose attributes are not plain tensors) through a copy loaded with them.
    """

    def __init__(self, model: Callable, args: tuple, kwargs: dict) -> None:
        from pyro.nn import PyroModule

        self.model, self.args, self.kwargs = model, args, kwargs
        self.copy = copy.deepcopy(model) if isinstance(model, PyroModule) else None
        self.keys: list[str] = []
        if isinstance(model, nn.Module):
            seen: set[int] = set()
            for k, v in model.state_dict(keep_vars=True).items():
                if id(v) not in seen:
                    seen.add(id(v))
                    self.keys.append(k)

    def _fn(self, params: Mapping[str, torch.Tensor]) -> Callable:
        if self.copy is not None:
            self.copy.load_state_dict({k: params[k] for k in self.keys}, strict=False)
            return self.copy
        if isinstance(self.model, nn.Module):
            state = {k: params[k] for k in self.keys}
            return lambda *a, **kw: torch.func.functional_call(self.model, state, a, kw)
        return self.model

    def __call__(self, params: Mapping[str, torch.Tensor], sites: Mapping[str, torch.Tensor] | None):
        """``(outputs, sites)`` with ``sites[name] = (distribution parameters, log-density,
        scale of the log-density, value, observed)``; ``sites=None`` draws the latent values."""
        import pyro.poutine as poutine
        from pyro.poutine.util import site_is_subsample

        fn = self._fn(params)
        if sites is not None:
            fn = poutine.condition(fn, data={k: params.get(k, v[3]) for k, v in sites.items() if not v[4]})
        tr = poutine.trace(fn).get_trace(*self.args, **self.kwargs)
        tr.compute_log_prob(lambda name, site: not site_is_subsample(site))
        out = {}
        for k, s in tr.nodes.items():
            if s["type"] == "sample" and not site_is_subsample(s):
                lp = s["log_prob"]
                scale = float(lp.detach().abs().sum()) if torch.is_tensor(lp) else abs(float(lp))
                out[k] = (list(_dist_tensors(s["fn"], 0)), s["log_prob_sum"], scale, s["value"], s["is_observed"])
        return list(_tensors(tr.nodes["_RETURN"]["value"])), out


def _differs(a: tuple, b: tuple, priors: set[str], tol: float) -> str | None:
    """The first output, site parameter or prior log-density (of the sites in ``priors``) that
    differs beyond ``tol`` (relative to its own scale), or None."""
    for what, x, y in _pairs(a, b):
        if x.shape != y.shape:
            return f"{what} changes shape"
        if x.is_floating_point():
            scale = float(x.abs().max()) if x.numel() else 0.0
            if not math.isfinite(scale):
                raise ValueError(f"{what} is not finite at a random draw: cannot check invariance")
            err = float((x - y).abs().max()) if x.numel() else 0.0
            if err > tol * (scale + tol):
                return f"{what} (shape {tuple(x.shape)}) changes by {err:.3g}"
        elif not torch.equal(x, y):
            return f"{what} (shape {tuple(x.shape)}) changes"
    for name in priors:
        if name in a[1] and name in b[1]:
            u, v, scale = float(a[1][name][1]), float(b[1][name][1]), a[1][name][2]
            if not math.isfinite(u):
                raise ValueError(f"the log-density of site {name!r} is {u} at a random draw: cannot check invariance")
            if abs(u - v) > tol * (scale + 1.0):
                return f"site {name!r} (prior log-density {u:.6g} at w, {v:.6g} at g.w)"
    return None


def _pairs(a: tuple, b: tuple) -> Iterator[tuple[str, torch.Tensor, torch.Tensor]]:
    for i, (x, y) in enumerate(zip(a[0], b[0])):
        yield f"output {i}", x, y
    for name, site in a[1].items():
        if name in b[1]:
            for j, (x, y) in enumerate(zip(site[0], b[1][name][0])):
                if isinstance(x, torch.Tensor) and isinstance(y, torch.Tensor):
                    yield f"site {name!r} (parameter {j} of its distribution)", x, y


def _moves(spec: PermutationSpec, gen: torch.Generator, device: Any, combine: bool) -> Iterator[tuple]:
    """``(description, element, log-scales)`` to act with: the elements of
    ``spec.moving_elements()`` (a cyclic shift of every group with its signs flipped, and a
    seeded uniform element) and a random positive rescaling (log-scales uniform in [-1, 1]) of
    the groups that have a scaling symmetry: after the shift when ``combine`` (one forward
    less), else on its own."""
    scales = {
        k: (2 * torch.rand(g.size, generator=gen, dtype=torch.float64) - 1).to(device)
        for k, g in spec.groups.items()
        if g.scalable
    }
    elements = spec.moving_elements(device=device)
    shift = "a cyclic shift of every group (signs flipped)"
    if combine and scales:
        yield shift + ", then a positive rescaling", elements[0], scales
    else:
        yield shift, elements[0], {}
    yield "a random element", elements[1], {}
    if scales and not combine:
        yield "a positive rescaling", spec.identity(device=device), scales


def _act(spec: PermutationSpec, params: dict, element: dict, scales: dict) -> dict:
    moved = spec.apply(params, element)
    return spec.rescale(moved, scales) if scales else moved


def _restrict(spec: PermutationSpec, element: dict, scales: dict, name: str) -> tuple[dict, dict]:
    """The element and log-scales acting on group ``name`` only (its parent fixed)."""
    out = spec.identity(device=element[name].device)
    out[name] = element[name]
    return out, ({name: scales[name]} if name in scales else {})


def model_invariance(
    spec: PermutationSpec,
    run: _Runner,
    params: dict[str, torch.Tensor],
    compare: str,
) -> None:
    """Raise :class:`SpecError` naming the first group whose element changes the model.

    ``params`` holds the state; the latent sites are drawn from the prior once and held fixed
    (those of the spec moved with the state). The outputs and the parameters of every sample
    site's distribution (the likelihood's mean, ...) must not change; with
    ``compare="model"`` (``spec.check``) neither may the prior log-density of the moved sites
    under permutations (not under rescalings: a prior is not scale invariant).
    """
    base = run(params, None)
    latent = {k: v[3] for k, v in base[1].items() if not v[4]}
    params = {**{k: v for k, v in latent.items() if k in spec.sites}, **params}
    missing = [k for k in spec.sites if k not in params]
    if missing:
        raise SpecError(f"sites {missing} of the spec are neither parameters nor latent sample sites of the model")
    priors = {k for k in spec.sites if k in latent} if compare == "model" else set()
    tol = tolerance(_dtype(params, run.args))
    gen = torch.Generator().manual_seed(1)
    device = next(iter(params.values())).device
    for what, element, scales in _moves(spec, gen, device, combine=compare == "function"):
        check = set() if scales else priors  # a prior is not scale invariant
        diff = _differs(base, run(_act(spec, params, element, scales), base[1]), check, tol)
        if diff is None:
            continue
        for name in spec.groups:
            g1, s1 = _restrict(spec, element, scales, name)
            one = _differs(base, run(_act(spec, params, g1, s1), base[1]), check, tol)
            if one is not None:
                raise SpecError(
                    f"group {name!r} of the spec changes the model: under {what} restricted to it, {one} "
                    f"(tolerance {tol:.2g} relative)"
                )
        raise SpecError(f"the spec changes the model: under {what}, {diff} (tolerance {tol:.2g} relative)")


def verify_module(spec: PermutationSpec, module: nn.Module, inputs: tuple) -> None:
    """``from_module``'s check of the spec it read (see the module docstring)."""
    if not spec.groups:
        return
    with isolated(), torch.no_grad(), eval_mode(module), _fastpath_off():
        state = test_state(module, torch.Generator().manual_seed(0))
        model_invariance(spec, _Runner(module, inputs, {}), state, "function")


def _dtype(*groups: Any) -> torch.dtype:
    for t in _tensors([list(g.values()) if isinstance(g, dict) else g for g in groups]):
        if t.is_floating_point():
            return t.dtype
    return torch.get_default_dtype()


def check_spec_against(spec: PermutationSpec, model: Callable, *args: Any, **kwargs: Any) -> None:
    """Raise :class:`SpecError` if the spec's group changes ``model``'s function or prior.

    ``model`` is an ``nn.Module`` (run in eval mode on ``*args``, or on inputs built from its
    first layer when no ``args`` are given, with its parameters and buffers, constant ones
    replaced by random ones; its Pyro sample sites, if any, at a prior draw) or a Pyro model
    (its sample sites at a prior draw). The outputs and every site's log-density must agree
    at ``w`` and at ``g . w`` for the elements of ``spec.moving_elements()``; the outputs and
    the likelihood also under a random positive rescaling of the groups that have one.
    """
    if not spec.groups:
        return
    with isolated(), torch.no_grad():
        if isinstance(model, nn.Module) and not args and not kwargs:
            from ._fromgraph import record_module

            args = record_module(model)[1]
        if spec.shapes is None:
            from .builders import model_site_shapes

            spec = spec.with_shapes(model_site_shapes(model, *args, **kwargs))
        if not isinstance(model, nn.Module):
            model_invariance(spec, _Runner(model, args, kwargs), {}, "model")
            return
        with eval_mode(model), _fastpath_off():
            state = test_state(model, torch.Generator().manual_seed(0))
            model_invariance(spec, _Runner(model, args, kwargs), state, "model")
