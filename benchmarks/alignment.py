"""Benchmark: aligning two MLPs up to permutation (Wasserstein and weight matching).

For a 784-512-512-512-10 and a 784-2048-2048-10 MLP, network B is network A with
planted hidden-layer permutations plus Gaussian noise at 10% of each layer's weight
scale (for the Wasserstein variant A also has standard deviations, permuted along
and perturbed by 10%). Each aligner must map B back onto A; the table shows the
median wall time over repeats, ratios against a plain reference implementation
written here (numpy float64, every similarity recomputed every step, identity
start: Git Re-Basin weight matching as published) and against the PyPI package
``rebasin`` (``PermutationCoordinateDescent``, weights variant only; skipped with a
note when it is not installed), and whether the planted permutation was recovered.

Run::

    python benchmarks/alignment.py               # both networks, 3 repeats
    python benchmarks/alignment.py --quick       # 512 network, 1 repeat
"""

from __future__ import annotations

import argparse
import copy
import statistics
import time

import numpy as np
import torch
from scipy.optimize import linear_sum_assignment
from torch import nn

import pyro_symmetry as ps

NETWORKS = {"512": [784, 512, 512, 512, 10], "2048": [784, 2048, 2048, 10]}


# ---------------------------------------------------------------------------- data
def mlp_module(sizes):
    layers = []
    for a, b in zip(sizes[:-1], sizes[1:]):
        layers += [nn.Linear(a, b), nn.ReLU()]
    return nn.Sequential(*layers[:-1])


def make_pair(sizes, seed):
    """``(module A, module B, spec, planted g, A weights, B weights, A stds, B stds)``."""
    gen = torch.Generator().manual_seed(seed)
    net_a, net_b = mlp_module(sizes), mlp_module(sizes)
    spec = ps.PermutationSpec.from_module(net_a)
    w_a = {k: torch.randn(v.shape, generator=gen) / v.shape[-1] ** 0.5 for k, v in net_a.state_dict().items()}
    sd_a = {k: (0.5 + torch.rand(v.shape, generator=gen)) * 0.1 / v.shape[-1] ** 0.5 for k, v in w_a.items()}
    g = spec.sample(generator=gen)
    w_b = spec.apply(w_a, g)
    sd_b = spec.apply(sd_a, g)
    for k in w_b:
        scale = w_a[k].std()
        w_b[k] = w_b[k] + 0.1 * scale * torch.randn(w_b[k].shape, generator=gen)
        sd_b[k] = (sd_b[k] + 0.1 * sd_a[k].std() * torch.randn(sd_b[k].shape, generator=gen)).abs()
    net_a.load_state_dict(w_a)
    net_b.load_state_dict(w_b)
    return net_a, net_b, spec, g, w_a, w_b, sd_a, sd_b


# ---------------------------------------------------------------------------- plain reference
def plain_align(A, B, sdA=None, sdB=None, max_sweeps=100, seed=0):
    """Git Re-Basin weight matching (or its Wasserstein form), numpy float64, no caching.

    ``A``/``B``: lists of ``(W, b)`` per layer. Returns the hidden permutations
    (``p[i]``: the neuron of B placed at position i) and the number of sweeps.
    """
    L = len(A)
    perms = [np.arange(A[l][0].shape[0]) for l in range(L - 1)]
    chans = [(A, B)] + ([(sdA, sdB)] if sdA is not None else [])
    rng = np.random.default_rng(seed)
    sweep = 0
    for sweep in range(1, max_sweeps + 1):  # noqa: B007  (returned)
        changed = False
        for l in rng.permutation(L - 1):
            n = A[l][0].shape[0]
            S = np.zeros((n, n))
            for a, b in chans:
                w_in = b[l][0][:, perms[l - 1]] if l > 0 else b[l][0]
                S += a[l][0] @ w_in.T + np.outer(a[l][1], b[l][1])
                w_out = b[l + 1][0][perms[l + 1], :] if l + 1 < L - 1 else b[l + 1][0]
                S += a[l + 1][0].T @ w_out
            col = linear_sum_assignment(S, maximize=True)[1]
            rows = np.arange(n)
            if S[rows, col].sum() > S[rows, perms[l]].sum() + 1e-12:
                perms[l], changed = col, True
        if not changed:
            break
    return perms, sweep


def as_layers(w, names):
    return [(w[f"{k}.weight"].double().numpy(), w[f"{k}.bias"].double().numpy()) for k in names]


# ---------------------------------------------------------------------------- runners
def aligners(sizes, seed, rebasin_mod):
    """``(network, variant, label, run)`` where ``run()`` returns ``(sweeps, recovered)``."""
    net_a, net_b, spec, g, w_a, w_b, sd_a, sd_b = make_pair(sizes, seed)
    inv = spec.inverse(g)
    names = [str(2 * i) for i in range(len(sizes) - 1)]
    out = []
    for variant in ("weights", "wasserstein"):
        wass = variant == "wasserstein"
        q0 = {k: (w_a[k], sd_a[k]) for k in w_a} if wass else w_a
        q1 = {k: (w_b[k], sd_b[k]) for k in w_b} if wass else w_b
        layers = [as_layers(w, names) if w is not None else None for w in (w_a, w_b, sd_a, sd_b)]
        if not wass:
            layers[2:] = [None, None]

        def plain(layers=layers):
            perms, sweeps = plain_align(*layers, seed=seed)
            return sweeps, all(np.array_equal(p, inv[k].numpy()) for p, k in zip(perms, spec.groups))

        out.append((variant, PLAIN, plain))
        for label, init in ((OURS, "greedy"), (OURS_ID, "identity")):

            def ours(q0=q0, q1=q1, variant=variant, init=init):
                res = ps.align(q0, q1, spec, method=variant, seed=seed, init=init)
                return res.sweeps, all(torch.equal(res.permutation[k], inv[k]) for k in spec.groups)

            out.append((variant, label, ours))
        if not wass and rebasin_mod is not None:
            target = spec.apply(w_b, inv)

            def rebasin_run(target=target):
                nb = copy.deepcopy(net_b)  # rebasin permutes model_b in place
                x = torch.randn(1, sizes[0])
                t0 = time.perf_counter()
                rebasin_mod.PermutationCoordinateDescent(net_a, nb, x).rebasin()
                elapsed = time.perf_counter() - t0
                return None, all(torch.allclose(nb.state_dict()[k], target[k]) for k in target), elapsed

            out.append((variant, REBASIN, rebasin_run))
    return out


PLAIN = "plain reference (numpy float64)"
OURS = "pyro_symmetry"
OURS_ID = "pyro_symmetry, identity start"
REBASIN = "rebasin (PyPI, PermutationCoordinateDescent)"


def run_network(name, sizes, repeats, seed, rebasin_mod):
    """Round-robin repeats (every aligner once per round) so that load drift on a shared
    machine hits all of them alike; ratios are medians of the per-round ratios."""
    runs = aligners(sizes, seed, rebasin_mod)
    times = {(v, label): [] for v, label, _ in runs}
    info = {}
    for _ in range(repeats):
        for variant, label, fn in runs:
            t0 = time.perf_counter()
            out = fn()
            elapsed = out[2] if len(out) == 3 else time.perf_counter() - t0
            times[(variant, label)].append(elapsed)
            info[(variant, label)] = out[:2]
    rows = []
    for variant, label, _ in runs:
        t = times[(variant, label)]
        r_plain = statistics.median(a / b for a, b in zip(t, times[(variant, PLAIN)]))
        rb = times.get((variant, REBASIN))
        r_rb = statistics.median(a / b for a, b in zip(t, rb)) if rb else None
        sweeps, ok = info[(variant, label)]
        rows.append((name, variant, label, statistics.median(t), r_plain, r_rb, sweeps, ok))
    return rows


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="512 network only, 1 repeat")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--networks", nargs="+", default=list(NETWORKS), choices=list(NETWORKS))
    parser.add_argument(
        "--threads", type=int, default=1, help="torch and BLAS threads for every aligner (1: the quoted figures)"
    )
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    from threadpoolctl import threadpool_limits

    threadpool_limits(args.threads)  # numpy's BLAS, for the plain reference
    if args.quick:
        args.networks, args.repeats = ["512"], 1
    try:
        import rebasin as rebasin_mod
    except ImportError:
        rebasin_mod = None
        print("note: the PyPI package `rebasin` is not importable; its rows are skipped")
    rows = []
    for name in args.networks:
        rows += run_network(name, NETWORKS[name], args.repeats, args.seed, rebasin_mod)
    print(
        f"\nmedian wall time over {args.repeats} round-robin repeat(s); ratios are medians of per-round ratios; "
        f"torch/BLAS threads = {args.threads}\n"
    )
    print("| network | variant | aligner | time (s) | / plain | / rebasin | sweeps | recovered |")
    print("|---|---|---|---:|---:|---:|---:|---|")
    for name, variant, label, t, r_plain, r_rb, sw, ok in rows:
        arch = "-".join(map(str, NETWORKS[name]))
        rb = "" if r_rb is None else f"{r_rb:.3f}"
        print(
            f"| {arch} | {variant} | {label} | {t:.3f} | {r_plain:.3f} | {rb} | {sw if sw is not None else ''} | {ok} |"
        )


if __name__ == "__main__":
    main()
