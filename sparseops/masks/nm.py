"""N:M masks: ``n`` of every ``m`` consecutive entries along the last (input) dimension."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ._checks import check_mask, check_nm, check_weight, keep_top_rows, scores_of


def nm(weight: torch.Tensor, n: int, m: int) -> torch.Tensor:
    """Keep the ``n`` largest ``|w|`` in every group of ``m`` consecutive entries of the last dim.

    When the last dim is not a multiple of ``m`` the final, partial group keeps at most ``n``
    (it is padded internally with ``-inf`` and the padding is dropped). Ties go to the lower index.

    Args:
        weight: floating tensor ``[..., in]`` (``[out, in]`` for a linear weight).
        n: entries kept per group, ``1 <= n < m``.
        m: group size, ``m <= 16``.

    Returns:
        bool mask with ``weight``'s shape; every full group holds exactly ``n`` True.

    Raises:
        TypeError: ``weight`` is not a floating tensor, or ``n``/``m`` are not ints.
        ValueError: ``n``/``m`` out of range, ``weight`` is 0-dim or holds NaN.
    """
    w = check_weight(weight)
    n, m = check_nm(n, m)
    if w.numel() == 0:
        return torch.zeros(w.shape, dtype=torch.bool, device=w.device)
    cols = w.shape[-1]
    pad = -cols % m
    s = scores_of(w).reshape(-1, cols)  # [R, in]
    if pad:
        s = F.pad(s, (0, pad), value=float("-inf"))
    keep = keep_top_rows(s.reshape(-1, m), n)  # [R * groups, m]
    return keep.view(-1, cols + pad)[:, :cols].reshape(w.shape)


def group_counts(mask: torch.Tensor, m: int) -> torch.Tensor:
    """Number of True per group of ``m`` along the last dim, ``[..., ceil(in / m)]`` (partial group zero-padded)."""
    pad = -mask.shape[-1] % m
    x = F.pad(mask.to(torch.int32), (0, pad)) if pad else mask.to(torch.int32)
    return x.reshape(*x.shape[:-1], -1, m).sum(-1)


def is_nm(mask: torch.Tensor, n: int, m: int) -> bool:
    """Whether every group of ``m`` consecutive entries of the last dim holds at most ``n`` True.

    "At most" rather than "exactly": a mask with fewer nonzeros still fits an N:M format,
    and the partial last group can only be held to at most ``n``.

    Args:
        mask: bool tensor ``[..., in]``.
        n: allowed True per group, ``1 <= n < m``.
        m: group size, ``m <= 16``.

    Returns:
        True when the mask is N:M along its last dim.

    Raises:
        TypeError: ``mask`` is not a bool tensor, or ``n``/``m`` are not ints.
        ValueError: ``n``/``m`` out of range or ``mask`` is 0-dim.
    """
    mask = check_mask(mask)
    n, m = check_nm(n, m)
    if mask.numel() == 0:
        return True
    return bool((group_counts(mask, m) <= n).all())
