"""The symmetry report of a checkpoint collection, from streamed computations only.

A :class:`~pyro_symmetry.collections.Collection` (or the dask-backed ArviZ tree
:func:`~pyro_symmetry.diagnostics.collections.to_inference_data` makes of one) may not fit in
memory, so its report never holds every draw at once:

* R-hat/ESS with the vectorized kernel a block of weights at a time
  (:func:`~pyro_symmetry.diagnostics.collections.rhat_ess`), before and, when an aligned or
  canonical copy of the collection is passed as ``after=`` (``collection.align(...)`` /
  ``collection.canonicalize(...)`` write one), after;
* posterior means and variances, streamed (Welford's updates / dask reductions);
* MMD between chains 0 and 1 (and between the same checkpoints of ``after``), streamed
  (:func:`~pyro_symmetry.diagnostics.collections.mmd`), for a Collection.

Sections that need the draws in memory or a model (alignment of the draws themselves, loss
barriers, ``I(g; w)``, the marginal and rank figures) are skipped with a note saying why.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from ..collections import Collection
from ..groups import SpecError
from . import _report_parts as parts
from ._collection_data import chain_groups, posterior_moments, rhat_ess
from ._collection_mmd import mmd as collection_mmd
from ._layout import layer_groups, layer_of
from .convergence import ConvergenceComparison

__all__ = ["is_streamed", "moments_table", "streamed_sections"]

SKIPPED = (
    "Loss barriers and I(g; w) need a model or variational runs (guides, (loc, scale) mappings); a checkpoint "
    "collection holds points only: skipped.",
    "The marginal and rank figures need every draw in memory: skipped for a checkpoint collection (the R-hat "
    "histogram is drawn when after= is given).",
)
NO_AFTER = (
    "R-hat/ESS after alignment: not computed (the report does not load the checkpoints to align them). Write an "
    "aligned copy with collection.align(reference, out_dir) (or collection.canonicalize(out_dir)), reopen it with "
    "ps.collections.from_files and pass it as after= to fill the 'after' columns."
)


def is_streamed(runs: Any) -> bool:
    """A Collection, or an ArviZ tree whose posterior variables are dask arrays."""
    if isinstance(runs, Collection):
        return True
    children = getattr(runs, "children", None)
    if children is None or "posterior" not in children:
        return False
    post = runs["posterior"]
    return any(type(v.data).__module__.startswith("dask") for v in post.data_vars.values())


def _sites(data: Any) -> dict[str, tuple[int, ...]]:
    if isinstance(data, Collection):
        sig = data.signature
        return {s: tuple(sig.shapes[s]) for s in sig.shapes if sig.dtypes[s].is_floating_point}
    post = data["posterior"]
    return {v: tuple(post[v].shape[2:]) for v in post.data_vars}


def _check_after(before: Any, after: Any) -> None:
    if after is None:
        return
    if not is_streamed(after):
        raise TypeError(
            f"after must be a Collection or a dask-backed DataTree like the runs, got {type(after).__name__}"
        )
    if isinstance(before, Collection) != isinstance(after, Collection):
        raise TypeError("after must be of the same kind as the runs (both Collections or both DataTrees)")
    a, b = _sites(before), _sites(after)
    if a != b:
        raise SpecError(f"after has sites/shapes {b}, the runs {a}: pass the aligned copy of the same collection")
    if isinstance(before, Collection) and len(before) != len(after):
        raise ValueError(f"after has {len(after)} checkpoints, the runs {len(before)}: they must correspond one to one")


def _mmd(before: Any, after: Any, groups: list, layers: list[str], options: dict, notes: list[str]) -> dict:
    """``layer -> (before, after or None)`` CollectionMMDs of chain 0 vs chain 1."""
    if not isinstance(before, Collection):
        notes.append(
            "MMD streams over checkpoint files: pass the Collection itself (not its DataTree) for the MMD columns; "
            "skipped."
        )
        return {}
    sites = list(_sites(before))
    kw = {"num_permutations": options["mmd_permutations"], "seed": options["seed"], "max_bytes": options["max_bytes"]}
    out = {}
    try:
        for layer in [*layers, "all"]:
            use = [s for s in sites if layer == "all" or layer_of(s) == layer]
            pair = [
                collection_mmd(c[groups[0]], c[groups[1]], sites=use, **kw) if c is not None else None
                for c in (before, after)
            ]
            out[layer] = tuple(pair)
    except Exception as e:  # noqa: BLE001 - keep the other sections
        notes.append(parts.failure("MMD", e))
        return {}
    return out


def moments_table(moments: dict[str, dict], layers: list[str]) -> list[list[str]]:
    """Per layer: mean |posterior mean| and median posterior sd, before (and after) alignment."""
    head = ["layer", "mean |posterior mean|", "median posterior sd"]
    labels = list(moments)
    if len(labels) > 1:
        head = ["layer"] + [f"{h} ({lab})" for lab in labels for h in head[1:]]
    body = []
    for layer in [*layers, "all"]:
        row = [layer]
        for lab in labels:
            means = [np.ravel(m) for s, (m, _) in moments[lab].items() if layer == "all" or layer_of(s) == layer]
            var = [np.ravel(v) for s, (_, v) in moments[lab].items() if layer == "all" or layer_of(s) == layer]
            m, v = np.concatenate(means), np.concatenate(var)
            row += [f"{np.mean(np.abs(m)):.4g}", f"{np.median(np.sqrt(v)):.4g}"]
        body.append(row)
    return [head] + body


def streamed_sections(runs: Any, spec: Any, chains: Any, after: Any, options: dict) -> dict[str, Any]:
    """Everything :func:`~pyro_symmetry.diagnostics.symmetry_report` shows for a collection.

    ``options``: ``seed``, ``mmd_permutations``, ``max_bytes``, ``progress``. Returns the
    report's fields: ``rows``, ``convergence`` (``draws_before``/``draws_after`` None: the
    draws stay in their files), ``mmd``, ``moments``, ``info``, ``notes``.
    """
    if spec is None:
        spec = getattr(runs, "spec", None)
    if spec is None:
        raise SpecError("symmetry_report needs a spec (pass spec=... or a Collection, which carries one)")
    if chains is not None and not isinstance(runs, Collection):
        raise ValueError("chains= applies to a Collection; a DataTree already has its chains")
    _check_after(runs, after)
    kw = {"max_bytes": options["max_bytes"], "progress": options["progress"]}
    ckw = {"chains": chains} if isinstance(runs, Collection) else {}
    before = rhat_ess(runs, **ckw, **kw)
    if before.num_chains < 2:
        raise ValueError(f"symmetry_report needs >= 2 chains, got {before.num_chains} (pass chains=)")
    notes: list[str] = []
    conv = ConvergenceComparison(before, rhat_ess(after, **ckw, **kw) if after is not None else None, None, None)
    if after is None:
        notes.append(NO_AFTER)
    notes += parts.degenerate_notes(conv)
    moments = {"before": posterior_moments(runs, **ckw)}
    if after is not None:
        moments["after"] = posterior_moments(after, **ckw)
    shapes = _sites(runs)
    layers = list(layer_groups(spec, list(shapes)))
    groups = chain_groups(runs, chains) if isinstance(runs, Collection) else []
    mmd_results = _mmd(runs, after, groups, layers, options, notes)
    notes += list(SKIPPED)
    rows = parts.rows(spec, conv, {}, mmd_results, [], shapes)
    info = {
        "runs": f"{before.num_chains} chains of a checkpoint collection",
        "draws per run": before.num_draws,
        "weights": rows[-1]["num_weights"],
        "log|G|": f"{spec.log_order:.2f}",
        "alignment": "after= (an aligned copy of the collection)" if after is not None else "none (see notes)",
        "computation": "streamed: R-hat/ESS a block of weights at a time, moments and MMD over the files",
    }
    if mmd_results:
        info["MMD"] = "chains 0 vs 1, Gaussian kernel" + (", after: the same checkpoints of after=" if after else "")
    return {"rows": rows, "convergence": conv, "mmd": mmd_results, "moments": moments, "info": info, "notes": notes}
