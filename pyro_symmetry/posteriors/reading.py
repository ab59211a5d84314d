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

from collections.abc import Iterator, Mapping
from typing import Any

import pyro.distributions as dist
import torch
import torch.distributions as td

from .._validation import check_devices, check_finite
from ..groups import FlatLayout, PermutationSpec, SpecError
from .core import Posterior

__all__ = ["as_posterior"]

DRAW_DIMS = ("point", "draw", ("chain", "draw"))


def as_posterior(
    x: Any,
    spec: PermutationSpec | None = None,
    *,
    name: str = "the posterior",
    leading: Any = None,
    layout: FlatLayout | None = None,
) -> Posterior:
    """Read a posterior in any form (see the module docstring) as a :class:`Posterior`.

    Parameters
    ----------
    x : posterior in any accepted form
    spec : PermutationSpec, optional
        Checks the sites and shapes (errors name the site and axis) and lets tensor
        mappings be told apart: a site of the spec's shape is a point, one more leading
        dim is ``(draw,)``, two are ``(chain, draw)``.
    name : str
        How errors call ``x`` (``"q1"``).
    leading : {"point", "draw", ("chain", "draw")}, optional
        How to read the leading dims of a tensor mapping when the spec does not know the
        shapes (or to override it).
    layout : FlatLayout, optional
        For a distribution over a flat latent vector.

    Raises
    ------
    TypeError
        ``x`` is not a posterior form.
    SpecError
        A site of the spec missing or of the wrong shape, a mapping mixing forms.
    ValueError
        NaN/Inf values or negative scales (naming the site), meta or mixed devices.
    """
    if isinstance(x, Posterior):
        return x.with_spec(spec)
    post = _read(x, spec, name, leading, layout)
    return post.with_spec(spec) if spec is not None else post


def _read(x: Any, spec: PermutationSpec | None, name: str, leading: Any, layout: FlatLayout | None) -> Posterior:
    if getattr(x, "error", None) is not None and hasattr(x, "guide"):
        raise SpecError(f"{name} is a run that failed ({type(x.error).__name__}: {x.error}); it holds no posterior")
    if hasattr(x, "guide") and hasattr(x, "state") and not isinstance(x, torch.nn.Module):
        return _read(x.guide, spec, name, leading, layout)  # a TrainedRun
    if _is_mcmc(x):
        return _from_mcmc(x, spec, name)
    if _is_arviz(x):
        return _from_arviz(x, spec, name)
    if isinstance(x, torch.nn.Module) and hasattr(x, "prototype_trace"):
        return _from_guide(x, name)
    if isinstance(x, torch.nn.Module):
        return _points({k: v for k, v in x.state_dict().items()}, spec, name, "point")
    if isinstance(x, td.Distribution):
        if layout is None:
            raise SpecError(f"{name} is one distribution: pass layout=FlatLayout(...) to say which sites it covers")
        return Posterior(flat=x, layout=layout, name=name, source=x)
    if isinstance(x, Iterator) or (isinstance(x, (list, tuple)) and x and all(_is_pair(e) for e in x)):
        x = dict(x)  # named_parameters()
    if isinstance(x, Mapping):
        return _from_mapping(x, spec, name, leading)
    raise TypeError(
        f"{name} is a {type(x).__name__}: expected a fitted Pyro autoguide, a train_runs result, a mapping "
        "site -> (loc, scale) / Distribution / Tensor, a state dict or named_parameters(), a Pyro MCMC, or an "
        "ArviZ DataTree / InferenceData / Dataset"
    )


def _is_pair(e: Any) -> bool:
    return isinstance(e, tuple) and len(e) == 2 and isinstance(e[0], str) and torch.is_tensor(e[1])


# ----------------------------------------------------------------------------- mappings
def _from_mapping(x: Mapping, spec: PermutationSpec | None, name: str, leading: Any) -> Posterior:
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
        return _points(dict(x), spec, name, leading)
    dists = {}
    for k, v in x.items():
        if isinstance(v, td.Distribution):
            dists[k] = v
            continue
        loc, scale = v
        label = f"{name}[{k!r}]"
        check_devices({f"{label} loc": loc, f"{label} scale": scale})
        if not (loc.is_floating_point() and scale.is_floating_point()):
            raise TypeError(f"{label}: loc and scale must be floating point, got {loc.dtype} and {scale.dtype}")
        loc, scale = check_finite(f"{label} loc", loc.detach()), check_finite(f"{label} scale", scale.detach())
        if loc.shape != scale.shape:
            raise SpecError(f"{label}: loc has shape {tuple(loc.shape)} but scale has {tuple(scale.shape)}")
        if bool((scale < 0).any()):
            raise ValueError(f"{label}: scale has negative entries")
        dists[k] = dist.Normal(loc, scale, validate_args=False).to_event(loc.dim())
    return Posterior(dists=dists, name=name, source=x)


def _kind(k: str, v: Any, name: str) -> str:
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


def _points(x: dict, spec: PermutationSpec | None, name: str, leading: Any) -> Posterior:
    """Tensors: a point, or draws, by the spec's shapes or ``leading``."""
    check_devices({f"{name}[{k!r}]": v for k, v in x.items()})
    x = {k: v.detach() for k, v in x.items()}
    for k, v in x.items():
        if v.is_floating_point():
            check_finite(f"{name}[{k!r}]", v)
    extra = _leading_dims(x, spec, name, leading)
    if extra == 0:
        return Posterior(dists={k: dist.Delta(v, event_dim=v.dim()) for k, v in x.items()}, name=name, source=x)
    draws = {}
    for k, v in x.items():
        if extra == 3:  # (draw, 1, *shape): Predictive's plate dim
            v = v.squeeze(1)
        draws[k] = v if extra == 2 else v.unsqueeze(0)
    return Posterior(draws=draws, name=name, source=x)


def _leading_dims(x: Mapping[str, torch.Tensor], spec: PermutationSpec | None, name: str, leading: Any) -> int:
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
            raise SpecError(f"{name}[{s!r}] has shape {have}, the spec expects (..., {', '.join(map(str, want))})")
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


def _from_guide(guide: Any, name: str) -> Posterior:
    ag = _autoguide()
    base = getattr(guide, "guide", None)
    if base is not None and hasattr(guide, "symmetry_base") and isinstance(base, torch.nn.Module):
        return _from_guide(base, name)  # Symmetrize(guide): its q
    if isinstance(guide, ag.AutoGuideList):
        return _from_guide_list(guide, name)
    if getattr(guide, "prototype_trace", None) is None:
        raise SpecError(
            f"{name} ({type(guide).__name__}) is not fitted: it has not traced the model yet "
            "(run at least one SVI step or call the guide once)"
        )
    model = _user_model(guide)
    with torch.no_grad():
        if isinstance(guide, ag.AutoDelta):
            values = {k: v.detach() for k, v in guide.median().items()}
            dists = {k: dist.Delta(v, event_dim=v.dim()) for k, v in values.items()}
            return Posterior(dists=dists, model=model, name=name, source=guide)
        if isinstance(guide, ag.AutoNormal):
            dists = {}
            for k in guide.prototype_trace.nodes:
                if k in guide._event_dims:
                    loc, scale = (t.detach() for t in guide._get_loc_and_scale(k))
                    dists[k] = dist.Normal(loc, scale, validate_args=False).to_event(loc.dim())
            return Posterior(dists=dists, transforms=_transforms(guide), model=model, name=name, source=guide)
        if isinstance(guide, ag.AutoContinuous):
            from ..estimators._base import detach_distribution

            flat = detach_distribution(guide.get_posterior())
            layout = FlatLayout.from_guide(guide)
            return Posterior(
                flat=flat, layout=layout, transforms=_transforms(guide), model=model, name=name, source=guide
            )
    raise TypeError(f"{name} is a {type(guide).__name__} guide, which as_posterior cannot read")


def _from_guide_list(guide: Any, name: str) -> Posterior:
    dists, transforms = {}, {}
    for i, part in enumerate(guide):
        p = _from_guide(part, f"{name}[{i}]")
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
