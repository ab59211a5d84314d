"""Checkpoint collections: symmetry removal and diagnostics out of core, on a Dask cluster.

Laurent, Aldea and Franchi (ICLR 2024) train thousands of networks, save them, remove
the scaling and permutation symmetries of every checkpoint and compare the collections.
This example runs the same pipeline at toy scale, through the same code that scales:

1. trains independent mean-field VI runs of a ReLU Bayesian MLP on scikit-learn's digits
   (``ps.train_runs``) and saves draws of every run's posterior as checkpoint files
   (``run07_draw03.pt``: a state dict, as ``torch.save`` writes them);
2. reads them as a lazy collection (``ps.collections.from_files``) and puts every
   checkpoint in canonical form on a Dask cluster (minimum mass, then alignment to the
   streaming barycenter): workers read and write the files themselves, results are
   written atomically with a manifest, and a re-run resumes where it stopped;
3. compares the runs before and after, without loading the collection: R-hat/ESS across
   runs (chains = runs, the vectorized kernel block by block), MMD between the two halves
   of the runs (exact, block-streamed), and the ensemble's predictions (unchanged: the
   symmetries do not change the function).

    python examples/checkpoint_collection.py                 # 48 runs x 8 draws, a 2-worker LocalCluster
    python examples/checkpoint_collection.py --quick         # 16 runs x 6 draws, about a minute
    python examples/checkpoint_collection.py --scheduler tcp://host:8786 --out /shared/run1
"""

from __future__ import annotations

import argparse
import json
import os
import re
import time

import matplotlib

matplotlib.use("Agg")
import dask  # noqa: E402
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pyro  # noqa: E402
import torch  # noqa: E402
from pyro.infer.autoguide import AutoNormal  # noqa: E402
from sklearn.datasets import load_digits  # noqa: E402
from sklearn.model_selection import train_test_split  # noqa: E402

import pyro_symmetry as ps  # noqa: E402
from pyro_symmetry.diagnostics import collections as dc  # noqa: E402


def load_data(seed: int):
    x, y = load_digits(return_X_y=True)
    x_tr, x_te, y_tr, y_te = train_test_split(x / 16.0, y, test_size=0.25, random_state=seed, stratify=y)
    f = torch.float32
    return torch.tensor(x_tr, dtype=f), torch.tensor(y_tr), torch.tensor(x_te, dtype=f), torch.tensor(y_te)


def save_draws(runs, draws: int, ckpt_dir: str, seed: int) -> None:
    """``draws`` weight vectors of every run's Gaussian posterior, one ``torch.save`` file each."""
    gen = torch.Generator().manual_seed(seed)
    for r, run in enumerate(runs):
        params = ps.gaussian_params(run.guide)
        for s in range(draws):
            w = {k: loc + scale * torch.randn(loc.shape, generator=gen) for k, (loc, scale) in params.items()}
            torch.save(w, os.path.join(ckpt_dir, f"run{r:02d}_draw{s:02d}.pt"))


def predict(params, x):
    """Class probabilities of the MLP with weights ``params`` (sites ``fc{l}.weight``/``bias``)."""
    h = x
    layers = sorted({k.split(".")[0] for k in params})
    for i, layer in enumerate(layers):
        h = h @ params[f"{layer}.weight"].T + params[f"{layer}.bias"]
        if i < len(layers) - 1:
            h = torch.relu(h)
    return torch.softmax(h.double(), -1)


def run_of(name: str) -> int:
    """The run a checkpoint file belongs to (``run07_draw03.pt`` -> 7)."""
    return int(re.match(r"run(\d+)_draw(\d+)", os.path.basename(name)).group(1))


def draw_of(name: str) -> int:
    return int(re.match(r"run(\d+)_draw(\d+)", os.path.basename(name)).group(2))


def start_cluster(scheduler: str | None, workers: int):
    from distributed import Client, LocalCluster

    if scheduler:
        return Client(scheduler), None
    # Dask's nanny sets MALLOC_TRIM_THRESHOLD_ in its workers, which makes torch's large
    # temporaries page-fault on every allocation (alignment about 2x slower): unset it.
    dask.config.set({"distributed.nanny.pre-spawn-environ.MALLOC_TRIM_THRESHOLD_": None})
    cluster = LocalCluster(n_workers=workers, threads_per_worker=1, processes=True, dashboard_address=None)
    return Client(cluster), cluster


def markdown(header, rows) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    return "\n".join(lines + ["| " + " | ".join(str(c) for c in row) + " |" for row in rows])


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--hidden", type=int, default=16, help="hidden width (one ReLU layer)")
    parser.add_argument("--runs", type=int, default=48, help="independent VI runs (an even number)")
    parser.add_argument("--draws", type=int, default=8, help="checkpoints (posterior draws) saved per run")
    parser.add_argument("--steps", type=int, default=1000, help="SVI steps per run")
    parser.add_argument("--quick", action="store_true", help="16 runs x 6 draws, 200 steps (about a minute)")
    parser.add_argument("--scheduler", default=None, help="a running Dask scheduler (default: a LocalCluster)")
    parser.add_argument("--workers", type=int, default=2, help="LocalCluster worker processes")
    parser.add_argument("--barycenter-iters", type=int, default=5, help="streaming barycenter passes (at most)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default="out/checkpoint_collection", help="directory for checkpoints and results")
    parser.add_argument("--no-progress", action="store_true")
    args = parser.parse_args(argv)
    if args.quick:
        args.runs, args.draws, args.steps, args.barycenter_iters = 16, 6, 200, 2
    if args.runs < 4 or args.runs % 2 or args.draws < 4:
        parser.error("--runs must be an even number >= 4 and --draws >= 4")
    return args


def train_and_save(args: argparse.Namespace, ckpt_dir: str, x_tr: torch.Tensor, y_tr: torch.Tensor) -> None:
    """Train the runs and save their draws, once: a second call with the same ``--out`` reuses
    the checkpoints (and the canonicalization then finds its outputs complete and skips them)."""
    marker = os.path.join(ckpt_dir, "_complete.json")
    config = {"runs": args.runs, "draws": args.draws, "steps": args.steps, "hidden": args.hidden, "seed": args.seed}
    if os.path.exists(marker):
        with open(marker) as f:
            if json.load(f) == config:
                print(f"reusing the checkpoints in {ckpt_dir}")
                return
    runs = ps.train_runs(
        lambda: ps.models.BayesianMLP(64, [args.hidden], 10, activation="relu"),
        lambda m: AutoNormal(m, init_scale=0.05),
        (x_tr, y_tr),
        args.runs,
        steps=args.steps,
        seed=args.seed,
        optim=pyro.optim.ClippedAdam({"lr": 0.02}),
        progress=not args.no_progress,
    )
    save_draws(runs, args.draws, ckpt_dir, args.seed)
    with open(marker, "w") as f:
        json.dump(config, f)


def canonical_forms(args: argparse.Namespace, raw, canon_dir: str):
    """Minimum mass + alignment to the streaming barycenter, on the Dask cluster."""
    client, cluster = start_cluster(args.scheduler, args.workers)
    try:
        t0 = time.perf_counter()
        summary = raw.canonicalize(canon_dir, reference="barycenter", barycenter_iters=args.barycenter_iters,
                                   executor=client, progress=not args.no_progress)  # fmt: skip
        seconds = time.perf_counter() - t0
        print(f"\n{summary!r}\n({seconds:.1f} s on {len(client.nthreads())} workers)")
    finally:
        client.close()
        if cluster is not None:
            cluster.close()
    return summary, seconds


def diagnose(args: argparse.Namespace, collections: dict, x_te: torch.Tensor, y_te: torch.Tensor):
    """R-hat across runs, MMD between halves, ensemble predictions: ``(results, R-hats)``."""
    names = next(iter(collections.values())).names
    half = args.runs // 2
    first = [i for i, n in enumerate(names) if run_of(n) < half]
    second = [i for i, n in enumerate(names) if run_of(n) >= half]
    early = [i for i, n in enumerate(names) if draw_of(n) < args.draws // 2]
    late = [i for i, n in enumerate(names) if draw_of(n) >= args.draws // 2]
    results, rhats = {}, {}
    for label, coll in collections.items():
        tree = ps.diagnostics.to_inference_data(coll, chains=run_of)  # dask arrays: nothing read yet
        conv = dc.rhat_ess(tree)  # the vectorized kernel, a block of weights at a time
        rhats[label] = np.concatenate([np.ravel(v) for v in conv.rhat.values()])
        # the generic MMD dispatches Collections to the streamed estimators
        runs_ab = ps.diagnostics.mmd(coll[first], coll[second], num_permutations=200, seed=args.seed)
        null = ps.diagnostics.mmd(coll[early], coll[late], num_permutations=200, seed=args.seed)
        pred = dc.predictive(coll, predict, x_te, y_te)
        row = conv.row()
        results[label] = {"rhat_max": row["rhat_max"], "rhat_median": row["rhat_median"],
                          "frac_rhat>1.1": row["frac_rhat>1.1"], "frac_rhat>1.01": row["frac_rhat>1.01"],
                          "mmd2_runs": runs_ab.mmd2, "mmd_method": runs_ab.method, "mmd2_null": null.mmd2,
                          "accuracy": pred.metrics["accuracy"], "nll": pred.metrics["nll"],
                          "disagreement": pred.metrics["disagreement"],
                          "predictive_mutual_information": pred.metrics["predictive_mutual_information"]}  # fmt: skip
    return results, rhats


def report(args: argparse.Namespace, n: int, results: dict, rhats: dict) -> None:
    half = args.runs // 2
    method = next(iter(results.values()))["mmd_method"]
    print(
        f"\n{args.runs} runs x {args.draws} checkpoints = {n} files; R-hat with runs as chains; unbiased "
        f"MMD^2 (Gaussian kernel, median bandwidth; {method}) between runs 0-{half - 1} and "
        f"{half}-{args.runs - 1}, and between the first and second half of every run's draws (no difference)\n"
    )
    header = ["checkpoints", "R-hat median", "R-hat max", "R-hat > 1.01 (%)", "R-hat > 1.1 (%)", "MMD^2 runs A vs B",
              "MMD^2 draws 1st vs 2nd half", "ensemble accuracy (%)", "disagreement"]  # fmt: skip
    rows = [[label, f"{r['rhat_median']:.3f}", f"{r['rhat_max']:.2f}", f"{100 * r['frac_rhat>1.01']:.1f}",
             f"{100 * r['frac_rhat>1.1']:.1f}", f"{r['mmd2_runs']:.4f}", f"{r['mmd2_null']:.4f}",
             f"{100 * r['accuracy']:.1f}", f"{r['disagreement']:.3f}"] for label, r in results.items()]  # fmt: skip
    print(markdown(header, rows))
    fig, ax = plt.subplots(figsize=(6, 3.5))
    bins = np.linspace(1.0, max(2.0, float(np.nanmax(np.concatenate(list(rhats.values()))))), 40)
    for label, r in rhats.items():
        ax.hist(np.clip(r, bins[0], bins[-1]), bins=bins, alpha=0.6, label=label)
    ax.set(xlabel="R-hat (runs as chains)", ylabel="weights", title=f"{n} checkpoints, {args.runs} runs")
    ax.legend()
    fig.tight_layout()
    fig.savefig(os.path.join(args.out, "rhat.png"), dpi=100)
    with open(os.path.join(args.out, "results.json"), "w") as f:
        json.dump(results, f, indent=1)


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    torch.set_num_threads(1)
    t0 = time.perf_counter()
    ckpt_dir, canon_dir = os.path.join(args.out, "checkpoints"), os.path.join(args.out, "canonical")
    os.makedirs(ckpt_dir, exist_ok=True)
    x_tr, y_tr, x_te, y_te = load_data(args.seed)
    train_and_save(args, ckpt_dir, x_tr, y_tr)
    t_train = time.perf_counter() - t0
    spec = ps.models.BayesianMLP(64, [args.hidden], 10, activation="relu").spec
    raw = ps.collections.from_files(os.path.join(ckpt_dir, "run*_draw*.pt"), spec)
    summary, t_canon = canonical_forms(args, raw, canon_dir)
    canon = summary.collection(spec)
    results, rhats = diagnose(args, {"raw": raw, "canonical (min mass + barycenter)": canon}, x_te, y_te)
    report(args, len(raw), results, rhats)
    print(f"\nresults in {args.out}/ ({time.perf_counter() - t0:.0f} s, of which training and saving "
          f"{t_train:.0f} s, canonical forms {t_canon:.0f} s)")  # fmt: skip
    return results


if __name__ == "__main__":
    main()
