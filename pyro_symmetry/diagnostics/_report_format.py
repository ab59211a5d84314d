"""Formatting of the symmetry report (text, markdown, HTML) and the files it writes.

The HTML page is one self-contained file: figures are embedded as base64 PNG ``data:``
URIs, nothing links to a loose file. A report writes exactly the files named in
:data:`REPORT_FILES`, into an empty (or new) folder; with ``overwrite=True`` it replaces
those names only and leaves every other file of the folder alone. Each file is written to
a temporary name first and moved into place, so an interrupted write never leaves a
half-written report.
"""

from __future__ import annotations

import base64
import html
import math
import os
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

__all__ = [
    "COLUMNS",
    "FIGURE_CAPTIONS",
    "REPORT_FILES",
    "check_out_dir",
    "format_row",
    "html_figure",
    "html_table",
    "md_table",
    "write_file",
]

COLUMNS = (
    "layer",
    "width",
    "log|G| share",
    "R-hat max",
    "R-hat > 1.01",
    "R-hat > 1.1",
    "ESS median",
    "I(g;w) / log|G|",
    "MMD² before (p)",
    "MMD² after (p)",
    "barrier",
)
FIGURE_CAPTIONS = {
    "rhat_hist": "R-hat of every weight across runs, before and after alignment.",
    "marginals": "Per-run marginals of the weights whose R-hat drops most under alignment, before (top) and after "
    "(bottom) alignment.",
    "ranks": "Rank plots of the same weights: flat per-run rank histograms mean the runs agree.",
    "barriers": "Test loss along the interpolation between pairs of runs, before (dashed) and after (solid) alignment.",
}
REPORT_FILES = {
    "markdown": "report.md",
    "html": "report.html",
    "draws": "draws.nc",
    "draws_aligned": "draws_aligned.nc",
}
FILES_NOTE = (
    "Saved with this report (out_dir= or save()): draws.nc (the draws before alignment) and draws_aligned.nc "
    "(after), ArviZ trees in netCDF beside report.html; reopen them with xarray.open_datatree(path)."
)


# ---------------------------------------------------------------------- cells
def _num(x: Any, fmt: str, nan: str = "–") -> str:
    if x is None:
        return "–"
    if isinstance(x, float) and math.isnan(x):
        return nan
    if isinstance(x, float) and math.isinf(x):
        return "inf" if x > 0 else "-inf"
    return format(x, fmt)


def _pair(row: dict, key: str, fmt: str, nan: str = "–") -> str:
    b, a = row.get(f"{key}_before"), row.get(f"{key}_after")
    return "–" if b is None else f"{_num(b, fmt, nan)} → {_num(a, fmt, nan)}"


def format_row(r: dict[str, Any]) -> list[str]:
    """One table row as strings (a NaN estimate shows as NaN, a section not computed as '–')."""
    mi = "–"
    if r.get("mi_mean") is not None:
        spread = f" ± {_num(r['mi_sd'], '.1f', 'NaN')}" if r.get("mi_sd") != 0.0 else ""
        mi = f"{_num(r['mi_mean'], '.1f', 'NaN')}{spread} / {r['log_order']:.1f}"
    mmd_b = "–" if r.get("mmd2_before") is None else f"{r['mmd2_before']:.3f} ({r['mmd_p_before']:.3f})"
    mmd_a = "–" if r.get("mmd2_after") is None else f"{r['mmd2_after']:.3f} ({r['mmd_p_after']:.3f})"
    return [
        r["layer"],
        _num(r.get("width"), "d"),
        _num(r.get("log_order_share"), ".0%"),
        _pair(r, "rhat_max", ".3f", "n/a"),
        _pair(r, "frac_rhat>1.01", ".0%"),
        _pair(r, "frac_rhat>1.1", ".0%"),
        _pair(r, "ess_median", ".0f", "n/a (degenerate)"),
        mi,
        mmd_b,
        mmd_a,
        _pair(r, "barrier", ".3f", "NaN"),
    ]


def md_table(rows: list[list[str]]) -> list[str]:
    def line(row: list[str]) -> str:
        return "| " + " | ".join(c.replace("|", "\\|") for c in row) + " |"

    return [line(rows[0]), "|" + "|".join("---" for _ in rows[0]) + "|"] + [line(row) for row in rows[1:]]


def html_table(rows: list[list[str]]) -> str:
    esc = html.escape
    head = "".join(f"<th>{esc(c)}</th>" for c in rows[0])
    body = "".join("<tr>" + "".join(f"<td>{esc(c)}</td>" for c in row) + "</tr>" for row in rows[1:])
    return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


def html_figure(name: str, png: bytes) -> str:
    """A ``<figure>`` with the PNG embedded as a base64 ``data:`` URI."""
    esc = html.escape
    uri = "data:image/png;base64," + base64.b64encode(png).decode("ascii")
    caption = esc(FIGURE_CAPTIONS.get(name, name))
    return f"<figure><img src='{uri}' alt='{esc(name)}'><figcaption>{caption}</figcaption></figure>"


# ---------------------------------------------------------------------- files
def check_out_dir(out: Path, overwrite: bool) -> None:
    """Refuse a folder that holds anything unless ``overwrite=True`` (then only the report's
    own file names are replaced); refuse a path that is a file."""
    if out.exists() and not out.is_dir():
        raise FileExistsError(f"out_dir {str(out)!r} exists and is not a folder")
    if overwrite or not out.exists():
        return
    entries = sorted(p.name for p in out.iterdir())
    if entries:
        shown = ", ".join(entries[:5]) + (", ..." if len(entries) > 5 else "")
        raise FileExistsError(
            f"out_dir {str(out)!r} is not empty ({len(entries)} entries: {shown}); the report writes into an empty "
            "or new folder so that it never replaces a file it did not write. Pass a new folder, or overwrite=True "
            f"to replace the report's own files there ({', '.join(REPORT_FILES.values())}) and leave every other "
            "file untouched"
        )


def write_file(path: Path, write: Callable[[Path], None], overwrite: bool) -> Path:
    """``write(tmp)`` to a temporary name beside ``path``, then move it to ``path``: replacing
    it only with ``overwrite=True``, else failing if ``path`` appeared meanwhile."""
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex}.tmp")
    try:
        write(tmp)
        if overwrite:
            os.replace(tmp, path)
            return path
        try:
            os.link(tmp, path)  # atomic, and never replaces an existing file
        except FileExistsError:
            raise
        except OSError:  # a file system without hard links
            if path.exists():
                raise FileExistsError(f"{path} appeared while the report was written; not replaced") from None
            os.replace(tmp, path)
        return path
    finally:
        if tmp.exists():
            tmp.unlink()
