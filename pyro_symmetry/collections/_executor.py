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

import concurrent.futures as cf
import contextlib
import os
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from typing import Any

__all__ = ["check_executor", "default_workers", "run_tasks"]


def _is_dask(obj: Any) -> bool:
    return type(obj).__module__.split(".")[0] == "distributed"


def check_executor(executor: Any) -> None:
    if executor is not None and not callable(getattr(executor, "submit", None)):
        raise TypeError(
            "executor must be None (in-process) or have a submit(fn, *args) method (a concurrent.futures "
            f"executor, a dask.distributed.Client), got {type(executor).__name__}"
        )


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


def _submit(executor: Any, fn: Callable, args: tuple) -> Any:
    if _is_dask(executor) and type(executor).__name__ == "Client":
        # Not pure: a re-run after a failure must run again, not reuse a cached result.
        return executor.submit(fn, *args, pure=False)
    return executor.submit(fn, *args)


def _wait_first(futures: Sequence[Any]) -> list[Any]:
    """The futures of ``futures`` that are done, waiting until at least one is."""
    if all(isinstance(f, cf.Future) for f in futures):
        return list(cf.wait(futures, return_when=cf.FIRST_COMPLETED).done)
    if all(_is_dask(f) for f in futures):
        from distributed import wait

        client = getattr(futures[0], "client", None)
        # wait() asks for the default client: make the futures' own client current.
        with client.as_current() if hasattr(client, "as_current") else contextlib.nullcontext():
            wait(list(futures), return_when="FIRST_COMPLETED")
        return [f for f in futures if f.done()]
    while True:
        done = [f for f in futures if f.done()]
        if done:
            return done
        time.sleep(0.01)


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
            pending[_submit(executor, fn, (*common, batch))] = batch

    try:
        fill()
        while pending:
            for fut in _wait_first(list(pending)):
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
        for fut in pending:
            try:
                fut.cancel()
            except Exception:  # noqa: BLE001
                pass
        raise
