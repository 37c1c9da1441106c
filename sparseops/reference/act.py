"""Pure-torch activation-sparse products: the oracle for tests and the fallback.

An activation-sparse linear layer computes ``y = s(x) @ Wᵀ + b`` where ``s`` zeroes the inputs
that are *inactive* right now. Every op here takes the sparsifier as ``(threshold, relu)``:

- ``v = relu(x)`` when ``relu`` is true, else ``v = x``;
- input ``j`` of a row is active when ``|v[j]| > threshold`` (``threshold`` is a 0-d tensor, one
  threshold for the tensor, or ``[in]``, one per input channel) and, with ``relu``, ``x[j] > 0``. A
  negative threshold makes every input active, exact zeros included (their gradient is not 0);
- ``s(x) = v`` where active, ``0`` elsewhere. Its derivative is the active mask itself (``s`` is
  ``x`` or ``relu(x)`` on the active set and constant elsewhere), so the input gradient is
  ``(dy @ W) ⊙ mask``: the activation's own derivative masks it.

The weight is passed as ``weight_t = Wᵀ [in, out]``: row ``j`` is the column of W that input ``j``
multiplies, contiguous, so a kernel that skips an inactive input skips one contiguous row.

- ``act_dds``: forward, ``y [B, out] = s(x) @ weight_t (+ bias)``;
- ``act_dsd``: input gradient on the active set, ``dx = (dy @ weight_tᵀ) ⊙ mask``;
- ``act_sdd``: weight gradient ``dweight_t [in, out] = s(x)ᵀ @ dy``; rows of inputs that no row of
  the batch activates are exactly zero.
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor


def _acc(dtype):
    return torch.float64 if dtype == torch.float64 else torch.float32


def act_mask(x: Tensor, threshold: Tensor, relu: bool) -> tuple[Tensor, Tensor]:
    """``(s(x), mask)`` for ``x [B, in]``: the sparsified input (in ``x.dtype``) and the bool active mask."""
    v = torch.relu(x) if relu else x
    # compared in the wider of the two dtypes, as the kernels compare (float32 for a bf16/fp16 x): the
    # threshold rounded to bf16 could round up past an input that is above it
    acc = torch.promote_types(v.dtype, threshold.dtype)
    mask = v.abs().to(acc) > threshold.to(acc)
    if relu:
        # relu(x) has derivative 0 where x <= 0, even when a negative threshold keeps everything
        mask = mask & (x > 0)
    return torch.where(mask, v, torch.zeros((), dtype=v.dtype, device=v.device)), mask


def act_dds(x: Tensor, weight_t: Tensor, bias: Optional[Tensor], threshold: Tensor, relu: bool) -> Tensor:
    acc = _acc(x.dtype)
    xs, _ = act_mask(x, threshold, relu)
    y = xs.to(acc) @ weight_t.to(acc)
    if bias is not None:
        y = y + bias.to(acc)
    return y.to(x.dtype)


def act_csr_dds(x: Tensor, t_crow: Tensor, t_col: Tensor, t_values: Tensor, bias: Optional[Tensor],
                threshold: Tensor, relu: bool, out_features: int) -> Tensor:
    """``s(x) @ M + bias`` with ``M = Wᵀ [in, out]`` given as CSR over the inputs: ``t_crow [in+1]``,
    ``t_col`` (the output of each stored weight) and ``t_values``."""
    acc = _acc(x.dtype)
    K = x.shape[1]
    rows = torch.repeat_interleave(torch.arange(K, device=x.device), (t_crow[1:] - t_crow[:-1]).long(),
                                   output_size=t_col.numel())
    m = torch.zeros(K, out_features, dtype=acc, device=x.device)
    m.index_put_((rows, t_col.long()), t_values.to(acc))
    xs, _ = act_mask(x, threshold, relu)
    y = xs.to(acc) @ m
    if bias is not None:
        y = y + bias.to(acc)
    return y.to(x.dtype)


def act_dsd(dy: Tensor, x: Tensor, weight_t: Tensor, threshold: Tensor, relu: bool) -> Tensor:
    acc = _acc(dy.dtype)
    _, mask = act_mask(x, threshold, relu)
    dx = (dy.to(acc) @ weight_t.to(acc).t()) * mask
    return dx.to(x.dtype)


def act_sdd(dy: Tensor, x: Tensor, threshold: Tensor, relu: bool) -> Tensor:
    acc = _acc(dy.dtype)
    xs, _ = act_mask(x, threshold, relu)
    return (xs.to(acc).t() @ dy.to(acc)).to(dy.dtype)


def union_density(x: Tensor, threshold: Tensor, relu: bool) -> float:
    """Fraction of the ``in`` inputs that at least one row of ``x [B, in]`` activates: the share of
    weight columns a multi-token (chunk-level) kernel must read."""
    _, mask = act_mask(x, threshold, relu)
    if mask.shape[-1] == 0:
        return 0.0
    return mask.reshape(-1, mask.shape[-1]).any(0).float().mean().item()
