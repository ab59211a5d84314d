"""Loss barriers between independent mean-field VI runs, before and after alignment.

Trains several mean-field Gaussian posteriors (``AutoNormal``, ``Trace_ELBO``) of a
Bayesian MLP on scikit-learn's digits from different random seeds. For every pair of
runs it walks the 2-Wasserstein geodesic between the two posteriors (linear in means
and standard deviations, ``ps.interpolate``) and records the test NLL of the
posterior predictive (Monte Carlo, fixed draws) and its error rate; the loss barrier
is the largest excess over the straight line between the endpoint losses
(``ps.loss_barrier``). Then it aligns the second run to the first with
``ps.align`` (Wasserstein matching) and measures again. Rossi, Singh and Hannagan
(NeurIPS 2023) report large barriers before alignment and nearly none after.

    python examples/loss_barriers.py            # about 5 minutes on 2 CPU cores
    python examples/loss_barriers.py --quick    # under a minute
"""

from __future__ import annotations

import argparse
import itertools
import os
import statistics
import time

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import pyro  # noqa: E402
import torch  # noqa: E402
from pyro.infer import SVI, Trace_ELBO  # noqa: E402
from pyro.infer.autoguide import AutoNormal  # noqa: E402
from sklearn.datasets import load_digits  # noqa: E402
from sklearn.model_selection import train_test_split  # noqa: E402
from tqdm import tqdm  # noqa: E402

import pyro_symmetry as ps  # noqa: E402


def load_data(seed: int = 0):
    x, y = load_digits(return_X_y=True)
    x_tr, x_te, y_tr, y_te = train_test_split(x / 16.0, y, test_size=0.25, random_state=seed, stratify=y)
    f, i = torch.float32, torch.long
    return (
        torch.tensor(x_tr, dtype=f),
        torch.tensor(y_tr, dtype=i),
        torch.tensor(x_te, dtype=f),
        torch.tensor(y_te, dtype=i),
    )


def fit_run(model, x, y, steps, lr, seed, progress):
    """One mean-field VI run; returns its posterior as ``site -> (loc, scale)``."""
    pyro.clear_param_store()
    pyro.set_rng_seed(seed)
    guide = AutoNormal(model, init_scale=0.05)
    svi = SVI(model, guide, pyro.optim.ClippedAdam({"lr": lr, "lrd": 0.1 ** (1 / steps)}), Trace_ELBO())
    for _ in tqdm(range(steps), desc=f"VI run seed {seed}", disable=not progress, leave=False):
        svi.step(x, y)
    return {k: (loc.clone(), scale.clone()) for k, (loc, scale) in ps.gaussian_params(guide).items()}


def stats(values):
    return statistics.mean(values), (statistics.stdev(values) if len(values) > 1 else 0.0)


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--hidden", type=int, nargs="+", default=[128], help="hidden widths")
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--steps", type=int, default=3000)
    parser.add_argument("--lr", type=float, default=0.02)
    parser.add_argument("--prior-scale", type=float, default=1.0)
    parser.add_argument("--num-points", type=int, default=25)
    parser.add_argument("--mc-samples", type=int, default=32)
    parser.add_argument("--quick", action="store_true", help="3 runs, short training (under a minute)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default="out/loss_barriers")
    parser.add_argument("--no-progress", action="store_true")
    args = parser.parse_args(argv)
    if args.quick:
        args.runs, args.steps, args.num_points = 3, 600, 11
    os.makedirs(args.out, exist_ok=True)
    progress = not args.no_progress
    # Small networks: one thread is fastest, and many times faster than two on a busy machine.
    torch.set_num_threads(1)

    x_tr, y_tr, x_te, y_te = load_data(args.seed)
    model = ps.models.BayesianMLP(64, args.hidden, 10, activation="relu", prior_scale=args.prior_scale)
    t0 = time.perf_counter()
    runs = [fit_run(model, x_tr, y_tr, args.steps, args.lr, args.seed + r, progress) for r in range(args.runs)]
    t_train = time.perf_counter() - t0

    losses = {
        "test NLL": ps.gaussian_nll_loss(model, x_te, y_te, num_samples=args.mc_samples, seed=args.seed),
        "test error": ps.gaussian_error_loss(model, x_te, y_te, num_samples=args.mc_samples, seed=args.seed),
    }
    pairs = list(itertools.combinations(range(args.runs), 2))
    curves = {(name, when): [] for name in losses for when in ("before", "after")}
    rows = []
    t0 = time.perf_counter()
    for i, j in tqdm(pairs, desc="pairs", disable=not progress, leave=False):
        res = ps.align(runs[i], runs[j], model.spec, seed=args.seed)
        row = {"pair": (i, j), "W2^2 after": res.objective[-1]}
        row["W2^2 before"] = sum(
            float((runs[i][k][0] - runs[j][k][0]).pow(2).sum() + (runs[i][k][1] - runs[j][k][1]).pow(2).sum())
            for k in runs[i]
        )
        for name, loss in losses.items():
            for when, q1 in (("before", runs[j]), ("after", res.aligned)):
                b = ps.loss_barrier(loss, runs[i], q1, num_points=args.num_points)
                row[f"{name} {when}"] = b.barrier
                row[f"{name} endpoints"] = (float(b.losses[0]), float(b.losses[-1]))
                curves[(name, when)].append(b)
        rows.append(row)
    t_eval = time.perf_counter() - t0

    print(
        f"\n{args.runs} mean-field VI runs of a 64-{'-'.join(map(str, args.hidden))}-10 ReLU MLP on digits "
        f"({args.steps} steps each, {t_train:.0f} s); {len(pairs)} pairs, {args.num_points} points per path, "
        f"{args.mc_samples} MC draws ({t_eval:.0f} s)\n"
    )
    print(
        "| pair | W2^2 before | W2^2 after | NLL barrier before | NLL barrier after "
        "| error barrier before | error barrier after |"
    )
    print("|---|---:|---:|---:|---:|---:|---:|")
    for r in rows:
        print(
            f"| {r['pair'][0]}-{r['pair'][1]} | {r['W2^2 before']:.1f} | {r['W2^2 after']:.1f} "
            f"| {r['test NLL before']:.3f} | {r['test NLL after']:.3f} "
            f"| {100 * r['test error before']:.1f}% | {100 * r['test error after']:.1f}% |"
        )
    summary = {}
    for key in ("test NLL before", "test NLL after", "test error before", "test error after"):
        summary[key] = stats([r[key] for r in rows])
    nll_end = [v for r in rows for v in r["test NLL endpoints"]]
    err_end = [v for r in rows for v in r["test error endpoints"]]
    print("\n| barrier (mean ± sd over pairs) | before alignment | after alignment |")
    print("|---|---:|---:|")
    print(
        f"| test NLL | {summary['test NLL before'][0]:.3f} ± {summary['test NLL before'][1]:.3f} "
        f"| {summary['test NLL after'][0]:.3f} ± {summary['test NLL after'][1]:.3f} |"
    )
    print(
        f"| test error | {100 * summary['test error before'][0]:.1f}% ± {100 * summary['test error before'][1]:.1f}% "
        f"| {100 * summary['test error after'][0]:.1f}% ± {100 * summary['test error after'][1]:.1f}% |"
    )
    print(
        f"\nendpoint runs: test NLL {statistics.mean(nll_end):.3f} (range {min(nll_end):.3f}-{max(nll_end):.3f}), "
        f"test error {100 * statistics.mean(err_end):.1f}%"
    )

    fig, axes = plt.subplots(1, 2, figsize=(10, 3.6))
    for ax, name in zip(axes, losses):
        scale = 100.0 if name == "test error" else 1.0
        for when, color in (("before", "tab:red"), ("after", "tab:blue")):
            for k, b in enumerate(curves[(name, when)]):
                label = f"{when} alignment" if k == 0 else None
                ax.plot(b.t.numpy(), scale * b.losses.numpy(), color=color, alpha=0.6, lw=1.2, label=label)
        ax.set(xlabel="t (W2 geodesic from run i to run j)", ylabel=name + (" (%)" if scale > 1 else ""))
        ax.legend()
    fig.suptitle("Loss along the path between independent VI posteriors")
    fig.tight_layout()
    path = os.path.join(args.out, "barriers.png")
    fig.savefig(path, dpi=110)
    print(f"saved {path}")
    return {"rows": rows, "summary": summary}


if __name__ == "__main__":
    main()
