"""Test losses of any Pyro model's posterior predictive: what loss barriers, the report and
metrics evaluate along a path of posteriors.

``nll_loss(model, x, y)`` returns a picklable ``posterior -> float``: the posterior (any
form :func:`~pyro_symmetry.as_posterior` reads) is turned into weight draws (a density:
``num_samples`` draws with noise fixed by ``seed``, the same for every posterior, so a curve
along an interpolation path is smooth; draws: all of them; a point: itself), the model is run
at each draw with Pyro's machinery (:func:`~pyro_symmetry.posteriors.predict`) and

- ``metric="nll"``: ``-(1/N) sum_n log (1/S) sum_s p(y_n | x_n, w_s)`` (the observed sites'
  pointwise log-densities, summed over observed sites);
- ``metric="error"``: the error rate of the argmax of the mean class probabilities (a
  categorical observed site) or the mean squared error of the mean prediction.

Every latent site of the model must be in the posterior: a learned noise scale is carried
along (and interpolated) like the weights, never fixed by hand.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch

from .._validation import check_int
from .predict import predict
from .reading import as_posterior

__all__ = ["ModelLoss", "error_loss", "nll_loss"]

METRICS = ("nll", "error")


@dataclass(frozen=True)
class ModelLoss:
    """``posterior -> float``: a test loss of ``model(*args, **kwargs)``'s predictive.

    Parameters
    ----------
    model : Pyro model
    args, kwargs : the data passed to the model (the observed values among them)
    metric : {"nll", "error"}
    num_samples : int
        Draws of a density posterior.
    seed : int
        Fixes those draws' noise (common random numbers across posteriors).
    progress : bool
        A progress bar over draws when the model cannot be vectorized.
    """

    model: Callable
    args: tuple
    kwargs: dict = field(default_factory=dict)
    metric: str = "nll"
    num_samples: int = 32
    seed: int = 0
    progress: bool = False

    def __post_init__(self) -> None:
        if self.metric not in METRICS:
            raise ValueError(f"metric must be one of {METRICS}, got {self.metric!r}")
        if not callable(self.model):
            raise TypeError(f"model must be a callable Pyro model, got {type(self.model).__name__}")
        check_int("num_samples", self.num_samples, minimum=1)
        check_int("seed", self.seed)

    def draws(self, q: Any) -> dict[str, torch.Tensor]:
        """``site -> (S, *shape)`` weight draws of ``q`` in the model's space."""
        p = as_posterior(q, name="the posterior")
        gen = torch.Generator().manual_seed(self.seed)
        d = p.draws(None if p.form in ("draws", "point") else self.num_samples, generator=gen)
        return {k: v.reshape((-1, *v.shape[2:])) for k, v in d.items()}

    @torch.no_grad()
    def __call__(self, q: Any) -> float:
        pred = predict(self.model, self.draws(q), *self.args, progress=self.progress, **self.kwargs)
        if self.metric == "nll":
            lp = sum(v.reshape(v.shape[0], -1).double() for v in pred.log_likelihood.values())
            return float(-(torch.logsumexp(lp, 0) - math.log(lp.shape[0])).mean())
        errors = []
        for name, mean in pred.mean.items():
            y = pred.observed[name]
            if pred.categorical[name]:
                errors.append((mean.double().mean(0).argmax(-1) != y).double().mean())
            else:
                errors.append((mean.double().mean(0) - y.double()).pow(2).mean())
        return float(sum(errors) / len(errors))


def nll_loss(model: Callable, *args: Any, num_samples: int = 32, seed: int = 0, progress: bool = False, **kwargs: Any):
    """Predictive test NLL of any Pyro model; see :class:`ModelLoss`.

    Examples
    --------
    >>> loss = ps.nll_loss(model, x_test, y_test)      # the model's own call signature
    >>> ps.loss_barrier(loss, guide0, guide1).barrier
    """
    return ModelLoss(model, args, kwargs, "nll", num_samples, seed, progress)


def error_loss(
    model: Callable, *args: Any, num_samples: int = 32, seed: int = 0, progress: bool = False, **kwargs: Any
):
    """Error rate (categorical observations) or mean squared error of the predictive mean; see
    :class:`ModelLoss`."""
    return ModelLoss(model, args, kwargs, "error", num_samples, seed, progress)
