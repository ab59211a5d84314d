"""Per-checkpoint transforms of a collection, resumable, on any executor.

Each function applies the in-memory function of the package to every checkpoint, one at a
time, so every output equals (bit for bit) what that function returns on the checkpoint
loaded by itself, with the same options and seed:

* :func:`align`: ``ps.align(reference, checkpoint, spec, ...).aligned`` (Git Re-Basin
  weight matching, or W2 matching of Gaussian posteriors; Ainsworth et al. 2023, Rossi
  et al. 2023);
* :func:`canonicalize`: ``ps.canonicalize(checkpoint, spec, reference=..., ...).params``
  (minimum-mass scaling or a sign convention, then sorting or alignment; Laurent, Aldea,
  Franchi, ICLR 2024);
* :func:`map_collection`: ``fn(checkpoint)``.

The reference is resolved once, before any checkpoint is transformed, written into
``out_dir`` as ``_reference.pt`` and read by the workers. ``"barycenter"`` is computed by
streaming passes (:func:`barycenter`) and reused when the call is resumed.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any, NamedTuple

from .._validation import check_int, check_seed
from ._driver import Plan, TransformSummary, fingerprint, jsonable, run_transform, streaming_barycenter, write_reference
from ._executor import check_executor
from ._formats import Checkpoint
from ._store import REFERENCE, Manifest
from ._tasks import Job, RefFile

__all__ = ["Barycenter", "align", "barycenter", "canonicalize", "map_collection"]


class Barycenter(NamedTuple):
    """Result of :func:`barycenter`.

    Attributes
    ----------
    params : dict ``site -> Tensor`` or ``site -> (loc, scale)``
        The mean of the aligned checkpoints (for Gaussians: mean of the means and of the
        standard deviations, the W2 barycenter), in the collection's dtypes.
    passes : int
        Streaming passes over the collection.
    converged : bool
        The last pass changed no checkpoint's permutation.
    failures : dict ``name -> error``
        Checkpoints left out (``on_error="skip"``).
    """

    params: dict[str, Any]
    passes: int
    converged: bool
    failures: dict[str, str]


def _plan(executor: Any, batch_size: Any, max_in_flight: Any, num_threads: Any, progress: bool) -> Plan:
    check_executor(executor)
    for name, v in (("batch_size", batch_size), ("max_in_flight", max_in_flight), ("num_threads", num_threads)):
        if v is not None:
            check_int(name, v, minimum=1)
    return Plan(executor, batch_size, max_in_flight, num_threads, bool(progress))


def _open(collection: Any, operation: str, out_dir: Any, options: dict, ref_key: Any, outputs: list[str]) -> Manifest:
    """The call's manifest in ``out_dir``; refuses files of ``out_dir`` it would overwrite but did not create."""
    if not isinstance(out_dir, (str, os.PathLike)):
        raise TypeError(f"out_dir must be a directory path, got {type(out_dir).__name__}")
    fp = fingerprint(operation, collection.spec, options, ref_key)
    manifest = Manifest.open(out_dir, operation, fp, jsonable({**options, "reference": ref_key}))
    taken = manifest.foreign([*outputs, *([REFERENCE] if ref_key is not None else [])])
    if taken:
        manifest.close()
        raise FileExistsError(
            f"{out_dir} already holds {len(taken)} file(s) this call would write but did not create, e.g. "
            f"{taken[:3]}; use an empty out_dir (nothing is overwritten that the call did not create)"
        )
    manifest.remove_stale_temporaries()
    return manifest


def _reference_file(manifest: Manifest, compute: Callable[[Callable], Checkpoint]) -> RefFile:
    """The call's reference file: reused when an earlier run of the call finished it."""
    sha = manifest.reference_ready()
    if sha is not None:
        return RefFile(str(manifest.out_dir / REFERENCE), sha)
    return write_reference(manifest, compute(lambda ck: write_reference(manifest, ck, final=False)), final=True)


def _align_options(method: str, seed: Any, signs: Any, max_sweeps: Any, init: Any, compute_dtype: Any) -> dict:
    from ..alignment.inputs import check_options

    check_options(max_sweeps, seed, compute_dtype, signs)
    if method not in ("weights", "wasserstein"):
        raise ValueError(f"method must be 'weights' or 'wasserstein', got {method!r}")
    return {"method": method, "max_sweeps": max_sweeps, "seed": seed, "signs": signs, "init": init,
            "compute_dtype": compute_dtype}  # fmt: skip


def barycenter(
    collection: Any,
    *,
    method: str = "weights",
    seed: int | None = 0,
    signs: bool = True,
    max_sweeps: int = 100,
    max_iters: int = 5,
    executor: Any = None,
    batch_size: int | None = None,
    max_in_flight: int | None = None,
    num_threads: int | None = None,
    progress: bool = True,
) -> Barycenter:
    """Barycenter of the aligned checkpoints, by streaming passes (bounded memory).

    As ``ps.align_many(..., reference="barycenter")``: align every checkpoint to the first
    one, average, re-align to the average, ... until no permutation changes or
    ``max_iters`` passes. Each pass reads every checkpoint once; the driver keeps one
    float64 running sum (plus ``max_in_flight`` partial sums from workers). The result
    matches the in-memory loop to float64 rounding (the summation order of partial sums
    follows task completion on an executor).

    Parameters
    ----------
    collection : Collection
    method, seed, signs, max_sweeps
        As in :func:`ps.align <pyro_symmetry.alignment.align>` (``seed=0`` by default, so
        that passes are reproducible).
    max_iters : int
        Cap on passes.
    executor, batch_size, max_in_flight, num_threads, progress
        See :func:`align`.

    Returns
    -------
    Barycenter
    """
    check_int("max_iters", max_iters, minimum=1)
    opts = _align_options(method, seed, signs, max_sweeps, "greedy", None)
    plan = _plan(executor, batch_size, max_in_flight, num_threads, progress)
    ref, passes, stable, failures = streaming_barycenter(
        collection, collection._first(), {"prepare": None, "align": opts}, max_iters, plan
    )
    return Barycenter(ref.posterior, passes, stable, failures)


def align(
    collection: Any,
    reference: Any,
    out_dir: str | os.PathLike,
    *,
    method: str = "weights",
    seed: int | None = 0,
    signs: bool = True,
    max_sweeps: int = 100,
    init: str | Mapping = "greedy",
    compute_dtype: Any = None,
    max_iters: int = 5,
    executor: Any = None,
    batch_size: int | None = None,
    max_in_flight: int | None = None,
    num_threads: int | None = None,
    progress: bool = True,
) -> TransformSummary:
    """Align every checkpoint to a reference: ``ps.align(reference, checkpoint, spec, ...)``.

    Parameters
    ----------
    collection : Collection
    reference : "barycenter", int, path or mapping
        ``"barycenter"`` (computed by :func:`barycenter` with ``max_iters`` streaming
        passes; reused when the call resumes), the index of a checkpoint, a file (read like
        the collection's files) or a mapping ``site -> tensor`` / ``site -> (loc, scale)``.
    out_dir : path
        Receives one file per checkpoint (the input's name, ``.pt``; the aligned point, or
        ``{"loc", "scale"}`` for Gaussian checkpoints; sites the spec does not touch
        copied), ``_reference.pt`` and ``_manifest.jsonl`` (per output: sha256, permutation
        as lists, objective, status, error). Re-running the same call skips complete
        outputs; a different call into the same ``out_dir`` is refused.
    method : {"weights", "wasserstein"}
        Weight matching of the points (or Gaussian means), or W2 matching of Gaussian
        checkpoints (means and standard deviations).
    seed, signs, max_sweeps, init, compute_dtype
        As in :func:`ps.align <pyro_symmetry.alignment.align>`; ``seed=0`` by default.
    max_iters : int
        Barycenter passes (``reference="barycenter"`` only).
    executor : optional
        ``None``: in-process, one checkpoint at a time. Anything with ``submit(fn, *args)``
        (a ``concurrent.futures`` executor, a ``dask.distributed.Client``): batches of
        checkpoint *paths* are submitted; workers read, align and write the files
        themselves and send back small records only.
    batch_size : int, optional
        Checkpoints per task (default: 1 in-process; on an executor a few tasks per worker,
        at most 8 checkpoints each). A worker holds one checkpoint (and its result) at a time.
    max_in_flight : int, optional
        Tasks submitted at once (default twice the executor's workers): bounds what the
        driver and the scheduler hold.
    num_threads : int, optional
        torch threads inside each task (default: unchanged in-process, 1 on an executor).
    progress : bool
        A progress bar over checkpoints.

    Returns
    -------
    TransformSummary
        Counts processed / skipped / failed, the failed names with their errors, the output
        paths (``summary.collection(spec)`` reads them as a collection).

    Raises
    ------
    TransformError
        With ``on_error="raise"``, after every other checkpoint was written, if some failed.
    FileExistsError
        ``out_dir`` holds files of the call's output names that the call did not create.
    """
    check_int("max_iters", max_iters, minimum=1)
    opts = _align_options(method, seed, signs, max_sweeps, init, compute_dtype)
    plan = _plan(executor, batch_size, max_in_flight, num_threads, progress)
    sig = collection.signature
    if method == "wasserstein" and not sig.gaussian:
        raise ValueError("method='wasserstein' needs Gaussian checkpoints (loc, scale); use method='weights'")
    ref_key = collection._reference_key(reference)
    outputs = collection._outputs()
    manifest = _open(collection, "align", out_dir, {**opts, "max_iters": max_iters}, ref_key, outputs)
    try:

        def compute(store: Callable) -> Checkpoint:
            if isinstance(reference, str) and reference == "barycenter":
                first = collection._first()
                mean_opts = {"prepare": None, "align": opts}
                return streaming_barycenter(collection, first, mean_opts, max_iters, plan, store)[0]
            return collection._resolve_reference(reference)

        ref = _reference_file(manifest, compute)
        job = Job("align", collection.spec, sig, str(Path(out_dir)), ref, opts)
        return run_transform(collection, job, manifest, plan, outputs, ref.path, collection.on_error)
    finally:
        manifest.close()


def canonicalize(
    collection: Any,
    out_dir: str | os.PathLike,
    *,
    scaling: bool = True,
    permutation: str | None = "align",
    reference: Any = None,
    sort_key: Any = "incoming_norm",
    tol: float | None = None,
    max_iters: int = 10_000,
    seed: int | None = 0,
    max_sweeps: int = 100,
    barycenter_iters: int = 5,
    executor: Any = None,
    batch_size: int | None = None,
    max_in_flight: int | None = None,
    num_threads: int | None = None,
    progress: bool = True,
) -> TransformSummary:
    """Canonical form of every checkpoint: ``ps.canonicalize(checkpoint, spec, reference=R, ...)``.

    Parameters
    ----------
    collection : Collection
    out_dir : path
        As in :func:`align`.
    scaling, permutation, sort_key, tol, max_iters, seed, max_sweeps
        As in :func:`ps.canonicalize <pyro_symmetry.scaling.canonicalize>`.
    reference : None, "barycenter", int, path or mapping
        For ``permutation="align"``. ``None``: the first checkpoint in canonical scaling with
        its neurons sorted by ``sort_key`` (what ``ps.canonicalize`` does for a batch), so
        every checkpoint meets one canonical reference; ``"barycenter"``: the streaming
        barycenter (``barycenter_iters`` passes) of the checkpoints after their scaling
        step, aligned by weight matching; else a given network (see :func:`align`).
        ``ps.canonicalize`` puts a given reference in canonical scaling itself.
    barycenter_iters : int
    executor, batch_size, max_in_flight, num_threads, progress
        See :func:`align`.

    Returns
    -------
    TransformSummary
        Manifest records hold the permutation and sign flips applied. Gaussian checkpoints:
        the means are canonicalized; the scales follow the same rescaling and permutation.
    """
    from ..scaling import canonicalize as canon

    if permutation not in ("align", "sort", None):
        raise ValueError(f"permutation must be 'align', 'sort' or None, got {permutation!r}")
    if reference is not None and permutation != "align":
        raise ValueError("reference is only used with permutation='align'")
    if not isinstance(scaling, bool):
        raise TypeError(f"scaling must be a bool, got {scaling!r}")
    check_int("max_iters", max_iters, minimum=0)
    check_int("max_sweeps", max_sweeps, minimum=0)
    check_int("barycenter_iters", barycenter_iters, minimum=1)
    check_seed("seed", seed)
    plan = _plan(executor, batch_size, max_in_flight, num_threads, progress)
    sig, spec = collection.signature, collection.spec
    opts = {"scaling": scaling, "permutation": permutation, "sort_key": sort_key, "tol": tol, "max_iters": max_iters,
            "seed": seed, "max_sweeps": max_sweeps}  # fmt: skip
    ref_key = None if permutation != "align" else collection._reference_key(reference)
    outputs = collection._outputs()
    manifest = _open(collection, "canonicalize", out_dir, {**opts, "barycenter_iters": barycenter_iters}, ref_key,
                     outputs)  # fmt: skip
    try:

        def compute(store: Callable) -> Checkpoint:
            if reference is None:
                first = collection._first()
                sorted_first = canon(first.params, spec, scaling=scaling, permutation="sort", sort_key=sort_key,
                                     tol=tol, max_iters=max_iters).params  # fmt: skip
                return Checkpoint("reference", sorted_first)
            if isinstance(reference, str) and reference == "barycenter":
                from ._tasks import _canonical, _split

                first = collection._first()
                first = _split(first, _canonical(spec, first, {**opts, "permutation": None}, None)[0])
                mean_opts = {"prepare": opts, "align": {"method": "weights", "seed": seed, "max_sweeps": max_sweeps}}
                return streaming_barycenter(collection, first, mean_opts, barycenter_iters, plan, store)[0]
            return collection._resolve_reference(reference)

        ref = None if permutation != "align" else _reference_file(manifest, compute)
        job = Job("canonicalize", spec, sig, str(Path(out_dir)), ref, opts)
        return run_transform(collection, job, manifest, plan, outputs, ref and ref.path, collection.on_error)
    finally:
        manifest.close()


def map_collection(
    collection: Any,
    fn: Callable[[Any], Mapping[str, Any]],
    out_dir: str | os.PathLike,
    *,
    tag: str | None = None,
    executor: Any = None,
    batch_size: int | None = None,
    max_in_flight: int | None = None,
    num_threads: int | None = None,
    progress: bool = True,
) -> TransformSummary:
    """Apply ``fn`` to every checkpoint and write its result (resumable, on any executor).

    Parameters
    ----------
    collection : Collection
    fn : callable ``posterior -> mapping``
        Receives the checkpoint as ``site -> tensor`` (or ``site -> (loc, scale)`` for
        Gaussian checkpoints) and returns ``site -> tensor`` or ``site -> (loc, scale)``.
        On a process pool it must be picklable (Dask pickles closures too).
    out_dir : path
        As in :func:`align` (no reference file).
    tag : str, optional
        Calls are identified by ``fn``'s module and qualified name; give a tag to tell apart
        calls of one function with different captured parameters.
    executor, batch_size, max_in_flight, num_threads, progress
        See :func:`align`.

    Returns
    -------
    TransformSummary
    """
    if not callable(fn):
        raise TypeError(f"fn must be callable, got {type(fn).__name__}")
    plan = _plan(executor, batch_size, max_in_flight, num_threads, progress)
    sig = collection.signature
    outputs = collection._outputs()
    manifest = _open(collection, "map", out_dir, {"fn": fn, "tag": tag}, None, outputs)
    try:
        job = Job("map", collection.spec, sig, str(Path(out_dir)), None, {}, fn)
        return run_transform(collection, job, manifest, plan, outputs, None, collection.on_error)
    finally:
        manifest.close()
