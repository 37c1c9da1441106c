"""Wanda pruning (Sun et al., 2023): |W| scaled by input activation norms, compared within each output row."""

from __future__ import annotations

import math

import torch

from ..patterns import check_sparsity
from ._checks import check_weight, keep_top_rows
from .magnitude import _n_keep, _rank_dtype


def activation_norms(samples: torch.Tensor) -> torch.Tensor:
    """Per-input-feature L2 norm over all samples: ``||X_j||_2``.

    Low-precision inputs are accumulated in fp32 so that the sum of squares cannot overflow.

    Args:
        samples: floating tensor ``[*, in]`` (e.g. ``[N, in]`` or ``[B, T, in]``).

    Returns:
        ``[in]`` norms, fp64 for fp64 input and fp32 otherwise.

    Raises:
        TypeError: ``samples`` is not a floating tensor.
        ValueError: ``samples`` is 0-dim or holds NaN.
    """
    x = check_weight(samples, "samples")
    # (not reshape(-1, in): with no features, -1 is ambiguous)
    x = x.to(_rank_dtype(x)).reshape(math.prod(x.shape[:-1]), x.shape[-1])
    return x.square().sum(0).sqrt()


def wanda(weight: torch.Tensor, activation_norm: torch.Tensor, sparsity: float) -> torch.Tensor:
    """Keep, in every output row, the largest ``|W_ij| * ||X_j||_2``; ties go to the lower index.

    Each row keeps exactly ``in - round(sparsity * in)`` entries (at least one): the Wanda paper compares scores
    within an output row, not across the layer.

    Args:
        weight: floating tensor ``[out, in]``.
        activation_norm: ``[in]`` non-negative input norms (see ``activation_norms``).
        sparsity: fraction of zeros per row in [0, 1).

    Returns:
        bool mask ``[out, in]``.

    Raises:
        TypeError: ``weight`` or ``activation_norm`` is not a floating tensor.
        ValueError: ``weight`` not 2-D, ``activation_norm`` not ``[in]``, negative or NaN,
            ``sparsity`` outside [0, 1), NaN or inf in ``weight`` or ``activation_norm``.
    """
    w = check_weight(weight, min_dim=2)
    if w.dim() != 2:
        raise ValueError(f"weight: expected [out, in], got shape {tuple(w.shape)}")
    a = check_weight(activation_norm, "activation_norm")
    if a.shape != (w.shape[1],):
        raise ValueError(f"activation_norm: expected shape [in]=[{w.shape[1]}], got {tuple(a.shape)}")
    if (a < 0).any():
        raise ValueError("activation_norm: expected non-negative norms")
    if not bool(torch.isfinite(w).all()) or not bool(torch.isfinite(a).all()):
        # inf * 0 scores NaN, which would rank above every real score
        raise ValueError("weight, activation_norm: expected finite values (an inf scores NaN against a zero)")
    if a.device != w.device:
        raise ValueError(f"activation_norm: expected device {w.device}, got {a.device}")
    s = check_sparsity(sparsity)
    rank = _rank_dtype(w, a)
    score = w.abs().to(rank) * a.to(rank)  # [out, in]
    return keep_top_rows(score, _n_keep(w.shape[1], s))
