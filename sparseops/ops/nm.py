"""torch.library ops for N:M weights (see ``formats.nm`` for the layout), organised as ``ops.csr``.

- ``sparseops::nm_dds``: forward ``y = x Wᵀ + b``;
- ``sparseops::nm_sdd``: the weight gradient on the slots, ``[out, S]``;
- ``sparseops::nm_dsd``: the input gradient of a transposable weight, on the N:M kernel over ``Wᵀ``;
- ``sparseops::nm_dsd_csr``: the input gradient of any N:M weight, through the CSR of ``Wᵀ``.

Each public op is a ``triton_op`` (CUDA: the Triton kernels of ``kernels.nm``); elsewhere a host op
whose CPU kernel is the C++ extension (fp32) and whose default is the pure-torch reference.
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from .. import reference
from .._cpp import _C
from ._checks import check_operands, checked, dtypes_ok, mats_ok
from ..formats.nm import slots_per_row, unpack_positions
from . import _gpu
from .csr import _CPP_HALF, _CPU, _HALF, _check_index, _eager_cpu, _eager_cuda, _np, _threads, _use_cpp, half_via_fp32, triton_op


# ---- host ops ----


def _check_nm_index(name: str, idx: Tensor, rows: int, K: int, n: int, m: int, values=None, vname="values") -> None:
    """What the C++ binding checks, for the reference path (dtypes other than fp32): ``idx [rows, ceil(S/2)]``
    uint8 whose every slot's position is < m (S = ceil(K/m)·n), and ``values [rows, S]``."""
    if not (1 <= n < m <= 16):
        raise ValueError(f"n, m: expected 1 <= n < m <= 16, got n={n}, m={m}")
    S = slots_per_row(K, n, m)
    Sb = (S + 1) // 2
    if idx.dtype != torch.uint8 or tuple(idx.shape) != (rows, Sb):
        raise ValueError(f"{name}: expected a uint8 tensor of shape ({rows}, {Sb}) for {S} slots a row, "
                         f"got {idx.dtype} of shape {tuple(idx.shape)}")
    if values is not None and tuple(values.shape) != (rows, S):
        raise ValueError(f"{vname}: expected shape ({rows}, {S}), got {tuple(values.shape)}")
    pos = unpack_positions(idx, S)
    bad = pos >= m
    if bool(bad.any()):
        r, j = (int(v) for v in bad.nonzero()[0])
        raise ValueError(f"{name}: row {r} slot {j} holds position {int(pos[r, j])}, outside [0, m={m})")


@torch.library.custom_op("sparseops::nm_dds_host", mutates_args=())
def nm_dds_host(x: Tensor, values: Tensor, idx: Tensor, bias: Optional[Tensor], n: int, m: int) -> Tensor:
    return reference.nm_dds(x, values, idx, bias, n, m)


# rows up to which a bf16/fp16 weight is read as it is by the small-batch kernels (_C.nm_dds16)
NM16_MAX_ROWS = 7


@nm_dds_host.register_kernel("cpu")
@checked(lambda x, values, idx, bias, n, m: check_operands(
    {"x": x}, same_dtype={"x": x, "values": values, "bias": bias}, bias=bias, out_features=values.shape[0]),
    ok=lambda x, values, idx, bias, n, m: mats_ok(x) and dtypes_ok(x, values, bias) and (
        bias is None or bias.shape == values.shape[:1]))
def _nm_dds_cpu(x, values, idx, bias, n, m):
    if _C is not None and x.dtype in _HALF and values.dtype == x.dtype and 0 < x.shape[0] <= NM16_MAX_ROWS:
        # decode with a 16-bit weight: the values are read as they are (half the bytes of an fp32 copy, and
        # no copy); x and bias are small and converted here
        y = torch.empty(x.shape[0], values.shape[0], dtype=torch.float32, device=_CPU)
        b = None if bias is None else _np(bias.float().contiguous())
        _C.nm_dds16(_np(x.float()), _np(values.contiguous().view(torch.int16)), _CPP_HALF[x.dtype], _np(idx), n, m, b,
                    _np(y), _threads(x.shape[0] * values.numel()))
        return y.to(x.dtype)
    return _nm_dds_cpu32(x, values, idx, bias, n, m)


@half_via_fp32
def _nm_dds_cpu32(x, values, idx, bias, n, m):
    if not _use_cpp(x, values, *(() if bias is None else (bias,))):
        _check_nm_index("idx", idx, values.shape[0], x.shape[1], n, m, values)
        return reference.nm_dds(x, values, idx, bias, n, m)
    y = torch.empty(x.shape[0], values.shape[0], dtype=torch.float32, device=_CPU)
    b = None if bias is None else _np(bias.contiguous())
    _C.nm_dds(_np(x), _np(values.contiguous()), _np(idx), n, m, b, _np(y), _threads(x.shape[0] * values.numel()))
    return y


@nm_dds_host.register_fake
def _(x, values, idx, bias, n, m):
    return x.new_empty(x.shape[0], values.shape[0])


@torch.library.custom_op("sparseops::nm_sdd_host", mutates_args=())
def nm_sdd_host(dy: Tensor, x: Tensor, idx: Tensor, n: int, m: int) -> Tensor:
    return reference.nm_sdd(dy, x, idx, n, m)


@nm_sdd_host.register_kernel("cpu")
@checked(lambda dy, x, *_: check_operands({"x": x, "dy": dy}, same_dtype={"x": x, "dy": dy}),
         ok=lambda dy, x, *_: mats_ok(x, dy) and dtypes_ok(x, dy))
@half_via_fp32
def _nm_sdd_cpu(dy, x, idx, n, m):
    if not _use_cpp(dy, x):
        _check_nm_index("idx", idx, dy.shape[1], x.shape[1], n, m)
        return reference.nm_sdd(dy, x, idx, n, m)
    S = -(-x.shape[1] // m) * n
    dv = torch.empty(dy.shape[1], S, dtype=torch.float32, device=_CPU)
    _C.nm_sdd(_np(dy), _np(x), _np(idx), n, m, _np(dv), _threads(x.shape[0] * dv.numel()))
    return dv


@nm_sdd_host.register_fake
def _(dy, x, idx, n, m):
    return x.new_empty(dy.shape[1], -(-x.shape[1] // m) * n)


@torch.library.custom_op("sparseops::nm_dsd_host", mutates_args=())
def nm_dsd_host(dy: Tensor, values: Tensor, t_idx: Tensor, t_slot: Tensor, n: int, m: int) -> Tensor:
    return reference.nm_dsd(dy, values, t_idx, t_slot, n, m)


@nm_dsd_host.register_kernel("cpu")
@checked(lambda dy, values, *_: check_operands(
    {"dy": dy}, cols={"dy": (dy, values.shape[0], "the weight's out_features")},
    same_dtype={"dy": dy, "values": values}),
    ok=lambda dy, values, *_: mats_ok(dy) and dtypes_ok(dy, values) and dy.shape[1] == values.shape[0])
@half_via_fp32
def _nm_dsd_cpu(dy, values, t_idx, t_slot, n, m):
    if not _use_cpp(dy, values):
        _check_nm_index("t_idx", t_idx, t_idx.shape[0] if t_idx.dim() == 2 else -1, dy.shape[1], n, m, t_slot, "t_slot")
        if t_slot.numel() and (int(t_slot.min()) < -1 or int(t_slot.max()) >= values.numel()):
            raise ValueError(f"t_slot: entries must lie in [-1, {values.numel()}), "
                             f"got [{int(t_slot.min())}, {int(t_slot.max())}]")
        return reference.nm_dsd(dy, values, t_idx, t_slot, n, m)
    dx = torch.empty(dy.shape[0], t_idx.shape[0], dtype=torch.float32, device=_CPU)
    _C.nm_dsd(_np(dy), _np(values.contiguous()), _np(t_idx), _np(t_slot), n, m, _np(dx), _threads(dy.shape[0] * t_slot.numel()))
    return dx


@nm_dsd_host.register_fake
def _(dy, values, t_idx, t_slot, n, m):
    return dy.new_empty(dy.shape[0], t_idx.shape[0])


@torch.library.custom_op("sparseops::nm_dsd_csr_host", mutates_args=())
def nm_dsd_csr_host(dy: Tensor, values: Tensor, t_crow: Tensor, t_row: Tensor, t_perm: Tensor, in_features: int) -> Tensor:
    return reference.nm_dsd_csr(dy, values, t_crow, t_row, t_perm, in_features)


@nm_dsd_csr_host.register_kernel("cpu")
@checked(lambda dy, values, *_: check_operands({"dy": dy}, same_dtype={"dy": dy, "values": values}),
         ok=lambda dy, values, *_: mats_ok(dy) and dtypes_ok(dy, values))
@half_via_fp32
def _nm_dsd_csr_cpu(dy, values, t_crow, t_row, t_perm, in_features):
    if not _use_cpp(dy, values):
        _check_index("t_crow", t_crow, "t_row", t_row, in_features, dy.shape[1], perm=t_perm, nnz=values.numel())
        return reference.nm_dsd_csr(dy, values, t_crow, t_row, t_perm, in_features)
    dx = torch.empty(dy.shape[0], in_features, dtype=torch.float32, device=_CPU)
    _C.nm_dsd_csr(_np(dy), _np(values.contiguous()), _np(t_crow), _np(t_row), _np(t_perm), _np(dx),
                  _threads(dy.shape[0] * t_row.numel()))
    return dx


@nm_dsd_csr_host.register_fake
def _(dy, values, t_crow, t_row, t_perm, in_features):
    return dy.new_empty(dy.shape[0], in_features)


# ---- public ops: cuda -> triton, else -> host op ----


def _gather_t(values, t_slot):
    s = t_slot.long()
    flat = values.reshape(-1)
    return torch.where(s >= 0, flat[s.clamp(min=0)], torch.zeros((), dtype=flat.dtype, device=flat.device))


@triton_op("sparseops::nm_dds")
def nm_dds(x: Tensor, values: Tensor, idx: Tensor, bias: Optional[Tensor], n: int, m: int) -> Tensor:
    """Forward ``y [B, out] = x [B, in] @ Wᵀ + bias`` for an N:M weight (``values [out, S]``, ``idx``)."""
    if x.device.type == "cuda":
        if _gpu.use_dense(x.shape[0], "nm"):
            w = _gpu.nm_weight(values, idx, n, m, x.shape[1])
            return torch.nn.functional.linear(x, w, bias)
        from ..kernels import nm as K

        return K.nm_dds(x, values, idx, bias, values.shape[0], x.shape[1], n, m)
    return nm_dds_host(x, values, idx, bias, n, m)


@triton_op("sparseops::nm_sdd")
def nm_sdd(dy: Tensor, x: Tensor, idx: Tensor, n: int, m: int) -> Tensor:
    """Weight gradient on the slots: ``dvalues [out, S]``; no dense ``[out, in]`` gradient is formed."""
    if x.device.type == "cuda":
        from ..kernels import nm as K

        return K.nm_sdd(dy, x, idx, n, m, x.shape[1])
    return nm_sdd_host(dy, x, idx, n, m)


@triton_op("sparseops::nm_dsd")
def nm_dsd(dy: Tensor, values: Tensor, t_idx: Tensor, t_slot: Tensor, n: int, m: int) -> Tensor:
    """Input gradient ``dx [B, in] = dy @ W`` of a transposable weight, on the N:M kernel over ``Wᵀ``."""
    if dy.device.type == "cuda":
        if _gpu.use_dense(dy.shape[0], "nm"):
            return dy @ _gpu.nm_weight(_gather_t(values, t_slot), t_idx, n, m, dy.shape[1]).t()
        from ..kernels import nm as K

        return K.nm_dds(dy, _gather_t(values, t_slot), t_idx, None, t_idx.shape[0], dy.shape[1], n, m)
    return nm_dsd_host(dy, values, t_idx, t_slot, n, m)


@triton_op("sparseops::nm_dsd_csr")
def nm_dsd_csr(dy: Tensor, values: Tensor, t_crow: Tensor, t_row: Tensor, t_perm: Tensor, in_features: int) -> Tensor:
    """Input gradient ``dx [B, in] = dy @ W`` of any N:M weight, through the CSR of ``Wᵀ``."""
    if dy.device.type == "cuda":
        if _gpu.use_dense(dy.shape[0], "nm"):
            return dy @ _gpu.csr_weight_t(values.reshape(-1), t_crow, t_row, t_perm, dy.shape[1]).t()
        from ..kernels import csr as K

        vt = values.reshape(-1)[t_perm.long()]
        ident = torch.arange(t_perm.numel(), dtype=t_perm.dtype, device=t_perm.device)
        return K.csr_dsd(dy, vt, t_crow, t_row, ident, in_features)
    return nm_dsd_csr_host(dy, values, t_crow, t_row, t_perm, in_features)


# eager cpu calls go straight to the c++ kernels (see ops.csr)
nm_dds.register_kernel("cpu")(_nm_dds_cpu)
nm_sdd.register_kernel("cpu")(_nm_sdd_cpu)
nm_dsd.register_kernel("cpu")(_nm_dsd_cpu)
nm_dsd_csr.register_kernel("cpu")(_nm_dsd_csr_cpu)


def dds(x, values, idx, bias, n: int, m: int) -> Tensor:
    if _eager_cpu(x):
        return _nm_dds_cpu.unchecked(x, values, idx, bias, n, m)
    if _eager_cuda(x):
        return nm_dds.body(x, values, idx, bias, n, m)
    return torch.ops.sparseops.nm_dds(x, values, idx, bias, n, m)


def sdd(dy, x, idx, n: int, m: int) -> Tensor:
    if _eager_cpu(x):
        return _nm_sdd_cpu.unchecked(dy, x, idx, n, m)
    if _eager_cuda(x):
        return nm_sdd.body(dy, x, idx, n, m)
    return torch.ops.sparseops.nm_sdd(dy, x, idx, n, m)


def dsd(dy, values, t_idx, t_slot, n: int, m: int) -> Tensor:
    if _eager_cpu(dy):
        return _nm_dsd_cpu.unchecked(dy, values, t_idx, t_slot, n, m)
    if _eager_cuda(dy):
        return nm_dsd.body(dy, values, t_idx, t_slot, n, m)
    return torch.ops.sparseops.nm_dsd(dy, values, t_idx, t_slot, n, m)


def dsd_csr(dy, values, t_crow, t_row, t_perm, in_features: int) -> Tensor:
    if _eager_cpu(dy):
        return _nm_dsd_csr_cpu.unchecked(dy, values, t_crow, t_row, t_perm, in_features)
    if _eager_cuda(dy):
        return nm_dsd_csr.body(dy, values, t_crow, t_row, t_perm, in_features)
    return torch.ops.sparseops.nm_dsd_csr(dy, values, t_crow, t_row, t_perm, in_features)
