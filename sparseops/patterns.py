"""Sparsity patterns: small frozen config objects.

A pattern says *which* structure a sparse weight has; ``sparsity=`` or ``mask=`` says how
much of it, or exactly where. Strings are accepted as shorthand: ``"unstructured"``,
``"2:4"`` (``NM(2, 4)``), ``"2:4t"`` (``NM(2, 4, transposable=True)``), ``"fanin:128"`` (``FanIn(128)``),
``"block:32"`` (``Block(32)``), ``"butterfly"`` (``Butterfly()``), ``"monarch:4"`` (``Monarch(4)``).
N:M and fan-in fix their own sparsity (``1 - n/m``, ``1 - k/in``), and a butterfly's follows from its shape.
"""

from __future__ import annotations

import numbers
import re
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
        if not isinstance(self.transposable, bool):
            raise TypeError(f"transposable: expected a bool, got {type(self.transposable).__name__}")

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


_BLOCKS = (8, 16, 32, 64)


def _check_int(name: str, v, lo: int) -> None:
    if isinstance(v, bool) or not isinstance(v, int):
        raise TypeError(f"{name}: expected an int, got {type(v).__name__}")
    if v < lo:
        raise ValueError(f"{name}: expected >= {lo}, got {v}")


@dataclass(frozen=True)
class Block:
    """Square blocks of ``size`` (8, 16, 32 or 64), stored as BSR (see ``formats.bsr``).

    Args:
        size: the block side.
        sparsity: fraction of zero *blocks* in [0, 1) for block-magnitude pruning, or None to
            take it from the caller / mask.
    """

    size: int = 32
    sparsity: float | None = None

    def __post_init__(self):
        _check_int("size", self.size, 1)
        if self.size not in _BLOCKS:
            raise ValueError(f"size: expected one of {_BLOCKS}, got {self.size}")
        if self.sparsity is not None:
            check_sparsity(self.sparsity)

    @property
    def block(self) -> int:
        return self.size

    @property
    def name(self) -> str:
        return f"block{self.size}"


@dataclass(frozen=True)
class Butterfly:
    """Pixelated Butterfly: a flat block-butterfly mask (``masks.flat_block_butterfly``), stored as
    BSR, plus an optional trainable low-rank term ``U Vᵀ`` of rank ``rank`` (Pixelfly).

    Args:
        butterfly_size: ``n``, a power of two >= 2: the side of the base pattern.
        n_factors: ``k``, 1 <= 2**(k-1) < n: butterfly factors flattened into the pattern; density (k+1)/n.
        block: the BSR block side (8, 16, 32 or 64).
        rank: rank of the low-rank term (0: none).
        global_size: the first ``global_size`` rows and columns are dense.
        shuffle: permute the base pattern's rows at random (torch's RNG), so the pattern is not tied to the diagonal.
    """

    butterfly_size: int = 16
    n_factors: int = 2
    block: int = 32
    rank: int = 0
    global_size: int = 0
    shuffle: bool = False

    def __post_init__(self):
        _check_int("butterfly_size", self.butterfly_size, 2)
        if self.butterfly_size & (self.butterfly_size - 1):
            raise ValueError(f"butterfly_size: expected a power of two, got {self.butterfly_size}")
        _check_int("n_factors", self.n_factors, 1)
        if (1 << (self.n_factors - 1)) >= self.butterfly_size:
            raise ValueError(
                f"n_factors: expected 2**(n_factors-1) < butterfly_size={self.butterfly_size}, got {self.n_factors}"
            )
        _check_int("block", self.block, 1)
        if self.block not in _BLOCKS:
            raise ValueError(f"block: expected one of {_BLOCKS}, got {self.block}")
        _check_int("rank", self.rank, 0)
        _check_int("global_size", self.global_size, 0)
        if not isinstance(self.shuffle, bool):
            raise TypeError(f"shuffle: expected a bool, got {type(self.shuffle).__name__}")

    @property
    def sparsity(self) -> None:
        # fixed by the pattern and the layer's shape
        return None

    @property
    def name(self) -> str:
        lr = f"+r{self.rank}" if self.rank else ""
        return f"butterfly{self.butterfly_size}x{self.n_factors}b{self.block}{lr}"


@dataclass(frozen=True)
class Monarch:
    """A Monarch weight (``nn.MonarchLinear``): two block-diagonal factors of ``nblocks`` blocks.

    Only ``sparsify_`` takes it (it swaps in a ``MonarchLinear``, projected from the dense weight);
    a Monarch matrix is dense, so it has no mask and no ``SparseLinear``.
    """

    nblocks: int = 4

    def __post_init__(self):
        _check_int("nblocks", self.nblocks, 1)

    @property
    def sparsity(self) -> None:
        return None

    @property
    def name(self) -> str:
        return f"monarch{self.nblocks}"


Pattern = Union[Unstructured, NM, FanIn, Block, Butterfly, Monarch]

_SHORTHANDS = {"unstructured": Unstructured, "csr": Unstructured, "butterfly": Butterfly}


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
    if isinstance(pattern, (Unstructured, NM, FanIn, Block, Butterfly, Monarch)):
        return pattern
    if isinstance(pattern, str):
        key = pattern.strip().lower()
        if key in _SHORTHANDS:
            return _SHORTHANDS[key]()
        parts = key.split(":")
        if len(parts) == 2 and all(p.isdigit() for p in parts):
            return NM(int(parts[0]), int(parts[1]))
        if len(parts) == 2 and parts[0].isdigit() and parts[1][:-1].isdigit() and parts[1].endswith("t"):
            return NM(int(parts[0]), int(parts[1][:-1]), transposable=True)
        # 'fanin:K', 'block:B', 'monarch:K', or the pattern's own name ('fanin16', 'block32', 'monarch4': what
        # the profiler, explain and profile.json print)
        m = re.fullmatch(r"(fanin|block|monarch):?(\d+)", key)
        if m:
            return {"fanin": FanIn, "block": Block, "monarch": Monarch}[m.group(1)](int(m.group(2)))
        raise ValueError(
            f"pattern: unknown pattern {pattern!r}; expected one of {sorted(_SHORTHANDS)}, 'N:M' such as '2:4' "
            "('2:4t' transposable), "
            "'fanin:K', 'block:B' or 'monarch:K' (or 'fanin16', 'block32', 'monarch4': the names they print)"
        )
    raise TypeError(f"pattern: expected a pattern object or a string, got {type(pattern).__name__}")
