"""Reading and writing one checkpoint: file formats, name mapping, the collection's signature.

A checkpoint is read into a :class:`Checkpoint`: ``params`` (``site -> tensor``: the
point, or the Gaussian means) and, for variational posteriors, ``scales`` (the standard
deviations). Supported inputs:

* ``torch.save`` files of a state dict or any dict of tensors (``key=`` picks a sub-dict,
  e.g. ``key="model"`` for ``{"model": state_dict, "optimizer": ...}``);
* Pyro param-store files (``pyro.get_param_store().save(path)``, i.e.
  ``torch.save(pyro.get_param_store().get_state(), path)``) of an ``AutoNormal`` guide:
  ``AutoNormal.locs.<site>`` is the point, ``AutoNormal.scales.<site>`` its scale (both
  constrained, as the guide reads them); of an ``AutoDelta`` guide: ``AutoDelta.<site>``
  is the point;
* files this package writes for Gaussian results: ``{"loc": {...}, "scale": {...}}``;
* ``.safetensors`` files, when the ``safetensors`` package is installed.

Files are read with ``torch.load(..., map_location="cpu", weights_only=True)``: no code in
a checkpoint runs. The only classes allowed beyond tensors are the constraint objects of
``torch.distributions.constraints`` and ``pyro.distributions.constraints`` a param-store
file pickles.
"""

from __future__ import annotations

import hashlib
import io
import os
import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from ..groups import PermutationSpec, SpecError

__all__ = [
    "Checkpoint",
    "CheckpointError",
    "FileSource",
    "MemorySource",
    "Signature",
    "dumps",
    "load_object",
    "parse",
    "sha256_file",
]

KeyArg = None | str | Sequence[str] | Mapping[str, str] | Callable[[str], "str | None"]
_PARAM = re.compile(r"^(?P<prefix>.+?)\.(?P<kind>locs|scales)\.(?P<site>.+)$")
_DELTA = re.compile(r"^AutoDelta\.(?P<site>.+)$")


class CheckpointError(ValueError):
    """A checkpoint that cannot be read, or whose contents do not fit the collection.

    Attributes
    ----------
    source : str
        The file (or run) the error is about.
    """

    def __init__(self, source: str, message: str) -> None:
        super().__init__(f"{source}: {message}")
        self.source = source

    def __reduce__(self) -> tuple:  # picklable across processes with its two arguments
        return (type(self), (self.source, str(self).split(": ", 1)[1]))


@dataclass(frozen=True)
class Checkpoint:
    """One member of a collection.

    Attributes
    ----------
    name : str
        The file path or run label.
    params : dict ``site -> Tensor``
        Point values (or the Gaussian means); every site of the file, in file order.
    scales : dict ``site -> Tensor`` or None
        Standard deviations of a Gaussian (mean-field) posterior, same sites as ``params``.
    """

    name: str
    params: dict[str, torch.Tensor]
    scales: dict[str, torch.Tensor] | None = None

    @property
    def posterior(self) -> dict[str, Any]:
        """The checkpoint in the form ``ps.align`` reads: ``site -> tensor`` or ``site -> (loc, scale)``."""
        if self.scales is None:
            return dict(self.params)
        return {k: (v, self.scales[k]) for k, v in self.params.items()}


# ---------------------------------------------------------------------- reading
def _constraint_classes() -> list[type]:
    import pyro.distributions.constraints as pc
    import torch.distributions.constraints as tc

    out = set()
    for mod in (tc, pc):
        for obj in vars(mod).values():
            if isinstance(obj, type) and issubclass(obj, tc.Constraint):
                out.add(obj)
    return sorted(out, key=lambda c: (c.__module__, c.__qualname__))


def load_object(path: str, *, mmap: bool = False) -> Any:
    """The raw object stored in ``path``; any failure is a :class:`CheckpointError` naming it."""
    if str(path).endswith(".safetensors"):
        try:
            from safetensors.torch import load_file
        except ImportError:
            raise CheckpointError(str(path), "reading .safetensors files needs the 'safetensors' package") from None
        try:
            return load_file(str(path), device="cpu")
        except Exception as e:  # noqa: BLE001  (any reader failure is reported by file name)
            raise CheckpointError(str(path), f"cannot be read ({type(e).__name__}: {e})") from e
    try:
        with torch.serialization.safe_globals(_constraint_classes()):
            return torch.load(path, map_location="cpu", weights_only=True, mmap=mmap)
    except FileNotFoundError:
        raise CheckpointError(str(path), "no such file") from None
    except Exception as e:  # noqa: BLE001
        if mmap:  # files in torch's legacy (non-zip) format cannot be memory-mapped
            return load_object(path, mmap=False)
        msg = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise CheckpointError(str(path), f"cannot be read, corrupt or truncated? ({type(e).__name__}: {msg})") from e


def _select(obj: Any, key: KeyArg, name: str) -> Any:
    """``obj[key]`` (or the nested path of a sequence key); a renaming key selects nothing."""
    if key is None or callable(key) or isinstance(key, Mapping):
        return obj
    for k in (key,) if isinstance(key, str) else tuple(key):
        if not isinstance(obj, Mapping) or k not in obj:
            have = sorted(map(str, obj)) if isinstance(obj, Mapping) else type(obj).__name__
            raise CheckpointError(name, f"has no entry {k!r} (key={key!r}); it has {have}")
        obj = obj[k]
    return obj


def _rename(d: dict[str, torch.Tensor], key: KeyArg, name: str) -> dict[str, torch.Tensor]:
    """Sites renamed by a mapping (names it lacks kept) or a callable (``None`` drops an entry)."""
    if not (isinstance(key, Mapping) or callable(key)):
        return d
    out: dict[str, torch.Tensor] = {}
    for k, v in d.items():
        new = key.get(k, k) if isinstance(key, Mapping) else key(k)
        if new is None:
            continue
        if not isinstance(new, str):
            raise TypeError(f"key must map {k!r} to a site name (str) or None, got {new!r}")
        if new in out:
            raise CheckpointError(name, f"key={key!r} maps two entries to site {new!r}")
        out[new] = v
    if not out:
        raise CheckpointError(name, f"key={key!r} drops every entry")
    return out


def _tensors(d: Mapping, name: str, what: str) -> dict[str, torch.Tensor]:
    bad = [k for k, v in d.items() if not torch.is_tensor(v)]
    if bad:
        kinds = ", ".join(f"{k!r} ({type(d[k]).__name__})" for k in bad[:4])
        raise CheckpointError(
            name,
            f"{what} holds entries that are not tensors: {kinds}; pass key= to pick the sub-dict of "
            "parameters (e.g. key='model' or key='state_dict')",
        )
    return {str(k): v.detach() for k, v in d.items()}


def _constrained(value: torch.Tensor, constraint: Any) -> torch.Tensor:
    from torch.distributions import biject_to

    return value.detach() if constraint is None else biject_to(constraint)(value.detach()).detach()


def _param_store(state: Mapping, name: str) -> tuple[dict, dict | None]:
    """``(locs, scales)`` of an AutoNormal guide's param-store state, constrained; ``(points,
    None)`` for an AutoDelta guide's (its parameters are the MAP point of each site)."""
    params, constraints = state["params"], state["constraints"]
    locs, scales, prefixes = {}, {}, set()
    for pname, value in params.items():
        m = _PARAM.match(pname)
        if m is None:
            continue
        prefixes.add(m["prefix"])
        (locs if m["kind"] == "locs" else scales)[m["site"]] = _constrained(value, constraints.get(pname))
    if not locs:
        delta = {pname: _DELTA.match(pname) for pname in params}
        if delta and all(delta.values()):
            return {m["site"]: _constrained(params[p], constraints.get(p)) for p, m in delta.items()}, None
        raise CheckpointError(
            name,
            f"is a Pyro param store without AutoNormal locs/scales or AutoDelta points (params: "
            f"{sorted(params)[:6]}); AutoDiagonalNormal and other guides keep a flat vector: save the sites' "
            "(loc, scale) instead",
        )
    if len(prefixes) > 1:
        raise CheckpointError(name, f"holds the parameters of several guides {sorted(prefixes)}; save one per file")
    if set(locs) != set(scales):
        raise CheckpointError(name, f"sites {sorted(set(locs) ^ set(scales))} have a loc but no scale or vice versa")
    return locs, {k: scales[k] for k in locs}


def parse(obj: Any, key: KeyArg, name: str) -> Checkpoint:
    """A :class:`Checkpoint` from a loaded object (see the module docstring for the layouts)."""
    obj = _select(obj, key, name)
    if not isinstance(obj, Mapping) or not obj:
        raise CheckpointError(name, f"holds a {type(obj).__name__}, expected a non-empty dict of tensors")
    scales = None
    if isinstance(obj.get("params"), Mapping) and isinstance(obj.get("constraints"), Mapping):
        params, scales = _param_store(obj, name)
    elif set(obj) == {"loc", "scale"} and all(isinstance(v, Mapping) for v in obj.values()):
        params, scales = _tensors(obj["loc"], name, "'loc'"), _tensors(obj["scale"], name, "'scale'")
        if list(params) != list(scales):
            raise CheckpointError(name, "'loc' and 'scale' have different sites")
    else:
        params = _tensors(obj, name, "the file")
    params = _rename(params, key, name)
    if scales is not None:
        scales = _rename(scales, key, name)
    return Checkpoint(name, params, scales)


@dataclass(frozen=True)
class FileSource:
    """A checkpoint file, read on demand (picklable: workers read it themselves)."""

    path: str
    key: Any = None

    @property
    def name(self) -> str:
        return self.path

    def read(self, mmap: bool = False) -> Checkpoint:
        return parse(load_object(self.path, mmap=mmap), self.key, self.path)

    def stat(self) -> list[int] | None:
        try:
            st = os.stat(self.path)
        except OSError:
            return None
        return [st.st_size, st.st_mtime_ns]


@dataclass(frozen=True)
class MemorySource:
    """An in-memory run: a ``TrainedRun``, a fitted guide, or a mapping (points or ``(loc, scale)``)."""

    label: str
    obj: Any

    @property
    def name(self) -> str:
        return self.label

    def read(self, mmap: bool = False) -> Checkpoint:
        from ..posterior import read

        obj = self.obj
        if isinstance(obj, Checkpoint):
            return obj
        state = getattr(obj, "state", None)
        if isinstance(state, Mapping) and "params" in state and "constraints" in state:
            return parse(state, None, self.label)  # a TrainedRun: its own param-store state
        try:
            form, loc, scale = read(obj, self.label)
        except (TypeError, ValueError) as e:
            raise CheckpointError(self.label, str(e)) from e
        return Checkpoint(self.label, dict(loc), None if form == "point" else dict(scale))

    def materialized(self) -> MemorySource:
        """The same run as plain tensors (what an executor can ship to a worker)."""
        return MemorySource(self.label, self.read())

    def stat(self) -> str:
        """A digest of the run's tensors: a re-run with other values is not taken as done."""
        ck = self.read()
        h = hashlib.sha256()
        for part in (ck.params, ck.scales or {}):
            for k, v in part.items():
                h.update(k.encode())
                h.update(str(v.dtype).encode() + str(tuple(v.shape)).encode())
                h.update(v.detach().reshape(-1).contiguous().view(torch.uint8).numpy().tobytes() if v.numel() else b"")
        return h.hexdigest()


# ---------------------------------------------------------------------- signature
@dataclass(frozen=True)
class Signature:
    """What every checkpoint of a collection must look like: its sites, shapes, dtypes and form."""

    shapes: dict[str, tuple[int, ...]]
    dtypes: dict[str, torch.dtype]
    gaussian: bool

    @classmethod
    def of(cls, ck: Checkpoint, spec: PermutationSpec) -> Signature:
        """The signature of ``ck``, checked against ``spec`` (its sites present, of its shapes)."""
        sig = cls({k: tuple(v.shape) for k, v in ck.params.items()}, {k: v.dtype for k, v in ck.params.items()},
                  ck.scales is not None)  # fmt: skip
        for s in spec.sites:
            if s not in sig.shapes:
                raise SpecError(f"{ck.name}: site {s!r} of the spec is missing (the file has {sorted(sig.shapes)})")
            if not sig.dtypes[s].is_floating_point:
                raise SpecError(f"{ck.name}: site {s!r} has dtype {sig.dtypes[s]}, the spec moves floating point")
            if spec.shapes is not None and tuple(spec.shapes[s]) != sig.shapes[s]:
                raise SpecError(f"{ck.name}: site {s!r} has shape {sig.shapes[s]}, the spec expects {spec.shapes[s]}")
        sig.check(ck)
        return sig

    def check(self, ck: Checkpoint, *, finite: bool = True) -> Checkpoint:
        """``ck`` itself if it fits; :class:`CheckpointError` naming the file and site otherwise.

        ``finite=False`` checks the structure only (sites, shapes, dtypes, form): a reader of
        a few entries of a memory-mapped file checks the values it reads itself.
        """
        if set(ck.params) != set(self.shapes):
            diff = sorted(set(ck.params) ^ set(self.shapes))
            raise CheckpointError(ck.name, f"has sites {sorted(ck.params)}; the collection's differ in {diff}")
        if (ck.scales is not None) != self.gaussian:
            form = "(loc, scale) pairs" if self.gaussian else "points"
            raise CheckpointError(ck.name, f"is not in the collection's form ({form})")
        for k, v in ck.params.items():
            if tuple(v.shape) != self.shapes[k] or v.dtype != self.dtypes[k]:
                raise CheckpointError(
                    ck.name,
                    f"site {k!r} has shape {tuple(v.shape)} and dtype {v.dtype}; the collection's is "
                    f"{self.shapes[k]} {self.dtypes[k]}",
                )
            if ck.scales is not None and tuple(ck.scales[k].shape) != self.shapes[k]:
                raise CheckpointError(ck.name, f"site {k!r}: scale shape {tuple(ck.scales[k].shape)}")
            if not finite:
                continue
            for what, t in (("", v), (" scale", None if ck.scales is None else ck.scales[k])):
                if t is not None and t.is_floating_point() and not bool(torch.isfinite(t).all()):
                    raise CheckpointError(ck.name, f"site {k!r}{what} holds NaN or Inf")
        return ck

    @property
    def numel(self) -> int:
        out = 0
        for s in self.shapes.values():
            n = 1
            for d in s:
                n *= d
            out += n
        return out


# ---------------------------------------------------------------------- writing
def _own(t: torch.Tensor) -> torch.Tensor:
    """A tensor that owns exactly its bytes (``torch.save`` of a view writes its whole storage)."""
    t = t.detach()
    if t.is_contiguous() and t.untyped_storage().nbytes() == t.numel() * t.element_size():
        return t
    return t.clone(memory_format=torch.contiguous_format)


def dumps(posterior: Mapping[str, Any], name: str = "result") -> bytes:
    """``torch.save`` bytes of a result: ``site -> tensor``, or ``{"loc": ..., "scale": ...}``.

    Saved through a buffer, so that the bytes (and their hash) do not depend on the file name.
    """
    if not isinstance(posterior, Mapping) or not posterior:
        raise TypeError(f"{name} must be a non-empty mapping site -> tensor or site -> (loc, scale)")
    if all(torch.is_tensor(v) for v in posterior.values()):
        obj: Any = {k: _own(v) for k, v in posterior.items()}
    elif all(isinstance(v, (tuple, list)) and len(v) == 2 for v in posterior.values()):
        obj = {
            "loc": {k: _own(v[0]) for k, v in posterior.items()},
            "scale": {k: _own(v[1]) for k, v in posterior.items()},
        }
    else:
        raise TypeError(f"{name} mixes tensors and other values; return site -> tensor or site -> (loc, scale)")
    buf = io.BytesIO()
    torch.save(obj, buf)
    return buf.getvalue()


def sha256_file(path: str, chunk: int = 1 << 20) -> str | None:
    """Hex sha256 of a file's bytes, ``None`` if it does not exist."""
    h = hashlib.sha256()
    try:
        with open(path, "rb") as f:
            while block := f.read(chunk):
                h.update(block)
    except FileNotFoundError:
        return None
    return h.hexdigest()
