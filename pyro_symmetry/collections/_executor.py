"""Running tasks in-process or on any executor with ``submit``, a bounded number at a time.

An executor is anything with ``submit(fn, *args) -> future`` whose futures have
``done()`` and ``result()``: a :class:`concurrent.futures.Executor`, a
``dask.distributed.Client`` (or its ``get_executor()``), ... Completed futures are taken
as they finish (``concurrent.futures.wait`` for standard futures,
``dask.distributed.wait`` for Dask futures, recognized by duck typing; polling
otherwise), and at most ``max_in_flight`` tasks are submitted at once, so the driver
never holds more than that many results. A task whose future raises (a worker that died,
a result that could not be sent back) is reported through ``on_error``; the other tasks
go on.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterable, Iterator
from typing import Any

from .._executors import cancel_all, check_executor, submit, wait_first
from .._executors import is_dask as _is_dask

__all__ = ["check_executor", "default_workers", "run_tasks"]


def default_workers(executor: Any) -> int:
    """How many tasks the executor runs at once (Dask: total worker threads)."""
    if executor is None:
        return 1
    if _is_dask(executor) and callable(getattr(executor, "nthreads", None)):
        try:
            return max(1, sum(executor.nthreads().values()))
        except Exception:  # noqa: BLE001  (a client that cannot answer: fall back)
            pass
    n = getattr(executor, "_max_workers", None)
    return n if isinstance(n, int) and n > 0 else os.cpu_count() or 1


def run_tasks(
    fn: Callable[..., Any],
    common: tuple,
    batches: Iterable[Any],
    executor: Any,
    max_in_flight: int,
    on_result: Callable[[Any, Any], None],
    on_error: Callable[[Any, BaseException], None],
) -> None:
    """Call ``fn(*common, batch)`` for every batch; ``on_result(batch, result)`` as they finish.

    In-process (``executor=None``) the batches run one after another here; an exception of
    ``fn`` goes to ``on_error`` as for an executor. A ``KeyboardInterrupt`` cancels what has
    not started and propagates: what finished was already passed to ``on_result``.
    """
    it: Iterator[Any] = iter(batches)
    if executor is None:
        for batch in it:
            try:
                result = fn(*common, batch)
            except Exception as e:  # noqa: BLE001  (recorded per batch; the others go on)
                on_error(batch, e)
                continue
            on_result(batch, result)
        return
    pending: dict[Any, Any] = {}

    def fill() -> None:
        while len(pending) < max_in_flight:
            batch = next(it, None)
            if batch is None:
                return
            pending[submit(executor, fn, *common, batch)] = batch

    try:
        fill()
        while pending:
            for fut in wait_first(list(pending)):
                batch = pending.pop(fut)
                try:
                    result = fut.result()
                except Exception as e:  # noqa: BLE001
                    on_error(batch, e)
                else:
                    on_result(batch, result)
                if callable(getattr(fut, "release", None)):
                    fut.release()  # Dask: let the scheduler forget the result now
            fill()
    except BaseException:
        cancel_all(pending)
        raise
