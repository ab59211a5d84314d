"""Which runs and draws the converters accept: failed runs are skipped, draws are read
against the sites' own shapes.

``train_runs(on_error="keep")`` returns failed runs marked with ``run.error``; the
converters and the report skip them with a note (read by duck typing: any run with a
non-None ``error`` attribute). Sample dicts and MCMC draws are checked against the
sites' shapes (the spec's, else the model's), so ``Predictive`` output ``(S, 1, *site)``
is read as ``S`` draws of the site, not as a site with a leading axis of length 1.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch

from ..groups import PermutationSpec, SpecError

__all__ = ["check_enough_chains", "describe_skipped", "expected_shapes", "fit_site_shapes", "split_failed"]


# ---------------------------------------------------------------------- failed runs
def split_failed(runs: Sequence[Any]) -> tuple[list[tuple[int, Any]], list[tuple[int, BaseException]]]:
    """``(kept, skipped)``: ``(index, run)`` of the runs to use, ``(index, error)`` of the
    runs that failed (``run.error`` is not None, as ``train_runs(on_error="keep")`` marks them)."""
    kept, skipped = [], []
    for i, run in enumerate(runs):
        error = None if isinstance(run, Mapping) else getattr(run, "error", None)
        (kept if error is None else skipped).append((i, run if error is None else error))
    return kept, skipped


def describe_skipped(skipped: Sequence[tuple[int, BaseException]], width: int = 200) -> list[str]:
    """One line per failed run: ``"run 3 skipped: RuntimeError: loss is NaN"`` (the first
    line of the message, cut at ``width`` characters: Pyro appends whole trace tables)."""
    out = []
    for i, e in skipped:
        lines = str(e).strip().splitlines()
        msg = lines[0] if lines else ""
        if len(msg) > width or len(lines) > 1:
            msg = msg[:width].rstrip() + " …"
        out.append(f"run {i} skipped: {type(e).__name__}: {msg}")
    return out


def check_enough_chains(draws: Any, needed: int, what: str) -> None:
    """Raise ``ValueError`` if fewer than ``needed`` chains remain, naming the failed runs."""
    if draws.num_chains < needed:
        why = "; ".join(describe_skipped(draws.skipped))
        raise ValueError(
            f"{what} needs at least {needed} runs, got {draws.num_chains}"
            + (f" after skipping {len(draws.skipped)} failed run(s) ({why})" if draws.skipped else "")
        )


# ---------------------------------------------------------------------- site shapes
def expected_shapes(spec: PermutationSpec | None, model: Any, args: tuple, kwargs: dict) -> dict[str, tuple]:
    """Own shapes of the sites, from the spec (bound to shapes) and, for the rest, the model
    (an ``nn.Module``'s priors, or a trace of a callable model with the given data)."""
    shapes: dict[str, tuple] = {}
    if isinstance(model, torch.nn.Module) or (model is not None and (args or kwargs)):
        from ..groups.builders import model_site_shapes

        shapes.update(model_site_shapes(model, *args, **kwargs))
    if spec is not None and spec.shapes is not None:
        shapes.update(spec.shapes)
    return shapes


def fit_site_shapes(
    chain: dict[str, torch.Tensor], expected: Mapping[str, tuple], acted: set[str], where: str
) -> dict[str, torch.Tensor]:
    """Check draws ``site -> (num_draws, *shape)`` against the sites' own shapes.

    Singleton dims between the draw dim and a site's own dims (``Predictive`` output
    ``(S, 1, *site)`` for a model with a data plate) are removed. Other dims there are
    kept for a site no group acts on (a local latent batched by its plate) and refused
    for a site a group acts on; so is a site whose trailing dims are not its own shape:
    reading its axes would be a guess.
    """
    out = {}
    for k, v in chain.items():
        want = expected.get(k)
        got = tuple(v.shape[1:]) if v.dim() else None
        if want is None or got == want:
            out[k] = v
            continue
        extra = -1 if got is None else len(got) - len(want)
        if extra > 0 and got[extra:] == want:
            if all(d == 1 for d in got[:extra]):
                out[k] = v.reshape((v.shape[0], *want))
                continue
            if k not in acted:
                out[k] = v
                continue
        raise SpecError(
            f"{where}, site {k!r}: draws of shape {tuple(v.shape)} do not match the site's shape {want}; "
            f"expected (num_draws, *{want}), optionally with singleton plate dims after num_draws "
            "(a single point estimate needs a leading draw dim: value[None])"
        )
    return out
