"""The output directory of a transform: atomic writes, the manifest, what the call owns.

Every result is written to a temporary file in the output directory and renamed over its
final name (``os.replace``, atomic on POSIX and Windows within one directory), so a
reader never sees half a file. Next to the results, ``_manifest.jsonl`` records, one JSON
object per line (appended and flushed one at a time by the driver only):

* a header: the operation, its options and a fingerprint of the whole call (spec, options,
  reference, inputs); a directory whose manifest has another fingerprint is refused;
* per output, ``"pending"`` before its task is submitted, then ``"done"`` (with the sha256
  of the output bytes, the input file's size and mtime, the permutation applied) or
  ``"failed"`` (with the error). The last record of an output wins.

An output is complete when its last record is ``"done"``, the input is unchanged and the
file's sha256 matches; a re-run skips exactly those. Files the manifest does not record
are never overwritten: a call refuses to start when one of its output names is taken by
such a file.
"""

from __future__ import annotations

import json
import os
import re
import tempfile
import time
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

from ._formats import sha256_file

__all__ = ["MANIFEST", "REFERENCE", "Manifest", "write_atomic"]

MANIFEST = "_manifest.jsonl"
REFERENCE = "_reference.pt"
_FORMAT = "pyro_symmetry.collections/1"


def write_atomic(out_dir: str | os.PathLike, name: str, data: bytes) -> None:
    """Write ``data`` to ``out_dir/name`` through a temporary file and ``os.replace``.

    No ``fsync``: a file that a machine crash leaves short of its bytes no longer has the
    sha256 its manifest record holds, so a re-run redoes it.
    """
    fd, tmp = tempfile.mkstemp(prefix=f".{name}.", suffix=".tmp", dir=out_dir)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        os.replace(tmp, os.path.join(out_dir, name))
    except BaseException:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise


class Manifest:
    """The manifest of one transform call in ``out_dir`` (driver side).

    Only small fields of each record are kept in memory (status, hash, input stat), so
    the driver's memory does not grow with the permutations the records hold.
    """

    def __init__(self, out_dir: Path, header: dict[str, Any]) -> None:
        self.out_dir = out_dir
        self.path = out_dir / MANIFEST
        self.header = header
        self.state: dict[str, tuple[str, str | None, Any]] = {}  # output -> (status, sha256, input stat)
        self.reference: tuple[str, str | None] | None = None  # (status, sha256)
        self._file = None

    # ------------------------------------------------------------------ open
    @classmethod
    def open(cls, out_dir: str | os.PathLike, operation: str, fingerprint: str, options: Mapping) -> Manifest:
        """Create or resume the manifest; refuse a directory another call (or program) owns."""
        out_dir = Path(out_dir)
        out_dir.mkdir(parents=True, exist_ok=True)
        header = {"kind": "header", "format": _FORMAT, "operation": operation, "fingerprint": fingerprint,
                  "options": dict(options), "created": time.strftime("%Y-%m-%dT%H:%M:%S")}  # fmt: skip
        self = cls(out_dir, header)
        if self.path.exists():
            self._read(fingerprint, operation)
        else:
            self._write([header])
        return self

    def _read(self, fingerprint: str, operation: str) -> None:
        with open(self.path, encoding="utf-8") as f:
            lines = f.read().split("\n")
        records = []
        for i, line in enumerate(lines):
            if not line.strip():
                continue
            try:
                records.append(json.loads(line))
            except json.JSONDecodeError:
                if i >= len(lines) - 2:  # a line torn by a crash mid-write: the record never happened
                    continue
                raise ValueError(f"{self.path} line {i + 1} is not JSON: the manifest is damaged") from None
        head = records[0] if records else {}
        if head.get("kind") != "header" or head.get("format") != _FORMAT:
            raise FileExistsError(f"{self.path} exists but was not written by pyro_symmetry.collections; "
                                  "use another out_dir")  # fmt: skip
        if head.get("fingerprint") != fingerprint:
            raise ValueError(
                f"{self.out_dir} holds the results of another call ({head.get('operation')!r} with options "
                f"{head.get('options')}); this call ({operation!r}) differs in its inputs, spec, reference or "
                "options. Use a new out_dir (or delete this one) instead of mixing results"
            )
        self.header = head
        for r in records[1:]:
            if r.get("kind") == "entry":
                self.state[r["output"]] = (r["status"], r.get("sha256"), r.get("input_stat"))
            elif r.get("kind") == "reference":
                self.reference = (r["status"], r.get("sha256"))

    # ------------------------------------------------------------------ write
    def _write(self, records: Iterable[Mapping[str, Any]]) -> None:
        if self._file is None:
            self._file = open(self.path, "a", encoding="utf-8")  # noqa: SIM115  (closed in close())
        for r in records:
            self._file.write(json.dumps(r, separators=(",", ":")) + "\n")
        self._file.flush()

    def append(self, records: Iterable[Mapping[str, Any]]) -> None:
        """Record entries (``{"kind": "entry", "output", "status", ...}``) or reference records."""
        records = list(records)
        self._write(records)
        for r in records:
            if r.get("kind") == "entry":
                self.state[r["output"]] = (r["status"], r.get("sha256"), r.get("input_stat"))
            elif r.get("kind") == "reference":
                self.reference = (r["status"], r.get("sha256"))

    def close(self) -> None:
        if self._file is not None:
            os.fsync(self._file.fileno())
            self._file.close()
            self._file = None

    # ------------------------------------------------------------------ queries
    def owns(self, name: str) -> bool:
        """Whether this call created (or claimed) ``out_dir/name``."""
        if name in (MANIFEST,):
            return True
        if name == REFERENCE:
            return self.reference is not None
        return name in self.state

    def complete(self, output: str, input_stat: Any) -> bool:
        """The output is done, from the same input, and its bytes have the recorded hash."""
        status, sha, stat = self.state.get(output, ("missing", None, None))
        if status != "done" or stat != input_stat:
            return False
        return sha is not None and sha256_file(str(self.out_dir / output)) == sha

    def reference_ready(self) -> str | None:
        """The sha256 of a finished reference file whose bytes still match, else ``None``."""
        if self.reference is None or self.reference[0] != "done":
            return None
        sha = self.reference[1]
        return sha if sha256_file(str(self.out_dir / REFERENCE)) == sha else None

    def foreign(self, names: Iterable[str]) -> list[str]:
        """Those of ``names`` that exist in ``out_dir`` but this call did not create."""
        return [n for n in names if (self.out_dir / n).exists() and not self.owns(n)]

    def remove_stale_temporaries(self) -> None:
        """Temporary files a killed run of this call left behind (``.{output}.*.tmp``)."""
        pattern = re.compile(r"^\.(?P<name>.+)\.[^./]+\.tmp$")
        for p in self.out_dir.iterdir():
            m = pattern.match(p.name)
            if m and self.owns(m["name"]):
                try:
                    p.unlink()
                except OSError:
                    pass
