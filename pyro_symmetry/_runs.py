"""One SVI run as a task, and many of them on an executor (the machinery of
:func:`pyro_symmetry.train_runs`).

A task trains one run in its own Pyro parameter store, seeded, with the process's
global state restored afterwards, and returns its parameter-store state and losses.
On an executor, results are collected as they complete; a run's own failure comes back
as the task's *result* (:class:`Outcome` with ``error`` set), so an exception raised by
``future.result()`` always means that the task never returned (its worker died or was
killed, it was cancelled, or it could not be sent): those runs are submitted once more.
"""

from __future__ import annotations

import concurrent.futures as cf
import contextlib
import copy
import math
import os
import pickle
import threading
import traceback
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import pyro
import torch
from pyro.infer import SVI, Trace_ELBO
from tqdm.auto import tqdm

from ._executors import cancel_all, wait_first
from ._executors import submit as submit_task
from ._state import isolated

__all__ = ["Outcome", "Task", "build", "load", "run_on_executor", "train_one"]

#: Runs in threads of one process (a thread pool, a Dask cluster with ``processes=False``)
#: take turns: Pyro's handler stack and param store and torch's RNG are global to a process.
_PROCESS_LOCK = threading.RLock()

#: Attempts per run on an executor when its worker is lost (the first plus one retry).
MAX_ATTEMPTS = 2


@dataclass(frozen=True)
class Task:
    """Everything a run needs but its seed (picklable when its factories are)."""

    make_model: Callable[[], Any]
    make_guide: Callable[[Any], Any]
    args: tuple
    kwargs: dict
    steps: int
    optim: Any
    loss: Any
    num_threads: int | None
    caller_pid: int = field(default_factory=os.getpid)

    def check_picklable(self, executor: Any) -> None:
        """A process pool pickles every task with :mod:`pickle`: refuse, naming the
        argument, what it cannot send (lambdas, local functions), before anything runs."""
        if not isinstance(executor, cf.ProcessPoolExecutor):
            return  # Dask and loky use cloudpickle; a failure there is reported per task
        parts = {
            "make_model": self.make_model,
            "make_guide": self.make_guide,
            "data": (self.args, self.kwargs),
            "optim": self.optim,
            "loss": self.loss,
        }
        for name, value in parts.items():
            try:
                pickle.dumps(value)
            except Exception as e:  # noqa: BLE001 - pickling raises PicklingError, AttributeError, TypeError
                hint = (
                    "use a module-level function, or functools.partial of one, instead of a lambda or a local function"
                    if name.startswith("make_")
                    else "pass values that can be pickled"
                )
                raise TypeError(
                    f"{name} cannot be sent to the worker processes of the process pool ({type(e).__name__}: {e}); "
                    f"{hint}"
                ) from None


@dataclass
class Outcome:
    """What a task returns: the run's parameter-store state and losses, its model and
    guide when it ran in the caller's process, or the error that ended it."""

    state: dict
    losses: torch.Tensor
    model: Any = None
    guide: Any = None
    error: BaseException | None = None


def build(task: Task, prebuilt: tuple[Any, torch.Tensor] | None = None) -> tuple[Any, Any]:
    """``(model, guide)`` from the factories, checked to be callables (a model and a guide).

    ``prebuilt = (model, rng_state)``: a model ``make_model()`` already returned, with
    torch's RNG state right after that call, so the run goes on as if it built it now."""
    if prebuilt is None:
        model = task.make_model()
    else:
        model, rng = prebuilt
        torch.set_rng_state(rng)
    if not callable(model):
        raise TypeError(f"make_model() must return a Pyro model (a callable), got {type(model).__name__}")
    guide = task.make_guide(model)
    if not callable(guide):
        raise TypeError(f"make_guide(model) must return a Pyro guide (a callable), got {type(guide).__name__}")
    return model, guide


@contextlib.contextmanager
def diverged(what: str, step: int) -> Iterator[None]:
    """Turn Pyro's complaint about NaN distribution parameters into a divergence error."""
    try:
        yield
    except ValueError as e:
        store = pyro.get_param_store()
        bad = [k for k, v in store.items() if not bool(torch.isfinite(v.detach()).all())]
        # torch's argument validation ("... but found invalid values") after a successful first
        # step means the parameters grew until a distribution's arguments overflowed.
        overflow = step > 0 and "found invalid values" in str(e)
        if not (bad or overflow):
            raise
        why = f"parameters {bad[:3]} are NaN/Inf" if bad else str(e).splitlines()[0]
        raise ValueError(
            f"{what} diverged at step {step}: {why}; lower the learning rate or check the data and the model's scales"
        ) from e


def fresh_optim(optim: Any) -> Any:
    return pyro.optim.ClippedAdam({"lr": 1e-2}) if optim is None else copy.deepcopy(optim)


def train_one(
    task: Task,
    seed: int,
    progress: bool = False,
    desc: str = "",
    prebuilt: tuple[Any, torch.Tensor] | None = None,
    losses: torch.Tensor | None = None,
) -> tuple[dict, torch.Tensor, Any, Any]:
    """Train one run in its own parameter store: ``(state, losses, model, guide)``.

    ``losses`` (``(steps,)``, NaN-filled), if given, receives the losses as they come,
    so a caller still has them when the run raises."""
    store = pyro.get_param_store()
    losses = torch.full((task.steps,), math.nan) if losses is None else losses
    with _PROCESS_LOCK, isolated(param_store=False), store.scope() as state:
        if task.num_threads is not None:
            torch.set_num_threads(task.num_threads)
        torch.manual_seed(seed)
        model, guide = build(task, prebuilt)
        svi = SVI(model, guide, fresh_optim(task.optim), Trace_ELBO() if task.loss is None else task.loss)
        for i in tqdm(range(task.steps), desc=desc, leave=False, disable=not progress):
            with diverged(f"the run with seed {seed}", i):
                losses[i] = svi.step(*task.args, **task.kwargs)
    return state, losses, model, guide


def load(task: Task, state: dict) -> tuple[Any, Any]:
    """A fresh model/guide pair whose guide adopts the parameters in ``state``.

    One guide call inside ``scope(state)`` makes every ``PyroParam`` of the guide
    module take the stored tensor (Pyro syncs module <- store by name).
    """
    with _PROCESS_LOCK, isolated(param_store=False):
        model, guide = build(task)
        with torch.no_grad(), pyro.get_param_store().scope(state):
            guide(*task.args, **task.kwargs)
    return model, guide


def _portable(e: BaseException) -> BaseException:
    """``e`` with the worker's traceback as a note, or, if ``e`` cannot be pickled back
    to the caller, a ``RuntimeError`` that carries its type, message and traceback."""
    tb = "".join(traceback.format_exception(e))
    try:
        e.add_note(f"traceback in the worker:\n{tb}")
        pickle.loads(pickle.dumps(e))
        return e
    except Exception:  # noqa: BLE001 - any exception type may fail to pickle
        return RuntimeError(f"{type(e).__name__}: {e}\ntraceback in the worker:\n{tb}")


def run_task(task: Task, seed: int, attempt: int) -> Outcome:
    """The executor task: never raises for the run's own failure (``attempt`` only makes
    a resubmitted task differ from the first, so that Dask does not reuse its result)."""
    local = os.getpid() == task.caller_pid  # in the caller's process: hand the modules over
    losses = torch.full((task.steps,), math.nan)
    try:
        state, losses, model, guide = train_one(task, seed, losses=losses)
    except Exception as e:  # noqa: BLE001 - recorded as the run's error
        return Outcome({"params": {}, "constraints": {}}, losses, error=e if local else _portable(e))
    return Outcome(state, losses, model, guide) if local else Outcome(state, losses)


# ---------------------------------------------------------------------- executors
def _is_pickling_error(e: BaseException) -> bool:
    text = f"{type(e).__name__} {e}".lower()
    return isinstance(e, pickle.PicklingError) or "pickl" in text


def _lost(e: BaseException, seed: int, attempts: int) -> BaseException:
    if _is_pickling_error(e):
        raise TypeError(
            f"the run with seed {seed} could not be sent to the executor ({type(e).__name__}: {e}); make_model, "
            "make_guide, data, optim and loss must be picklable: use module-level functions or functools.partial "
            "of them instead of lambdas or local functions"
        ) from e
    e.add_note(f"the worker of the run with seed {seed} was lost {attempts} time(s); it was not retried further")
    return e


def run_on_executor(executor: Any, task: Task, seeds: Sequence[int], on_error: str, progress: bool) -> list[Outcome]:
    """One :class:`Outcome` per seed, in seed order (with the model and guide when the
    task ran in this process, e.g. on a thread pool).

    With ``on_error="raise"`` the first failed run (in completion order) raises and the
    runs still pending are cancelled."""
    outcomes: dict[int, Outcome] = {}
    attempts = dict.fromkeys(range(len(seeds)), 0)
    pending: dict[Any, int] = {}

    def submit(r: int) -> None:
        attempts[r] += 1
        pending[submit_task(executor, run_task, task, seeds[r], attempts[r])] = r

    bar = tqdm(total=len(seeds), desc="runs", disable=not progress)
    try:
        for r in range(len(seeds)):
            submit(r)
        while pending:
            for fut in wait_first(list(pending)):
                r = pending.pop(fut)
                try:
                    out = fut.result()
                except Exception as e:  # noqa: BLE001 - the task never returned: its worker was lost
                    out = _retry_or_fail(e, r, seeds[r], attempts, submit, task.steps)
                    if out is None:
                        continue  # resubmitted
                outcomes[r] = out
                bar.update()
                if out.error is not None and on_error == "raise":
                    done = sum(o.error is None for o in outcomes.values())
                    out.error.add_note(f"{done} other run(s) had finished; on_error='keep' returns them")
                    raise out.error
    except BaseException:
        cancel_all(pending)
        raise
    finally:
        bar.close()
    return [outcomes[r] for r in range(len(seeds))]


def _retry_or_fail(
    e: BaseException, r: int, seed: int, attempts: dict[int, int], submit: Callable[[int], None], steps: int
) -> Outcome | None:
    """Resubmit run ``r`` once after a lost worker (``None``), else its failed outcome."""
    if attempts[r] < MAX_ATTEMPTS and not _is_pickling_error(e):
        try:
            submit(r)
            return None
        except Exception as e2:  # noqa: BLE001 - e.g. a broken process pool refuses new tasks
            e2.add_note(f"resubmitting the run with seed {seed} after its worker was lost ({type(e).__name__})")
            e = e2
    return Outcome({"params": {}, "constraints": {}}, torch.full((steps,), math.nan), error=_lost(e, seed, attempts[r]))
