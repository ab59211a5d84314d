"""Global state the package must leave as it found it.

A library call must not move the caller's random number generators, change the thread
count or the default dtype, or leave parameters behind in Pyro's global param store.
Code that has to trace or run a user's model (which may sample, or call ``pyro.param``)
runs inside :func:`isolated`; tests compare :func:`snapshot` before and after every
public entry point.

This module sits below every other one and imports nothing from the package.
"""

from __future__ import annotations

import contextlib
import hashlib
import random
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

__all__ = ["GlobalState", "isolated", "fork_rng", "snapshot"]


def fork_rng() -> Any:
    """Fork torch's CPU RNG (and CUDA's when initialized): code inside draws from the
    current state and leaves it as it was."""
    devices = list(range(torch.cuda.device_count())) if torch.cuda.is_initialized() else []
    return torch.random.fork_rng(devices=devices)


@contextlib.contextmanager
def _param_store_kept() -> Iterator[None]:
    """Remove the params a block adds to Pyro's global store, and restore the values of
    those it changes (a traced model may call ``pyro.param`` with an init value)."""
    import pyro

    store = pyro.get_param_store()
    # The store keeps unconstrained tensors; restore those in place so that optimizers
    # holding references to them keep working.
    before = {k: u.detach().clone() for k, u in store._params.items()}
    try:
        yield
    finally:
        for k in list(store.keys()):
            if k not in before:
                del store[k]
        for k, v in before.items():
            cur = store._params.get(k)
            if cur is not None and (cur.shape != v.shape or not torch.equal(cur.detach(), v)):
                with torch.no_grad():
                    cur.data = v


@contextlib.contextmanager
def isolated(param_store: bool = True) -> Iterator[None]:
    """Run a block with torch's, numpy's and Python's RNGs forked, the thread count and
    default dtype restored, and (``param_store=True``) Pyro's param store as it was."""
    py_state = random.getstate()
    np_state = np.random.get_state()  # noqa: NPY002 - the legacy global state is what callers use
    threads = torch.get_num_threads()
    dtype = torch.get_default_dtype()
    with contextlib.ExitStack() as stack:
        stack.enter_context(fork_rng())
        if param_store:
            stack.enter_context(_param_store_kept())
        try:
            yield
        finally:
            random.setstate(py_state)
            np.random.set_state(np_state)  # noqa: NPY002
            if torch.get_num_threads() != threads:
                torch.set_num_threads(threads)
            if torch.get_default_dtype() != dtype:
                torch.set_default_dtype(dtype)


@dataclass(frozen=True)
class GlobalState:
    """A comparable fingerprint of the global state a call must not change."""

    torch_rng: str
    numpy_rng: str
    python_rng: str
    num_threads: int
    default_dtype: torch.dtype
    param_store: tuple[tuple[str, str], ...]

    def diff(self, other: GlobalState) -> list[str]:
        """Names of the fields that differ."""
        return [k for k in self.__dataclass_fields__ if getattr(self, k) != getattr(other, k)]


def _digest(x: Any) -> str:
    if isinstance(x, torch.Tensor):
        x = x.detach().cpu().contiguous().reshape(-1)
        return hashlib.sha1(x.view(torch.uint8).numpy().tobytes() if x.numel() else b"").hexdigest()
    return hashlib.sha1(repr(x).encode()).hexdigest()


def snapshot() -> GlobalState:
    """The current :class:`GlobalState`."""
    import pyro

    store = pyro.get_param_store()
    return GlobalState(
        torch_rng=_digest(torch.random.get_rng_state()),
        numpy_rng=_digest(np.random.get_state()[1].tobytes()),  # noqa: NPY002
        python_rng=_digest(random.getstate()),
        num_threads=torch.get_num_threads(),
        default_dtype=torch.get_default_dtype(),
        param_store=tuple(sorted((k, _digest(v)) for k, v in store.items())),
    )
