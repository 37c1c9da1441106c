"""Loads the C++ extension ``sparseops._C``; without it, CPU ops take the reference path."""

from __future__ import annotations

import os
import warnings

_C = None
_REASON = ""

if os.environ.get("SPARSEOPS_NO_CPP") == "1":
    _REASON = "SPARSEOPS_NO_CPP=1 is set"
else:
    try:
        from . import _C  # noqa: F811
    except ImportError as exc:  # pragma: no cover - depends on the build
        _REASON = f"the extension failed to import ({exc})"

if _C is None:
    warnings.warn(
        f"sparseops: C++ kernels unavailable because {_REASON}; CPU ops run on the pure-torch "
        "reference path, which is correct but much slower.",
        RuntimeWarning,
        stacklevel=2,
    )


def available() -> bool:
    """True when the C++ CPU kernels are loaded."""
    return _C is not None


def isa() -> str:
    """The CPU kernel path in use: ``"avx512"``, ``"avx2"``, ``"portable"``, or ``"reference"`` without C++."""
    return _C.isa() if _C is not None else "reference"


def set_isa(name: str) -> str:
    """Select ``"avx512"``, ``"avx2"`` or ``"portable"`` kernels; a path the CPU lacks falls back to the best it has
    below it. ``avx512`` is the AVX2 kernels plus 16-lane loops in the large-batch sparse products."""
    if _C is None:
        raise RuntimeError(f"sparseops: no C++ kernels to configure ({_REASON})")
    return _C.set_isa(name)
