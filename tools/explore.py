"""Run the property tests under the exploratory Hypothesis profile, within a time budget.

``tox -e explore`` runs the whole suite with ``HYPOTHESIS_PROFILE=explore`` (random, not
derandomized, 500 examples per property; see tests/conftest.py). On a shared or small
machine that can take hours, so this script runs only the ``@given`` tests (a pytest plugin
deselects the rest), one test file at a time, each under its own time limit, in a
``git archive`` copy of ``--rev`` (other work in the checkout cannot break the run, and the
checkout is never modified). A file that reaches its limit is reported as such (no failure
found in the time it ran), never as passed.

Usage (from the repository root)::

    .venv/bin/python tools/explore.py                       # every file with @given tests
    .venv/bin/python tools/explore.py --budget 1200 --per-file 150 tests/test_alignment.py

Exit status 1 if any property fails; its falsifying example is printed (Hypothesis prints
the reproducing ``@reproduce_failure`` blob with ``print_blob=True``).
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

__all__ = ["main"]

REPO = Path(__file__).resolve().parents[1]
PYTHON = REPO / ".venv" / "bin" / "python"

_PLUGIN = """\
def pytest_collection_modifyitems(config, items):
    keep = [i for i in items if getattr(getattr(i, "obj", None), "is_hypothesis_test", False)]
    config.hook.pytest_deselected(items=[i for i in items if i not in keep])
    items[:] = keep
"""


def _property_files(root: Path) -> list[str]:
    return sorted(str(p.relative_to(root)) for p in (root / "tests").glob("test_*.py") if "@given" in p.read_text())


def _run(cmd: list[str], cwd: Path, env: dict, timeout: float) -> tuple[int | None, str]:
    """Run ``cmd`` in its own process group; on timeout kill that group: (None, output so far)."""
    with tempfile.TemporaryFile("w+") as log:
        proc = subprocess.Popen(cmd, cwd=cwd, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        try:
            code = proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
            code = None
        log.seek(0)
        return code, log.read()


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("files", nargs="*", help="test files (default: every file with @given tests)")
    p.add_argument("--rev", default="HEAD")
    p.add_argument("--budget", type=float, default=1200.0, help="total seconds (default 1200)")
    p.add_argument("--per-file", type=float, default=150.0, help="seconds per file (default 150)")
    p.add_argument("--profile", default="explore")
    args = p.parse_args(argv)
    tmp = Path(tempfile.mkdtemp(prefix="pyro-sym-explore-"))
    try:
        rev = subprocess.run(
            ["git", "-C", str(REPO), "rev-parse", "--short", f"{args.rev}^{{commit}}"],
            check=True,
            capture_output=True,
            text=True,
        ).stdout.strip()
        archive = subprocess.run(["git", "-C", str(REPO), "archive", rev], check=True, capture_output=True).stdout
        subprocess.run(["tar", "-x", "-C", str(tmp)], input=archive, check=True)
        (tmp / "_given_only.py").write_text(_PLUGIN)
        files = args.files or _property_files(tmp)
        env = dict(os.environ, PYTHONPATH=str(tmp), HYPOTHESIS_PROFILE=args.profile)
        # -x: a failure ends the file at once, with its falsifying example printed.
        cmd = [str(PYTHON), "-m", "pytest", "-x", "-q", "-p", "no:cacheprovider", "-p", "_given_only"]
        print(f"HYPOTHESIS_PROFILE={args.profile} over {len(files)} files of {rev}; budget {args.budget:.0f} s")
        start, rows, failed = time.perf_counter(), [], False
        for f in files:
            left = args.budget - (time.perf_counter() - start)
            if left < 10:
                rows.append((f, "not run (budget spent)", 0.0))
                continue
            t0 = time.perf_counter()
            code, out = _run(cmd + [f], tmp, env, min(args.per_file, left))
            if code is None:
                done = sum(
                    ln.count(".") for ln in out.splitlines() if re.fullmatch(r"[.sxXFE]+( *\[ *\d+%\])?", ln.strip())
                )
                verdict = f"time limit reached after {done} passed properties (no failure before it)"
            else:
                m = re.findall(r"^=* ?(\d+ (?:passed|failed).*?) in [\d.]+s", out, re.M)
                verdict = m[-1] if m else f"pytest exit {code}"
                if code not in (0, 5):
                    failed = True
                    print(out[-8000:])
            rows.append((f, verdict, time.perf_counter() - t0))
            print(f"{f}: {verdict} ({rows[-1][2]:.0f} s)", flush=True)
        print("\n| file | outcome | seconds |\n|---|---|---|")
        for f, verdict, secs in rows:
            print(f"| `{f}` | {verdict} | {secs:.0f} |")
        return 1 if failed else 0
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
