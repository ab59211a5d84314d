"""Uncertainty metrics against scikit-learn on random inputs, plus exact identities."""

import math

import numpy as np
import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from sklearn import metrics as skm
from sklearn.calibration import calibration_curve

import pyro_symmetry as ps

M = ps.diagnostics.metrics


def _random_predictions(seed: int, n: int = 60, c: int = 4, s: int = 5, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    logits = 2.0 * torch.randn(s, n, c, generator=g, dtype=dtype)
    labels = torch.randint(0, c, (n,), generator=g)
    return logits.softmax(-1), labels


@given(seed=st.integers(0, 10_000), c=st.integers(2, 6))
def test_accuracy_nll_brier_match_sklearn(seed, c):
    samples, y = _random_predictions(seed, c=c)
    p = samples.mean(0)
    labels = list(range(c))
    assert float(M.accuracy(samples, y)) == pytest.approx(skm.accuracy_score(y.numpy(), p.argmax(-1).numpy()))
    assert float(M.nll(samples, y)) == pytest.approx(skm.log_loss(y.numpy(), p.numpy(), labels=labels), rel=1e-10)
    ref = skm.brier_score_loss(y.numpy(), p.numpy(), labels=labels, scale_by_half=False)
    assert float(M.brier_score(samples, y)) == pytest.approx(ref, rel=1e-10)
    # (N, C) input is the mean prediction itself.
    assert float(M.nll(p, y)) == float(M.nll(samples, y))


@given(seed=st.integers(0, 10_000), num_bins=st.integers(1, 20))
def test_reliability_diagram_matches_sklearn_calibration_curve(seed, num_bins):
    samples, y = _random_predictions(seed, n=80)
    p = samples.mean(0)
    conf, pred = p.max(-1)
    correct = (pred == y).numpy().astype(int)
    diag = M.reliability_diagram(p, y, num_bins)
    nonempty = diag.counts > 0
    if correct.min() == correct.max():  # calibration_curve needs both classes
        return
    prob_true, prob_pred = calibration_curve(correct, conf.numpy(), n_bins=num_bins, strategy="uniform")
    np.testing.assert_allclose(diag.accuracy[nonempty].numpy(), prob_true, rtol=1e-12)
    np.testing.assert_allclose(diag.confidence[nonempty].numpy(), prob_pred, rtol=1e-12)
    counts = np.histogram(conf.numpy(), bins=num_bins, range=(0, 1))[0]
    assert int(diag.counts.sum()) == len(y) == counts.sum()
    # ECE from the sklearn bins.
    weights = diag.counts[nonempty].numpy() / len(y)
    assert float(diag.ece) == pytest.approx(float(np.sum(weights * np.abs(prob_true - prob_pred))), abs=1e-12)
    assert float(M.expected_calibration_error(p, y, num_bins)) == float(diag.ece)


def test_ece_is_zero_for_a_perfectly_calibrated_table():
    # Two bins: confidence 0.75 with 3/4 correct, confidence 1.0 with all correct.
    p = torch.tensor([[0.75, 0.25]] * 4 + [[1.0, 0.0]] * 2, dtype=torch.float64)
    y = torch.tensor([0, 0, 0, 1, 0, 0])
    assert float(M.expected_calibration_error(p, y, 10)) == pytest.approx(0.0, abs=1e-15)
    y_bad = torch.tensor([1, 1, 1, 1, 0, 0])
    assert float(M.expected_calibration_error(p, y_bad, 10)) == pytest.approx(4 / 6 * 0.75)


@given(seed=st.integers(0, 10_000), ties=st.booleans())
def test_ood_metrics_match_sklearn(seed, ties):
    g = torch.Generator().manual_seed(seed)
    s_in = torch.randn(40, generator=g, dtype=torch.float64)
    s_out = torch.randn(25, generator=g, dtype=torch.float64) + 0.8
    if ties:  # heavy ties exercise the distinct-threshold logic
        s_in, s_out = s_in.round(), s_out.round()
    y = np.r_[np.zeros(40), np.ones(25)]
    scores = np.r_[s_in.numpy(), s_out.numpy()]
    assert float(M.aupr(s_in, s_out)) == pytest.approx(skm.average_precision_score(y, scores), rel=1e-12)
    fpr, tpr, _ = skm.roc_curve(y, scores, drop_intermediate=False)
    for target in (0.5, 0.8, 0.95, 1.0):
        ref = fpr[np.searchsorted(tpr, target, side="left")]
        assert float(M.fpr_at_tpr(s_in, s_out, target)) == pytest.approx(ref)
    # In-distribution as positives ranked by low score: sklearn with flipped labels and scores.
    assert float(M.aupr(s_in, s_out, ood_positive=False)) == pytest.approx(
        skm.average_precision_score(1 - y, -scores), rel=1e-12
    )
    fpr, tpr, _ = skm.roc_curve(1 - y, -scores, drop_intermediate=False)
    ref = fpr[np.searchsorted(tpr, 0.95, side="left")]
    assert float(M.fpr_at_tpr(s_in, s_out, ood_positive=False)) == pytest.approx(ref)


def test_ood_metrics_extremes():
    s_in, s_out = torch.zeros(10), torch.ones(5)
    assert float(M.aupr(s_in, s_out)) == 1.0
    assert float(M.fpr_at_tpr(s_in, s_out)) == 0.0
    assert float(M.fpr_at_tpr(s_out, s_in)) == 1.0


def test_entropy_and_mutual_information():
    # Two samples that each put all mass on a different class: aleatoric 0, epistemic log 2.
    samples = torch.tensor([[[1.0, 0.0]], [[0.0, 1.0]]], dtype=torch.float64)
    assert float(M.predictive_entropy(samples)[0]) == pytest.approx(math.log(2))
    assert float(M.predictive_mutual_information(samples)[0]) == pytest.approx(math.log(2))
    # Identical samples: no epistemic uncertainty.
    same, _ = _random_predictions(0, s=1)
    same = same.expand(4, -1, -1)
    assert torch.allclose(
        M.predictive_mutual_information(same), torch.zeros(same.shape[1], dtype=same.dtype), atol=1e-12
    )
    # Against scipy's entropy on random inputs, and MI = H(mean) - mean H.
    from scipy.stats import entropy

    samples, _ = _random_predictions(3)
    h = M.predictive_entropy(samples).numpy()
    np.testing.assert_allclose(h, entropy(samples.mean(0).numpy(), axis=-1), rtol=1e-12)
    mean_h = entropy(samples.numpy(), axis=-1).mean(0)
    np.testing.assert_allclose(M.predictive_mutual_information(samples).numpy(), h - mean_h, rtol=1e-10, atol=1e-14)


def test_evaluate_and_errors(dtype):
    samples, y = _random_predictions(1, dtype=dtype)
    ood, _ = _random_predictions(2, n=30, dtype=dtype)
    out = M.evaluate(samples, y, ood * 0 + 0.25)  # uniform predictions on OOD: maximal entropy
    assert set(out) == {"accuracy", "nll", "brier", "ece", "entropy", "predictive_mutual_information", "aupr", "fpr95"}
    assert out["aupr"] == pytest.approx(1.0)
    assert M.accuracy(samples, y).dtype == dtype
    with pytest.raises(ValueError, match="labels"):
        M.nll(samples, y[:-1])
    with pytest.raises(ValueError, match="labels"):
        M.accuracy(samples, y + 10)
    with pytest.raises(ValueError, match=r"\(S, N, C\)"):
        M.predictive_mutual_information(samples[0])
    with pytest.raises(ValueError, match="tpr"):
        M.fpr_at_tpr(torch.zeros(3), torch.ones(3), 1.5)


def test_empty_predictions_and_live_tensors():
    import warnings

    with pytest.raises(ValueError, match="at least one input"):
        M.accuracy(torch.zeros(0, 3), torch.zeros(0, dtype=torch.long))
    p = torch.softmax(torch.randn(5, 3, generator=torch.Generator().manual_seed(0)), -1).requires_grad_()
    y = torch.tensor([0, 1, 2, 0, 1])
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no "converting a tensor with requires_grad" warning
        loss = M.nll(p, y)
    loss.backward()  # the NLL stays differentiable
    assert p.grad is not None and torch.isfinite(p.grad).all()
