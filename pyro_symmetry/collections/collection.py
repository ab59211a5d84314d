"""Lazy collections of checkpoints and their per-checkpoint transforms.

A :class:`Collection` is a list of *sources* (files, or in-memory runs) and a spec. It
holds no checkpoint: each one is read when touched (``collection[i]``, iteration, a
transform's worker), one at a time, and checked against the collection's *signature*
(sites, shapes, dtypes and form, taken from the first readable checkpoint and checked
against the spec). A file that cannot be read or does not fit is reported by name and,
per ``on_error``, refused (``"raise"``) or skipped with a warning (``"skip"``); it is never
silently mixed in.

Transforms (:meth:`Collection.align`, :meth:`Collection.canonicalize`,
:meth:`Collection.map`) apply the in-memory function (``ps.align``, ``ps.canonicalize``, a
user function) to every checkpoint, in-process or on an executor, and write each result
atomically into ``out_dir`` with a manifest, so that an interrupted call resumes where it
stopped (see :mod:`pyro_symmetry.collections._store`).
"""

from __future__ import annotations

import glob
import hashlib
import json
import os
import re
import warnings
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch

from .._validation import check_spec
from ..groups import PermutationSpec, SpecError
from ._driver import TransformSummary
from ._formats import Checkpoint, CheckpointError, FileSource, MemorySource, Signature, dumps
from ._store import MANIFEST, REFERENCE

__all__ = ["Collection", "from_files", "from_runs"]

_ON_ERROR = ("raise", "skip")
_SUFFIXES = (".pt", ".pth", ".ckpt", ".bin", ".safetensors")


def _natural(s: str) -> list:
    """Sort key reading digit runs as numbers: ``ckpt_2`` before ``ckpt_10``."""
    return [int(t) if t.isdigit() else t for t in re.split(r"(\d+)", s)]


class Collection:
    """Checkpoints of one network (files or in-memory runs), read lazily.

    Build one with :func:`from_files` or :func:`from_runs`.

    Attributes
    ----------
    spec : PermutationSpec
        Bound to the sites' shapes on first touch.
    on_error : {"raise", "skip"}
    errors : dict ``name -> error text``
        Checkpoints found bad so far (with ``on_error="skip"``).
    """

    def __init__(self, sources: Sequence[Any], spec: PermutationSpec, on_error: str = "raise") -> None:
        check_spec(spec)
        if on_error not in _ON_ERROR:
            raise ValueError(f"on_error must be 'raise' or 'skip', got {on_error!r}")
        if not sources:
            raise ValueError("the collection is empty: no checkpoint given (or the glob matched no file)")
        self.sources = list(sources)
        self.spec = spec
        self.on_error = on_error
        self.errors: dict[str, str] = {}
        self._signature: Signature | None = None

    # ------------------------------------------------------------------ basics
    def __len__(self) -> int:
        return len(self.sources)

    @property
    def names(self) -> list[str]:
        """File paths (or run labels), in collection order."""
        return [s.name for s in self.sources]

    def __repr__(self) -> str:
        shape = "" if self._signature is None else f", {self.signature.numel} weights, dtype {self.dtype}"
        form = "" if self._signature is None else (", gaussian" if self.gaussian else ", points")
        return f"Collection({len(self)} checkpoints{shape}{form}, {self.spec!r})"

    def _sub(self, sources: Sequence[Any]) -> Collection:
        out = Collection(sources, self.spec, self.on_error)
        out._signature = self._signature
        return out

    def __getitem__(self, index: int | slice | Sequence[int]) -> Any:
        """``collection[i]``: the checked :class:`Checkpoint`; a slice or a list of indices: a
        sub-collection (e.g. two halves to compare)."""
        if isinstance(index, slice):
            return self._sub(self.sources[index])
        if hasattr(index, "tolist") and getattr(index, "ndim", 0) == 1:  # numpy / torch index arrays
            index = index.tolist()
        if isinstance(index, Sequence) and not isinstance(index, str):
            return self._sub([self.sources[i] for i in index])
        ck = self.load(int(index))
        if ck is None:
            raise CheckpointError(self.sources[int(index)].name, self.errors[self.sources[int(index)].name])
        return ck

    def __iter__(self) -> Iterator[Checkpoint]:
        """The checked checkpoints one at a time (bad ones skipped with ``on_error="skip"``)."""
        for i in range(len(self)):
            ck = self.load(i)
            if ck is not None:
                yield ck

    # ------------------------------------------------------------------ signature
    def _bad(self, name: str, err: Exception) -> None:
        if self.on_error == "raise":
            raise err
        if name not in self.errors:
            text, prefix = str(err), f"{name}: "
            # the name is the key: keep the reason only (re-raised as CheckpointError(name, reason))
            self.errors[name] = text[len(prefix) :] if text.startswith(prefix) else text
            warnings.warn(f"skipping checkpoint {err}", stacklevel=3)

    @property
    def signature(self) -> Signature:
        """Sites, shapes, dtypes and form every checkpoint must have (read on first touch)."""
        if self._signature is None:
            for src in self.sources:
                try:
                    ck = src.read()
                    self._signature = Signature.of(ck, self.spec)
                except (CheckpointError, SpecError) as e:
                    self._bad(src.name, e)
                    continue
                if self.spec.shapes is None:
                    self.spec = self.spec.with_shapes({s: self._signature.shapes[s] for s in self.spec.sites})
                break
            else:
                raise ValueError(f"no checkpoint of the collection could be read: {self.errors}")
        return self._signature

    @property
    def sites(self) -> list[str]:
        return list(self.signature.shapes)

    @property
    def shapes(self) -> dict[str, tuple[int, ...]]:
        return dict(self.signature.shapes)

    @property
    def dtype(self) -> torch.dtype:
        """The floating dtype of the spec's sites."""
        return self.signature.dtypes[self.spec.sites[0]]

    @property
    def gaussian(self) -> bool:
        """Whether checkpoints are Gaussian posteriors (``(loc, scale)``, e.g. AutoNormal param stores)."""
        return self.signature.gaussian

    def load(self, index: int, *, mmap: bool = False, finite: bool = True) -> Checkpoint | None:
        """Read and check checkpoint ``index``; ``None`` if it is bad and ``on_error="skip"``.

        ``mmap=True`` memory-maps the file (only the entries used are read from disk);
        ``finite=False`` then skips the NaN/Inf check, which would read every value.
        """
        sig = self.signature
        src = self.sources[index]
        try:
            return sig.check(src.read(mmap=mmap), finite=finite)
        except CheckpointError as e:
            self._bad(src.name, e)
            return None

    def validate(self, *, progress: bool = False) -> dict[str, str]:
        """Read every checkpoint once (one at a time) and return the bad ones (``name -> error``)."""
        from tqdm.auto import tqdm

        for i in tqdm(range(len(self)), desc="validate", unit="ckpt", disable=not progress):
            self.load(i, mmap=True)
        return dict(self.errors)

    # ------------------------------------------------------------------ outputs
    def _outputs(self) -> list[str]:
        """Output file names: the inputs' stems (``.pt``), numbered when they would clash."""
        stems = [Path(n).stem if isinstance(s, FileSource) else re.sub(r"[^\w.-]+", "_", n)
                 for s, n in zip(self.sources, self.names)]  # fmt: skip
        names = [f"{s}.pt" for s in stems]
        if len(set(names)) < len(names) or {MANIFEST, REFERENCE} & set(names) or any(n.startswith(".") for n in names):
            names = [f"{i:06d}_{s}.pt" for i, s in enumerate(stems)]
        return names

    def _first(self) -> Checkpoint:
        for i in range(len(self)):
            ck = self.load(i)
            if ck is not None:
                return ck
        raise ValueError(f"every checkpoint of the collection is bad: {self.errors}")

    def _resolve_reference(self, reference: Any) -> Checkpoint:
        """A reference given as an index, a file (read like the collection's files) or a mapping."""
        if isinstance(reference, int) and not isinstance(reference, bool):
            return self[reference]
        if isinstance(reference, (str, os.PathLike)):
            key = getattr(self.sources[0], "key", None)
            ck = FileSource(str(reference), key).read()
        elif isinstance(reference, Checkpoint):
            ck = reference
        elif isinstance(reference, Mapping):
            ck = MemorySource("reference", reference).read()
        else:
            raise TypeError(
                "reference must be 'barycenter', a checkpoint index, a file path or a mapping site -> tensor "
                f"(or site -> (loc, scale)); got {type(reference).__name__}"
            )
        missing = [s for s in self.spec.sites if s not in ck.params]
        if missing:
            raise SpecError(f"the reference lacks the spec's sites {missing}")
        for s in self.spec.sites:
            if tuple(ck.params[s].shape) != self.signature.shapes[s]:
                raise SpecError(
                    f"site {s!r} has shape {tuple(ck.params[s].shape)} in the reference, "
                    f"{self.signature.shapes[s]} in the collection"
                )
        return ck

    def _reference_key(self, reference: Any) -> Any:
        """What identifies a reference in a call's fingerprint: its content, or the inputs
        (names, sizes and modification times) it is computed from."""
        if reference is None:
            first = self._first()
            i = self.names.index(first.name)
            return ["first sorted", first.name, self.sources[i].stat()]
        if isinstance(reference, str) and reference == "barycenter":
            inputs = json.dumps([[s.name, s.stat()] for s in self.sources])
            return ["barycenter", hashlib.sha256(inputs.encode()).hexdigest()]
        if isinstance(reference, int) and not isinstance(reference, bool):
            return ["index", reference, self.names[reference], self.sources[reference].stat()]
        return ["given", hashlib.sha256(dumps(self._resolve_reference(reference).posterior)).hexdigest()]

    # ------------------------------------------------------------------ transforms
    def align(self, reference: Any, out_dir: str | os.PathLike, **kwargs: Any) -> TransformSummary:
        """Align every checkpoint to ``reference`` with ``ps.align``; see
        :func:`~pyro_symmetry.collections.transforms.align`."""
        from .transforms import align

        return align(self, reference, out_dir, **kwargs)

    def canonicalize(self, out_dir: str | os.PathLike, **kwargs: Any) -> TransformSummary:
        """Canonical form of every checkpoint with ``ps.canonicalize``; see
        :func:`~pyro_symmetry.collections.transforms.canonicalize`."""
        from .transforms import canonicalize

        return canonicalize(self, out_dir, **kwargs)

    def map(self, fn: Callable[[Any], Any], out_dir: str | os.PathLike, **kwargs: Any) -> TransformSummary:
        """``fn(checkpoint)`` for every checkpoint, results written to ``out_dir``; see
        :func:`~pyro_symmetry.collections.transforms.map_collection`."""
        from .transforms import map_collection

        return map_collection(self, fn, out_dir, **kwargs)

    def barycenter(self, **kwargs: Any) -> Any:
        """Streaming barycenter of the aligned checkpoints; see
        :func:`~pyro_symmetry.collections.transforms.barycenter`."""
        from .transforms import barycenter

        return barycenter(self, **kwargs)


# ---------------------------------------------------------------------- constructors
def _not_a_reference(path: str) -> bool:
    """False for the ``_reference.pt`` a transform wrote next to its manifest: the reference
    (e.g. a barycenter) of an output directory is not one of its checkpoints."""
    folder, name = os.path.split(path)
    return not (name == REFERENCE and os.path.exists(os.path.join(folder, MANIFEST)))


def _expand(paths_or_glob: Any) -> list[str]:
    if isinstance(paths_or_glob, (str, os.PathLike)):
        p = os.fspath(paths_or_glob)
        if glob.has_magic(p):
            paths = sorted(filter(_not_a_reference, glob.glob(p, recursive=True)), key=_natural)
            if not paths:
                raise ValueError(f"the pattern {p!r} matches no file")
            return paths
        if os.path.isdir(p):
            found = (os.path.join(p, f) for f in os.listdir(p) if f.endswith(_SUFFIXES))
            paths = sorted(filter(_not_a_reference, found), key=_natural)
            if not paths:
                raise ValueError(f"the directory {p!r} holds no checkpoint file ({', '.join(_SUFFIXES)})")
            return paths
        return [p]
    if isinstance(paths_or_glob, Sequence):
        paths = [os.fspath(p) for p in paths_or_glob]
        if not all(isinstance(p, str) for p in paths):
            raise TypeError("paths must be str or os.PathLike")
        return paths
    raise TypeError(
        f"paths_or_glob must be a path, a glob pattern or a list of paths, got {type(paths_or_glob).__name__}"
    )


def from_files(
    paths_or_glob: str | os.PathLike | Sequence[str | os.PathLike],
    spec: PermutationSpec,
    *,
    key: Any = None,
    on_error: str = "raise",
) -> Collection:
    """A lazy collection of checkpoint files.

    Parameters
    ----------
    paths_or_glob : str, path or list of paths
        A glob pattern (``"ckpts/*.pt"``, sorted naturally: ``2`` before ``10``), a directory
        (its ``.pt``/``.pth``/``.ckpt``/``.bin``/``.safetensors`` files) or explicit paths
        (kept in the given order). A pattern or a directory leaves out the
        ``_reference.pt`` of a transform's output directory (``from_files("aligned/",
        spec)`` reads the aligned checkpoints, not their barycenter).
    spec : PermutationSpec
        The network's symmetry; sites it does not touch are carried along unchanged.
    key : None, str, sequence of str, mapping or callable
        ``str`` (or a sequence, for nested dicts): the entry holding the parameters
        (``key="model"`` for ``torch.save({"model": net.state_dict(), "optimizer": ...})``).
        A mapping ``file name -> site name`` renames entries (others keep their names); a
        callable ``name -> site name or None`` renames or drops them. Files may be state
        dicts or dicts of tensors, Pyro param-store files of an ``AutoNormal`` guide
        (``pyro.get_param_store().save(path)`` or ``torch.save(pyro.get_param_store()
        .get_state(), path)``: the locs are the points, the scales are kept) or of an
        ``AutoDelta`` guide (its points), ``{"loc": ..., "scale": ...}`` results of this
        package, or ``.safetensors`` files (needs the ``safetensors`` package).
    on_error : {"raise", "skip"}
        A file that cannot be read (corrupt, truncated, missing) or does not fit the
        collection (other sites, shapes or dtypes, NaN/Inf values) raises a
        :class:`CheckpointError` naming it, or is skipped with a warning and listed in
        ``collection.errors`` (and in a transform's summary).

    Returns
    -------
    Collection
        Reads nothing yet but nothing is mixed in unchecked: the first touch reads the first
        file to learn the sites, shapes and dtype (checked against ``spec``); every other
        file is checked against them when it is read.

    Examples
    --------
    >>> coll = ps.collections.from_files("ckpts/*.pt", spec)
    >>> summary = coll.align("barycenter", "aligned/", executor=client)
    >>> aligned = summary.collection(spec)      # the outputs, again a lazy collection
    """
    paths = _expand(paths_or_glob)
    if len(set(paths)) < len(paths):
        dup = sorted({p for p in paths if paths.count(p) > 1})
        raise ValueError(f"paths lists the same file more than once: {dup[:3]}")
    return Collection([FileSource(p, key) for p in paths], spec, on_error)


def from_runs(runs: Sequence[Any], spec: PermutationSpec, *, names: Sequence[str] | None = None,
              on_error: str = "raise") -> Collection:  # fmt: skip
    """A collection of in-memory runs.

    Parameters
    ----------
    runs : sequence
        :class:`~pyro_symmetry.training.TrainedRun` s (``ps.train_runs`` results: their
        param-store state, AutoNormal locs and scales), fitted ``AutoNormal`` guides, point
        mappings ``site -> tensor`` or ``site -> (loc, scale)`` mappings.
    spec : PermutationSpec
    names : sequence of str, optional
        Labels (default ``run_00000``, ...), also the transforms' output file names.
    on_error : {"raise", "skip"}
        As in :func:`from_files`.

    Returns
    -------
    Collection
        On an executor, each run is sent to the worker as plain tensors.
    """
    if isinstance(runs, Mapping) or not isinstance(runs, Sequence):
        raise TypeError(f"runs must be a sequence of runs, got {type(runs).__name__}")
    names = [f"run_{i:05d}" for i in range(len(runs))] if names is None else [str(n) for n in names]
    if len(names) != len(runs) or len(set(names)) < len(names):
        raise ValueError(f"names must be {len(runs)} distinct labels, got {len(names)} ({len(set(names))} distinct)")
    return Collection([MemorySource(n, r) for n, r in zip(names, runs)], spec, on_error)
