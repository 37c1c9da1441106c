"""How much of a weight's magnitude a mask keeps."""

from __future__ import annotations

import torch

from ._checks import check_mask, check_nm, check_weight
from .nm import nm
from .transposable import transposable_nm


def kept_magnitude(weight: torch.Tensor, mask: torch.Tensor) -> float:
    """Fraction of ``sum |w|`` that ``mask`` keeps, accumulated in fp64.

    Args:
        weight: floating tensor of any shape.
        mask: bool tensor of the same shape.

    Returns:
        ``sum |w| * mask / sum |w|`` in [0, 1] (1.0 for an all-zero weight).

    Raises:
        TypeError: ``weight`` not floating or ``mask`` not bool.
        ValueError: shapes differ or ``weight`` holds NaN or inf (an infinite magnitude has no fraction).
    """
    w = check_weight(weight, min_dim=0)
    if bool(torch.isinf(w).any()):
        raise ValueError("weight: holds inf; the kept fraction of an infinite total magnitude is undefined")
    mask = check_mask(mask, min_dim=0)
    if mask.shape != w.shape:
        raise ValueError(f"mask: expected shape {tuple(w.shape)}, got {tuple(mask.shape)}")
    a = w.abs().to(torch.float64)
    total = float(a.sum())
    return 1.0 if total == 0 else float((a * mask.to(a.device)).sum()) / total


def nm_quality(weight: torch.Tensor, n: int, m: int, **transposable_kwargs) -> dict[str, float]:
    """Kept magnitude of the transposable and the plain N:M mask of ``weight``.

    Args:
        weight: floating tensor ``[..., out, in]``.
        n: kept per group, ``1 <= n < m``.
        m: group size, ``m <= 16``.
        **transposable_kwargs: passed on to ``transposable_nm`` (``method``, ``swaps``).

    Returns:
        ``{"transposable": ..., "plain": ...}``, each the fraction of ``sum |w|`` kept; the
        transposable one can never exceed the plain one.

    Raises:
        the errors of ``nm`` and ``transposable_nm``.
    """
    n, m = check_nm(n, m)
    return {
        "transposable": kept_magnitude(weight, transposable_nm(weight, n, m, **transposable_kwargs)),
        "plain": kept_magnitude(weight, nm(weight, n, m)),
    }
