"""Argument checks and small helpers shared by the mask producers."""

from __future__ import annotations

import numbers

import torch

from .magnitude import _rank_dtype

MAX_M = 16


def check_weight(weight, name: str = "weight", min_dim: int = 1) -> torch.Tensor:
    """Return ``weight`` detached after checking it is a floating tensor of ``min_dim``+ dims without NaN."""
    if not isinstance(weight, torch.Tensor) or not weight.is_floating_point():
        raise TypeError(f"{name}: expected a floating-point torch.Tensor, got {getattr(weight, 'dtype', type(weight))}")
    if weight.dim() < min_dim:
        raise ValueError(f"{name}: expected at least {min_dim} dims, got shape {tuple(weight.shape)}")
    if weight.device.type == "meta":
        raise ValueError(f"{name}: expected a tensor with data, got one on the meta device (nothing to rank)")
    w = weight.detach()
    if torch.isnan(w).any():
        raise ValueError(f"{name}: contains NaN; magnitudes cannot be ranked")
    return w


def check_mask(mask, name: str = "mask", min_dim: int = 1) -> torch.Tensor:
    """Return ``mask`` after checking it is a bool tensor of ``min_dim``+ dims."""
    if not isinstance(mask, torch.Tensor) or mask.dtype != torch.bool:
        raise TypeError(f"{name}: expected a bool torch.Tensor, got {getattr(mask, 'dtype', type(mask))}")
    if mask.dim() < min_dim:
        raise ValueError(f"{name}: expected at least {min_dim} dims, got shape {tuple(mask.shape)}")
    return mask


def check_int(value, name: str) -> int:
    """Return ``value`` as an int; bools and floats are refused."""
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise TypeError(f"{name}: expected an int, got {type(value).__name__}")
    return int(value)


def check_nm(n, m) -> tuple[int, int]:
    """Return ``(n, m)`` after checking ``1 <= n < m <= 16``."""
    n, m = check_int(n, "n"), check_int(m, "m")
    if not (2 <= m <= MAX_M):
        raise ValueError(f"m: expected 2 <= m <= {MAX_M}, got m={m}")
    if not (1 <= n < m):
        raise ValueError(f"n: expected 1 <= n < m <= {MAX_M}, got n={n}, m={m}")
    return n, m


def scores_of(w: torch.Tensor) -> torch.Tensor:
    """``|w|`` in the ranking dtype: fp64 stays fp64, everything else is ranked in fp32."""
    return w.abs().to(_rank_dtype(w))


def keep_top_rows(scores: torch.Tensor, k: int) -> torch.Tensor:
    """Bool mask of the ``k`` largest entries of every row of the 2-D ``scores``.

    A stable descending sort puts equal scores in index order, so ties go to the lower index
    on every device (topk makes no such promise).
    """
    keep = torch.zeros(scores.shape, dtype=torch.bool, device=scores.device)
    if k <= 0 or scores.numel() == 0:
        return keep
    idx = torch.sort(scores, dim=-1, descending=True, stable=True).indices[:, :k]
    return keep.scatter_(1, idx, True)
