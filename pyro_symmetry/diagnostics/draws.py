"""Draws of several runs as chains, and their alignment: what the ArviZ converter, R-hat/ESS
and the report share.

Independent runs (fitted guides, :class:`~pyro_symmetry.training.TrainedRun` s, ``(loc,
scale)`` mappings, sample dicts, Pyro ``MCMC`` objects, ArviZ trees, anything
:func:`~pyro_symmetry.as_posterior` reads) become the chains of one :class:`RunDraws`; draws
from each run's posterior are its draws. With data, the model's log joint, pointwise
log-likelihood (and on request posterior predictive draws) of every draw are added.
"""

from __future__ import annotations

import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import Any

import torch

from .._validation import check_finite, check_int, check_spec
from ..alignment import align_many, align_samples
from ..groups import PermutationSpec, SpecError
from . import _trees
from ._model_data import model_data, split_data
from ._run_reading import Chain, read_run
from ._runs import describe_skipped, expected_shapes, fit_site_shapes, split_failed

__all__ = ["RunDraws", "align_draws", "collect_draws", "with_model_data"]


@dataclass(frozen=True)
class RunDraws:
    """Posterior draws of several runs, before conversion to ArviZ.

    Attributes
    ----------
    samples : dict ``site -> Tensor (num_chains, num_draws, *site_shape)``
        In the model's (constrained) space; float64 draws stay float64.
    log_q : Tensor ``(num_chains, num_draws)`` (float64) or None
        Log-density of each draw under its run's variational posterior, in the model's
        space (what the guide declares, e.g. ``log q_sym`` for a symmetrized guide).
    log_p : Tensor ``(num_chains, num_draws)`` (float64) or None
        Log joint ``log p(data, w)`` of each draw, when data were given (ArviZ's ``lp``).
    posteriors : list or None
        The runs as posteriors (guides, ``(loc, scale)`` mappings, points), one per chain,
        when the runs are variational; ``None`` for sample sets, MCMC and trees.
    model : the model, when known
    spec : PermutationSpec or None
        The given spec, or the model's ``.spec``.
    aligned : str or None
        How the draws were aligned (``None``, ``"reference"``, ``"barycenter"``).
    symmetric : bool
        Whether every draw was moved by an independent uniform group element.
    run_index : tuple of int
        The index in ``runs`` of the run each chain comes from (an MCMC run gives
        several chains; failed runs are skipped, so chain ``c`` need not be run ``c``).
    skipped : tuple of ``(index, exception)``
        Runs left out because they failed (``run.error`` is not None).
    log_likelihood : dict ``obs site -> Tensor (num_chains, num_draws, *obs_batch)`` or None
        Pointwise log-likelihood of every observation at every draw.
    observed : dict ``obs site -> Tensor`` or None
        The observed values.
    obs_dims : dict ``obs site -> tuple of dim names`` or None
        Names of an observed value's dims (plates name their dims).
    posterior_predictive : dict ``obs site -> Tensor (num_chains, num_draws, *obs_shape)`` or None
    sample_stats : dict ``name -> Tensor (num_chains, num_draws)``
        Other per-draw statistics (Pyro MCMC's ``diverging`` and ``step_size``, a tree's own).
    """

    samples: dict[str, torch.Tensor]
    log_q: torch.Tensor | None = None
    log_p: torch.Tensor | None = None
    posteriors: list | None = None
    model: Any = None
    spec: PermutationSpec | None = None
    aligned: str | None = None
    symmetric: bool = False
    run_index: tuple[int, ...] = ()
    skipped: tuple[tuple[int, BaseException], ...] = ()
    log_likelihood: dict[str, torch.Tensor] | None = None
    observed: dict[str, torch.Tensor] | None = None
    obs_dims: dict[str, tuple[str, ...]] | None = None
    posterior_predictive: dict[str, torch.Tensor] | None = None
    sample_stats: dict[str, torch.Tensor] = field(default_factory=dict)

    @property
    def num_chains(self) -> int:
        return next(iter(self.samples.values())).shape[0]

    @property
    def num_draws(self) -> int:
        return next(iter(self.samples.values())).shape[1]

    def chain(self, r: int) -> dict[str, torch.Tensor]:
        """``site -> (num_draws, *site_shape)`` of chain ``r``."""
        return {k: v[r] for k, v in self.samples.items()}

    def flat(self) -> dict[str, torch.Tensor]:
        """``site -> (num_chains * num_draws, *site_shape)``: every draw, chains pooled."""
        return {k: v.reshape((-1, *v.shape[2:])) for k, v in self.samples.items()}

    def __repr__(self) -> str:
        groups = [
            g for g in ("log_q", "log_p", "log_likelihood", "posterior_predictive") if getattr(self, g) is not None
        ]
        return (
            f"RunDraws({self.num_chains} chains x {self.num_draws} draws, {len(self.samples)} sites, "
            f"aligned={self.aligned!r}{', ' + ', '.join(groups) if groups else ''})"
        )


# ---------------------------------------------------------------------- collect
def _run_list(runs: Any) -> list:
    """``runs`` as a list: a list/tuple as given, one multi-chain object (an MCMC, an ArviZ
    tree) as a list of one."""
    if _trees.is_arviz(runs) or type(runs).__name__ == "MCMC" or hasattr(runs, "sample_stats"):
        return [runs]
    if isinstance(runs, Mapping) or isinstance(runs, str) or not isinstance(runs, Sequence) or len(runs) == 0:
        raise TypeError(
            "runs must be a non-empty list of fitted guides, TrainedRuns, (loc, scale) mappings or sample dicts "
            "(site -> (num_draws, *shape)), or a Pyro MCMC or an ArviZ DataTree/InferenceData; "
            f"got {type(runs).__name__}"
        )
    return list(runs)


def _stack(chains: list[Chain], part: str, key: str) -> torch.Tensor | None:
    """Per-chain ``(num_draws, ...)`` tensors of ``part`` (stats or a group) stacked, or None
    if a chain lacks it."""
    values = []
    for c in chains:
        src = c.stats if part == "stats" else c.groups.get(part, {})
        if key not in src:
            return None
        values.append(src[key])
    if any(v.shape != values[0].shape for v in values):
        return None
    return torch.stack([v.detach() for v in values])


def _stack_chains(chains: list[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    sites = list(chains[0])
    for i, c in enumerate(chains):
        if list(c) != sites and set(c) != set(sites):
            raise SpecError(f"chain {i} has sites {sorted(c)}, chain 0 has {sorted(sites)}")
        for k in sites:
            if c[k].dim() < 1 or c[k].shape != chains[0][k].shape:
                raise SpecError(
                    f"chain {i}, site {k!r}: draws of shape {tuple(c[k].shape)}, chain 0 has "
                    f"{tuple(chains[0][k].shape)} (every run needs the same number of draws and site shapes)"
                )
        for k in sites:
            if c[k].is_floating_point():
                check_finite(f"chain {i}, site {k!r}", c[k])
    return {k: torch.stack([c[k].detach() for c in chains]) for k in sites}


def _group_of(chains: list[Chain], name: str) -> dict[str, torch.Tensor] | None:
    keys = set(chains[0].groups.get(name, {}))
    out = {k: _stack(chains, name, k) for k in sorted(keys)}
    return out if out and all(v is not None for v in out.values()) else None


def collect_draws(
    runs: Any,
    *,
    num_samples: int = 100,
    spec: PermutationSpec | None = None,
    symmetric: bool = False,
    data: Any = None,
    model: Any = None,
    seed: int = 0,
    posterior_predictive: bool = False,
    progress: bool = False,
) -> RunDraws:
    """Draw ``num_samples`` weights from every run; see :func:`to_inference_data`.

    Runs marked as failed (``run.error`` is not None) are skipped with a warning
    naming them (``RunDraws.skipped``); ``ValueError`` if none remains. Sample dicts and
    MCMC draws are checked against the sites' shapes (the spec's, else the model's):
    singleton plate dims are removed, other mismatches raise :class:`SpecError`. With
    ``data``, the model's log joint, pointwise log-likelihood and observed values (and on
    request posterior predictive draws) are added (:func:`with_model_data`).
    """
    out = gather_draws(runs, num_samples=num_samples, spec=spec, symmetric=symmetric, data=data, model=model, seed=seed)
    if data is not None:
        out = with_model_data(out, data, posterior_predictive=posterior_predictive, seed=seed, progress=progress)
    return out


def gather_draws(
    runs: Any,
    *,
    num_samples: int = 100,
    spec: PermutationSpec | None = None,
    symmetric: bool = False,
    data: Any = None,
    model: Any = None,
    seed: int = 0,
) -> RunDraws:
    """:func:`collect_draws` without the model's quantities (``data`` only passed to the
    guides and used to read the model's site shapes)."""
    if isinstance(num_samples, bool) or not isinstance(num_samples, int) or num_samples < 1:
        raise ValueError(f"num_samples must be a positive int, got {num_samples!r}")
    check_int("seed", seed)
    if spec is not None:
        check_spec(spec)
    runs = _run_list(runs)
    kept, skipped = split_failed(runs)
    if skipped:
        warnings.warn("; ".join(describe_skipped(skipped)), stacklevel=2)
    if not kept:
        raise ValueError(f"all {len(runs)} runs failed, no draws to collect: " + "; ".join(describe_skipped(skipped)))
    args, kwargs = split_data(data)
    generator = torch.Generator().manual_seed(seed)
    chains: list[Chain] = []
    run_index: list[int] = []
    posteriors: list | None = []
    extras: dict[str, Any] = {}
    for i, run in kept:
        got, posterior, own_model, tree = read_run(run, i, num_samples, args, kwargs, generator)
        model = model if model is not None else own_model
        chains += got
        run_index += [i] * len(got)
        extras = extras or tree
        if posterior is None:
            posteriors = None
        elif posteriors is not None:
            posteriors.append(posterior)
    spec = spec if spec is not None else getattr(model, "spec", None)
    raw = any(c.raw for c in chains)  # sample dicts / MCMC: shapes not read from a trace
    expected = expected_shapes(spec, model if raw else None, args, kwargs)
    acted = set(spec.sites) if spec is not None else set()
    fitted = [fit_site_shapes(c.draws, expected, acted, c.label) if c.raw else c.draws for c in chains]
    samples = _stack_chains(fitted)
    if spec is not None:
        spec = _bind_spec(spec, samples)
    stats = {k: _stack(chains, "stats", k) for k in chains[0].stats}
    stats = {k: v for k, v in stats.items() if v is not None}
    log_q, log_p = stats.pop("log_q", None), stats.pop("log_p", None)
    if symmetric:
        if spec is None:
            raise SpecError("symmetric=True moves draws by random group elements and needs a spec")
        num_chains, num_draws = next(iter(samples.values())).shape[:2]
        perm = spec.sample((num_chains, num_draws), generator=generator)
        samples = spec.apply(samples, perm)
        log_q = None  # log q(g w) is not log q_sym(g w); estimate I(g; w) instead
    return RunDraws(
        samples,
        log_q,
        log_p,
        posteriors or None,
        model,
        spec,
        None,
        symmetric,
        tuple(run_index),
        tuple(skipped),
        log_likelihood=_group_of(chains, "log_likelihood"),
        observed=extras.get("observed") or None,
        obs_dims=extras.get("obs_dims") or None,
        posterior_predictive=_group_of(chains, "posterior_predictive"),
        sample_stats=stats,
    )


def _bind_spec(spec: PermutationSpec, samples: Mapping[str, torch.Tensor]) -> PermutationSpec:
    """``spec`` checked against draws ``site -> (chain, draw, *shape)``, bound to their shapes
    when it does not know them (a spec written by hand for a user's model)."""
    for s in spec.sites:
        if s not in samples:
            raise SpecError(f"site {s!r} of the spec is missing from the draws (sites: {sorted(samples)})")
        want = None if spec.shapes is None else spec.shapes.get(s)
        have = tuple(samples[s].shape[2:])
        if want is not None and tuple(want) != have:
            raise SpecError(f"site {s!r}: draws of shape {have}, the spec expects {tuple(want)}")
    if spec.shapes is None or any(s not in spec.shapes for s in spec.sites):
        spec = spec.with_shapes({**(spec.shapes or {}), **{s: tuple(samples[s].shape[2:]) for s in spec.sites}})
    return spec


def with_model_data(
    draws: RunDraws,
    data: Any,
    *,
    model: Any = None,
    posterior_predictive: bool = False,
    seed: int = 0,
    progress: bool = False,
) -> RunDraws:
    """``draws`` with the model's log joint (``log_p``), pointwise log-likelihood and observed
    values at ``data`` (and posterior predictive draws on request) for every draw.

    Parameters
    ----------
    draws : RunDraws
    data : tuple of model args, or mapping of kwargs
        The observed values among them (``model(x, y)``: ``data=(x, y)``).
    model : optional
        Default ``draws.model``.

    Raises
    ------
    SpecError
        No model is known, or a latent site of the model has no draws (a learned noise
        scale must be among the runs' sites).
    """
    model = model if model is not None else draws.model
    if model is None:
        raise SpecError(
            "data were given but no model is known (the runs are mappings or draws): pass model= to compute "
            "lp and the log-likelihood"
        )
    args, kwargs = split_data(data)
    num_chains, num_draws = draws.num_chains, draws.num_draws
    md = model_data(
        model, draws.flat(), args, kwargs, posterior_predictive=posterior_predictive, seed=seed, progress=progress
    )

    _check_not_nan({**{f"the log-likelihood of site {k!r}": v for k, v in md.log_likelihood.items()}, "lp": md.log_p})

    def chains(t: torch.Tensor) -> torch.Tensor:
        return t.reshape((num_chains, num_draws, *t.shape[1:]))

    pp = None if md.posterior_predictive is None else {k: chains(v) for k, v in md.posterior_predictive.items()}
    return replace(
        draws,
        model=model,
        log_p=chains(md.log_p),
        log_likelihood={k: chains(v) for k, v in md.log_likelihood.items()},
        observed=md.observed,
        obs_dims=md.obs_dims,
        posterior_predictive=pp if pp is not None else draws.posterior_predictive,
    )


def _check_not_nan(values: Mapping[str, torch.Tensor]) -> None:
    """A NaN log-density never reaches ArviZ (where it would become an elpd); ``-inf`` (an
    observation impossible at a draw) is a value and is kept."""
    for name, v in values.items():
        bad = torch.isnan(v.reshape(v.shape[0], -1)).any(-1)
        if bool(bad.any()):
            raise ValueError(
                f"{name} is NaN at {int(bad.sum())} of {v.shape[0]} draws (first: draw {int(bad.nonzero()[0])} of "
                "the pooled chains); the model returns NaN there"
            )


# ---------------------------------------------------------------------- align
def _permutations_per_run(perms: Any, num: int) -> list[dict[str, torch.Tensor]]:
    """``ManyAlignment.permutations`` as a list of unbatched group elements."""
    if isinstance(perms, Mapping):
        return [{k: v[r] for k, v in perms.items()} for r in range(num)]
    return list(perms)


def align_draws(
    draws: Any,
    spec: PermutationSpec | None = None,
    reference: str | None = None,
    *,
    alignment: Any = None,
    **kwargs: Any,
) -> RunDraws:
    """Remove the permutation symmetry between (and, for sample sets, within) runs.

    Variational runs are aligned as posteriors with :func:`pyro_symmetry.align_many`
    (one group element per run, applied to all its draws, so each run keeps its
    own shape, and ``log_q`` stays the density of the aligned run ``g # q`` at the aligned
    draw); sample sets, MCMC chains, ArviZ trees and symmetrized draws are aligned draw by
    draw with :func:`pyro_symmetry.align_samples`, pooled over all chains (``log_q`` is then
    dropped: the aligned draws no longer follow one density). The log joint, the
    log-likelihood and the posterior predictive are kept: they are invariant.

    Parameters
    ----------
    draws : RunDraws, or anything :func:`collect_draws` reads (an ArviZ tree, an MCMC, ...)
    spec : PermutationSpec, optional
        Defaults to ``draws.spec``.
    reference : {"barycenter", "reference"}, optional
        Align to an iteratively refined barycenter (no run is privileged; the default), or to
        run 0 (for sample sets: the first draw of chain 0). ``method=`` is a deprecated
        spelling (warns with ``DeprecationWarning``).
    alignment : ManyAlignment, optional
        A precomputed ``align_many`` result of ``draws.posteriors`` to reuse.
    **kwargs : passed to ``align_many`` / ``align_samples`` (e.g. ``progress=True``).

    Raises
    ------
    ValueError
        ``reference`` is not one of the above, or both ``reference`` and ``method`` are given.
    """
    if "method" in kwargs:
        warnings.warn("align_draws(method=...) is deprecated; use reference=...", DeprecationWarning, stacklevel=2)
        method = kwargs.pop("method")
        if reference is not None and method != reference:
            raise ValueError(f"align_draws got reference={reference!r} and its deprecated alias method={method!r}")
        reference = method
    method = "barycenter" if reference is None else reference
    if method not in ("barycenter", "reference"):
        raise ValueError(f"reference must be 'reference' or 'barycenter', got {method!r}")
    if not isinstance(draws, RunDraws):
        draws = collect_draws(draws, spec=spec)
    spec = spec if spec is not None else draws.spec
    if spec is None:
        raise SpecError(f"aligning draws ({method!r}) needs a spec (pass spec=... or use a model with a .spec)")
    spec = _bind_spec(spec, draws.samples)
    num_chains, num_draws = draws.num_chains, draws.num_draws
    log_q = draws.log_q
    if draws.posteriors is not None and not draws.symmetric:
        if alignment is None:
            reference = 0 if method == "reference" else "barycenter"
            alignment = align_many(draws.posteriors, spec, reference=reference, **kwargs)
        perms = _permutations_per_run(alignment.permutations, num_chains)
        chains = [spec.apply(draws.chain(r), perms[r]) for r in range(num_chains)]
        samples = {k: torch.stack([c[k] for c in chains]) for k in draws.samples}
    else:
        flat = draws.flat()
        ref = "barycenter" if method == "barycenter" else {k: v[0] for k, v in flat.items()}
        res = align_samples(flat, spec, reference=ref, **kwargs)
        samples = {k: v.reshape((num_chains, num_draws, *v.shape[1:])) for k, v in res.aligned.items()}
        log_q = None
    return replace(draws, samples=samples, aligned=method, log_q=log_q, spec=spec)
