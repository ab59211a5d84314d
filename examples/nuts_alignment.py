"""NUTS chains of a tanh BNN disagree because of symmetry, and agree once aligned.

Four NUTS chains of a small Bayesian MLP with tanh activations on scikit-learn's
diabetes data (10 features, 442 patients, standardized) land in different relabelings
(and sign flips) of the same posterior modes, so R-hat per weight says the chains have
not mixed. ``ps.align_samples`` aligns every draw of every chain to the barycenter of
the aligned draws, once with plain permutations and once with signed permutations
(tanh is odd: negating a neuron's incoming weights, bias and outgoing weights keeps the
function). The table gives rank-normalized split R-hat (``arviz_stats.rhat``) over all
weights before and after; the figure shows their distributions.

    python examples/nuts_alignment.py            # about 5 minutes on 2 CPU cores
    python examples/nuts_alignment.py --quick    # under a minute
"""

from __future__ import annotations

import argparse
import os
import time

import arviz_stats
import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pyro  # noqa: E402
import torch  # noqa: E402
from pyro.infer import MCMC, NUTS  # noqa: E402
from sklearn.datasets import load_diabetes  # noqa: E402

import pyro_symmetry as ps  # noqa: E402


def load_data():
    x, y = load_diabetes(return_X_y=True)
    x = (x - x.mean(0)) / x.std(0)
    y = (y - y.mean()) / y.std()
    return torch.tensor(x, dtype=torch.float32), torch.tensor(y, dtype=torch.float32)


def potential(model, x, y, obs_scale):
    """``-log p(w, y | x)`` for the model's iid Normal prior and Normal likelihood, in plain
    torch through ``model.functional`` (much cheaper per gradient than tracing the Pyro model)."""
    prior = torch.distributions.Normal(0.0, model.prior_scale)

    def fn(params):
        lp = sum(prior.log_prob(v).sum() for v in params.values())
        out = model.functional(params, x).squeeze(-1)
        return -(lp + torch.distributions.Normal(out, obs_scale).log_prob(y).sum())

    return fn


def run_chains(model, x, y, num_chains, num_samples, warmup, seed, progress, max_depth=6):
    """Independent NUTS chains from dispersed random starts (one after the other: two
    cores leave no room for Pyro's multiprocessing chains)."""
    draws = []
    for c in range(num_chains):
        pyro.set_rng_seed(seed + c)
        gen = torch.Generator().manual_seed(seed + c)
        init = {k: torch.randn(model.spec.shapes[k], generator=gen) for k in model.site_names}
        kernel = NUTS(
            potential_fn=potential(model, x, y, model.obs_scale),
            jit_compile=True,
            ignore_jit_warnings=True,
            max_tree_depth=max_depth,  # bounds the cost per draw
        )
        mcmc = MCMC(
            kernel, num_samples=num_samples, warmup_steps=warmup, initial_params=init, disable_progbar=not progress
        )
        mcmc.run()
        draws.append(mcmc.get_samples())
    return {k: torch.stack([d[k] for d in draws]) for k in draws[0]}  # (chains, draws, *shape)


def rhat_per_weight(samples, sites):
    """Rank-normalized split R-hat of every scalar weight, pooled over sites."""
    out = [np.asarray(arviz_stats.rhat(samples[s].double().numpy(), chain_axis=0, draw_axis=1)).ravel() for s in sites]
    return np.concatenate(out)


def summarize(name, r):
    return {
        "draws": name,
        "max": float(np.max(r)),
        "median": float(np.median(r)),
        "frac_gt_1.1": float(np.mean(r > 1.1)),
        "frac_gt_1.01": float(np.mean(r > 1.01)),
    }


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--hidden", type=int, default=8, help="hidden width")
    parser.add_argument("--chains", type=int, default=4)
    parser.add_argument("--samples", type=int, default=400)
    parser.add_argument("--warmup", type=int, default=300)
    parser.add_argument("--max-tree-depth", type=int, default=6, help="NUTS tree depth cap (cost per draw)")
    parser.add_argument("--quick", action="store_true", help="fewer, cheaper draws (under a minute)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default="out/nuts_alignment")
    parser.add_argument("--no-progress", action="store_true")
    args = parser.parse_args(argv)
    if args.quick:
        args.samples, args.warmup, args.max_tree_depth = 75, 75, 5
    os.makedirs(args.out, exist_ok=True)
    torch.set_num_threads(1)  # NUTS on a tiny model: threads cost more than they give

    x, y = load_data()
    model = ps.models.BayesianMLP(
        x.shape[1], [args.hidden], 1, activation="tanh", likelihood="regression", obs_scale=0.75
    )
    t0 = time.perf_counter()
    draws = run_chains(
        model, x, y, args.chains, args.samples, args.warmup, args.seed, not args.no_progress, args.max_tree_depth
    )
    t_mcmc = time.perf_counter() - t0
    sites = list(model.spec.sites)

    t0 = time.perf_counter()
    plain = ps.align_samples(draws, model.spec, "barycenter", signs=False, seed=args.seed)
    signed = ps.align_samples(draws, model.spec, "barycenter", seed=args.seed)
    t_align = time.perf_counter() - t0

    rows = [
        summarize("raw chains", rhat_per_weight(draws, sites)),
        summarize("aligned, permutations", rhat_per_weight(plain.aligned, sites)),
        summarize("aligned, signed permutations", rhat_per_weight(signed.aligned, sites)),
    ]
    n_w = sum(int(np.prod(model.spec.shapes[s])) for s in sites)
    print(
        f"\n{args.chains} NUTS chains x {args.samples} draws (warmup {args.warmup}), "
        f"10-{args.hidden}-1 tanh MLP on diabetes, {n_w} weights; MCMC {t_mcmc:.0f} s, "
        f"both alignments {t_align:.1f} s\n"
    )
    print("| draws | max R-hat | median R-hat | share > 1.1 | share > 1.01 |")
    print("|---|---:|---:|---:|---:|")
    for r in rows:
        print(
            f"| {r['draws']} | {r['max']:.3f} | {r['median']:.3f} | {100 * r['frac_gt_1.1']:.0f}% "
            f"| {100 * r['frac_gt_1.01']:.0f}% |"
        )
    # Aligning changes labels, never the function: predictions are identical.
    pred_raw = model.functional(draws, x).mean((0, 1))
    pred_al = model.functional(signed.aligned, x).mean((0, 1))
    print(f"\nmax |prediction change| after alignment: {float((pred_raw - pred_al).abs().max()):.2e}")

    fig, axes = plt.subplots(1, 3, figsize=(14, 3.6))
    raw_r = {s: np.asarray(arviz_stats.rhat(draws[s].double().numpy(), chain_axis=0, draw_axis=1)) for s in sites}
    bins = np.linspace(1.0, max(1.15, 1.02 * max(r["max"] for r in rows)), 40)
    for (label, smp), color in zip(
        [("raw chains", draws), ("permutations", plain.aligned), ("signed permutations", signed.aligned)],
        ["tab:red", "tab:orange", "tab:blue"],
    ):
        values = np.clip(rhat_per_weight(smp, sites), 1.0, bins[-1])
        axes[0].hist(values, bins=bins, alpha=0.55, label=label, color=color)
    axes[0].axvline(1.1, color="k", ls="--", lw=1)
    axes[0].set(xlabel="split R-hat per weight", ylabel="weights", title="R-hat before / after alignment")
    axes[0].legend()
    # The weight whose chains disagree most before alignment, and the same weight after.
    worst = max(sites, key=lambda k: raw_r[k].max())
    index = tuple(int(i) for i in np.unravel_index(int(np.argmax(raw_r[worst])), raw_r[worst].shape))
    for ax, smp, title in ((axes[1], draws, "raw chains"), (axes[2], signed.aligned, "aligned (signed)")):
        for c in range(args.chains):
            ax.plot(smp[worst][(c, slice(None), *index)].numpy(), lw=0.7, label=f"chain {c}")
        ax.set(xlabel="draw", ylabel=f"{worst}{list(index)}", title=f"{title}: worst weight")
    axes[1].legend(fontsize=7)
    fig.tight_layout()
    path = os.path.join(args.out, "rhat.png")
    fig.savefig(path, dpi=110)
    print(f"saved {path}")
    return {"rows": rows, "t_mcmc": t_mcmc, "t_align": t_align}


if __name__ == "__main__":
    main()
