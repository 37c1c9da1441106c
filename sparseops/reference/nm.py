"""Pure-torch N:M products: the oracle for tests and the fallback (see ``formats.nm`` for the layout).

Each walks every slot, empty ones included, as the kernels do: it expands the slots into
COO coordinates and reuses the CSR products over ``x`` zero padded to ``G * m`` columns.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ..formats.nm import _columns, slots_per_row
from .csr import csr_dds, csr_dsd, csr_sdd


def _coo(idx, rows: int, K: int, n: int, m: int):
    S = slots_per_row(K, n, m)
    cols = _columns(idx, S, n, m).reshape(-1)
    crow = torch.arange(rows + 1, device=idx.device, dtype=torch.int64) * S
    return crow, cols, S, -(-K // m) * m


def nm_dds(x, values, idx, bias, n: int, m: int):
    """``y [B, out] = x [B, in] @ Wᵀ (+ bias)``; ``values [out, S]``, ``idx [out, ceil(S/2)]``."""
    rows = values.shape[0]
    crow, cols, _, Kp = _coo(idx, rows, x.shape[1], n, m)
    xp = F.pad(x, (0, Kp - x.shape[1]))
    return csr_dds(xp, values.reshape(-1), crow, cols, bias, rows)


def nm_sdd(dy, x, idx, n: int, m: int):
    """``dvalues [out, S]``: ``sum_b dy[b, o] * x[b, col(o, j)]`` on every slot (0 past ``in``)."""
    rows = dy.shape[1]
    crow, cols, S, Kp = _coo(idx, rows, x.shape[1], n, m)
    xp = F.pad(x, (0, Kp - x.shape[1]))
    r = torch.arange(rows, device=x.device).repeat_interleave(S)
    return csr_sdd(dy, xp, r, cols).view(rows, S)


def nm_dsd(dy, values, t_idx, t_slot, n: int, m: int):
    """``dx [B, in] = dy [B, out] @ W`` through ``Wᵀ``'s N:M index (transposable weights)."""
    flat = values.reshape(-1)
    s = t_slot.long()
    tv = torch.where(s >= 0, flat[s.clamp(min=0)], torch.zeros((), dtype=flat.dtype, device=flat.device))
    return nm_dds(dy, tv, t_idx, None, n, m)


def nm_dsd_csr(dy, values, t_crow, t_row, t_perm, in_features: int):
    """``dx [B, in] = dy [B, out] @ W`` through the CSR of ``Wᵀ`` (any N:M weight)."""
    return csr_dsd(dy, values.reshape(-1), t_crow, t_row, t_perm, in_features)
