"""Peak memory (and time) of the stochastic estimators on a 784-128-10 MLP, one process per configuration.

``Symmetrized(q, spec, estimator, K).log_prob(w)`` on a batch of draws and
``ps.mutual_information(q, spec, estimator, num_samples, K)`` evaluate ``log q(g_k . w)`` for
``K`` elements and every draw. Issue 12 measured 5 GB at K = 16 and 20 GB at K = 64 for
256 draws (every permuted copy held at once); the estimators now work through the
elements x draws in chunks of ``CHUNK_BYTES`` (pyro_symmetry/estimators/_base.py).

Each configuration runs in a fresh subprocess (torch 1 thread) that builds a mean-field
``q`` (float32, site mapping or one flat Normal) and ``w``, records its resident memory,
runs the call once and reports its peak resident memory (``ru_maxrss``: libraries,
``q``, the draws and every temporary included) and the call's time. A child is capped
at ``--cap`` GB of address space so that an old version that needs 20 GB fails instead
of taking the machine. The last rows time the importance estimator on one hidden layer
of width 1000 (seconds per draw of ``w``), and the last table the exact permanent at
widths 20-25 (what ``"auto"`` costs per point where it picks the permanent).

Usage::

    python benchmarks/estimators_memory.py [--draws 256] [--ks 16 64] [--cap 10] [--permanent-widths 20 21 ...]
"""

from __future__ import annotations

import argparse
import inspect
import json
import os
import resource
import subprocess
import sys
import time

CONFIGS = [  # (label, what, estimator, flat)
    ("Symmetrized.log_prob", "log_prob", "contrastive", False),
    ("Symmetrized.log_prob", "log_prob", "importance", False),
    ("mutual_information", "mi", "contrastive", False),
    ("mutual_information", "mi", "importance", False),
    ("Symmetrized.log_prob, flat q", "log_prob", "contrastive", True),
]


def _rss_mb() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * resource.getpagesize() / 2**20


def _load() -> str:
    """The 1, 5 and 15 minute load averages (the machine is shared: wall times depend on them)."""
    return " ".join(f"{x:.1f}" for x in os.getloadavg())


def child(what: str, estimator: str, flat: bool, k: int, draws: int, hidden: int) -> None:
    import pyro.distributions as dist
    import torch

    import pyro_symmetry as ps

    torch.set_num_threads(1)
    torch.manual_seed(0)
    model = ps.models.BayesianMLP(784, [hidden], 10)
    spec = model.spec
    q = {
        s: dist.Normal(0.1 * torch.randn(shape), 0.05 + 0.1 * torch.rand(shape)).to_event(len(shape))
        for s, shape in spec.shapes.items()
    }
    layout = None
    if flat:
        layout = ps.FlatLayout(spec.shapes)
        loc = layout.to_flat({s: d.base_dist.loc for s, d in q.items()})
        scale = layout.to_flat({s: d.base_dist.scale for s, d in q.items()})
        q = dist.Normal(loc, scale).to_event(1)
    q_sym = ps.Symmetrized(q, spec, estimator=estimator, num_permutations=k, layout=layout)
    w = q_sym.sample((draws,)) if what == "log_prob" else None
    base = _rss_mb()
    t, cpu = time.perf_counter(), time.process_time()
    with torch.no_grad():
        if what == "log_prob":
            out = q_sym.log_prob(w)
            finite = bool(torch.isfinite(out).all())
        else:
            kwargs = {"progress": False} if "progress" in inspect.signature(ps.mutual_information).parameters else {}
            est = ps.mutual_information(
                q, spec, estimator, num_samples=draws, num_permutations=k, layout=layout, batch_size=256, **kwargs
            )
            finite = est.value == est.value
    seconds, cpu = time.perf_counter() - t, time.process_time() - cpu
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**10
    print(json.dumps({"base_mb": base, "peak_mb": peak, "seconds": seconds, "cpu": cpu, "finite": finite}))


def run(args: argparse.Namespace, what: str, estimator: str, flat: bool, k: int, draws: int, hidden: int) -> dict:
    cmd = [sys.executable, __file__, "--child", what, estimator, str(int(flat)), str(k), str(draws), str(hidden)]
    cap = int(args.cap * 2**30)

    def limit() -> None:
        resource.setrlimit(resource.RLIMIT_AS, (cap, cap))

    r = subprocess.run(cmd, capture_output=True, text=True, preexec_fn=limit)
    if r.returncode != 0:
        last = (r.stderr.strip().splitlines() or ["?"])[-1]
        return {"error": f"failed under the {args.cap:g} GB cap ({last[:60]})"}
    return json.loads(r.stdout.strip().splitlines()[-1])


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] == "--child":
        what, est, flat, k, draws, hidden = sys.argv[2:8]
        child(what, est, flat == "1", int(k), int(draws), int(hidden))
        return
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--draws", type=int, default=256)
    parser.add_argument("--ks", type=int, nargs="*", default=[16, 64], help="K values (none: skip the table)")
    parser.add_argument("--cap", type=float, default=10.0, help="address-space cap per child (GB)")
    parser.add_argument("--wide-draws", type=int, default=4, help="draws for the width-1000 timing (0: skip)")
    parser.add_argument(
        "--permanent-widths", type=int, nargs="*", default=[20, 21, 22, 23, 24, 25], help="widths to time (none: skip)"
    )
    args = parser.parse_args()
    print(f"load average before: {_load()}")
    if args.ks:
        print(f"MLP 784-128-10, mean-field q (float32), {args.draws} draws, torch 1 thread, one process per row")
        print("| call | estimator | K | peak RSS (MB) | RSS before the call (MB) | wall (s) | CPU (s) |")
        print("|---|---|---:|---:|---:|---:|---:|")
    for label, what, est, flat in CONFIGS:
        for k in args.ks:
            r = run(args, what, est, flat, k, args.draws, 128)
            if "error" in r:
                print(f"| {label} | {est} | {k} | {r['error']} | | | |", flush=True)
            else:
                mb = f"{r['peak_mb']:.0f} | {r['base_mb']:.0f}"
                print(f"| {label} | {est} | {k} | {mb} | {r['seconds']:.1f} | {r['cpu']:.1f} |", flush=True)
    if args.wide_draws:
        print(f"\nMLP 784-1000-10, mutual_information, importance, {args.wide_draws} draws")
        print("| K | peak RSS (MB) | wall s per draw | CPU s per draw |")
        print("|---:|---:|---:|---:|")
        for k in (16,):
            r = run(args, "mi", "importance", False, k, args.wide_draws, 1000)
            if "error" in r:
                print(f"| {k} | {r['error']} | | |")
            else:
                d = args.wide_draws
                print(f"| {k} | {r['peak_mb']:.0f} | {r['seconds'] / d:.2f} | {r['cpu'] / d:.2f} |")
    if args.permanent_widths:
        permanent_costs(args.permanent_widths)
    print(f"load average after: {_load()}")


def permanent_costs(widths: list[int]) -> None:
    """CPU and wall time of one exact permanent (``ps.log_permanent``, the ``"permanent"``
    estimator's cost per point and group) on random ``n x n`` log-matrices, best of 3."""
    import torch

    import pyro_symmetry as ps

    torch.set_num_threads(1)
    g = torch.Generator().manual_seed(0)
    print("\nExact permanent of one n x n matrix (entries exp(3 N(0,1))), best of 3, torch 1 thread")
    print("| n | wall s per matrix | CPU s per matrix |")
    print("|---:|---:|---:|")
    for n in widths:
        a = 3.0 * torch.randn(2, n, n, generator=g, dtype=torch.float64)
        wall, cpu = [], []
        for _ in range(3):
            t, c = time.perf_counter(), time.process_time()
            ps.log_permanent(a)
            wall.append((time.perf_counter() - t) / 2)
            cpu.append((time.process_time() - c) / 2)
        print(f"| {n} | {min(wall):.3f} | {min(cpu):.3f} |", flush=True)


if __name__ == "__main__":
    main()
