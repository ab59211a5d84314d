"""Time of R-hat and bulk ESS over every weight of a set of runs: ``ps.diagnostics.rhat_ess``
with its vectorized kernel against ``engine="arviz"`` (``arviz_stats.rhat``/``ess``, one
weight at a time), in the same process, on the same draws; the results are checked equal.

    python benchmarks/rhat.py                       # 4 runs x 100 draws, 1000 and 10000 weights
    python benchmarks/rhat.py --weights 3466 --draws 30
"""

from __future__ import annotations

import argparse
import statistics
import time

import numpy as np
import torch
import xarray as xr

import pyro_symmetry as ps


def draws(chains: int, num_draws: int, weights: int, seed: int) -> xr.Dataset:
    """Runs that disagree (an offset per run and weight) with AR(1) noise within each run."""
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(chains, num_draws, weights))
    for t in range(1, num_draws):
        x[:, t] = 0.5 * x[:, t - 1] + x[:, t]
    x += rng.normal(size=(chains, 1, weights))
    return xr.Dataset({"w": (("chain", "draw", "weight"), x)})


def timed(fn, repeats: int) -> tuple[float, object]:
    times, out = [], None
    for _ in range(repeats):
        t0 = time.perf_counter()
        out = fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times), out


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--chains", type=int, default=4)
    p.add_argument("--draws", type=int, default=100)
    p.add_argument("--weights", type=int, nargs="+", default=[1000, 10000])
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--threads", type=int, default=1)
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    D = ps.diagnostics
    D.rhat_ess(draws(2, 8, 2, 0))  # import and warm up both paths
    print(f"R-hat + bulk ESS, {args.chains} runs x {args.draws} draws, median of {args.repeats}\n")
    print("| weights | vectorized (s) | arviz-stats per weight (s) | ratio | max abs difference |")
    print("|---:|---:|---:|---:|---:|")
    for n in args.weights:
        ds = draws(args.chains, args.draws, n, 0)
        t_vec, ours = timed(lambda ds=ds: D.rhat_ess(ds), args.repeats)
        t_az, ref = timed(lambda ds=ds: D.rhat_ess(ds, engine="arviz"), args.repeats)
        diff = max(
            float(np.abs(ours.rhat["w"] - ref.rhat["w"]).max()), float(np.abs(ours.ess["w"] - ref.ess["w"]).max())
        )
        print(f"| {n} | {t_vec:.3f} | {t_az:.2f} | {t_vec / t_az:.4f} | {diff:.1e} |")


if __name__ == "__main__":
    main()
