"""Tracked-allocation helpers shared by the memory tests.

``tracemalloc`` sees NumPy's allocations (and torch tensors that wrap NumPy arrays), not
torch's own allocator: :class:`TrackedSource` reads checkpoints into NumPy-backed tensors
so that their memory is counted.
"""

from __future__ import annotations

import tracemalloc
from collections.abc import Callable

import numpy as np
import torch

from pyro_symmetry.collections._formats import FileSource


class TrackedSource(FileSource):
    """Reads a checkpoint into numpy-backed tensors, whose memory tracemalloc sees."""

    def read(self, mmap: bool = False):
        ck = super().read(mmap)
        own = {k: torch.from_numpy(np.array(v.numpy())) for k, v in ck.params.items()}
        return type(ck)(ck.name, own, ck.scales)


def peak_bytes(run: Callable[[], object], warm: Callable[[], object] | None = None) -> int:
    """Peak traced allocation of ``run()``, after ``warm()`` did the first-time imports."""
    if warm is not None:
        warm()
    tracemalloc.start()
    try:
        run()
        return tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
