"""The executor primitives every part of the package shares: any object with
``submit(fn, *args) -> future``.

Futures are duck-typed: ``result()`` is all that is required; ``done()`` lets completed
tasks be taken as they finish, and ``cancel()``/``release()`` are used when present.
Standard futures are waited on with :func:`concurrent.futures.wait`, Dask futures with
``distributed.wait`` under their own client (recognized by their module, so Dask is never
imported unless the caller already uses it), others by polling ``done()``, or, without
``done()``, one after another in submission order.
"""

from __future__ import annotations

import concurrent.futures as cf
import contextlib
import time
from collections.abc import Callable, Iterable, Sequence
from typing import Any

__all__ = ["cancel_all", "check_executor", "is_dask", "submit", "wait_first"]

#: Seconds between two polls of ``done()`` for futures that cannot be waited on directly.
POLL_INTERVAL = 0.01


def is_dask(obj: Any) -> bool:
    """Whether ``obj`` (a client, an executor or a future) comes from ``dask.distributed``."""
    return type(obj).__module__.split(".")[0] == "distributed"


def check_executor(executor: Any) -> None:
    """``None`` (in-process) or an object with a callable ``submit``; else ``TypeError``."""
    if executor is not None and not callable(getattr(executor, "submit", None)):
        raise TypeError(
            "executor must be None (in-process) or have a submit(fn, *args) method (a concurrent.futures "
            f"Executor, a dask.distributed.Client, a Ray adapter), got {type(executor).__name__}"
        )


def submit(executor: Any, fn: Callable, *args: Any) -> Any:
    """``executor.submit(fn, *args)``; for a Dask ``Client`` not *pure*, so that a task
    submitted again (a retry after a lost worker) runs again instead of reusing a result."""
    if is_dask(executor) and type(executor).__name__ == "Client":
        return executor.submit(fn, *args, pure=False)
    return executor.submit(fn, *args)


def wait_first(futures: Sequence[Any]) -> list[Any]:
    """The futures of ``futures`` that are done, waiting until at least one is.

    Futures without ``done()`` cannot be asked: the first one is returned, and the
    caller's ``result()`` on it blocks until it finishes (submission order)."""
    if all(isinstance(f, cf.Future) for f in futures):
        return list(cf.wait(futures, return_when=cf.FIRST_COMPLETED).done)
    if all(is_dask(f) for f in futures):
        from distributed import wait

        client = getattr(futures[0], "client", None)
        # distributed.wait asks for the default client: make the futures' own client current.
        with client.as_current() if hasattr(client, "as_current") else contextlib.nullcontext():
            wait(list(futures), return_when="FIRST_COMPLETED")
        return [f for f in futures if f.done()]
    if not all(callable(getattr(f, "done", None)) for f in futures):
        return [futures[0]]
    while True:
        done = [f for f in futures if f.done()]
        if done:
            return done
        time.sleep(POLL_INTERVAL)


def cancel_all(futures: Iterable[Any]) -> None:
    """Cancel what can be cancelled (best effort: a future may lack ``cancel`` or refuse)."""
    for fut in futures:
        with contextlib.suppress(Exception):
            fut.cancel()
