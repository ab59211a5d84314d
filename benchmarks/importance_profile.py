"""CPU-time ratio of AutoSymmetrizedNormal(estimator="importance") to AutoNormal per SVI step (K = 8).

Same model and data as ``benchmarks/guides.py``; the two guides run alternately, 20 steps
each per round, timed with ``time.process_time()`` (CPU time, robust to a loaded machine).
``--profile`` prints a cProfile of the importance guide's steps instead. With the ``fast``
extra (numba) the proposal's assignment loop is compiled; ``PYRO_SYMMETRY_NUMBA=0`` times
the NumPy loop instead.

Usage::

    python benchmarks/importance_profile.py [--rounds 7] [--steps 20] [--profile]
"""

from __future__ import annotations

import argparse
import cProfile
import pstats
import statistics
import sys
import time
from pathlib import Path

import pyro
import torch
from pyro.infer import Trace_ELBO
from pyro.infer.autoguide import AutoNormal

import pyro_symmetry as ps

sys.path.insert(0, str(Path(__file__).parent))
from guides import make_svi  # noqa: E402


def cpu_steps(svi, x, y, steps: int) -> float:
    t = time.process_time()
    for _ in range(steps):
        svi.step(x, y)
    return (time.process_time() - t) / steps


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--profile", action="store_true")
    args = parser.parse_args()
    torch.set_num_threads(1)
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(256, 64, generator=g), torch.randint(0, 10, (256,), generator=g)
    pyro.clear_param_store()
    base = make_svi("guide0", AutoNormal, Trace_ELBO(), x, y)
    imp = make_svi(
        "guide1", lambda m: ps.AutoSymmetrizedNormal(m, num_permutations=8, estimator="importance"), Trace_ELBO(), x, y
    )
    if args.profile:
        prof = cProfile.Profile()
        prof.enable()
        cpu_steps(imp, x, y, args.steps)
        prof.disable()
        pstats.Stats(prof).sort_stats("cumulative").print_stats(35)
        return
    tb, ti = [], []
    for _ in range(args.rounds):
        tb.append(cpu_steps(base, x, y, args.steps))
        ti.append(cpu_steps(imp, x, y, args.steps))
    ratios = [a / b for a, b in zip(ti, tb)]
    print(
        f"AutoNormal {1e3 * statistics.median(tb):.2f} ms, importance K=8 {1e3 * statistics.median(ti):.2f} ms (CPU, "
        f"median of {args.rounds} rounds x {args.steps} steps); ratio: median of rounds "
        f"{statistics.median(ratios):.2f}, of medians {statistics.median(ti) / statistics.median(tb):.2f}"
    )


if __name__ == "__main__":
    main()
