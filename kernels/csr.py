"""Triton kernels for the three CSR products, and their launchers.

The products are those of :mod:`sparseops.reference.csr` (the oracle):

- ``dds``: ``y [B, out] = x [B, in] @ Wᵀ (+ bias)``. One program per (output row,
  block of ``BM`` batch rows). It walks that row's nonzeros in chunks of ``BK``,
  gathers the matching columns of ``x`` as a ``[BM, BK]`` tile, scales them by the
  values and keeps a ``[BM, BK]`` fp32 partial sum that is reduced once at the end.
- ``dsd``: ``dx [B, in] = dy [B, out] @ W``. The same row kernel on the transposed
  index (``t_crow``, ``t_row``), with the values gathered through ``t_perm``.
- At decode (``B <= 8``) both run a multi-row kernel instead: one program per ``RB``
  sparse rows, all ``B`` dense rows at once. A step loads a ``[RB, BK]`` tile of each
  row's next nonzeros (each value and index read once) and gathers a ``[B, RB, BK]`` tile
  of the dense operand: ``RB`` times the bytes in flight of the one-row program, which at
  ``B = 1`` is a latency-bound walk of one short row.
- ``sdd``: ``dvalues[k] = sum_b dy[b, row[k]] * x[b, col[k]]``. One program per block
  of ``BN`` nonzeros, looping over the batch in chunks of ``BB``: it gathers ``[BB, BN]``
  tiles of ``dy`` and ``x``, multiplies them and reduces over the batch at the end.

Every output element is owned by exactly one program and stored once: no atomics, no
zero-fill, and autotuning may rerun a kernel freely. Unstructured rows share no column
set, so there is no dense operand for ``tl.dot``; the kernels are gather + FMA and
bound by memory traffic. Math accumulates in fp32; addresses are computed in int64.

The launchers only use torch ops and ``torch.library.wrap_triton`` launches, so each
can be the body of a ``torch.library.triton_op``. They check shapes, dtypes and devices
but not index values: run :meth:`sparseops.formats.csr.CSRWeight.validate` on a
hand-built index first, an out-of-range index reads out of bounds.
"""

from __future__ import annotations

import functools
import os

import torch
import triton
import triton.language as tl

_FLOAT_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
_INDEX_DTYPE = torch.int32
_INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"


def _on_device(launcher):
    """Run ``launcher`` with its first CUDA tensor's device current.

    A Triton launch takes its device and stream from the current CUDA device, not from its arguments, so
    a layer on ``cuda:1`` called while ``cuda:0`` is current (``device_map="auto"``, a pipeline split)
    would launch on the wrong GPU with the other's pointers. torch.compile inserts its own device guards,
    so this one only acts in eager mode.
    """

    @functools.wraps(launcher)
    def run(*args, **kwargs):
        if not torch.compiler.is_compiling():
            for a in (*args, *kwargs.values()):
                if isinstance(a, torch.Tensor) and a.device.type == "cuda":
                    if a.device.index is not None and a.device.index != torch.cuda.current_device():
                        with torch.cuda.device(a.device):
                            return launcher(*args, **kwargs)
                    break
        return launcher(*args, **kwargs)

    run.device_guarded = True
    return run


def _tune(configs):
    """The autotune configs, or the first alone under ``SPARSEOPS_TRITON_AUTOTUNE=0``.

    The GPU test run sets it: every test shape would otherwise compile and time each config
    (minutes per file), and the first config of each list is the smallest tile, the one whose
    masked tails the odd test shapes exercise most.
    """
    if os.environ.get("SPARSEOPS_TRITON_AUTOTUNE", "1") == "0":
        return configs[:1]
    return configs

# the interpreter cannot benchmark several configs. its cost grows with the number of
# programs, so the tiles are wide; BK and BB stay small so that test shapes of 37
# still run several loop iterations with a masked tail
if _INTERPRET:
    _ROW_CONFIGS = [triton.Config({"BM": 32, "BK": 16}, num_warps=4)]
    _SDD_CONFIGS = [triton.Config({"BB": 16, "BN": 32}, num_warps=4)]
    _ROWS_CONFIGS = [triton.Config({"RB": 8, "BK": 16}, num_warps=4)]
else:
    # the decode kernel: RB rows a program, a [BT, RB, BK] gather a step (BT <= 16 tokens)
    _ROWS_CONFIGS = [
        triton.Config({"RB": 8, "BK": 32}, num_warps=4),
        triton.Config({"RB": 16, "BK": 32}, num_warps=4),
        triton.Config({"RB": 8, "BK": 64}, num_warps=4),
        triton.Config({"RB": 16, "BK": 64}, num_warps=4),
        triton.Config({"RB": 32, "BK": 32}, num_warps=8),
        triton.Config({"RB": 4, "BK": 128}, num_warps=4),
        triton.Config({"RB": 16, "BK": 128}, num_warps=8),
        # for 16 tokens: a [16, RB, BK] gather a step
        triton.Config({"RB": 4, "BK": 32}, num_warps=4),
        triton.Config({"RB": 2, "BK": 64}, num_warps=4),
    ]
    _ROW_CONFIGS = [
        triton.Config({"BM": 8, "BK": 128}, num_warps=4),
        triton.Config({"BM": 16, "BK": 64}, num_warps=4),
        triton.Config({"BM": 32, "BK": 32}, num_warps=4),
        triton.Config({"BM": 64, "BK": 32}, num_warps=4),
        triton.Config({"BM": 64, "BK": 64}, num_warps=8),
        triton.Config({"BM": 128, "BK": 32}, num_warps=8),
    ]
    _SDD_CONFIGS = [
        triton.Config({"BB": 16, "BN": 128}, num_warps=4),
        triton.Config({"BB": 32, "BN": 64}, num_warps=4),
        triton.Config({"BB": 64, "BN": 64}, num_warps=4),
        triton.Config({"BB": 64, "BN": 128}, num_warps=8),
        triton.Config({"BB": 128, "BN": 32}, num_warps=4),
    ]

# the keys are power-of-two buckets, so a new batch size does not retune every step
_ROW_KEYS = ["B_BUCKET", "NNZ_BUCKET"]
_SDD_KEYS = ["B_BUCKET", "NNZ_BUCKET"]


# --------------------------------------------------------------------------- kernels


@triton.jit
def _csr_row_kernel(
    a_ptr,  # [B, n_cols] dense operand: x (dds) or dy (dsd)
    values_ptr,  # [nnz]
    ptr_ptr,  # [n_rows + 1] crow (dds) or t_crow (dsd)
    idx_ptr,  # [nnz] col (dds) or t_row (dsd)
    perm_ptr,  # [nnz] t_perm, read only when HAS_PERM
    bias_ptr,  # [n_rows], read only when HAS_BIAS
    out_ptr,  # [B, n_rows]
    B,
    n_rows,
    stride_ab,
    stride_ak,
    stride_ob,
    stride_on,
    B_BUCKET,  # autotune key only
    NNZ_BUCKET,  # autotune key only
    HAS_PERM: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    BM: tl.constexpr,
    BK: tl.constexpr,
):
    pid = tl.program_id(0)
    # rows vary fastest, so programs running together share one block of the dense
    # operand in L2 and write neighbouring output columns
    r = pid % n_rows
    bblk = pid // n_rows
    offs_b = bblk.to(tl.int64) * BM + tl.arange(0, BM)  # [BM]
    mask_b = offs_b < B
    a_rows = a_ptr + offs_b[:, None] * stride_ab  # [BM, 1]

    # int64 so that k0 + BK cannot wrap when nnz is close to 2**31
    start = tl.load(ptr_ptr + r).to(tl.int64)
    end = tl.load(ptr_ptr + r + 1).to(tl.int64)
    acc = tl.zeros([BM, BK], dtype=tl.float32)
    for k0 in range(start, end, BK):
        offs_k = k0 + tl.arange(0, BK)  # [BK]
        mask_k = offs_k < end
        idx = tl.load(idx_ptr + offs_k, mask=mask_k, other=0).to(tl.int64)  # [BK]
        if HAS_PERM:
            pos = tl.load(perm_ptr + offs_k, mask=mask_k, other=0).to(tl.int64)
            v = tl.load(values_ptr + pos, mask=mask_k, other=0.0)  # [BK]
        else:
            v = tl.load(values_ptr + offs_k, mask=mask_k, other=0.0)  # [BK]
        tile_mask = mask_b[:, None] & mask_k[None, :]  # [BM, BK]
        a = tl.load(a_rows + idx[None, :] * stride_ak, mask=tile_mask, other=0.0)  # [BM, BK]
        # one reduction after the loop instead of one per chunk
        acc += a.to(tl.float32) * v.to(tl.float32)[None, :]

    y = tl.sum(acc, axis=1)  # [BM]
    if HAS_BIAS:
        y += tl.load(bias_ptr + r).to(tl.float32)
    out = out_ptr + offs_b * stride_ob + r.to(tl.int64) * stride_on  # [BM]
    tl.store(out, y.to(out_ptr.dtype.element_ty), mask=mask_b)


# two tuners over one body: dds and dsd keep separate tuning caches
_csr_dds_kernel = triton.autotune(configs=_tune(_ROW_CONFIGS), key=_ROW_KEYS)(_csr_row_kernel)
_csr_dsd_kernel = triton.autotune(configs=_tune(_ROW_CONFIGS), key=_ROW_KEYS)(_csr_row_kernel)

# the most rows of the dense operand the decode kernel takes. Measured on an H100 (bf16,
# 4096→11008 at 90%, CUDA-graph replay; dense 0.047 ms): 1 row 0.028 ms against 0.055 for the
# one-row kernel, 4 rows 0.037 against 0.058, 8 rows 0.073; 16 rows 0.183 against 0.118
_MAX_ROWS_B = 8


@triton.jit
def _store_tile(acc, bias_ptr, out_ptr, offs_b, mask_b, offs_o, mask_o, stride_ob, stride_on, HAS_BIAS: tl.constexpr):
    """``out[offs_b, offs_o] = acc (+ bias[offs_o])``, rounded once to out's dtype: the end of a
    ``[rows of x, outputs]`` fp32 tile (``offs_b`` and ``offs_o`` int64 or castable to it)."""
    if HAS_BIAS:
        acc += tl.load(bias_ptr + offs_o, mask=mask_o, other=0.0).to(tl.float32)[None, :]
    out = out_ptr + offs_b[:, None].to(tl.int64) * stride_ob + offs_o[None, :] * stride_on
    tl.store(out, acc.to(out_ptr.dtype.element_ty), mask=mask_b[:, None] & mask_o[None, :])


@triton.jit
def _csr_rows_kernel(
    a_ptr,  # [B, n_cols] dense operand: x (dds) or dy (dsd), B <= BT
    values_ptr,  # [nnz]
    ptr_ptr,  # [n_rows + 1] crow (dds) or t_crow (dsd)
    idx_ptr,  # [nnz] col (dds) or t_row (dsd)
    perm_ptr,  # [nnz] t_perm, read only when HAS_PERM
    bias_ptr,  # [n_rows], read only when HAS_BIAS
    out_ptr,  # [B, n_rows]
    B,
    n_rows,
    stride_ab,
    stride_ak,
    stride_ob,
    stride_on,
    B_BUCKET,  # autotune key only
    NNZ_BUCKET,  # autotune key only
    HAS_PERM: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    BT: tl.constexpr,  # B rounded up to a power of two
    RB: tl.constexpr,
    BK: tl.constexpr,
):
    # RB sparse rows a program, all B (<= BT) rows of the dense operand at once: the values and
    # indices of RB rows stream together (RB * BK in flight a step instead of BK), each read once
    pid = tl.program_id(0)
    offs_r = pid.to(tl.int64) * RB + tl.arange(0, RB)  # [RB]
    mask_r = offs_r < n_rows
    offs_t = tl.arange(0, BT)  # [BT]
    mask_t = offs_t < B
    start = tl.load(ptr_ptr + offs_r, mask=mask_r, other=0).to(tl.int64)  # [RB]
    end = tl.load(ptr_ptr + offs_r + 1, mask=mask_r, other=0).to(tl.int64)
    longest = tl.max(end - start, axis=0)
    a_rows = a_ptr + offs_t[:, None, None].to(tl.int64) * stride_ab  # [BT, 1, 1]
    acc = tl.zeros([BT, RB], dtype=tl.float32)
    for k0 in range(0, longest, BK):
        offs_k = start[:, None] + k0 + tl.arange(0, BK)[None, :]  # [RB, BK]
        mask_k = offs_k < end[:, None]
        idx = tl.load(idx_ptr + offs_k, mask=mask_k, other=0).to(tl.int64)  # [RB, BK]
        if HAS_PERM:
            pos = tl.load(perm_ptr + offs_k, mask=mask_k, other=0).to(tl.int64)
            v = tl.load(values_ptr + pos, mask=mask_k, other=0.0)
        else:
            v = tl.load(values_ptr + offs_k, mask=mask_k, other=0.0)
        a = tl.load(a_rows + idx[None, :, :] * stride_ak, mask=mask_t[:, None, None] & mask_k[None, :, :], other=0.0)
        acc += tl.sum(a.to(tl.float32) * v.to(tl.float32)[None, :, :], axis=2)  # [BT, RB]

    _store_tile(acc, bias_ptr, out_ptr, offs_t, mask_t, offs_r, mask_r, stride_ob, stride_on, HAS_BIAS)


_csr_dds_rows_kernel = triton.autotune(configs=_tune(_ROWS_CONFIGS), key=_ROW_KEYS)(_csr_rows_kernel)
_csr_dsd_rows_kernel = triton.autotune(configs=_tune(_ROWS_CONFIGS), key=_ROW_KEYS)(_csr_rows_kernel)


@triton.autotune(configs=_tune(_SDD_CONFIGS), key=_SDD_KEYS)
@triton.jit
def _csr_sdd_kernel(
    dy_ptr,  # [B, out]
    x_ptr,  # [B, in]
    row_ptr,  # [nnz]
    col_ptr,  # [nnz]
    out_ptr,  # [nnz]
    B,
    nnz,
    stride_dyb,
    stride_dyn,
    stride_xb,
    stride_xk,
    stride_o,
    B_BUCKET,  # autotune key only
    NNZ_BUCKET,  # autotune key only
    BB: tl.constexpr,
    BN: tl.constexpr,
):
    pid = tl.program_id(0)
    offs_n = pid.to(tl.int64) * BN + tl.arange(0, BN)  # [BN]
    mask_n = offs_n < nnz
    r = tl.load(row_ptr + offs_n, mask=mask_n, other=0).to(tl.int64)  # [BN]
    c = tl.load(col_ptr + offs_n, mask=mask_n, other=0).to(tl.int64)  # [BN]
    dy_cols = dy_ptr + r[None, :] * stride_dyn  # [1, BN]
    x_cols = x_ptr + c[None, :] * stride_xk  # [1, BN]

    acc = tl.zeros([BB, BN], dtype=tl.float32)
    for b0 in range(0, B, BB):
        # int64 before the add, so b0 + BB cannot wrap
        offs_b = tl.arange(0, BB).to(tl.int64) + b0  # [BB]
        tile_mask = (offs_b < B)[:, None] & mask_n[None, :]  # [BB, BN]
        g = tl.load(dy_cols + offs_b[:, None] * stride_dyb, mask=tile_mask, other=0.0)  # [BB, BN]
        a = tl.load(x_cols + offs_b[:, None] * stride_xb, mask=tile_mask, other=0.0)  # [BB, BN]
        acc += g.to(tl.float32) * a.to(tl.float32)

    dv = tl.sum(acc, axis=0)  # [BN]
    tl.store(out_ptr + offs_n * stride_o, dv.to(out_ptr.dtype.element_ty), mask=mask_n)


# --------------------------------------------------------------------------- checks


def _tensor(name: str, t, dim: int) -> torch.Tensor:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name}: expected a torch.Tensor, got {type(t).__name__}")
    if t.dim() != dim:
        raise ValueError(f"{name}: expected a {dim}-D tensor, got shape {tuple(t.shape)}")
    return t


def _float(name: str, t, dim: int, dtype: torch.dtype | None = None) -> torch.Tensor:
    t = _tensor(name, t, dim)
    if dtype is None and t.dtype not in _FLOAT_DTYPES:
        raise TypeError(f"{name}: expected dtype float32, bfloat16 or float16, got {t.dtype}")
    if dtype is not None and t.dtype != dtype:
        raise TypeError(f"{name}: expected dtype {dtype} (the dtype of the dense input), got {t.dtype}")
    return t


def _index(name: str, t, numel) -> torch.Tensor:
    t = _tensor(name, t, 1)
    if t.dtype != _INDEX_DTYPE:
        raise TypeError(f"{name}: expected dtype {_INDEX_DTYPE}, got {t.dtype}")
    if numel is not None and t.numel() != numel:
        raise ValueError(f"{name}: expected {numel} entries, got {t.numel()}")
    return t


def _features(name: str, n) -> None:
    if isinstance(n, bool) or not isinstance(n, (int, torch.SymInt)):
        raise TypeError(f"{name}: expected an int, got {type(n).__name__}")
    if n < 0:
        raise ValueError(f"{name}: expected >= 0, got {n}")


def _same_device(ref: torch.Tensor, **tensors) -> None:
    for name, t in tensors.items():
        if t is not None and t.device != ref.device:
            raise ValueError(f"{name}: expected device {ref.device}, got {t.device}")


def _out(out, shape: tuple, like: torch.Tensor) -> torch.Tensor:
    if out is None:
        return torch.empty(shape, dtype=like.dtype, device=like.device)
    _tensor("out", out, len(shape))
    if tuple(out.shape) != tuple(shape):
        raise ValueError(f"out: expected shape {tuple(shape)}, got {tuple(out.shape)}")
    if out.dtype != like.dtype:
        raise TypeError(f"out: expected dtype {like.dtype}, got {out.dtype}")
    if out.device != like.device:
        raise ValueError(f"out: expected device {like.device}, got {out.device}")
    # written through its own strides, so a strided view works too
    return out


def _bucket(n) -> int:
    return triton.next_power_of_2(max(1, n))


# --------------------------------------------------------------------------- launchers


def _launch_rows(kernel, a, values, ptr, idx, perm, bias, out, n_rows: int) -> None:
    B = a.shape[0]
    if B == 0 or n_rows == 0:
        return
    nnz = idx.numel()
    if B <= _MAX_ROWS_B:
        # decode: the multi-row kernel (see _csr_rows_kernel)
        rows_kernel = _csr_dds_rows_kernel if kernel is _csr_dds_kernel else _csr_dsd_rows_kernel
        torch.library.wrap_triton(rows_kernel)[lambda meta: (triton.cdiv(n_rows, meta["RB"]),)](
            a, values, ptr, idx, perm, bias, out, B, n_rows,
            a.stride(0), a.stride(1), out.stride(0), out.stride(1),
            _bucket(B), _bucket(triton.cdiv(nnz, n_rows)),
            HAS_PERM=perm is not None, HAS_BIAS=bias is not None, BT=_bucket(B),
        )
        return

    def grid(meta):
        return (n_rows * triton.cdiv(B, meta["BM"]),)

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
        a.stride(0),
        a.stride(1),
        out.stride(0),
        out.stride(1),
        _bucket(B),
        _bucket(triton.cdiv(nnz, n_rows)),
        HAS_PERM=perm is not None,
        HAS_BIAS=bias is not None,
    )


@_on_device
def csr_dds(x, values, crow, col, bias, out_features, out=None):
    """``y = x @ Wᵀ + bias`` with ``W [out, in]`` given by ``(values, crow, col)``.

    Args:
        x: ``[B, in]`` float32, bfloat16 or float16.
        values: ``[nnz]``, dtype of ``x``.
        crow: ``[out+1]`` int32; col: ``[nnz]`` int32 (a valid CSR index).
        bias: ``[out]`` in the dtype of ``x``, or None.
        out_features: ``out``.
        out: optional ``[B, out]`` buffer in the dtype of ``x``; every element is written.

    Returns:
        ``[B, out]`` in ``x.dtype`` (``out`` when given).

    Raises:
        TypeError: a wrong type or dtype.
        ValueError: a wrong shape or device.
    """
    x = _float("x", x, 2)
    _features("out_features", out_features)
    values = _float("values", values, 1, x.dtype)
    col = _index("col", col, values.numel())
    crow = _index("crow", crow, out_features + 1)
    if bias is not None:
        bias = _float("bias", bias, 1, x.dtype)
        if bias.numel() != out_features:
            raise ValueError(f"bias: expected {out_features} entries, got {bias.numel()}")
    _same_device(x, values=values, crow=crow, col=col, bias=bias)
    out = _out(out, (x.shape[0], out_features), x)
    x, values, crow, col = x.contiguous(), values.contiguous(), crow.contiguous(), col.contiguous()
    bias = bias.contiguous() if bias is not None else None
    _launch_rows(_csr_dds_kernel, x, values, crow, col, None, bias, out, out_features)
    return out


@_on_device
def csr_dsd(dy, values, t_crow, t_row, t_perm, in_features, out=None):
    """``dx = dy @ W`` through the transposed index.

    Args:
        dy: ``[B, out]`` float32, bfloat16 or float16.
        values: ``[nnz]`` in row-major order, dtype of ``dy``.
        t_crow: ``[in+1]``; t_row: ``[nnz]``; t_perm: ``[nnz]`` (all int32, a valid index).
        in_features: ``in``.
        out: optional ``[B, in]`` buffer in the dtype of ``dy``; every element is written.

    Returns:
        ``[B, in]`` in ``dy.dtype`` (``out`` when given).

    Raises:
        TypeError: a wrong type or dtype.
        ValueError: a wrong shape or device.
    """
    dy = _float("dy", dy, 2)
    _features("in_features", in_features)
    values = _float("values", values, 1, dy.dtype)
    t_row = _index("t_row", t_row, values.numel())
    t_perm = _index("t_perm", t_perm, values.numel())
    t_crow = _index("t_crow", t_crow, in_features + 1)
    _same_device(dy, values=values, t_crow=t_crow, t_row=t_row, t_perm=t_perm)
    out = _out(out, (dy.shape[0], in_features), dy)
    dy, values = dy.contiguous(), values.contiguous()
    t_crow, t_row, t_perm = t_crow.contiguous(), t_row.contiguous(), t_perm.contiguous()
    _launch_rows(_csr_dsd_kernel, dy, values, t_crow, t_row, t_perm, None, out, in_features)
    return out


@_on_device
def csr_sdd(dy, x, row, col, out=None):
    """Weight gradient on the mask: ``dvalues[k] = sum_b dy[b, row[k]] * x[b, col[k]]``.

    Args:
        dy: ``[B, out]``; x: ``[B, in]``; float32, bfloat16 or float16, same dtype.
        row, col: ``[nnz]`` int32 coordinates of the stored weights.
        out: optional ``[nnz]`` buffer in the dtype of ``x``; every element is written.

    Returns:
        ``[nnz]`` in ``x.dtype`` (``out`` when given).

    Raises:
        TypeError: a wrong type or dtype.
        ValueError: a wrong shape or device.
    """
    x = _float("x", x, 2)
    dy = _float("dy", dy, 2, x.dtype)
    if dy.shape[0] != x.shape[0]:
        raise ValueError(f"dy: expected {x.shape[0]} rows (the batch of x), got {dy.shape[0]}")
    col = _index("col", col, None)
    row = _index("row", row, col.numel())
    _same_device(x, dy=dy, row=row, col=col)
    nnz = col.numel()
    out = _out(out, (nnz,), x)
    if nnz == 0:
        return out
    dy, x, row, col = dy.contiguous(), x.contiguous(), row.contiguous(), col.contiguous()
    B = x.shape[0]

    def grid(meta):
        return (triton.cdiv(nnz, meta["BN"]),)

    torch.library.wrap_triton(_csr_sdd_kernel)[grid](
        dy,
        x,
        row,
        col,
        out,
        B,
        nnz,
        dy.stride(0),
        dy.stride(1),
        x.stride(0),
        x.stride(1),
        out.stride(0),
        _bucket(B),
        _bucket(nnz),
    )
    return out
