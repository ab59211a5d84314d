"""Several runs of a Bayesian network as ArviZ data: runs become chains.

Independent runs (fitted guides, :class:`~pyro_symmetry.training.TrainedRun` s,
Gaussian ``(loc, scale)`` mappings, sample dicts, or a Pyro ``MCMC``) become the
chains of one ArviZ ``xarray.DataTree``; draws from each run's posterior are its
draws; every Pyro site is one variable whose dims are named after the neuron
groups they index, so ``fc2.weight`` has dims ``("fc2_neuron", "fc1_neuron")`` and
shares ``fc1_neuron`` with the rows of ``fc1.weight``.

The tree is built with the refactored ArviZ packages (``arviz-base``), which
``arviz`` 1.x re-exports; users of legacy ``arviz`` 0.2x convert it with
``arviz.InferenceData.from_datatree(tree)`` (see the docs' example page).
"""

from __future__ import annotations

import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace
from typing import Any

import numpy as np
import pyro
import pyro.poutine as poutine
import torch
from pyro.poutine.util import site_is_subsample

from .._validation import check_finite, check_int, check_spec
from ..alignment import align_many, align_samples
from ..groups import PermutationSpec, SpecError
from ..posterior import gaussian_params, is_gaussian_mapping
from . import _layout
from ._runs import describe_skipped, expected_shapes, fit_site_shapes, split_failed

__all__ = ["RunDraws", "align_draws", "collect_draws", "draws_to_datatree", "site_dims", "to_inference_data"]

ALIGN_METHODS = (None, "reference", "barycenter")


@dataclass(frozen=True)
class RunDraws:
    """Posterior draws of several runs, before conversion to ArviZ.

    Attributes
    ----------
    samples : dict ``site -> Tensor (num_chains, num_draws, *site_shape)``
    log_q : Tensor ``(num_chains, num_draws)`` (float64) or None
        Log-density of each draw under its run's variational posterior (what the
        guide declares, e.g. ``log q_sym`` for a symmetrized guide).
    log_p : Tensor ``(num_chains, num_draws)`` (float64) or None
        Log joint ``log p(D, w)`` of each draw, when data were given.
    posteriors : list or None
        The runs as posteriors (guides or ``(loc, scale)`` mappings), one per chain,
        when the runs are variational; ``None`` for sample sets and MCMC.
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

    @property
    def num_chains(self) -> int:
        return next(iter(self.samples.values())).shape[0]

    @property
    def num_draws(self) -> int:
        return next(iter(self.samples.values())).shape[1]

    def chain(self, r: int) -> dict[str, torch.Tensor]:
        """``site -> (num_draws, *site_shape)`` of chain ``r``."""
        return {k: v[r] for k, v in self.samples.items()}


# ---------------------------------------------------------------------- run kinds
def _is_mcmc(run: Any) -> bool:
    from pyro.infer import MCMC

    return isinstance(run, MCMC)


def _as_guide(run: Any) -> Any:
    """The guide of a TrainedRun-like record, or the run itself."""
    return run.guide if hasattr(run, "guide") and hasattr(run, "state") else run


def _is_guide(run: Any) -> bool:
    return isinstance(run, torch.nn.Module) and callable(run)


def _plate_nesting(trace: Any) -> int:
    return max(
        (
            -f.dim
            for s in trace.nodes.values()
            if s["type"] == "sample"
            for f in s["cond_indep_stack"]
            if f.vectorized and f.dim is not None
        ),
        default=0,
    )


def _sum_per_draw(trace: Any, num: int) -> torch.Tensor:
    """``(num,)`` sum of the scaled log-probs of all sample sites (factors included)
    of a trace run under the outermost plate ``_ps_draws`` of size ``num``."""
    trace.compute_log_prob()
    total = None
    for name, site in trace.nodes.items():
        if site["type"] == "sample" and not site_is_subsample(site):
            lp = site["log_prob"]
            if lp.dim() == 0 or lp.shape[0] != num:
                raise ValueError(
                    f"site {name!r} has log-prob shape {tuple(lp.shape)} under a plate of {num} draws; "
                    "the model or guide does not vectorize over draws"
                )
            part = lp.reshape(num, -1).sum(-1).double()
            total = part if total is None else total + part
    return torch.zeros(num, dtype=torch.float64) if total is None else total


def _guide_draws(guide: Any, num: int, args: tuple, kwargs: dict) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
    """``num`` draws of a guide, vectorized under an outer plate, and their log q.

    Runs inside an empty parameter-store scope: the guide then reads its own module
    parameters, never those of another run with the same parameter names.
    """
    with torch.no_grad(), pyro.get_param_store().scope():
        tr0 = poutine.trace(guide).get_trace(*args, **kwargs)
        dim = -(_plate_nesting(tr0) + 1)
        with pyro.plate("_ps_draws", num, dim=dim):
            tr = poutine.trace(guide).get_trace(*args, **kwargs)

    values = {}
    for name, site in tr.nodes.items():
        if site["type"] == "sample" and not site["is_observed"] and not site_is_subsample(site):
            if site["infer"].get("is_auxiliary"):
                continue
            shape = tuple(tr0.nodes[name]["value"].shape)
            values[name] = site["value"].reshape((num, *shape))
    return values, _sum_per_draw(tr, num)


def _gaussian_draws(q: Mapping, num: int, generator: torch.Generator) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
    params = gaussian_params(q)
    values, log_q = {}, 0.0
    for k, (loc, scale) in params.items():
        eps = torch.randn((num, *loc.shape), generator=generator, dtype=loc.dtype).to(loc.device)
        values[k] = loc + scale * eps
        log_q = log_q + torch.distributions.Normal(loc, scale).log_prob(values[k]).reshape(num, -1).sum(-1).double()
    return values, log_q


def _model_log_p(model: Any, draws: Mapping[str, torch.Tensor], args: tuple, kwargs: dict) -> torch.Tensor:
    """``(num,)`` log joint ``log p(D, w)`` of every draw, one vectorized model trace."""
    num = next(iter(draws.values())).shape[0]
    first = {k: v[0] for k, v in draws.items()}
    with torch.no_grad():
        tr0 = poutine.trace(poutine.condition(model, data=first)).get_trace(*args, **kwargs)
        missing = [
            n
            for n, s in tr0.nodes.items()
            if s["type"] == "sample" and not s["is_observed"] and not site_is_subsample(s) and n not in draws
        ]
        if missing:
            raise SpecError(f"the draws have no values for the model's latent sites {missing}; cannot compute log_p")
        nest = _plate_nesting(tr0)
        batched = {}
        for k, v in draws.items():
            if k not in tr0.nodes:
                continue
            site = tr0.nodes[k]
            own = tuple(site["value"].shape)
            batch_nd = len(own) - site["fn"].event_dim
            batched[k] = v.reshape((num,) + (1,) * (nest - batch_nd) + own)
        with pyro.plate("_ps_draws", num, dim=-(nest + 1)):
            tr = poutine.trace(poutine.condition(model, data=batched)).get_trace(*args, **kwargs)
        return _sum_per_draw(tr, num)


def _split_data(data: Any) -> tuple[tuple, dict]:
    if data is None:
        return (), {}
    if isinstance(data, Mapping):
        return (), dict(data)
    if isinstance(data, (tuple, list)):
        return tuple(data), {}
    return (data,), {}


# ---------------------------------------------------------------------- collect
def _chains_of(run: Any, i: int, num_samples: int, args: tuple, kwargs: dict, generator: torch.Generator):
    """``[(label, draws, log_q or None)], posterior or None, model or None`` of one run."""
    guide = _as_guide(run)
    if _is_mcmc(guide):
        by_chain = guide.get_samples(group_by_chain=True)
        num = next(iter(by_chain.values())).shape[0]
        chains = [(f"runs[{i}] (MCMC chain {c})", {k: v[c] for k, v in by_chain.items()}, None) for c in range(num)]
        return chains, None, guide.kernel.model
    if _is_guide(guide):
        if getattr(guide, "prototype_trace", 1) is None:
            raise SpecError(f"runs[{i}] ({type(guide).__name__}) is not fitted: run at least one SVI step")
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(int(torch.randint(2**62, (), generator=generator)))
            values, log_q = _guide_draws(guide, num_samples, args, kwargs)
        return [(f"runs[{i}]", values, log_q)], guide, None
    if isinstance(guide, Mapping) and is_gaussian_mapping(guide):
        values, log_q = _gaussian_draws(guide, num_samples, generator)
        return [(f"runs[{i}]", values, log_q)], guide, None
    if isinstance(guide, Mapping) and guide and all(torch.is_tensor(v) for v in guide.values()):
        return [(f"runs[{i}]", dict(guide), None)], None, None
    raise TypeError(
        f"runs[{i}] is a {type(guide).__name__}: expected a fitted guide, a TrainedRun, a mapping "
        "site -> (loc, scale), a sample dict site -> (num_draws, *shape) or a Pyro MCMC"
    )


def collect_draws(
    runs: Any,
    *,
    num_samples: int = 100,
    spec: PermutationSpec | None = None,
    symmetric: bool = False,
    data: Any = None,
    model: Any = None,
    seed: int = 0,
) -> RunDraws:
    """Draw ``num_samples`` weights from every run; see :func:`to_inference_data`.

    Runs marked as failed (``run.error`` is not None) are skipped with a warning
    naming them (``RunDraws.skipped``); ``ValueError`` if none remains. Sample dicts and
    MCMC draws are checked against the sites' shapes (the spec's, else the model's):
    singleton plate dims are removed, other mismatches raise :class:`SpecError`.
    """
    if isinstance(num_samples, bool) or not isinstance(num_samples, int) or num_samples < 1:
        raise ValueError(f"num_samples must be a positive int, got {num_samples!r}")
    check_int("seed", seed)
    if spec is not None:
        check_spec(spec)
    if _is_mcmc(runs):
        runs = [runs]
    if isinstance(runs, Mapping) or not isinstance(runs, Sequence) or len(runs) == 0:
        raise TypeError(
            "runs must be a non-empty list of fitted guides, TrainedRuns, (loc, scale) mappings or sample dicts "
            f"(site -> (num_draws, *shape)), or a Pyro MCMC; got {type(runs).__name__}"
        )
    kept, skipped = split_failed(runs)
    if skipped:
        warnings.warn("; ".join(describe_skipped(skipped)), stacklevel=2)
    if not kept:
        raise ValueError(f"all {len(runs)} runs failed, no draws to collect: " + "; ".join(describe_skipped(skipped)))
    args, kwargs = _split_data(data)
    generator = torch.Generator().manual_seed(seed)
    labelled: list[tuple[str, dict[str, torch.Tensor], torch.Tensor | None]] = []
    run_index: list[int] = []
    posteriors: list | None = []
    for i, run in kept:
        model = getattr(run, "model", None) if model is None and not isinstance(run, Mapping) else model
        chains, posterior, own_model = _chains_of(run, i, num_samples, args, kwargs, generator)
        model = model if model is not None else own_model
        labelled += chains
        run_index += [i] * len(chains)
        if posterior is None:
            posteriors = None
        elif posteriors is not None:
            posteriors.append(posterior)
    spec = spec if spec is not None else getattr(model, "spec", None)
    raw = any(lq is None for _, _, lq in labelled)  # sample dicts / MCMC: shapes not read from a trace
    expected = expected_shapes(spec, model if raw else None, args, kwargs)
    acted = set(spec.sites) if spec is not None else set()
    samples = _stack_chains([fit_site_shapes(c, expected, acted, where) for where, c, _ in labelled])
    log_qs = [lq for _, _, lq in labelled]
    log_q = None if any(q is None for q in log_qs) else torch.stack([q.detach() for q in log_qs])
    if symmetric:
        if spec is None:
            raise SpecError("symmetric=True moves draws by random group elements and needs a spec")
        num_chains, num_draws = next(iter(samples.values())).shape[:2]
        perm = spec.sample((num_chains, num_draws), generator=generator)
        samples = spec.apply(samples, perm)
        log_q = None  # log q(g w) is not log q_sym(g w); estimate I(g; w) instead
    log_p = None
    if data is not None and model is not None:
        flat = {k: v.reshape((-1, *v.shape[2:])) for k, v in samples.items()}
        num_chains, num_draws = next(iter(samples.values())).shape[:2]
        log_p = _model_log_p(model, flat, args, kwargs).reshape(num_chains, num_draws)
    return RunDraws(
        samples, log_q, log_p, posteriors or None, model, spec, None, symmetric, tuple(run_index), tuple(skipped)
    )


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


# ---------------------------------------------------------------------- align
def _permutations_per_run(perms: Any, num: int) -> list[dict[str, torch.Tensor]]:
    """``ManyAlignment.permutations`` as a list of unbatched group elements."""
    if isinstance(perms, Mapping):
        return [{k: v[r] for k, v in perms.items()} for r in range(num)]
    return list(perms)


def align_draws(
    draws: RunDraws,
    spec: PermutationSpec | None = None,
    method: str = "barycenter",
    *,
    alignment: Any = None,
    **kwargs: Any,
) -> RunDraws:
    """Remove the permutation symmetry between (and, for sample sets, within) runs.

    Variational runs are aligned as posteriors with :func:`pyro_symmetry.align_many`
    (one group element per run, applied to all its draws, so each run keeps its
    own shape); sample sets, MCMC chains and symmetrized draws are aligned draw by
    draw with :func:`pyro_symmetry.align_samples`, pooled over all chains.

    Parameters
    ----------
    draws : RunDraws
    spec : PermutationSpec, optional
        Defaults to ``draws.spec``.
    method : {"barycenter", "reference"}
        Align to an iteratively refined barycenter (no run is privileged), or to
        run 0 (for sample sets: the first draw of chain 0).
    alignment : ManyAlignment, optional
        A precomputed ``align_many`` result of ``draws.posteriors`` to reuse.
    **kwargs : passed to ``align_many`` / ``align_samples``.
    """
    if method not in ("barycenter", "reference"):
        raise ValueError(f"align must be None, 'reference' or 'barycenter', got {method!r}")
    spec = spec if spec is not None else draws.spec
    if spec is None:
        raise SpecError(f"aligning draws ({method!r}) needs a spec (pass spec=... or use a model with a .spec)")
    num_chains, num_draws = draws.num_chains, draws.num_draws
    if draws.posteriors is not None and not draws.symmetric:
        if alignment is None:
            reference = 0 if method == "reference" else "barycenter"
            alignment = align_many(draws.posteriors, spec, reference=reference, **kwargs)
        perms = _permutations_per_run(alignment.permutations, num_chains)
        chains = [spec.apply(draws.chain(r), perms[r]) for r in range(num_chains)]
        samples = {k: torch.stack([c[k] for c in chains]) for k in draws.samples}
    else:
        flat = {k: v.reshape((num_chains * num_draws, *v.shape[2:])) for k, v in draws.samples.items()}
        ref = "barycenter" if method == "barycenter" else {k: v[0] for k, v in flat.items()}
        res = align_samples(flat, spec, reference=ref, **kwargs)
        samples = {k: v.reshape((num_chains, num_draws, *v.shape[1:])) for k, v in res.aligned.items()}
    return replace(draws, samples=samples, aligned=method)


# ---------------------------------------------------------------------- ArviZ
def site_dims(shapes: Mapping[str, Sequence[int]], spec: PermutationSpec | None = None) -> dict[str, list[str]]:
    """ArviZ dim names for every site's own axes, read from the spec's groups.

    An axis a neuron group ``g`` permutes is named ``"{g}_neuron"`` (so the rows of
    ``fc1.weight`` and the columns of ``fc2.weight`` share one dim). The other axis of a
    two-dimensional weight with one such axis is ``"{layer}_input"`` if the group's axis
    is incoming (``fc1.weight``; a NumPyro-style ``w1`` of shape ``(in, hidden)``) and
    ``"{layer}_neuron"`` if it is outgoing (the output layer's ``fc3.weight`` or ``w2``
    of shape ``(hidden, out)``), whatever the layout. Every other axis is
    ``"{site}_dim{k}"``: nothing is called a neuron or an input axis from its position.
    ``layer`` is the site name without its last part.

    Parameters
    ----------
    shapes : mapping ``site -> own shape`` (no draw/chain dims)
    spec : PermutationSpec, optional
    """
    return _layout.site_dims(shapes, spec)


def draws_to_datatree(draws: RunDraws, spec: PermutationSpec | None = None) -> Any:
    """The :class:`RunDraws` as an ArviZ ``xarray.DataTree`` (groups ``posterior``
    and, when log-densities are known, ``sample_stats`` with ``log_q``/``log_p``).
    ``spec`` (default ``draws.spec``) names the dims, see :func:`site_dims`."""
    from arviz_base import from_dict

    spec = spec if spec is not None else draws.spec
    shapes = {k: tuple(v.shape[2:]) for k, v in draws.samples.items()}
    dims = site_dims(shapes, spec)
    posterior = {k: v.detach().cpu().numpy() for k, v in draws.samples.items()}
    groups: dict[str, dict[str, np.ndarray]] = {"posterior": posterior}
    stats = {
        name: t.detach().cpu().numpy() for name, t in (("log_q", draws.log_q), ("log_p", draws.log_p)) if t is not None
    }
    if stats:
        groups["sample_stats"] = stats
    attrs = {"aligned": str(draws.aligned), "symmetric": int(draws.symmetric)}
    if spec is not None:
        attrs.update(spec=repr(spec), log_order=float(spec.log_order))
    return from_dict(groups, dims=dims, attrs={"posterior": attrs})


def to_inference_data(
    runs: Any,
    *,
    num_samples: int = 100,
    symmetric: bool = False,
    align: str | None = None,
    spec: PermutationSpec | None = None,
    data: Any = None,
    model: Any = None,
    seed: int = 0,
) -> Any:
    """Several runs as one ArviZ ``xarray.DataTree``: each run is a chain.

    Parameters
    ----------
    runs : list, or a Pyro ``MCMC``
        Each entry is a fitted guide (``AutoNormal``, ``AutoDiagonalNormal``,
        ``AutoSymmetrizedNormal``, any guide Pyro can trace), a
        :class:`~pyro_symmetry.training.TrainedRun`, a mapping
        ``site -> (loc, scale)``, a sample dict ``site -> Tensor (num_draws, *shape)``
        (an HMC chain, a deep-ensemble member's checkpoints), or an ``MCMC``
        (contributing one chain per MCMC chain). A run marked as failed
        (``run.error`` is not None, see ``train_runs(on_error="keep")``) is skipped
        with a warning naming it; ``ValueError`` if every run failed.
    num_samples : int
        Draws per variational run (sample dicts keep their own draws).
    symmetric : bool
        Move every draw by an independent uniform group element: draws from the
        symmetrized posterior ``q_sym`` (needs ``spec``; ``log_q`` is then dropped).
    align : {None, "reference", "barycenter"}
        Remove the symmetry before conversion, see :func:`align_draws`.
    spec : PermutationSpec, optional
        Names the dims after neuron groups; needed for ``align``/``symmetric``.
        Defaults to the model's ``.spec`` (``ps.models`` networks carry one).
    data : tuple of model args (or mapping of kwargs), optional
        When given, ``log_p = log p(data, w)`` is stored for every draw.
    model : optional
        Model for ``log_p``; defaults to the guide's or MCMC kernel's model.
    seed : int
        Seed of the draws (the global RNG is left untouched).

    Raises
    ------
    SpecError
        A sample dict's (or MCMC's) draws do not end with a site's own shape (the
        spec's ``shapes``, else the model's). Singleton plate dims after the draw dim,
        as in ``Predictive`` output ``(S, 1, *site)``, are removed instead.

    Returns
    -------
    xarray.DataTree
        Group ``posterior``: one variable per site, dims ``(chain, draw, *site_dims)``
        (see :func:`site_dims`); group ``sample_stats``: ``log_q``, ``log_p``
        ``(chain, draw)`` where available.

    Notes
    -----
    A guide is sampled inside an empty Pyro parameter store, so it reads the
    parameters its own modules hold (runs of one model share parameter names; the
    global store would mix them). After ``pyro.get_param_store().load(...)``, call
    the guide once (or run an SVI step) so its modules take the loaded values.

    Legacy ``arviz`` 0.2x users convert with ``arviz.InferenceData.from_datatree(tree)``;
    do not pass the tree's nested dict to legacy ``arviz.from_dict`` (its first
    argument is the posterior itself, so a ``{"posterior": ...}`` dict becomes one
    variable named ``posterior``).

    References
    ----------
    Vehtari et al. (2021), rank-normalized R-hat; Laurent, Aldea, Franchi (ICLR 2024).
    """
    if align not in ALIGN_METHODS:
        raise ValueError(f"align must be None, 'reference' or 'barycenter', got {align!r}")
    draws = collect_draws(
        runs, num_samples=num_samples, spec=spec, symmetric=symmetric, data=data, model=model, seed=seed
    )
    if align is not None:
        draws = align_draws(draws, method=align)
    return draws_to_datatree(draws)
