"""Alignment of posteriors up to weight-space symmetry.

:func:`align` matches one posterior to another (Wasserstein or weight matching, by
coordinate descent over neuron groups with linear assignments, signed for odd
activations, attention heads and their dims jointly; or activation matching on data);
:func:`align_many` aligns several runs to one or to their barycenter;
:func:`align_samples` aligns every sample of a batch (MCMC chains, ensembles);
:func:`interpolate` and :func:`loss_barrier` measure linear mode connectivity (BatchNorm
statistics recomputed on data at every point; guides' transforms kept).
"""

from .barrier import (
    BarrierResult,
    PredictiveLoss,
    gaussian_error_loss,
    gaussian_nll_loss,
    interpolate,
    loss_barrier,
    point_error_loss,
    point_nll_loss,
)
from .many import ManyAlignment, SampleAlignment, align_many, align_samples
from .pairwise import AlignmentResult, align

__all__ = [
    "AlignmentResult",
    "BarrierResult",
    "ManyAlignment",
    "PredictiveLoss",
    "SampleAlignment",
    "align",
    "align_many",
    "align_samples",
    "gaussian_error_loss",
    "gaussian_nll_loss",
    "interpolate",
    "loss_barrier",
    "point_error_loss",
    "point_nll_loss",
]
