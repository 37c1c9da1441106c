"""Magnitude pruning: per layer and global."""

from __future__ import annotations

from typing import Sequence

import torch

from ..patterns import check_sparsity


def _n_keep(numel: int, sparsity: float) -> int:
    return numel - int(round(sparsity * numel))


def magnitude(weight: torch.Tensor, sparsity: float) -> torch.Tensor:
    """Keep the largest-magnitude ``1 - sparsity`` fraction of ``weight``.

    Exactly ``numel - round(sparsity * numel)`` entries are kept; ties go to the lower index.

    Args:
        weight: any-shaped floating tensor.
        sparsity: fraction of zeros in [0, 1).

    Returns:
        bool mask with ``weight``'s shape.

    Raises:
        TypeError: ``weight`` is not a floating tensor.
        ValueError: ``sparsity`` outside [0, 1), or ``weight`` holds NaN.
    """
    if not isinstance(weight, torch.Tensor) or not weight.is_floating_point():
        raise TypeError(f"weight: expected a floating-point torch.Tensor, got {getattr(weight, 'dtype', type(weight))}")
    s = check_sparsity(sparsity)
    w = weight.detach()
    if torch.isnan(w).any():
        raise ValueError("weight: contains NaN; magnitudes cannot be ranked")
    k = _n_keep(w.numel(), s)
    mask = torch.zeros(w.numel(), dtype=torch.bool, device=w.device)
    if k > 0:
        idx = torch.topk(w.abs().flatten().float(), k, sorted=False).indices
        mask[idx] = True
    return mask.view(w.shape)


def global_magnitude(weights: Sequence[torch.Tensor], sparsity: float) -> list[torch.Tensor]:
    """One magnitude threshold across all ``weights``: the smallest ``sparsity`` fraction overall is pruned.

    Layers may end up with different sparsities; a layer is never left with no weights
    while it has any (its largest entry is kept).

    Args:
        weights: floating tensors (any shapes, same device).
        sparsity: global fraction of zeros in [0, 1).

    Returns:
        one bool mask per weight.
    """
    s = check_sparsity(sparsity)
    if len(weights) == 0:
        return []
    for i, w in enumerate(weights):
        if not isinstance(w, torch.Tensor) or not w.is_floating_point():
            raise TypeError(f"weights[{i}]: expected a floating-point torch.Tensor")
    flat = torch.cat([w.detach().abs().flatten().float() for w in weights])
    if torch.isnan(flat).any():
        raise ValueError("weights: contain NaN; magnitudes cannot be ranked")
    k = _n_keep(flat.numel(), s)
    keep = torch.zeros(flat.numel(), dtype=torch.bool, device=flat.device)
    if k > 0:
        keep[torch.topk(flat, k, sorted=False).indices] = True
    masks, start = [], 0
    for w in weights:
        m = keep[start : start + w.numel()].view(w.shape).clone()
        if w.numel() and not m.any():
            m.view(-1)[w.detach().abs().flatten().argmax()] = True
        masks.append(m)
        start += w.numel()
    return masks
