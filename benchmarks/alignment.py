"""Benchmark: aligning two networks up to permutation (Wasserstein and weight matching).

For a 784-512-512-512-10 and a 784-2048-2048-10 MLP, network B is network A with
planted hidden-layer permutations plus Gaussian noise at 10% of each layer's weight
scale (for the Wasserstein variant A also has standard deviations, permuted along
and perturbed by 10%). Each aligner must map B back onto A; the table shows the
median wall time over repeats, ratios against a plain reference implementation
written here (numpy float64, every similarity recomputed every step, identity
start: Git Re-Basin weight matching as published) and against the PyPI package
``rebasin`` (``PermutationCoordinateDescent``, weights variant only; skipped with a
note when it is not installed), and whether the planted permutation was recovered.

The ``resnet18`` row does the same for a torchvision-layout ResNet-18 (width 64, 11.2M
parameters, BatchNorm with running statistics; ``tests/architectures.py``) whose spec is
built by ``PermutationSpec.from_module`` (4 tied residual streams, 8 inner channel sets).
Its plain reference is the same coordinate descent extended to any spec: for each group,
every site the group touches is re-permuted by the other groups' current permutations
(``spec.action(site).apply``), cut into per-neuron rows (``unit_blocks``) and multiplied
out in numpy float64, then one ``linear_sum_assignment`` per group per sweep.

Run::

    python benchmarks/alignment.py               # both MLPs and ResNet-18, 3 repeats
    python benchmarks/alignment.py --networks resnet18 --repeats 5
    python benchmarks/alignment.py --quick       # 512 network, 1 repeat
"""

from __future__ import annotations

import argparse
import copy
import os
import pathlib
import statistics
import sys
import time

import numpy as np
import torch
from scipy.optimize import linear_sum_assignment
from torch import nn

import pyro_symmetry as ps

NETWORKS = {"512": [784, 512, 512, 512, 10], "2048": [784, 2048, 2048, 10], "resnet18": None}
LABELS = {"512": "784-512-512-512-10", "2048": "784-2048-2048-10", "resnet18": "ResNet-18 (11.2M, from_module spec)"}


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


# ---------------------------------------------------------------------------- ResNet-18
def resnet18():
    sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1] / "tests"))
    from architectures import ResNet18

    return ResNet18().eval()  # eval: rebasin traces the nets with a forward; no batch statistics needed


def random_state(net, gen):
    """Random floating state: conv/linear weights ``N(0, 1/fan_in)``, BatchNorm weights and running
    variances around 1, biases and running means ``N(0, 0.1^2)``."""
    out = {}
    for k, v in net.state_dict().items():
        if not v.is_floating_point():
            continue
        if v.dim() > 1:
            out[k] = torch.randn(v.shape, generator=gen) / v[0].numel() ** 0.5
        elif k.endswith(("running_var", ".weight")):
            out[k] = 0.5 + torch.rand(v.shape, generator=gen)
        else:
            out[k] = 0.1 * torch.randn(v.shape, generator=gen)
    return out


def make_resnet_pair(seed):
    """As :func:`make_pair` for ResNet-18: B = planted permutation of A plus 10% noise."""
    gen = torch.Generator().manual_seed(seed)
    net_a, net_b = resnet18(), resnet18()
    times = []
    for _ in range(2):  # the first call of a process also pays one-time imports
        t0 = time.perf_counter()
        spec = ps.PermutationSpec.from_module(net_a)
        times.append(time.perf_counter() - t0)
    print(
        f"ResNet-18: from_module {times[0]:.2f} s (first call), {times[1]:.2f} s (second); "
        f"{len(spec.groups)} groups, log|G| = {spec.log_order:.0f}"
    )
    w_a = random_state(net_a, gen)
    sd_a = {k: (0.5 + torch.rand(v.shape, generator=gen)) * 0.1 * v.std() for k, v in w_a.items()}
    g = spec.sample(generator=gen)
    w_b, sd_b = spec.apply(w_a, g), spec.apply(sd_a, g)
    for k in w_b:
        w_b[k] = w_b[k] + 0.1 * w_a[k].std() * torch.randn(w_b[k].shape, generator=gen)
        if k.endswith("running_var"):
            w_b[k] = w_b[k].abs()
        sd_b[k] = (sd_b[k] + 0.1 * sd_a[k].std() * torch.randn(sd_b[k].shape, generator=gen)).abs()
    net_a.load_state_dict(w_a, strict=False)
    net_b.load_state_dict(w_b, strict=False)
    return net_a, net_b, spec, g, w_a, w_b, sd_a, sd_b


def plain_align_spec(spec, A, B, sdA=None, sdB=None, max_sweeps=100, seed=0):
    """The plain reference of :func:`plain_align` extended to any spec without nested groups.

    ``A``/``B``: ``site -> float64 tensor``. For each group, every site it touches is
    re-permuted by the other groups' current permutations, cut into per-neuron rows and
    multiplied out in numpy float64 (nothing cached); one ``linear_sum_assignment`` per group
    per sweep, identity start, groups in a seeded random order until a sweep changes nothing.
    Returns ``(group -> permutation, sweeps)`` with ``p[i]`` the neuron of B placed at i.
    """
    if any(g.parent is not None for g in spec.groups.values()):
        raise ValueError("plain_align_spec handles specs without nested groups only")
    names = list(spec.groups)
    perms = {g: torch.arange(spec.groups[g].size) for g in names}
    sites = {g: [s for s in spec.sites if g in spec.action(s).groups] for g in names}
    chans = [(A, B)] + ([(sdA, sdB)] if sdA is not None else [])
    rng = np.random.default_rng(seed)
    sweep = 0
    for sweep in range(1, max_sweeps + 1):  # noqa: B007  (returned)
        changed = False
        for gi in rng.permutation(len(names)):
            g = names[gi]
            n = spec.groups[g].size
            S = np.zeros((n, n))
            for a, b in chans:
                for site in sites[g]:
                    act = spec.action(site)
                    b_other = act.apply(b[site], perms, skip=(g,))
                    S += act.unit_blocks(a[site], g).numpy() @ act.unit_blocks(b_other, g).numpy().T
            col = linear_sum_assignment(S, maximize=True)[1]
            rows = np.arange(n)
            if S[rows, col].sum() > S[rows, perms[g].numpy()].sum() + 1e-12:
                perms[g], changed = torch.from_numpy(col), True
        if not changed:
            break
    return perms, sweep


def resnet_aligners(seed, rebasin_mod):
    """As :func:`aligners` for the ResNet-18 pair."""
    net_a, net_b, spec, g, w_a, w_b, sd_a, sd_b = make_resnet_pair(seed)
    inv = spec.inverse(g)
    out = []
    for variant in ("weights", "wasserstein"):
        wass = variant == "wasserstein"
        q0 = {k: (w_a[k], sd_a[k]) for k in w_a} if wass else w_a
        q1 = {k: (w_b[k], sd_b[k]) for k in w_b} if wass else w_b
        f64 = [{k: v.double() for k, v in d.items()} for d in (w_a, w_b, sd_a, sd_b)]
        if not wass:
            f64[2:] = [None, None]

        def plain(f64=f64):
            perms, sweeps = plain_align_spec(spec, *f64, seed=seed)
            return sweeps, all(torch.equal(perms[k], inv[k]) for k in spec.groups)

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
                x = torch.randn(2, 3, 32, 32)
                t0 = time.perf_counter()
                rebasin_mod.PermutationCoordinateDescent(net_a, nb, x).rebasin()
                elapsed = time.perf_counter() - t0
                state = nb.state_dict()
                return None, all(torch.allclose(state[k], target[k]) for k in target), elapsed

            out.append((variant, REBASIN, rebasin_run))
    return out


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
    runs = resnet_aligners(seed, rebasin_mod) if sizes is None else aligners(sizes, seed, rebasin_mod)
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
    load_before = os.getloadavg()
    for name in args.networks:
        rows += run_network(name, NETWORKS[name], args.repeats, args.seed, rebasin_mod)
    load_after = os.getloadavg()
    print(
        f"\nmedian wall time over {args.repeats} round-robin repeat(s); ratios are medians of per-round ratios; "
        f"torch/BLAS threads = {args.threads}; load average (1, 5, 15 min) "
        f"{' '.join(f'{v:.1f}' for v in load_before)} before, {' '.join(f'{v:.1f}' for v in load_after)} after "
        f"on {os.cpu_count()} cores\n"
    )
    print("| network | variant | aligner | time (s) | / plain | / rebasin | sweeps | recovered |")
    print("|---|---|---|---:|---:|---:|---:|---|")
    for name, variant, label, t, r_plain, r_rb, sw, ok in rows:
        arch = LABELS[name]
        rb = "" if r_rb is None else f"{r_rb:.3f}"
        print(
            f"| {arch} | {variant} | {label} | {t:.3f} | {r_plain:.3f} | {rb} | {sw if sw is not None else ''} | {ok} |"
        )


if __name__ == "__main__":
    main()
