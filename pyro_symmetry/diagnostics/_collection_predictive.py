"""Predictive metrics and ensemble diversity over a checkpoint collection, streamed.

Every checkpoint predicts once; the driver keeps running sums over members only:
the summed probabilities ``(N, C)`` (the ensemble's mean prediction), the summed entropies
``(N,)`` (for the mutual information ``I(y; w | x) = H[E_w p] - E_w H[p]``), the counts of
each predicted class ``(N, C)`` (pairwise disagreement: the fraction of member pairs whose
predicted classes differ, ``1 - sum_c c_c (c_c - 1) / (M (M - 1))`` per input, exact), and
one accuracy / NLL per member. Memory does not grow with the number of checkpoints
beyond those per-member scalars.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import torch

from ..collections import Collection
from ..collections._formats import CheckpointError
from . import metrics

__all__ = ["PredictiveSummary", "predictive"]


@dataclass(frozen=True)
class PredictiveSummary:
    """Result of :func:`predictive`.

    Attributes
    ----------
    mean_probs : Tensor ``(N, C)`` float64
        The ensemble (posterior-mean) prediction.
    predictive_mutual_information : Tensor ``(N,)``
        ``H[E_w p] - E_w H[p]`` per input (nats), clamped at 0 against round-off
        (``mutual_information``: deprecated alias, not ``I(g; w)``).
    disagreement : Tensor ``(N,)`` or None
        Fraction of member pairs whose predicted classes differ, per input (None for one member).
    member_accuracy, member_nll : Tensor ``(M,)`` or None
        Per checkpoint, when labels are given.
    metrics : dict
        Of the ensemble prediction, when labels are given: ``accuracy``, ``nll``, ``brier``,
        ``ece``, ``entropy`` (as :func:`ps.diagnostics.metrics.evaluate
        <pyro_symmetry.diagnostics.metrics.evaluate>`), and ``predictive_mutual_information``,
        ``disagreement`` (means over inputs).
    names : list of str
        The members, in order.
    """

    mean_probs: torch.Tensor
    predictive_mutual_information: torch.Tensor
    disagreement: torch.Tensor | None
    member_accuracy: torch.Tensor | None
    member_nll: torch.Tensor | None
    metrics: dict[str, float] = field(default_factory=dict)
    names: list[str] = field(default_factory=list)

    @property
    def mutual_information(self) -> torch.Tensor:
        """Deprecated alias of :attr:`predictive_mutual_information`."""
        warnings.warn(
            "PredictiveSummary.mutual_information is deprecated; use .predictive_mutual_information",
            DeprecationWarning,
            stacklevel=2,
        )
        return self.predictive_mutual_information

    @property
    def num_members(self) -> int:
        return len(self.names)

    def __str__(self) -> str:
        rows = [f"{len(self.names)} members, {self.mean_probs.shape[0]} inputs"]
        rows += [f"  {k:<20} {v:.4f}" for k, v in self.metrics.items()]
        if self.member_accuracy is not None:
            acc = self.member_accuracy
            rows.append(f"  member accuracy      mean {float(acc.mean()):.4f}, min {float(acc.min()):.4f}")
        return "\n".join(rows)


def _predictor(predict: Any) -> Callable[[Mapping[str, torch.Tensor], Any], torch.Tensor]:
    if isinstance(predict, torch.nn.Module):
        module = predict
        names = set(module.state_dict())

        def call(params: Mapping[str, torch.Tensor], x: Any) -> torch.Tensor:
            own = {k: v for k, v in params.items() if k in names}
            logits = torch.func.functional_call(module, own, (x,))
            return torch.softmax(logits.double(), -1)

        return call
    if not callable(predict):
        kind = type(predict).__name__
        raise TypeError(f"predict must be a callable (params, x) -> probs or an nn.Module, got {kind}")
    return predict


def predictive(
    collection: Collection,
    predict: Callable[[Mapping[str, torch.Tensor], Any], torch.Tensor] | torch.nn.Module,
    x: Any,
    y: torch.Tensor | None = None,
    *,
    num_bins: int = 15,
    progress: bool = False,
) -> PredictiveSummary:
    """Ensemble prediction, uncertainty and diversity of a collection, one checkpoint at a time.

    Parameters
    ----------
    collection : Collection
    predict : callable ``(params, x) -> probs (N, C)`` or ``nn.Module``
        ``params`` is a checkpoint's point (``site -> tensor``; Gaussian checkpoints: the
        means). An ``nn.Module`` is called with the checkpoint's tensors as its parameters
        (``torch.func.functional_call``) and its outputs read as logits (softmax).
    x : inputs passed to ``predict``
    y : Tensor ``(N,)``, optional
        Labels: adds per-member accuracy / NLL and the ensemble's metrics.
    num_bins : int
        Bins of the expected calibration error.
    progress : bool

    Returns
    -------
    PredictiveSummary

    References
    ----------
    Lakshminarayanan et al. (2017), deep ensembles; Laurent, Aldea, Franchi (ICLR 2024).
    """
    from tqdm.auto import tqdm

    call = _predictor(predict)
    sum_p = sum_h = counts = None
    acc, nll, names = [], [], []
    with torch.no_grad():
        for i in tqdm(range(len(collection)), desc="predict", unit="ckpt", disable=not progress):
            ck = collection.load(i)
            if ck is None:
                continue
            probs = torch.as_tensor(call(ck.params, x))
            try:
                metrics._mean_probs(probs, "probs")
            except (TypeError, ValueError) as e:
                raise CheckpointError(ck.name, f"predict returned invalid probabilities: {e}") from None
            if probs.dim() != 2 or (sum_p is not None and probs.shape != sum_p.shape):
                want = "(N, C)" if sum_p is None else tuple(sum_p.shape)
                raise CheckpointError(ck.name, f"predict returned shape {tuple(probs.shape)}, expected {want}")
            p = probs.double()
            if sum_p is None:
                sum_p, sum_h = torch.zeros_like(p), torch.zeros(p.shape[0], dtype=torch.float64)
                counts = torch.zeros_like(p)
            sum_p += p
            sum_h += metrics._entropy(p)
            counts.scatter_add_(1, p.argmax(-1, keepdim=True), torch.ones(p.shape[0], 1, dtype=torch.float64))
            if y is not None:
                acc.append(float(metrics.accuracy(p, y)))
                nll.append(float(metrics.nll(p, y)))
            names.append(ck.name)
    if not names:
        raise ValueError(f"no checkpoint could be read: {collection.errors}")
    m = len(names)
    mean = sum_p / m
    mi = (metrics._entropy(mean) - sum_h / m).clamp_min(0.0)
    dis = None if m < 2 else 1.0 - (counts * (counts - 1)).sum(-1) / (m * (m - 1))
    out = metrics._MetricsDict()
    if y is not None:
        out = metrics.evaluate(mean, y, num_bins=num_bins)
    out["predictive_mutual_information"] = float(mi.mean())
    if dis is not None:
        out["disagreement"] = float(dis.mean())
    member_acc = torch.tensor(acc, dtype=torch.float64) if y is not None else None
    member_nll = torch.tensor(nll, dtype=torch.float64) if y is not None else None
    return PredictiveSummary(mean, mi, dis, member_acc, member_nll, out, names)
