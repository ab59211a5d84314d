"""Uncertainty metrics of a Bayesian classifier (those Laurent et al., ICLR 2024, report).

Every function takes predictive probabilities either as the posterior-mean
prediction ``probs (N, C)`` or as per-sample predictions ``(S, N, C)`` (averaged
over ``S`` where a metric needs the mean prediction), and labels ``(N,)``. They run
in torch on the inputs' device and dtype. The ranking metrics follow
scikit-learn's definitions (``average_precision_score``, ``roc_curve``) and are
tested against them.

Out-of-distribution detection treats OOD inputs as the positive class and a
higher score as "more likely OOD" (e.g. the predictive entropy or the predictive
mutual information of each input).

Two mutual informations appear in this package, with distinct names:
:func:`predictive_mutual_information` here is ``I(y; w | x)``, the epistemic part of
a prediction's uncertainty (Houlsby et al., 2011, "BALD"); :func:`pyro_symmetry.mutual_information`
is ``I(g; w)``, the information between a group element and the weights of a
symmetrized posterior (Gelberg et al., 2024). ``metrics.mutual_information`` is a
deprecated alias of the former.
"""

from __future__ import annotations

import warnings
from collections.abc import Iterator
from dataclasses import dataclass, fields

import torch

__all__ = [
    "ReliabilityDiagram",
    "accuracy",
    "aupr",
    "brier_score",
    "evaluate",
    "expected_calibration_error",
    "fpr_at_tpr",
    "nll",
    "predictive_entropy",
    "predictive_mutual_information",
    "reliability_diagram",
]


def _check_probs(probs: torch.Tensor, name: str) -> torch.Tensor:
    """Probabilities: floating point, finite, in ``[0, 1]`` and summing to 1 over classes.

    Catches logits (or log-probabilities) passed where probabilities are expected.
    """
    if not probs.is_floating_point():
        raise TypeError(f"{name} must be floating-point probabilities, got dtype {probs.dtype}")
    if probs.numel():
        d = probs.detach()  # a check, not part of any gradient
        lo, hi = torch.aminmax(d)
        if not (0.0 <= lo and hi <= 1.0):  # NaN fails both comparisons
            raise ValueError(f"{name} must be probabilities in [0, 1], got values in [{float(lo)}, {float(hi)}]")
        # A loose tolerance (round-off of a float32 softmax, even after a cast to float64): this
        # catches logits and unnormalized scores, not precision.
        tol = d.shape[-1] * max(1e-4, torch.finfo(d.dtype).eps ** 0.5)
        err = float((d.sum(-1) - 1).abs().max())
        if err > tol:
            raise ValueError(f"{name} must sum to 1 over the last (class) dim; the largest deviation is {err:.3g}")
    return probs


def _mean_probs(probs: torch.Tensor, name: str = "probs") -> torch.Tensor:
    if not torch.is_tensor(probs) or probs.dim() not in (2, 3):
        raise ValueError(f"{name} must be a tensor (N, C) or (S, N, C), got {getattr(probs, 'shape', type(probs))}")
    if not probs.numel():
        raise ValueError(f"{name} has shape {tuple(probs.shape)}: metrics need at least one input, sample and class")
    _check_probs(probs, name)
    return probs.mean(0) if probs.dim() == 3 else probs


def _check_labels(probs: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    labels = torch.as_tensor(labels, device=probs.device)
    if labels.shape != probs.shape[:1]:
        raise ValueError(f"labels have shape {tuple(labels.shape)}, expected ({probs.shape[0]},) to match probs")
    if labels.dtype.is_floating_point or labels.min() < 0 or labels.max() >= probs.shape[-1]:
        raise ValueError(f"labels must be integer classes in [0, {probs.shape[-1]})")
    return labels.long()


def _entropy(p: torch.Tensor) -> torch.Tensor:
    return -torch.special.xlogy(p, p).sum(-1)


def accuracy(probs: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Fraction of inputs whose most probable class (of the mean prediction) is the label."""
    p = _mean_probs(probs)
    return (p.argmax(-1) == _check_labels(p, labels)).to(p.dtype).mean()


def nll(probs: torch.Tensor, labels: torch.Tensor, eps: float | None = None) -> torch.Tensor:
    """Mean negative log-likelihood ``-1/N sum_i log p(y_i | x_i)`` of the mean prediction.

    Probabilities are clipped to ``[eps, 1 - eps]`` (default: the dtype's machine
    epsilon, as scikit-learn's ``log_loss``) so a confident mistake is finite.
    """
    p = _mean_probs(probs)
    y = _check_labels(p, labels)
    eps = torch.finfo(p.dtype).eps if eps is None else eps
    return -p.gather(-1, y[:, None]).squeeze(-1).clamp(eps, 1 - eps).log().mean()


def brier_score(probs: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Multiclass Brier score ``1/N sum_i sum_c (p_ic - [y_i = c])^2`` (range ``[0, 2]``)."""
    p = _mean_probs(probs)
    y = _check_labels(p, labels)
    onehot = torch.nn.functional.one_hot(y, p.shape[-1]).to(p.dtype)
    return ((p - onehot) ** 2).sum(-1).mean()


def predictive_entropy(probs: torch.Tensor) -> torch.Tensor:
    """``(N,)`` entropy of the mean prediction ``H[E_w p(y | x, w)]`` (nats)."""
    return _entropy(_mean_probs(probs))


def predictive_mutual_information(prob_samples: torch.Tensor) -> torch.Tensor:
    """``(N,)`` epistemic uncertainty ``I(y; w | x) = H[E_w p] - E_w H[p]`` (nats).

    The mutual information between an input's label and the weights (Houlsby et al.,
    2011), not the ``I(g; w)`` of :func:`pyro_symmetry.mutual_information`.

    Parameters
    ----------
    prob_samples : Tensor ``(S, N, C)``
        Predictions of ``S`` posterior samples.
    """
    if not torch.is_tensor(prob_samples) or prob_samples.dim() != 3:
        raise ValueError("predictive_mutual_information needs per-sample predictions of shape (S, N, C)")
    _check_probs(prob_samples, "prob_samples")
    return (_entropy(prob_samples.mean(0)) - _entropy(prob_samples).mean(0)).clamp_min(0.0)


def mutual_information(prob_samples: torch.Tensor) -> torch.Tensor:
    """Deprecated alias of :func:`predictive_mutual_information` (removed in the next release).

    Renamed so that it is not confused with :func:`pyro_symmetry.mutual_information`, ``I(g; w)``.
    """
    warnings.warn(
        "pyro_symmetry.diagnostics.metrics.mutual_information is deprecated and will be removed in the next "
        "release; use metrics.predictive_mutual_information (I(y; w | x)), not to be confused with "
        "ps.mutual_information (I(g; w))",
        DeprecationWarning,
        stacklevel=2,
    )
    return predictive_mutual_information(prob_samples)


@dataclass(frozen=True, repr=False, eq=False)
class ReliabilityDiagram:
    """Data of a reliability diagram with ``B`` equal-width confidence bins.

    Unpacks as ``edges, confidence, accuracy, counts, ece = diagram`` (it was a named
    tuple); its ``repr`` is one line: number of bins, non-empty bins and the ECE.

    Attributes
    ----------
    edges : Tensor ``(B + 1,)``
    confidence : Tensor ``(B,)``
        Mean confidence (max probability) of the inputs in each bin (NaN if empty).
    accuracy : Tensor ``(B,)``
        Accuracy in each bin (NaN if empty).
    counts : Tensor ``(B,)``
    ece : Tensor ``()``
        ``sum_b (n_b / N) |accuracy_b - confidence_b|``.
    """

    edges: torch.Tensor
    confidence: torch.Tensor
    accuracy: torch.Tensor
    counts: torch.Tensor
    ece: torch.Tensor

    def __iter__(self) -> Iterator[torch.Tensor]:
        return (getattr(self, f.name) for f in fields(self))  # no copies (astuple deep-copies)

    def __repr__(self) -> str:
        nonempty = int((self.counts > 0).sum())
        return (
            f"ReliabilityDiagram(num_bins={self.counts.numel()}, nonempty_bins={nonempty}, "
            f"inputs={int(self.counts.sum())}, ece={float(self.ece):.4g})"
        )


def reliability_diagram(probs: torch.Tensor, labels: torch.Tensor, num_bins: int = 15) -> ReliabilityDiagram:
    """Bin inputs by confidence and compare mean confidence with accuracy per bin.

    Bins are ``(e_{b-1}, e_b]`` on an even grid of ``[0, 1]`` (a confidence equal to
    an edge falls in the lower bin, as in scikit-learn's ``calibration_curve``).
    """
    p = _mean_probs(probs)
    y = _check_labels(p, labels)
    if isinstance(num_bins, bool) or not isinstance(num_bins, int) or num_bins < 1:
        raise ValueError(f"num_bins must be a positive int, got {num_bins!r}")
    conf, pred = p.max(-1)
    correct = (pred == y).to(p.dtype)
    edges = torch.linspace(0, 1, num_bins + 1, dtype=p.dtype, device=p.device)
    idx = torch.bucketize(conf, edges[1:-1], right=False)
    counts = torch.zeros(num_bins, dtype=p.dtype, device=p.device).index_add_(0, idx, torch.ones_like(conf))
    sum_conf = torch.zeros_like(counts).index_add_(0, idx, conf)
    sum_acc = torch.zeros_like(counts).index_add_(0, idx, correct)
    mean_conf, mean_acc = sum_conf / counts, sum_acc / counts  # NaN in empty bins
    ece = ((sum_acc - sum_conf).abs() / conf.shape[0]).sum()
    return ReliabilityDiagram(edges, mean_conf, mean_acc, counts, ece)


def expected_calibration_error(probs: torch.Tensor, labels: torch.Tensor, num_bins: int = 15) -> torch.Tensor:
    """ECE with ``num_bins`` equal-width bins (Guo et al., 2017); see :func:`reliability_diagram`."""
    return reliability_diagram(probs, labels, num_bins).ece


def _ood_curve(
    scores_in: torch.Tensor, scores_out: torch.Tensor, ood_positive: bool = True
) -> tuple[torch.Tensor, torch.Tensor]:
    """Cumulative true and false positives at each distinct threshold, highest first."""
    for name, s in (("scores_in", scores_in), ("scores_out", scores_out)):
        if not torch.is_tensor(s):
            raise TypeError(f"{name} must be a tensor of scores, got {type(s).__name__}")
        if s.is_floating_point() and bool(s.isnan().any()):
            raise ValueError(f"{name} contains NaN scores")
    scores_in, scores_out = scores_in.reshape(-1), scores_out.reshape(-1)
    if not ood_positive:  # in-distribution inputs positive, lower uncertainty first
        scores_in, scores_out = -scores_out, -scores_in
    if scores_in.numel() == 0 or scores_out.numel() == 0:
        raise ValueError("OOD metrics need at least one in-distribution and one OOD score")
    scores = torch.cat([scores_in, scores_out.to(scores_in)])
    positive = torch.cat([torch.zeros_like(scores_in), torch.ones_like(scores_out, dtype=scores_in.dtype)])
    order = torch.argsort(scores, descending=True, stable=True)
    scores, positive = scores[order], positive[order]
    # Keep the last index of each run of tied scores: one point per distinct threshold.
    last = torch.ones_like(scores, dtype=torch.bool)
    last[:-1] = scores[1:] != scores[:-1]
    tps = positive.cumsum(0)[last]
    fps = (1 - positive).cumsum(0)[last]
    return tps, fps


def aupr(scores_in: torch.Tensor, scores_out: torch.Tensor, *, ood_positive: bool = True) -> torch.Tensor:
    """Area under the precision-recall curve for detecting OOD inputs.

    Average precision ``sum_k (R_k - R_{k-1}) P_k`` over the distinct score
    thresholds, scikit-learn's ``average_precision_score`` with OOD as label 1
    ("AUPR-Out"); ``ood_positive=False`` makes in-distribution inputs the positives
    and ranks them by lowest score ("AUPR-In").

    Parameters
    ----------
    scores_in : Tensor ``(N,)``
        Uncertainty scores of in-distribution inputs.
    scores_out : Tensor ``(M,)``
        Uncertainty scores of out-of-distribution inputs.
    """
    tps, fps = _ood_curve(scores_in, scores_out, ood_positive)
    precision = tps / (tps + fps)
    recall = tps / tps[-1]
    prev = torch.cat([recall.new_zeros(1), recall[:-1]])
    return ((recall - prev) * precision).sum()


def fpr_at_tpr(
    scores_in: torch.Tensor, scores_out: torch.Tensor, tpr: float = 0.95, *, ood_positive: bool = True
) -> torch.Tensor:
    """False-positive rate at the first threshold whose true-positive rate reaches ``tpr``.

    OOD inputs are the positives (``ood_positive=False``: in-distribution inputs,
    ranked by lowest score, the convention of Hendrycks & Gimpel, 2017); the
    threshold sweeps the distinct scores from high to low (the ROC curve of
    scikit-learn's ``roc_curve``).
    """
    if isinstance(tpr, bool) or not isinstance(tpr, (int, float)) or not 0 < tpr <= 1:
        raise ValueError(f"tpr must be a number in (0, 1], got {tpr!r}")
    tps, fps = _ood_curve(scores_in, scores_out, ood_positive)
    tpr_curve, fpr_curve = tps / tps[-1], fps / fps[-1]
    # A small tolerance keeps TPR = 0.95 exactly (e.g. 19/20) from rounding below 0.95.
    k = torch.searchsorted(tpr_curve, torch.tensor([tpr - 1e-12], dtype=tpr_curve.dtype, device=tpr_curve.device))
    return fpr_curve[k.clamp_max(len(fpr_curve) - 1)].squeeze(0)


def evaluate(
    prob_samples: torch.Tensor,
    labels: torch.Tensor,
    ood_prob_samples: torch.Tensor | None = None,
    *,
    num_bins: int = 15,
    ood_score: str = "entropy",
) -> dict[str, float]:
    """All metrics of a classifier in one dict.

    Parameters
    ----------
    prob_samples : Tensor ``(S, N, C)`` (or ``(N, C)``: then no mutual information)
    labels : Tensor ``(N,)``
    ood_prob_samples : Tensor ``(S, M, C)``, optional
        Predictions on out-of-distribution inputs; adds ``aupr`` and ``fpr95``.
    ood_score : {"entropy", "predictive_mutual_information"}
        Per-input OOD score (``"mutual_information"``: deprecated spelling of the latter).

    Returns
    -------
    dict with ``accuracy``, ``nll``, ``brier``, ``ece``, ``entropy`` (mean),
    ``predictive_mutual_information`` (mean of :func:`predictive_mutual_information`,
    ``(S, N, C)`` input only), and ``aupr``, ``fpr95`` when OOD data are given. The old key
    ``"mutual_information"`` still reads, with a ``DeprecationWarning`` (it is not
    :func:`pyro_symmetry.mutual_information`'s ``I(g; w)``).
    """
    if ood_score == "mutual_information":
        warnings.warn(
            "ood_score='mutual_information' is deprecated; use ood_score='predictive_mutual_information'",
            DeprecationWarning,
            stacklevel=2,
        )
        ood_score = "predictive_mutual_information"
    if ood_score not in ("entropy", "predictive_mutual_information"):
        raise ValueError(f"ood_score must be 'entropy' or 'predictive_mutual_information', got {ood_score!r}")
    out = {
        "accuracy": accuracy(prob_samples, labels),
        "nll": nll(prob_samples, labels),
        "brier": brier_score(prob_samples, labels),
        "ece": expected_calibration_error(prob_samples, labels, num_bins),
        "entropy": predictive_entropy(prob_samples).mean(),
    }
    if prob_samples.dim() == 3:
        out["predictive_mutual_information"] = predictive_mutual_information(prob_samples).mean()
    if ood_prob_samples is not None:
        _mean_probs(ood_prob_samples, "ood_prob_samples")
        if ood_prob_samples.shape[-1] != prob_samples.shape[-1]:
            raise ValueError(
                f"ood_prob_samples has {ood_prob_samples.shape[-1]} classes but prob_samples has "
                f"{prob_samples.shape[-1]}"
            )
        if ood_score == "predictive_mutual_information":
            s_in = predictive_mutual_information(prob_samples)
            s_out = predictive_mutual_information(ood_prob_samples)
        else:
            s_in, s_out = predictive_entropy(prob_samples), predictive_entropy(ood_prob_samples)
        out["aupr"] = aupr(s_in, s_out)
        out["fpr95"] = fpr_at_tpr(s_in, s_out, 0.95)
    return _MetricsDict({k: float(v) for k, v in out.items()})


class _MetricsDict(dict):
    """The dict :func:`evaluate` returns: the renamed key ``"mutual_information"`` (the
    predictive mutual information, now ``"predictive_mutual_information"``) still reads,
    with a ``DeprecationWarning``; it is neither listed nor ``in`` the dict."""

    _RENAMED = {"mutual_information": "predictive_mutual_information"}

    def __missing__(self, key: str) -> float:
        new = self._RENAMED.get(key)
        if new is None or new not in self:
            raise KeyError(key)
        warnings.warn(
            f"the metrics key {key!r} is deprecated; use {new!r} (it is not pyro_symmetry.mutual_information's "
            "I(g; w))",
            DeprecationWarning,
            stacklevel=2,
        )
        return self[new]
