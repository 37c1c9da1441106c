"""Pure-torch block-sparse products: the oracle for tests and the fallback on devices without a kernel.

Letters follow stk, as in ``reference.csr``; the format is ``formats.bsr`` (``values [nblk, b, b]``
on a CSR index of the block grid):
- ``bsr_dds``: ``y [B, out] = x [B, in] @ Wᵀ (+ bias)``;
- ``bsr_dsd``: ``dx [B, in] = dy [B, out] @ W``, walking the transposed block index;
- ``bsr_sdd``: ``dvalues [nblk, b, b]``, ``dyᵀ @ x`` on the stored blocks only.

Each product gathers the activation blocks of a chunk of stored blocks and multiplies them
batched; no dense ``[out, in]`` matrix is formed. Padded rows and columns read as zero.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

# NOTE: 1M gathered elements per chunk keeps the temporaries near 4 MB in fp32.
_CHUNK_ELEMS = 1 << 20


def _acc(dtype):
    return torch.float64 if dtype == torch.float64 else torch.float32


def _blocks(a: torch.Tensor, nblk_dim: int, b: int, dtype) -> torch.Tensor:
    """``a [B, n]`` zero-padded to ``nblk_dim * b`` columns, as ``[B, nblk_dim, b]``."""
    B, n = a.shape
    return F.pad(a.to(dtype), (0, nblk_dim * b - n)).reshape(B, nblk_dim, b)


def _chunks(nblk: int, batch: int, b: int):
    step = max(1, _CHUNK_ELEMS // max(1, batch * b))
    for s in range(0, nblk, step):
        yield s, min(nblk, s + step)


def _row_of(ptr: torch.Tensor, n: int) -> torch.Tensor:
    counts = ptr.long()[1:] - ptr.long()[:-1]
    return torch.repeat_interleave(torch.arange(counts.numel(), device=ptr.device), counts, output_size=n)


def bsr_dds(x, values, crow, col, bias, out_features: int):
    """``y = x @ Wᵀ + bias``.

    Args:
        x: ``[B, in]``. values: ``[nblk, b, b]``. crow: ``[nbr+1]`` int32; col: ``[nblk]`` int32.
        bias: ``[out]`` or None. out_features: ``out``.

    Returns:
        ``[B, out]`` in ``x.dtype``.
    """
    acc = _acc(x.dtype)
    B, b, nbr = x.shape[0], values.shape[-1], crow.numel() - 1
    nbc = -(-x.shape[1] // b)
    xb = _blocks(x, nbc, b, acc)
    yb = torch.zeros(B, nbr, b, dtype=acc, device=x.device)
    row = _row_of(crow, values.shape[0])
    for s, e in _chunks(values.shape[0], B, b):
        part = torch.einsum("nkj,kij->nki", xb[:, col[s:e].long()], values[s:e].to(acc))
        yb.index_add_(1, row[s:e], part)
    y = yb.reshape(B, nbr * b)[:, :out_features]
    if bias is not None:
        y = y + bias.to(acc)
    return y.to(x.dtype).contiguous()  # (the slice is a strided view; the ops promise contiguous rows)


def bsr_dsd(dy, values, t_crow, t_row, t_perm, in_features: int):
    """``dx = dy @ W`` through the transposed block index.

    Args:
        dy: ``[B, out]``. values: ``[nblk, b, b]``. t_crow: ``[nbc+1]``; t_row, t_perm: ``[nblk]`` int32.
        in_features: ``in``.

    Returns:
        ``[B, in]`` in ``dy.dtype``.
    """
    acc = _acc(dy.dtype)
    B, b, nbc = dy.shape[0], values.shape[-1], t_crow.numel() - 1
    nbr = -(-dy.shape[1] // b)
    db = _blocks(dy, nbr, b, acc)
    xb = torch.zeros(B, nbc, b, dtype=acc, device=dy.device)
    t_col = _row_of(t_crow, values.shape[0])
    for s, e in _chunks(values.shape[0], B, b):
        part = torch.einsum("nki,kij->nkj", db[:, t_row[s:e].long()], values[t_perm[s:e].long()].to(acc))
        xb.index_add_(1, t_col[s:e], part)
    return xb.reshape(B, nbc * b)[:, :in_features].to(dy.dtype).contiguous()


def bsr_sdd(dy, x, row, col, block: int):
    """``dvalues[k] = dy[:, row[k]]ᵀ @ x[:, col[k]]`` on ``block``-wide blocks (padding 0).

    Args:
        dy: ``[B, out]``. x: ``[B, in]``. row, col: ``[nblk]`` int32 block coordinates. block: ``b``.

    Returns:
        ``[nblk, b, b]`` in ``x.dtype``.
    """
    acc = _acc(x.dtype)
    b, B = block, x.shape[0]
    db = _blocks(dy, -(-dy.shape[1] // b), b, acc)
    xb = _blocks(x, -(-x.shape[1] // b), b, acc)
    out = torch.empty(row.numel(), b, b, dtype=acc, device=x.device)
    for s, e in _chunks(row.numel(), B, b):
        out[s:e] = torch.einsum("nki,nkj->kij", db[:, row[s:e].long()], xb[:, col[s:e].long()])
    return out.to(x.dtype)
