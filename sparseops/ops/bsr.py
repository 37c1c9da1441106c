"""torch.library ops for block-sparse weights (see ``formats.bsr`` for the layout), organised as ``ops.csr``.

- ``sparseops::bsr_dds``: forward ``y [B, out] = x [B, in] @ Wᵀ + b``;
- ``sparseops::bsr_dsd``: the input gradient ``dx [B, in] = dy @ W``, through Wᵀ's block index;
- ``sparseops::bsr_sdd``: the weight gradient on the stored blocks, ``[nblk, b, b]``.

The block size is ``values.shape[-1]`` (``bsr_sdd`` takes it as ``block``). Each public op is a
``triton_op`` (CUDA: the Triton kernels of ``kernels.bsr``, which mask the ragged last block);
elsewhere a host op whose CPU kernel is the C++ extension (fp32: it pads the activations to whole
blocks, runs, and slices) and whose default is the pure-torch reference.
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor

from .. import reference
from .._cpp import _C
from ._checks import check_operands, checked, dtypes_ok
from ..formats.bsr import BLOCK_SIZES, check_block
from .csr import _CPU, _check_index, _check_values, _eager_cpu, _eager_cuda, _np, _threads, _use_cpp, half_via_fp32, triton_op


def _padded(a: Tensor, n: int) -> Tensor:
    """``a [B, k]`` with zero columns up to ``n`` and contiguous rows (no copy when it already is)."""
    if a.shape[1] != n:
        return F.pad(a, (0, n - a.shape[1])).contiguous()
    return a if a.stride(1) == 1 or a.shape[1] <= 1 else a.contiguous()


def _cut(a: Tensor, n: int) -> Tensor:
    return a if a.shape[1] == n else a[:, :n].contiguous()


def _check_args(a_name: str, a: Tensor, values: Tensor, ptr_name: str, ptr: Tensor, features: int,
                bias: Optional[Tensor] = None) -> int:
    """The shapes every kernel relies on (the C++ one sizes its output from ``ptr``), checked before any runs,
    on CPU and CUDA alike; returns the block size.

    ``a`` (``x`` or ``dy``) is 2-D; ``values`` is ``[nblk, b, b]`` with ``b`` in ``BLOCK_SIZES``; the block
    grid ``ptr`` (``crow`` / ``t_crow``) has one entry more than ``features`` has blocks (the C++ kernel
    sizes its output from it); ``bias`` is ``[features]``.
    """
    if a.dim() != 2:
        raise ValueError(f"{a_name}: expected a 2-D tensor, got shape {tuple(a.shape)}")
    if values.dim() != 3 or values.shape[1] != values.shape[2] or values.shape[2] not in BLOCK_SIZES:
        raise ValueError(f"values: expected [nblk, b, b] with b in {BLOCK_SIZES}, got shape {tuple(values.shape)}")
    b = values.shape[2]
    if ptr.dim() != 1 or ptr.shape[0] != -(-features // b) + 1:
        raise ValueError(f"{ptr_name}: expected {-(-features // b) + 1} entries (a {b}-wide block grid over "
                         f"{features} features), got shape {tuple(ptr.shape)}")
    if bias is not None and (bias.dim() != 1 or bias.shape[0] != features):
        raise ValueError(f"bias: expected shape ({features},), got {tuple(bias.shape)}")
    return b


# ---- host ops ----


@torch.library.custom_op("sparseops::bsr_dds_host", mutates_args=())
def bsr_dds_host(x: Tensor, values: Tensor, crow: Tensor, col: Tensor, bias: Optional[Tensor], out_features: int) -> Tensor:
    return reference.bsr_dds(x, values, crow, col, bias, out_features)


@bsr_dds_host.register_kernel("cpu")
@checked(lambda x, values, crow, col, bias, *_: check_operands({}, same_dtype={"x": x, "values": values, "bias": bias}),
         ok=lambda x, values, crow, col, bias, *_: dtypes_ok(x, values, bias))
@half_via_fp32
def _bsr_dds_cpu(x, values, crow, col, bias, out_features):
    b = _check_args("x", x, values, "crow", crow, out_features, bias)
    if not _use_cpp(x, values, *(() if bias is None else (bias,))):
        _check_index("crow", crow, "col", col, -(-out_features // b), -(-x.shape[1] // b))
        _check_values(values, col.numel())
        return reference.bsr_dds(x, values, crow, col, bias, out_features)
    nbr = crow.shape[0] - 1
    xp = _padded(x, -(-x.shape[1] // b) * b)
    y = torch.empty(x.shape[0], nbr * b, dtype=torch.float32, device=_CPU)
    bp = None if bias is None else _np(F.pad(bias, (0, nbr * b - bias.shape[0])).contiguous())
    _C.bsr_dds(_np(xp), _np(values.contiguous()), _np(crow), _np(col), b, bp, _np(y),
               _threads(x.shape[0] * values.numel()))
    return _cut(y, out_features)


@bsr_dds_host.register_fake
def _(x, values, crow, col, bias, out_features):
    return x.new_empty(x.shape[0], out_features)


@torch.library.custom_op("sparseops::bsr_dsd_host", mutates_args=())
def bsr_dsd_host(dy: Tensor, values: Tensor, t_crow: Tensor, t_row: Tensor, t_perm: Tensor, in_features: int) -> Tensor:
    return reference.bsr_dsd(dy, values, t_crow, t_row, t_perm, in_features)


@bsr_dsd_host.register_kernel("cpu")
@checked(lambda dy, values, *_: check_operands({}, same_dtype={"dy": dy, "values": values}),
         ok=lambda dy, values, *_: dtypes_ok(dy, values))
@half_via_fp32
def _bsr_dsd_cpu(dy, values, t_crow, t_row, t_perm, in_features):
    b = _check_args("dy", dy, values, "t_crow", t_crow, in_features)
    if not _use_cpp(dy, values):
        _check_values(values, t_row.numel())
        _check_index("t_crow", t_crow, "t_row", t_row, -(-in_features // b), -(-dy.shape[1] // b), perm=t_perm,
                     nnz=values.shape[0])
        return reference.bsr_dsd(dy, values, t_crow, t_row, t_perm, in_features)
    nbc = t_crow.shape[0] - 1
    dyp = _padded(dy, -(-dy.shape[1] // b) * b)
    dx = torch.empty(dy.shape[0], nbc * b, dtype=torch.float32, device=_CPU)
    _C.bsr_dsd(_np(dyp), _np(values.contiguous()), _np(t_crow), _np(t_row), _np(t_perm), b, _np(dx),
               _threads(dy.shape[0] * values.numel()))
    return _cut(dx, in_features)


@bsr_dsd_host.register_fake
def _(dy, values, t_crow, t_row, t_perm, in_features):
    return dy.new_empty(dy.shape[0], in_features)


@torch.library.custom_op("sparseops::bsr_sdd_host", mutates_args=())
def bsr_sdd_host(dy: Tensor, x: Tensor, row: Tensor, col: Tensor, block: int) -> Tensor:
    return reference.bsr_sdd(dy, x, row, col, block)


@bsr_sdd_host.register_kernel("cpu")
@checked(lambda dy, x, *_: check_operands({}, same_dtype={"x": x, "dy": dy}), ok=lambda dy, x, *_: dtypes_ok(x, dy))
@half_via_fp32
def _bsr_sdd_cpu(dy, x, row, col, block):
    check_block(block)
    for name, t in (("dy", dy), ("x", x)):
        if t.dim() != 2:
            raise ValueError(f"{name}: expected a 2-D tensor, got shape {tuple(t.shape)}")
    if dy.shape[0] != x.shape[0]:
        raise ValueError(f"dy: expected {x.shape[0]} rows (as x), got {dy.shape[0]}")
    if not _use_cpp(dy, x):
        for name, t, lim in (("row", row, -(-dy.shape[1] // block)), ("col", col, -(-x.shape[1] // block))):
            if t.numel() != col.numel() or (t.numel() and (int(t.min()) < 0 or int(t.max()) >= lim)):
                raise ValueError(f"{name}: expected {col.numel()} block indices in [0, {lim}), got {t.numel()} "
                                 f"in [{int(t.min()) if t.numel() else 0}, {int(t.max()) if t.numel() else 0}]")
        return reference.bsr_sdd(dy, x, row, col, block)
    b = block
    dyp = _padded(dy, -(-dy.shape[1] // b) * b)
    xp = _padded(x, -(-x.shape[1] // b) * b)
    dv = torch.empty(row.shape[0], b, b, dtype=torch.float32, device=_CPU)
    _C.bsr_sdd(_np(dyp), _np(xp), _np(row), _np(col), b, _np(dv), _threads(x.shape[0] * dv.numel()))
    return dv


@bsr_sdd_host.register_fake
def _(dy, x, row, col, block):
    return x.new_empty(row.shape[0], block, block)


# ---- public ops: cuda -> triton, else -> host op ----


@triton_op("sparseops::bsr_dds")
def bsr_dds(x: Tensor, values: Tensor, crow: Tensor, col: Tensor, bias: Optional[Tensor], out_features: int) -> Tensor:
    """Forward ``y [B, out] = x [B, in] @ Wᵀ + bias`` for a block-sparse weight (``values [nblk, b, b]``)."""
    if x.device.type == "cuda":
        from ..kernels import bsr as K

        _check_args("x", x, values, "crow", crow, out_features, bias)
        return K.bsr_dds(x, values, crow, col, bias, out_features)
    return bsr_dds_host(x, values, crow, col, bias, out_features)


@triton_op("sparseops::bsr_dsd")
def bsr_dsd(dy: Tensor, values: Tensor, t_crow: Tensor, t_row: Tensor, t_perm: Tensor, in_features: int) -> Tensor:
    """Input gradient ``dx [B, in] = dy [B, out] @ W`` through Wᵀ's block index."""
    if dy.device.type == "cuda":
        from ..kernels import bsr as K

        _check_args("dy", dy, values, "t_crow", t_crow, in_features)
        return K.bsr_dsd(dy, values, t_crow, t_row, t_perm, in_features)
    return bsr_dsd_host(dy, values, t_crow, t_row, t_perm, in_features)


@triton_op("sparseops::bsr_sdd")
def bsr_sdd(dy: Tensor, x: Tensor, row: Tensor, col: Tensor, block: int) -> Tensor:
    """Weight gradient on the stored blocks, ``dvalues [nblk, b, b]``; no dense ``[out, in]`` gradient."""
    if x.device.type == "cuda":
        from ..kernels import bsr as K

        check_block(block)
        return K.bsr_sdd(dy, x, row, col, block)
    return bsr_sdd_host(dy, x, row, col, block)


# eager cpu calls go straight to the c++ kernels (see ops.csr)
bsr_dds.register_kernel("cpu")(_bsr_dds_cpu)
bsr_dsd.register_kernel("cpu")(_bsr_dsd_cpu)
bsr_sdd.register_kernel("cpu")(_bsr_sdd_cpu)


def dds(x, values, crow, col, bias, out_features: int) -> Tensor:
    if _eager_cpu(x):
        return _bsr_dds_cpu.unchecked(x, values, crow, col, bias, out_features)
    if _eager_cuda(x):
        return bsr_dds.body(x, values, crow, col, bias, out_features)
    return torch.ops.sparseops.bsr_dds(x, values, crow, col, bias, out_features)


def dsd(dy, values, t_crow, t_row, t_perm, in_features: int) -> Tensor:
    if _eager_cpu(dy):
        return _bsr_dsd_cpu.unchecked(dy, values, t_crow, t_row, t_perm, in_features)
    if _eager_cuda(dy):
        return bsr_dsd.body(dy, values, t_crow, t_row, t_perm, in_features)
    return torch.ops.sparseops.bsr_dsd(dy, values, t_crow, t_row, t_perm, in_features)


def sdd(dy, x, row, col, block: int) -> Tensor:
    if _eager_cpu(x):
        return _bsr_sdd_cpu.unchecked(dy, x, row, col, block)
    if _eager_cuda(x):
        return bsr_sdd.body(dy, x, row, col, block)
    return torch.ops.sparseops.bsr_sdd(dy, x, row, col, block)
