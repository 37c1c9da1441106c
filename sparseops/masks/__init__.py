"""Mask producers: bool masks ``[out, in]`` for the sparse formats."""

from .magnitude import global_magnitude, magnitude

__all__ = ["magnitude", "global_magnitude"]
