"""Reproduction report: every target of SPEC section 7, the paper's number next to ours.

Runs our version of each small-scale result of the three papers the library builds on,
on scikit-learn's bundled data (synthetic data only where the paper's experiment is
itself synthetic: the Gaussian-mixture test and the tractable BNN), and prints one table
row per claim: the paper's number, ours (mean ± sd over seeds where there are seeds),
the setting, and a verdict computed from pre-declared criteria.

1. Gelberg et al. 2024: a Gaussian fitted by reverse KL to ``0.5 N(0, s^2) + 0.5 N(alpha, s^2)``
   sits between the modes until ``alpha ~ 5 s`` (threshold linear in ``s``).
2. Gelberg et al. 2024: the tractable BNN ``relu(w1 x) + relu(w2 x)`` on ``y = alpha |x|``
   (their protocol, and the overlapping-modes regime alpha = 0.01, noise 0.5).
3. Gelberg et al. 2024: one-hidden-layer classifiers (digits instead of MNIST), widths 5-30.
4. Rossi et al. 2023: loss barriers between VI runs, before and after alignment (digits).
5. Laurent et al. 2024: mass excess removed by min-mass; MMD after symmetry removal (digits).

The experiments themselves are the functions of ``symmetrized_vi.py``, ``loss_barriers.py``
and ``canonical_forms.py`` in this directory, imported rather than copied.

    python examples/reproduce.py --quick                                  # about 2-3 minutes on 2 cores
    python examples/reproduce.py --write-doc docs/reproduction.md         # full run, about 25 minutes
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import functools
import io
import logging
import math
import os
import platform
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import torch  # noqa: E402
from tqdm import tqdm  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
import canonical_forms as cf_ex  # noqa: E402
import loss_barriers as lb_ex  # noqa: E402
import resnet_barriers as rb_ex  # noqa: E402
import symmetrized_vi as svi_ex  # noqa: E402

import pyro_symmetry as ps  # noqa: E402

PAPER_MSE = svi_ex.PAPER_MSE  # alpha -> (mean-field, symmetrized), Gelberg et al. Tables 2-3
SIGMAS = (0.5, 1.0, 2.0)
STABILITY_CHECK = 8.0  # alpha / sigma at which the midpoint's curvature is checked


@dataclass
class Row:
    target: str
    paper: str
    ours: str
    setting: str
    verdict: str


@dataclass
class Settings:
    """Sizes of the quick and full runs (the only place they differ)."""

    relu_seeds: int = 10
    relu_long_steps: int = 1000  # 0: skip the converged variant of the paper protocol
    overlap_seeds: int = 5
    control_seeds: int = 5
    digits_widths: tuple[int, ...] = (5, 10, 20, 30)
    digits_seeds: int = 3
    digits_steps: int = 2000
    curve_points: int = 29
    barrier_argv: tuple[str, ...] = ()
    canonical_argv: tuple[str, ...] = ()
    resnet_argv: tuple[str, ...] = ()

    @classmethod
    def quick(cls) -> Settings:
        return cls(
            relu_long_steps=0,
            control_seeds=2,
            digits_widths=(5, 30),
            digits_seeds=2,
            digits_steps=300,
            curve_points=15,
            barrier_argv=("--quick",),
            canonical_argv=("--quick",),
            resnet_argv=("--quick",),
        )


# ----------------------------------------------------------------------------- small helpers
def mean_sd(values) -> tuple[float, float]:
    t = torch.as_tensor(values, dtype=torch.float64)
    return float(t.mean()), (float(t.std()) if t.numel() > 1 else 0.0)


def fmt(values, digits: int = 3, scale: float = 1.0) -> str:
    m, s = mean_sd(values)
    return f"{scale * m:.{digits}f} ± {scale * s:.{digits}f}"


def paired(a, b) -> tuple[float, float]:
    """Mean and standard error of ``a - b`` over paired seeds."""
    d = torch.as_tensor(a, dtype=torch.float64) - torch.as_tensor(b, dtype=torch.float64)
    se = float(d.std() / math.sqrt(d.numel())) if d.numel() > 1 else float("inf")
    return float(d.mean()), se


def significance(diff: float, se: float) -> str:
    """'higher' / 'lower' when ``|diff| > 2 se``, else 'tie'."""
    if diff > 2 * se:
        return "higher"
    if diff < -2 * se:
        return "lower"
    return "tie"


# ----------------------------------------------------------------------------- 1. mode seeking
def _mixture(alpha: float, sigma: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Quadrature grid and log-density of ``0.5 N(0, sigma^2) + 0.5 N(alpha, sigma^2)``."""
    x = torch.linspace(-25 * sigma, alpha + 25 * sigma, 20001, dtype=torch.float64)
    comp = torch.distributions.Normal(torch.tensor(0.0, dtype=torch.float64), sigma)
    return x, torch.logaddexp(comp.log_prob(x), comp.log_prob(x - alpha)) - math.log(2)


def mixture_fit(alpha: float, sigma: float) -> dict:
    """Best reverse-KL Gaussian (L-BFGS from three starts, ``symmetrized_vi._fit_from``).

    ``position`` is the distance of its mean to the nearest mode over ``alpha``
    (0.5: half-way between the modes, 0: on a mode).
    """
    x, log_p = _mixture(alpha, sigma)
    starts = (0.0, alpha / 2, alpha / 2 + 0.3 * sigma)
    fits = [svi_ex._fit_from(m0, alpha, False, x, log_p) for m0 in starts]
    # a start can run off to a huge scale whose mass mostly leaves the grid (a spurious KL near 0)
    dx = float(x[1] - x[0])
    inside = lambda f: float(torch.distributions.Normal(f[0], f[1]).log_prob(x).exp().sum()) * dx > 0.999  # noqa: E731
    m, s, kl = min(filter(inside, fits), key=lambda f: f[2])
    return dict(alpha=alpha, sigma=sigma, position=min(m, alpha - m) / alpha, scale=s / sigma, kl=kl)


def midpoint_curvature(alpha: float, sigma: float) -> float:
    """``d^2 KL / dm^2`` at the midpoint ``m = alpha / 2`` with the best scale there.

    The cross derivative in ``(m, log s)`` vanishes at the midpoint by symmetry, so the
    midpoint is a local minimum exactly when this is positive.
    """
    x, log_p = _mixture(alpha, sigma)
    log_s = torch.tensor(math.log(sigma), dtype=torch.float64, requires_grad=True)
    mid = torch.tensor(alpha / 2, dtype=torch.float64)
    opt = torch.optim.LBFGS([log_s], max_iter=100, line_search_fn="strong_wolfe")

    def closure() -> torch.Tensor:
        opt.zero_grad()
        loss = svi_ex._reverse_kl(mid, log_s, alpha, False, x, log_p)
        loss.backward()
        return loss

    opt.step(closure)
    m = mid.clone().requires_grad_(True)
    (g,) = torch.autograd.grad(svi_ex._reverse_kl(m, log_s.detach(), alpha, False, x, log_p), m, create_graph=True)
    (h,) = torch.autograd.grad(g, m)
    return float(h)


def _between(alpha: float, sigma: float) -> bool:
    return mixture_fit(alpha, sigma)["position"] >= 0.25


def _bisect(pred, lo: float, hi: float, tol: float) -> float:
    """Smallest ``a`` in ``[lo, hi]`` with ``pred(a)`` false (``pred(lo)`` true, ``pred(hi)`` false)."""
    if not pred(lo) or pred(hi):
        raise RuntimeError(f"bisection bracket [{lo}, {hi}] does not bracket the change")
    while hi - lo > tol:
        mid = 0.5 * (lo + hi)
        lo, hi = (mid, hi) if pred(mid) else (lo, mid)
    return 0.5 * (lo + hi)


def target_mode_seeking(cfg: Settings) -> dict:
    thresholds, stability, curves = {}, {}, {}
    ratios = torch.linspace(1.0, 8.0, cfg.curve_points).tolist()
    for sigma in SIGMAS:
        between = functools.partial(_between, sigma=sigma)
        thresholds[sigma] = _bisect(between, 3 * sigma, 9 * sigma, 1e-3 * sigma)
        # beyond the switch, is the half-way point still a local minimum (a first-order switch)?
        stability[sigma] = midpoint_curvature(STABILITY_CHECK * sigma, sigma)
        curves[sigma] = [mixture_fit(r * sigma, sigma) for r in ratios]
    rel = [thresholds[s] / s for s in SIGMAS]
    spread = max(rel) / min(rel) - 1
    ok = all(4.0 <= r <= 7.0 for r in rel) and spread < 0.02
    ours = ", ".join(f"{thresholds[s] / s:.3f} σ (σ = {s:g})" for s in SIGMAS)
    row = Row(
        "1. Gaussian-mixture test, reverse-KL Gaussian (Gelberg et al. 2024)",
        "between the modes until α ≈ 5; threshold ∝ component std σ",
        f"jumps onto a mode at α = {ours}; midpoint "
        f"{'still' if min(stability.values()) > 0 else 'no longer'} a local minimum at α = {STABILITY_CHECK:g} σ",
        "synthetic (as in the paper), 1-D reverse KL by quadrature (20001 points), L-BFGS from 3 starts, "
        "bisection to 0.001 σ; deterministic",
        "reproduced" if ok else f"differs, because the threshold is {min(rel):.2f}-{max(rel):.2f} σ",
    )
    return dict(rows=[row], thresholds=thresholds, stability=stability, curves=curves, ratios=ratios, ok=ok)


# ----------------------------------------------------------------------------- 2. tractable BNN
def mode_separation(alpha: float, obs_scale: float, seed: int, prior_scale: float = 1.0) -> float:
    """Distance between the modes ``(alpha, -alpha)`` and ``(-alpha, alpha)`` in posterior sds.

    Laplace approximation at a mode: the unit with ``w = alpha`` is active on the points
    with ``x > 0``, so its precision is ``sum_{x > 0} x^2 / obs_scale^2 + 1 / prior^2``
    (and likewise for ``x < 0``); the modes are ``2 sqrt(2) alpha`` apart.
    """
    x, _ = svi_ex.relu_data(alpha, 0.0, seed)
    prec = torch.stack([(x.clamp_min(0) ** 2).sum(), (x.clamp_max(0) ** 2).sum()]) / obs_scale**2 + prior_scale**-2
    return float(2 * math.sqrt(2) * alpha * prec.sqrt().mean())


def _toward_a_mode(w: torch.Tensor) -> bool:
    """Whether the posterior median ``(w1, w2)`` is nearer the modes' line than the diagonal.

    The modes ``(alpha, -alpha)`` and ``(-alpha, alpha)`` lie on the anti-diagonal
    ``w1 = -w2``; a guide between them stays near the swap-invariant diagonal ``w1 = w2``.
    """
    return bool((w[0] - w[1]).abs() > (w[0] + w[1]).abs())


def _relu_protocol(alpha: float, seeds: int, steps: int) -> dict:
    """Paper protocol: 100 noise-free points, batch 10, Adam 5e-3, 1 particle, K = 2 contrastive."""
    runs = {
        sym: [svi_ex.train_relu(alpha, 0.0, s, sym, steps, 5e-3, 10, 1, obs_scale=1.0) for s in range(seeds)]
        for sym in (False, True)
    }
    mse = {k: [r["mse"] for r in v] for k, v in runs.items()}
    elbo = {k: [r["elbo_sym"] for r in v] for k, v in runs.items()}
    return dict(
        mse=mse,
        elbo=elbo,
        on_mode={k: sum(_toward_a_mode(r["w"]) for r in v) for k, v in runs.items()},
        # how far apart the two guides' medians end from one seed, over the modes' distance 2 sqrt(2) alpha
        gap=mean_sd([float((a["w"] - b["w"]).norm()) for a, b in zip(runs[False], runs[True])])[0]
        / (2 * math.sqrt(2) * alpha),
        d_mse=paired(mse[True], mse[False]),
        d_elbo=paired(elbo[True], elbo[False]),
        separation=mean_sd([mode_separation(alpha, 1.0, s) for s in range(seeds)])[0],
    )


def _relu_regime(alpha: float, seeds: int) -> dict:
    """Noise 0.5, full batch, 400 steps of clipped Adam, 32 particles, exact symmetry term (|G| = 2)."""
    pairs = []
    for s in range(seeds):
        mf = svi_ex.train_relu(alpha, 0.5, s, False, 400, 0.05, 100, 32, lrd=0.993)
        sym = svi_ex.train_relu(alpha, 0.5, s, True, 400, 0.05, 100, 32, lrd=0.993, estimator="exact")
        pairs.append((mf, sym))
    gain = [sym["elbo_sym"] - mf["elbo_sym"] for mf, sym in pairs]
    off_diag = {k: [float((p[k]["w"][0] - p[k]["w"][1]).abs()) for p in pairs] for k in (0, 1)}
    return dict(
        gain=gain,
        d_gain=paired(gain, [0.0] * len(gain)),
        off_diag=off_diag,
        separation=mean_sd([mode_separation(alpha, 0.5, s) for s in range(seeds)])[0],
    )


def _relative(a: float, p: dict) -> tuple[float, float]:
    """Relative MSE change sym vs MF: ours and the paper's."""
    pm, psym = PAPER_MSE[a]
    return p["d_mse"][0] / mean_sd(p["mse"][False])[0], psym / pm - 1


def _relu_verdict(a: float, p: dict, seeds: int) -> str:
    mse_sig, elbo_sig = significance(*p["d_mse"]), significance(*p["d_elbo"])
    ours, paper = _relative(a, p)
    if mse_sig == "lower" and elbo_sig == "higher":
        if ours <= 0.5 * paper:
            return "reproduced"
        return f"differs, because the gain is much smaller: MSE {ours:+.0%} (paper {paper:+.0%}), same direction"
    what = {"tie": "no significant MSE difference", "higher": "symmetrized MSE higher"}.get(mse_sig, "")
    what = what or "MSE lower but ELBO not higher"
    return (
        f"differs, because {what}: modes {p['separation']:.1f} posterior sd apart, mean-field heads for "
        f"one mode in {p['on_mode'][False]}/{seeds} seeds"
    )


def target_tractable_bnn(cfg: Settings, progress: bool) -> dict:
    alphas = sorted(PAPER_MSE)
    proto, long = {}, {}
    for a in tqdm(alphas, desc="2. tractable BNN", disable=not progress, leave=False):
        proto[a] = _relu_protocol(a, cfg.relu_seeds, 100)
        if cfg.relu_long_steps:
            long[a] = _relu_protocol(a, cfg.relu_seeds, cfg.relu_long_steps)
    regime = {0.01: _relu_regime(0.01, cfg.overlap_seeds), 0.2: _relu_regime(0.2, cfg.control_seeds)}

    rows = []
    for a in alphas:
        p = proto[a]
        verdict = _relu_verdict(a, p, cfg.relu_seeds)
        pm, psym = PAPER_MSE[a]
        extra = ""
        if a in long:
            q = long[a]
            extra = f"; {cfg.relu_long_steps // 10} epochs: {fmt(q['mse'][False])} vs {fmt(q['mse'][True])}"
        rows.append(
            Row(
                f"2. tractable BNN, α = {a} (Gelberg et al. Tables 2-3)",
                f"test MSE {pm} (MF) vs {psym} (sym); symmetrized ELBO higher",
                f"MSE {fmt(p['mse'][False])} vs {fmt(p['mse'][True])}{extra}; "
                f"ELBO(q_sym) sym − MF {p['d_elbo'][0]:+.2f} ± {p['d_elbo'][1]:.2f} (se)",
                f"100 noise-free points, batch 10, Adam 5e-3, 10 epochs, {cfg.relu_seeds} seeds; "
                "N(0, 1) prior, Normal likelihood sd 1, 1 particle, Pyro init; K = 2 contrastive",
                verdict,
            )
        )
    r = regime[0.01]
    n_pos = sum(g > 0 for g in r["gain"])
    ok = significance(*r["d_gain"]) == "higher"
    rows.append(
        Row(
            "2b. tractable BNN, overlapping modes α = 0.01, noise 0.5 (our addition)",
            "mechanism only: mean-field sits between overlapping modes, q_sym fits them",
            f"ELBO(q_sym) sym − MF {fmt(r['gain'])} nats (> 0 in {n_pos}/{len(r['gain'])} seeds); "
            f"|w1 − w2| of the median MF {fmt(r['off_diag'][0])} vs sym {fmt(r['off_diag'][1])}; "
            f"control α = 0.2: {fmt(regime[0.2]['gain'])}",
            f"modes {r['separation']:.1f} posterior sd apart; full batch, 400 steps clipped Adam 0.05, "
            f"32 particles, exact symmetry term (2 elements), {cfg.overlap_seeds} seeds",
            "reproduced" if ok else "differs, because the ELBO gain is not significant over seeds",
        )
    )
    return dict(rows=rows, proto=proto, long=long, regime=regime, alphas=alphas)


# ----------------------------------------------------------------------------- 3. digits
def target_digits(cfg: Settings, progress: bool) -> dict:
    data = svi_ex.digits()
    jobs = [
        (w, s, m) for w in cfg.digits_widths for s in range(cfg.digits_seeds) for m in ("mean-field", "contrastive")
    ]
    runs: dict[tuple[int, str], list[dict]] = {}
    for w, s, m in tqdm(jobs, desc="3. digits", disable=not progress, leave=False):
        r = svi_ex.train_digits(w, m, cfg.digits_steps, s, data, False)
        runs.setdefault((w, m), []).append(r | {"I": r["mi"].value, "log_order": r["mi"].log_order})
    rows, per_width = [], {}
    for w in cfg.digits_widths:
        mf, sym = runs[(w, "mean-field")], runs[(w, "contrastive")]
        d_acc = paired([r["acc"] for r in sym], [r["acc"] for r in mf])
        d_elbo = paired([r["elbo_sym"] for r in sym], [r["elbo_sym"] for r in mf])
        i_frac = [r["I"] / r["log_order"] for r in mf]
        # same seed, same noise: (near-)identical runs mean the symmetry term's gradient (nearly) vanished
        elbo_gap = max(abs(a["elbo"] - b["elbo"]) for a, b in zip(mf, sym))
        same = elbo_gap < 0.5 and all(a["acc"] == b["acc"] for a, b in zip(mf, sym))
        per_width[w] = dict(mf=mf, sym=sym, d_acc=d_acc, d_elbo=d_elbo, i_frac=i_frac, same=same, gap=elbo_gap)
        sig = significance(*d_acc)
        verdict = {
            "higher": "reproduced",
            "tie": "differs, because no accuracy gain beyond seed noise (no worse either)",
            "lower": "differs, because symmetrized accuracy is lower",
        }[sig]
        if same:
            verdict = "differs, because the symmetrized guide trains as mean-field (same accuracy in every seed)"
        if sig != "higher" and min(i_frac) > 0.9:
            verdict += f"; MF units already distinct (I(g; w) ≥ {100 * min(i_frac):.1f} % of its maximum)"
        rows.append(
            Row(
                f"3. digits MLP, width {w} (Gelberg et al., MNIST there)",
                "symmetrized accuracy ≥ mean-field (gain grows with width)",
                f"acc MF {fmt([r['acc'] for r in mf])} vs sym {fmt([r['acc'] for r in sym])} "
                f"(Δ {d_acc[0]:+.3f} ± {d_acc[1]:.3f} se)",
                f"64-{w}-10 ReLU, N(0, 1) prior, {cfg.digits_steps} steps batch 256, 4 particles, K = 8, "
                f"{cfg.digits_seeds} seeds",
                verdict,
            )
        )
    all_runs = [r for v in runs.values() for r in v]
    min_gap = min(r["elbo_sym"] - r["elbo"] for r in all_runs)
    gain_vs_mf = [
        mean_sd([r["elbo_sym"] for r in per_width[w]["sym"]])[0] - mean_sd([r["elbo"] for r in per_width[w]["mf"]])[0]
        for w in cfg.digits_widths
    ]
    d_sym = [per_width[w]["d_elbo"][0] for w in cfg.digits_widths]
    rows.append(
        Row(
            "3. digits MLP, ELBO (Gelberg et al.)",
            "ELBO(q_sym) ≥ ELBO(q)",
            f"ELBO(q_sym) − ELBO(q) = I(g; w) ≥ {min_gap:.2f} nats in all {len(all_runs)} runs; "
            f"sym-trained ELBO(q_sym) − MF-trained ELBO(q): {', '.join(f'{g:+.0f}' for g in gain_vs_mf)}; "
            f"vs MF-trained ELBO(q_sym): {', '.join(f'{g:+.1f}' for g in d_sym)} (widths "
            f"{', '.join(map(str, cfg.digits_widths))})",
            "as above; I(g; w) exact (enumeration / permanent) to width 20, importance lower bound (K = 64) at 30",
            "reproduced" if min_gap >= 0 else "differs, because an estimated I(g; w) is negative",
        )
    )
    return dict(rows=rows, per_width=per_width, widths=cfg.digits_widths, gain_vs_mf=gain_vs_mf, d_sym=d_sym)


# ----------------------------------------------------------------------------- 4. loss barriers
def target_barriers(cfg: Settings, out: Path, progress: bool) -> dict:
    argv = [*cfg.barrier_argv, "--out", str(out / "loss_barriers"), "--seed", "0"]
    argv += [] if progress else ["--no-progress"]
    log = io.StringIO()
    with contextlib.redirect_stdout(log):
        res = lb_ex.main(argv)
    (out / "loss_barriers.log").write_text(log.getvalue())
    rows_ = res["rows"]
    nll_b, nll_a = [r["test NLL before"] for r in rows_], [r["test NLL after"] for r in rows_]
    err_b, err_a = [r["test error before"] for r in rows_], [r["test error after"] for r in rows_]
    ends = [v for r in rows_ for v in r["test NLL endpoints"]]
    n_runs = len({i for r in rows_ for i in r["pair"]})
    ok = mean_sd(nll_a)[0] < 0.1 * mean_sd(nll_b)[0] and mean_sd(err_a)[0] < 0.01
    w2 = [r["W2^2 after"] / r["W2^2 before"] for r in rows_]
    steps = 600 if "--quick" in cfg.barrier_argv else 3000  # loss_barriers.py's own settings
    row = Row(
        "4. loss barriers between VI runs (Rossi et al. 2023)",
        "large before alignment, nearly zero after (MLPs)",
        f"test-NLL barrier {fmt(nll_b)} → {fmt(nll_a)}; error barrier {fmt(err_b, 1, 100)} → {fmt(err_a, 1, 100)} "
        f"points (endpoint NLL {mean_sd(ends)[0]:.3f})",
        f"digits, 64-128-10 ReLU, N(0, 1) prior, AutoNormal, {steps} steps, {n_runs} seeds "
        f"({len(rows_)} pairs), W2 geodesic, Wasserstein alignment",
        "reproduced" if ok else "differs, because the barrier after alignment is not near zero",
    )
    return dict(
        rows=[row],
        nll=(nll_b, nll_a),
        err=(err_b, err_a),
        ends=ends,
        w2=w2,
        ok=ok,
        figure=out / "loss_barriers/barriers.png",
    )


# ----------------------------------------------------------------------------- 6. ResNet barriers
def target_resnet(cfg: Settings, out: Path, progress: bool) -> dict:
    """Rossi et al.'s ResNet-20 claim at digits scale: ``resnet_barriers.py`` (a Bayesian ResNet whose
    spec comes from ``PermutationSpec.from_module``), mean-field VI runs, barriers before and after."""
    argv = [*cfg.resnet_argv, "--out", str(out / "resnet_barriers"), "--seed", "0"]
    argv += [] if progress else ["--no-progress"]
    log = io.StringIO()
    with contextlib.redirect_stdout(log):
        res = rb_ex.main(argv)
    (out / "resnet_barriers.log").write_text(log.getvalue())
    rows_ = res["rows"]
    nll_b, nll_a = [r["test NLL before"] for r in rows_], [r["test NLL after"] for r in rows_]
    err_b, err_a = [r["test error before"] for r in rows_], [r["test error after"] for r in rows_]
    n_runs = len({i for r in rows_ for i in r["pair"]})
    ok = mean_sd(nll_a)[0] < 0.5 * mean_sd(nll_b)[0]
    steps = 40 if "--quick" in cfg.resnet_argv else 1500  # resnet_barriers.py's own settings
    row = Row(
        "6. loss barriers between VI runs of a ResNet (Rossi et al. 2023, ResNet-20 on CIFAR-10 there)",
        "large before alignment, much smaller after (ResNet-20)",
        f"test-NLL barrier {fmt(nll_b)} → {fmt(nll_a)}; error barrier {fmt(err_b, 1, 100)} → {fmt(err_a, 1, 100)} "
        "points",
        f"digits, Bayesian ResNet-8 (BatchNorm with batch statistics, 16-32-64 channels), N(0, 1) prior, "
        f"AutoNormal, {steps} steps, {n_runs} seeds ({len(rows_)} pairs), W2 geodesic, Wasserstein alignment "
        "with the spec from `from_module`",
        "reproduced" if ok else "differs, because alignment does not halve the NLL barrier",
    )
    return dict(rows=[row], nll=(nll_b, nll_a), err=(err_b, err_a), ok=ok, figure=out / "resnet_barriers/barriers.png")


# ----------------------------------------------------------------------------- 5. canonical forms
def target_canonical(cfg: Settings, out: Path, progress: bool) -> dict:
    argv = [*cfg.canonical_argv, "--out", str(out / "canonical_forms"), "--seed", "0"]
    argv += [] if progress else ["--no-progress"]
    log = io.StringIO()
    with contextlib.redirect_stdout(log):
        res = cf_ex.main(argv)
    (out / "canonical_forms.log").write_text(log.getvalue())
    excess = res["excess"]  # (R, S) percent; the mass of the weights only (Laurent et al.'s, ps.min_mass's default)
    medians = excess.median(1).values.tolist()
    R, S = excess.shape
    spec = ps.models.BayesianMLP(64, [32, 32], 10, activation="relu").spec
    # the same draws with the hidden biases counted in the mass too (include_biases=True)
    with_biases = ps.min_mass(res["variants"]["raw"], spec, include_biases=True)
    medians_b = (100 * (with_biases.mass_before / with_biases.mass_after - 1)).median(1).values.tolist()
    again = ps.min_mass(res["variants"]["min-mass only"], spec)
    residual_excess = float((again.mass_before / again.mass_after - 1).abs().max())
    mass_ok = all(10.0 <= m <= 60.0 for m in medians) and residual_excess < 1e-6
    mmd = {k: v[0] for k, v in res["mmd"].items()}
    null = max(abs(v[2]) for v in res["mmd"].values())
    aligned = "min-mass + align (to the first draw)"
    mmd_ok = mmd[aligned] < 0.5 * mmd["raw"]
    steps = 300 if "--quick" in cfg.canonical_argv else 3000  # canonical_forms.py's own settings
    setting = f"digits, 64-32-32-10 ReLU, N(0, 1) prior, AutoNormal, {R} seeds, {S} draws each, {steps} steps"
    rows = [
        Row(
            "5. min-mass removes the scaling redundancy (Laurent et al. 2024)",
            "mass excess 10-60 % before; none left after",
            f"excess per run (median of draws), mass of the weights (the paper's) {fmt(medians, 1)} % (range "
            f"{min(medians):.1f}-{max(medians):.1f}); with the hidden biases counted too {fmt(medians_b, 1)} % "
            f"(range {min(medians_b):.1f}-{max(medians_b):.1f}); re-applying min-mass removes ≤ {residual_excess:.0e}",
            setting,
            "reproduced" if mass_ok else "differs, because the excess is outside 10-60 %",
        ),
        Row(
            "5. MMD between posteriors after symmetry removal (Laurent et al.)",
            "MMD shrinks once symmetries are removed",
            f"MMD² raw {mmd['raw']:.4f}; min-mass only {mmd['min-mass only']:.4f}; "
            f"+ align {mmd[aligned]:.4f}; + sort {mmd['min-mass + sort']:.4f} (same-run null ≤ {null:.4f})",
            setting + f"; runs 0-{R // 2 - 1} vs {R // 2}-{R - 1}, Gaussian kernel, 200 permutations",
            "reproduced" if mmd_ok else "differs, because removing the symmetries does not halve the MMD",
        ),
    ]
    removed = [v[1] for k, v in res["mmd"].items() if k.startswith("min-mass +")]  # after both symmetries
    p_min, p_max = min(removed), max(removed)
    return dict(
        rows=rows, medians=medians, medians_biases=medians_b, mmd=mmd, null=null, residual=residual_excess,
        p=(p_min, p_max), steps=steps,
    )  # fmt: skip


# ----------------------------------------------------------------------------- figure
def make_figure(results: dict, path: Path) -> None:
    fig, ax = plt.subplots(2, 2, figsize=(11, 7.5))
    if "1" in results:
        r = results["1"]
        for sigma, mk in zip(SIGMAS, "os^"):
            ax[0, 0].plot(
                r["ratios"], [f["position"] for f in r["curves"][sigma]], mk + "-", ms=4, label=f"σ = {sigma}"
            )
        ax[0, 0].axvline(5.0, color="k", ls=":", lw=0.8, label="paper: α ≈ 5 σ")
        ax[0, 0].set(xlabel="α / σ", ylabel="distance to nearest mode / α", title="1. reverse-KL Gaussian fit")
        ax[0, 0].legend(fontsize=8)
    if "2" in results:
        r = results["2"]
        alphas = r["alphas"]
        for k, (sym, name) in enumerate(((False, "mean-field"), (True, "symmetrized"))):
            ms = [mean_sd(r["proto"][a]["mse"][sym]) for a in alphas]
            x = [a + (k - 0.5) * 0.006 for a in alphas]
            ax[0, 1].errorbar(
                x, [m for m, _ in ms], [s for _, s in ms], fmt="os"[k], color=f"C{k}", capsize=3, label=f"ours, {name}"
            )
            ax[0, 1].plot(alphas, [PAPER_MSE[a][k] for a in alphas], "os"[k], mfc="none", color=f"C{k}", ms=9,
                          label=f"paper, {name}")  # fmt: skip
        ax[0, 1].set(xlabel="α", ylabel="test MSE (mean ± sd over seeds)", title="2. tractable BNN, paper protocol")
        ax[0, 1].legend(fontsize=8)
        for k, a in enumerate((0.01, 0.2)):
            g = r["regime"][a]["gain"]
            ax[1, 0].plot([k + 0.05 * (i - len(g) / 2) for i in range(len(g))], g, "o", color=f"C{k + 2}")
        ax[1, 0].axhline(0.0, color="k", lw=0.6)
        ax[1, 0].set_xticks([0, 1], ["α = 0.01 (overlapping)", "α = 0.2 (separated)"])
        ax[1, 0].set(ylabel="ELBO(q_sym): symmetrized − mean-field (nats)", title="2b. one point per seed, noise 0.5")
    if "3" in results:
        r = results["3"]
        for k, key in enumerate(("mf", "sym")):
            ms = [mean_sd([x["acc"] for x in r["per_width"][w][key]]) for w in r["widths"]]
            ax[1, 1].errorbar([w + (k - 0.5) * 0.6 for w in r["widths"]], [m for m, _ in ms], [s for _, s in ms],
                              fmt="os"[k] + "-", capsize=3, label=["mean-field", "symmetrized (K = 8)"][k])  # fmt: skip
        ax[1, 1].set(xlabel="hidden width", ylabel="test accuracy (mean ± sd)", title="3. digits classifier")
        ax[1, 1].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=80)
    plt.close(fig)


# ----------------------------------------------------------------------------- discussion
def discuss(results: dict, cfg: Settings) -> dict[str, str]:
    text = {}
    if "1" in results:
        r = results["1"]
        rel = [r["thresholds"][s] / s for s in SIGMAS]
        text["1"] = (
            f"The best single Gaussian sits exactly half-way between the two modes, with an inflated standard "
            f"deviation, and jumps onto one mode at α = {' / '.join(f'{x:.3f}' for x in rel)} σ for σ = "
            f"{' / '.join(f'{s:g}' for s in SIGMAS)}: the threshold is linear in the component std "
            f"(the values of α/σ differ by {100 * (max(rel) / min(rel) - 1):.3f} %), as it must be, since the "
            f"reverse KL is invariant under rescaling both distributions. "
            + (
                f"The jump is a switch of the global minimum between two local minima: at α = {STABILITY_CHECK:g} σ "
                f"the midpoint is still a local minimum (positive curvature in the mean), so a fit started between "
                f"the modes stays there well beyond the threshold. "
                if min(r["stability"].values()) > 0
                else ""
            )
            + f'The paper states the threshold only as "α ≈ 5"; our {mean_sd(rel)[0]:.2f} σ agrees with that. '
            "The mixture lies along one "
            "direction and "
            "the other dimensions of N(·, I) are matched exactly by a full-covariance (or axis-aligned) Gaussian, "
            "so the test reduces to one dimension, which we integrate by quadrature instead of sampling."
        )
    if "2" in results:
        r = results["2"]
        proto, alphas = r["proto"], r["alphas"]
        seps = [proto[a]["separation"] for a in alphas]
        on_mode = sum(proto[a]["on_mode"][False] for a in alphas)
        n = cfg.relu_seeds * len(alphas)
        diffs = ", ".join("{:+.3f} ± {:.3f}".format(*proto[a]["d_mse"]) for a in alphas)
        ediffs = ", ".join("{:+.2f} ± {:.2f}".format(*proto[a]["d_elbo"]) for a in alphas)
        long_txt = ""
        if r["long"]:
            lm = [mean_sd(r["long"][a]["mse"][k])[0] for a in alphas for k in (False, True)]
            lsig = {significance(*r["long"][a]["d_mse"]) for a in alphas}
            a_max = alphas[-1]
            short_mf, long_mf = mean_sd(proto[a_max]["mse"][False])[0], mean_sd(r["long"][a_max]["mse"][False])[0]
            long_txt = (
                f" Trained for {cfg.relu_long_steps // 10} epochs instead of 10, both guides reach test MSEs of "
                f"{min(lm):.3f}-{max(lm):.3f}: the problem is easy once trained"
                + (", and the two methods still agree" if lsig == {"tie"} else "")
                + (
                    f"; after 10 epochs the guides are still under-trained at α = {a_max} (mean-field MSE "
                    f"{short_mf:.3f} against {long_mf:.3f}), which is why our value there comes close to the "
                    f"paper's."
                    if long_mf < 0.5 * short_mf
                    else "."
                )
            )
        rr = r["regime"][0.01]
        sig = {a: (significance(*proto[a]["d_mse"]), significance(*proto[a]["d_elbo"])) for a in alphas}
        better = [a for a in alphas if sig[a] == ("lower", "higher")]
        rel = ", ".join("{:+.0%} (paper {:+.0%})".format(*_relative(a, proto[a])) for a in alphas)
        text["2"] = (
            f"Under the paper's protocol the paired differences symmetrized − mean-field over {cfg.relu_seeds} "
            f"seeds (± standard error) are, for α = {', '.join(map(str, alphas))}: test MSE {diffs}; exact "
            f"ELBO(q_sym) {ediffs} nats. "
            + (
                f"The symmetrized guide is better on both counts at α = {', '.join(map(str, better))}, "
                if better
                else "Neither difference is significant at any α, "
            )
            + f"and the relative MSE changes are {rel}"
            + (
                ", far smaller than the paper's. "
                if all(abs(x) < 0.5 * abs(y) or x > 0 for x, y in (_relative(a, proto[a]) for a in alphas))
                else ". "
            )
            + f"Our choices for what the paper leaves open (a N(0, 1) prior, a Normal likelihood with sd 1 on "
            f"noise-free targets, Pyro's initialization, one particle) put the two modes (α, −α) and (−α, α) "
            f"{min(seps):.1f}-{max(seps):.0f} posterior standard deviations apart (Laplace approximation). From "
            f"about 5.6 sd on (target 1) a reverse-KL Gaussian picks one mode, "
            + ("and so it does here" if on_mode >= 0.8 * n else "but here only partly")
            + f": the mean-field posterior median heads for one mode (it is nearer the modes' line w1 = −w2 than "
            f"the swap-invariant diagonal w1 = w2) in {on_mode} of {n} runs. A guide on one mode predicts as well as "
            f"the symmetrized one, and symmetrization then adds only log 2 to the ELBO; from the same seed the two "
            f"guides end with posterior medians at most {max(proto[a]['gap'] for a in alphas):.0%} of the modes' "
            f"distance apart. "
            + (
                "The small gains at the larger α most likely come from the start of training: both guides start "
                "at the swap-invariant point (all means 0), where the symmetry term rewards leaving the diagonal, "
                "so the symmetrized guide reaches its mode a little sooner within the 100 steps. "
                if better
                else ""
            )
            + "The paper's larger gap most likely needs posteriors wide enough for the modes to overlap, i.e. a "
            f"noisier likelihood or fewer effective data than ours. Its MSE scale also differs: its mean-field 0.11 at "
            f"α = 0.05 exceeds the {alphas[0] ** 2 * 100 / 3:.3f} of predicting 0 everywhere, so its MSE must "
            f"include observation noise or the posterior spread, a definition we could not pin down; ours is "
            f"the squared error of the predictive mean against α|x|.{long_txt} In the overlapping-modes "
            f"regime (α = 0.01, noise 0.5, modes {rr['separation']:.1f} sd apart) the effect the paper describes "
            f"is clear: the symmetrized guide gains {mean_sd(rr['gain'])[0]:+.2f} ± {rr['d_gain'][1]:.2f} nats of "
            f"ELBO(q_sym) (positive in {sum(g > 0 for g in rr['gain'])} of {len(rr['gain'])} seeds) and leaves "
            f"the swap-invariant diagonal where mean-field sits (median |w1 − w2| "
            f"{mean_sd(rr['off_diag'][1])[0]:.3f} against {mean_sd(rr['off_diag'][0])[0]:.3f}), while at α = 0.2 "
            f"the two agree ({fmt(r['regime'][0.2]['gain'])} nats)."
        )
    if "3" in results:
        r = results["3"]
        fr = [f for w in r["widths"] for f in r["per_width"][w]["i_frac"]]
        sigs = {w: significance(*r["per_width"][w]["d_acc"]) for w in r["widths"]}
        summary = ", ".join(
            f"{r['per_width'][w]['d_acc'][0]:+.3f} ± {r['per_width'][w]['d_acc'][1]:.3f} (width {w})"
            for w in r["widths"]
        )
        same = all(r["per_width"][w]["same"] for w in r["widths"])
        frac = f"{100 * min(fr):.1f} %" + ("" if max(fr) - min(fr) < 5e-4 else f"-{100 * max(fr):.1f} %")
        if same:
            gap = max(r["per_width"][w]["gap"] for w in r["widths"])
            verdict_txt = (
                "zero at every width: from the same seed the two guides take practically identical steps (the same "
                f"test accuracy in every seed, ELBO(q) within {gap:.2f} nats; the symmetry term draws its "
                "permutations from its own generator, so both see the same weight noise), i.e. the symmetry term's "
                "gradient all but vanishes. "
            )
        elif set(sigs.values()) == {"higher"}:
            verdict_txt = "a gain at every width, as in the paper. "
        else:
            verdict_txt = (
                "within seed noise" + (", or lower" if "lower" in sigs.values() else "") + ", not the paper's gain "
                "growing with width. "
            )
        text["3"] = (
            f"On digits the symmetrized guide's test accuracy minus mean-field's is {summary} "
            f"({cfg.digits_seeds} seeds, paired by seed, ± standard error): "
            + verdict_txt
            + f"The reason is visible in I(g; w): for the mean-field posteriors it is {frac} of its maximum, the "
            f"log of the group order. The hidden units of a trained mean-field posterior are already distinct, "
            f"its permuted copies do not overlap, and the symmetrized family has nothing to add: the contrastive "
            f"bound I_K sits at log K with a vanishing gradient. The paper's MNIST setting (its own prior, "
            f"initialization and training length) presumably leaves units overlapping (e.g. pruned to the prior), "
            f"where symmetrization helps; we did not find such a regime on digits with our settings. "
            f'"ELBO(q_sym) ≥ ELBO(q)" holds in every run, as it must: the gap is I(g; w) ≥ 0 by the identity of '
            f"SPEC section 2. The symmetrized guide's ELBO(q_sym) exceeds the mean-field guide's plain ELBO(q) by "
            f"about the log of the group order (the comparison the paper plots), but compared like for like, "
            f"ELBO(q_sym) against the mean-field guide's ELBO(q_sym), the difference is "
            f"{', '.join(f'{d:+.1f}' for d in r['d_sym'])} nats at widths {', '.join(map(str, r['widths']))}."
        )
    if "4" in results:
        r = results["4"]
        nb, na = mean_sd(r["nll"][0])[0], mean_sd(r["nll"][1])[0]
        text["4"] = (
            f"{'Reproduced' if r['ok'] else 'Not reproduced'}. Walking the 2-Wasserstein geodesic between two "
            f"independent mean-field VI posteriors "
            f"raises the test NLL by {nb:.3f} on average above the straight line between the endpoints "
            f"(whose own NLL is {mean_sd(r['ends'])[0]:.3f}) and the error by "
            f"{100 * mean_sd(r['err'][0])[0]:.1f} points; after `ps.align` (Wasserstein matching of the hidden "
            f"units) the barrier falls {nb / na:.0f}-fold to {na:.3f} NLL and "
            f"{100 * mean_sd(r['err'][1])[0]:.1f} error points. Rossi et al. report nearly zero barriers after "
            f"alignment; here a small residual barrier of {na:.3f} nats ({100 * na / mean_sd(r['ends'])[0]:.0f} % "
            f"of the endpoints' NLL) remains: the aligned posteriors agree up to permutation only approximately "
            f"(alignment reduces the squared W2 distance between runs only to {100 * min(r['w2']):.0f}-"
            f"{100 * max(r['w2']):.0f} % of the unaligned one)."
        )
    if "5" in results:
        r = results["5"]
        mmd, aligned = r["mmd"], "min-mass + align (to the first draw)"
        in_range = all(10 <= m <= 60 for m in r["medians"])
        text["5"] = (
            f"After {r['steps']} training steps every posterior draw carries {min(r['medians']):.0f}-"
            f"{max(r['medians']):.0f} % (per-run medians) more squared weight than the least-mass network computing "
            f"the same function, {'inside' if in_range else 'outside'} the 10-60 % Laurent et al. report. The mass "
            f"here is theirs, the sum of the squared weights (the biases follow their neuron but are not counted); "
            f"counting the hidden biases too (`include_biases=True`) gives {min(r['medians_biases']):.0f}-"
            f"{max(r['medians_biases']):.0f} %. "
            + (
                "Short training leaves more excess than the 3000-step runs of the full report: the initialization "
                "and the mean-field noise unbalance each neuron's incoming and outgoing weights, and training "
                "removes only part of that. "
                if r["steps"] < 3000
                else "The excess comes from the means and from the mean-field noise, which unbalances each neuron's "
                "incoming and outgoing weights independently. "
            )
            + f"`ps.min_mass` removes it: applied a second time it finds at most {r['residual']:.0e} relative mass "
            f"to remove. The MMD² between two groups of runs {'falls' if mmd[aligned] < mmd['raw'] else 'goes'} "
            f"from {mmd['raw']:.4f} to {mmd[aligned]:.4f} (min-mass, then alignment to one draw) and "
            f"{mmd['min-mass + sort']:.4f} (min-mass, then sorting by norm), against {r['null']:.4f} between two "
            f"halves of the same runs. Min-mass alone "
            + (
                f"does not shrink it ({mmd['min-mass only']:.4f}): the units are still permuted differently in "
                f"every run; the permutation is the larger part of the symmetry. "
                if mmd["min-mass only"] >= 0.9 * mmd["raw"]
                else f"already shrinks it to {mmd['min-mass only']:.4f}. "
            )
            + (
                f"The permutation test still rejects equality after symmetry removal (p ≤ {r['p'][1]:.3f}; 0.005 "
                f"is the smallest possible with 200 permutations): independent VI runs of a two-hidden-layer "
                f"network are different posteriors even modulo symmetry, but most of their raw difference was "
                f"symmetry."
                if r["p"][1] <= 0.05
                else f"After symmetry removal the permutation test no longer rejects equality (p up to "
                f"{r['p'][1]:.3f})."
            )
        )
    if "6" in results:
        r = results["6"]
        nb, na = mean_sd(r["nll"][0])[0], mean_sd(r["nll"][1])[0]
        text["6"] = (
            f"{'Reproduced' if r['ok'] else 'Not reproduced'}. The spec of the residual network (one tied group "
            f"per residual stream, one group per block's inner channels) comes from `PermutationSpec.from_module`, "
            f"with no hand work. Between independent mean-field VI runs the test-NLL barrier is {nb:.3f} "
            f"before alignment and {na:.3f} after ({100 * mean_sd(r['err'][0])[0]:.1f} → "
            f"{100 * mean_sd(r['err'][1])[0]:.1f} error points). Rossi et al. see the same direction on ResNet-20: "
            f"alignment removes most, not all, of the barrier of a residual network."
        )
    return text


# ----------------------------------------------------------------------------- output
def _cell(s: str) -> str:
    return s.replace("|", "\\|")


def table(rows: list[Row]) -> str:
    lines = ["| target | paper | ours | setting | verdict |", "|---|---|---|---|---|"]
    lines += [f"| {_cell(r.target)} | {_cell(r.paper)} | {_cell(r.ours)} | {_cell(r.setting)} | {_cell(r.verdict)} |"
              for r in rows]  # fmt: skip
    return "\n".join(lines)


TITLES = {
    "1": "1. Gaussian-mixture test (Gelberg et al. 2024)",
    "2": "2. Tractable BNN (Gelberg et al. 2024)",
    "3": "3. One-hidden-layer classifier on digits (Gelberg et al. 2024)",
    "4": "4. Loss barriers before and after alignment (Rossi et al. 2023)",
    "5": "5. Minimum mass and MMD after symmetry removal (Laurent et al. 2024)",
    "6": "6. Loss barriers between Bayesian ResNets (Rossi et al. 2023)",
}


CRITERIA = " ".join(
    [
        "Verdict criteria: (1) α/σ at the switch within 4-7 for every σ and equal across σ to 2 %;",
        "(2) symmetrized MSE lower and ELBO(q_sym) higher, each by more than 2 standard errors of the paired",
        "difference over seeds, and the relative MSE reduction at least half the paper's;",
        "(2b) ELBO gain more than 2 standard errors above 0;",
        "(3) accuracy difference more than 2 standard errors above 0, and I(g; w) ≥ 0 in every run;",
        "(4) NLL barrier after alignment below a tenth of the barrier before, error barrier after below 1 point;",
        "(5) every run's median mass excess (mass of the weights, the paper's definition) in 10-60 % and nothing",
        "left after min-mass;",
        "MMD² after min-mass + alignment below half the raw one;",
        "(6) NLL barrier after alignment below half the barrier before.",
        "MF: mean-field (`AutoNormal`); sym: `ps.AutoSymmetrizedNormal` (contrastive bound, Gelberg et al.'s",
        "estimator).",
    ]
)


def _revision() -> str:
    """``git describe --always --dirty`` of the checkout, or ``unknown``."""
    try:
        out = subprocess.run(
            ["git", "describe", "--always", "--dirty"],
            cwd=Path(__file__).resolve().parent,
            capture_output=True,
            text=True,
            timeout=10,
        )
    except OSError:
        return "unknown"
    return out.stdout.strip() or "unknown"


def write_doc(path: Path, rows, text, timings, figures, args, total: float) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    static = path.parent / "_static" / "reproduction"
    static.mkdir(parents=True, exist_ok=True)
    embedded, used = [], set()
    for fig, alt, caption in figures:
        if fig.exists():
            # two examples both write barriers.png: the second gets its folder's name as a prefix
            name = fig.name if fig.name not in used else f"{fig.parent.name}_{fig.name}"
            used.add(name)
            dest = static / name
            shutil.copyfile(fig, dest)
            embedded.append((os.path.relpath(dest, path.parent), alt, caption))
    mode = "quick" if args.quick else "full"
    threads = torch.get_num_threads()
    cmd = "python examples/reproduce.py" + (" --quick" if args.quick else "") + f" --write-doc {args.write_doc}"
    per = ", ".join(f"target {k}: {v:.0f} s" for k, v in timings.items())
    lines = [
        "# Reproduction report",
        "",
        "The small-scale results of the three papers pyro_symmetry builds on, rerun with the library on "
        "scikit-learn's bundled data (synthetic data only where the paper's experiment is itself synthetic). "
        "Each row gives the paper's number, ours (mean ± sd over seeds where there are seeds), the setting "
        "(with our choices where the paper leaves them open) and a verdict from criteria fixed before the runs "
        "(listed below the table). The experiments are the functions of `examples/symmetrized_vi.py`, "
        "`examples/loss_barriers.py`, `examples/canonical_forms.py` and `examples/resnet_barriers.py`, "
        "driven by `examples/reproduce.py`.",
        "",
        f"This page was generated by the **{mode}** run on {datetime.date.today().isoformat()}:",
        "",
        "```bash",
        cmd,
        "```",
        "",
        f"on a machine with {os.cpu_count()} CPU cores (shared with other jobs), {threads} torch "
        f"thread{'s' if threads > 1 else ''}, Python {platform.python_version()}, torch {torch.__version__}, "
        f"pyro_symmetry at `{_revision()}`; it took {total / 60:.1f} minutes ({per}). `--quick` reruns "
        "everything with fewer seeds, steps and widths.",
        "",
        table(rows),
        "",
        CRITERIA,
        "",
    ]
    for key, title in TITLES.items():
        if key in text:
            lines += [f"## {title}", "", text[key], ""]
    if embedded:
        lines += ["## Figures", ""]
        for rel, alt, caption in embedded:
            lines += [f"![{alt}]({rel})", "", caption + ".", ""]
    path.write_text("\n".join(lines))


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="fewer seeds, steps and widths (2-3 minutes)")
    parser.add_argument("--out", type=Path, default=Path("out/reproduce"), help="directory for figures and logs")
    parser.add_argument("--write-doc", type=Path, default=None, help="write the markdown report to this path")
    parser.add_argument("--targets", default="123456", help="which targets to run, e.g. 14")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (1 is fastest for these small nets)")
    parser.add_argument("--no-progress", action="store_true")
    args = parser.parse_args(argv)
    if not args.targets or set(args.targets) - set("123456"):
        parser.error(f"--targets must be digits from 123456, got {args.targets!r}")
    cfg = Settings.quick() if args.quick else Settings()
    progress = not args.no_progress
    args.out.mkdir(parents=True, exist_ok=True)
    torch.set_num_threads(args.threads)
    logging.getLogger("pyro").setLevel(logging.WARNING)  # "Guessed max_plate_nesting" on every guide

    runners = {
        "1": lambda: target_mode_seeking(cfg),
        "2": lambda: target_tractable_bnn(cfg, progress),
        "3": lambda: target_digits(cfg, progress),
        "4": lambda: target_barriers(cfg, args.out, progress),
        "5": lambda: target_canonical(cfg, args.out, progress),
        "6": lambda: target_resnet(cfg, args.out, progress),
    }
    results, timings = {}, {}
    t_start = time.perf_counter()
    for key in args.targets:
        t0 = time.perf_counter()
        results[key] = runners[key]()
        # the examples set their own thread count; restore ours
        torch.set_num_threads(args.threads)
        timings[key] = time.perf_counter() - t0
        print(f"[target {key}: {timings[key]:.0f} s]", flush=True)
    total = time.perf_counter() - t_start

    rows = [row for key in args.targets for row in results[key]["rows"]]
    text = discuss(results, cfg)
    fig_path = args.out / "reproduction.png"
    make_figure(results, fig_path)
    print("\n" + table(rows) + "\n")
    for key in args.targets:
        print(f"## {TITLES[key]}\n\n{text[key]}\n")
    print(f"figures in {args.out}/; total {total:.0f} s ({total / 60:.1f} min)")
    if args.write_doc:
        figures = [
            (
                fig_path,
                "summary figure of targets 1-3",
                "Top left: where the best reverse-KL Gaussian sits against α/σ for three component stds "
                "(0.5 = between the modes); the curves coincide, so the threshold is linear in σ. Top right: "
                "test MSE of the tractable BNN under the paper's protocol, ours (filled, mean ± sd over seeds) "
                "and the paper's (hollow). Bottom left: the symmetrized guide's ELBO(q_sym) gain over mean-field, "
                "one point per seed, for overlapping (α = 0.01) and separated (α = 0.2) modes. Bottom right: test "
                "accuracy on digits against hidden width",
            ),
        ]
        if "4" in results:
            figures.append(
                (
                    results["4"]["figure"],
                    "loss along the path between VI runs, before and after alignment",
                    "Test NLL (left) and error (right) along the W2 geodesic between pairs of independent VI runs "
                    "on digits, before (red) and after (blue) alignment",
                )
            )
        if "6" in results:
            figures.append(
                (
                    results["6"]["figure"],
                    "loss along the path between Bayesian ResNet runs, before and after alignment",
                    "Test NLL and error along the W2 geodesic between independent VI runs of a Bayesian ResNet on "
                    "digits, before and after alignment with the spec from `from_module`",
                )
            )
        write_doc(args.write_doc, rows, text, timings, figures, args, total)
        print(f"wrote {args.write_doc}")
    return dict(results=results, rows=rows, timings=timings, total=total)


if __name__ == "__main__":
    main()
