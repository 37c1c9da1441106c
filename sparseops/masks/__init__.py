"""Mask producers: bool masks ``[out, in]`` for the sparse formats.

N:M groups run along the last (input) dim. Every producer returns a new bool tensor with the
weight's shape and device, and leaves the weight untouched. The math is in ``docs/masks.md``.
"""

from .block import block_magnitude, flat_block_butterfly, is_block_sparse
from .erk import erk, erk_densities, random
from .fan_in import fan_in, is_fan_in
from .magnitude import global_magnitude, magnitude
from .nm import is_nm, nm
from .patterned import for_pattern
from .quality import kept_magnitude, nm_quality
from .transposable import is_transposable_nm, transposable_nm
from .wanda import activation_norms, wanda

__all__ = [
    "block_magnitude",
    "flat_block_butterfly",
    "is_block_sparse",
    "for_pattern",
    "magnitude",
    "global_magnitude",
    "nm",
    "is_nm",
    "transposable_nm",
    "is_transposable_nm",
    "kept_magnitude",
    "nm_quality",
    "fan_in",
    "is_fan_in",
    "random",
    "erk_densities",
    "erk",
    "wanda",
    "activation_norms",
]
