"""The exact permanent's cost by width, and the estimators of I(g; w) side by side.

1. ``log_permanent`` (Ryser, Gray-code order, log-space conditioning) on one random
   ``n x n`` matrix for n = 10..24: median time over repeats, the ratio to n = 10, and the
   ratio expected from ``2^n n``.
2. The estimator table: one hidden layer (``BayesianMLP(4, [n], 2)``) with diagonal Gaussian
   factors (means N(0, 1), standard deviation ``--scale``, default 1.1), K = 16, the same draws of ``w``
   for every method: exact ``I`` (permanent), uniform contrastive (Gelberg et al.) and the
   equivariant Plackett-Luce importance bound, with standard errors (over the draws of ``w``)
   and times (median of three calls).

Usage::

    python benchmarks/permanent.py [--quick] [--repeats 5]
"""

from __future__ import annotations

import argparse
import math
import statistics
import time

import pyro.distributions as dist
import torch

from pyro_symmetry.estimators import (
    BaseDensity,
    contrastive_log_ratio,
    importance_log_ratio,
    log_permanent,
    permanent_log_ratio,
)
from pyro_symmetry.models import BayesianMLP


def time_permanent(n: int, repeats: int) -> float:
    a = torch.randn(n, n, dtype=torch.float64, generator=torch.Generator().manual_seed(n))
    log_permanent(a)
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        log_permanent(a)
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def estimator_table(width: int, scale: float, num_samples: int, k: int) -> list[tuple]:
    model = BayesianMLP(4, [width], 2)
    g = torch.Generator().manual_seed(0)
    q = {
        s: dist.Normal(torch.randn(shape, generator=g, dtype=torch.float64), scale).to_event(len(shape))
        for s, shape in model.spec.shapes.items()
    }
    base = BaseDensity(q, model.spec)
    torch.manual_seed(0)
    w = base.sample((num_samples,))
    gen = torch.Generator().manual_seed(1)
    rows = []
    for name, fn in [
        ("exact (permanent)", lambda: permanent_log_ratio(base, w)),
        (f"contrastive, K={k}", lambda: contrastive_log_ratio(base, w, k, gen)),
        (f"importance (Plackett-Luce), K={k}", lambda: importance_log_ratio(base, w, k, 1.0, gen)),
    ]:
        elapsed, runs = [], []
        for _ in range(3):  # the estimate of the first call, the median time of three
            t = time.perf_counter()
            runs.append(-fn().double())
            elapsed.append(time.perf_counter() - t)
        terms = runs[0]
        se = float(terms.std() / math.sqrt(len(terms)))
        rows.append((name, float(terms.mean()), se, statistics.median(elapsed)))
    return rows, model.spec.log_order


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="widths 10-20 and fewer draws")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--scale", type=float, default=1.1, help="posterior standard deviation of every weight")
    parser.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    widths = [10, 12, 14, 16, 18, 20] if args.quick else [10, 12, 14, 16, 18, 20, 22, 24]

    print(f"## log_permanent of one n x n matrix (median of {args.repeats}; torch threads {torch.get_num_threads()})")
    print("| n | time (s) | ratio to n=10 | 2^n n ratio |")
    print("|---|---|---|---|")
    t10 = None
    for n in widths:
        t = time_permanent(n, 1 if n >= 22 else args.repeats)
        t10 = t10 or t
        print(f"| {n} | {t:.4f} | {t / t10:.1f} | {2 ** (n - 10) * n / 10:.1f} |")

    for width in (12, 16):
        rows, log_order = estimator_table(width, args.scale, 64 if args.quick else 256, 16)
        print(f"\n## I(g; w), one hidden layer of width {width}, weight std {args.scale}, log|G| = {log_order:.2f}")
        print("| method | exact I | estimate | standard error | time (s) |")
        print("|---|---|---|---|---|")
        exact = rows[0][1]
        for name, value, se, elapsed in rows:
            print(f"| {name} | {exact:.2f} | {value:.2f} | {se:.2f} | {elapsed:.2f} |")


if __name__ == "__main__":
    main()
