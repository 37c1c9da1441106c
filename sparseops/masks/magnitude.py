"""Magnitude pruning: per layer and global."""

from __future__ import annotations

from typing import Sequence

import torch

from ..patterns import check_sparsity


def _n_keep(numel: int, sparsity: float) -> int:
    # the guard of every producer: a non-empty tensor keeps at least one weight (where round(sparsity *
    # numel) would prune it to nothing, e.g. 0.99 of 15 weights), so no layer's output is its bias alone
    return max(numel - int(round(sparsity * numel)), min(numel, 1))


def _rank_dtype(*weights: torch.Tensor) -> torch.dtype:
    # fp64 magnitudes are ranked in fp64: rounding them to fp32 would create ties that are not there
    return torch.float64 if any(w.dtype == torch.float64 for w in weights) else torch.float32


def _keep_largest(a: torch.Tensor, k: int) -> torch.Tensor:
    """Bool mask of the ``k`` largest entries of the 1-D ``a``; ties at the threshold go to the lower index.

    topk alone breaks ties in no particular order, so the entries equal to the k-th largest
    value are filled in by index.
    """
    keep = torch.zeros(a.numel(), dtype=torch.bool, device=a.device)
    if k <= 0:
        return keep
    if k >= a.numel():
        return keep.fill_(True)
    thr = torch.topk(a, k, sorted=False).values.min()
    keep = a > thr
    need = k - int(keep.sum())
    keep[(a == thr).nonzero().flatten()[:need]] = True
    return keep


def magnitude(weight: torch.Tensor, sparsity: float) -> torch.Tensor:
    """Keep the largest-magnitude ``1 - sparsity`` fraction of ``weight``.

    Exactly ``numel - round(sparsity * numel)`` entries are kept, and at least one (no layer is pruned
    to nothing); ties go to the lower index.

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
    if weight.device.type == "meta":
        raise ValueError("weight: expected a tensor with data, got one on the meta device (nothing to rank)")
    w = weight.detach()
    if torch.isnan(w).any():
        raise ValueError("weight: contains NaN; magnitudes cannot be ranked")
    k = _n_keep(w.numel(), s)
    return _keep_largest(w.abs().flatten().to(_rank_dtype(w)), k).view(w.shape)


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
    if isinstance(weights, torch.Tensor):
        raise TypeError("weights: expected a list of tensors (one per layer), got a single Tensor (iterating it "
                        "would rank each row as a layer)")
    try:
        weights = list(weights)  # a generator too (e.g. model.parameters())
    except TypeError:
        raise TypeError(f"weights: expected a list of tensors (one per layer), got {type(weights).__name__}") from None
    if len(weights) == 0:
        return []
    for i, w in enumerate(weights):
        if not isinstance(w, torch.Tensor) or not w.is_floating_point():
            raise TypeError(f"weights[{i}]: expected a floating-point torch.Tensor")
        if w.device.type == "meta":
            raise ValueError(f"weights[{i}]: expected a tensor with data, got one on the meta device (nothing to rank)")
    rank = _rank_dtype(*weights)
    flat = torch.cat([w.detach().abs().flatten().to(rank) for w in weights])
    if torch.isnan(flat).any():
        raise ValueError("weights: contain NaN; magnitudes cannot be ranked")
    k = _n_keep(flat.numel(), s)
    keep = _keep_largest(flat, k)
    masks, start = [], 0
    for w in weights:
        m = keep[start : start + w.numel()].view(w.shape).clone()
        if w.numel() and not m.any():
            m.view(-1)[w.detach().abs().flatten().argmax()] = True
        masks.append(m)
        start += w.numel()
    return masks
