"""SVI step time of AutoSymmetrizedNormal against AutoNormal (same process, same data, round-robin).

BayesianMLP 64-128-128-10 (ReLU, classification), batch 256, one particle, Adam. For each
estimator and K the table gives the median step time over rounds and the median of the
per-round ratios to AutoNormal's time (every guide runs once per round, so that load drift
on a shared machine hits all alike). Goal (issue 3): at K = 8 the default estimator
("contrastive") costs at most 1.5x AutoNormal.

Usage::

    python benchmarks/guides.py [--repeats 7] [--steps 20] [--threads 1] [--quick]
"""

from __future__ import annotations

import argparse
import statistics
import time

import pyro
import torch
from pyro.infer import SVI, Trace_ELBO, TraceMeanField_ELBO
from pyro.infer.autoguide import AutoNormal

import pyro_symmetry as ps
from pyro_symmetry.models import BayesianMLP


def make_svi(name: str, make_guide, elbo, x: torch.Tensor, y: torch.Tensor) -> SVI:
    """An SVI object whose guide has its own parameter names (guides of one class share them)."""
    pyro.set_rng_seed(0)
    model = BayesianMLP(64, [128, 128], 10)
    guide = make_guide(model)
    guide._pyro_name = name
    svi = SVI(model, guide, pyro.optim.Adam({"lr": 1e-3}), elbo)
    for _ in range(3):  # warm-up: set-up, invariance check, allocator
        svi.step(x, y)
    return svi


def time_steps(svi: SVI, x: torch.Tensor, y: torch.Tensor, steps: int) -> float:
    """Mean time of one SVI step over ``steps`` steps (seconds)."""
    t = time.perf_counter()
    for _ in range(steps):
        svi.step(x, y)
    return (time.perf_counter() - t) / steps


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeats", type=int, default=7, help="rounds")
    parser.add_argument("--steps", type=int, default=20, help="SVI steps per guide and round")
    parser.add_argument("--quick", action="store_true", help="K = 8 only, 3 rounds of 10 steps")
    parser.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    repeats, steps = (3, 10) if args.quick else (args.repeats, args.steps)
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(256, 64, generator=g), torch.randint(0, 10, (256,), generator=g)
    ks = [8] if args.quick else [2, 8, 32]

    configs = [("AutoNormal", "-", "-", AutoNormal, Trace_ELBO())]
    for estimator in ("contrastive", "importance"):
        for k in ks:
            make = lambda m, e=estimator, k=k: ps.AutoSymmetrizedNormal(m, num_permutations=k, estimator=e)  # noqa: E731
            configs.append(("AutoSymmetrizedNormal", estimator, k, make, Trace_ELBO()))
    mean_field = lambda m: ps.AutoSymmetrizedMeanField(m, num_permutations=8)  # noqa: E731
    configs.append(
        ("AutoSymmetrizedMeanField + TraceMeanField_ELBO", "contrastive", 8, mean_field, TraceMeanField_ELBO())
    )

    pyro.clear_param_store()
    svis = [make_svi(f"guide{i}", c[3], c[4], x, y) for i, c in enumerate(configs)]
    times: list[list[float]] = [[] for _ in configs]
    for _ in range(repeats):
        for i, svi in enumerate(svis):
            times[i].append(time_steps(svi, x, y, steps))
    ratios = [[t / b for t, b in zip(ts, times[0])] for ts in times]

    print(
        f"BayesianMLP 64-128-128-10, batch 256, 1 particle; {repeats} rounds x {steps} steps, round-robin; "
        f"torch threads {torch.get_num_threads()}"
    )
    print("| guide | estimator | K | ms / step (median) | ratio to AutoNormal (median of rounds) |")
    print("|---|---|---|---:|---:|")
    for (name, est, k, _, _), ts, rs in zip(configs, times, ratios):
        print(f"| {name} | {est} | {k} | {1e3 * statistics.median(ts):.2f} | {statistics.median(rs):.2f} |")


if __name__ == "__main__":
    main()
