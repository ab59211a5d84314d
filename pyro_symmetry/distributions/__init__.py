"""Distributions over network weights built from a group action."""

from .pushforward import Pushforward, PushforwardGuide, pushforward_guide
from .symmetrized import Symmetrized

__all__ = ["Pushforward", "PushforwardGuide", "Symmetrized", "pushforward_guide"]
