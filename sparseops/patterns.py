"""Sparsity patterns: small frozen config objects.

A pattern says *which* structure a sparse weight has; ``sparsity=`` or ``mask=`` says how
much of it, or exactly where. Strings are accepted as shorthand: ``"unstructured"``.
"""

from __future__ import annotations

import numbers
from dataclasses import dataclass


@dataclass(frozen=True)
class Unstructured:
    """Any set of nonzeros, stored as CSR with both orientations (see ``formats.csr``).

    Args:
        sparsity: fraction of zeros in [0, 1), or None to take it from the caller / mask.
    """

    sparsity: float | None = None

    def __post_init__(self):
        if self.sparsity is not None:
            check_sparsity(self.sparsity)

    @property
    def name(self) -> str:
        return "unstructured"


Pattern = Unstructured

_SHORTHANDS = {"unstructured": Unstructured, "csr": Unstructured}


def check_sparsity(sparsity, name: str = "sparsity") -> float:
    """Return ``sparsity`` as a float after checking it lies in [0, 1).

    Raises:
        TypeError: not a real number.
        ValueError: outside [0, 1) or NaN.
    """
    if isinstance(sparsity, bool) or not isinstance(sparsity, numbers.Real):
        raise TypeError(f"{name}: expected a float in [0, 1), got {type(sparsity).__name__}")
    s = float(sparsity)
    if not (0.0 <= s < 1.0):
        raise ValueError(f"{name}: expected a float in [0, 1), got {sparsity}")
    return s


def as_pattern(pattern) -> Pattern:
    """Turn a pattern object or its string shorthand into a pattern object.

    Raises:
        ValueError: an unknown shorthand.
        TypeError: neither a pattern nor a string.
    """
    if isinstance(pattern, Unstructured):
        return pattern
    if isinstance(pattern, str):
        key = pattern.strip().lower()
        if key in _SHORTHANDS:
            return _SHORTHANDS[key]()
        raise ValueError(f"pattern: unknown pattern {pattern!r}; expected one of {sorted(_SHORTHANDS)}")
    raise TypeError(f"pattern: expected a pattern object or a string, got {type(pattern).__name__}")
