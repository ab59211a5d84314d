"""Independent SVI runs with different seeds: in-process (vectorized over runs
where possible) or on any executor with ``submit``.

Diagnostics of weight-space symmetry (R-hat across runs, loss barriers, MMD
between runs) need several independently trained posteriors of one model.
:func:`train_runs` trains them and returns :class:`TrainedRun` records that
:func:`pyro_symmetry.diagnostics.to_inference_data` and
:func:`pyro_symmetry.diagnostics.symmetry_report` accept directly.

Every run lives in its own Pyro parameter store (``ParamStoreDict.scope``), so
runs of one model, whose parameters share their names, never see each other.
A run that fails (an exception, a non-finite loss) is either raised
(``on_error="raise"``) or returned marked with its exception (``"keep"``); the
runs that finished are never thrown away because another one failed.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable, Mapping
from dataclasses import dataclass, replace
from typing import Any

import pyro
import pyro.poutine as poutine
import torch
from pyro.infer.autoguide import AutoNormal
from pyro.poutine.util import site_is_subsample
from tqdm.auto import tqdm

from ._executors import check_executor
from ._runs import Outcome, Task, diverged, fresh_optim, load, run_on_executor, train_one
from ._state import isolated
from ._validation import check_callable, check_finite, check_int
from .posteriors.predict import plate_nesting

__all__ = ["TrainedRun", "train_runs"]

#: The values of ``train_runs(on_error=...)``.
ON_ERROR = ("raise", "keep")


@dataclass(frozen=True, repr=False, eq=False)  # eq on tensors is ambiguous: identity
class TrainedRun:
    """One fitted SVI run (or one that failed, with ``on_error="keep"``).

    Its ``repr`` is one short line (seed, steps, final loss, error), not the loss
    history or the parameters: ``TrainedRun(seed=0, steps=300, final_loss=123.4, error=None)``.

    Attributes
    ----------
    guide : the fitted guide (its parameters live in the guide module itself);
        ``None`` for a run that raised
    model : the model instance the guide was fitted to (``None`` for a run that raised)
    losses : Tensor ``(steps,)``
        The loss (negative ELBO estimate) after every step; NaN for the steps a
        failed run did not reach (all of them when it failed on an executor).
    seed : int or None
        Seed of the run's torch RNG (``None`` for runs trained vectorized, which
        share one RNG stream seeded with ``train_runs(seed=...)``).
    state : dict
        The run's own Pyro parameter-store state (``{"params", "constraints"}``);
        ``with pyro.get_param_store().scope(run.state): ...`` evaluates the run
        with Pyro machinery that reads the global store by name. Empty for a run
        that raised.
    error : BaseException or None
        ``None`` for a run that finished with a finite loss at every step; else the
        exception that ended it (a ``ValueError`` saying where the loss diverged, the
        exception the run raised, or the executor's error when its worker was lost).
        :func:`~pyro_symmetry.diagnostics.to_inference_data` and the report skip
        such runs, with a note.
    """

    guide: Any
    model: Any
    losses: torch.Tensor
    seed: int | None
    state: dict
    error: BaseException | None = None

    @property
    def steps(self) -> int:
        """Number of SVI steps the run was given (the length of :attr:`losses`)."""
        return int(self.losses.shape[0]) if torch.is_tensor(self.losses) and self.losses.dim() else 0

    @property
    def final_loss(self) -> float:
        """The loss after the last step (NaN if the run did not reach it)."""
        return float(self.losses[-1]) if self.steps else math.nan

    def __repr__(self) -> str:
        err = "None" if self.error is None else f"{type(self.error).__name__}({_clip(str(self.error), 60)!r})"
        return f"TrainedRun(seed={self.seed}, steps={self.steps}, final_loss={self.final_loss:.6g}, error={err})"


def _clip(text: str, width: int) -> str:
    line = text.splitlines()[0] if text else ""
    return line if len(line) <= width else line[: width - 3] + "..."


def _split_data(data: Any) -> tuple[tuple, dict]:
    if isinstance(data, Mapping):
        return (), dict(data)
    if isinstance(data, (tuple, list)):
        return tuple(data), {}
    return (data,), {}


def _failed(seed: int | None, losses: torch.Tensor, error: BaseException) -> TrainedRun:
    """A run that raised: no guide, the losses it reached (NaN beyond)."""
    return TrainedRun(None, None, losses, seed, {"params": {}, "constraints": {}}, error)


# ---------------------------------------------------------------------- vectorized
class _RunsPlated:
    """``model`` with every site under one extra plate ``_runs`` of size R."""

    def __init__(self, model: Any, num_runs: int, dim: int) -> None:
        self.model, self.num_runs, self.dim = model, num_runs, dim

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        with pyro.plate("_runs", self.num_runs, dim=self.dim):
            return self.model(*args, **kwargs)

    def __getattr__(self, name: str) -> Any:  # make_guide may read model attributes
        return getattr(self.__dict__["model"], name)


def _per_run(log_prob: torch.Tensor, dim: int, num_runs: int) -> torch.Tensor:
    """Sum a site's (scaled) log-prob over everything but the runs plate dim."""
    # A site's batch shape has at most -dim dims with the runs plate leftmost; pad, then
    # broadcast terms that do not depend on the run (each run's ELBO contains them).
    nd = -dim
    lp = log_prob.reshape((1,) * (nd - log_prob.dim()) + tuple(log_prob.shape))
    return lp.expand((num_runs,) + tuple(lp.shape[1:])).reshape(num_runs, -1).sum(-1)


def _per_run_elbo(model: Any, guide: Any, args: tuple, kwargs: dict, dim: int, num_runs: int) -> torch.Tensor:
    """``(R,)`` single-particle ELBO of each run; the guide must be reparameterized."""
    guide_tr = poutine.trace(guide).get_trace(*args, **kwargs)
    model_tr = poutine.trace(poutine.replay(model, trace=guide_tr)).get_trace(*args, **kwargs)
    elbo = torch.zeros(num_runs)
    for tr, sign in ((model_tr, 1.0), (guide_tr, -1.0)):
        tr.compute_log_prob()
        for site in tr.nodes.values():
            if site["type"] != "sample" or site_is_subsample(site):
                continue
            if sign < 0 and not site["fn"].has_rsample:
                raise ValueError(f"guide site {site['name']!r} is not reparameterizable; train with vectorize=False")
            elbo = elbo + sign * _per_run(site["log_prob"], dim, num_runs)
    return elbo


def _fit_vectorized(vmodel: Any, vguide: Any, task: Task, seed: int, progress: bool) -> torch.Tensor:
    """Train the plated guide; ``(steps, R)`` losses."""
    optimizer = fresh_optim(task.optim)
    num_runs = vmodel.num_runs
    losses = torch.empty(task.steps, num_runs)
    for i in tqdm(range(task.steps), desc=f"SVI ({num_runs} runs, vectorized)", leave=False, disable=not progress):
        with poutine.trace(param_only=True) as capture, diverged(f"a run (vectorized, seed {seed})", i):
            elbo = _per_run_elbo(vmodel, vguide, task.args, task.kwargs, vmodel.dim, num_runs)
        (-elbo.sum()).backward()
        params = {site["value"].unconstrained() for site in capture.trace.nodes.values()}
        optimizer(params)
        pyro.infer.util.zero_grads(params)
        losses[i] = -elbo.detach()
    return losses


def _split_run(task: Task, model: Any, vstate: dict, r: int, num_runs: int) -> tuple[Any, Any, dict]:
    """Run ``r``'s own model, guide and parameter-store state, sliced out of the plated one."""
    guide = task.make_guide(model)
    with pyro.get_param_store().scope() as template, torch.no_grad():
        guide(*task.args, **task.kwargs)  # the names and shapes of one run's parameters
    state = {"params": {}, "constraints": dict(template["constraints"])}
    for name, p in template["params"].items():
        if name not in vstate["params"]:
            raise ValueError(f"parameter {name!r} of a single run is missing from the vectorized guide")
        v = vstate["params"][name].detach()
        if v.numel() != num_runs * p.numel():
            raise ValueError(
                f"cannot split vectorized parameter {name!r} of shape {tuple(v.shape)} into {num_runs} runs "
                f"of shape {tuple(p.shape)}"
            )
        # The runs plate is the outermost batch dim, so run r is the r-th leading slice.
        state["params"][name] = torch.nn.Parameter(v.reshape(num_runs, -1)[r].reshape(p.shape).clone())
    with torch.no_grad(), pyro.get_param_store().scope(state):
        guide(*task.args, **task.kwargs)  # the guide module adopts the run's parameters
    return model, guide, state


def _train_vectorized(
    task: Task, num_runs: int, seed: int, progress: bool, required: bool
) -> tuple[list[TrainedRun] | None, tuple[Any, torch.Tensor] | None]:
    """The runs trained as one plated problem, or ``(None, (model, rng_state))`` when the
    guide is not a plain AutoNormal: the model already built, for the first sequential run."""
    store = pyro.get_param_store()
    with store.scope() as vstate:
        torch.manual_seed(seed)
        base = task.make_model()
        rng = torch.get_rng_state()
        if not callable(base):
            raise TypeError(f"make_model() must return a Pyro model (a callable), got {type(base).__name__}")
        with torch.no_grad():
            nesting = plate_nesting(poutine.trace(base).get_trace(*task.args, **task.kwargs))
        vmodel = _RunsPlated(base, num_runs, -(nesting + 1))
        vguide = task.make_guide(vmodel)
        if type(vguide) is not AutoNormal:
            if required:
                raise ValueError(
                    f"vectorize=True needs make_guide to return a plain AutoNormal, got {type(vguide).__name__}"
                )
            return None, (base, rng)
        losses = _fit_vectorized(vmodel, vguide, task, seed, progress)
    runs = []
    for r in range(num_runs):
        # make_model once per run: the plated model's own instance serves run 0.
        model = base if r == 0 else task.make_model()
        model, guide, state = _split_run(task, model, vstate, r, num_runs)
        runs.append(TrainedRun(guide, model, losses[:, r].clone(), None, state))
    return runs, None


# ---------------------------------------------------------------------- sequential
def _train_sequential(
    task: Task, seeds: list[int], on_error: str, progress: bool, prebuilt: tuple[Any, torch.Tensor] | None
) -> list[TrainedRun]:
    runs = []
    for r, s in enumerate(tqdm(seeds, desc="runs", disable=not progress or len(seeds) == 1)):
        losses = torch.full((task.steps,), math.nan)
        try:
            state, losses, model, guide = train_one(task, s, progress, f"run {r}", prebuilt if r == 0 else None, losses)
        except Exception as e:
            if on_error == "raise":
                raise
            runs.append(_failed(s, losses, e))
            continue
        runs.append(TrainedRun(guide, model, losses, s, state))
    return runs


def _train_on_executor(executor: Any, task: Task, seeds: list[int], on_error: str, progress: bool) -> list[TrainedRun]:
    """Runs on the executor; their parameters are loaded into fresh guides here (unless
    the task ran in this process and handed its modules over)."""
    runs = []
    for s, out in zip(seeds, run_on_executor(executor, task, seeds, on_error, progress)):
        runs.append(_from_outcome(task, s, out, on_error))
    return runs


def _from_outcome(task: Task, seed: int, out: Outcome, on_error: str) -> TrainedRun:
    if out.error is not None:
        return _failed(seed, out.losses, out.error)
    if out.guide is not None:
        return TrainedRun(out.guide, out.model, out.losses, seed, out.state)
    try:
        model, guide = load(task, out.state)
    except Exception as e:
        if on_error == "raise":
            raise
        return _failed(seed, out.losses, e)
    return TrainedRun(guide, model, out.losses, seed, out.state)


# ---------------------------------------------------------------------- public
def train_runs(
    make_model: Callable[[], Any],
    make_guide: Callable[[Any], Any],
    data: Any,
    num_runs: int,
    *,
    steps: int,
    executor: Any = None,
    seed: int = 0,
    optim: Any = None,
    loss: Any = None,
    vectorize: bool | None = None,
    num_threads: int | None = None,
    progress: bool = True,
    on_error: str = "raise",
) -> list[TrainedRun]:
    """Train ``num_runs`` independent SVI runs of one model with different seeds.

    Parameters
    ----------
    make_model : callable ``() -> model``
        Builds a fresh model (e.g. ``lambda: ps.models.BayesianMLP(64, [32, 32], 10)``).
        Called once per run (in the process that trains the run; on an executor, once
        more here to load the returned parameters into a guide).
    make_guide : callable ``model -> guide``
        Builds a guide for a model (e.g. ``AutoNormal``). With a process pool both
        factories must be picklable (module-level functions or ``functools.partial``,
        not lambdas or local functions): a ``TypeError`` naming the one that is not is
        raised before anything runs.
    data : tuple of positional args, mapping of keyword args, or a single tensor
        Passed to ``svi.step`` (and so to model and guide).
    num_runs : int
    steps : int
        Full-batch SVI steps per run.
    executor : optional
        Anything with ``submit(fn, *args) -> future`` (futures with ``result()``): a
        ``ProcessPoolExecutor`` on one machine, ``dask.distributed.Client`` (or its
        ``get_executor()``) on a cluster. Each run is one task; results are collected
        as they complete and come back as parameter-store states, loaded into fresh
        guides here. Runs in threads of one process (a ``ThreadPoolExecutor``) take
        turns, since Pyro's handler stack and param store are global to a process.
        **A lost worker** is recognized without guessing at exception types: a run's
        own failure comes back as the task's result, so an exception from
        ``future.result()`` means the task itself never returned (the worker died or
        was killed: ``BrokenProcessPool``, Dask's ``KilledWorker``; the task was
        cancelled). Such a run is submitted once more; if that fails too, it counts as
        failed. A ``ProcessPoolExecutor`` breaks as a whole when one worker dies
        (Python's design): its unfinished runs fail with ``BrokenProcessPool`` and
        cannot be retried on it; Dask replaces dead workers, so there only the run
        whose worker died is affected.
    seed : int
        Run ``r`` seeds torch with ``seed + r`` (its initialization and noise).
    optim : pyro.optim.PyroOptim, optional
        Copied per run. Default ``ClippedAdam({"lr": 1e-2})``.
    loss : ELBO, optional
        Default ``Trace_ELBO()``. Given a loss, runs are trained one after another
        (or on the executor): the vectorized path computes its own single-particle
        ELBO per run, so ``vectorize=True`` with a ``loss`` is an error.
    vectorize : bool, optional
        In-process only. Train all runs as one batched problem: the model runs
        under an extra plate of size R, so an ``AutoNormal`` guide holds R
        independent sets of parameters, the summed loss has independent gradients
        per run, and Adam (elementwise) updates them independently. ``None``
        (default) vectorizes whenever ``make_guide`` returns a plain
        ``AutoNormal`` and trains runs one after another otherwise. Vectorized
        runs share one RNG stream seeded with ``seed`` (their initializations and
        noise are still independent draws). With ``on_error="keep"``, a vectorized
        problem that raises (one diverging run makes the whole batch fail) is
        trained again run by run, so that only the failing runs are lost.
    num_threads : int, optional
        ``torch.set_num_threads`` while training (in each task on an executor; set
        it to 1 with process pools to avoid oversubscription). The caller's thread
        count is restored afterwards.
    progress : bool
        Show tqdm progress bars.
    on_error : {"raise", "keep"}
        What a failed run does: an exception in ``make_model``/``make_guide``/SVI, a
        non-finite loss, a lost worker (twice). ``"raise"`` (default): raise its
        error (runs still pending on an executor are cancelled). ``"keep"``: return
        every run, the failed ones with :attr:`TrainedRun.error` set (and
        ``guide=None`` when the run raised), with a warning listing them.

    Returns
    -------
    list of :class:`TrainedRun`, one per run, in seed order.

    Notes
    -----
    The caller's torch, numpy and Python RNG states, thread count and default dtype
    are left as they were (:func:`pyro_symmetry._state.isolated`), and so is Pyro's
    param store (every run trains in its own scope).

    Examples
    --------
    >>> runs = ps.train_runs(lambda: ps.models.BayesianMLP(64, [32], 10),
    ...                      lambda m: AutoNormal(m, init_scale=0.05), (x, y), 8, steps=1000)
    >>> idata = ps.diagnostics.to_inference_data(runs, num_samples=100)
    """
    task, vectorize = _check_arguments(
        make_model, make_guide, data, num_runs, steps, executor, seed, optim, loss, vectorize, num_threads, on_error
    )
    with isolated(param_store=False):
        if num_threads is not None:
            torch.set_num_threads(num_threads)
        runs = _dispatch(task, num_runs, seed, executor, vectorize, progress, on_error)
    return _finish(runs, on_error)


def _check_arguments(
    make_model: Any,
    make_guide: Any,
    data: Any,
    num_runs: Any,
    steps: Any,
    executor: Any,
    seed: Any,
    optim: Any,
    loss: Any,
    vectorize: Any,
    num_threads: Any,
    on_error: Any,
) -> tuple[Task, bool | None]:
    check_int("num_runs", num_runs, minimum=1)
    check_int("steps", steps, minimum=1)
    check_callable("make_model", make_model)
    check_callable("make_guide", make_guide)
    check_int("seed", seed)
    if num_threads is not None:
        check_int("num_threads", num_threads, minimum=1)
    if optim is not None and not isinstance(optim, pyro.optim.PyroOptim):
        raise TypeError(f"optim must be a pyro.optim.PyroOptim (e.g. pyro.optim.Adam(...)), got {type(optim).__name__}")
    if not isinstance(on_error, str) or on_error not in ON_ERROR:
        raise ValueError(f"on_error must be one of {ON_ERROR}, got {on_error!r}")
    check_executor(executor)
    if vectorize and executor is not None:
        raise ValueError("vectorize=True trains in-process; it cannot be combined with an executor")
    if loss is not None:
        if vectorize:
            raise ValueError(
                "vectorize=True computes its own single-particle Trace_ELBO per run; it cannot use loss=. "
                "Pass vectorize=False (or leave it None) to train with this loss"
            )
        vectorize = False  # a user's ELBO (particles, TraceMeanField_ELBO, ...) must be the one trained
    args, kwargs = _split_data(data)
    named = {**{f"data[{i}]": a for i, a in enumerate(args)}, **{f"data[{k!r}]": v for k, v in kwargs.items()}}
    for name, value in named.items():
        if torch.is_tensor(value) and value.is_floating_point():
            check_finite(name, value)
    task = Task(make_model, make_guide, args, kwargs, steps, optim, loss, num_threads)
    if executor is not None:
        task.check_picklable(executor)
    return task, vectorize


def _dispatch(
    task: Task, num_runs: int, seed: int, executor: Any, vectorize: bool | None, progress: bool, on_error: str
) -> list[TrainedRun]:
    seeds = [seed + r for r in range(num_runs)]
    if executor is not None:
        return _train_on_executor(executor, task, seeds, on_error, progress)
    prebuilt = None
    if vectorize is not False:
        try:
            runs, prebuilt = _train_vectorized(task, num_runs, seed, progress, bool(vectorize))
        except Exception as e:
            if on_error == "raise":
                raise
            warnings.warn(
                f"the vectorized runs failed ({type(e).__name__}: {e}); training them one by one (on_error='keep')",
                stacklevel=3,
            )
            runs, prebuilt = None, None
        if runs is not None:
            return runs
    return _train_sequential(task, seeds, on_error, progress, prebuilt)


def _finish(runs: list[TrainedRun], on_error: str) -> list[TrainedRun]:
    """Mark (or raise) runs whose loss became NaN/Inf: their guide is no posterior."""
    for r, run in enumerate(runs):
        if run.error is not None:
            continue
        bad = (~torch.isfinite(run.losses)).nonzero()
        if bad.numel():
            step = int(bad[0, 0])
            err = ValueError(
                f"run {r} (seed {run.seed}) diverged: its loss is {float(run.losses[step])} at step {step}; "
                "lower the learning rate or check the data and the model's scales"
            )
            if on_error == "raise":
                raise err
            runs[r] = replace(run, error=err)
    failed = [(r, run) for r, run in enumerate(runs) if run.error is not None]
    if failed:
        listed = "; ".join(f"run {r} (seed {run.seed}): {type(run.error).__name__}: {run.error}" for r, run in failed)
        warnings.warn(
            f"{len(failed)} of {len(runs)} runs failed and are marked with their error: {listed}", stacklevel=3
        )
    return runs
