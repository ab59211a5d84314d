"""The exact permanent's cost by width, and the estimators of I(g; w) side by side.

1. ``log_permanent`` (assignment scaling, Sinkhorn sweeps, Glynn's formula in Gray-code
   order) on one random ``n x n`` matrix for n = 10..24 and on batches of 64: median time
   over repeats, the ratio to n = 10, the ratio expected from ``2^n n``, and the ratio to
   the baseline timed alternately in the same process: the previous implementation (30
   fixed Sinkhorn sweeps, then Ryser's formula), with both errors on the all-ones matrix
   (``perm = n!``, the hardest case for an alternating sum).
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


def _gray_rows(cols: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    sums = cols.new_zeros(*cols.shape[:-2], 1, cols.shape[-2])
    sign = cols.new_ones(1)
    for c in range(cols.shape[-1]):
        sums = torch.cat([sums, sums.flip(-2) + cols[..., c].unsqueeze(-2)], dim=-2)
        sign = torch.cat([sign, -sign.flip(0)])
    return sums, sign


def baseline_log_permanent(log_a: torch.Tensor, sinkhorn_iters: int = 30) -> torch.Tensor:
    """The implementation before issue 12 (commit 05ca4eb): fixed sweeps, Ryser's formula."""
    a = log_a.double()
    u = a.new_zeros(a.shape[:-1])
    v = a.new_zeros(a.shape[:-1])
    for _ in range(sinkhorn_iters):
        u = torch.logsumexp(a - v.unsqueeze(-2), dim=-1)
        v = torch.logsumexp(a - u.unsqueeze(-1), dim=-2)
    m = torch.exp(a - u.unsqueeze(-1) - v.unsqueeze(-2))
    n = m.shape[-1]
    k = min(n, 12)
    low, low_sign = _gray_rows(m[..., :k])
    high, high_sign = _gray_rows(m[..., k:])
    batch = m.shape[:-2]
    per_high = max(1, (1 << 22) // max(1, low.shape[-2] * n * max(1, batch.numel())))
    total = m.new_zeros(batch)
    for start in range(0, high.shape[-2], per_high):
        h = high[..., start : start + per_high, :]
        prods = (low.unsqueeze(-2) + h.unsqueeze(-3)).prod(-1)
        signs = low_sign.unsqueeze(-1) * high_sign[start : start + per_high]
        total = total + (prods * signs).sum((-1, -2))
    total = total if n % 2 == 0 else -total
    return torch.log(total) + u.sum(-1) + v.sum(-1)


def time_pair(n: int, batch: int, repeats: int) -> tuple[float, float, float]:
    """Median times of ``log_permanent`` and of the baseline, called alternately, and the
    ratio of their best times (robust to preemption on a loaded machine)."""
    shape = (batch, n, n) if batch > 1 else (n, n)
    a = torch.randn(*shape, dtype=torch.float64, generator=torch.Generator().manual_seed(n))
    new, old = [], []
    for fn, out in [(log_permanent, new), (baseline_log_permanent, old)] * (repeats + 1):
        t = time.perf_counter()
        fn(a)
        out.append(time.perf_counter() - t)
    return statistics.median(new[1:]), statistics.median(old[1:]), min(new[1:]) / min(old[1:])


def all_ones_errors(n: int) -> tuple[float, float]:
    z = torch.zeros(n, n, dtype=torch.float64)
    exact = math.lgamma(n + 1)
    return abs(float(log_permanent(z)) - exact), abs(float(baseline_log_permanent(z)) - exact)


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
    print(
        "| n | time (s) | ratio to n=10 | 2^n n ratio | baseline (s) | time / baseline | best / best "
        "| error all-ones | baseline error |"
    )
    print("|---|---|---|---|---|---|---|---|---|")
    time_pair(10, 1, 3)  # warm-up (scipy, torch kernels)
    t10 = None
    for n in widths:
        # cheap sizes get more repeats: their medians are otherwise at the mercy of the machine's load
        t, t_old, best = time_pair(n, 1, 1 if n >= 22 else args.repeats * (10 if n <= 16 else 1))
        t10 = t10 or t
        err, err_old = all_ones_errors(n)
        print(
            f"| {n} | {t:.4f} | {t / t10:.1f} | {2 ** (n - 10) * n / 10:.1f} | {t_old:.4f} | {t / t_old:.2f} "
            f"| {best:.2f} "
            f"| {err:.1e} | {err_old:.1e} |"
        )
    print(f"\n## log_permanent of a batch of 64 matrices (median of {args.repeats})")
    print("| n | time (s) | baseline (s) | time / baseline | best / best |")
    print("|---|---|---|---|---|")
    for n in (8, 12, 16):
        t, t_old, best = time_pair(n, 64, args.repeats)
        print(f"| {n} | {t:.4f} | {t_old:.4f} | {t / t_old:.2f} | {best:.2f} |")

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
