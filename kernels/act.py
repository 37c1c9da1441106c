"""Triton kernel for the activation-sparse forward, and its launcher.

The product is :func:`sparseops.reference.act.act_dds` (the oracle):
``y [T, out] = s(x) [T, in] @ weight_t [in, out] (+ bias)``, where ``v = relu(x)`` when
``relu`` is set (else ``v = x``), input ``j`` of a token is active when
``|v[j]| > threshold`` (one threshold, or one per input channel) and ``s(x)`` is ``v`` on
the active inputs and 0 elsewhere. ``weight_t = Wᵀ``: row ``j`` holds the weights that
input ``j`` multiplies, contiguous.

The algorithm, a split-K GEMV in the style of TEAL, made to serve a few tokens at once:

- **Chunk-level sparsity.** The point is memory traffic: at decode the weight is read once
  per step and nothing is reused. Rows of ``weight_t`` are read for the union of the active
  inputs of a tile of tokens (BlockFFN's chunk-level sparsity), so a row that no token of the
  tile activates is never read from memory. A token for which a read row is inactive
  multiplies it by ``s(x) = 0``. The union is taken per token tile, not over all ``T`` tokens, so a large ``T`` loses no more
  sparsity than one tile's worth.
- **Split-K.** The grid is (output tiles of ``BO`` columns × token tiles of ``BT`` rows,
  ``SPLIT``). Split ``s`` owns a contiguous run of the input dim (whole ``BK`` chunks in the
  tile kernel, a multiple of 16 inputs in the GEMV) and loops over it. With ``SPLIT == 1`` the program adds the bias and writes ``y`` in the dtype
  of ``x``. With ``SPLIT > 1`` every split writes its fp32 partial sum to a
  ``[SPLIT, T, out]`` buffer (a split whose run is empty writes zeros) and a second kernel
  sums the partials in split order, adds the bias and rounds once: deterministic, no
  atomics and no zero-fill, so autotuning may rerun the kernel.
  ``SPLIT`` comes from the shape (see ``_split``): about 16 programs a SM (a program's loop is a
  chain of dependent loads, so many must be in flight), never less than ``_MIN_SPLIT_K`` inputs a
  split, and partials of at most a tenth of the weight's bytes.
- **Decode (``T <= 8``): the active rows first, then the product over them alone.** A first
  kernel (``_act_compact_kernel``, one program a split) writes each split's list of the inputs
  that some token activates, in increasing order (a prefix sum over 256-input blocks), and its
  length. The GEMV kernel (``_act_gemv_kernel``) then loops over ``BK`` entries of its split's list
  at a time: its loop has as many steps as the density asks, every row it loads is used, and the
  loads of successive steps do not depend on each other (the indices come from the list, not from
  the step before), so ``num_stages`` keeps several in flight. The tile product is an elementwise
  multiply and sum, ``tl.sum(xs[:, :, None] * w[None, :, :], axis=1)``, in fp32, over one token
  tile of ``T`` rounded up to a power of two: ``tl.dot`` needs 16 rows and would waste 15 of them
  at ``T = 1``. Measured on an H100 (bf16, 4096→11008, one token, CUDA-graph replay, dense 0.047
  ms), the tile kernel this replaced took 0.043 / 0.037 / 0.031 / 0.029 ms at 50 / 70 / 90 / 99%:
  flat, because its loop walked every ``BK`` chunk of its split, active or not, each step a chain
  of two dependent loads (``x``, then the rows it activates).
- **More tokens (``T > 8``).** The tile kernel: a program takes a ``[BT, BK]`` tile of ``x``,
  applies the sparsifier in registers, ORs the active mask over its ``BT`` tokens and loads the
  ``[BK, BO]`` tile of ``weight_t`` with that union as its row mask, then ``tl.dot`` with a ``BT``
  of 16 or more (autotuned).

Precision: the sum accumulates in fp32 and the output is rounded once to the input dtype.
fp32 operands go through ``tl.dot`` with ``input_precision="ieee"`` (no TF32); bf16 and fp16
operands use the tensor cores in their own dtype (``s(x)`` is ``x`` or 0, so it is exact in
that dtype). The interpreter's ``tl.dot`` gets bf16 wrong, so there bf16 tiles are upcast to
fp32 before the dot. The comparison ``|v| > threshold`` is made in float32 (a 16-bit ``|v|`` widens
exactly), as the CPU kernels and the reference make it: a threshold rounded to bf16 could round up past
an input above it.

Addresses are computed in int64 and every dimension is masked.

The launcher only uses torch ops and ``torch.library.wrap_triton`` launches, so it can be the
body of a ``torch.library.triton_op``.
"""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

from .csr import _bucket, _tune, _float, _out, _same_device, _on_device

_INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"

# the largest T served by the multiply-and-sum tile product; above it, tl.dot
_MAX_FMA_T = 8

# the interpreter cannot benchmark several configs. its cost grows with the number of
# programs, so the tiles are wide; BK stays small so that test shapes of 37 still run
# several loop iterations with a masked tail. tl.dot needs every dim >= 16
if _INTERPRET:
    _FMA_CONFIGS = [triton.Config({"BO": 32, "BK": 32}, num_warps=4)]
    _DOT_CONFIGS = [triton.Config({"BT": 16, "BO": 32, "BK": 32}, num_warps=4)]
    # a few programs are enough to run the split path on test shapes
    _TARGET_PROGRAMS, _MIN_SPLIT_K, _NOMINAL_BO = 16, 64, 32
else:
    # the gemv product is a [BT, BK, BO] tile, BT <= 8, over BK of the compacted active rows: the
    # small tiles are there for BT = 8, the wide ones for BT = 1, and the T bucket keys the choice.
    # The rows' indices come from a list, not from the loop's own loads, so the loads of
    # successive steps are independent and num_stages can keep several in flight
    _FMA_CONFIGS = [
        triton.Config({"BO": 32, "BK": 64}, num_warps=4),
        triton.Config({"BO": 64, "BK": 32}, num_warps=4),
        triton.Config({"BO": 64, "BK": 64}, num_warps=4),
        triton.Config({"BO": 128, "BK": 32}, num_warps=4),
        triton.Config({"BO": 128, "BK": 64}, num_warps=8),
        triton.Config({"BO": 256, "BK": 16}, num_warps=4, num_stages=3),
        triton.Config({"BO": 256, "BK": 32}, num_warps=8),
        # wide rows: an active row of weight_t is read in 1 to 2 KB runs (bf16), the access a
        # DRAM page favours
        triton.Config({"BO": 512, "BK": 8}, num_warps=4, num_stages=4),
        triton.Config({"BO": 512, "BK": 16}, num_warps=4, num_stages=3),
        triton.Config({"BO": 512, "BK": 32}, num_warps=8),
        triton.Config({"BO": 1024, "BK": 8}, num_warps=4, num_stages=3),
        triton.Config({"BO": 1024, "BK": 16}, num_warps=8),
    ]
    _DOT_CONFIGS = [
        triton.Config({"BT": 16, "BO": 64, "BK": 64}, num_warps=4),
        triton.Config({"BT": 16, "BO": 128, "BK": 64}, num_warps=4),
        triton.Config({"BT": 32, "BO": 64, "BK": 64}, num_warps=4),
        triton.Config({"BT": 64, "BO": 64, "BK": 64}, num_warps=4),
        triton.Config({"BT": 64, "BO": 128, "BK": 32}, num_warps=4),
        triton.Config({"BT": 128, "BO": 128, "BK": 32}, num_warps=8),
    ]
    # the split count: many programs in flight (a tile-kernel program's loop is a chain of
    # dependent loads), against the partials each split adds. The split is set before autotuning
    # picks BO, for a nominal BO of 512: the narrow tiles get more programs than that, never fewer.
    # Measured on an H100 (4096→11008 bf16, one token, CUDA-graph replay, dense 0.047 ms), GEMV
    # at 50 / 70 / 90 / 99% sparsity: splits of at least 64 inputs (64 splits) 0.048 / 0.039 /
    # 0.029 / 0.024 ms; of 128 (32 splits) 0.041 / 0.032 / 0.023 / 0.018; of 256 (16 splits)
    # 0.041 / 0.031 / 0.020 / 0.016; of 512 (8 splits) 0.051 / 0.037 / 0.022 / 0.014
    _TARGET_PROGRAMS, _MIN_SPLIT_K, _NOMINAL_BO = 2048, 256, 512

# the partials' bytes cap the split on a GPU; the interpreter's test shapes are too small for
# it and must still run the split path
_CAP_PARTIALS = not _INTERPRET

# a split is one grid dim: the cap keeps it well inside CUDA's 65535
_MAX_SPLIT = 64

# the fp32 partials' traffic (written and read back) is at most 1 / this of the weight's bytes
_PARTIALS_FRACTION = 10

# the sizes are power-of-two buckets, so a new token count does not retune every step
_DDS_KEYS = ["T_BUCKET", "IN_BUCKET", "OUT_BUCKET"]


# --------------------------------------------------------------------------- kernels


@triton.jit
def _act_dds_tile_kernel(
    x_ptr,  # [T, in]
    w_ptr,  # [in, out], unit column stride
    thr_ptr,  # [in] or one element (stride_thr == 0)
    bias_ptr,  # [out], read only when HAS_BIAS
    out_ptr,  # [T, out] y (SPLIT == 1) or [SPLIT, T, out] fp32 partials
    T,
    n_in,
    n_out,
    stride_xt,
    stride_xk,
    stride_wk,
    stride_thr,
    stride_os,
    stride_ot,
    stride_oo,
    T_BUCKET,  # autotune key only
    IN_BUCKET,  # autotune key only
    OUT_BUCKET,  # autotune key only
    RELU: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    UPCAST: tl.constexpr,  # bf16 under the interpreter: dot in fp32
    IEEE: tl.constexpr,  # fp32 operands: no TF32
    BT: tl.constexpr,
    BO: tl.constexpr,
    BK: tl.constexpr,
):
    pid = tl.program_id(0)
    split = tl.program_id(1)
    n_split = tl.num_programs(1)
    # output tiles vary fastest, so programs running together share one tile of x in L2
    n_oblk = tl.cdiv(n_out, BO)
    oblk = pid % n_oblk
    tblk = pid // n_oblk
    offs_t = tblk.to(tl.int64) * BT + tl.arange(0, BT)  # [BT]
    offs_o = oblk.to(tl.int64) * BO + tl.arange(0, BO)  # [BO]
    mask_t = offs_t < T
    mask_o = offs_o < n_out
    x_rows = x_ptr + offs_t[:, None] * stride_xt  # [BT, 1]
    w_cols = w_ptr + offs_o[None, :]  # [1, BO]

    # this split's run of whole BK chunks; the last runs may be short or empty
    per_split = tl.cdiv(tl.cdiv(n_in, BK), n_split).to(tl.int64) * BK
    k_start = split.to(tl.int64) * per_split
    k_end = tl.minimum(k_start + per_split, n_in)

    acc = tl.zeros([BT, BO], dtype=tl.float32)
    for k0 in range(k_start, k_end, BK):
        offs_k = k0 + tl.arange(0, BK)  # [BK] int64
        mask_k = offs_k < k_end
        tile_mask = mask_t[:, None] & mask_k[None, :]  # [BT, BK]
        x = tl.load(x_rows + offs_k[None, :] * stride_xk, mask=tile_mask, other=0.0)  # [BT, BK]
        v = x.to(tl.float32)
        if RELU:
            v = tl.where(v > 0, v, 0.0)
        # compared in float32, as the reference and the CPU kernels compare
        thr = tl.load(thr_ptr + offs_k * stride_thr, mask=mask_k, other=0.0)  # [BK]
        thr = thr.to(tl.float32)
        # the padding is never active, even when the threshold is negative
        active = (tl.abs(v) > thr[None, :]) & tile_mask  # [BT, BK]
        xs = tl.where(active, v, 0.0)  # [BT, BK] s(x)
        # the union over the tile's tokens: a row that none activates is never read
        rows = tl.max(active.to(tl.int32), axis=0) > 0  # [BK]
        w = tl.load(
            w_cols + offs_k[:, None] * stride_wk, mask=rows[:, None] & mask_o[None, :], other=0.0
        )  # [BK, BO]
        if UPCAST:
            w = w.to(tl.float32)
        else:
            # exact: s(x) is x or 0
            xs = xs.to(w.dtype)
        if IEEE:
            acc = tl.dot(xs, w, acc, input_precision="ieee")
        else:
            acc = tl.dot(xs, w, acc)

    if HAS_BIAS:
        acc += tl.load(bias_ptr + offs_o, mask=mask_o, other=0.0).to(tl.float32)[None, :]
    out = out_ptr + split.to(tl.int64) * stride_os + offs_t[:, None] * stride_ot + offs_o[None, :] * stride_oo
    tl.store(out, acc.to(out_ptr.dtype.element_ty), mask=mask_t[:, None] & mask_o[None, :])


_act_dds_dot_kernel = triton.autotune(configs=_tune(_DOT_CONFIGS), key=_DDS_KEYS)(_act_dds_tile_kernel)


# the inputs the compaction kernel reads a step
_COMPACT_BLOCK = 32 if _INTERPRET else 256


@triton.jit
def _act_compact_kernel(
    x_ptr,  # [T, in]
    thr_ptr,  # [in] or one element (stride_thr == 0)
    idx_ptr,  # [SPLIT * per] int32: split s's list of active inputs starts at s * per
    cnt_ptr,  # [SPLIT] int32: the length of each list
    T,
    n_in,
    per,  # the inputs a split owns
    stride_xt,
    stride_xk,
    stride_thr,
    RELU: tl.constexpr,
    BT: tl.constexpr,  # T rounded up to a power of two
    CB: tl.constexpr,
):
    # the union over the T tokens of the active inputs of split s, in increasing order
    split = tl.program_id(0)
    k_start = split.to(tl.int64) * per
    k_end = tl.minimum(k_start + per, n_in)
    offs_t = tl.arange(0, BT)
    mask_t = offs_t < T
    x_rows = x_ptr + offs_t[:, None].to(tl.int64) * stride_xt  # [BT, 1]
    count = tl.full([], 0, dtype=tl.int32)
    for k0 in range(k_start, k_end, CB):
        offs_k = k0 + tl.arange(0, CB)  # [CB] int64
        mask_k = offs_k < k_end
        tile_mask = mask_t[:, None] & mask_k[None, :]
        v = tl.load(x_rows + offs_k[None, :] * stride_xk, mask=tile_mask, other=0.0).to(tl.float32)
        if RELU:
            v = tl.where(v > 0, v, 0.0)
        thr = tl.load(thr_ptr + offs_k * stride_thr, mask=mask_k, other=0.0).to(tl.float32)
        active = (tl.abs(v) > thr[None, :]) & tile_mask  # [BT, CB]
        rows = tl.max(active.to(tl.int32), axis=0)  # [CB] 0 or 1
        pos = count + tl.cumsum(rows, axis=0) - rows  # exclusive prefix: each active row's slot
        tl.store(idx_ptr + k_start + pos, offs_k.to(tl.int32), mask=rows > 0)
        count += tl.sum(rows, axis=0)
    tl.store(cnt_ptr + split, count)


@triton.jit
def _act_gemv_kernel(
    x_ptr,  # [T, in]
    w_ptr,  # [in, out], unit column stride
    thr_ptr,  # [in] or one element (stride_thr == 0)
    idx_ptr,  # [SPLIT * per] int32 from _act_compact_kernel
    cnt_ptr,  # [SPLIT] int32
    bias_ptr,  # [out], read only when HAS_BIAS
    out_ptr,  # [T, out] y (SPLIT == 1) or [SPLIT, T, out] fp32 partials
    T,
    n_out,
    per,
    stride_xt,
    stride_xk,
    stride_wk,
    stride_thr,
    stride_os,
    stride_ot,
    stride_oo,
    T_BUCKET,  # autotune key only
    IN_BUCKET,  # autotune key only
    OUT_BUCKET,  # autotune key only
    RELU: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    BT: tl.constexpr,  # T rounded up to a power of two: one token tile
    BO: tl.constexpr,
    BK: tl.constexpr,
):
    # split s's sum over its list of active rows only: the loop's length follows the density,
    # and every row it loads is one that some token uses
    oblk = tl.program_id(0)
    split = tl.program_id(1)
    offs_t = tl.arange(0, BT).to(tl.int64)
    offs_o = oblk.to(tl.int64) * BO + tl.arange(0, BO)  # [BO]
    mask_t = offs_t < T
    mask_o = offs_o < n_out
    x_rows = x_ptr + offs_t[:, None] * stride_xt  # [BT, 1]
    w_cols = w_ptr + offs_o[None, :]  # [1, BO]
    rows = idx_ptr + split.to(tl.int64) * per
    n = tl.load(cnt_ptr + split)

    acc = tl.zeros([BT, BO], dtype=tl.float32)
    for i in range(0, n, BK):
        offs_i = i + tl.arange(0, BK)
        mask_i = offs_i < n
        k = tl.load(rows + offs_i, mask=mask_i, other=0).to(tl.int64)  # [BK]
        tile_mask = mask_t[:, None] & mask_i[None, :]
        v = tl.load(x_rows + k[None, :] * stride_xk, mask=tile_mask, other=0.0).to(tl.float32)
        if RELU:
            v = tl.where(v > 0, v, 0.0)
        thr = tl.load(thr_ptr + k * stride_thr, mask=mask_i, other=0.0).to(tl.float32)
        # a row in the union may be inactive for some tokens: s(x) is 0 there
        xs = tl.where((tl.abs(v) > thr[None, :]) & tile_mask, v, 0.0)  # [BT, BK]
        w = tl.load(w_cols + k[:, None] * stride_wk, mask=mask_i[:, None] & mask_o[None, :], other=0.0)
        acc += tl.sum(xs[:, :, None] * w.to(tl.float32)[None, :, :], axis=1)

    if HAS_BIAS:
        acc += tl.load(bias_ptr + offs_o, mask=mask_o, other=0.0).to(tl.float32)[None, :]
    out = out_ptr + split.to(tl.int64) * stride_os + offs_t[:, None] * stride_ot + offs_o[None, :] * stride_oo
    tl.store(out, acc.to(out_ptr.dtype.element_ty), mask=mask_t[:, None] & mask_o[None, :])


_act_gemv_tuned = triton.autotune(configs=_tune(_FMA_CONFIGS), key=_DDS_KEYS)(_act_gemv_kernel)


_SUM_BLOCK = 1024


@triton.jit
def _split_sum_kernel(
    part_ptr,  # [SPLIT, T, out] fp32, unit stride along out
    bias_ptr,  # [out], read only when HAS_BIAS
    out_ptr,  # [T, out]
    n_split,
    T,
    n_out,
    stride_ps,
    stride_pt,
    stride_ot,
    stride_oo,
    HAS_BIAS: tl.constexpr,
    BLOCK: tl.constexpr,
):
    # y = the splits' partials summed in split order (deterministic) + bias, rounded once
    i = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = i < T * n_out
    t = i // n_out
    o = i % n_out
    acc = tl.zeros([BLOCK], dtype=tl.float32)
    for s in range(0, n_split):
        acc += tl.load(part_ptr + s * stride_ps + t * stride_pt + o, mask=mask, other=0.0)
    if HAS_BIAS:
        acc += tl.load(bias_ptr + o, mask=mask, other=0.0).to(tl.float32)
    tl.store(out_ptr + t * stride_ot + o * stride_oo, acc.to(out_ptr.dtype.element_ty), mask=mask)


# --------------------------------------------------------------------------- checks


def _threshold(t, in_features: int, dtype: torch.dtype) -> torch.Tensor:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"threshold: expected a torch.Tensor, got {type(t).__name__}")
    if t.dtype not in (torch.float32, dtype):
        raise TypeError(f"threshold: expected dtype float32 or {dtype} (the dtype of x), got {t.dtype}")
    if tuple(t.shape) not in ((), (in_features,)):
        raise ValueError(f"threshold: expected shape () or ({in_features},) (one per input), got {tuple(t.shape)}")
    return t


def _split(T: int, in_features: int, out_features: int, bt: int, elem: int = 2) -> int:
    """How many K splits: enough programs to fill the GPU, each split at least ``_MIN_SPLIT_K``
    inputs, and the fp32 partials (written and read back, ``8 * split * T * out`` bytes) at most
    a tenth of the ``in * out * elem`` bytes of the weight."""
    tiles = triton.cdiv(out_features, _NOMINAL_BO) * triton.cdiv(T, bt)
    want = triton.cdiv(_TARGET_PROGRAMS, tiles)
    by_bytes = (in_features * elem) // (8 * _PARTIALS_FRACTION * max(T, 1)) if _CAP_PARTIALS else _MAX_SPLIT
    return max(1, min(want, in_features // _MIN_SPLIT_K, _MAX_SPLIT, by_bytes))


# --------------------------------------------------------------------------- launchers


@_on_device
def act_dds(x, weight_t, bias, threshold, relu: bool, out=None):
    """``y = s(x) @ weight_t + bias``, reading only the rows of ``weight_t`` that some token activates.

    ``v = relu(x)`` if ``relu`` else ``x``; input ``j`` of a token is active when
    ``|v[j]| > threshold`` (compared in float32); ``s(x)`` is ``v``
    there and 0 elsewhere.

    Args:
        x: ``[T, in]`` float32, bfloat16 or float16, any strides; any ``T >= 0`` (built for 1 to 32).
        weight_t: ``[in, out]`` = ``Wᵀ`` in the dtype of ``x``, ``stride(1) == 1``, any row stride.
        bias: ``[out]`` in the dtype of ``x``, or None.
        threshold: ``[]`` (one for all inputs) or ``[in]`` (one per input channel), float32 or
            the dtype of ``x``.
        relu: apply ReLU before thresholding.
        out: optional ``[T, out]`` buffer in the dtype of ``x`` (any strides); every element is written.

    Returns:
        ``[T, out]`` in ``x.dtype`` (``out`` when given).

    Raises:
        TypeError: a wrong type or dtype.
        ValueError: a wrong shape, stride or device.
    """
    x = _float("x", x, 2)
    T, in_features = x.shape
    weight_t = _float("weight_t", weight_t, 2, x.dtype)
    if weight_t.shape[0] != in_features:
        raise ValueError(
            f"weight_t: expected {in_features} rows (the columns of x), got shape {tuple(weight_t.shape)}"
        )
    out_features = weight_t.shape[1]
    if out_features > 1 and weight_t.stride(1) != 1:
        raise ValueError(f"weight_t: expected stride(1) == 1 (contiguous rows), got strides {weight_t.stride()}")
    if bias is not None:
        bias = _float("bias", bias, 1, x.dtype)
        if bias.numel() != out_features:
            raise ValueError(f"bias: expected {out_features} entries (the columns of weight_t), got {bias.numel()}")
        bias = bias.contiguous()  # the kernels read bias_ptr + o
    threshold = _threshold(threshold, in_features, x.dtype)
    if not isinstance(relu, bool):
        raise TypeError(f"relu: expected a bool, got {type(relu).__name__}")
    _same_device(x, weight_t=weight_t, bias=bias, threshold=threshold)
    out = _out(out, (T, out_features), x)
    if T == 0 or out_features == 0:
        return out
    if in_features == 0:
        # no inputs: y is the bias, or 0
        if bias is None:
            out.zero_()
        else:
            out.copy_(bias.expand(T, out_features))
        return out

    gemv = T <= _MAX_FMA_T
    # gemv: one token tile of T rounded up to a power of two; dot: the nominal token tile of its
    # configs, for the split count only
    bt = triton.next_power_of_2(T) if gemv else 32
    split = _split(T, in_features, out_features, bt, x.element_size())
    stride_thr = threshold.stride(0) if threshold.dim() else 0

    if split == 1:
        # one program owns each output element: bias and rounding in the kernel
        dst, has_bias, strides = out, bias is not None, (0, out.stride(0), out.stride(1))
    else:
        dst = torch.empty((split, T, out_features), dtype=torch.float32, device=x.device)
        has_bias, strides = False, dst.stride()
    keys = (_bucket(T), _bucket(in_features), _bucket(out_features))

    if gemv:
        # each split's list of the rows some token activates, then the product over those rows alone
        per = triton.cdiv(triton.cdiv(in_features, 16), split) * 16
        idx = torch.empty(split * per, dtype=torch.int32, device=x.device)
        cnt = torch.empty(split, dtype=torch.int32, device=x.device)
        torch.library.wrap_triton(_act_compact_kernel)[(split,)](
            x, threshold, idx, cnt, T, in_features, per, x.stride(0), x.stride(1), stride_thr,
            RELU=relu, BT=bt, CB=_COMPACT_BLOCK,
        )
        torch.library.wrap_triton(_act_gemv_tuned)[lambda meta: (triton.cdiv(out_features, meta["BO"]), split)](
            x, weight_t, threshold, idx, cnt, bias if has_bias else None, dst,
            T, out_features, per, x.stride(0), x.stride(1), weight_t.stride(0), stride_thr, *strides, *keys,
            RELU=relu, HAS_BIAS=has_bias, BT=bt,
        )
    else:
        def grid(meta):
            return (triton.cdiv(out_features, meta["BO"]) * triton.cdiv(T, meta["BT"]), split)

        torch.library.wrap_triton(_act_dds_dot_kernel)[grid](
            x,
            weight_t,
            threshold,
            bias if has_bias else None,
            dst,
            T,
            in_features,
            out_features,
            x.stride(0),
            x.stride(1),
            weight_t.stride(0),
            stride_thr,
            *strides,
            *keys,
            RELU=relu,
            HAS_BIAS=has_bias,
            UPCAST=_INTERPRET and x.dtype == torch.bfloat16,
            IEEE=x.dtype == torch.float32 or (_INTERPRET and x.dtype == torch.bfloat16),
        )
    if split > 1:
        # the deterministic reduction of the splits in fp32, the bias and the rounding: one launch
        torch.library.wrap_triton(_split_sum_kernel)[(triton.cdiv(T * out_features, _SUM_BLOCK),)](
            dst, bias, out, split, T, out_features, dst.stride(0), dst.stride(1), out.stride(0), out.stride(1),
            HAS_BIAS=bias is not None, BLOCK=_SUM_BLOCK,
        )
    return out
