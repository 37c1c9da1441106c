"""Constant fan-in masks (SRigL): the same number of inputs kept for every output."""

from __future__ import annotations

import torch

from ._checks import check_int, check_mask, check_weight, keep_top_rows, scores_of


def fan_in(weight: torch.Tensor, k: int) -> torch.Tensor:
    """Keep exactly the ``k`` largest ``|w|`` of every output row; ties go to the lower index.

    Args:
        weight: floating tensor ``[out, *fan]`` (``[out, in]`` for linear, ``[out, in, kh, kw]``
            for conv); the fan-in of a row is everything but the first dim.
        k: kept per row, ``1 <= k <= fan`` where ``fan = prod(weight.shape[1:])``.

    Returns:
        bool mask with ``weight``'s shape, exactly ``k`` True per output row.

    Raises:
        TypeError: ``weight`` is not a floating tensor, or ``k`` is not an int.
        ValueError: ``k`` out of range, ``weight`` has fewer than 2 dims or holds NaN.
    """
    w = check_weight(weight, min_dim=2)
    k = check_int(k, "k")
    fan = 1
    for d in w.shape[1:]:
        fan *= d
    if not (1 <= k <= fan):
        raise ValueError(f"k: expected 1 <= k <= fan-in={fan}, got k={k}")
    return keep_top_rows(scores_of(w).reshape(w.shape[0], fan), k).view(w.shape)


def is_fan_in(mask: torch.Tensor, k: int) -> bool:
    """Whether every output row (first dim) of ``mask`` holds exactly ``k`` True.

    Args:
        mask: bool tensor ``[out, *fan]``.
        k: the required count per row.

    Returns:
        True when the mask has constant fan-in ``k``.

    Raises:
        TypeError: ``mask`` is not a bool tensor, or ``k`` is not an int.
        ValueError: ``mask`` has fewer than 2 dims.
    """
    mask = check_mask(mask, min_dim=2)
    k = check_int(k, "k")
    return bool((mask.reshape(mask.shape[0], -1).sum(1) == k).all())
