"""Time of ``PermutationSpec.apply`` on a batch of samples of a 784-512-512-512-10 MLP.

Compares the batched gather (one advanced-indexing op per site, no Python loop over
the batch) with a plain baseline that loops over samples and sites with
``index_select``, in the same process. Prints a table of medians and ratios.

    python benchmarks/groups.py               # 1000 samples, 5 repeats
    python benchmarks/groups.py --samples 200 --repeats 3
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

import pyro_symmetry as ps


def baseline_apply(spec: ps.PermutationSpec, params: dict, perm: dict) -> dict:
    """Plain loop: for each sample, for each site, index_select along each axis."""
    n = next(iter(params.values())).shape[0]
    out = {k: torch.empty_like(v) for k, v in params.items()}
    for i in range(n):
        for site, x in params.items():
            y = x[i]
            moves = spec.site_moves(site)[1] if site in spec.sites else []
            for ax, _, g in moves:
                p = perm[g] if perm[g].dim() == 1 else perm[g][i]
                y = y.index_select(ax, p)
            out[site][i] = y
    return out


def timeit(fn, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--samples", type=int, default=1000)
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args(argv)
    torch.manual_seed(0)
    sizes = [784, 512, 512, 512, 10]
    names = [f"fc{i + 1}" for i in range(len(sizes) - 1)]
    shapes = {}
    for n, i, o in zip(names, sizes[:-1], sizes[1:]):
        shapes[f"{n}.weight"], shapes[f"{n}.bias"] = (o, i), (o,)
    spec = ps.mlp_spec(names, sizes[1:-1]).with_shapes(shapes)
    params = {k: torch.randn((args.samples, *s)) for k, s in shapes.items()}
    numel = sum(v.numel() for v in params.values())
    print(
        f"784-512-512-512-10 MLP, {args.samples} samples, float32, {numel * 4 / 2**30:.2f} GiB of weights, "
        f"{torch.get_num_threads()} threads; median of {args.repeats}"
    )
    rows = []
    for label, perm in [
        ("one g per sample", spec.sample((args.samples,))),
        ("one g for all samples", spec.sample()),
    ]:
        ours = spec.apply(params, perm)
        ref = baseline_apply(spec, params, perm)
        assert all(torch.equal(ours[k], ref[k]) for k in params), "batched apply disagrees with the baseline"
        del ours, ref
        t_ours = timeit(lambda: spec.apply(params, perm), args.repeats)  # noqa: B023
        t_base = timeit(lambda: baseline_apply(spec, params, perm), args.repeats)  # noqa: B023
        rows.append((label, t_ours, t_base))
    print(f"| {'group element':<22} | {'spec.apply (s)':>14} | {'loop baseline (s)':>17} | {'ratio':>6} |")
    print(f"|{'-' * 24}|{'-' * 16}|{'-' * 19}|{'-' * 8}|")
    for label, a, b in rows:
        print(f"| {label:<22} | {a:>14.3f} | {b:>17.3f} | {a / b:>6.2f} |")


if __name__ == "__main__":
    main()
