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
from typing import Any

import numpy as np

from ..collections import Collection
from ..groups import PermutationSpec, SpecError
from . import _layout
from .draws import RunDraws, align_draws, collect_draws, gather_draws, with_model_data  # noqa: F401 - old home

__all__ = ["draws_to_datatree", "site_dims", "to_inference_data"]

ALIGN_METHODS = (None, "reference", "barycenter")


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


def _numpy(t: Any) -> np.ndarray:
    return t.detach().cpu().numpy()


def _groups(draws: RunDraws) -> dict[str, dict[str, np.ndarray]]:
    groups: dict[str, dict[str, np.ndarray]] = {"posterior": {k: _numpy(v) for k, v in draws.samples.items()}}
    stats = {k: _numpy(v) for k, v in draws.sample_stats.items()}
    for name, t in (("log_q", draws.log_q), ("lp", draws.log_p)):
        if t is not None:
            stats[name] = _numpy(t)
    if stats:
        groups["sample_stats"] = stats
    for name, part in (
        ("log_likelihood", draws.log_likelihood),
        ("posterior_predictive", draws.posterior_predictive),
        ("observed_data", draws.observed),
    ):
        if part:
            groups[name] = {k: _numpy(v) for k, v in part.items()}
    return groups


def draws_to_datatree(draws: RunDraws, spec: PermutationSpec | None = None) -> Any:
    """The :class:`RunDraws` as an ArviZ ``xarray.DataTree``.

    Groups: ``posterior`` (one variable per site, dims named by :func:`site_dims`);
    ``sample_stats`` (``log_q``, ``lp``, and e.g. MCMC's ``diverging``/``step_size``) when
    known; ``log_likelihood`` (pointwise, dims named after the observed site's plates),
    ``observed_data`` and ``posterior_predictive`` when the draws have them. ``spec``
    (default ``draws.spec``) names the dims.
    """
    from arviz_base import from_dict

    spec = spec if spec is not None else draws.spec
    shapes = {k: tuple(v.shape[2:]) for k, v in draws.samples.items()}
    dims = site_dims(shapes, spec)
    for k, d in (draws.obs_dims or {}).items():
        dims[k] = list(d)
    attrs = {"aligned": str(draws.aligned), "symmetric": int(draws.symmetric)}
    if spec is not None:
        attrs.update(spec=repr(spec), log_order=float(spec.log_order))
    return from_dict(_groups(draws), dims=dims, attrs={"posterior": attrs})


def to_inference_data(
    runs: Any,
    spec: PermutationSpec | None = None,
    *,
    num_samples: int = 100,
    symmetric: bool = False,
    reference: str | None = None,
    data: Any = None,
    model: Any = None,
    posterior_predictive: bool = False,
    seed: int = 0,
    progress: bool = False,
    chains: Any = None,
    align: str | None = None,
) -> Any:
    """Several runs as one ArviZ ``xarray.DataTree``: each run is a chain.

    A :class:`~pyro_symmetry.collections.Collection` (checkpoints read lazily) gives a tree
    backed by dask arrays instead, one chunk per checkpoint and site, read when computed
    (:func:`ps.diagnostics.collections.to_inference_data
    <pyro_symmetry.diagnostics.collections.to_inference_data>`); only ``chains`` and
    ``spec`` apply to it.

    Parameters
    ----------
    runs : list, or one Pyro ``MCMC`` / ArviZ ``DataTree`` / ``InferenceData``
        Each entry is a fitted guide (``AutoNormal``, ``AutoDiagonalNormal``,
        ``AutoSymmetrizedNormal``, any guide Pyro can trace), a
        :class:`~pyro_symmetry.training.TrainedRun`, a mapping
        ``site -> (loc, scale)`` (or ``site -> Distribution``), a sample dict
        ``site -> Tensor (num_draws, *shape)`` (an HMC chain, a deep-ensemble member's
        checkpoints), an ``MCMC`` (one chain per MCMC chain) or an ArviZ tree (also one
        loaded from netCDF/zarr: its chains, ``sample_stats``, ``log_likelihood``,
        ``observed_data`` and ``posterior_predictive`` are kept, so a tree can be read back
        and re-aligned). A run marked as failed (``run.error`` is not None, see
        ``train_runs(on_error="keep")``) is skipped with a warning naming it;
        ``ValueError`` if every run failed. Or a
        :class:`~pyro_symmetry.collections.Collection` (see above).
    num_samples : int
        Draws per variational run (sample sets keep their own draws).
    symmetric : bool
        Move every draw by an independent uniform group element: draws from the
        symmetrized posterior ``q_sym`` (needs ``spec``; ``log_q`` is then dropped).
    reference : {None, "reference", "barycenter"}
        Remove the symmetry before conversion, aligning to run 0 or to a barycenter
        (see :func:`align_draws`); ``None`` keeps the draws as they are.
    spec : PermutationSpec, optional
        Names the dims after neuron groups; needed for ``reference``/``symmetric``.
        Defaults to the model's ``.spec`` (``ps.models`` networks carry one).
    data : tuple of model args (or mapping of kwargs), optional
        The model's data, observed values included (``model(x, y)``: ``data=(x, y)``). When
        given, the tree gets ``sample_stats.lp`` (``log p(data, w)``), a ``log_likelihood``
        group (pointwise over the observed site's plate, e.g. dim ``"data"``) and
        ``observed_data``, computed by running the model (any Pyro model, no
        ``functional`` needed) at every draw (after alignment), in float64 when the model
        runs that way (an ``nn.Module`` model is evaluated as a float64 copy): float32
        log-likelihoods of confident predictions are exactly 0 at every draw, which
        ``arviz_stats.loo`` cannot smooth.
    model : optional
        Defaults to the guide's or MCMC kernel's model.
    posterior_predictive : bool
        With ``data``: also draw the observed sites from the model at every draw
        (group ``posterior_predictive``).
    seed : int
        Seed of the draws (the global RNG is left untouched).
    progress : bool
        Progress bars over draws where the model is run one draw at a time, and over
        alignment sweeps.
    chains : None, int, index lists or callable
        Collections only: which checkpoints form each chain (default: one chain of every
        checkpoint; ``k``: ``k`` consecutive equal chains; ``name -> label``), see
        :func:`ps.diagnostics.collections.chain_groups
        <pyro_symmetry.diagnostics.collections.chain_groups>`.
    align : str, optional
        Deprecated spelling of ``reference`` (warns with ``DeprecationWarning``).

    Raises
    ------
    SpecError
        A sample dict's (or MCMC's) draws do not end with a site's own shape (the
        spec's ``shapes``, else the model's); singleton plate dims after the draw dim,
        as in ``Predictive`` output ``(S, 1, *site)``, are removed instead. With ``data``:
        no model known, or a latent site of the model missing from the runs.

    Returns
    -------
    xarray.DataTree
        ``posterior``: one variable per site, dims ``(chain, draw, *site_dims)`` (see
        :func:`site_dims`), in the model's space and dtype (float64 stays float64);
        ``sample_stats``: ``log_q`` (the guide's own log-density of each draw, in the
        model's space; ``log q_sym`` for a symmetrized guide), ``lp``, and Pyro MCMC's
        ``diverging``/``step_size``, where available; ``log_likelihood``,
        ``observed_data``, ``posterior_predictive`` as above.

    Notes
    -----
    ``arviz_stats.loo(tree)`` and ``arviz_stats.compare({...})`` read the
    ``log_likelihood`` group; ``arviz_stats.loo_approximate_posterior(tree,
    log_p=tree["sample_stats"]["lp"], log_q=tree["sample_stats"]["log_q"])`` corrects for the
    variational approximation. ``log_q`` is each draw's density under *its own run*:
    pooled over several runs the proposal is their mixture, so call it on one run at a
    time (``to_inference_data([run], ...)``) unless the runs do not overlap. The
    log-likelihood is invariant under the symmetry, so aligned and unaligned trees give
    the same LOO.

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
    Vehtari et al. (2017, 2021): PSIS-LOO, rank-normalized R-hat; Magnusson et al. (2019):
    LOO for approximate posteriors; Laurent, Aldea, Franchi (ICLR 2024).
    """
    reference = _deprecated_align(reference, align)
    if isinstance(runs, Collection):
        options = {
            "num_samples": num_samples != 100,
            "symmetric": symmetric,
            "reference": reference is not None,
            "data": data is not None,
            "model": model is not None,
            "posterior_predictive": posterior_predictive,
        }
        return _collection_tree(runs, spec, chains, [k for k, given in options.items() if given])
    if chains is not None:
        raise ValueError("chains= applies to a Collection; runs are chains already (one chain per run)")
    if reference not in ALIGN_METHODS:
        raise ValueError(f"reference must be None, 'reference' or 'barycenter', got {reference!r}")
    draws = gather_draws(
        runs, num_samples=num_samples, spec=spec, symmetric=symmetric, data=data, model=model, seed=seed
    )
    if reference is not None:
        draws = align_draws(draws, reference=reference, progress=progress)
    if data is not None:
        draws = with_model_data(
            draws, data, model=model, posterior_predictive=posterior_predictive, seed=seed, progress=progress
        )
    return draws_to_datatree(draws)


def _deprecated_align(reference: str | None, align: str | None) -> str | None:
    """``reference``, or the deprecated ``align=`` spelling of it (with a ``DeprecationWarning``)."""
    if align is None:
        return reference
    warnings.warn("to_inference_data(align=...) is deprecated; use reference=...", DeprecationWarning, stacklevel=3)
    if reference is not None and reference != align:
        raise ValueError(f"to_inference_data got reference={reference!r} and its deprecated alias align={align!r}")
    return align


def _collection_tree(collection: Collection, spec: PermutationSpec | None, chains: Any, refused: list[str]) -> Any:
    """``to_inference_data`` of a Collection: the dask-backed tree of
    :func:`pyro_symmetry.diagnostics.collections.to_inference_data` (its draws are the
    checkpoints' points, or the means of Gaussian checkpoints, read when computed)."""
    from ._collection_data import to_inference_data as lazy_tree

    if refused:
        raise ValueError(
            f"to_inference_data of a Collection does not take {', '.join(refused)}: its draws are the "
            "checkpoints themselves, read lazily. Remove the symmetry out of core first "
            "(coll.align(reference, out_dir).collection(spec), or coll.canonicalize(out_dir)), and compute "
            "predictive quantities with ps.diagnostics.collections.predictive"
        )
    if spec is not None and spec.groups != collection.spec.groups:
        raise SpecError(f"spec {spec!r} is not the collection's spec {collection.spec!r}")
    return lazy_tree(collection, chains=chains)
