"""Triton kernels for N:M compressed weights, and their launchers.

The format: a weight ``W [out, in]`` with at most ``n`` nonzeros in each group of ``m``
consecutive entries of a row (``1 <= n < m <= 16``) has ``G = ceil(in / m)`` groups and
``S = G * n`` slots per row. ``values [out, S]`` holds the slots' values and ``idx`` (uint8
``[out, ceil(S / 2)]``) their 4-bit in-group positions, two a byte, slot ``j`` in the nibble
``(idx[o, j // 2] >> (4 * (j % 2))) & 15``. Slot ``j`` of row ``o`` sits at column
``(j // n) * m + pos``; a column ``>= in`` (only in the last, partial group) holds 0, and the
kernels mask it: ``x`` is never read there.

- ``dds``: ``y [B, out] = x [B, in] @ Wᵀ (+ bias)``. One program per ``[BB, BO]`` output
  tile. It walks the input dim in ``BK``-column tiles (``BK`` is a power of two, so a group
  of a non-power-of-two ``m`` may straddle two tiles: each column finds its own group).
  For every column of the tile it reads the ``n`` slots of that column's group straight
  from the compressed ``values``/``idx`` (the weight stays compressed in memory; a group's
  slots are shared by its ``m`` columns, so they come from L1) and keeps the value whose
  position matches, building a dense ``[BK, BO]`` tile of ``Wᵀ`` in registers, zeros
  elsewhere. A ``tl.dot`` of the ``[BB, BK]`` tile of ``x`` with it accumulates into fp32.
- ``gemv``: ``dds`` at decode (``B <= 4`` rows of ``x``). The tile above is a 16-row dot
  whose ``W`` tile is rebuilt from gathers of each slot, once per column of its group; at a
  few rows that rebuild, not the weight stream, is the cost (2:4, 4096→11008, bf16, one row:
  0.18 ms on an H100 against 0.047 ms for dense). The gemv kernel streams ``RB`` rows of
  slots contiguously (each value and position read once) and gathers the rows of ``x``
  (small, cached) at the slots' columns, a multiply and sum in fp32 like the CSR kernel's.
- ``sdd``: the weight gradient on the stored slots only,
  ``dv[o, j] = sum_b dy[b, o] * x[b, col(o, j)]`` (0 when the column is ``>= in``). One
  program per ``[BO, BS]`` tile of slots: it decodes the slots' columns once, then loops
  over the batch in chunks of ``BB``, loading a ``[BB, BO]`` tile of ``dy`` and gathering a
  ``[BB, BO, BS]`` tile of ``x``, and reduces each chunk over the batch into a ``[BO, BS]``
  fp32 sum. No dense ``[out, in]`` gradient, nor a dense tile of one, is ever formed.
- The transposed product (the input gradient of a *transposable* N:M weight) is ``dds`` on
  ``Wᵀ``'s own ``(values, idx)``: ``dx = nm_dds(dy, t_values, t_idx, None, in, out, n, m)``.

Precision: fp32 operands go through ``tl.dot`` with ``input_precision="ieee"`` (no TF32),
so fp32 results match the fp32 FMA of :mod:`sparseops.kernels.csr`; bf16 and fp16 operands
use the tensor cores in their own dtype. Either way the sum accumulates in fp32 and the
output is rounded once to the input dtype. The interpreter's ``tl.dot`` gets bf16 wrong, so
there bf16 tiles are upcast to fp32 before the dot.

Every output element is owned by exactly one program and stored once: no atomics, no
zero-fill, and autotuning may rerun a kernel freely. Addresses are computed in int64.

The launchers only use torch ops and ``torch.library.wrap_triton`` launches, so each can be
the body of a ``torch.library.triton_op``. They check shapes, dtypes and devices but not the
nibbles: a position ``>= m`` points into the next group (or, in the last group, is masked).
"""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

from .csr import _bucket, _features, _float, _out, _same_device, _store_tile, _tensor, _tune, _on_device

_IDX_DTYPE = torch.uint8
_INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"

# the interpreter cannot benchmark several configs. its cost grows with the number of
# programs, so the tiles are wide; BK, BS and BB stay small so that test shapes of 37
# still run several loop iterations with a masked tail. tl.dot needs every dim >= 16
if _INTERPRET:
    _DDS_CONFIGS = [triton.Config({"BB": 32, "BO": 32, "BK": 16}, num_warps=4)]
    _SDD_CONFIGS = [triton.Config({"BB": 16, "BO": 32, "BS": 16}, num_warps=4)]
else:
    # two stages: the n gathers of each k step are pipelined, and at 7:16 three stages of
    # them needed 254 KB of shared memory (an H100 has 227 KB)
    # the first config is the one SPARSEOPS_TRITON_AUTOTUNE=0 runs: it must fit every n. fp32 values stage
    # each slot's [BK, BO] gather in shared memory, n of them: at 13:16-15:16 a BK = BO = 64 tile needs
    # 233-266 KB (an H100 has 227 KB; offline sm_90 compiles), BK = 32 139 KB. In a full autotune an
    # oversized config fails to launch and is skipped
    _DDS_CONFIGS = [
        triton.Config({"BB": 64, "BO": 64, "BK": 32}, num_warps=4, num_stages=2),
        triton.Config({"BB": 16, "BO": 64, "BK": 64}, num_warps=4, num_stages=2),
        triton.Config({"BB": 32, "BO": 64, "BK": 64}, num_warps=4, num_stages=2),
        triton.Config({"BB": 64, "BO": 64, "BK": 64}, num_warps=4, num_stages=2),
        triton.Config({"BB": 64, "BO": 128, "BK": 32}, num_warps=4, num_stages=2),
        triton.Config({"BB": 128, "BO": 64, "BK": 32}, num_warps=4, num_stages=2),
        triton.Config({"BB": 128, "BO": 128, "BK": 32}, num_warps=8, num_stages=2),
    ]
    _SDD_CONFIGS = [
        triton.Config({"BB": 16, "BO": 4, "BS": 128}, num_warps=4),
        triton.Config({"BB": 16, "BO": 8, "BS": 64}, num_warps=4),
        triton.Config({"BB": 16, "BO": 16, "BS": 32}, num_warps=4),
        triton.Config({"BB": 32, "BO": 4, "BS": 64}, num_warps=4),
        triton.Config({"BB": 32, "BO": 8, "BS": 64}, num_warps=8),
        triton.Config({"BB": 8, "BO": 16, "BS": 64}, num_warps=4),
    ]

# the tensor-core weight gradient (power-of-two m): BK = BG * m columns a tile
if _INTERPRET:
    _SDD_DOT_CONFIGS = [triton.Config({"BB": 16, "BO": 16, "BK": 32}, num_warps=4)]
else:
    _SDD_DOT_CONFIGS = [
        triton.Config({"BB": 32, "BO": 64, "BK": 64}, num_warps=4, num_stages=3),
        triton.Config({"BB": 64, "BO": 128, "BK": 64}, num_warps=8, num_stages=3),
        triton.Config({"BB": 64, "BO": 64, "BK": 128}, num_warps=4, num_stages=3),
        triton.Config({"BB": 64, "BO": 128, "BK": 128}, num_warps=8, num_stages=3),
        triton.Config({"BB": 32, "BO": 128, "BK": 128}, num_warps=8, num_stages=4),
    ]

# the sizes are power-of-two buckets, so a new batch size does not retune every step;
# n and m are constexpr (a separate compile each) and key their own tuning
_DDS_KEYS = ["B_BUCKET", "OUT_BUCKET", "IN_BUCKET", "N", "M"]
_SDD_KEYS = ["B_BUCKET", "OUT_BUCKET", "S_BUCKET", "N", "M"]


# --------------------------------------------------------------------------- kernels


@triton.autotune(configs=_tune(_DDS_CONFIGS), key=_DDS_KEYS)
@triton.jit
def _nm_dds_kernel(
    x_ptr,  # [B, in]
    values_ptr,  # [out, S], contiguous
    idx_ptr,  # [out, ceil(S / 2)] uint8, contiguous
    bias_ptr,  # [out], read only when HAS_BIAS
    out_ptr,  # [B, out]
    B,
    n_out,
    n_in,
    n_slots,  # S: the row stride of values
    idx_cols,  # ceil(S / 2): the row stride of idx
    stride_xb,
    stride_xk,
    stride_ob,
    stride_on,
    B_BUCKET,  # autotune key only
    OUT_BUCKET,  # autotune key only
    IN_BUCKET,  # autotune key only
    N: tl.constexpr,
    M: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    UPCAST: tl.constexpr,  # bf16 under the interpreter: dot in fp32
    IEEE: tl.constexpr,  # fp32 operands: no TF32
    BB: tl.constexpr,
    BO: tl.constexpr,
    BK: tl.constexpr,
):
    pid = tl.program_id(0)
    # output tiles vary fastest, so programs running together share one block of x in L2
    n_oblk = tl.cdiv(n_out, BO)
    oblk = pid % n_oblk
    bblk = pid // n_oblk
    offs_b = bblk.to(tl.int64) * BB + tl.arange(0, BB)  # [BB]
    offs_o = oblk.to(tl.int64) * BO + tl.arange(0, BO)  # [BO]
    mask_b = offs_b < B
    mask_o = offs_o < n_out
    x_rows = x_ptr + offs_b[:, None] * stride_xb  # [BB, 1]
    v_rows = values_ptr + offs_o[None, :] * n_slots  # [1, BO]
    i_rows = idx_ptr + offs_o[None, :] * idx_cols  # [1, BO]

    acc = tl.zeros([BB, BO], dtype=tl.float32)
    for k0 in range(0, n_in, BK):
        # int64 before the add, so k0 + BK cannot wrap
        offs_k = tl.arange(0, BK).to(tl.int64) + k0  # [BK]
        mask_k = offs_k < n_in
        # columns >= in are never read: x is 0 there
        a = tl.load(x_rows + offs_k[None, :] * stride_xk, mask=mask_b[:, None] & mask_k[None, :], other=0.0)

        # decompress Wᵀ[k, o]: the slot of column k's group whose position is k % m
        grp = offs_k // M  # [BK]
        pos_k = (offs_k % M).to(tl.int32)[:, None]  # [BK, 1]
        w_mask = mask_k[:, None] & mask_o[None, :]  # [BK, BO]
        w = tl.zeros([BK, BO], dtype=values_ptr.dtype.element_ty)
        for s in tl.static_range(N):
            j = grp * N + s  # [BK] slot of column k's group
            byte = tl.load(i_rows + (j // 2)[:, None], mask=w_mask, other=0).to(tl.int32)  # [BK, BO]
            pos = (byte >> (4 * (j % 2)).to(tl.int32)[:, None]) & 15
            v = tl.load(v_rows + j[:, None], mask=w_mask, other=0.0)  # [BK, BO]
            # the positions of a group are distinct: at most one slot matches
            w = tl.where(pos == pos_k, v, w)

        if UPCAST:
            a = a.to(tl.float32)
            w = w.to(tl.float32)
        if IEEE:
            acc = tl.dot(a, w, acc, input_precision="ieee")
        else:
            acc = tl.dot(a, w, acc)

    _store_tile(acc, bias_ptr, out_ptr, offs_b, mask_b, offs_o, mask_o, stride_ob, stride_on, HAS_BIAS)


# the most rows of x the decode kernel takes. Measured on an H100 (2:4 bf16, 4096→11008,
# CUDA-graph replay; dense 0.047 ms): 1 row 0.054 ms against 0.176 for the dot kernel, 4 rows
# 0.116 against 0.189; 8 rows 0.255 and 16 rows 0.793 against about 0.19 (the gather of x
# grows with the rows, the dot kernel's tile does not)
_MAX_GEMV_B = 4

if _INTERPRET:
    _GEMV_CONFIGS = [triton.Config({"RB": 8, "BS": 16}, num_warps=4)]
else:
    # RB rows of W a program, BS slots a step; the values and positions of the next steps
    # do not depend on this one's loads, so the pipeliner can fetch them ahead
    _GEMV_CONFIGS = [
        triton.Config({"RB": 4, "BS": 128}, num_warps=4, num_stages=3),
        triton.Config({"RB": 2, "BS": 256}, num_warps=4, num_stages=3),
        triton.Config({"RB": 4, "BS": 256}, num_warps=4, num_stages=3),
        triton.Config({"RB": 8, "BS": 128}, num_warps=4, num_stages=3),
        triton.Config({"RB": 8, "BS": 256}, num_warps=8, num_stages=3),
        triton.Config({"RB": 16, "BS": 128}, num_warps=8, num_stages=3),
        triton.Config({"RB": 2, "BS": 128}, num_warps=2, num_stages=4),
        triton.Config({"RB": 1, "BS": 256}, num_warps=2, num_stages=4),
        # for 16 rows of x: a [16, RB, BS] gather a step
        triton.Config({"RB": 1, "BS": 128}, num_warps=4, num_stages=3),
        triton.Config({"RB": 2, "BS": 64}, num_warps=4, num_stages=3),
    ]


@triton.autotune(configs=_tune(_GEMV_CONFIGS), key=_DDS_KEYS)
@triton.jit
def _nm_gemv_kernel(
    x_ptr,  # [B, in], B <= BT
    values_ptr,  # [out, S], contiguous
    idx_ptr,  # [out, ceil(S / 2)] uint8, contiguous
    bias_ptr,  # [out], read only when HAS_BIAS
    out_ptr,  # [B, out]
    B,
    n_out,
    n_in,
    n_slots,
    idx_cols,
    stride_xb,
    stride_xk,
    stride_ob,
    stride_on,
    B_BUCKET,  # autotune key only
    OUT_BUCKET,  # autotune key only
    IN_BUCKET,  # autotune key only
    N: tl.constexpr,
    M: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    BT: tl.constexpr,  # B rounded up to a power of two
    RB: tl.constexpr,
    BS: tl.constexpr,
):
    # decode: stream RB rows of slots (values and positions, each read once, contiguous), and
    # gather the few rows of x (small, cached) at the slots' columns: no tile of W is formed
    pid = tl.program_id(0)
    offs_r = pid.to(tl.int64) * RB + tl.arange(0, RB)  # [RB]
    mask_r = offs_r < n_out
    offs_t = tl.arange(0, BT)  # [BT]
    mask_t = offs_t < B
    v_rows = values_ptr + offs_r[:, None] * n_slots  # [RB, 1]
    i_rows = idx_ptr + offs_r[:, None] * idx_cols  # [RB, 1]
    x_rows = x_ptr + offs_t[:, None, None].to(tl.int64) * stride_xb  # [BT, 1, 1]
    acc = tl.zeros([BT, RB], dtype=tl.float32)
    for j0 in range(0, n_slots, BS):
        j = tl.arange(0, BS).to(tl.int64) + j0  # [BS]
        mask = mask_r[:, None] & (j < n_slots)[None, :]  # [RB, BS]
        v = tl.load(v_rows + j[None, :], mask=mask, other=0.0)  # [RB, BS]
        byte = tl.load(i_rows + (j // 2)[None, :], mask=mask, other=0).to(tl.int32)
        pos = (byte >> (4 * (j % 2)).to(tl.int32)[None, :]) & 15
        col = (j // N)[None, :] * M + pos  # [RB, BS]
        # a column >= in (the last group's padding) holds 0 and is never read
        a_mask = mask_t[:, None, None] & (mask & (col < n_in))[None, :, :]
        a = tl.load(x_rows + col[None, :, :] * stride_xk, mask=a_mask, other=0.0)  # [BT, RB, BS]
        acc += tl.sum(a.to(tl.float32) * v.to(tl.float32)[None, :, :], axis=2)

    _store_tile(acc, bias_ptr, out_ptr, offs_t, mask_t, offs_r, mask_r, stride_ob, stride_on, HAS_BIAS)


@triton.autotune(configs=_tune(_SDD_CONFIGS), key=_SDD_KEYS)
@triton.jit
def _nm_sdd_kernel(
    dy_ptr,  # [B, out]
    x_ptr,  # [B, in]
    idx_ptr,  # [out, ceil(S / 2)] uint8, contiguous
    out_ptr,  # [out, S]
    B,
    n_out,
    n_in,
    n_slots,  # S
    idx_cols,  # ceil(S / 2): the row stride of idx
    stride_dyb,
    stride_dyn,
    stride_xb,
    stride_xk,
    stride_oo,
    stride_os,
    B_BUCKET,  # autotune key only
    OUT_BUCKET,  # autotune key only
    S_BUCKET,  # autotune key only
    N: tl.constexpr,
    M: tl.constexpr,
    BB: tl.constexpr,
    BO: tl.constexpr,
    BS: tl.constexpr,
):
    pid = tl.program_id(0)
    # row tiles vary fastest, so programs running together gather the same columns of x
    n_oblk = tl.cdiv(n_out, BO)
    oblk = pid % n_oblk
    sblk = pid // n_oblk
    offs_o = oblk.to(tl.int64) * BO + tl.arange(0, BO)  # [BO]
    offs_s = sblk.to(tl.int64) * BS + tl.arange(0, BS)  # [BS]
    mask_o = offs_o < n_out
    mask_os = mask_o[:, None] & (offs_s < n_slots)[None, :]  # [BO, BS]

    # the slots' columns, decoded once
    byte = tl.load(idx_ptr + offs_o[:, None] * idx_cols + (offs_s // 2)[None, :], mask=mask_os, other=0)
    pos = (byte.to(tl.int32) >> (4 * (offs_s % 2)).to(tl.int32)[None, :]) & 15  # [BO, BS]
    col = (offs_s // N * M)[None, :] + pos  # [BO, BS] int64
    # a column >= in holds 0 and x is never read there
    mask_c = mask_os & (col < n_in)
    x_cols = x_ptr + col * stride_xk  # [BO, BS]
    dy_cols = dy_ptr + offs_o * stride_dyn  # [BO]

    acc = tl.zeros([BO, BS], dtype=tl.float32)
    for b0 in range(0, B, BB):
        # int64 before the add, so b0 + BB cannot wrap
        offs_b = tl.arange(0, BB).to(tl.int64) + b0  # [BB]
        mask_b = offs_b < B
        g = tl.load(
            dy_cols[None, :] + offs_b[:, None] * stride_dyb, mask=mask_b[:, None] & mask_o[None, :], other=0.0
        )  # [BB, BO]
        a = tl.load(
            x_cols[None, :, :] + offs_b[:, None, None] * stride_xb,
            mask=mask_b[:, None, None] & mask_c[None, :, :],
            other=0.0,
        )  # [BB, BO, BS]
        acc += tl.sum(g.to(tl.float32)[:, :, None] * a.to(tl.float32), axis=0)

    out = out_ptr + offs_o[:, None] * stride_oo + offs_s[None, :] * stride_os  # [BO, BS]
    tl.store(out, acc.to(out_ptr.dtype.element_ty), mask=mask_os)


@triton.autotune(configs=_tune(_SDD_DOT_CONFIGS), key=_SDD_KEYS)
@triton.jit
def _nm_sdd_dot_kernel(
    dy_ptr,  # [B, out]
    x_ptr,  # [B, in]
    idx_ptr,  # [out, ceil(S / 2)] uint8, contiguous
    out_ptr,  # [out, S]
    B,
    n_out,
    n_in,
    n_slots,  # S
    idx_cols,  # ceil(S / 2): the row stride of idx
    stride_dyb,
    stride_dyn,
    stride_xb,
    stride_xk,
    stride_oo,
    stride_os,
    B_BUCKET,  # autotune key only
    OUT_BUCKET,  # autotune key only
    S_BUCKET,  # autotune key only
    N: tl.constexpr,
    M: tl.constexpr,  # a power of two
    UPCAST: tl.constexpr,  # bf16 under the interpreter: dot in fp32
    IEEE: tl.constexpr,  # fp32 operands: no TF32
    BB: tl.constexpr,
    BO: tl.constexpr,
    BK: tl.constexpr,  # columns a tile: BK // M whole groups
):
    """``dv[o, j] = sum_b dy[b, o] x[b, col(o, j)]`` for a [BO, BK] tile of ``W``'s positions.

    The tile's product ``dyᵀ x`` is accumulated on the tensor cores over the batch, then each
    slot reads its group's entry at its position (a compare-and-sum over the group's m columns).
    Only the slots are written: no ``[out, in]`` buffer exists, though the tile's arithmetic is
    dense (m / n times the slots'); a dot per slot on the CUDA cores ran 100x slower (H100).
    """
    pid = tl.program_id(0)
    n_oblk = tl.cdiv(n_out, BO)
    oblk = pid % n_oblk
    gblk = pid // n_oblk
    offs_o = oblk.to(tl.int64) * BO + tl.arange(0, BO)  # [BO]
    offs_k = gblk.to(tl.int64) * BK + tl.arange(0, BK)  # [BK]
    mask_o = offs_o < n_out
    mask_k = offs_k < n_in  # x is 0 past in: those columns' slots get 0

    acc = tl.zeros([BO, BK], dtype=tl.float32)
    for b0 in range(0, B, BB):
        offs_b = tl.arange(0, BB).to(tl.int64) + b0  # [BB]
        mask_b = offs_b < B
        g = tl.load(
            dy_ptr + offs_o[:, None] * stride_dyn + offs_b[None, :] * stride_dyb,
            mask=mask_o[:, None] & mask_b[None, :],
            other=0.0,
        )  # [BO, BB] = dyᵀ
        a = tl.load(
            x_ptr + offs_b[:, None] * stride_xb + offs_k[None, :] * stride_xk,
            mask=mask_b[:, None] & mask_k[None, :],
            other=0.0,
        )  # [BB, BK]
        if UPCAST:
            g = g.to(tl.float32)
            a = a.to(tl.float32)
        if IEEE:
            acc = tl.dot(g, a, acc, input_precision="ieee")
        else:
            acc = tl.dot(g, a, acc)

    acc3 = tl.reshape(acc, [BO, BK // M, M])  # [BO, group, position]
    offs_g = gblk.to(tl.int64) * (BK // M) + tl.arange(0, BK // M)  # [BK // M] global group
    ar_m = tl.arange(0, M)
    for t in tl.static_range(N):
        j = offs_g * N + t  # [BG] slot t of each group
        mask_j = mask_o[:, None] & (j < n_slots)[None, :]  # [BO, BK // M]
        byte = tl.load(idx_ptr + offs_o[:, None] * idx_cols + (j // 2)[None, :], mask=mask_j, other=0)
        pos = (byte.to(tl.int32) >> (4 * (j % 2)).to(tl.int32)[None, :]) & 15  # [BO, BK // M]
        v = tl.sum(tl.where(pos[:, :, None] == ar_m[None, None, :], acc3, 0.0), axis=2)  # [BO, BK // M]
        out = out_ptr + offs_o[:, None] * stride_oo + j[None, :] * stride_os
        tl.store(out, v.to(out_ptr.dtype.element_ty), mask=mask_j)


# --------------------------------------------------------------------------- checks


def _nm(n, m) -> tuple[int, int]:
    for name, v in (("n", n), ("m", m)):
        if isinstance(v, bool) or not isinstance(v, int):
            raise TypeError(f"{name}: expected an int, got {type(v).__name__}")
    if not 2 <= m <= 16:
        raise ValueError(f"m: expected 2 <= m <= 16, got {m}")
    if not 1 <= n < m:
        raise ValueError(f"n: expected 1 <= n < m = {m}, got {n}")
    return n, m


def _slots(in_features, n: int, m: int) -> int:
    return triton.cdiv(in_features, m) * n


def _idx(t, rows, slots: int) -> torch.Tensor:
    t = _tensor("idx", t, 2)
    if t.dtype != _IDX_DTYPE:
        raise TypeError(f"idx: expected dtype {_IDX_DTYPE}, got {t.dtype}")
    shape = (rows, triton.cdiv(slots, 2))
    if tuple(t.shape) != shape:
        raise ValueError(f"idx: expected shape {shape} (two 4-bit positions a byte), got {tuple(t.shape)}")
    return t


# --------------------------------------------------------------------------- launchers


@_on_device
def nm_dds(x, values, idx, bias, out_features, in_features, n, m, out=None):
    """``y = x @ Wᵀ + bias`` with the N:M weight ``W [out, in]`` given by ``(values, idx)``.

    Also the input gradient of a transposable N:M weight:
    ``dx = nm_dds(dy, t_values, t_idx, None, in_features, out_features, n, m)`` with
    ``(t_values, t_idx)`` the same format of ``Wᵀ``.

    Args:
        x: ``[B, in]`` float32, bfloat16 or float16 (any strides).
        values: ``[out, S]`` in the dtype of ``x``, ``S = ceil(in / m) * n``.
        idx: uint8 ``[out, ceil(S / 2)]``, two 4-bit in-group positions a byte (even slot low).
        bias: ``[out]`` in the dtype of ``x``, or None.
        out_features, in_features: ``out`` and ``in``.
        n, m: at most ``n`` nonzeros per group of ``m`` (``1 <= n < m <= 16``).
        out: optional ``[B, out]`` buffer in the dtype of ``x``; every element is written.

    Returns:
        ``[B, out]`` in ``x.dtype`` (``out`` when given).

    Raises:
        TypeError: a wrong type or dtype.
        ValueError: a wrong shape, ``n``/``m`` or device.
    """
    x = _float("x", x, 2)
    _features("out_features", out_features)
    _features("in_features", in_features)
    n, m = _nm(n, m)
    if x.shape[1] != in_features:
        raise ValueError(f"x: expected {in_features} columns (in_features), got shape {tuple(x.shape)}")
    slots = _slots(in_features, n, m)
    values = _float("values", values, 2, x.dtype)
    if tuple(values.shape) != (out_features, slots):
        raise ValueError(
            f"values: expected shape {(out_features, slots)} (out, ceil(in / m) * n), got {tuple(values.shape)}"
        )
    idx = _idx(idx, out_features, slots)
    if bias is not None:
        bias = _float("bias", bias, 1, x.dtype)
        if bias.numel() != out_features:
            raise ValueError(f"bias: expected {out_features} entries, got {bias.numel()}")
    _same_device(x, values=values, idx=idx, bias=bias)
    B = x.shape[0]
    out = _out(out, (B, out_features), x)
    if B == 0 or out_features == 0:
        return out
    # in == 0 still launches: the loop is empty and every element gets the bias (or 0)
    values, idx = values.contiguous(), idx.contiguous()
    bias = bias.contiguous() if bias is not None else None

    if B <= _MAX_GEMV_B:
        torch.library.wrap_triton(_nm_gemv_kernel)[lambda meta: (triton.cdiv(out_features, meta["RB"]),)](
            x, values, idx, bias, out, B, out_features, in_features, slots, idx.shape[1],
            x.stride(0), x.stride(1), out.stride(0), out.stride(1),
            _bucket(B), _bucket(out_features), _bucket(in_features),
            N=n, M=m, HAS_BIAS=bias is not None, BT=_bucket(B),
        )
        return out

    def grid(meta):
        return (triton.cdiv(out_features, meta["BO"]) * triton.cdiv(B, meta["BB"]),)

    torch.library.wrap_triton(_nm_dds_kernel)[grid](
        x,
        values,
        idx,
        bias,
        out,
        B,
        out_features,
        in_features,
        slots,
        idx.shape[1],
        x.stride(0),
        x.stride(1),
        out.stride(0),
        out.stride(1),
        _bucket(B),
        _bucket(out_features),
        _bucket(in_features),
        N=n,
        M=m,
        HAS_BIAS=bias is not None,
        UPCAST=_INTERPRET and x.dtype == torch.bfloat16,
        IEEE=x.dtype == torch.float32,
    )
    return out


@_on_device
def nm_sdd(dy, x, idx, n, m, in_features, out=None):
    """Weight gradient on the stored slots: ``dv[o, j] = sum_b dy[b, o] * x[b, col(o, j)]``.

    A slot whose column is ``>= in`` gets 0. No dense ``[out, in]`` gradient is formed.

    Args:
        dy: ``[B, out]``; x: ``[B, in]``; float32, bfloat16 or float16, same dtype, any strides.
        idx: uint8 ``[out, ceil(S / 2)]`` of the weight, ``S = ceil(in / m) * n``.
        n, m: at most ``n`` nonzeros per group of ``m`` (``1 <= n < m <= 16``).
        in_features: ``in``.
        out: optional ``[out, S]`` buffer in the dtype of ``x``; every element is written.

    Returns:
        ``[out, S]`` in ``x.dtype`` (``out`` when given).

    Raises:
        TypeError: a wrong type or dtype.
        ValueError: a wrong shape, ``n``/``m`` or device.
    """
    x = _float("x", x, 2)
    dy = _float("dy", dy, 2, x.dtype)
    _features("in_features", in_features)
    n, m = _nm(n, m)
    if x.shape[1] != in_features:
        raise ValueError(f"x: expected {in_features} columns (in_features), got shape {tuple(x.shape)}")
    if dy.shape[0] != x.shape[0]:
        raise ValueError(f"dy: expected {x.shape[0]} rows (the batch of x), got {dy.shape[0]}")
    out_features = dy.shape[1]
    slots = _slots(in_features, n, m)
    idx = _idx(idx, out_features, slots)
    _same_device(x, dy=dy, idx=idx)
    out = _out(out, (out_features, slots), x)
    if out_features == 0 or slots == 0:
        return out
    # B == 0 still launches: the loop is empty and every slot gets 0
    idx = idx.contiguous()
    B = x.shape[0]
    if m & (m - 1) == 0:
        # power-of-two m: tensor-core tiles (a tile's columns are whole groups)
        def grid_dot(meta):
            return (triton.cdiv(out_features, meta["BO"]) * triton.cdiv(triton.cdiv(in_features, m) * m, meta["BK"]),)

        torch.library.wrap_triton(_nm_sdd_dot_kernel)[grid_dot](
            dy, x, idx, out, B, out_features, in_features, slots, idx.shape[1],
            dy.stride(0), dy.stride(1), x.stride(0), x.stride(1), out.stride(0), out.stride(1),
            _bucket(B), _bucket(out_features), _bucket(slots),
            N=n, M=m,
            UPCAST=_INTERPRET and x.dtype == torch.bfloat16,
            IEEE=x.dtype == torch.float32 or (_INTERPRET and x.dtype == torch.bfloat16),
        )  # fmt: skip
        return out

    def grid(meta):
        return (triton.cdiv(out_features, meta["BO"]) * triton.cdiv(slots, meta["BS"]),)

    torch.library.wrap_triton(_nm_sdd_kernel)[grid](
        dy,
        x,
        idx,
        out,
        B,
        out_features,
        in_features,
        slots,
        idx.shape[1],
        dy.stride(0),
        dy.stride(1),
        x.stride(0),
        x.stride(1),
        out.stride(0),
        out.stride(1),
        _bucket(B),
        _bucket(out_features),
        _bucket(slots),
        N=n,
        M=m,
    )
    return out
