"""Sparsity patterns: small frozen config objects.

A pattern says *which* structure a sparse weight has; ``sparsity=`` or ``mask=`` says how
much of it, or exactly where. Strings are accepted as shorthand: ``"unstructured"``,
``"2:4"`` (``NM(2, 4)``), ``"fanin:128"`` (``FanIn(128)``). N:M and fan-in fix their own sparsity (``1 - n/m``, ``1 - k/in``).
"""

from __future__ import annotations

import numbers
from dataclasses import dataclass
from typing import Union


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


@dataclass(frozen=True)
class NM:
    """At most ``n`` nonzeros in every ``m`` consecutive weights of a row (along the input dim).

    Args:
        n, m: ``1 <= n < m <= 16``.
        transposable: also N:M along columns (BDWP), so that the input gradient runs on an
            N:M weight too.
    """

    n: int
    m: int
    transposable: bool = False

    def __post_init__(self):
        for name in ("n", "m"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int):
                raise TypeError(f"{name}: expected an int, got {type(v).__name__}")
        if not (1 <= self.n < self.m <= 16):
            raise ValueError(f"n: expected 1 <= n < m <= 16, got n={self.n}, m={self.m}")

    @property
    def sparsity(self) -> float:
        return 1.0 - self.n / self.m

    @property
    def name(self) -> str:
        return f"{self.n}:{self.m}" + ("T" if self.transposable else "")


@dataclass(frozen=True)
class FanIn:
    """Exactly ``k`` nonzeros in every output row (SRigL's constant fan-in).

    Args:
        k: nonzeros per row, ``1 <= k <= in_features``.
    """

    k: int

    def __post_init__(self):
        if isinstance(self.k, bool) or not isinstance(self.k, int):
            raise TypeError(f"k: expected an int, got {type(self.k).__name__}")
        if self.k < 1:
            raise ValueError(f"k: expected >= 1, got {self.k}")

    @property
    def sparsity(self) -> None:
        # depends on in_features; see sparsity_for
        return None

    @property
    def name(self) -> str:
        return f"fanin{self.k}"


Pattern = Union[Unstructured, NM, FanIn]

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
    if isinstance(pattern, (Unstructured, NM, FanIn)):
        return pattern
    if isinstance(pattern, str):
        key = pattern.strip().lower()
        if key in _SHORTHANDS:
            return _SHORTHANDS[key]()
        parts = key.split(":")
        if len(parts) == 2 and all(p.isdigit() for p in parts):
            return NM(int(parts[0]), int(parts[1]))
        if len(parts) == 2 and parts[0] == "fanin" and parts[1].isdigit():
            return FanIn(int(parts[1]))
        raise ValueError(
            f"pattern: unknown pattern {pattern!r}; expected one of {sorted(_SHORTHANDS)}, 'N:M' such as '2:4', "
            "or 'fanin:K'"
        )
    raise TypeError(f"pattern: expected a pattern object or a string, got {type(pattern).__name__}")
