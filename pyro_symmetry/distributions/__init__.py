"""Distributions over network weights built from a group action."""

from .pushforward import Pushforward, PushforwardGuide, pushforward_guide

__all__ = ["Pushforward", "PushforwardGuide", "pushforward_guide"]
