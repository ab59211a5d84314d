"""Time of ``PermutationSpec.from_module`` on a torchvision-layout ResNet-18 and a 12-layer
ViT-small-size network (embed 384, 6 heads, MLP 1536), split into recording the forward,
the symmetry analysis and the numerical verification; the architectures are those of the
tests (``tests/architectures.py``). The first call of a process also pays one-time imports
(reported separately as "cold").

    python benchmarks/from_module.py                  # ResNet-18 at 32x32, ViT-small at 32x32 and 16x16
    python benchmarks/from_module.py --repeats 5
"""

from __future__ import annotations

import argparse
import pathlib
import statistics
import sys
import time

import torch

import pyro_symmetry as ps
from pyro_symmetry._state import isolated
from pyro_symmetry.groups._fromgraph import HANDLERS, record_module
from pyro_symmetry.groups._graph import analyze
from pyro_symmetry.groups._resolve import build_groups
from pyro_symmetry.groups._verify import verify_module

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1] / "tests"))
from architectures import NormMLP, ResNet18, ViT  # noqa: E402


def phases(net: torch.nn.Module, x: torch.Tensor) -> dict[str, float]:
    """Seconds of each phase of ``from_module(net, example_inputs=x)``."""
    t0 = time.perf_counter()
    with isolated():
        rec, inputs = record_module(net, x)
    t1 = time.perf_counter()
    ctx = analyze(rec, HANDLERS)
    groups = build_groups(ctx)
    shapes = {k: tuple(v.shape) for k, v in net.state_dict().items()}
    spec = ps.PermutationSpec(groups, shapes)
    t2 = time.perf_counter()
    verify_module(spec, net, inputs)
    t3 = time.perf_counter()
    return {"record": t1 - t0, "analysis": t2 - t1, "verification": t3 - t2, "total": t3 - t0, "ops": len(rec.ops)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    t0 = time.perf_counter()
    ps.PermutationSpec.from_module(NormMLP())
    cold = time.perf_counter() - t0
    print(f"cold: first from_module call of the process (a small MLP, one-time imports): {cold:.2f} s")
    cases = [
        ("ResNet-18 (width 64), 2x3x32x32", ResNet18(), torch.randn(2, 3, 32, 32)),
        ("ViT-small, 12 layers, 2x3x32x32 (65 tokens)", ViT(32, 4, 384, 12, 6, 1536, 10), torch.randn(2, 3, 32, 32)),
        ("ViT-small, 12 layers, 2x3x16x16 (17 tokens)", ViT(16, 4, 384, 12, 6, 1536, 10), torch.randn(2, 3, 16, 16)),
    ]
    print("| network | params | ops | groups | log|G| | record (s) | analysis (s) | verification (s) | total (s) |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|")
    for name, net, x in cases:
        runs = [phases(net, x) for _ in range(args.repeats)]
        med = {k: statistics.median(r[k] for r in runs) for k in runs[0]}
        spec = ps.PermutationSpec.from_module(net, example_inputs=x)
        n = sum(p.numel() for p in net.parameters())
        print(
            f"| {name} | {n / 1e6:.1f}M | {int(med['ops'])} | {len(spec.groups)} | {spec.log_order:.0f} | "
            f"{med['record']:.2f} | {med['analysis']:.2f} | {med['verification']:.2f} | {med['total']:.2f} |"
        )


if __name__ == "__main__":
    main()
