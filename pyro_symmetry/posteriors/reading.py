"""``as_posterior``: every form a posterior comes in -> one :class:`Posterior`.

Accepted forms (the only place in the package that tells them apart):

- fitted Pyro autoguides: ``AutoNormal`` and its symmetrized subclasses (a Normal per site),
  ``AutoDelta`` (a point), the ``AutoContinuous`` family (one distribution over the flat
  latent vector: ``AutoDiagonalNormal``, ``AutoLowRankMultivariateNormal``,
  ``AutoMultivariateNormal``, mixtures), ``Symmetrize(guide)`` (its base guide's ``q``),
  ``AutoGuideList`` of per-site parts, and ``train_runs`` results (their guide);
- mappings ``site -> (loc, scale)``, ``site -> Distribution``, ``site -> Tensor`` (a point,
  or draws with leading ``(draw,)`` or ``(chain, draw)`` dims, read against the spec's
  shapes; ``Predictive``'s extra singleton plate dim is dropped);
- an ``nn.Module``'s ``state_dict()`` or ``named_parameters()`` (a point; tensors that
  require grad are read as values);
- a Pyro ``MCMC`` object (draws by chain, its model, divergences) and
  ``mcmc.get_samples(group_by_chain=True)`` dicts;
- ArviZ objects: a ``DataTree`` (also loaded from netCDF/zarr), a legacy ``InferenceData``,
  an xarray ``Dataset`` with ``chain`` and ``draw`` dims (read by duck typing: ArviZ and
  xarray are only imported in :mod:`pyro_symmetry.diagnostics`).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Mapping
from typing import Any

import pyro.distributions as dist
import torch
import torch.distributions as td

from .._validation import check_devices, check_finite
from ..groups import FlatLayout, PermutationSpec, SpecError
from .core import Posterior

__all__ = ["PosteriorFormError", "as_posterior"]

DRAW_DIMS = ("point", "draw", ("chain", "draw"))


class PosteriorFormError(SpecError, TypeError):
    """A value that is no form of posterior: a wrong kind of value (``TypeError``) given
    where a posterior over the spec's sites is expected (:class:`SpecError`); either
    ``except`` clause catches it."""


def as_posterior(
    x: Any,
    spec: PermutationSpec | None = None,
    *,
    name: str | None = "the posterior",
    leading: Any = None,
    layout: FlatLayout | None = None,
    detach: bool = True,
) -> Posterior:
    """Read a posterior in any form (see the module docstring) as a :class:`Posterior`.

    Parameters
    ----------
    x : posterior in any accepted form
    spec : PermutationSpec, optional
        Checks the sites and shapes (errors name the site and axis) and lets tensor
        mappings be told apart: a site of the spec's shape is a point, one more leading
        dim is ``(draw,)``, two are ``(chain, draw)``.
    name : str or None
        How errors call ``x`` (``"q1"``: tensors are labelled ``q1['site']``,
        ``q1['site'] loc``); ``None`` labels them by role (``params['site']``,
        ``loc['site']``, ``scale['site']``).
    leading : {"point", "draw", ("chain", "draw")}, optional
        How to read the leading dims of a tensor mapping when the spec does not know the
        shapes (or to override it).
    layout : FlatLayout, optional
        For a distribution over a flat latent vector.
    detach : bool
        ``False`` keeps the autograd graph of tensors that require grad (a mapping of
        ``named_parameters()``, a guide's live parameters), for a differentiable
        :func:`~pyro_symmetry.interpolate`; the default reads plain values.

    Raises
    ------
    PosteriorFormError
        ``x`` is not a posterior form (both a ``TypeError`` and a :class:`SpecError`).
    SpecError
        A site of the spec missing or of the wrong shape, a mapping mixing forms, NaN/Inf
        values or negative scales (naming the site).
    TypeError
        Integer ``(loc, scale)`` or ``loc`` and ``scale`` of different dtypes.
    ValueError
        Meta-device or mixed-device tensors.
    """
    if isinstance(x, Posterior):
        return x.with_spec(spec)
    if not isinstance(detach, bool):
        raise TypeError(f"detach must be a bool, got {detach!r}")
    post = _read(x, spec, _Names(name), leading, layout, detach)
    return post.with_spec(spec) if spec is not None else post


class _Names:
    """How error messages call the posterior and its tensors."""

    def __init__(self, name: str | None) -> None:
        if name is not None and not isinstance(name, str):
            raise TypeError(f"name must be a str or None, got {type(name).__name__}")
        self.raw = name

    def __str__(self) -> str:
        return "the posterior" if self.raw is None else self.raw

    def __format__(self, spec: str) -> str:
        return format(str(self), spec)

    def tensor(self, site: str, part: str = "") -> str:
        """``q1['w'] loc`` (or ``loc['w']`` without a name); ``part`` "" is a point."""
        if self.raw is None:
            return f"{part or 'params'}[{site!r}]"
        return f"{self.raw}[{site!r}]" + (f" {part}" if part else "")

    def part(self, i: int) -> _Names:
        return _Names(f"{self}[{i}]")


def _read(x: Any, spec: PermutationSpec | None, name: _Names, leading: Any, layout, detach: bool) -> Posterior:
    if getattr(x, "error", None) is not None and hasattr(x, "guide"):
        raise SpecError(f"{name} is a run that failed ({type(x.error).__name__}: {x.error}); it holds no posterior")
    if hasattr(x, "guide") and hasattr(x, "state") and not isinstance(x, torch.nn.Module):
        return _read(x.guide, spec, name, leading, layout, detach)  # a TrainedRun
    if _is_mcmc(x):
        return _from_mcmc(x, spec, str(name))
    if _is_arviz(x):
        return _from_arviz(x, spec, str(name))
    if isinstance(x, torch.nn.Module) and hasattr(x, "prototype_trace"):
        return _from_guide(x, str(name), detach)
    if isinstance(x, torch.nn.Module):
        return _points({k: v for k, v in x.state_dict().items()}, spec, name, "point", detach)
    if isinstance(x, td.Distribution):
        if layout is None:
            raise SpecError(
                f"{name} is one distribution over a flat vector: it needs layout=FlatLayout(...) to know its sites"
            )
        if not isinstance(layout, FlatLayout):
            raise TypeError(f"layout must be a FlatLayout, got {type(layout).__name__}")
        if tuple(x.event_shape) != (layout.dim,):
            raise SpecError(
                f"{name} has event shape {tuple(x.event_shape)}, the layout needs ({layout.dim},) (its sites "
                f"{sorted(layout.shapes)})"
            )
        return Posterior(flat=x, layout=layout, name=str(name), source=x)
    if isinstance(x, Iterator) or (isinstance(x, (list, tuple)) and x and all(_is_pair(e) for e in x)):
        x = dict(x)  # named_parameters()
    if isinstance(x, Mapping):
        return _from_mapping(x, spec, name, leading, detach)
    raise PosteriorFormError(
        f"{name} must be a fitted Pyro autoguide, a train_runs result, a mapping site -> (loc, scale) / "
        "Distribution / Tensor, a state dict or named_parameters(), a Pyro MCMC, or an ArviZ DataTree / "
        f"InferenceData / Dataset; got a {type(x).__name__}"
    )


def _is_pair(e: Any) -> bool:
    return isinstance(e, tuple) and len(e) == 2 and isinstance(e[0], str) and torch.is_tensor(e[1])


# ----------------------------------------------------------------------------- mappings
def _from_mapping(x: Mapping, spec: PermutationSpec | None, name: _Names, leading: Any, detach: bool) -> Posterior:
    if not x:
        raise SpecError(f"{name} is an empty mapping: it needs at least one site")
    kinds = {k: _kind(k, v, name) for k, v in x.items()}
    if len(set(kinds.values())) > 1:
        tensors = sorted(k for k, v in kinds.items() if v == "tensor")
        raise SpecError(
            f"{name} mixes tensors (sites {tensors}) with distributions or (loc, scale) pairs; "
            "use one form for all sites"
        )
    if next(iter(kinds.values())) == "tensor":
        return _points(dict(x), spec, name, leading, detach)
    pairs = {k: v for k, v in x.items() if not isinstance(v, td.Distribution)}
    check_devices({name.tensor(k, part): t for k, v in pairs.items() for part, t in zip(("loc", "scale"), v)})
    dists = {}
    for k, v in x.items():
        if isinstance(v, td.Distribution):
            dists[k] = v
            continue
        dists[k] = _normal(k, *v, name, detach)
    return Posterior(dists=dists, name=str(name), source=x)


def _normal(k: str, loc: torch.Tensor, scale: torch.Tensor, name: _Names, detach: bool) -> td.Distribution:
    """The Normal of a ``(loc, scale)`` pair, checked (errors name the site and the part)."""
    if not (loc.is_floating_point() and scale.is_floating_point()):
        raise TypeError(
            f"site {k!r} of {name}: loc and scale must be floating point, got {loc.dtype} and {scale.dtype}"
        )
    check_finite(name.tensor(k, "loc"), loc)
    check_finite(name.tensor(k, "scale"), scale)
    if loc.dtype != scale.dtype:
        raise TypeError(
            f"{name.tensor(k, 'loc')} is {loc.dtype} but {name.tensor(k, 'scale')} is {scale.dtype}; use one dtype"
        )
    if loc.shape != scale.shape:
        raise SpecError(f"site {k!r} of {name}: loc has shape {tuple(loc.shape)} but scale has {tuple(scale.shape)}")
    if bool((scale.detach() < 0).any()):
        raise SpecError(f"site {k!r} of {name}: scale has negative entries (a standard deviation is >= 0)")
    if detach:
        loc, scale = loc.detach(), scale.detach()
    return dist.Normal(loc, scale, validate_args=False).to_event(loc.dim())


def _kind(k: str, v: Any, name: _Names) -> str:
    if torch.is_tensor(v):
        return "tensor"
    if isinstance(v, td.Distribution):
        return "dist"
    if isinstance(v, (tuple, list)) and len(v) == 2 and all(torch.is_tensor(t) for t in v):
        return "dist"
    raise SpecError(
        f"site {k!r} of {name} is a {type(v).__name__}: neither a tensor, a (loc, scale) pair of tensors nor a "
        "Distribution"
    )


def _points(x: dict, spec: PermutationSpec | None, name: _Names, leading: Any, detach: bool = True) -> Posterior:
    """Tensors: a point, or draws, by the spec's shapes or ``leading``."""
    check_devices({name.tensor(k): v for k, v in x.items()})
    if detach:
        x = {k: v.detach() for k, v in x.items()}
    for k, v in x.items():
        check_finite(name.tensor(k), v)
    extra = _leading_dims(x, spec, name, leading)
    if extra == 0:
        return Posterior(dists={k: _delta(v) for k, v in x.items()}, name=str(name), source=x)
    draws = {}
    for k, v in x.items():
        if extra == 3:  # (draw, 1, *shape): Predictive's plate dim
            v = v.squeeze(1)
        draws[k] = (v if extra == 2 else v.unsqueeze(0)).detach()
    return Posterior(draws=draws, name=str(name), source=x)


def _delta(v: torch.Tensor) -> dist.Delta:
    """A point mass at ``v`` (its log-density made from ``v`` itself: no device lookup)."""
    dtype = v.dtype if v.is_floating_point() else torch.get_default_dtype()
    return dist.Delta(v, log_density=v.new_zeros((), dtype=dtype), event_dim=v.dim())


def _leading_dims(x: Mapping[str, torch.Tensor], spec: PermutationSpec | None, name: _Names, leading: Any) -> int:
    """0 (a point), 1 ``(draw,)``, 2 ``(chain, draw)`` or 3 ``(draw, 1)`` (Predictive)."""
    if leading is not None:
        if leading not in DRAW_DIMS:
            raise ValueError(f"leading must be one of {DRAW_DIMS}, got {leading!r}")
        return DRAW_DIMS.index(leading)
    shapes = {} if spec is None or spec.shapes is None else spec.shapes
    known = [s for s in (spec.sites if spec is not None else ()) if s in shapes and s in x]
    if not known:
        return 0  # no shapes to read leading dims from: every tensor is one site value
    found = {}
    for s in known:
        have, want = tuple(x[s].shape), tuple(shapes[s])
        if len(have) < len(want) or have[len(have) - len(want) :] != want:
            raise SpecError(f"{name.tensor(s)} has shape {have}, the spec expects (..., {', '.join(map(str, want))})")
        found[s] = have[: len(have) - len(want)]
    lead = set(found.values())
    if len(lead) > 1:
        raise SpecError(f"the sites of {name} have different leading dims {found}; use one (chain, draw) layout")
    lead = lead.pop()
    if len(lead) == 2 and lead[1] == 1:
        return 3
    if len(lead) > 2:
        raise SpecError(
            f"{name} has leading dims {lead} before the sites' shapes; expected none (a point), (draw,) or "
            "(chain, draw)"
        )
    return len(lead)


# ----------------------------------------------------------------------------- guides
def _autoguide():
    from pyro.infer import autoguide

    return autoguide


def _transforms(guide: Any) -> dict[str, Any]:
    """Unconstrained -> constrained maps of the latent sites whose support is not real."""
    out = {}
    for k, site in guide.prototype_trace.nodes.items():
        if site["type"] == "sample" and not site["is_observed"]:
            support = site["fn"].support
            while isinstance(support, td.constraints.independent):
                support = support.base_constraint
            if support is not td.constraints.real:
                out[k] = td.biject_to(site["fn"].support)
    return out


def _user_model(guide: Any) -> Any:
    """The guide's model without the handlers autoguides wrap it in (``InitMessenger``,
    ``block``): the object the user passed."""
    import functools

    model = getattr(guide, "model", None)
    while isinstance(model, functools.partial) and model.args and callable(model.args[-1]):
        model = model.args[-1]
    return model


def _from_guide(guide: Any, name: str, detach: bool = True) -> Posterior:
    ag = _autoguide()
    base = getattr(guide, "guide", None)
    if base is not None and hasattr(guide, "symmetry_base") and isinstance(base, torch.nn.Module):
        return _from_guide(base, name, detach)  # Symmetrize(guide): its q
    if isinstance(guide, ag.AutoGuideList):
        return _from_guide_list(guide, name, detach)
    if getattr(guide, "prototype_trace", None) is None:
        raise SpecError(
            f"{name} ({type(guide).__name__}) is not fitted: it has not traced the model yet "
            "(run at least one SVI step or call the guide once)"
        )
    model = _user_model(guide)
    # A guide's unconstrained parameters are leaves that require grad (even under no_grad):
    # detach explicitly unless the caller wants the live graph.
    keep = (lambda t: t.detach()) if detach else (lambda t: t)
    with torch.no_grad() if detach else contextlib.nullcontext():
        if isinstance(guide, ag.AutoDelta):
            values = {k: keep(v) for k, v in guide.median().items()}
            dists = {k: _delta(v) for k, v in values.items()}
            return Posterior(dists=dists, model=model, name=name, source=guide)
        if isinstance(guide, ag.AutoNormal):
            dists = {}
            for k in guide.prototype_trace.nodes:
                if k in guide._event_dims:
                    loc, scale = (keep(t) for t in guide._get_loc_and_scale(k))
                    dists[k] = dist.Normal(loc, scale, validate_args=False).to_event(loc.dim())
            return Posterior(dists=dists, transforms=_transforms(guide), model=model, name=name, source=guide)
        if isinstance(guide, ag.AutoContinuous):
            from ..estimators._base import detach_distribution

            flat = guide.get_posterior()
            flat = detach_distribution(flat) if detach else flat
            layout = FlatLayout.from_guide(guide)
            return Posterior(
                flat=flat, layout=layout, transforms=_transforms(guide), model=model, name=name, source=guide
            )
    raise PosteriorFormError(f"{name} is a {type(guide).__name__} guide, which as_posterior cannot read")


def _from_guide_list(guide: Any, name: str, detach: bool = True) -> Posterior:
    dists, transforms = {}, {}
    for i, part in enumerate(guide):
        p = _from_guide(part, f"{name}[{i}]", detach)
        if p.dists is None:
            raise SpecError(
                f"{name}[{i}] ({type(part).__name__}) is a flat (AutoContinuous) part of an AutoGuideList; "
                "as_posterior reads lists of per-site guides (AutoNormal, AutoDelta, ...)"
            )
        dists.update(p.dists)
        transforms.update(p.transforms)
    return Posterior(dists=dists, transforms=transforms, model=_user_model(guide), name=name, source=guide)


# ----------------------------------------------------------------------------- MCMC
def _is_mcmc(x: Any) -> bool:
    from pyro.infer import MCMC

    return isinstance(x, MCMC)


def _from_mcmc(mcmc: Any, spec: PermutationSpec | None, name: str) -> Posterior:
    samples = mcmc.get_samples(group_by_chain=True)
    if not samples:
        raise SpecError(f"{name} is an MCMC that has not run (no samples)")
    draws = {k: v.detach() for k, v in samples.items()}
    chains, num = next(iter(draws.values())).shape[:2]
    stats = {}
    diag = getattr(mcmc, "diagnostics", None)
    try:
        div = diag()["divergences"] if callable(diag) else None
    except Exception:  # noqa: BLE001 - diagnostics need numpy-convertible draws; optional
        div = None
    if div:
        flag = torch.zeros(chains, num, dtype=torch.bool)
        for c, idx in enumerate(div.values()):
            flag[c, torch.as_tensor(list(idx), dtype=torch.long)] = True
        stats["diverging"] = flag
    step = getattr(getattr(mcmc, "kernel", None), "step_size", None)
    if step is not None:
        stats["step_size"] = torch.full((chains, num), float(step), dtype=torch.float64)
    model = getattr(getattr(mcmc, "kernel", None), "model", None)
    return Posterior(draws=draws, model=model, sample_stats=stats, name=name, source=mcmc)


# ----------------------------------------------------------------------------- ArviZ
def _is_arviz(x: Any) -> bool:
    """An xarray DataTree/Dataset or an ArviZ InferenceData (by the class's home package)."""
    return type(x).__module__.split(".")[0] in ("xarray", "arviz", "arviz_base", "datatree")


def _group(x: Any, name: str) -> Any:
    """Group ``name`` of a DataTree / InferenceData as a Dataset-like object, or None."""
    if hasattr(x, "data_vars") and not hasattr(x, "children"):
        return x if name == "posterior" else None  # a bare Dataset is the posterior
    try:
        g = x[name] if hasattr(x, "children") else getattr(x, name, None)
    except KeyError:
        return None
    return getattr(g, "dataset", g) if g is not None else None


def _from_arviz(x: Any, spec: PermutationSpec | None, name: str) -> Posterior:
    post = _group(x, "posterior")
    if post is None:
        raise SpecError(f"{name} has no posterior group")
    dims = dict(post.sizes) if hasattr(post, "sizes") else dict(post.dims)
    if "chain" not in dims or "draw" not in dims:
        raise SpecError(f"{name}'s posterior has dims {sorted(dims)}; ArviZ draws need 'chain' and 'draw'")
    draws = {}
    for k in post.data_vars:
        var = post[k].transpose("chain", "draw", ...)
        draws[str(k)] = torch.as_tensor(var.values)
    stats = {}
    group = _group(x, "sample_stats")
    if group is not None:
        for k in group.data_vars:
            v = group[k]
            if set(v.dims) == {"chain", "draw"}:
                stats[str(k)] = torch.as_tensor(v.transpose("chain", "draw").values)
    return Posterior(draws=draws, sample_stats=stats, name=name, source=x)
