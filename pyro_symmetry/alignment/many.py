"""Aligning many posteriors or many samples at once: to one of them, or to a barycenter.

Runs (independent VI fits, deep-ensemble members) and samples (HMC draws,
checkpoints) are stacked along one batch dimension and aligned by the batched
coordinate descent of :mod:`pyro_symmetry.alignment.core`: the similarity products
of every member are one batched matmul, and only the assignment calls loop.

With ``reference="barycenter"`` no member is privileged: starting from the
alignment to the first member, alternate (1) the barycenter of the aligned members
(for diagonal Gaussians the 2-Wasserstein barycenter: mean of the means, mean of the
standard deviations; for points the mean) and (2) aligning every member to it,
warm-started from its previous permutation, until no permutation changes. Each step
lowers the total cost ``sum_r C_r``, as in k-means.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from .._validation import check_devices, check_finite, check_int, check_spec
from ..groups import PermutationSpec, SpecError
from .core import Channels, Solution, coordinate_descent
from .inputs import (
    Marginals,
    act_on,
    bind_spec,
    check_dtypes,
    check_method,
    check_options,
    check_sites,
    merge_transforms,
    read_posterior,
    rest_distance,
    sq_norm,
    unsigned,
)

__all__ = ["ManyAlignment", "SampleAlignment", "align_many", "align_samples"]


@dataclass(frozen=True)
class ManyAlignment:
    """Result of :func:`align_many`.

    Attributes
    ----------
    permutations : list of dict ``group -> LongTensor (n,)``
        ``permutations[r]`` maps run ``r`` onto the reference (signed encoding).
    aligned : list
        ``permutations[r]`` applied to run ``r``, in that run's form.
    barycenter : mapping
        The reference the runs are aligned to: the mean of the aligned runs, as
        ``site -> (loc, scale)`` if the runs are Gaussian (means and standard
        deviations averaged: the W2 barycenter), else ``site -> tensor``. With an
        integer ``reference`` it is still this mean (of runs aligned to that run).
    objective : Tensor ``(runs,)``
        Each run's final cost (``aligned[r]``) to the reference, ``barycenter`` or run
        ``reference`` (squared W2 or Euclidean distance over every site).
    iterations : int
        Barycenter refinements run (0 for an integer reference).
    converged : bool
        Every run's descent converged and, for a barycenter, no permutation changed
        in the last refinement (if not, the last permutations were chosen against the
        previous barycenter).
    """

    permutations: list[dict[str, torch.Tensor]]
    aligned: list[Any]
    barycenter: dict[str, Any]
    objective: torch.Tensor
    iterations: int
    converged: bool

    def __repr__(self) -> str:
        return (
            f"ManyAlignment(runs={len(self.permutations)}, objective={_summary(self.objective)}, "
            f"iterations={self.iterations}, converged={self.converged})"
        )


@dataclass(frozen=True)
class SampleAlignment:
    """Result of :func:`align_samples`.

    Attributes
    ----------
    permutation : dict ``group -> LongTensor (*batch, n)``
        One (signed) permutation per sample.
    aligned : dict ``site -> Tensor (*batch, *shape)``
        The aligned samples; sites the spec does not touch are copied.
    reference : dict ``site -> Tensor (*shape)``
        The reference the samples were aligned to: the spec's sites, plus the other
        floating-point sites that carry the batch dims.
    objective : Tensor ``(*batch, sweeps + 1)``
        Each sample's cost ``||reference - g.w||^2`` (over the sites of ``reference``)
        per sweep of the last descent.
    converged : bool
        Every sample converged (``converged_per_draw.all()``).
    converged_per_draw : BoolTensor ``(*batch,)``
        The sample's descent converged (a sweep changed nothing) and, with
        ``reference="barycenter"``, the barycenter stopped moving within ``max_iters``
        (otherwise ``False`` for every sample: ``reference`` is then the last barycenter
        the samples were aligned to, not the mean of their final alignment).
    iterations : int
        Barycenter refinements run (0 without a barycenter).
    """

    permutation: dict[str, torch.Tensor]
    aligned: dict[str, torch.Tensor]
    reference: dict[str, torch.Tensor]
    objective: torch.Tensor
    converged: bool
    converged_per_draw: torch.Tensor
    iterations: int

    def __repr__(self) -> str:
        done = self.converged_per_draw
        return (
            f"SampleAlignment(batch={tuple(done.shape)}, objective={_summary(self.objective[..., -1])}, "
            f"converged={int(done.sum())}/{done.numel()}, iterations={self.iterations})"
        )


def _summary(x: torch.Tensor) -> str:
    """``mean [min, max]`` of a float tensor, for short reprs."""
    if x.numel() == 0:
        return "[]"
    x = x.double()
    return f"{float(x.mean()):.6g} [{float(x.min()):.6g}, {float(x.max()):.6g}]"


def _mean_aligned(
    spec: PermutationSpec, tgt: Mapping[str, Channels], perm: Mapping[str, torch.Tensor]
) -> dict[str, Channels]:
    """Barycenter of the aligned targets over the batch dim (W2 barycenter for Gaussians)."""
    mu = spec.apply({s: ch[0] for s, ch in tgt.items()}, perm)
    out: dict[str, Channels] = {s: (mu[s].mean(0), None) for s in tgt}
    if next(iter(tgt.values()))[1] is not None:
        sd = spec.apply({s: ch[1] for s, ch in tgt.items()}, unsigned(perm))
        out = {s: (out[s][0], sd[s].mean(0)) for s in tgt}
    return out


def _refine(
    spec: PermutationSpec,
    tgt: Mapping[str, Channels],
    ref: Mapping[str, Channels],
    barycenter: bool,
    max_iters: int,
    progress: bool,
    **kw: Any,
) -> tuple[Solution, dict[str, Channels], int, bool]:
    """Align to ``ref``; with ``barycenter`` alternate barycenter and re-alignment."""
    sol = coordinate_descent(spec, ref, tgt, progress=progress, **kw)
    if not barycenter:
        return sol, dict(ref), 0, bool(sol.converged.all())
    kw = {k: v for k, v in kw.items() if k != "init"}
    stable = False
    it = 0
    for it in range(1, max_iters + 1):  # noqa: B007  (it is returned)
        ref = _mean_aligned(spec, tgt, sol.perm)
        new = coordinate_descent(spec, ref, tgt, init=sol.perm, progress=progress, **kw)
        stable = all(torch.equal(new.perm[g], sol.perm[g]) for g in spec.groups)
        sol = new
        if stable:
            break
    return sol, dict(ref), it, stable and bool(sol.converged.all())


def align_many(
    posteriors: Sequence[Any],
    spec: PermutationSpec,
    *,
    reference: int | str = 0,
    method: str = "wasserstein",
    max_iters: int = 20,
    max_sweeps: int = 100,
    seed: int | None = None,
    signs: bool = True,
    compute_dtype: torch.dtype | None = None,
    progress: bool = False,
) -> ManyAlignment:
    """Align several posteriors to one of them or to their barycenter.

    Parameters
    ----------
    posteriors : sequence of posteriors
        Fitted guides, ``site -> (loc, scale)`` mappings or point mappings (any mix
        for ``method="weights"``), all with the same sites and shapes.
    spec : PermutationSpec
    reference : int or "barycenter"
        Align all runs to run ``reference``, or to the barycenter refined until no
        permutation changes (or ``max_iters``), so that no run is privileged
        (Rossi, Singh, Hannagan 2023; Ainsworth et al. 2023).
    method, max_sweeps, seed, signs, compute_dtype, progress
        As in :func:`~pyro_symmetry.alignment.align`.
    max_iters : int
        Cap on barycenter refinements.

    Returns
    -------
    ManyAlignment

    Notes
    -----
    Not differentiable: tensors that require grad are read as values, and every
    result (permutations, aligned runs, barycenter, objective) is detached. To carry a
    gradient, apply ``permutations[r]`` with ``spec.apply`` to run ``r``'s own tensors.

    Examples
    --------
    >>> res = ps.align_many([guide0, guide1, guide2], model.spec, reference="barycenter")
    >>> res.barycenter["fc1.weight"]   # (loc, scale)
    """
    if isinstance(posteriors, Mapping) or not isinstance(posteriors, Iterable):
        raise TypeError(f"posteriors must be a sequence of posteriors, got {type(posteriors).__name__}")
    check_options(max_sweeps, seed, compute_dtype, signs)
    check_int("max_iters", max_iters, minimum=1)
    posteriors = list(posteriors)
    if not posteriors:
        raise ValueError("posteriors is empty")
    check_spec(spec)
    names = [f"posteriors[{r}]" for r in range(len(posteriors))]
    full = [read_posterior(q, name, transforms=True) for q, name in zip(posteriors, names)]
    read = [r[:3] for r in full]
    transforms = [r[3] for r in full]
    check_method(method, {name: f for name, (f, _, _) in zip(names, read)})
    means = {name: mu for name, (_, mu, _) in zip(names, read)}
    check_sites(means, spec.sites)
    floating = [*spec.sites, *(k for k, v in read[0][1].items() if k not in spec.sites and v.is_floating_point())]
    check_dtypes(floating, means, {name: sd for name, (_, _, sd) in zip(names, read)})
    spec = bind_spec(spec, {k: tuple(v.shape) for k, v in read[0][1].items()}, signs, names[0])
    sites = list(read[0][1])
    wass = method == "wasserstein"
    gaussian = all(f == "gaussian" for f, _, _ in read)
    stack_mu = {s: torch.stack([m[s] for _, m, _ in read]) for s in sites}
    stack_sd = {s: torch.stack([d[s] for _, _, d in read]) for s in sites} if gaussian else None
    tgt = {s: (stack_mu[s], stack_sd[s] if wass else None) for s in spec.sites}
    if reference == "barycenter":
        r0, bary = 0, True
    elif isinstance(reference, int) and not isinstance(reference, bool):
        if not -len(read) <= reference < len(read):
            raise ValueError(f"reference={reference} is out of range for {len(read)} posteriors")
        r0, bary = reference % len(read), False
    else:
        raise ValueError(f"reference must be a run index or 'barycenter', got {reference!r}")
    ref = {s: (ch[0][r0], None if ch[1] is None else ch[1][r0]) for s, ch in tgt.items()}
    sol, _, iters, conv = _refine(
        spec, tgt, ref, bary, max_iters, progress, max_sweeps=max_sweeps, seed=seed, compute_dtype=compute_dtype
    )
    perm = sol.perm
    al_mu = spec.apply(stack_mu, perm)
    al_sd = spec.apply(stack_sd, unsigned(perm)) if gaussian else None
    perms = [{g: p[r] for g, p in perm.items()} for r in range(len(read))]
    aligned = []
    for r, (form, mu, sd) in enumerate(read):
        if form == "point":
            aligned.append(Marginals({s: al_mu[s][r] for s in sites}, transforms[r]))
        else:
            aligned.append(act_on(spec, form, mu, sd, perms[r], transforms[r]))
    # Integer buffers (BatchNorm's num_batches_tracked) have no mean: keep the first run's.
    bary_mu = {s: al_mu[s].mean(0) if al_mu[s].is_floating_point() else al_mu[s][0] for s in sites}
    bary_sd = {s: al_sd[s].mean(0) for s in sites} if gaussian else None
    values = {s: (bary_mu[s], bary_sd[s]) for s in sites} if gaussian else bary_mu
    barycenter = Marginals(values, merge_transforms(dict(zip(names, transforms))))
    if bary:
        # The cost to the barycenter returned: if the refinement stopped at max_iters (not
        # converged), the last permutations were chosen against the one before it.
        floats = [s for s in sites if al_mu[s].is_floating_point()]
        objective = sum(sq_norm(al_mu[s] - bary_mu[s]) for s in floats)
        if wass:
            objective = objective + sum(sq_norm(al_sd[s] - bary_sd[s]) for s in floats)
        objective = objective.cpu()
    else:
        # The objective covers every site: add the sites no group moves, against the same run.
        rest = [s for s in sites if s not in spec.sites]
        rmu = {s: stack_mu[s][r0] for s in rest}
        rsd = {s: stack_sd[s][r0] for s in rest} if gaussian else None
        offset = rest_distance(rest, rmu, rsd if wass else None, stack_mu, stack_sd if wass else None)
        objective = sol.objective[:, -1].cpu() + offset
    return ManyAlignment(perms, aligned, barycenter, objective, iters, conv)


def align_samples(
    samples: Mapping[str, torch.Tensor],
    spec: PermutationSpec,
    reference: None | str | Mapping[str, Any] = None,
    *,
    method: str = "weights",
    max_sweeps: int = 100,
    max_iters: int = 10,
    seed: int | None = None,
    signs: bool = True,
    compute_dtype: torch.dtype | None = None,
    progress: bool = False,
) -> SampleAlignment:
    """Align every sample of a batch (MCMC draws, ensemble members, checkpoints) to a reference.

    Each sample ``w_b`` gets its own ``g_b`` minimizing ``||w_ref - g_b.w_b||^2``
    (weight matching), all samples at once: the similarity products of all samples
    are batched tensor ops; only the assignment calls loop. Sign-flip groups (odd
    activations) use signed permutations, so the label switching *and* sign
    switching of tanh networks across chains disappear.

    Parameters
    ----------
    samples : mapping ``site -> Tensor (*batch, *shape)``
        Any number of leading batch dims, e.g.
        ``MCMC.get_samples(group_by_chain=True)`` (``(chains, draws, *shape)``).
    spec : PermutationSpec
        Must know the sites' shapes (built specs do), or a mapping reference gives them.
    reference : None, mapping or "barycenter"
        ``None``: the first sample (index 0 in every batch dim); a mapping
        ``site -> tensor`` (or ``(loc, scale)``, whose means are used); or
        ``"barycenter"``: the mean of the aligned samples, refined until no
        sample's permutation changes (at most ``max_iters`` times).
    method : {"weights"}
        Samples are points: weight matching.
    max_sweeps, seed, signs, compute_dtype, progress
        As in :func:`~pyro_symmetry.alignment.align`.

    Returns
    -------
    SampleAlignment
        ``permutation`` (``group -> (*batch, n)``), ``aligned`` (``site -> (*batch, *shape)``),
        ``reference`` (``site -> shape``), ``objective``, ``converged``, ``iterations``.

    Notes
    -----
    Not differentiable: samples (and a reference) that require grad are read as
    values, and ``aligned``, ``reference`` and ``objective`` are detached; apply
    ``permutation`` with ``spec.apply`` to carry a gradient.

    Examples
    --------
    >>> draws = mcmc.get_samples(group_by_chain=True)      # (4, 500, *shape)
    >>> res = ps.align_samples(draws, model.spec, "barycenter")
    >>> res.aligned["fc1.weight"].shape
    torch.Size([4, 500, 8, 10])
    """
    if method != "weights":
        raise ValueError(f"align_samples matches points: method must be 'weights', got {method!r}")
    if not isinstance(samples, Mapping) or not samples:
        raise TypeError(f"samples must be a non-empty mapping site -> tensor, got {type(samples).__name__}")
    check_spec(spec)
    check_options(max_sweeps, seed, compute_dtype, signs)
    check_int("max_iters", max_iters, minimum=1)
    ref_points = None
    if isinstance(reference, Mapping):
        _, ref_points, _ = read_posterior(reference, "reference")
    elif not (reference is None or reference == "barycenter"):
        raise ValueError(f"reference must be None, 'barycenter' or a mapping site -> tensor, got {reference!r}")
    # Meta or mixed devices fail here with the site named, not inside torch; tensors that
    # require grad are read as values (the alignment is not differentiable).
    check_devices(
        {
            **{f"samples[{k!r}]": v for k, v in samples.items()},
            **{f"reference[{k!r}]": v for k, v in (ref_points or {}).items()},
        }
    )
    samples = {k: v.detach() if torch.is_tensor(v) else v for k, v in samples.items()}
    batch, event = _batch_shape(samples, spec)
    spec = bind_spec(spec, event, signs, "samples")
    B = math.prod(batch)
    if B == 0:
        raise ValueError("samples has an empty batch")
    # Sites no group moves still count in the objective when they carry the batch dims.
    rest = [
        s
        for s, x in samples.items()
        if s not in spec.sites
        and torch.is_tensor(x)
        and x.is_floating_point()
        and tuple(x.shape[: len(batch)]) == batch
    ]
    flat = {s: samples[s].reshape((B,) + tuple(samples[s].shape[len(batch) :])) for s in (*spec.sites, *rest)}
    tgt = {s: (flat[s], None) for s in spec.sites}
    if ref_points is not None:
        _check_reference(ref_points, event, spec.sites)
        ref = {s: (ref_points[s].to(flat[s].dtype), None) for s in spec.sites}
        # Other sites count only where the reference has them with the samples' event shape.
        rest = [s for s in rest if s in ref_points and ref_points[s].shape == flat[s].shape[1:]]
        rest_ref = {s: ref_points[s].to(flat[s].dtype) for s in rest}
    else:
        ref = {s: (flat[s][0], None) for s in spec.sites}
        rest_ref = {s: flat[s].mean(0) if reference == "barycenter" else flat[s][0] for s in rest}
    sol, ref, iters, stable = _refine(
        spec,
        tgt,
        ref,
        reference == "barycenter",
        max_iters,
        progress,
        max_sweeps=max_sweeps,
        seed=seed,
        compute_dtype=compute_dtype,
    )
    perm = {g: p.reshape(batch + p.shape[-1:]) for g, p in sol.perm.items()}
    aligned = spec.apply(dict(samples), perm)
    objective = sol.objective.cpu() + rest_distance(rest, rest_ref, None, flat, None).unsqueeze(-1)
    return SampleAlignment(
        permutation=perm,
        aligned=aligned,
        reference={**{s: ch[0] for s, ch in ref.items()}, **rest_ref},
        objective=objective.reshape(batch + objective.shape[-1:]),
        # A barycenter still moving after max_iters leaves no sample converged.
        converged=bool((sol.converged & stable).all()),
        converged_per_draw=(sol.converged & stable).reshape(batch),
        iterations=iters,
    )


def _check_reference(
    ref: Mapping[str, torch.Tensor], event: Mapping[str, tuple[int, ...]], spec_sites: Sequence[str]
) -> None:
    """A reference has every moved site, each with the samples' event shape."""
    for s in spec_sites:
        if s not in ref:
            raise SpecError(
                f"site {s!r} is missing from reference (reference has sites {sorted(ref)}); the spec acts on it"
            )
        if tuple(ref[s].shape) != event[s]:
            raise SpecError(
                f"site {s!r} has shape {tuple(ref[s].shape)} in reference but the samples have event shape {event[s]}"
            )


def _batch_shape(
    samples: Mapping[str, torch.Tensor], spec: PermutationSpec
) -> tuple[tuple[int, ...], dict[str, tuple[int, ...]]]:
    """The common batch shape of the spec's sites, and their event shapes."""
    if not isinstance(samples, Mapping) or not samples:
        raise TypeError(f"samples must be a non-empty mapping site -> tensor, got {type(samples).__name__}")
    batch, event = None, {}
    for s in spec.sites:
        if s not in samples:
            raise SpecError(f"site {s!r} is missing from samples (samples has sites {sorted(samples)})")
        x = samples[s]
        if not torch.is_tensor(x):
            raise TypeError(f"samples[{s!r}] must be a tensor, got {type(x).__name__}")
        if not x.is_floating_point():
            raise TypeError(f"samples[{s!r}] must be a floating-point tensor, got dtype {x.dtype}")
        check_finite(f"samples[{s!r}]", x)
        nd = spec.action(s).event_ndim
        if x.dim() < nd:
            raise SpecError(f"samples[{s!r}] has shape {tuple(x.shape)}, fewer than the site's {nd} dims")
        b, event[s] = tuple(x.shape[: x.dim() - nd]), tuple(x.shape[x.dim() - nd :])
        if batch is None:
            batch, first = b, s
        elif b != batch:
            raise SpecError(f"samples[{s!r}] has batch shape {b}, but samples[{first!r}] has {batch}")
    return batch, event
