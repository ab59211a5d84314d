"""Canonical forms: removing scaling and permutation symmetries from VI posteriors.

Several independent mean-field VI runs of a ReLU Bayesian MLP on scikit-learn's digits
each land on a different symmetric copy of (roughly) the same solution: their neurons
are permuted and, because ReLU is positively homogeneous, rescaled. Following Laurent,
Aldea and Franchi (ICLR 2024), this example

1. measures the *mass excess* of every posterior sample, ``M(w) / M(min_mass(w)) - 1``
   (how much squared weight norm the scaling symmetry adds; they report roughly
   10-60 % for trained networks);
2. maps every sample to a canonical representative of its symmetry orbit
   (``ps.canonicalize``: minimum mass, then sorting neurons by norm or aligning them
   to one draw or to the barycenter of all draws) and plots a few weights' marginals
   before and after, one colour per run;
3. compares two groups of runs with a kernel two-sample test (MMD) before and after
   removing the symmetries.

    python examples/canonical_forms.py           # 8 runs, about 1.5 minutes on 2 CPU cores
    python examples/canonical_forms.py --quick   # 4 runs, under a minute
"""

from __future__ import annotations

import argparse
import os
import time

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import pyro  # noqa: E402
import torch  # noqa: E402
from pyro.infer.autoguide import AutoNormal  # noqa: E402
from sklearn.datasets import load_digits  # noqa: E402
from sklearn.model_selection import train_test_split  # noqa: E402

import pyro_symmetry as ps  # noqa: E402


def load_data(seed: int):
    x, y = load_digits(return_X_y=True)
    x_tr, x_te, y_tr, y_te = train_test_split(x / 16.0, y, test_size=0.25, random_state=seed, stratify=y)
    f, i = torch.float32, torch.long
    return torch.tensor(x_tr, dtype=f), torch.tensor(y_tr, dtype=i), torch.tensor(x_te, dtype=f), torch.tensor(y_te)


def posterior_samples(runs, num_samples: int, seed: int) -> dict[str, torch.Tensor]:
    """``site -> (runs, num_samples, *shape)`` float64 draws from each run's mean-field guide."""
    gen = torch.Generator().manual_seed(seed)
    per_run = [ps.gaussian_params(run.guide) for run in runs]
    out = {}
    for site in per_run[0]:
        draws = []
        for q in per_run:
            loc, scale = (t.double() for t in q[site])
            draws.append(loc + scale * torch.randn((num_samples,) + loc.shape, generator=gen, dtype=loc.dtype))
        out[site] = torch.stack(draws)
    return out


def flat(samples, sites):
    """``(R, S, *shape)`` -> ``(R * S, D)`` over the given sites."""
    return torch.cat([samples[k].flatten(2) for k in sites], dim=-1).flatten(0, 1)


def variance_ratio(x: torch.Tensor) -> float:
    """Mean over coordinates of between-run over within-run variance (``x``: ``(R, S, D)``).

    Near 1/S for runs that agree; large when the runs sit in different modes.
    """
    between = x.mean(1).var(0)
    within = x.var(1).mean(0)
    return float((between / within).mean())


def markdown_table(header, rows):
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--hidden", type=int, nargs="+", default=[32, 32], help="hidden widths (ReLU)")
    parser.add_argument("--runs", type=int, default=8, help="independent VI runs (an even number)")
    parser.add_argument("--steps", type=int, default=3000, help="SVI steps per run")
    parser.add_argument("--samples", type=int, default=200, help="posterior draws per run")
    parser.add_argument("--lr", type=float, default=0.02, help="ClippedAdam learning rate")
    parser.add_argument("--quick", action="store_true", help="4 runs, 300 steps, 100 draws (under a minute)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default="out/canonical_forms", help="directory for the figures")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (1 is fastest for these small nets)")
    parser.add_argument("--no-progress", action="store_true")
    args = parser.parse_args(argv)
    if args.quick:
        args.runs, args.steps, args.samples = 4, 300, 100
    if args.runs < 2 or args.runs % 2:
        parser.error("--runs must be an even number >= 2 (two groups of runs are compared)")
    os.makedirs(args.out, exist_ok=True)
    torch.set_num_threads(args.threads)
    t0 = time.perf_counter()

    # ------------------------------------------------------------------ VI runs
    x_tr, y_tr, x_te, y_te = load_data(args.seed)
    hidden = list(args.hidden)

    def make_model():
        return ps.models.BayesianMLP(64, hidden, 10, activation="relu", prior_scale=1.0)

    runs = ps.train_runs(
        make_model,
        lambda m: AutoNormal(m, init_scale=0.05),
        (x_tr, y_tr),
        args.runs,
        steps=args.steps,
        seed=args.seed,
        optim=pyro.optim.ClippedAdam({"lr": args.lr}),
        progress=not args.no_progress,
    )
    t_train = time.perf_counter() - t0
    model = make_model()
    spec = model.spec
    samples = posterior_samples(runs, args.samples, args.seed)  # (R, S, *shape)
    R, S = args.runs, args.samples
    probs = torch.softmax(model.functional(samples, x_te.double()), -1).mean(1)  # (R, N, 10)
    accuracy = (probs.argmax(-1) == y_te).double().mean(-1)

    # ------------------------------------------------------------------ 1. mass excess
    mm = ps.min_mass(samples, spec)
    excess = 100 * (mm.mass_before / mm.mass_after - 1)  # (R, S), percent
    means = {k: v.mean(1) for k, v in samples.items()}
    excess_mean = 100 * (ps.min_mass(means, spec).mass_before / ps.min_mass(means, spec).mass_after - 1)
    rows = []
    for r in range(R):
        q = torch.quantile(excess[r], torch.tensor([0.05, 0.5, 0.95], dtype=excess.dtype))
        rows.append(
            [r, f"{100 * accuracy[r]:.1f}", f"{q[1]:.1f}", f"[{q[0]:.1f}, {q[2]:.1f}]", f"{excess_mean[r]:.1f}"]
        )
    print("\nMass excess M(w) / M(min_mass(w)) - 1 of the posterior draws, per VI run")
    print(f"(min_mass: {mm.iterations} sweeps, max residual {mm.residual.max():.1e}, all converged: "
          f"{mm.converged})\n")  # fmt: skip
    table1 = markdown_table(
        ["run", "test accuracy (%)", "excess, median (%)", "excess, 5-95% (%)", "excess of the mean (%)"], rows
    )
    print(table1)

    fig, ax = plt.subplots(figsize=(6, 3.2))
    ax.hist([excess[r].numpy() for r in range(R)], bins=30, stacked=True, label=[f"run {r}" for r in range(R)])
    ax.set_xlabel("mass excess before min-mass (%)")
    ax.set_ylabel("posterior draws")
    ax.set_title(f"{R} VI runs, {S} draws each: M(w) / M(min-mass w) - 1")
    ax.legend(fontsize=7, ncol=2)
    fig.tight_layout()
    fig.savefig(os.path.join(args.out, "mass_excess.png"), dpi=100)
    plt.close(fig)

    # ------------------------------------------------------------------ 2. canonical forms
    pooled = {k: v.flatten(0, 1) for k, v in samples.items()}  # (R * S, *shape)
    unflat = lambda d: {k: v.reshape((R, S) + v.shape[1:]) for k, v in d.items()}  # noqa: E731
    variants = {
        "raw": samples,
        "min-mass only": mm.params,
        "min-mass + sort": unflat(ps.canonicalize(pooled, spec, permutation="sort").params),
        "min-mass + align (to the first draw)": unflat(ps.canonicalize(pooled, spec, permutation="align").params),
        "min-mass + align (barycenter)": unflat(
            ps.canonicalize(pooled, spec, permutation="align", reference="barycenter").params
        ),
    }
    sites = list(spec.sites)

    # Marginals: the hidden-to-hidden weights whose run means disagree most before.
    raw = variants["raw"]["fc2.weight"].flatten(2)  # (R, S, D)
    spread = raw.mean(1).var(0) / raw.var(1).mean(0)
    coords = spread.argsort(descending=True)[:4]
    fig, axes = plt.subplots(2, 4, figsize=(11, 4.6))
    for row, name in enumerate(["raw", "min-mass + align (to the first draw)"]):
        w = variants[name]["fc2.weight"].flatten(2)
        for col, c in enumerate(coords.tolist()):
            ax = axes[row, col]
            lo, hi = torch.quantile(w[..., c], torch.tensor([0.005, 0.995], dtype=w.dtype)).tolist()
            for r in range(R):
                ax.hist(w[r, :, c].numpy(), bins=40, range=(lo, hi), histtype="step", density=True)
            i, j = divmod(c, hidden[0])
            ax.set_title(f"fc2.weight[{i}, {j}]" + ("" if row else " (raw)"), fontsize=9)
            ax.tick_params(labelsize=7)
        axes[row, 0].set_ylabel("before" if row == 0 else "after canonicalization", fontsize=9)
    fig.suptitle("Marginals of four weights, one colour per VI run (top: raw, bottom: min-mass + alignment)")
    fig.tight_layout()
    fig.savefig(os.path.join(args.out, "marginals.png"), dpi=100)
    plt.close(fig)

    # ------------------------------------------------------------------ 3. MMD between groups of runs
    half = R // 2
    rows = []
    results = {}
    for name, d in variants.items():
        x = {k: d[k][:half].flatten(0, 1) for k in sites}
        y = {k: d[k][half:].flatten(0, 1) for k in sites}
        res = ps.diagnostics.mmd(x, y, kernel="gaussian", num_permutations=200, seed=args.seed)
        # the same test between two halves of every run's draws: what "no difference" looks like
        x0 = {k: d[k][:, : S // 2].flatten(0, 1) for k in sites}
        y0 = {k: d[k][:, S // 2 :].flatten(0, 1) for k in sites}
        null = ps.diagnostics.mmd(x0, y0, kernel="gaussian", num_permutations=200, seed=args.seed)
        ratio = variance_ratio(torch.cat([d[k].flatten(2) for k in sites], -1))
        results[name] = (res.mmd2, res.p_value, null.mmd2, ratio)
        rows.append([name, f"{res.mmd2:.4f}", f"{res.p_value:.3f}", f"{null.mmd2:.4f}", f"{ratio:.2f}"])
    print(f"\nRuns 0-{half - 1} against runs {half}-{R - 1}: unbiased MMD^2 (Gaussian kernel, median-distance "
          f"bandwidth; p-value: MMDAgg-style permutation test, 200 permutations)\n")  # fmt: skip
    table2 = markdown_table(
        [
            "samples",
            "MMD^2, group A vs B",
            "p-value",
            "MMD^2, first vs second half of each run's draws",
            "between/within-run variance",
        ],
        rows,
    )
    print(table2)
    print(f"\nfigures in {args.out}/ ({time.perf_counter() - t0:.0f} s, of which training {t_train:.0f} s)")
    return {"excess": excess, "accuracy": accuracy, "mmd": results, "variants": variants}


if __name__ == "__main__":
    main()
