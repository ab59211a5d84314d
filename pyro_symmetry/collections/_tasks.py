"""What a worker does with a batch of checkpoints: read, transform, write, report.

Every function here is top level (picklable) and takes paths (or small in-memory runs),
never the collection: a worker reads each checkpoint itself, holds one (plus its result)
at a time, writes the result atomically next to the others, and sends back only a small
record (output hash, permutation as lists, status, error text). One checkpoint that
fails is recorded as failed; the rest of the batch goes on.
"""

from __future__ import annotations

import hashlib
import io
import os
import socket
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from .._state import isolated
from ..groups import PermutationSpec
from ._formats import Checkpoint, CheckpointError, Signature, dumps, parse
from ._store import write_atomic

__all__ = ["Job", "RefFile", "load_reference", "run_barycenter_batch", "run_batch", "transform"]


@dataclass(frozen=True)
class RefFile:
    """A reference checkpoint stored in a file of known sha256 (read once per worker process)."""

    path: str
    sha256: str


@dataclass(frozen=True)
class Job:
    """One transform, as shipped to workers.

    ``kind`` is ``"align"``, ``"canonicalize"``, ``"map"`` or ``"mean"`` (a barycenter
    pass, :func:`run_barycenter_batch`); ``reference`` a :class:`RefFile`, an in-memory
    :class:`Checkpoint` or ``None``; ``options`` the keyword arguments of the in-memory
    function (``ps.align`` / ``ps.canonicalize``).
    """

    kind: str
    spec: PermutationSpec
    signature: Signature
    out_dir: str | None = None
    reference: Any = None
    options: dict[str, Any] = field(default_factory=dict)
    fn: Callable | None = None
    num_threads: int | None = None


_REF_CACHE: dict[tuple[str, str], Checkpoint] = {}


def load_reference(ref: Any) -> Checkpoint | None:
    """The reference checkpoint; a file is read and its hash checked once per process."""
    if ref is None or isinstance(ref, Checkpoint):
        return ref
    key = (ref.path, ref.sha256)
    if key not in _REF_CACHE:
        with open(ref.path, "rb") as f:
            data = f.read()
        if hashlib.sha256(data).hexdigest() != ref.sha256:
            raise CheckpointError(ref.path, "the reference file changed while the call was running")
        obj = torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
        _REF_CACHE.clear()  # one reference per process at a time: memory stays bounded
        _REF_CACHE[key] = parse(obj, None, ref.path)
    return _REF_CACHE[key]


def _perm_lists(perm: Mapping[str, torch.Tensor]) -> dict[str, list]:
    return {g: p.tolist() for g, p in perm.items()}


def _canonical(spec: PermutationSpec, ck: Checkpoint, options: Mapping[str, Any], ref: Any) -> tuple[Any, dict]:
    """``ps.canonicalize`` of the point (the means); a Gaussian's scales follow without sign flips."""
    from ..alignment.inputs import unsigned
    from ..scaling import canonicalize, rescale

    cf = canonicalize(ck.params, spec, reference=ref, **options)
    info = {"permutation": _perm_lists(cf.permutation), "signs": {g: s.int().tolist() for g, s in cf.signs.items()}}
    if ck.scales is None:
        return cf.params, info
    scales = rescale(ck.scales, spec, cf.log_scales) if cf.log_scales else dict(ck.scales)
    scales = spec.apply(scales, unsigned(cf.permutation))
    return {k: (v, scales[k]) for k, v in cf.params.items()}, info


def transform(job: Job, ck: Checkpoint) -> tuple[Any, dict[str, Any]]:
    """``(result posterior, record fields)`` of one checkpoint: exactly the in-memory call."""
    if job.kind == "align":
        from ..alignment import align

        ref = load_reference(job.reference)
        res = align(ref.posterior, ck.posterior, job.spec, **job.options)
        info = {"permutation": _perm_lists(res.permutation), "objective": res.objective[-1],
                "converged": res.converged, "sweeps": res.sweeps}  # fmt: skip
        return res.aligned, info
    if job.kind == "canonicalize":
        ref = load_reference(job.reference)
        return _canonical(job.spec, ck, job.options, None if ref is None else ref.params)
    if job.kind == "map":
        return job.fn(ck.posterior), {}
    raise ValueError(f"unknown job kind {job.kind!r}")


def _where() -> str:
    return f"{socket.gethostname()}:{os.getpid()}"


def _one(job: Job, item: Sequence[Any]) -> dict[str, Any]:
    index, source, output, stat = item
    t0 = time.perf_counter()
    rec: dict[str, Any] = {"kind": "entry", "index": index, "input": source.name, "output": output,
                           "input_stat": stat}  # fmt: skip
    try:
        ck = job.signature.check(source.read())
        result, info = transform(job, ck)
        data = dumps(result, f"the result of {job.kind} for {source.name}")
        write_atomic(job.out_dir, output, data)
        rec.update(status="done", sha256=hashlib.sha256(data).hexdigest(), bytes=len(data), **info)
    except Exception as e:  # noqa: BLE001  (recorded: one bad checkpoint never loses the others)
        rec.update(status="failed", error=f"{type(e).__name__}: {e}")
    rec.update(seconds=round(time.perf_counter() - t0, 4), worker=_where())
    return rec


def run_batch(job: Job, items: Sequence[Sequence[Any]]) -> list[dict[str, Any]]:
    """Transform every item ``(index, source, output name, input stat)``; one record each."""
    with isolated(param_store=False):
        if job.num_threads is not None:
            torch.set_num_threads(job.num_threads)
        return [_one(job, item) for item in items]


def _split(ck: Checkpoint, result: Mapping[str, Any]) -> Checkpoint:
    if ck.scales is None:
        return Checkpoint(ck.name, dict(result))
    return Checkpoint(ck.name, {k: v[0] for k, v in result.items()}, {k: v[1] for k, v in result.items()})


def _aligned_for_mean(job: Job, ck: Checkpoint) -> tuple[Checkpoint, dict[str, torch.Tensor]]:
    """``ck`` moved onto the reference (after its scaling step, for a canonical barycenter).

    ``job.options``: ``{"prepare": canonicalize options or None, "align": ps.align options}``.
    """
    from ..alignment import align

    spec, prepare = job.spec, job.options.get("prepare")
    if prepare is not None:  # min-mass / sign convention first; then only permutations remain
        ck = _split(ck, _canonical(spec, ck, {**prepare, "permutation": None}, None)[0])
        if prepare.get("scaling", True):
            spec = spec.without_signs()
    ref = load_reference(job.reference)
    res = align(ref.posterior, ck.posterior, spec, **job.options["align"])
    return _split(ck, res.aligned), res.permutation


def run_barycenter_batch(job: Job, items: Sequence[Sequence[Any]]) -> dict[str, Any]:
    """Float64 sums of the aligned checkpoints of a batch, their count, and a digest of each
    one's permutation (to tell whether any permutation changed since the last pass)."""
    sums: dict[str, torch.Tensor] = {}
    count, digests, failed = 0, {}, {}
    with isolated(param_store=False):
        if job.num_threads is not None:
            torch.set_num_threads(job.num_threads)
        for index, source, _, _ in items:
            try:
                ck = job.signature.check(source.read())
                moved, perm = _aligned_for_mean(job, ck)
            except Exception as e:  # noqa: BLE001
                failed[source.name] = f"{type(e).__name__}: {e}"
                continue
            parts = [("loc", moved.params)] + ([("scale", moved.scales)] if moved.scales is not None else [])
            for what, part in parts:
                for k, v in part.items():
                    if v.is_floating_point():
                        key = f"{what}:{k}"
                        sums[key] = v.double() if key not in sums else sums[key] + v.double()
            h = hashlib.sha1()
            for g in sorted(perm):
                h.update(perm[g].contiguous().numpy().tobytes())
            digests[index] = h.hexdigest()
            count += 1
    return {"sums": sums, "count": count, "digests": digests, "failed": failed}
