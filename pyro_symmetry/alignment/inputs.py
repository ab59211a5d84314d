"""Reading posteriors for alignment: forms, methods, shapes, and how elements act on them."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import pyro.distributions as dist
import torch

from .._validation import check_devices, check_int, check_seed, check_spec
from ..groups import PermutationSpec, SpecError, decode_signed
from ..posteriors import Posterior, as_posterior

__all__ = [
    "METHODS",
    "Marginals",
    "apply_gaussian",
    "bind_spec",
    "check_dtypes",
    "check_method",
    "check_options",
    "check_sites",
    "merge_transforms",
    "read_posterior",
    "rest_distance",
    "sq_norm",
    "unsigned",
]

METHODS = ("wasserstein", "weights")


def sq_norm(x: torch.Tensor) -> torch.Tensor:
    """``||x_b||^2`` per leading index, accumulated in float64 without a float64 copy."""
    return torch.linalg.vector_norm(x.reshape(x.shape[0], -1), dim=-1, dtype=torch.float64).pow(2)


def read_posterior(q: Any, name: str, *, detach: bool = True, transforms: bool = False) -> tuple:
    """``(form, means or points, standard deviations or None)`` of any posterior form, and
    with ``transforms`` its unconstrained -> constrained maps ``site -> Transform`` (a
    guide's latent sites with a constrained support, e.g. a learned positive noise scale).

    Values are detached unless ``detach=False`` (alignment is a discrete search with no
    gradient); every tensor must hold values (not on the meta device) on one device.
    Errors name the posterior as ``name`` (``"q1"``, ``"posteriors[2]"``).
    """
    post = as_posterior(q, name=name, detach=detach)
    if post.form == "point":
        out = ("point", post.point(), None)
    else:
        loc, scale = post.gaussian()  # raises, naming the form, when there are no Gaussian marginals
        out = ("gaussian", loc, scale)
    return (*out, dict(post.transforms)) if transforms else out


def merge_transforms(named: Mapping[str, Mapping[str, Any]]) -> dict[str, Any]:
    """The union of the posteriors' transforms (``name -> site -> Transform``); a site two
    posteriors map differently raises a ``ValueError`` naming both."""
    out: dict[str, Any] = {}
    first: dict[str, str] = {}
    for name, transforms in named.items():
        for site, t in transforms.items():
            if site in out and out[site] != t:
                raise ValueError(
                    f"site {site!r} is mapped to its support by {out[site]} in {first[site]} but by {t} in {name}; "
                    "the posteriors must live in one space"
                )
            out.setdefault(site, t)
            first.setdefault(site, name)
    return out


class Marginals(dict, Posterior):
    """A mapping ``site -> (loc, scale)`` (or ``site -> tensor`` for a point) that is also a
    :class:`~pyro_symmetry.Posterior` keeping a guide's transforms.

    What :func:`~pyro_symmetry.align` (``aligned``), :func:`~pyro_symmetry.align_many` and
    :func:`~pyro_symmetry.interpolate` return: index it as a dict; pass it to a loss, and
    :func:`~pyro_symmetry.as_posterior` reads it with the transforms of the guides it came
    from, so latent sites with a constrained support (a learned positive noise scale,
    whose ``(loc, scale)`` live in the guide's unconstrained space) are drawn in the
    model's space.
    """

    def __init__(self, values: Mapping[str, Any], transforms: Mapping[str, Any] | None = None, name: str = "") -> None:
        dict.__init__(self, values)
        dists = {}
        for k, v in values.items():
            if torch.is_tensor(v):
                dtype = v.dtype if v.is_floating_point() else torch.get_default_dtype()
                dists[k] = dist.Delta(v, log_density=v.new_zeros((), dtype=dtype), event_dim=v.dim())
            else:
                loc, scale = v
                dists[k] = dist.Normal(loc, scale, validate_args=False).to_event(loc.dim())
        transforms = {k: t for k, t in (transforms or {}).items() if k in values}
        Posterior.__init__(self, dists=dists, transforms=transforms, name=name or "the posterior", source=None)

    def __repr__(self) -> str:
        shapes = ", ".join(f"{k}: {tuple(s)}" for k, s in list(self.sites.items())[:4])
        more = "" if len(self.sites) <= 4 else f", ... ({len(self.sites)} sites)"
        extra = f", transforms={sorted(self.transforms)}" if self.transforms else ""
        return f"Marginals({self.form}, {{{shapes}{more}}}{extra})"

    def __reduce__(self) -> tuple:
        return (Marginals, (dict(self), self.transforms, self.name))


def check_sites(
    posteriors: Mapping[str, Mapping[str, torch.Tensor]], spec_sites: Sequence[str] = (), *, exact: bool = True
) -> None:
    """The posteriors have the spec's sites, and (``exact``) the same sites as each other,
    each of one shape; ``posteriors`` maps a name (``"q0"``) to its means or points.

    Errors name the site, the posterior and the sites it has: ``site 'x' is missing from
    q1 (q1 has ['a', 'b'])``. Without ``exact``, sites only one of them has are allowed.
    """
    items = list(posteriors.items())
    for name, mu in items:
        for site in spec_sites:
            if site not in mu:
                raise SpecError(
                    f"site {site!r} is missing from {name} ({name} has sites {sorted(mu)}); the spec acts on it"
                )
    first, mu0 = items[0]
    for name, mu in items[1:]:
        for site in [*mu0, *(k for k in mu if k not in mu0)]:
            if site not in mu or site not in mu0:
                lack, has = (name, first) if site not in mu else (first, name)
                if exact:
                    raise SpecError(
                        f"site {site!r} is missing from {lack} ({lack} has sites {sorted(posteriors[lack])}) "
                        f"but {has} has it; the posteriors must have the same sites"
                    )
                continue
            if tuple(mu[site].shape) != tuple(mu0[site].shape):
                raise SpecError(
                    f"site {site!r} has shape {tuple(mu[site].shape)} in {name} but {tuple(mu0[site].shape)} in {first}"
                )


def check_method(method: str, forms: Mapping[str, str]) -> None:
    if method not in METHODS:
        raise ValueError(f"method must be one of {METHODS}, got {method!r}")
    if method == "wasserstein":
        for name, form in forms.items():
            if form != "gaussian":
                raise ValueError(
                    f"method='wasserstein' needs Gaussian posteriors (loc, scale) but {name} is a mapping of point "
                    "tensors; use method='weights'"
                )


def check_options(max_sweeps: Any, seed: Any, compute_dtype: Any, signs: Any) -> None:
    """The options every alignment entry point shares."""
    check_int("max_sweeps", max_sweeps, minimum=0)
    check_seed("seed", seed)
    if compute_dtype is not None and compute_dtype not in (torch.float16, torch.bfloat16, torch.float32, torch.float64):
        raise TypeError(f"compute_dtype must be None or a floating-point torch.dtype, got {compute_dtype!r}")
    if not isinstance(signs, bool):
        raise TypeError(f"signs must be a bool, got {signs!r}")


def check_dtypes(sites: Any, means: Mapping[str, Mapping[str, torch.Tensor]], sds: Mapping | None = None) -> None:
    """All tensors on one device (none on meta); the moved sites floating point, with one
    dtype across posteriors.

    ``means`` maps a posterior's name (``"q0"``) to its means or points, ``sds`` to its
    standard deviations (if any); mixing float32 and float64 posteriors would silently
    up- or down-cast one of them, and mixing devices fails inside torch.
    """
    tensors = {f"{name}[{s!r}]": t for name, mu in means.items() for s, t in mu.items()}
    for name, sd in (sds or {}).items():
        tensors.update({f"{name}[{s!r}] scale": t for s, t in (sd or {}).items()})
    check_devices(tensors)
    for s in sites:
        first = None
        for name, mu in means.items():
            if s not in mu:
                continue
            t = mu[s]
            if not t.is_floating_point():
                raise TypeError(f"{name}[{s!r}] must be a floating-point tensor, got dtype {t.dtype}")
            if first is None:
                first = (name, t)
            elif t.dtype != first[1].dtype:
                raise TypeError(
                    f"{name}[{s!r}] is {t.dtype} but {first[0]}[{s!r}] is {first[1].dtype}; "
                    "convert the posteriors to one dtype"
                )


def bind_spec(
    spec: PermutationSpec, shapes: Mapping[str, tuple[int, ...]], signs: bool, name: str = "the posterior"
) -> PermutationSpec:
    """Check that every site of ``spec`` is present in ``name`` (with ``shapes``) with the
    spec's shape; bind shapes."""
    check_spec(spec)
    missing = [s for s in spec.sites if s not in shapes]
    if missing:
        raise SpecError(
            f"site {missing[0]!r} is missing from {name} ({name} has sites {sorted(shapes)}); the spec acts on it"
        )
    if spec.shapes is None:
        spec = spec.with_shapes({s: tuple(shapes[s]) for s in spec.sites})
    else:
        for s in spec.sites:
            if tuple(shapes[s]) != spec.shapes[s]:
                raise SpecError(f"site {s!r} has shape {tuple(shapes[s])} in {name}, the spec expects {spec.shapes[s]}")
    return spec if signs else spec.without_signs()


def rest_distance(
    sites: list[str],
    ref_mu: Mapping[str, torch.Tensor],
    ref_sd: Mapping[str, torch.Tensor] | None,
    tgt_mu: Mapping[str, torch.Tensor],
    tgt_sd: Mapping[str, torch.Tensor] | None,
) -> torch.Tensor:
    """``(B,)`` float64 squared distance over sites no group moves (targets ``(B, *shape)``), on the CPU."""
    total = torch.zeros(next(iter(tgt_mu.values())).shape[0] if tgt_mu else 1, dtype=torch.float64)
    parts = []
    for s in sites:
        if not ref_mu[s].is_floating_point():
            continue
        parts.append(sq_norm(ref_mu[s] - tgt_mu[s]))
        if ref_sd is not None and tgt_sd is not None:
            parts.append(sq_norm(ref_sd[s] - tgt_sd[s]))
    # Sum on the inputs' device; one transfer (and sync) at the end, not one per site.
    return total + torch.stack(parts).sum(0).cpu() if parts else total


def unsigned(perm: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The permutation part of a signed group element (how standard deviations move)."""
    return {k: decode_signed(p)[0] for k, p in perm.items()}


def apply_gaussian(
    spec: PermutationSpec, loc: Mapping[str, torch.Tensor], scale: Mapping[str, torch.Tensor], perm: Mapping
) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """``g.N(loc, scale^2)``: means move with signs, standard deviations without."""
    new_loc, new_scale = spec.apply(loc, perm), spec.apply(scale, unsigned(perm))
    return {k: (new_loc[k], new_scale[k]) for k in loc}


def act_on(
    spec: PermutationSpec, form: str, mu: Mapping, sd: Mapping | None, perm: Mapping, transforms: Mapping
) -> Marginals:
    """``g.q`` in ``q``'s form (points or ``(loc, scale)``), keeping ``q``'s transforms (the
    sites they map, a noise scale, are not moved by any group)."""
    values = spec.apply(mu, perm) if form == "point" else apply_gaussian(spec, mu, sd, perm)
    return Marginals(values, transforms)
