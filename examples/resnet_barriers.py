"""Loss barriers between independent Bayesian ResNets, before and after alignment.

Trains several independent posteriors of a small Bayesian ResNet
(``ps.models.BayesianResNet``: a ResNet-20-style network with BatchNorm and iid
``Normal(0, 1)`` priors on every parameter; ``--blocks 1 1 1`` gives a ResNet-8) on
scikit-learn's digits (8x8 images, one channel), each from its own seed (its own
initialization and minibatch order): mean-field VI (``AutoNormal``, ``Trace_ELBO``,
``--method vi``, the default) or a deep ensemble of MAP estimates (``AutoDelta``,
``--method map``). For every pair of runs it walks the path between the two (the
2-Wasserstein geodesic for Gaussians, linear in means and standard deviations; the
straight line for points: ``ps.interpolate``) and records the test NLL of the
predictive and its error rate; the barrier is the largest excess over the straight line
between the endpoint losses (``ps.loss_barrier``). Then it aligns the second run to the
first with ``ps.align`` and the model's spec (built by ``PermutationSpec.from_module``:
one tied group per residual stream, one group per block's inner channels) and measures
again.

The BatchNorm layers use batch statistics (the model keeps no running statistics), so at
every point of the path they are computed afresh on the test batch: the statistics reset
that interpolating BatchNorm networks needs (Jordan et al. 2022, REPAIR) happens by
construction. Rossi, Singh and Hannagan (NeurIPS 2023) report, for ResNet-20 on CIFAR-10,
large barriers between independent VI solutions before alignment and nearly zero after.

    python examples/resnet_barriers.py            # 3 runs; about 15 minutes on 2 busy CPU cores
    python examples/resnet_barriers.py --quick    # 2 short runs, 5 points per path: under a minute
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
from pyro.infer.autoguide import AutoDelta, AutoNormal, init_to_value  # noqa: E402
from sklearn.datasets import load_digits  # noqa: E402
from sklearn.model_selection import train_test_split  # noqa: E402
from tqdm import tqdm  # noqa: E402

import pyro_symmetry as ps  # noqa: E402


def load_data(seed: int = 0):
    """Digits as ``(N, 1, 8, 8)`` images in ``[0, 1]``: 1347 training and 450 test images."""
    x, y = load_digits(return_X_y=True)
    x_tr, x_te, y_tr, y_te = train_test_split(x / 16.0, y, test_size=0.25, random_state=seed, stratify=y)
    f, i = torch.float32, torch.long
    img = (-1, 1, 8, 8)
    return (
        torch.tensor(x_tr, dtype=f).reshape(img),
        torch.tensor(y_tr, dtype=i),
        torch.tensor(x_te, dtype=f).reshape(img),
        torch.tensor(y_te, dtype=i),
    )


def make_model(args):
    return ps.models.BayesianResNet(
        1, (8, 8), 10, width=args.width, blocks=args.blocks, norm=args.norm, prior_scale=args.prior_scale
    )


def fit_run(args, x, y, seed, progress):
    """One run from seed ``seed``: ``(model, posterior, final loss per datum)``.

    The posterior is ``site -> (loc, scale)`` (VI) or ``site -> tensor`` (MAP). Each run
    starts from its own Kaiming-initialized skeleton (``model.init_values()``, drawn from
    ``seed``) and sees its own minibatch order.
    """
    pyro.clear_param_store()
    pyro.set_rng_seed(seed)
    model = make_model(args)
    init = init_to_value(values=model.init_values())
    if args.method == "vi":
        guide = AutoNormal(model, init_loc_fn=init, init_scale=args.init_scale)
    else:
        guide = AutoDelta(model, init_loc_fn=init)
    optim = pyro.optim.ClippedAdam({"lr": args.lr, "lrd": 0.1 ** (1 / args.steps)})
    svi = SVI(model, guide, optim, Trace_ELBO())
    n = x.shape[0]
    gen = torch.Generator().manual_seed(seed)
    order, pos, losses = torch.randperm(n, generator=gen), 0, []
    for _ in tqdm(range(args.steps), desc=f"{args.method} run seed {seed}", disable=not progress, leave=False):
        if pos + args.batch_size > n:
            order, pos = torch.randperm(n, generator=gen), 0
        idx = order[pos : pos + args.batch_size]
        pos += args.batch_size
        losses.append(svi.step(x[idx], y[idx], num_data=n) / n)
    final = statistics.mean(losses[-max(1, args.steps // 20) :])
    if args.method == "vi":
        q = {k: (loc.detach().clone(), scale.detach().clone()) for k, (loc, scale) in ps.gaussian_params(guide).items()}
    else:
        q = {k: v.detach().clone() for k, v in ps.point_params(guide).items()}
    return model, q, final


def sq_distance(q0, q1) -> float:
    """``||mu0 - mu1||^2 + ||s0 - s1||^2`` (squared W2 between diagonal Gaussians) or ``||w0 - w1||^2``."""
    total = 0.0
    for k, a in q0.items():
        b = q1[k]
        pairs = zip(a, b) if isinstance(a, tuple) else [(a, b)]
        total += sum(float((u.double() - v.double()).pow(2).sum()) for u, v in pairs)
    return total


def stats(values):
    return statistics.mean(values), (statistics.stdev(values) if len(values) > 1 else 0.0)


def markdown_tables(rows, summary, endpoints, err_scale=100.0):
    pair_lines = [
        "| pair | distance² before | distance² after | NLL barrier before | NLL barrier after "
        "| error barrier before | error barrier after |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        pair_lines.append(
            f"| {r['pair'][0]}-{r['pair'][1]} | {r['dist before']:.1f} | {r['dist after']:.1f} "
            f"| {r['test NLL before']:.3f} | {r['test NLL after']:.3f} "
            f"| {err_scale * r['test error before']:.1f}% | {err_scale * r['test error after']:.1f}% |"
        )
    s = summary
    summary_lines = [
        "| barrier (mean ± sd over pairs) | before alignment | after alignment |",
        "|---|---:|---:|",
        f"| test NLL | {s['test NLL before'][0]:.3f} ± {s['test NLL before'][1]:.3f} "
        f"| {s['test NLL after'][0]:.3f} ± {s['test NLL after'][1]:.3f} |",
        f"| test error | {err_scale * s['test error before'][0]:.1f}% ± {err_scale * s['test error before'][1]:.1f}% "
        f"| {err_scale * s['test error after'][0]:.1f}% ± {err_scale * s['test error after'][1]:.1f}% |",
    ]
    nll_end, err_end = endpoints
    end_line = (
        f"endpoint runs: test NLL {statistics.mean(nll_end):.3f} (range {min(nll_end):.3f}-{max(nll_end):.3f}), "
        f"test error {err_scale * statistics.mean(err_end):.1f}% "
        f"(range {err_scale * min(err_end):.1f}-{err_scale * max(err_end):.1f}%)"
    )
    return "\n".join(pair_lines), "\n".join(summary_lines), end_line


def plot(curves, losses, method, path):
    fig, axes = plt.subplots(1, 2, figsize=(10, 3.6))
    geodesic = "W2 geodesic" if method == "vi" else "straight line"
    for ax, name in zip(axes, losses):
        scale = 100.0 if name == "test error" else 1.0
        for when, color in (("before", "tab:red"), ("after", "tab:blue")):
            for k, b in enumerate(curves[(name, when)]):
                label = f"{when} alignment" if k == 0 else None
                ax.plot(b.t.numpy(), scale * b.losses.numpy(), color=color, alpha=0.7, lw=1.3, marker=".", label=label)
        ax.set(xlabel=f"t ({geodesic} from run i to run j)", ylabel=name + (" (%)" if scale > 1 else ""))
        ax.legend()
    kind = "mean-field VI posteriors" if method == "vi" else "MAP estimates (deep ensemble)"
    fig.suptitle(f"Bayesian ResNet on digits: loss along the path between independent {kind}")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--method", choices=("vi", "map"), default="vi", help="mean-field VI or deep-ensemble MAP")
    parser.add_argument("--width", type=int, default=1, help="width multiplier (16k, 32k, 64k channels)")
    parser.add_argument("--blocks", type=int, nargs=3, default=[1, 1, 1], help="blocks per stage (3 3 3: ResNet-20)")
    parser.add_argument("--norm", choices=("batchnorm", "frn", "none"), default="batchnorm")
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--steps", type=int, default=1500, help="SVI steps per run")
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--lr", type=float, default=0.01, help="ClippedAdam learning rate (decays 10x over training)")
    parser.add_argument("--init-scale", type=float, default=0.01, help="initial standard deviation of AutoNormal")
    parser.add_argument("--prior-scale", type=float, default=1.0)
    parser.add_argument("--num-points", type=int, default=25, help="points per path, endpoints included")
    parser.add_argument("--mc-samples", type=int, default=8, help="weight draws per VI predictive")
    parser.add_argument("--quick", action="store_true", help="2 runs of 40 steps, 5 points per path (under a minute)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default="out/resnet_barriers")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (1 is fastest on a busy machine)")
    parser.add_argument("--no-progress", action="store_true")
    args = parser.parse_args(argv)
    if args.quick:
        args.runs, args.steps, args.batch_size, args.num_points, args.mc_samples = 2, 40, 64, 5, 4
    if args.runs < 2:
        parser.error("--runs must be at least 2 (barriers are between pairs of runs)")
    os.makedirs(args.out, exist_ok=True)
    progress = not args.no_progress
    torch.set_num_threads(args.threads)
    t_start = time.perf_counter()

    x_tr, y_tr, x_te, y_te = load_data(args.seed)
    t0 = time.perf_counter()
    fitted = [fit_run(args, x_tr, y_tr, args.seed + r, progress) for r in range(args.runs)]
    t_train = time.perf_counter() - t0
    model, runs = fitted[0][0], [q for _, q, _ in fitted]
    spec = model.spec  # PermutationSpec.from_module on the skeleton; the same for every run
    n_weights = sum(v.numel() for v in model.init_values().values())

    if args.method == "vi":
        kw = {"num_samples": args.mc_samples, "seed": args.seed}
        losses = {"test NLL": ps.gaussian_nll_loss(model, x_te, y_te, **kw)}
        losses["test error"] = ps.gaussian_error_loss(model, x_te, y_te, **kw)
        align_method = "wasserstein"
    else:
        losses = {"test NLL": ps.point_nll_loss(model, x_te, y_te)}
        losses["test error"] = ps.point_error_loss(model, x_te, y_te)
        align_method = "weights"
    pairs = list(itertools.combinations(range(args.runs), 2))
    curves = {(name, when): [] for name in losses for when in ("before", "after")}
    rows, t_align = [], 0.0
    per_run = {name: {} for name in losses}  # the endpoint losses of every run
    t0 = time.perf_counter()
    for i, j in tqdm(pairs, desc="pairs", disable=not progress, leave=False):
        ta = time.perf_counter()
        res = ps.align(runs[i], runs[j], spec, method=align_method, seed=args.seed)
        t_align += time.perf_counter() - ta
        row = {
            "pair": (i, j),
            "dist before": sq_distance(runs[i], runs[j]),
            "dist after": sq_distance(runs[i], res.aligned),
            "sweeps": res.sweeps,
            "converged": res.converged,
        }
        for name, loss in losses.items():
            for when, q1 in (("before", runs[j]), ("after", res.aligned)):
                b = ps.loss_barrier(loss, runs[i], q1, num_points=args.num_points)
                row[f"{name} {when}"] = b.barrier
                per_run[name][i], per_run[name][j] = float(b.losses[0]), float(b.losses[-1])
                curves[(name, when)].append(b)
        rows.append(row)
    t_eval = time.perf_counter() - t0

    arch = f"width {args.width}, blocks {'-'.join(map(str, args.blocks))}, {args.norm}"
    kind = "mean-field VI" if args.method == "vi" else "MAP (AutoDelta)"
    print(
        f"\n{args.runs} {kind} runs of a Bayesian ResNet ({arch}; {n_weights} weights, log|G| = {spec.log_order:.0f}) "
        f"on digits ({args.steps} steps of batch {args.batch_size} each, {t_train:.0f} s); final loss per datum "
        + ", ".join(f"{f:.2f}" for _, _, f in fitted)
        + f"\n{len(pairs)} pairs, {args.num_points} points per path"
        + (f", {args.mc_samples} MC draws" if args.method == "vi" else "")
        + f" ({t_eval:.0f} s, of which alignment {t_align:.1f} s; sweeps "
        + ", ".join(str(r["sweeps"]) for r in rows)
        + ")\n"
    )
    summary = {
        key: stats([r[key] for r in rows])
        for key in ("test NLL before", "test NLL after", "test error before", "test error after")
    }
    endpoints = (list(per_run["test NLL"].values()), list(per_run["test error"].values()))
    table_pairs, table_summary, end_line = markdown_tables(rows, summary, endpoints)
    print(table_pairs + "\n\n" + table_summary + "\n\n" + end_line)

    path = os.path.join(args.out, "barriers.png")
    plot(curves, losses, args.method, path)
    with open(os.path.join(args.out, "barriers.md"), "w") as fh:
        fh.write(f"# Barriers between {kind} runs of a Bayesian ResNet on digits\n\n")
        fh.write(f"{arch}; {args.runs} runs, {args.steps} steps each; {args.num_points} points per path\n\n")
        fh.write(table_pairs + "\n\n" + table_summary + "\n\n" + end_line + "\n")
    print(f"saved {path} and barriers.md ({time.perf_counter() - t_start:.0f} s in all)")
    return {"rows": rows, "summary": summary, "curves": curves}


if __name__ == "__main__":
    main()
