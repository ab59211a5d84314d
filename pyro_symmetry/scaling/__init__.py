"""Scaling and sign-flip symmetries, minimum-mass rescaling and canonical forms.

ReLU networks have a continuous scaling symmetry per hidden neuron, odd activations a
sign flip per hidden neuron; removing them (minimum mass, a sign convention) and then
the permutations (sorting or alignment) gives one canonical representative per
symmetry orbit (Laurent, Aldea, Franchi, ICLR 2024).
"""

from .canonical import CanonicalForm, canonicalize, sort_permutation
from .minimum_mass import MinMassResult, min_mass
from .rescaling import mass, mass_sites, rescale
from .signs import flip_signs, sign_convention

__all__ = [
    "CanonicalForm",
    "canonicalize",
    "MinMassResult",
    "flip_signs",
    "mass",
    "mass_sites",
    "min_mass",
    "rescale",
    "sign_convention",
    "sort_permutation",
]
