"""What a posterior is: one object for every form (guides, (loc, scale) mappings, points,
draws, MCMC, ArviZ trees), and predictions of any Pyro model at its draws."""

from .core import Posterior
from .losses import ModelLoss, error_loss, nll_loss
from .predict import Predictions, predict
from .reading import PosteriorFormError, as_posterior

__all__ = [
    "ModelLoss",
    "Posterior",
    "PosteriorFormError",
    "Predictions",
    "as_posterior",
    "error_loss",
    "nll_loss",
    "predict",
]
