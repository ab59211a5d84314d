"""Mutation testing: plant known bugs in the package, one at a time, and check the suite kills each.

Each mutant is one exact textual replacement in one package file (the old text must occur
exactly once: a missing or ambiguous string is an error, so the script never silently tests
unmutated code). For every mutant the repository's tracked files at ``--rev`` (default HEAD)
are extracted into a fresh temporary directory (``git archive``), the patch is applied there,
and pytest runs *from inside that directory* with ``PYTHONPATH`` pointing at it. A small
pytest plugin checks, in every run, that ``pyro_symmetry`` is imported from the temporary
copy (the editable install of the checkout must not shadow it). The checkout itself is never
modified.

The unmutated tree runs first on the same tests and must pass; otherwise the script aborts.

Usage (from the repository root)::

    .venv/bin/python tools/mutation.py                 # targeted test files per mutant
    .venv/bin/python tools/mutation.py --full          # the whole suite for every mutant
    .venv/bin/python tools/mutation.py --only exact-first-chunk --only mmd-pvalue-no-plus-one
    .venv/bin/python tools/mutation.py --list

Exit status: 0 if every mutant is killed, 1 if any survives, 2 on a setup error (a patch
that does not apply, an unmutated tree that fails its tests, a test run that collects
nothing).

The mutants are the bugs of issue 12, item 13, that once survived the whole suite.
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

__all__ = ["MUTANTS", "Mutant", "main"]

REPO = Path(__file__).resolve().parents[1]
PYTHON = REPO / ".venv" / "bin" / "python"
PYTEST_ARGS = ["-m", "pytest", "-x", "-q", "-p", "no:cacheprovider", "-p", "_mutation_check"]

# Loaded by pytest (``-p _mutation_check``) in every run: proves the tested code is the copy's.
_CHECK_PLUGIN = """\
import os
import sys

import pyro_symmetry

_ROOT = os.path.realpath(os.environ["MUTATION_ROOT"])
_FILE = os.path.realpath(pyro_symmetry.__file__)
if not _FILE.startswith(_ROOT + os.sep):
    raise RuntimeError(f"pyro_symmetry imported from {_FILE}, not from the mutated copy {_ROOT}")
sys.stderr.write(f"mutation: pyro_symmetry imported from {_FILE}\\n")
"""


@dataclass(frozen=True)
class Mutant:
    """One planted bug: replace ``old`` by ``new`` (exactly once) in ``path``."""

    name: str
    description: str
    path: str
    old: str
    new: str
    tests: tuple[str, ...] = field(default=())


MUTANTS: tuple[Mutant, ...] = (
    Mutant(
        "apply-chunk-reuses-first-indices",
        "groups: chunked spec.apply (batches over CHUNK_BYTES = 4 MB) reuses the first chunk's indices",
        "pyro_symmetry/groups/_indexing.py",
        "out[lo:hi] = run(flat[lo:hi], lo, hi)",
        "out[lo:hi] = run(flat[lo:hi], 0, hi - lo)",
        ("tests/test_mutants.py", "tests/test_groups.py"),
    ),
    Mutant(
        "exact-first-chunk",
        "estimators/exact: enumerates only the first chunk of group elements",
        "pyro_symmetry/estimators/exact.py",
        "for start in range(0, spec.order, chunk):",
        "for start in range(0, min(spec.order, chunk), chunk):",
        ("tests/test_mutants.py", "tests/test_estimators_chunking.py", "tests/test_estimators.py"),
    ),
    Mutant(
        "symmetrized-sampler-identity",
        "guides: guide.symmetrized() never permutes (draws of q passed for draws of q_sym)",
        "pyro_symmetry/guides/_common.py",
        "mover = MoveSites(self.spec)",
        "mover = MoveSites(self.spec, self.spec.identity())",
        ("tests/test_qsym_sampling.py", "tests/test_symmetrized_draws.py"),
    ),
    Mutant(
        "normal-sample-posterior-identity",
        "guides: AutoSymmetrizedNormal.sample_posterior never permutes",
        "pyro_symmetry/guides/normal.py",
        "perm = self.spec.sample((num_samples,), device=ref.device)",
        "perm = self.spec.identity((num_samples,), device=ref.device)",
        ("tests/test_qsym_sampling.py", "tests/test_symmetrized_draws.py"),
    ),
    Mutant(
        "symmetrize-sample-posterior-identity",
        "guides: Symmetrize.sample_posterior never permutes",
        "pyro_symmetry/guides/symmetrize.py",
        "perm = self.spec.sample((num_samples,), device=z.device)",
        "perm = self.spec.identity((num_samples,), device=z.device)",
        ("tests/test_qsym_sampling.py", "tests/test_symmetrized_draws.py"),
    ),
    Mutant(
        "symmetrized-shared-g",
        "distributions: Symmetrized.sample draws one g shared by all draws",
        "pyro_symmetry/distributions/symmetrized.py",
        "perm = self.spec.sample(batch, device=ref.device)",
        "perm = self.spec.sample(device=ref.device)",
        ("tests/test_qsym_sampling.py", "tests/test_symmetrized_draws.py"),
    ),
    Mutant(
        "mmd-bandwidth-self-distances",
        "diagnostics/kernel_mmd: the median bandwidth includes the zero self-distances",
        "pyro_symmetry/diagnostics/kernel_mmd.py",
        "pairs = dist[i, j]",
        "pairs = dist.reshape(-1)",
        ("tests/test_diagnostics_mmd.py",),
    ),
    Mutant(
        "mmd-pvalue-no-plus-one",
        "diagnostics/kernel_mmd: permutation p-value without its +1 (observed statistic not counted)",
        "pyro_symmetry/diagnostics/kernel_mmd.py",
        "p_agg = float((smallest <= smallest[0]).sum()) / table.shape[0]",
        "p_agg = float((smallest[1:] <= smallest[0]).sum()) / (table.shape[0] - 1)",
        ("tests/test_diagnostics_mmd.py",),
    ),
    Mutant(
        "alignment-loose-tolerance",
        "alignment: a step is accepted only if it improves the cost by 1e-3 of the energy",
        "pyro_symmetry/alignment/core.py",
        "rtol = 64 * cost_eps if rtol is None else rtol",
        "rtol = 1e-3 if rtol is None else rtol",
        ("tests/test_alignment_optimality.py",),
    ),
    # Further variants of the same bugs at their other call sites.
    Mutant(
        "sampler-shared-g",
        "distributions/pushforward: MoveSites (guide.symmetrized()) draws one g for all draws of a batch",
        "pyro_symmetry/distributions/pushforward.py",
        "self.perm = self.spec.sample(value.shape[: value.dim() - nd], device=value.device)",
        "self.perm = self.spec.sample(device=value.device)",
        ("tests/test_qsym_sampling.py", "tests/test_symmetrized_draws.py"),
    ),
    Mutant(
        "normal-sample-posterior-shared-g",
        "guides: AutoSymmetrizedNormal.sample_posterior draws one g for all draws",
        "pyro_symmetry/guides/normal.py",
        "perm = self.spec.sample((num_samples,), device=ref.device)",
        "perm = self.spec.sample(device=ref.device)",
        ("tests/test_qsym_sampling.py", "tests/test_symmetrized_draws.py"),
    ),
    Mutant(
        "symmetrized-identity",
        "distributions: Symmetrized.sample never permutes",
        "pyro_symmetry/distributions/symmetrized.py",
        "perm = self.spec.sample(batch, device=ref.device)",
        "perm = self.spec.identity(batch, device=ref.device)",
        ("tests/test_qsym_sampling.py", "tests/test_symmetrized_draws.py"),
    ),
    Mutant(
        "apply-chunk-reuses-first-signs",
        "groups: chunked spec.apply reuses the first chunk's sign flips (indices right)",
        "pyro_symmetry/groups/_indexing.py",
        "block = block * (sign[lo:hi] if sign.shape[0] > 1 else sign)",
        "block = block * (sign[: hi - lo] if sign.shape[0] > 1 else sign)",
        ("tests/test_mutants.py", "tests/test_groups.py"),
    ),
    Mutant(
        "alignment-tolerance-1e-6",
        "alignment: a step is accepted only if it improves the cost by 1e-6 of the energy",
        "pyro_symmetry/alignment/core.py",
        "rtol = 64 * cost_eps if rtol is None else rtol",
        "rtol = 1e-6 if rtol is None else rtol",
        ("tests/test_alignment_optimality.py",),
    ),
    Mutant(
        "mmd-kernel-pvalues-no-plus-one",
        "diagnostics/kernel_mmd: per-kernel p-values without their +1",
        "pyro_symmetry/diagnostics/kernel_mmd.py",
        "pvals = counts.to(z.dtype) / table.shape[0]",
        "pvals = (counts - 1).to(z.dtype) / (table.shape[0] - 1)",
        ("tests/test_diagnostics_mmd.py",),
    ),
    Mutant(
        "compiled-assignment-ignores-taken-columns",
        "estimators/_assign: the compiled loop draws from every column, taken ones included",
        "pyro_symmetry/estimators/_assign.py",
        "acc += A[t, src, s * n + j] * opened[j]",
        "acc += A[t, src, s * n + j]",
        ("tests/test_estimators_assign.py",),
    ),
    Mutant(
        "compiled-assignment-last-identity-row-draws",
        "estimators/_assign: the compiled loop lets the last identity row draw instead of taking its options",
        "pyro_symmetry/estimators/_assign.py",
        "if r < F:",
        "if r < F - 1:",
        ("tests/test_estimators_assign.py",),
    ),
)

#: The nine mutants of issue 12 item 13 (the rest are variants at neighbouring call sites).
ISSUE_MUTANTS = tuple(m.name for m in MUTANTS[:9])


def _run(cmd: list[str], **kw) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, check=True, capture_output=True, **kw)


def extract(rev: str, dest: Path, overlay: list[str]) -> None:
    """Tracked files of ``rev`` into ``dest`` (plus ``overlay`` paths from the working tree)."""
    archive = _run(["git", "-C", str(REPO), "archive", "--format=tar", rev]).stdout
    _run(["tar", "-x", "-C", str(dest)], input=archive)
    for rel in overlay:
        src = REPO / rel
        if not src.is_file():
            raise SystemExit(f"--include {rel}: no such file in {REPO}")
        (dest / rel).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(src, dest / rel)
    (dest / "_mutation_check.py").write_text(_CHECK_PLUGIN)


def apply_patch(root: Path, mutant: Mutant) -> None:
    """Replace the mutant's old text (exactly one occurrence) in the copy under ``root``."""
    target = root / mutant.path
    text = target.read_text()
    count = text.count(mutant.old)
    if count != 1:
        raise SystemExit(
            f"mutant {mutant.name}: {mutant.old!r} occurs {count} times in {mutant.path} (expected once); "
            "update the mutant to the current code"
        )
    target.write_text(text.replace(mutant.old, mutant.new))
    if mutant.new not in target.read_text():
        raise SystemExit(f"mutant {mutant.name}: the patch did not land in {target}")


def run_tests(root: Path, tests: list[str], timeout: float, profile: str) -> tuple[int | None, str, float]:
    """pytest from inside ``root``; returns (exit code or None on timeout, output, seconds)."""
    env = dict(os.environ, PYTHONPATH=str(root), MUTATION_ROOT=str(root), HYPOTHESIS_PROFILE=profile)
    env.pop("PYTHONSTARTUP", None)
    start = time.perf_counter()
    try:
        proc = subprocess.run(
            [str(PYTHON), *PYTEST_ARGS, *tests],
            cwd=root,
            env=env,
            capture_output=True,
            text=True,
            timeout=timeout,
        )
    except subprocess.TimeoutExpired as exc:
        out = (exc.stdout or b"").decode() if isinstance(exc.stdout, bytes) else (exc.stdout or "")
        return None, out, time.perf_counter() - start
    return proc.returncode, proc.stdout + proc.stderr, time.perf_counter() - start


def _first_failure(output: str) -> str:
    m = re.search(r"^(FAILED|ERROR) (\S+)", output, re.M)
    return m.group(2) if m else ""


def _imported_from(output: str) -> str:
    m = re.search(r"^mutation: pyro_symmetry imported from (\S+)", output, re.M)
    return m.group(1) if m else ""


def _parse(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--full", action="store_true", help="run the whole suite (tests/) for every mutant")
    p.add_argument("--only", action="append", default=[], metavar="NAME", help="run only these mutants")
    p.add_argument("--issue", action="store_true", help="run only the nine mutants of issue 12 item 13")
    p.add_argument("--list", action="store_true", help="list the mutants and exit")
    p.add_argument("--rev", default="HEAD", help="git revision to mutate (default HEAD)")
    p.add_argument(
        "--include", action="append", default=[], metavar="PATH", help="overlay this working-tree file on the copy"
    )
    p.add_argument(
        "--tests", action="append", default=[], metavar="PATH", help="run these test paths instead of the targeted ones"
    )
    p.add_argument("--timeout", type=float, default=1800.0, help="seconds per test run (default 1800)")
    p.add_argument("--profile", default="ci", help="Hypothesis profile (default ci: derandomized)")
    p.add_argument("--keep", action="store_true", help="keep the temporary copies")
    return p.parse_args(argv)


def _select(args: argparse.Namespace) -> list[Mutant]:
    names = {m.name for m in MUTANTS}
    unknown = [n for n in args.only if n not in names]
    if unknown:
        raise SystemExit(f"unknown mutants {unknown}; known: {sorted(names)}")
    chosen = [m for m in MUTANTS if (not args.only or m.name in args.only)]
    if args.issue:
        chosen = [m for m in chosen if m.name in ISSUE_MUTANTS]
    return chosen


def main(argv: list[str] | None = None) -> int:
    args = _parse(argv)
    mutants = _select(args)
    if args.list:
        for m in mutants:
            print(f"{m.name:40s} {m.path}: {m.description}")
        return 0
    # Resolved once: every copy is of the same commit even if the branch moves meanwhile.
    rev = _run(["git", "-C", str(REPO), "rev-parse", "--short", f"{args.rev}^{{commit}}"], text=True).stdout.strip()
    tmp = Path(tempfile.mkdtemp(prefix="pyro-sym-mutation-"))
    print(f"mutation testing {rev} ({'full suite' if args.full else 'targeted tests'}); copies in {tmp}")
    try:
        # Check every patch applies before spending time on tests.
        for m in mutants:
            probe = tmp / "probe" / m.name
            (probe / Path(m.path).parent).mkdir(parents=True)
            archive = _run(["git", "-C", str(REPO), "show", f"{rev}:{m.path}"], text=True).stdout
            (probe / m.path).write_text(archive)
            apply_patch(probe, m)
        shutil.rmtree(tmp / "probe")

        def tests_of(ms: list[Mutant]) -> list[str]:
            if args.tests:
                return list(args.tests)
            return ["tests"] if args.full else sorted({t for m in ms for t in m.tests})

        base = tmp / "unmutated"
        base.mkdir()
        extract(rev, base, args.include)
        missing = [t for t in tests_of(mutants) if not (base / t.split("::")[0]).exists()]
        if missing:
            print(f"error: test files missing at {rev}: {missing} (commit them or pass --include)")
            return 2
        code, out, secs = run_tests(base, tests_of(mutants), args.timeout, args.profile)
        summary = re.findall(r"^=* ?(\d+ passed.*?) in [\d.]+s", out, re.M)
        print(f"unmutated tree: exit {code} in {secs:.0f} s ({summary[-1] if summary else '?'}); {_imported_from(out)}")
        if code != 0 or not _imported_from(out):
            print(out[-4000:])
            print("error: the unmutated tree fails its tests; aborting")
            return 2
        rows = []
        for m in mutants:
            root = tmp / m.name
            root.mkdir()
            extract(rev, root, args.include)
            apply_patch(root, m)
            code, out, secs = run_tests(root, tests_of([m]), args.timeout, args.profile)
            where = _imported_from(out)
            if code == 5 or (code is not None and not where):
                print(out[-4000:])
                print(f"error: mutant {m.name}: no tests ran or the import check did not report")
                return 2
            if code == 0:
                verdict = "SURVIVED"
            elif code == 1:
                verdict = "killed"
            elif code is None:
                verdict = "killed (timeout)"
            else:
                verdict = f"killed (pytest exit {code})"
            rows.append((m, verdict, _first_failure(out), secs))
            print(f"{verdict:10s} {m.name} ({secs:.0f} s) {_first_failure(out)}", flush=True)
            if not args.keep:
                shutil.rmtree(root)
        print()
        print("| mutant | file | verdict | first failing test | seconds |")
        print("|---|---|---|---|---|")
        for m, verdict, test, secs in rows:
            print(f"| `{m.name}` | `{m.path}` | {verdict} | `{test}` | {secs:.0f} |")
        survived = [m.name for m, v, _, _ in rows if v == "SURVIVED"]
        print(f"\n{len(rows) - len(survived)} of {len(rows)} killed" + (f"; survived: {survived}" if survived else ""))
        return 1 if survived else 0
    finally:
        if not args.keep:
            shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
