"""Pure-torch Monarch products: the oracle for tests (see ``nn.monarch`` for the math).

``monarch_forward`` follows the definition step by step with einsum and reshapes;
``monarch_dense`` builds the same matrix another way, as ``P2 · blockdiag(R) · P1 ·
blockdiag(L)`` with the two permutations written out as index arithmetic, so that the
two can check each other. Both are dtype generic.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor


def _factor_sizes(blkdiag1: Tensor, blkdiag2: Tensor) -> tuple[int, int, int, int]:
    """``(k, p, q, m)`` from ``blkdiag1 [k, m, p]`` and ``blkdiag2 [k, q, m]``."""
    if blkdiag1.dim() != 3 or blkdiag2.dim() != 3:
        raise ValueError(
            f"blkdiag1, blkdiag2: expected 3-d [k, m, p] and [k, q, m], got {tuple(blkdiag1.shape)} and "
            f"{tuple(blkdiag2.shape)}"
        )
    k, m, p = blkdiag1.shape
    k2, q, m2 = blkdiag2.shape
    if k2 != k or m2 != m:
        raise ValueError(
            f"blkdiag2: expected shape [{k}, q, {m}] to match blkdiag1 [k, m, p] = {tuple(blkdiag1.shape)}, "
            f"got {tuple(blkdiag2.shape)}"
        )
    return k, p, q, m


def monarch_forward(x: Tensor, blkdiag1: Tensor, blkdiag2: Tensor, bias: Tensor | None, out_features: int) -> Tensor:
    """``y = x Wᵀ + b`` for the Monarch weight ``W`` of the two factors, by the definition.

    Args:
        x: ``[*, in]`` with ``in <= k * p`` (zero padded to ``k * p``).
        blkdiag1: ``[k, m, p]``, the first block-diagonal factor L.
        blkdiag2: ``[k, q, m]``, the second block-diagonal factor R.
        bias: ``[out]`` or None.
        out_features: ``out <= k * q`` (the padded output is sliced to it).

    Returns:
        ``[*, out]``.
    """
    k, p, q, m = _factor_sizes(blkdiag1, blkdiag2)
    lead = x.shape[:-1]
    xp = F.pad(x, (0, k * p - x.shape[-1]))  # [*, k*p]
    h = torch.einsum("...ip,imp->...im", xp.reshape(*lead, k, p), blkdiag1)  # [*, k, m]
    # P1: the flat (i, a) axis of length k*m read as (r, l) and transposed
    z = h.reshape(*lead, m, k).transpose(-1, -2)  # [*, k, m]
    u = torch.einsum("...lr,lsr->...ls", z, blkdiag2)  # [*, k, q]
    # P2: output feature s*k + l
    y = u.transpose(-1, -2).reshape(*lead, q * k)[..., :out_features]  # [*, out]
    return y if bias is None else y + bias


def monarch_dense(blkdiag1: Tensor, blkdiag2: Tensor, in_features: int, out_features: int) -> Tensor:
    """The dense ``W [out, in]`` of the two factors (differentiable in both).

    Built as ``(P2 · blockdiag(R) · P1 · blockdiag(L))[:out, :in]`` with explicit permutations:
    ``P1`` sends the middle entry ``i*m + a`` (block ``i`` of L's output) to ``l*m + r`` where
    ``i*m + a = r*k + l``, and ``P2`` sends ``l*q + s`` (block ``l`` of R's output) to ``s*k + l``.
    """
    k, p, q, m = _factor_sizes(blkdiag1, blkdiag2)
    dev = blkdiag1.device
    lbd = torch.block_diag(*blkdiag1.unbind(0))  # [k*m, k*p]
    rbd = torch.block_diag(*blkdiag2.unbind(0))  # [k*q, k*m]
    # row l*m + r of P1 picks middle entry r*k + l
    lr = torch.arange(k * m, device=dev)
    l_, r_ = lr // m, lr % m
    p1_src = r_ * k + l_  # [k*m]
    # row s*k + l of W picks row l*q + s of rbd
    sl = torch.arange(k * q, device=dev)
    s_, l2 = sl // k, sl % k
    p2_src = l2 * q + s_  # [k*q]
    w = rbd[p2_src] @ lbd[p1_src]  # [k*q, k*p]
    return w[:out_features, :in_features]
