"""Interpolation between posteriors and loss barriers along the path.

The 2-Wasserstein geodesic between diagonal Gaussians ``N(mu0, s0^2)`` and
``N(mu1, s1^2)`` is ``N((1 - t) mu0 + t mu1, ((1 - t) s0 + t s1)^2)``, coordinate by
coordinate; for points it is the straight line. The loss barrier (Frankle et al.
2020; Entezari et al., ICLR 2022; Rossi, Singh, Hannagan, NeurIPS 2023) is

.. math::

    B = \\max_t \\; L(q_t) - \\big((1 - t) L(q_0) + t L(q_1)\\big)

over an evenly spaced grid of ``t``. Independent solutions typically have a large
barrier; after alignment (:func:`~pyro_symmetry.alignment.align`) a small one.

The loss helpers evaluate a model's ``functional(params, x)`` (``BayesianMLP``,
``BayesianCNN``): under a Gaussian posterior by Monte Carlo with fixed noise (the
same draws for every ``q_t``, so the curve is smooth), or at a point.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

from .._validation import check_callable, check_finite, check_int, check_real, check_tensor
from .bnreset import has_running_stats, reset_batchnorm
from .inputs import Marginals, check_dtypes, check_sites, merge_transforms, read_posterior

__all__ = [
    "BarrierResult",
    "PredictiveLoss",
    "gaussian_error_loss",
    "gaussian_nll_loss",
    "interpolate",
    "loss_barrier",
    "point_error_loss",
    "point_nll_loss",
]


def _lerp(a: torch.Tensor, b: torch.Tensor, t: float) -> torch.Tensor:
    # torch.lerp returns the endpoints exactly at t = 0 and t = 1, and a when a == b.
    if not a.is_floating_point():
        return a if t < 0.5 else b
    return torch.lerp(a, b.to(a.dtype), t)


def interpolate(q0: Any, q1: Any, t: float, *, data: Any = None, reset_bn: bool | None = None) -> dict[str, Any]:
    """The point at ``t`` on the W2 geodesic from ``q0`` to ``q1``.

    Parameters
    ----------
    q0, q1 : posterior
        Both Gaussian (guides or ``site -> (loc, scale)``) or both points
        (``site -> tensor``), with the same sites and shapes. Align first
        (``q1 = align(q0, q1, spec).aligned``) to interpolate modulo symmetry.
    t : float in [0, 1]
    data : Tensor, tuple of forward arguments, or iterable of batches, optional
        Inputs on which BatchNorm running statistics are recomputed (see ``reset_bn``).
    reset_bn : bool, optional
        Recompute the running statistics of every BatchNorm of the network at the point
        (REPAIR-style reset; Jordan et al. 2023): interpolated statistics belong to no
        network on the path. Default: ``True`` when ``q0`` is an ``nn.Module`` with
        BatchNorm running statistics and ``data`` is given, else ``False``. Needs ``q0`` to
        be that module (``q1`` may be a module or a state dict, e.g. an aligned one); see
        :func:`~pyro_symmetry.alignment.bnreset.reset_batchnorm`. The result is then
        detached (statistics are not differentiable).

    Returns
    -------
    Marginals
        A dict ``site -> (loc_t, scale_t)`` with ``loc_t = (1 - t) loc0 + t loc1`` and
        ``scale_t = (1 - t) scale0 + t scale1``, or ``site -> (1 - t) w0 + t w1``.
        ``t = 0`` and ``t = 1`` give the inputs exactly. It is also a
        :class:`~pyro_symmetry.Posterior` that keeps the guides' transforms: a latent site
        with a constrained support (a learned positive noise scale) is interpolated in the
        guide's unconstrained space, as the guide parameterizes it, and a loss that draws
        from the point (:func:`~pyro_symmetry.nll_loss`) maps its draws to the model's space.

    Notes
    -----
    Differentiable: the result carries the autograd graph of the inputs' tensors (e.g.
    ``dict(net.named_parameters())`` or a guide's live parameters), so a loss at ``q_t``
    can be differentiated with respect to ``q0`` and ``q1`` (not ``t``, a number); pass
    detached tensors when no gradient is wanted. Meta-device or mixed-device inputs
    raise a ``ValueError``.
    """
    t = check_real("t", t)
    if not 0.0 <= t <= 1.0:
        raise ValueError(f"t must lie in [0, 1], got {t}")
    reset = _reset_option(q0, data, reset_bn)
    r0 = read_posterior(q0, "q0", detach=reset is not None, transforms=True)
    r1 = read_posterior(q1, "q1", detach=reset is not None, transforms=True)
    return _at(r0, r1, t, None, reset)


def _reset_option(q0: Any, data: Any, reset_bn: bool | None) -> tuple | None:
    """``(module, data)`` when BatchNorm statistics are to be recomputed along the path, else None."""
    if reset_bn is not None and not isinstance(reset_bn, bool):
        raise TypeError(f"reset_bn must be None or a bool, got {reset_bn!r}")
    if reset_bn is None:
        reset_bn = data is not None and has_running_stats(q0)
    if not reset_bn:
        return None
    if not has_running_stats(q0):
        raise ValueError(
            "reset_bn=True needs q0 to be an nn.Module with BatchNorm running statistics (got a "
            f"{type(q0).__name__}); pass the network itself"
        )
    if data is None:
        raise ValueError("reset_bn=True needs data= (inputs on which the BatchNorm statistics are recomputed)")
    return q0, data


def _at(r0: tuple, r1: tuple, t: float, transforms: dict | None, reset: tuple | None) -> Marginals:
    """The point at ``t``, with its BatchNorm statistics recomputed when ``reset`` is given."""
    point = _interpolate(r0, r1, t, transforms)
    if reset is None:
        return point
    if point.form != "point":
        raise ValueError("reset_bn applies to networks (points): q0 and q1 are Gaussian posteriors")
    return Marginals(reset_batchnorm(reset[0], point, reset[1]), point.transforms)


def _check_pair(r0: tuple, r1: tuple) -> dict[str, Any]:
    """Two posteriors read by ``read_posterior(..., transforms=True)`` can be interpolated:
    one form, the same sites, shapes and dtypes; their transforms (merged)."""
    (f0, mu0, sd0, tr0), (f1, mu1, sd1, tr1) = r0, r1
    if f0 != f1:
        raise ValueError(f"q0 is {f0} but q1 is {f1}: both must be Gaussian or both points")
    check_sites({"q0": mu0, "q1": mu1})
    floating = [k for k in mu0 if mu0[k].is_floating_point() or mu1[k].is_floating_point()]
    check_dtypes(floating, {"q0": mu0, "q1": mu1}, {"q0": sd0, "q1": sd1})
    return merge_transforms({"q0": tr0, "q1": tr1})


def _interpolate(r0: tuple, r1: tuple, t: float, transforms: dict | None = None) -> Marginals:
    """:func:`interpolate` between two posteriors read by ``read_posterior(..., transforms=True)``."""
    if transforms is None:
        transforms = _check_pair(r0, r1)
    (f0, mu0, sd0, _), (_, mu1, sd1, _) = r0, r1
    if f0 == "point":
        return Marginals({k: _lerp(mu0[k], mu1[k], t) for k in mu0}, transforms)
    return Marginals({k: (_lerp(mu0[k], mu1[k], t), _lerp(sd0[k], sd1[k], t)) for k in mu0}, transforms)


@dataclass(frozen=True)
class BarrierResult:
    """Result of :func:`loss_barrier`.

    Attributes
    ----------
    t : Tensor ``(num_points,)``
    losses : Tensor ``(num_points,)`` float64
        ``L(q_t)``.
    barrier : float
        ``max_t L(q_t) - ((1 - t) L(q0) + t L(q1))`` (>= 0: the endpoints give 0).
    """

    t: torch.Tensor
    losses: torch.Tensor
    barrier: float

    def __repr__(self) -> str:
        ends = f"{float(self.losses[0]):.6g} -> {float(self.losses[-1]):.6g}"
        return f"BarrierResult(barrier={self.barrier:.6g}, points={self.t.numel()}, losses {ends})"


def loss_barrier(
    loss_fn: Callable[[Any], float],
    q0: Any,
    q1: Any,
    num_points: int = 25,
    *,
    data: Any = None,
    reset_bn: bool | None = None,
    progress: bool = False,
) -> BarrierResult:
    """Loss barrier along the W2 geodesic (or straight line) from ``q0`` to ``q1``.

    Parameters
    ----------
    loss_fn : callable ``posterior -> float``
        E.g. :func:`gaussian_nll_loss` ``(model, x_test, y_test)``; it receives the
        interpolated posterior (``site -> (loc, scale)`` or ``site -> tensor``).
    q0, q1 : posterior
        As in :func:`interpolate`.
    num_points : int
        Evenly spaced ``t`` in ``[0, 1]``, endpoints included (>= 2).
    data, reset_bn
        As in :func:`interpolate`: by default the BatchNorm running statistics of a network
        ``q0`` are recomputed on ``data`` at every point of the grid (endpoints included),
        so that the barrier measures the networks, not stale statistics (REPAIR; Jordan et
        al. 2023).
    progress : bool
        Show a progress bar over ``t``.

    Returns
    -------
    BarrierResult
        ``t``, ``losses`` and ``barrier = max_t [L(q_t) - ((1 - t) L(q0) + t L(q1))]``.

    Notes
    -----
    Not differentiable: ``q0`` and ``q1`` are read once, detached (so ``loss_fn``
    receives tensors that do not require grad and builds no autograd graph), and the
    losses are floats.

    Examples
    --------
    >>> loss = ps.gaussian_nll_loss(model, x_test, y_test)
    >>> before = ps.loss_barrier(loss, q0, q1)
    >>> after = ps.loss_barrier(loss, q0, ps.align(q0, q1, model.spec).aligned)
    """
    num_points = check_int("num_points", num_points, minimum=2)
    check_callable("loss_fn", loss_fn)
    ts = torch.linspace(0.0, 1.0, num_points, dtype=torch.float64)
    ts[-1] = 1.0
    grid = ts.tolist()
    if progress:
        from tqdm.auto import tqdm

        grid = tqdm(grid, desc="loss barrier", leave=False)
    r0, r1 = read_posterior(q0, "q0", transforms=True), read_posterior(q1, "q1", transforms=True)
    transforms = _check_pair(r0, r1)
    reset = _reset_option(q0, data, reset_bn)
    losses = [_loss_value(loss_fn, _at(r0, r1, t, transforms, reset), t) for t in grid]
    losses = torch.tensor(losses, dtype=torch.float64)
    chord = torch.lerp(losses[0].expand_as(ts), losses[-1].expand_as(ts), ts)
    return BarrierResult(ts, losses, float((losses - chord).max()))


def _loss_value(loss_fn: Callable[[Any], float], q: Any, t: float) -> float:
    """``float(loss_fn(q))``, which must be one finite number."""
    value = loss_fn(q)
    if torch.is_tensor(value):
        if value.numel() != 1:
            raise ValueError(f"loss_fn must return one number, got a tensor of shape {tuple(value.shape)} at t={t:.3g}")
        value = value.detach()  # a loss built on parameters that require grad: only its value counts
    try:
        value = float(value)
    except (TypeError, ValueError):
        raise TypeError(f"loss_fn must return a number, got {type(value).__name__} at t={t:.3g}") from None
    if not math.isfinite(value):
        raise ValueError(f"loss_fn returned {value} at t={t:.3g}; the loss barrier needs finite losses")
    return value


# ---------------------------------------------------------------------------- losses
METRICS = ("nll", "error")


@dataclass(frozen=True)
class PredictiveLoss:
    """Test loss of a network's posterior predictive, a picklable ``posterior -> float``.

    For a Gaussian posterior the predictive is the Monte Carlo average over
    ``num_samples`` weight draws ``w_s = loc + scale * eps_s``, with ``eps_s`` drawn
    once from ``seed`` (common random numbers across posteriors); for a point
    posterior it is the network at the point.

    ``metric="nll"``: ``-(1/N) sum_n log (1/S) sum_s p(y_n | x_n, w_s)``
    (Categorical on logits, or Normal with standard deviation ``obs_scale``).
    ``metric="error"``: error rate of the argmax of the mean probabilities
    (classification) or mean squared error of the mean prediction (regression).

    Parameters
    ----------
    model : object with ``functional(params, x) -> (*batch, N, out)``
    x, y : Tensors ``(N, ...)``, ``(N,)``
    metric : {"nll", "error"}
    gaussian : bool
        Monte Carlo over a Gaussian posterior (``True``) or a point (``False``;
        Gaussian inputs are then evaluated at their means).
    num_samples, seed : int
    likelihood : {"classification", "regression"}, optional
        Default: ``model.likelihood``.
    obs_scale : float, optional
        Regression noise; default ``model.obs_scale``.
    """

    model: Any
    x: torch.Tensor
    y: torch.Tensor
    metric: str = "nll"
    gaussian: bool = True
    num_samples: int = 32
    seed: int = 0
    likelihood: str | None = None
    obs_scale: float | None = None

    def __post_init__(self) -> None:
        if self.metric not in METRICS:
            raise ValueError(f"metric must be one of {METRICS}, got {self.metric!r}")
        if not callable(getattr(self.model, "functional", None)):
            raise TypeError(f"model must have a functional(params, x) method, got {type(self.model).__name__}")
        check_int("num_samples", self.num_samples, minimum=1)
        check_int("seed", self.seed)
        lik = self.likelihood or getattr(self.model, "likelihood", "classification")
        if lik not in ("classification", "regression"):
            raise ValueError(f"likelihood must be 'classification' or 'regression', got {lik!r}")
        object.__setattr__(self, "likelihood", lik)
        if lik == "regression" and self.metric == "nll":
            if self.obs_scale is not None:
                sigma = check_real("obs_scale", self.obs_scale, positive=True)
            else:
                sigma = getattr(self.model, "obs_scale", None)
                if sigma is None:
                    raise ValueError("regression NLL needs a positive obs_scale (the model's is None): pass obs_scale=")
            object.__setattr__(self, "obs_scale", float(sigma))
        check_finite("x", check_tensor("x", self.x, floating=True, min_dim=1))
        check_finite("y", check_tensor("y", self.y, min_dim=1))
        if self.x.shape[0] != self.y.shape[0]:
            raise ValueError(f"x has {self.x.shape[0]} rows but y has {self.y.shape[0]}")
        if lik == "classification" and self.y.numel():
            n_out = getattr(self.model, "out_features", None)
            lo, hi = torch.aminmax(self.y)
            if lo < 0 or (n_out is not None and hi >= n_out) or bool((self.y != self.y.round()).any()):
                raise ValueError(
                    f"y must hold integer class labels in [0, {n_out if n_out is not None else 'C'}), "
                    f"got values in [{lo.item()}, {hi.item()}]"
                )

    def outputs(self, q: Any) -> torch.Tensor:
        """Network outputs ``(S, N, out)`` under ``q`` (``S = 1`` for a point)."""
        form, mu, sd = read_posterior(q, "q")
        if not self.gaussian or form == "point":
            if self.gaussian:
                raise ValueError("a Gaussian loss needs a Gaussian posterior; use point_*_loss for point estimates")
            return self.model.functional(mu, self.x).unsqueeze(0)
        gen = torch.Generator(device=next(iter(mu.values())).device).manual_seed(self.seed)
        params = {}
        for k in sorted(mu):
            if not mu[k].is_floating_point():
                params[k] = mu[k]
                continue
            eps = torch.randn((self.num_samples,) + mu[k].shape, generator=gen, dtype=mu[k].dtype, device=mu[k].device)
            params[k] = mu[k] + sd[k] * eps
        return self.model.functional(params, self.x)

    @torch.no_grad()
    def __call__(self, q: Any) -> float:
        out = self.outputs(q)
        y = self.y.to(out.device)
        if self.likelihood == "classification":
            logp = out.log_softmax(-1)
            if self.metric == "error":
                pred = logp.exp().mean(0).argmax(-1)
                return float((pred != y).double().mean())
            lp = logp.gather(-1, y.long().expand(out.shape[:-1]).unsqueeze(-1)).squeeze(-1)
        else:
            mean = out.squeeze(-1) if out.shape[-1] == 1 and y.dim() == 1 else out
            if self.metric == "error":
                return float((mean.mean(0) - y).double().pow(2).mean())
            lp = torch.distributions.Normal(mean, self.obs_scale).log_prob(y)
            if lp.dim() > 2:
                lp = lp.sum(-1)
        pred = torch.logsumexp(lp.double(), 0) - math.log(lp.shape[0])
        return float(-pred.mean())


def gaussian_nll_loss(model: Any, x: torch.Tensor, y: torch.Tensor, *, num_samples: int = 32, seed: int = 0, **kw: Any):
    """Predictive test NLL under a Gaussian posterior (Monte Carlo, fixed draws); see :class:`PredictiveLoss`."""
    return PredictiveLoss(model, x, y, "nll", True, num_samples, seed, **kw)


def gaussian_error_loss(
    model: Any, x: torch.Tensor, y: torch.Tensor, *, num_samples: int = 32, seed: int = 0, **kw: Any
):
    """Error rate (or MSE) of the Monte Carlo predictive mean; see :class:`PredictiveLoss`."""
    return PredictiveLoss(model, x, y, "error", True, num_samples, seed, **kw)


def point_nll_loss(model: Any, x: torch.Tensor, y: torch.Tensor, **kw: Any):
    """Test NLL of the network at a point (a Gaussian's means); see :class:`PredictiveLoss`."""
    return PredictiveLoss(model, x, y, "nll", False, 1, 0, **kw)


def point_error_loss(model: Any, x: torch.Tensor, y: torch.Tensor, **kw: Any):
    """Error rate (or MSE) of the network at a point; see :class:`PredictiveLoss`."""
    return PredictiveLoss(model, x, y, "error", False, 1, 0, **kw)
