"""Pyro autoguides whose density is the symmetrized posterior ``q_sym`` (SPEC section 2)."""

from .invariance import check_invariance
from .normal import AutoSymmetrizedMeanField, AutoSymmetrizedNormal
from .symmetrize import AutoMixtureOfDiagNormals, Symmetrize

__all__ = [
    "AutoMixtureOfDiagNormals",
    "AutoSymmetrizedMeanField",
    "AutoSymmetrizedNormal",
    "Symmetrize",
    "check_invariance",
]
