"""Pure-torch CSR products: the oracle for tests and the fallback on devices without a kernel.

Letters follow stk (operand sparsity of output = lhs x rhs):
- ``dds``: ``y [B, out] = x [B, in] @ Wᵀ (+ bias)``, the forward;
- ``dsd``: ``dx [B, in] = dy [B, out] @ W``, the input gradient, walking the transposed index;
- ``sdd``: ``dvalues [nnz] = (dyᵀ @ x)`` sampled on the mask, the weight gradient.

Nothing here builds a dense ``[out, in]`` matrix: each product gathers the rows it needs
for a chunk of nonzeros, so memory stays ``O(B * chunk)``.
"""

from __future__ import annotations

import torch

# NOTE: 1M gathered elements per chunk keeps the temporaries near 4 MB in fp32.
_CHUNK_ELEMS = 1 << 20


def _chunks(nnz: int, batch: int):
    step = max(1, _CHUNK_ELEMS // max(1, batch))
    for s in range(0, nnz, step):
        yield s, min(nnz, s + step)


def csr_dds(x, values, crow, col, bias, out_features: int):
    """``y = x @ Wᵀ + bias`` with ``W`` given by ``(values, crow, col)``.

    Args:
        x: ``[B, in]``.
        values: ``[nnz]``.
        crow: ``[out+1]`` int32; col: ``[nnz]`` int32.
        bias: ``[out]`` or None.
        out_features: ``out``.

    Returns:
        ``[B, out]`` in ``x.dtype``.
    """
    acc = torch.float64 if x.dtype == torch.float64 else torch.float32
    B = x.shape[0]
    rows = torch.repeat_interleave(
        torch.arange(out_features, device=x.device), (crow[1:] - crow[:-1]).long(), output_size=col.numel()
    )
    y = torch.zeros(B, out_features, dtype=acc, device=x.device)
    xa, va, c = x.to(acc), values.to(acc), col.long()
    for s, e in _chunks(col.numel(), B):
        y.index_add_(1, rows[s:e], xa[:, c[s:e]] * va[s:e])
    if bias is not None:
        y += bias.to(acc)
    return y.to(x.dtype)


def csr_dsd(dy, values, t_crow, t_row, t_perm, in_features: int):
    """``dx = dy @ W`` through the transposed index.

    Args:
        dy: ``[B, out]``.
        values: ``[nnz]`` in row-major order; ``t_perm`` maps transposed entries to it.
        t_crow: ``[in+1]``; t_row: ``[nnz]``; t_perm: ``[nnz]`` (all int32).
        in_features: ``in``.

    Returns:
        ``[B, in]`` in ``dy.dtype``.
    """
    acc = torch.float64 if dy.dtype == torch.float64 else torch.float32
    B = dy.shape[0]
    cols = torch.repeat_interleave(
        torch.arange(in_features, device=dy.device), (t_crow[1:] - t_crow[:-1]).long(), output_size=t_row.numel()
    )
    dx = torch.zeros(B, in_features, dtype=acc, device=dy.device)
    da, vt, r = dy.to(acc), values.to(acc)[t_perm.long()], t_row.long()
    for s, e in _chunks(t_row.numel(), B):
        dx.index_add_(1, cols[s:e], da[:, r[s:e]] * vt[s:e])
    return dx.to(dy.dtype)


def csr_sdd(dy, x, row, col):
    """Weight gradient on the mask: ``dvalues[k] = sum_b dy[b, row[k]] * x[b, col[k]]``.

    Args:
        dy: ``[B, out]``; x: ``[B, in]``.
        row, col: ``[nnz]`` int32 coordinates of the stored weights.

    Returns:
        ``[nnz]`` in ``x.dtype``.
    """
    acc = torch.float64 if x.dtype == torch.float64 else torch.float32
    B = x.shape[0]
    out = torch.empty(col.numel(), dtype=acc, device=x.device)
    da, xa, r, c = dy.to(acc), x.to(acc), row.long(), col.long()
    for s, e in _chunks(col.numel(), B):
        out[s:e] = (da[:, r[s:e]] * xa[:, c[s:e]]).sum(0)
    return out.to(x.dtype)
