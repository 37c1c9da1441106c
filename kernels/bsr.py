"""Triton kernels for block-sparse (BSR) weights, and their launchers.

The format: a weight ``W [out, in]`` with square blocks of ``b`` (8, 16, 32 or 64) is
padded to ``[ceil(out / b) * b, ceil(in / b) * b]`` and cut into ``nbr x nbc`` blocks, of
which ``nblk`` are stored. ``values [nblk, b, b]`` holds them, block ``k``'s entry
``[i, j]`` being ``W[brow[k] * b + i, bcol[k] * b + j]``; ``crow [nbr + 1]``,
``bcol [nblk]`` and ``brow [nblk]`` (int32) index them by block row, and
``t_crow [nbc + 1]``, ``t_row [nblk]``, ``t_perm [nblk]`` by block column (the block rows
of a block column's blocks, ascending, and their positions in ``values``). Entries at
rows ``>= out`` or columns ``>= in`` are padding: ``x`` and ``dy`` have no such columns, so
the kernels mask them, and they mask the padding of ``values`` along the contracted dim as
well, so a product never reads it.

- ``dds``: ``y [B, out] = x [B, in] @ Wᵀ (+ bias)``. One program per (block row ``r``,
  ``BB`` batch rows). It walks the blocks of ``r`` and, for each, ``tl.dot``s the
  ``[BB, b]`` tile of ``x`` at the block's columns with the transposed ``[b, b]`` block
  into a ``[BB, b]`` fp32 accumulator.
- ``dsd``: ``dx [B, in] = dy [B, out] @ W``. The same walk down the block column ``c``
  through the transposed index: ``dx[:, c*b:] += dy[:, t_row*b:] @ values[t_perm]``, the
  block used as stored (its transpose's transpose), so nothing is transposed in memory.
- ``sdd``: the weight gradient on the stored blocks only,
  ``dv[k] = dy[:, brow[k]*b:+b]ᵀ @ x[:, bcol[k]*b:+b]``. One program per block, looping
  over the batch in chunks of ``BB``; a padded row or column of the block reads zeros and
  gets exactly 0. No dense ``[out, in]`` gradient is ever formed.

``tl.dot`` needs every dim >= 16, so for ``b = 8`` the tiles are ``16`` wide (``BP``) with
the second half masked to zero: half the tensor-core work is wasted, but ``b = 8`` is the
one size where that is the price of using them at all.

Precision: fp32 operands go through ``tl.dot`` with ``input_precision="ieee"`` (no TF32),
bf16 and fp16 operands use the tensor cores in their own dtype. Either way the sum
accumulates in fp32 and the output is rounded once to the input dtype. The interpreter's
``tl.dot`` gets bf16 wrong, so there bf16 tiles are upcast to fp32 before the dot.

Every output element is owned by exactly one program and stored once: no atomics, no
zero-fill (a block row or column without blocks stores the bias or 0), and autotuning may
rerun a kernel freely. Addresses are computed in int64.

The launchers only use torch ops and ``torch.library.wrap_triton`` launches, so each can be
the body of a ``torch.library.triton_op``. They check shapes, dtypes and devices but not
index values: an out-of-range ``bcol``/``t_row``/``t_perm`` reads out of bounds.
"""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

from .csr import _bucket, _tune, _features, _float, _index, _out, _same_device, _on_device

BLOCK_SIZES = (8, 16, 32, 64)
_INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"

# the interpreter cannot benchmark several configs, and its cost grows with the number of
# programs; BB stays small enough that a test batch of 37 runs several chunks with a tail
if _INTERPRET:
    _ROW_CONFIGS = [triton.Config({"BB": 32}, num_warps=4)]
    _SDD_CONFIGS = [triton.Config({"BB": 16}, num_warps=4)]
else:
    _ROW_CONFIGS = [
        triton.Config({"BB": 16}, num_warps=4),
        triton.Config({"BB": 32}, num_warps=4),
        triton.Config({"BB": 64}, num_warps=4),
        triton.Config({"BB": 64}, num_warps=8),
        triton.Config({"BB": 128}, num_warps=4),
        triton.Config({"BB": 128}, num_warps=8),
    ]
    _SDD_CONFIGS = [
        triton.Config({"BB": 16}, num_warps=4),
        triton.Config({"BB": 32}, num_warps=4),
        triton.Config({"BB": 64}, num_warps=4),
        triton.Config({"BB": 64}, num_warps=8),
        triton.Config({"BB": 128}, num_warps=8),
    ]

# the sizes are power-of-two buckets, so a new batch size does not retune every step; the
# block size is constexpr (a separate compile each) and keys its own tuning
_ROW_KEYS = ["B_BUCKET", "ROWS_BUCKET", "PER_ROW_BUCKET", "BLOCK"]
_SDD_KEYS = ["B_BUCKET", "NBLK_BUCKET", "BLOCK"]


# --------------------------------------------------------------------------- kernels


@triton.jit
def _bsr_row_kernel(
    a_ptr,  # [B, n_k] dense operand: x (dds) or dy (dsd)
    values_ptr,  # [nblk, BLOCK, BLOCK], contiguous
    ptr_ptr,  # [n_rows + 1] crow (dds) or t_crow (dsd)
    idx_ptr,  # [nblk] bcol (dds) or t_row (dsd)
    perm_ptr,  # [nblk] t_perm, read only when TRANSPOSED
    bias_ptr,  # [n_out], read only when HAS_BIAS
    out_ptr,  # [B, n_out]
    B,
    n_rows,  # block rows of the output: nbr (dds) or nbc (dsd)
    n_k,  # columns of the dense operand: in (dds) or out (dsd)
    n_out,  # columns of the output: out (dds) or in (dsd)
    stride_ab,
    stride_ak,
    stride_ob,
    stride_on,
    B_BUCKET,  # autotune key only
    ROWS_BUCKET,  # autotune key only
    PER_ROW_BUCKET,  # autotune key only
    BLOCK: tl.constexpr,
    BP: tl.constexpr,  # max(BLOCK, 16): the tile width tl.dot accepts
    TRANSPOSED: tl.constexpr,  # dsd: blocks through t_perm, used as stored
    HAS_BIAS: tl.constexpr,
    UPCAST: tl.constexpr,  # bf16 under the interpreter: dot in fp32
    IEEE: tl.constexpr,  # fp32 operands: no TF32
    BB: tl.constexpr,
):
    pid = tl.program_id(0)
    # block rows vary fastest, so programs running together share one tile of the dense
    # operand in L2 and write neighbouring output columns
    r = pid % n_rows
    bblk = pid // n_rows
    offs_b = bblk.to(tl.int64) * BB + tl.arange(0, BB)  # [BB]
    offs_p = tl.arange(0, BP).to(tl.int64)  # [BP]
    mask_b = offs_b < B
    in_block = offs_p < BLOCK  # [BP] only the first 8 of 16 when BLOCK == 8
    a_rows = a_ptr + offs_b[:, None] * stride_ab  # [BB, 1]
    # the block's [BP, BP] offsets: row-major [i, j] as stored
    blk_offs = offs_p[:, None] * BLOCK + offs_p[None, :]  # [BP, BP]
    blk_mask = in_block[:, None] & in_block[None, :]  # [BP, BP]

    start = tl.load(ptr_ptr + r).to(tl.int64)
    end = tl.load(ptr_ptr + r + 1).to(tl.int64)
    acc = tl.zeros([BB, BP], dtype=tl.float32)
    for j in range(start, end):
        # the contracted dim: the block's columns (dds) or rows (dsd)
        k0 = tl.load(idx_ptr + j).to(tl.int64) * BLOCK
        offs_k = k0 + offs_p  # [BP]
        mask_k = in_block & (offs_k < n_k)
        a = tl.load(a_rows + offs_k[None, :] * stride_ak, mask=mask_b[:, None] & mask_k[None, :], other=0.0)
        if TRANSPOSED:
            blk = tl.load(perm_ptr + j).to(tl.int64)
            # [i, j] = [contracted, output]: padding rows masked
            w = tl.load(values_ptr + blk * BLOCK * BLOCK + blk_offs, mask=blk_mask & mask_k[:, None], other=0.0)
        else:
            # [i, j] = [output, contracted]: padding columns masked, then transposed
            w = tl.load(values_ptr + j * BLOCK * BLOCK + blk_offs, mask=blk_mask & mask_k[None, :], other=0.0)
            w = tl.trans(w)
        if UPCAST:
            a = a.to(tl.float32)
            w = w.to(tl.float32)
        if IEEE:
            acc = tl.dot(a, w, acc, input_precision="ieee")
        else:
            acc = tl.dot(a, w, acc)

    offs_n = r.to(tl.int64) * BLOCK + offs_p  # [BP]
    mask_n = in_block & (offs_n < n_out)
    if HAS_BIAS:
        acc += tl.load(bias_ptr + offs_n, mask=mask_n, other=0.0).to(tl.float32)[None, :]
    out = out_ptr + offs_b[:, None] * stride_ob + offs_n[None, :] * stride_on  # [BB, BP]
    tl.store(out, acc.to(out_ptr.dtype.element_ty), mask=mask_b[:, None] & mask_n[None, :])


# two tuners over one body: dds and dsd keep separate tuning caches
_bsr_dds_kernel = triton.autotune(configs=_tune(_ROW_CONFIGS), key=_ROW_KEYS)(_bsr_row_kernel)
_bsr_dsd_kernel = triton.autotune(configs=_tune(_ROW_CONFIGS), key=_ROW_KEYS)(_bsr_row_kernel)


@triton.autotune(configs=_tune(_SDD_CONFIGS), key=_SDD_KEYS)
@triton.jit
def _bsr_sdd_kernel(
    dy_ptr,  # [B, out]
    x_ptr,  # [B, in]
    brow_ptr,  # [nblk]
    bcol_ptr,  # [nblk]
    out_ptr,  # [nblk, BLOCK, BLOCK]
    B,
    n_out,
    n_in,
    stride_dyb,
    stride_dyn,
    stride_xb,
    stride_xk,
    stride_ok,
    stride_oi,
    stride_oj,
    B_BUCKET,  # autotune key only
    NBLK_BUCKET,  # autotune key only
    BLOCK: tl.constexpr,
    BP: tl.constexpr,  # max(BLOCK, 16): the tile width tl.dot accepts
    UPCAST: tl.constexpr,  # bf16 under the interpreter: dot in fp32
    IEEE: tl.constexpr,  # fp32 operands: no TF32
    BB: tl.constexpr,
):
    k = tl.program_id(0).to(tl.int64)
    offs_p = tl.arange(0, BP).to(tl.int64)  # [BP]
    in_block = offs_p < BLOCK
    offs_i = tl.load(brow_ptr + k).to(tl.int64) * BLOCK + offs_p  # [BP] rows of W: columns of dy
    offs_j = tl.load(bcol_ptr + k).to(tl.int64) * BLOCK + offs_p  # [BP] columns of W and x
    # padded rows and columns read zeros, so their gradient is exactly 0
    mask_i = in_block & (offs_i < n_out)
    mask_j = in_block & (offs_j < n_in)
    dy_cols = dy_ptr + offs_i[None, :] * stride_dyn  # [1, BP]
    x_cols = x_ptr + offs_j[None, :] * stride_xk  # [1, BP]

    acc = tl.zeros([BP, BP], dtype=tl.float32)
    for b0 in range(0, B, BB):
        # int64 before the add, so b0 + BB cannot wrap
        offs_b = tl.arange(0, BB).to(tl.int64) + b0  # [BB]
        mask_b = offs_b < B
        g = tl.load(dy_cols + offs_b[:, None] * stride_dyb, mask=mask_b[:, None] & mask_i[None, :], other=0.0)
        a = tl.load(x_cols + offs_b[:, None] * stride_xb, mask=mask_b[:, None] & mask_j[None, :], other=0.0)
        if UPCAST:
            g = g.to(tl.float32)
            a = a.to(tl.float32)
        if IEEE:
            acc = tl.dot(tl.trans(g), a, acc, input_precision="ieee")
        else:
            acc = tl.dot(tl.trans(g), a, acc)

    out = out_ptr + k * stride_ok + offs_p[:, None] * stride_oi + offs_p[None, :] * stride_oj  # [BP, BP]
    tl.store(out, acc.to(out_ptr.dtype.element_ty), mask=in_block[:, None] & in_block[None, :])


# --------------------------------------------------------------------------- checks


def _block(b) -> int:
    if isinstance(b, bool) or not isinstance(b, int):
        raise TypeError(f"block: expected an int in {BLOCK_SIZES}, got {type(b).__name__}")
    if b not in BLOCK_SIZES:
        raise ValueError(f"block: expected one of {BLOCK_SIZES}, got {b}")
    return b


def _values(t, dtype: torch.dtype) -> tuple[torch.Tensor, int]:
    """``values`` and its block size ``b``, after checking ``[nblk, b, b]`` with ``b`` allowed."""
    t = _float("values", t, 3, dtype)
    b = t.shape[1]
    if b not in BLOCK_SIZES or t.shape[2] != b:
        raise ValueError(f"values: expected shape [nblk, b, b] with b in {BLOCK_SIZES}, got {tuple(t.shape)}")
    return t, b


def _flags(a: torch.Tensor, b: int) -> dict:
    return {
        "BLOCK": b,
        "BP": max(b, 16),
        "UPCAST": _INTERPRET and a.dtype == torch.bfloat16,
        "IEEE": a.dtype == torch.float32,
    }


# --------------------------------------------------------------------------- launchers


def _launch_rows(kernel, a, values, ptr, idx, perm, bias, out, n_rows: int, b: int) -> None:
    B = a.shape[0]
    n_out = out.shape[1]
    if B == 0 or n_out == 0:
        return
    # n_rows >= 1 here; a block row (or column) without blocks still stores the bias or 0

    def grid(meta):
        return (n_rows * triton.cdiv(B, meta["BB"]),)

    torch.library.wrap_triton(kernel)[grid](
        a,
        values,
        ptr,
        idx,
        perm,
        bias,
        out,
        B,
        n_rows,
        a.shape[1],
        n_out,
        a.stride(0),
        a.stride(1),
        out.stride(0),
        out.stride(1),
        _bucket(B),
        _bucket(n_rows),
        _bucket(triton.cdiv(idx.numel(), n_rows)),
        TRANSPOSED=perm is not None,
        HAS_BIAS=bias is not None,
        **_flags(a, b),
    )


@_on_device
def bsr_dds(x, values, crow, bcol, bias, out_features, out=None):
    """``y = x @ Wᵀ + bias`` with the block-sparse ``W [out, in]`` given by ``(values, crow, bcol)``.

    Args:
        x: ``[B, in]`` float32, bfloat16 or float16 (any strides).
        values: ``[nblk, b, b]`` in the dtype of ``x``, ``b`` in 8, 16, 32, 64.
        crow: ``[ceil(out / b) + 1]`` int32 block-row pointers.
        bcol: ``[nblk]`` int32 block column of each block (a valid index).
        bias: ``[out]`` in the dtype of ``x``, or None.
        out_features: ``out``.
        out: optional ``[B, out]`` buffer in the dtype of ``x``; every element is written.

    Returns:
        ``[B, out]`` in ``x.dtype`` (``out`` when given).

    Raises:
        TypeError: a wrong type or dtype.
        ValueError: a wrong shape, block size or device.
    """
    x = _float("x", x, 2)
    _features("out_features", out_features)
    values, b = _values(values, x.dtype)
    nbr = triton.cdiv(out_features, b)
    crow = _index("crow", crow, nbr + 1)
    bcol = _index("bcol", bcol, values.shape[0])
    if bias is not None:
        bias = _float("bias", bias, 1, x.dtype)
        if bias.numel() != out_features:
            raise ValueError(f"bias: expected {out_features} entries, got {bias.numel()}")
    _same_device(x, values=values, crow=crow, bcol=bcol, bias=bias)
    out = _out(out, (x.shape[0], out_features), x)
    values, crow, bcol = values.contiguous(), crow.contiguous(), bcol.contiguous()
    bias = bias.contiguous() if bias is not None else None
    _launch_rows(_bsr_dds_kernel, x, values, crow, bcol, None, bias, out, nbr, b)
    return out


@_on_device
def bsr_dsd(dy, values, t_crow, t_row, t_perm, in_features, out=None):
    """``dx = dy @ W`` through the transposed block index.

    Args:
        dy: ``[B, out]`` float32, bfloat16 or float16 (any strides).
        values: ``[nblk, b, b]`` in block-row order, dtype of ``dy``, ``b`` in 8, 16, 32, 64.
        t_crow: ``[ceil(in / b) + 1]`` int32 block-column pointers.
        t_row: ``[nblk]`` int32 block row of each block of a block column (ascending).
        t_perm: ``[nblk]`` int32 position of that block in ``values``.
        in_features: ``in``.
        out: optional ``[B, in]`` buffer in the dtype of ``dy``; every element is written.

    Returns:
        ``[B, in]`` in ``dy.dtype`` (``out`` when given).

    Raises:
        TypeError: a wrong type or dtype.
        ValueError: a wrong shape, block size or device.
    """
    dy = _float("dy", dy, 2)
    _features("in_features", in_features)
    values, b = _values(values, dy.dtype)
    nbc = triton.cdiv(in_features, b)
    t_crow = _index("t_crow", t_crow, nbc + 1)
    t_row = _index("t_row", t_row, values.shape[0])
    t_perm = _index("t_perm", t_perm, values.shape[0])
    _same_device(dy, values=values, t_crow=t_crow, t_row=t_row, t_perm=t_perm)
    out = _out(out, (dy.shape[0], in_features), dy)
    values = values.contiguous()
    t_crow, t_row, t_perm = t_crow.contiguous(), t_row.contiguous(), t_perm.contiguous()
    _launch_rows(_bsr_dsd_kernel, dy, values, t_crow, t_row, t_perm, None, out, nbc, b)
    return out


@_on_device
def bsr_sdd(dy, x, brow, bcol, block, out=None):
    """Weight gradient on the stored blocks: ``dv[k] = dy[:, brow[k]*b:+b]ᵀ @ x[:, bcol[k]*b:+b]``.

    A padded row (``>= out``) or column (``>= in``) of a block gets exactly 0. No dense
    ``[out, in]`` gradient is formed.

    Args:
        dy: ``[B, out]``; x: ``[B, in]``; float32, bfloat16 or float16, same dtype, any strides.
        brow, bcol: ``[nblk]`` int32 block row and block column of each stored block.
        block: the block size ``b``, one of 8, 16, 32, 64.
        out: optional ``[nblk, b, b]`` buffer in the dtype of ``x``; every element is written.

    Returns:
        ``[nblk, b, b]`` in ``x.dtype`` (``out`` when given).

    Raises:
        TypeError: a wrong type or dtype.
        ValueError: a wrong shape, block size or device.
    """
    x = _float("x", x, 2)
    dy = _float("dy", dy, 2, x.dtype)
    if dy.shape[0] != x.shape[0]:
        raise ValueError(f"dy: expected {x.shape[0]} rows (the batch of x), got {dy.shape[0]}")
    b = _block(block)
    bcol = _index("bcol", bcol, None)
    brow = _index("brow", brow, bcol.numel())
    _same_device(x, dy=dy, brow=brow, bcol=bcol)
    nblk = bcol.numel()
    out = _out(out, (nblk, b, b), x)
    if nblk == 0:
        return out
    # B == 0 still launches: the loop is empty and every block gets 0
    brow, bcol = brow.contiguous(), bcol.contiguous()

    torch.library.wrap_triton(_bsr_sdd_kernel)[(nblk,)](
        dy,
        x,
        brow,
        bcol,
        out,
        x.shape[0],
        dy.shape[1],
        x.shape[1],
        dy.stride(0),
        dy.stride(1),
        x.stride(0),
        x.stride(1),
        out.stride(0),
        out.stride(1),
        out.stride(2),
        _bucket(x.shape[0]),
        _bucket(nblk),
        **_flags(x, b),
    )
    return out
