"""The driver side of a transform: plan, resume, submit in batches, record, summarize.

The driver holds no checkpoint: it plans which outputs are missing (the manifest says
which are complete), submits batches of ``(index, source, output, input stat)`` items, and
appends the small records the workers send back. A streaming barycenter holds one
float64 running sum of the aligned checkpoints (plus at most ``max_in_flight`` partial
sums coming back from workers).
"""

from __future__ import annotations

import hashlib
import json
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

from ._executor import default_workers, run_tasks
from ._formats import Checkpoint, MemorySource, dumps
from ._store import MANIFEST, REFERENCE, Manifest, write_atomic
from ._tasks import Job, RefFile, run_barycenter_batch, run_batch

__all__ = [
    "Plan",
    "TransformError",
    "TransformSummary",
    "fingerprint",
    "jsonable",
    "run_transform",
    "streaming_barycenter",
]


@dataclass(frozen=True)
class TransformSummary:
    """What a transform call did.

    Attributes
    ----------
    operation : str
        ``"align"``, ``"canonicalize"`` or ``"map"``.
    out_dir : str
    processed, skipped, failed : int
        Checkpoints transformed by this call, found complete from an earlier run of the
        same call (not redone), and failed.
    failures : dict ``input name -> error text``
    outputs : tuple of str
        Paths of the complete outputs (processed or skipped), in collection order.
    reference : str or None
        The reference file the checkpoints were aligned to (in ``out_dir``).
    seconds : float
        Wall time of the call.
    """

    operation: str
    out_dir: str
    processed: int
    skipped: int
    failed: int
    failures: dict[str, str]
    outputs: tuple[str, ...]
    reference: str | None
    seconds: float

    def __repr__(self) -> str:
        head = (
            f"TransformSummary({self.operation} -> {self.out_dir}: {self.processed} processed, "
            f"{self.skipped} skipped (already complete), {self.failed} failed, {self.seconds:.1f} s)"
        )
        lines = [head] + [f"  failed: {name}: {err}" for name, err in list(self.failures.items())[:10]]
        if len(self.failures) > 10:
            lines.append(f"  ... and {len(self.failures) - 10} more (see {Path(self.out_dir) / MANIFEST})")
        return "\n".join(lines)

    @property
    def manifest(self) -> str:
        return str(Path(self.out_dir) / MANIFEST)

    def collection(self, spec: Any, **kwargs: Any) -> Any:
        """The complete outputs as a lazy collection (``from_files(summary.outputs, spec)``)."""
        from .collection import from_files

        return from_files(list(self.outputs), spec, **kwargs)

    def records(self) -> Iterator[dict[str, Any]]:
        """The last manifest record of every output (permutation, hash, status, error), streamed."""
        last: dict[str, int] = {}
        with open(self.manifest, encoding="utf-8") as f:
            for i, line in enumerate(f):
                if '"kind":"entry"' in line:
                    last[json.loads(line)["output"]] = i
        keep = set(last.values())
        with open(self.manifest, encoding="utf-8") as f:
            for i, line in enumerate(f):
                if i in keep:
                    yield json.loads(line)


class TransformError(ValueError):
    """Some checkpoints failed (``on_error="raise"``); every other result was written.

    Attributes
    ----------
    summary : TransformSummary
    """

    def __init__(self, summary: TransformSummary) -> None:
        names = ", ".join(f"{k} ({v})" for k, v in list(summary.failures.items())[:3])
        super().__init__(
            f"{summary.failed} checkpoint(s) failed in {summary.operation}: {names}"
            f"{' ...' if summary.failed > 3 else ''}; the {summary.processed + summary.skipped} others are in "
            f"{summary.out_dir} (on_error='skip' returns the summary instead of raising)"
        )
        self.summary = summary


def jsonable(x: Any) -> Any:
    if isinstance(x, dict):
        return {str(k): jsonable(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [jsonable(v) for v in x]
    if x is None or isinstance(x, (bool, int, float, str)):
        return x
    if callable(x):
        return f"{getattr(x, '__module__', '?')}.{getattr(x, '__qualname__', type(x).__name__)}"
    return repr(x)


def fingerprint(operation: str, spec: Any, options: dict, reference: Any) -> str:
    """sha256 of everything that defines a call's results (not the list of inputs: a
    collection that grows is resumed, each output checked against its own input)."""
    desc = {"operation": operation, "spec": repr(sorted(spec.groups.items())), "shapes": jsonable(spec.shapes),
            "options": jsonable(options), "reference": jsonable(reference)}  # fmt: skip
    return hashlib.sha256(json.dumps(desc, sort_keys=True).encode()).hexdigest()


@dataclass
class Plan:
    """How to run one call: executor, batching, threads, progress."""

    executor: Any = None
    batch_size: int | None = None
    max_in_flight: int | None = None
    num_threads: int | None = None
    progress: bool = True

    def resolved(self, n: int) -> tuple[int, int, int | None]:
        workers = default_workers(self.executor)
        if self.batch_size is not None:
            batch = self.batch_size
        else:  # in-process: one at a time (fine-grained progress); else a few tasks per worker
            batch = 1 if self.executor is None else max(1, min(8, -(-n // (4 * workers))))
        in_flight = self.max_in_flight if self.max_in_flight is not None else 2 * workers
        threads = self.num_threads if self.num_threads is not None or self.executor is None else 1
        return batch, in_flight, threads


def _shippable(source: Any, executor: Any) -> Any:
    return source.materialized() if executor is not None and isinstance(source, MemorySource) else source


def _batches(items: Sequence[Any], size: int, executor: Any) -> Iterator[list]:
    for a in range(0, len(items), size):
        yield [(i, _shippable(src, executor), out, stat) for i, src, out, stat in items[a : a + size]]


def write_reference(manifest: Manifest, ck: Checkpoint, final: bool) -> RefFile:
    """Write a reference into ``out_dir`` (claimed in the manifest first)."""
    if manifest.reference is None:
        manifest.append([{"kind": "reference", "status": "pending"}])
    data = dumps(ck.posterior, "the reference")
    write_atomic(manifest.out_dir, REFERENCE, data)
    sha = hashlib.sha256(data).hexdigest()
    if final:
        manifest.append([{"kind": "reference", "status": "done", "sha256": sha}])
    return RefFile(str(manifest.out_dir / REFERENCE), sha)


def run_transform(
    collection: Any,
    job: Job,
    manifest: Manifest,
    plan: Plan,
    outputs: Sequence[str],
    reference: str | None,
    on_error: str,
) -> TransformSummary:
    """Run ``job`` on every checkpoint whose output is not complete; see :class:`TransformSummary`."""
    t0 = time.perf_counter()
    out_dir = manifest.out_dir
    todo, done_outputs = [], {}
    for i, (src, out) in enumerate(zip(collection.sources, outputs)):
        stat = src.stat()
        if manifest.complete(out, stat):
            done_outputs[i] = str(out_dir / out)
        else:
            todo.append((i, src, out, stat))
    skipped = len(done_outputs)
    batch, in_flight, threads = plan.resolved(len(todo))
    job = Job(job.kind, job.spec, job.signature, str(out_dir), job.reference, job.options, job.fn, threads)
    manifest.append({"kind": "entry", "index": i, "input": src.name, "output": out, "status": "pending",
                     "input_stat": stat} for i, src, out, stat in todo)  # fmt: skip
    failures: dict[str, str] = {}
    bar = tqdm(total=len(outputs), initial=skipped, desc=job.kind, unit="ckpt", disable=not plan.progress)

    def on_result(items: list, records: list[dict]) -> None:
        manifest.append(records)
        for r in records:
            if r["status"] == "done":
                done_outputs[r["index"]] = str(out_dir / r["output"])
            else:
                failures[r["input"]] = r["error"]
        bar.update(len(items))

    def on_task_error(items: list, exc: BaseException) -> None:
        err = f"the task failed: {type(exc).__name__}: {exc}"
        on_result(items, [{"kind": "entry", "index": i, "input": src.name, "output": out, "status": "failed",
                           "input_stat": stat, "error": err} for i, src, out, stat in items])  # fmt: skip

    try:
        run_tasks(run_batch, (job,), _batches(todo, batch, plan.executor), plan.executor, in_flight, on_result,
                  on_task_error)  # fmt: skip
    finally:
        bar.close()
        manifest.close()
    summary = TransformSummary(
        job.kind, str(out_dir), len(todo) - len(failures), skipped, len(failures), failures,
        tuple(done_outputs[i] for i in sorted(done_outputs)), reference, time.perf_counter() - t0,
    )  # fmt: skip
    if failures and on_error == "raise":
        raise TransformError(summary)
    return summary


def _mean(collection: Any, first: Checkpoint, sums: dict[str, torch.Tensor], count: int) -> Checkpoint:
    """The barycenter: float64 sums over ``count`` in each site's dtype; integer sites (e.g.
    BatchNorm's ``num_batches_tracked``) from ``first``, as ``align_many`` keeps them."""

    def part(what: str, values: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        return {k: (sums[f"{what}:{k}"] / count).to(v.dtype) if f"{what}:{k}" in sums else v
                for k, v in values.items()}  # fmt: skip

    scales = None if first.scales is None else part("scale", first.scales)
    return Checkpoint("barycenter", part("loc", first.params), scales)


def streaming_barycenter(
    collection: Any,
    first: Checkpoint,
    options: dict[str, Any],
    max_iters: int,
    plan: Plan,
    store: Callable[[Checkpoint], Any] | None = None,
) -> tuple[Checkpoint, int, bool, dict[str, str]]:
    """Iterated barycenter of the aligned checkpoints, one streaming pass per iteration.

    As in ``align_many(reference="barycenter")``: align every checkpoint to ``first``, take
    the mean of the aligned checkpoints, re-align to it, until no permutation changes (or
    ``max_iters`` passes). ``store(reference)`` makes the reference workers read (a file
    handle in ``out_dir``); by default it is shipped with each task.

    Returns ``(barycenter, passes, stable, failures)``.
    """
    sig = collection.signature
    items = [(i, src, None, None) for i, src in enumerate(collection.sources)]
    batch, in_flight, threads = plan.resolved(len(items))
    if plan.batch_size is None and plan.executor is not None:
        batch = max(batch, -(-len(items) // (2 * in_flight)))  # partial sums are model-sized: fewer, larger tasks
    ref, prev, stable, failures, passes = first, None, False, {}, 0
    for passes in range(1, max_iters + 1):  # noqa: B007  (returned)
        handle = store(ref) if store is not None else ref
        job = Job("mean", collection.spec, sig, None, handle, options, None, threads)
        acc: dict[str, Any] = {"sums": {}, "count": 0, "digests": {}}
        failures = {}
        bar = tqdm(total=len(items), desc=f"barycenter pass {passes}", unit="ckpt", disable=not plan.progress)

        def on_result(b: list, res: dict, acc: dict = acc, bar: Any = bar, failures: dict = failures) -> None:
            for k, v in res["sums"].items():
                acc["sums"][k] = v if k not in acc["sums"] else acc["sums"][k] + v
            acc["count"] += res["count"]
            acc["digests"].update(res["digests"])
            failures.update(res["failed"])
            bar.update(len(b))

        def on_error(b: list, exc: BaseException, failures: dict = failures, bar: Any = bar) -> None:
            failures.update({src.name: f"the task failed: {type(exc).__name__}: {exc}" for _, src, _, _ in b})
            bar.update(len(b))

        try:
            run_tasks(run_barycenter_batch, (job,), _batches(items, batch, plan.executor), plan.executor, in_flight,
                      on_result, on_error)  # fmt: skip
        finally:
            bar.close()
        if failures and collection.on_error == "raise":
            name, err = next(iter(failures.items()))
            raise ValueError(f"{len(failures)} checkpoint(s) failed in the barycenter pass, e.g. {name}: {err}")
        if acc["count"] == 0:
            raise ValueError("no checkpoint could be aligned: the barycenter is undefined")
        ref = _mean(collection, first, acc["sums"], acc["count"])
        stable = prev is not None and acc["digests"] == prev
        prev = acc["digests"]
        if stable:
            break
    return ref, passes, stable, failures
