"""Aligning / canonicalizing a collection of checkpoints: in-process and on a Dask LocalCluster.

N checkpoints of a 784-512-512-10 ReLU MLP, each a planted permutation of one base network
plus noise, are written to a temporary directory (about 2.7 MB each). The collection is then
aligned to the base network (``ps.collections.from_files(...).align``) and, optionally,
canonicalized (minimum mass + alignment) in-process, on a LocalCluster of 1 worker process
and on one of 2 worker processes (1 thread each, ``torch.set_num_threads(1)`` in the tasks),
in the same run. Reported: time per checkpoint, the speed-up of 2 workers over 1, the
driver's peak RSS during each run (sampled every 10 ms) and each worker's peak RSS
(``ru_maxrss``, fresh workers per run), the planted permutations recovered, and whether every
output is identical (sha256) to the in-process one.

    python benchmarks/collections.py                         # N = 200 and 1000, align
    python benchmarks/collections.py --n 200 --ops align canonicalize
    python benchmarks/collections.py --n 200 --ops wait      # 0.1 s of waiting per checkpoint
    python benchmarks/collections.py --n 200 --own-sessions  # workers in their own sessions (shared machine)
"""

from __future__ import annotations

import argparse
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np
import psutil
import torch

import pyro_symmetry as ps
from pyro_symmetry import collections as pc

WIDTHS = [784, 512, 512, 10]


def make_spec():
    return ps.mlp_spec(["fc1", "fc2", "fc3"], WIDTHS[1:-1], activation_symmetry="scale")


def write_collection(d: Path, n: int, noise: float, seed: int) -> np.ndarray:
    """``n`` planted copies of one base network; returns the inverse planted permutations ``(n, 1024)``."""
    spec = make_spec()
    gen = torch.Generator().manual_seed(seed)
    base = {}
    for i, (a, b) in enumerate(zip(WIDTHS[:-1], WIDTHS[1:])):
        base[f"fc{i + 1}.weight"] = torch.randn(b, a, generator=gen) / a**0.5
        base[f"fc{i + 1}.bias"] = 0.1 * torch.randn(b, generator=gen)
    torch.save(base, d / "base.pt")
    inverse = np.empty((n, sum(WIDTHS[1:-1])), dtype=np.int16)
    for k in range(n):
        p = spec.sample(generator=gen)
        ck = {s: v + noise * v.std() * torch.randn(v.shape, generator=gen) for s, v in spec.apply(base, p).items()}
        torch.save(ck, d / f"ckpt_{k:05d}.pt")
        inverse[k] = torch.cat([torch.argsort(p["fc1"]), torch.argsort(p["fc2"])]).numpy()
    return inverse


class PeakRSS:
    """Peak resident memory of this process while the block runs (sampled)."""

    def __enter__(self) -> PeakRSS:
        self.proc, self.peak, self.stop = psutil.Process(), 0, threading.Event()
        self.thread = threading.Thread(target=self._sample, daemon=True)
        self.thread.start()
        return self

    def _sample(self) -> None:
        while not self.stop.is_set():
            self.peak = max(self.peak, self.proc.memory_info().rss)
            time.sleep(0.01)

    def __exit__(self, *exc) -> None:
        self.stop.set()
        self.thread.join()
        self.peak = max(self.peak, self.proc.memory_info().rss)


def _maxrss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB


def _cpu_seconds() -> float:
    t = psutil.Process().cpu_times()
    return t.user + t.system


def _warm() -> None:
    """First-time imports and allocations (scipy's assignment solver, ...) are not the transform's time."""
    torch.set_num_threads(1)
    spec = ps.mlp_spec(["a", "b"], [3])
    w = {"a.weight": torch.randn(3, 2), "a.bias": torch.randn(3)}
    w.update({"b.weight": torch.randn(2, 3), "b.bias": torch.randn(2)})
    ps.align(w, spec.apply(w, spec.sample()), spec, method="weights", seed=0)


def wait_then_copy(params):
    """A checkpoint 'transform' that waits 0.1 s (a stand-in for I/O-bound work): its speed-up
    measures the executor's parallelism whatever CPU share the machine gives the workers."""
    time.sleep(0.1)
    return params


def start_cluster(workers: int, own_sessions: bool):
    """``(cluster, client, worker processes)``: a LocalCluster of ``workers`` processes, or (with
    ``own_sessions``) a scheduler here and ``dask worker`` processes each in a session of its own.

    Linux groups processes by session for CPU scheduling (``sched_autogroup``): on a machine
    shared with other jobs the workers of a LocalCluster, all in the driver's session, share one
    session's CPU share however many they are; workers in their own sessions get one share each,
    as separate machines (or an idle machine) would give them."""
    from distributed import Client, LocalCluster

    if not own_sessions:
        cluster = LocalCluster(n_workers=workers, threads_per_worker=1, processes=True, dashboard_address=None)
        return cluster, Client(cluster), []
    cluster = LocalCluster(n_workers=0, processes=True, dashboard_address=None)
    env = {k: v for k, v in os.environ.items() if k != "MALLOC_TRIM_THRESHOLD_"}
    env["OMP_NUM_THREADS"] = "1"
    cmd = [sys.executable, "-m", "distributed.cli.dask_worker", cluster.scheduler_address, "--nthreads", "1",
           "--no-nanny", "--no-dashboard"]  # fmt: skip
    procs = [subprocess.Popen(cmd, env=env, start_new_session=True, stdout=subprocess.DEVNULL,
                              stderr=subprocess.DEVNULL) for _ in range(workers)]  # fmt: skip
    client = Client(cluster)
    client.wait_for_workers(workers, timeout=300)
    return cluster, client, procs


def run(op: str, coll, d: Path, out: Path, workers: int | None, own_sessions: bool = False):
    """``(seconds, CPU seconds of the workers (or the driver), driver peak MB, [worker peak MB], summary)``."""
    cluster = client = None
    procs: list = []
    kw = {"progress": False}
    if workers is not None:
        cluster, client, procs = start_cluster(workers, own_sessions)
        client.run(_warm)
        kw.update(executor=client, num_threads=1)

    def cpu() -> float:
        return sum(client.run(_cpu_seconds).values()) if client is not None else _cpu_seconds()

    try:
        cpu0 = cpu()
        with PeakRSS() as mem:
            t0 = time.perf_counter()
            if op == "align":
                summary = coll.align(d / "base.pt", out, **kw)
            elif op == "canonicalize":
                summary = coll.canonicalize(out, reference=d / "base.pt", **kw)
            else:
                summary = coll.map(wait_then_copy, out, **kw)
            seconds = time.perf_counter() - t0
        cpu_seconds = cpu() - cpu0
        worker_mb = sorted(client.run(_maxrss_mb).values()) if client is not None else []
    finally:
        for proc in procs:  # the worker processes this run started (a worker without a nanny
            proc.terminate()  # can hang in its graceful close once the scheduler is gone)
        for proc in procs:
            try:
                proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        if client is not None:
            client.close()
            cluster.close()
    return seconds, cpu_seconds, mem.peak / 2**20, worker_mb, summary


def check(summary, inverse: np.ndarray) -> int:
    """Checkpoints whose recorded permutation is the inverse of the planted one."""
    ok = 0
    for r in summary.records():
        k = int(r["index"])
        got = np.concatenate([r["permutation"]["fc1"], r["permutation"]["fc2"]])
        ok += r["status"] == "done" and np.array_equal(got, inverse[k])
    return ok


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--n", type=int, nargs="+", default=[200, 1000])
    p.add_argument("--ops", nargs="+", default=["align"], choices=["align", "canonicalize", "wait"])
    p.add_argument("--noise", type=float, default=0.1, help="noise std relative to each site's std")
    p.add_argument("--dir", default=None, help="where to write the checkpoints (default: a temporary dir)")
    p.add_argument("--malloc-trim", action="store_true", help="keep Dask's MALLOC_TRIM_THRESHOLD_=65536 for workers")
    p.add_argument(
        "--own-sessions", action="store_true", help="each Dask worker in a session of its own (its own CPU share)"
    )
    args = p.parse_args(argv)
    if not args.malloc_trim:
        import dask

        # Dask's nanny sets MALLOC_TRIM_THRESHOLD_=65536 in its workers, which turns off glibc's
        # dynamic mmap threshold: torch's temporaries then page-fault on every allocation and
        # alignment runs ~2x slower. Unset it (before the first cluster of this process starts).
        dask.config.set({"distributed.nanny.pre-spawn-environ.MALLOC_TRIM_THRESHOLD_": None})
    torch.set_num_threads(1)
    _warm()
    rows = []
    for n in args.n:
        d = Path(tempfile.mkdtemp(prefix=f"ckpts{n}_", dir=args.dir))
        try:
            t0 = time.perf_counter()
            inverse = write_collection(d, n, args.noise, seed=n)
            size = sum(f.stat().st_size for f in d.glob("ckpt_*.pt"))
            print(f"N = {n}: wrote {size / 1e9:.2f} GB in {time.perf_counter() - t0:.0f} s", flush=True)
            coll = pc.from_files(d / "ckpt_*.pt", make_spec())
            print(f"  load average before the runs: {', '.join(f'{x:.1f}' for x in os.getloadavg())}", flush=True)
            for op in args.ops:
                results, sha = {}, {}
                for label, workers in (("in-process", None), ("dask, 1 worker", 1), ("dask, 2 workers", 2)):
                    out = d / f"out_{op}_{label.replace(' ', '').replace(',', '_')}"
                    seconds, cpu_s, driver, wmb, summary = run(op, coll, d, out, workers, args.own_sessions)
                    sha[label] = {r["output"]: r["sha256"] for r in summary.records()}
                    rec = check(summary, inverse) if op == "align" else None
                    results[label] = seconds
                    rows.append((n, op, label, seconds, driver, wmb, rec, cpu_s))
                    print(f"  {op:<12} {label:<16} {seconds:8.1f} s  {1000 * seconds / n:7.1f} ms/ckpt  "
                          f"CPU {cpu_s:7.1f} s (x{cpu_s / seconds:.2f})  load {os.getloadavg()[0]:.1f}  "
                          f"driver {driver:6.0f} MB  workers {[round(w) for w in wmb]} MB  "
                          f"recovered {rec}/{n}  failed {summary.failed}", flush=True)  # fmt: skip
                    shutil.rmtree(out)
                same = all(sha[k] == sha["in-process"] for k in sha)
                speedup = results["dask, 1 worker"] / results["dask, 2 workers"]
                print(f"  {op}: 2 workers vs 1: {speedup:.2f}x; outputs identical to in-process: {same}", flush=True)
                rows.append((n, op, "speed-up 2 vs 1", speedup, None, None, None, same))
        finally:
            shutil.rmtree(d, ignore_errors=True)
    print("\n| N | op | run | s | ms / ckpt | CPU s (CPU / wall) | driver peak RSS (MB) | worker peak RSS (MB) "
          "| recovered |")  # fmt: skip
    print("|---:|---|---|---:|---:|---:|---:|---:|---:|")
    for n, op, label, sec, driver, wmb, rec, extra in rows:
        if driver is None:
            print(f"| {n} | {op} | 2 workers / 1 worker | {sec:.2f}x | | | | | identical outputs: {extra} |")
            continue
        workers = ", ".join(f"{w:.0f}" for w in wmb) or "-"
        recovered = "-" if rec is None else f"{rec}/{n}"
        print(f"| {n} | {op} | {label} | {sec:.1f} | {1000 * sec / n:.1f} | {extra:.0f} ({extra / sec:.2f}) | "
              f"{driver:.0f} | {workers} | {recovered} |")  # fmt: skip
    print(f"\n(os.cpu_count() = {os.cpu_count()}, load average {os.getloadavg()[0]:.1f})")


if __name__ == "__main__":
    main()
