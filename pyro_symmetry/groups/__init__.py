"""Weight-space symmetry groups of networks acting on Pyro sample sites."""

from ._indexing import decode_signed, encode_signed
from .action import SiteAction, Span
from .builders import activation_symmetry, mlp_spec, model_site_shapes, spec_from_module
from .flat import FlatLayout, apply_flat, flat_permutation
from .spec import ACTIVATION_SYMMETRIES, Axis, GroupElement, NeuronGroup, PermutationSpec, SpecError

__all__ = [
    "ACTIVATION_SYMMETRIES",
    "Axis",
    "FlatLayout",
    "GroupElement",
    "NeuronGroup",
    "PermutationSpec",
    "SiteAction",
    "Span",
    "SpecError",
    "activation_symmetry",
    "apply_flat",
    "decode_signed",
    "encode_signed",
    "flat_permutation",
    "mlp_spec",
    "model_site_shapes",
    "spec_from_module",
]
