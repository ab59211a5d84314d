"""Symmetry report: how much of the disagreement between independent VI runs is symmetry.

Trains several independent runs of a 64-32-32-10 Bayesian MLP on scikit-learn's
digits with two guides, Pyro's mean-field ``AutoNormal`` and the symmetrized
``ps.AutoSymmetrizedNormal`` (Gelberg et al., 2024), and writes one symmetry
report per guide (one self-contained HTML page with its figures, markdown, and the draws
before/after alignment as ArviZ netCDF files): R-hat/ESS across runs before and after
aligning the runs, ``I(g; w)`` against ``log|G|``, loss barriers between runs before and
after alignment, and MMD between runs before and after mapping the samples to a canonical
form. It also prints the uncertainty metrics of both guides on the test split and on
out-of-distribution inputs (test digits with their pixels shuffled), and compares the
guides with ArviZ: PSIS-LOO (``arviz_stats.loo``/``compare``) on trees with a
``log_likelihood`` group, aligned or not, and the LOO corrected for the variational
approximation (``arviz_stats.loo_approximate_posterior`` with the trees' ``lp`` and
``log_q``).

    python examples/symmetry_report.py              # 8 runs x 2 guides x 1000 steps
    python examples/symmetry_report.py --workers 2  # the symmetrized runs on a process pool
    python examples/symmetry_report.py --quick      # 4 runs x 150 steps, LOO of 300 points, under a minute
"""

from __future__ import annotations

import argparse
import functools
import multiprocessing
import time
import warnings
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import pyro
import torch
from pyro.infer.autoguide import AutoNormal
from sklearn.datasets import load_digits
from sklearn.model_selection import train_test_split

import pyro_symmetry as ps

HIDDEN = [32, 32]


def load_data(seed: int = 0):
    x, y = load_digits(return_X_y=True)
    x_tr, x_te, y_tr, y_te = train_test_split(x / 16.0, y, test_size=0.25, random_state=seed, stratify=y)
    f = functools.partial(torch.tensor, dtype=torch.float32)
    return f(x_tr), torch.tensor(y_tr), f(x_te), torch.tensor(y_te)


def make_model() -> ps.models.BayesianMLP:
    return ps.models.BayesianMLP(64, HIDDEN, 10, activation="relu", prior_scale=1.0)


def mean_field(model, init_scale: float = 0.05):
    return AutoNormal(model, init_scale=init_scale)


def symmetrized(model, num_permutations: int = 8, init_scale: float = 0.05):
    return ps.AutoSymmetrizedNormal(model, num_permutations=num_permutations, init_scale=init_scale)


def predictive(runs, x: torch.Tensor, num_samples: int, seed: int) -> list[torch.Tensor]:
    """Per run: class probabilities ``(S, N, 10)`` of ``num_samples`` posterior draws."""
    draws = ps.diagnostics.collect_draws(runs, num_samples=num_samples, seed=seed)
    model = runs[0].model
    with torch.no_grad():
        return [model.functional(draws.chain(r), x).softmax(-1) for r in range(draws.num_chains)]


def evaluate(runs, x_te, y_te, x_ood, num_samples: int, seed: int) -> dict[str, float]:
    """Test metrics averaged over runs (each run's own posterior predictive)."""
    probs_in = predictive(runs, x_te, num_samples, seed)
    probs_out = predictive(runs, x_ood, num_samples, seed + 1)
    per_run = [ps.diagnostics.metrics.evaluate(p, y_te, q) for p, q in zip(probs_in, probs_out)]
    out = {k: sum(m[k] for m in per_run) / len(per_run) for k in per_run[0]}
    out["final ELBO"] = -sum(float(r.losses[-50:].mean()) for r in runs) / len(runs)
    return out


def arviz_comparison(runs_by_guide: dict, x_tr, y_tr, num_samples: int, seed: int) -> dict:
    """PSIS-LOO of each guide's runs (pooled as chains), aligned or not, with ArviZ.

    ``to_inference_data(..., data=(x, y))`` writes ``log_likelihood`` (pointwise over the
    training points), ``observed_data``, ``sample_stats.lp`` and the guide's ``log_q``;
    arviz-stats reads them directly. Alignment moves the draws but not their likelihood, so
    the aligned trees have the same LOO. ``loo_approximate_posterior`` needs one proposal
    density per draw: run 0 alone (pooled runs would be a mixture of proposals).
    """
    import arviz_stats as azs

    D = ps.diagnostics
    trees, approx = {}, {}
    for name, runs in runs_by_guide.items():
        draws = D.collect_draws(runs, num_samples=num_samples, seed=seed, data=(x_tr, y_tr))
        trees[name] = D.draws_to_datatree(draws)
        trees[f"{name}, aligned"] = D.draws_to_datatree(D.align_draws(draws, seed=seed))
        one = D.to_inference_data(runs[:1], num_samples=num_samples, seed=seed, data=(x_tr, y_tr))
        stats = one["sample_stats"]
        approx[name] = azs.loo_approximate_posterior(one, log_p=stats["lp"], log_q=stats["log_q"], pointwise=True)
    return {"compare": azs.compare(trees), "approximate": approx}


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runs", type=int, default=8)
    parser.add_argument("--steps", type=int, default=1000)
    parser.add_argument("--lr", type=float, default=0.02)
    parser.add_argument("--num-samples", type=int, default=100, help="posterior draws per run")
    parser.add_argument("--permutations", type=int, default=8, help="K of the symmetrized guide")
    parser.add_argument("--workers", type=int, default=0, help="train the symmetrized runs on a process pool")
    parser.add_argument("--quick", action="store_true", help="fewer runs, steps and draws (under a minute)")
    parser.add_argument("--out", type=Path, default=Path("out/symmetry_report"))
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=1, help="torch threads (small networks run fastest on one)")
    parser.add_argument("--no-progress", action="store_true")
    args = parser.parse_args(argv)
    if args.quick:
        args.runs, args.steps, args.num_samples = 4, 150, 30
    progress = not args.no_progress
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    x_tr, y_tr, x_te, y_te = load_data(args.seed)
    # Out-of-distribution inputs: test digits with their 64 pixels shuffled (same intensities).
    g = torch.Generator().manual_seed(args.seed)
    x_ood = x_te[:, torch.randperm(64, generator=g)]

    guides = {
        "mean-field": mean_field,
        "symmetrized": functools.partial(symmetrized, num_permutations=args.permutations),
    }
    report_kw = dict(num_samples=args.num_samples, progress=progress, seed=args.seed)
    if args.quick:
        report_kw.update(mi_samples=8, mi_permutations=8, barrier_points=9, barrier_pairs=1, mmd_permutations=50)
    metrics, reports, timings, runs_by_guide = {}, {}, {}, {}
    for name, make_guide in guides.items():
        start = time.perf_counter()
        # Mean-field runs train vectorized in-process (one batched problem); the symmetrized
        # guide trains run by run, optionally on a process pool.
        pool = None
        if args.workers and name == "symmetrized":
            pool = ProcessPoolExecutor(args.workers, mp_context=multiprocessing.get_context("spawn"))
        optim = pyro.optim.ClippedAdam({"lr": args.lr})
        runs = ps.train_runs(
            make_model, make_guide, (x_tr, y_tr), args.runs, steps=args.steps, seed=args.seed, optim=optim,
            executor=pool, num_threads=1 if pool else None, progress=progress,
        )  # fmt: skip
        if pool is not None:
            pool.shutdown()
        timings[name] = time.perf_counter() - start
        runs_by_guide[name] = runs
        metrics[name] = evaluate(runs, x_te, y_te, x_ood, args.num_samples, args.seed)
        # The example owns its output folders: overwrite=True replaces the report's own files there.
        reports[name] = ps.diagnostics.symmetry_report(
            runs, data=(x_te, y_te), out_dir=args.out / name.replace("-", "_"), title=f"Symmetry report: {name} VI",
            overwrite=True, **report_kw,
        )  # fmt: skip
    start = time.perf_counter()
    with warnings.catch_warnings():  # Pareto k warnings: shown in the tables' k counts below
        warnings.simplefilter("ignore", UserWarning)
        n_loo = 300 if args.quick else len(y_tr)  # --quick: LOO of the first 300 training points
        loo = arviz_comparison(runs_by_guide, x_tr[:n_loo], y_tr[:n_loo], args.num_samples, args.seed)
    timings["ArviZ"] = time.perf_counter() - start

    spec = make_model().spec
    print(
        f"network: 64 -> {' -> '.join(map(str, HIDDEN))} -> 10 ReLU, {args.runs} runs x {args.steps} steps, "
        f"log|G| = {spec.log_order:.1f}"
    )
    for name, rep in reports.items():
        print(f"\n## {name} VI ({timings[name]:.0f} s training)\n")
        print(rep)
    keys = ["accuracy", "nll", "brier", "ece", "aupr", "fpr95", "predictive_mutual_information", "final ELBO"]
    print("\n## test metrics (mean over runs; OOD = pixel-shuffled test digits, score = predictive entropy)\n")
    print(f"{'guide':<13}" + "".join(f"{k:>{max(12, len(k) + 2)}}" for k in keys))
    for name, m in metrics.items():
        print(f"{name:<13}" + "".join(f"{m[k]:>{max(12, len(k) + 2)}.4f}" for k in keys))
    print(
        f"\n## ArviZ: PSIS-LOO on {n_loo} training points (runs pooled as chains; arviz_stats.compare; "
        f"{timings['ArviZ']:.0f} s)\n"
    )
    print(loo["compare"][["rank", "elpd", "p", "elpd_diff", "se", "dse"]].to_string(float_format=lambda v: f"{v:.1f}"))
    print("\nLOO corrected for the variational approximation (run 0; loo_approximate_posterior with lp and log_q):")
    for name, res in loo["approximate"].items():
        print(f"  {name:<12} elpd = {res.elpd:.1f} ± {res.se:.1f}, Pareto k > {res.good_k:.2f} for "
              f"{int((res.pareto_k > res.good_k).sum()) if res.pareto_k is not None else 'n/a'} points")  # fmt: skip
    summary = ["| guide | " + " | ".join(keys) + " |", "|---" * (len(keys) + 1) + "|"]
    summary += [f"| {n} | " + " | ".join(f"{m[k]:.4f}" for k in keys) + " |" for n, m in metrics.items()]
    (args.out / "metrics.md").write_text("\n".join(summary) + "\n")
    print(f"\nreports: {', '.join(str(args.out / n.replace('-', '_') / 'report.html') for n in guides)}")
    return {"reports": reports, "metrics": metrics, "loo": loo}


if __name__ == "__main__":
    main()
