"""torch.library ops for unstructured CSR weights: schema, device dispatch, fake impls.

Each public op (``sparseops::csr_dds``, ``csr_dsd``, ``csr_sdd``) is a ``triton_op``: on CUDA
its body calls the Triton launcher through ``wrap_triton``, so torch.compile sees the kernel;
on every other device it calls a host op (``sparseops::csr_*_host``), an opaque custom op
whose CPU kernel is the C++ extension (fp32) and whose default kernel is the pure-torch
reference (other dtypes, other devices, or a build without C++). In eager mode on CPU the
public op dispatches to the C++ kernel directly.

The ops are not differentiable by themselves: ``sparseops.autograd`` composes them into
the forward and SparseProp-style backward of a sparse linear layer.
"""

from __future__ import annotations

import collections
import threading
from typing import Optional

import numpy as np
import torch
from torch import Tensor

from .. import reference
from .._cpp import _C
from ._checks import check_operands, checked, dtypes_ok, mats_ok
from . import _gpu

# the device of the CPU kernels' buffers, named explicitly (a script may set another default device);
# a device object, not the string: parsing "cpu" costs ~0.3 us a call
_CPU = torch.device("cpu")


# NOTE: an openmp region costs a wake-up of every thread, and on a loaded 2-core machine one
# thread can wait a whole scheduler slice: an 8x16x16 product took 8.5 ms with 2 threads and
# 5 us with 1. below ~32k multiply-adds per thread the extra threads cannot pay for themselves.
_MIN_WORK_PER_THREAD = 1 << 15


def _threads(work: int) -> int:
    return max(1, min(torch.get_num_threads(), work // _MIN_WORK_PER_THREAD))


def _use_cpp(*tensors: Tensor) -> bool:
    return _C is not None and all(t.dtype == torch.float32 for t in tensors)


_HALF = (torch.bfloat16, torch.float16)
# the dtype names the bindings that read a 16-bit weight natively take
_CPP_HALF = {torch.bfloat16: "bfloat16", torch.float16: "float16"}

# fp32 staging buffers for half_via_fp32, per thread: a fresh 90 MB fp32 copy costs ~45 ms in page faults
# here (a weight's values at 4096->11008, 2:4), a copy into a buffer that is already mapped ~6 ms. buffers
# of at least _STAGE_MIN elements are kept, for the _STAGE_KEEP most recently used (size, slot) pairs, one
# per argument of a call; they never leave the call (the kernels allocate their outputs). at most
# _STAGE_KEEP buffers a thread stay mapped between calls: that is the memory this costs.
_STAGE_MIN = 1 << 18
_STAGE_KEEP = 4
_stage_pool = threading.local()


class _staging:
    def __enter__(self):
        pool = getattr(_stage_pool, "bufs", None)
        if pool is None:
            pool = _stage_pool.bufs = collections.OrderedDict()
        self.pool, self.used = pool, []
        return self.stage

    def stage(self, t: Tensor) -> Tensor:
        n = t.numel()
        if n < _STAGE_MIN or t.device.type != "cpu":
            return t.float()
        key = (n, sum(1 for u in self.used if u[0] == n))  # a second argument of the same size gets its own
        buf = self.pool.pop(key, None)
        if buf is None:
            # a normal tensor even under inference_mode: an inference tensor refuses the in-place copy of a
            # later call outside it, and a normal one takes copies in both
            with torch.inference_mode(False):
                buf = torch.empty(n, dtype=torch.float32, device=_CPU)
        self.used.append(key)
        self.pool[key] = buf  # most recent last
        while len(self.pool) > _STAGE_KEEP + len(self.used):
            self.pool.popitem(last=False)
        return buf.view(t.shape).copy_(t)

    def __exit__(self, *exc):
        while len(self.pool) > _STAGE_KEEP:
            self.pool.popitem(last=False)
        return False


def half_via_fp32(kernel):
    """Wraps a CPU kernel function: 16-bit float arguments run the fp32 C++ kernel.

    When the first floating-point tensor argument is bf16 or fp16 (and ``_C`` is built), every bf16/fp16
    tensor argument is converted to fp32, the kernel runs (in fp32, as the reference accumulates), and
    every floating-point tensor it returns is rounded once to that first argument's dtype, the dtype
    the reference returns. Index tensors are passed through; anything else calls the kernel as is.

    NOTE: the conversions cost a pass over the 16-bit operands, weights included, on every call (into
    reused fp32 buffers, see ``_staging``): a bf16 layer's C++ path reads about three times the bytes of a
    native bf16 kernel, which the kernels do not have yet. The pure-torch reference it replaces was 5-100x
    slower than dense bf16 ``F.linear``.
    """

    def run(*args):
        first = next((a for a in args if isinstance(a, Tensor) and a.is_floating_point()), None)
        if _C is None or first is None or first.dtype not in _HALF:
            return kernel(*args)
        dt = first.dtype
        with _staging() as stage:
            out = kernel(*(stage(a) if isinstance(a, Tensor) and a.dtype in _HALF else a for a in args))
        if isinstance(out, tuple):
            return tuple(o.to(dt) if isinstance(o, Tensor) and o.is_floating_point() else o for o in out)
        return out.to(dt)

    run.__name__ = kernel.__name__
    run.__doc__ = kernel.__doc__
    run.__wrapped__ = kernel
    return run


class _ArrayView:
    """An ``__array_interface__`` over a tensor's memory; it keeps the tensor alive as the array's base."""

    __slots__ = ("__array_interface__", "tensor")


# numpy type strings of the dtypes the bindings take; any other dtype goes through Tensor.numpy()
_TYPESTR = {
    t: np.dtype(n).str
    for t, n in ((torch.float32, np.float32), (torch.float64, np.float64), (torch.int16, np.int16),
                 (torch.int32, np.int32), (torch.int64, np.int64), (torch.uint8, np.uint8), (torch.bool, np.bool_))
}


def _np(t: Tensor):
    """A zero-copy numpy view of ``t`` (the binding reads strides: only a dense-in-memory layout is required).

    Not ``Tensor.numpy()``: that marks the tensor's storage non-resizable for good, and FSDP2 (and FSDP1)
    frees an all-gathered parameter after use by resizing its storage to 0, which then raises
    "Trying to resize storage that is not resizable".
    """
    typestr = _TYPESTR.get(t.dtype)
    if typestr is None:
        return t.detach().numpy()
    view = _ArrayView()
    view.tensor = t
    # NOTE: as cheap as Tensor.numpy(): 3.2-4.9 us an array against its 2.8-5.0 us (5 runs, 2 loaded cores),
    # because it skips detach() and passes strides None (C order) when contiguous; with both on every
    # call it took ~1.7x as long
    view.__array_interface__ = {
        "version": 3, "shape": t.shape, "typestr": typestr, "data": (t.data_ptr(), False),
        "strides": None if t.is_contiguous() else tuple(s * t.element_size() for s in t.stride()),
    }
    return np.asarray(view)


def _check_index(ptr_name, ptr, idx_name, idx, rows: int, cols: int, perm=None, nnz=None, row=None, out=None):
    """The checks the C++ binding makes, for the calls that take the reference path instead (dtypes other
    than fp32 on CPU): a hand-built index gets the same ``ValueError`` naming the tensor, not an
    IndexError from deep inside torch or a silent sum over duplicated entries.

    ``ptr [rows+1]`` / ``idx [nnz]`` is one orientation of the CSR index, ``idx`` in ``[0, cols)``, sorted
    and unique within each row; ``perm`` (``t_perm``) must lie in ``[0, nnz)``; ``row`` (COO rows) in
    ``[0, out)``.
    """
    from ..formats.csr import _check_idx, _check_ptr

    for name, t in ((ptr_name, ptr), (idx_name, idx), ("t_perm", perm), ("row", row)):
        if t is not None and (t.dim() != 1 or t.dtype not in (torch.int32, torch.int64)):
            raise ValueError(f"{name}: expected a 1-D int32 tensor, got {t.dtype} of shape {tuple(t.shape)}")
    _check_ptr(ptr_name, ptr, rows, idx.numel())
    _check_idx(idx_name, ptr, idx, cols)
    if perm is not None:
        if perm.numel() != idx.numel():
            raise ValueError(f"t_perm: expected {idx.numel()} entries, got {perm.numel()}")
        if perm.numel() and (int(perm.min()) < 0 or int(perm.max()) >= nnz):
            raise ValueError(f"t_perm: entries must lie in [0, {nnz}), got [{int(perm.min())}, {int(perm.max())}]")
    if row is not None:
        if row.numel() != idx.numel():
            raise ValueError(f"row: expected {idx.numel()} entries, got {row.numel()}")
        if row.numel() and (int(row.min()) < 0 or int(row.max()) >= out):
            raise ValueError(f"row: entries must lie in [0, {out}), got [{int(row.min())}, {int(row.max())}]")


def _check_values(values, nnz: int) -> None:
    if values.shape[0] != nnz:
        raise ValueError(f"values: expected {nnz} entries (one per stored index), got {values.shape[0]}")


# ---- host ops: cpu -> _C, anything else -> reference ----


@torch.library.custom_op("sparseops::csr_dds_host", mutates_args=())
def csr_dds_host(
    x: Tensor, values: Tensor, crow: Tensor, col: Tensor, bias: Optional[Tensor], out_features: int
) -> Tensor:
    return reference.csr_dds(x, values, crow, col, bias, out_features)


# rows up to which a bf16/fp16 weight is read as it is by the small-batch kernel (_C.csr_dds16)
CSR16_MAX_ROWS = 7


@csr_dds_host.register_kernel("cpu")
@checked(lambda x, values, crow, col, bias, out_features: check_operands(
    {"x": x}, same_dtype={"x": x, "values": values, "bias": bias}, bias=bias, out_features=out_features),
    ok=lambda x, values, crow, col, bias, out_features: mats_ok(x) and dtypes_ok(x, values, bias) and (
        bias is None or bias.shape == (out_features,)))
def _csr_dds_cpu(x, values, crow, col, bias, out_features):
    if (_C is not None and x.dtype in _HALF and values.dtype == x.dtype and 0 < x.shape[0] <= CSR16_MAX_ROWS
            and crow.dtype == torch.int32 and col.dtype == torch.int32):
        # decode with a 16-bit weight: the values are read as they are (half the bytes of an fp32 copy, and
        # no copy); x and bias are small and converted here
        y = torch.empty(x.shape[0], out_features, dtype=torch.float32, device=_CPU)
        b = None if bias is None else _np(bias.float().contiguous())
        _C.csr_dds16(_np(x.float()), _np(values.contiguous().view(torch.int16)), _CPP_HALF[x.dtype], _np(crow),
                     _np(col), b, _np(y), _threads(x.shape[0] * col.shape[0]))
        return y.to(x.dtype)
    return _csr_dds_cpu32(x, values, crow, col, bias, out_features)


@half_via_fp32
def _csr_dds_cpu32(x, values, crow, col, bias, out_features):
    if not _use_cpp(x, values, *(() if bias is None else (bias,))):
        _check_index("crow", crow, "col", col, out_features, x.shape[1])
        _check_values(values, col.numel())
        return reference.csr_dds(x, values, crow, col, bias, out_features)
    y = torch.empty(x.shape[0], out_features, dtype=torch.float32, device=_CPU)
    b = None if bias is None else _np(bias.contiguous())
    _C.csr_dds(_np(x), _np(values.contiguous()), _np(crow), _np(col), b, _np(y), _threads(x.shape[0] * col.shape[0]))
    return y


@csr_dds_host.register_fake
def _(x, values, crow, col, bias, out_features):
    return x.new_empty(x.shape[0], out_features)


@torch.library.custom_op("sparseops::csr_dsd_host", mutates_args=())
def csr_dsd_host(
    dy: Tensor, values: Tensor, t_crow: Tensor, t_row: Tensor, t_perm: Tensor, in_features: int
) -> Tensor:
    return reference.csr_dsd(dy, values, t_crow, t_row, t_perm, in_features)


@csr_dsd_host.register_kernel("cpu")
@checked(lambda dy, values, *_: check_operands({"dy": dy}, same_dtype={"dy": dy, "values": values}),
         ok=lambda dy, values, *_: mats_ok(dy) and dtypes_ok(dy, values))
@half_via_fp32
def _csr_dsd_cpu(dy, values, t_crow, t_row, t_perm, in_features):
    if not _use_cpp(dy, values):
        _check_values(values, t_row.numel())
        _check_index("t_crow", t_crow, "t_row", t_row, in_features, dy.shape[1], perm=t_perm, nnz=values.shape[0])
        return reference.csr_dsd(dy, values, t_crow, t_row, t_perm, in_features)
    dx = torch.empty(dy.shape[0], in_features, dtype=torch.float32, device=_CPU)
    _C.csr_dsd(
        _np(dy), _np(values.contiguous()), _np(t_crow), _np(t_row), _np(t_perm), _np(dx), _threads(dy.shape[0] * t_row.shape[0])
    )
    return dx


@csr_dsd_host.register_fake
def _(dy, values, t_crow, t_row, t_perm, in_features):
    return dy.new_empty(dy.shape[0], in_features)


@torch.library.custom_op("sparseops::csr_sdd_host", mutates_args=())
def csr_sdd_host(dy: Tensor, x: Tensor, crow: Tensor, col: Tensor, row: Tensor) -> Tensor:
    return reference.csr_sdd(dy, x, row, col)


@csr_sdd_host.register_kernel("cpu")
@checked(lambda dy, x, *_: check_operands({"x": x, "dy": dy}, same_dtype={"x": x, "dy": dy}),
         ok=lambda dy, x, *_: mats_ok(x, dy) and dtypes_ok(x, dy))
@half_via_fp32
def _csr_sdd_cpu(dy, x, crow, col, row):
    if not _use_cpp(dy, x):
        _check_index("crow", crow, "col", col, dy.shape[1], x.shape[1], row=row, out=dy.shape[1])
        return reference.csr_sdd(dy, x, row, col)
    dv = torch.empty(col.shape[0], dtype=torch.float32, device=_CPU)
    _C.csr_sdd(_np(dy), _np(x), _np(crow), _np(col), _np(dv), _threads(x.shape[0] * col.shape[0]))
    return dv


@csr_sdd_host.register_fake
def _(dy, x, crow, col, row):
    return x.new_empty(col.shape[0])


def _backward_reference(dy, x, values, row, col, t_crow, t_row, t_perm):
    return reference.csr_dsd(dy, values, t_crow, t_row, t_perm, x.shape[1]), reference.csr_sdd(dy, x, row, col)


@torch.library.custom_op("sparseops::csr_backward_host", mutates_args=())
def csr_backward_host(
    dy: Tensor, x: Tensor, values: Tensor, crow: Tensor, col: Tensor, row: Tensor, t_crow: Tensor, t_row: Tensor,
    t_perm: Tensor,
) -> tuple[Tensor, Tensor]:
    return _backward_reference(dy, x, values, row, col, t_crow, t_row, t_perm)


@csr_backward_host.register_kernel("cpu")
@checked(lambda dy, x, values, *_: check_operands({"x": x, "dy": dy}, same_dtype={"x": x, "dy": dy, "values": values}),
         ok=lambda dy, x, values, *_: mats_ok(x, dy) and dtypes_ok(x, dy, values))
@half_via_fp32
def _csr_backward_cpu(dy, x, values, crow, col, row, t_crow, t_row, t_perm):
    if not _use_cpp(dy, x, values):
        _check_index("crow", crow, "col", col, dy.shape[1], x.shape[1], row=row, out=dy.shape[1])
        _check_index("t_crow", t_crow, "t_row", t_row, x.shape[1], dy.shape[1], perm=t_perm, nnz=col.numel())
        _check_values(values, col.numel())
        return _backward_reference(dy, x, values, row, col, t_crow, t_row, t_perm)
    dx = torch.empty(x.shape[0], x.shape[1], dtype=torch.float32, device=_CPU)
    dv = torch.empty(col.shape[0], dtype=torch.float32, device=_CPU)
    _C.csr_backward(
        _np(dy), _np(x), _np(values.contiguous()), _np(crow), _np(col), _np(t_crow), _np(t_row), _np(t_perm),
        _np(dx), _np(dv), _threads(2 * x.shape[0] * col.shape[0]),
    )
    return dx, dv


@csr_backward_host.register_fake
def _(dy, x, values, crow, col, row, t_crow, t_row, t_perm):
    return x.new_empty(x.shape), x.new_empty(col.shape[0])


try:  # torch's own switch: a wrap_triton launch goes straight to the kernel, not through its HOP
    from torch._library.triton import set_wrap_triton_enabled as _set_wrap_triton_enabled
except ImportError:  # pragma: no cover - an older torch: every CUDA call goes through the op
    _set_wrap_triton_enabled = None


def _eager_cuda(t: Tensor) -> bool:
    """An eager call on a CUDA tensor with no dispatch mode active (FakeTensorMode, FlopCounterMode...): the
    autograd layer runs the triton_op's body itself (``op.body``), as the op's own eager call would.

    Through the op, each call paid the custom-op dispatch: on an H100, an eager few-bit GELU step (two
    ops) took 0.67 ms of host time for 0.14 ms of kernels, and an activation-sparse decode call 0.25 to
    0.48 ms for 0.03 to 0.05 ms, so the GPU waited on the host."""
    return (_set_wrap_triton_enabled is not None and t.device.type == "cuda"
            and not torch.compiler.is_compiling() and torch._C._len_torch_dispatch_stack() == 0)


def triton_op(name: str):
    """``torch.library.triton_op(name, mutates_args=())`` that keeps its body as ``op.body`` for the eager
    CUDA calls of the autograd layer (see :func:`_eager_cuda`).

    ``op.body`` runs the body with torch's wrap_triton switch off, as the op's eager call does: with it on,
    each ``wrap_triton`` launch goes through a higher-order op whose eager dispatch costs about 0.3 ms
    (measured on an H100: an activation-sparse decode call took 1.3 ms that way)."""

    def wrap(fn):
        op = torch.library.triton_op(name, mutates_args=())(fn)

        def body(*args):
            with _set_wrap_triton_enabled(False):
                return fn(*args)

        op.body = body
        return op

    return wrap


# ---- public ops: cuda -> triton, else -> host op ----


@triton_op("sparseops::csr_dds")
def csr_dds(x: Tensor, values: Tensor, crow: Tensor, col: Tensor, bias: Optional[Tensor], out_features: int) -> Tensor:
    """Forward ``y [B, out] = x [B, in] @ Wᵀ + bias`` for a CSR weight.

    Args:
        x: ``[B, in]``; values: ``[nnz]``; crow: ``[out+1]`` int32; col: ``[nnz]`` int32;
        bias: ``[out]`` or None; out_features: ``out``.

    Returns:
        ``[B, out]`` in ``x.dtype`` (fp32 accumulation).
    """
    if x.device.type == "cuda":
        if _gpu.use_dense(x.shape[0], "csr"):
            w = _gpu.csr_weight(values, crow, col, out_features, x.shape[1])
            return torch.nn.functional.linear(x, w, bias)
        from ..kernels import csr as K

        return K.csr_dds(x, values, crow, col, bias, out_features)
    return csr_dds_host(x, values, crow, col, bias, out_features)


@triton_op("sparseops::csr_dsd")
def csr_dsd(dy: Tensor, values: Tensor, t_crow: Tensor, t_row: Tensor, t_perm: Tensor, in_features: int) -> Tensor:
    """Input gradient ``dx [B, in] = dy [B, out] @ W`` through the transposed index.

    Args:
        dy: ``[B, out]``; values: ``[nnz]``; t_crow: ``[in+1]``; t_row, t_perm: ``[nnz]`` (int32);
        in_features: ``in``.

    Returns:
        ``[B, in]`` in ``dy.dtype``.
    """
    if dy.device.type == "cuda":
        if _gpu.use_dense(dy.shape[0], "csr"):
            return dy @ _gpu.csr_weight_t(values, t_crow, t_row, t_perm, dy.shape[1]).t()
        from ..kernels import csr as K

        return K.csr_dsd(dy, values, t_crow, t_row, t_perm, in_features)
    return csr_dsd_host(dy, values, t_crow, t_row, t_perm, in_features)


@triton_op("sparseops::csr_sdd")
def csr_sdd(dy: Tensor, x: Tensor, crow: Tensor, col: Tensor, row: Tensor) -> Tensor:
    """Weight gradient on the mask: ``dvalues[k] = sum_b dy[b, row[k]] * x[b, col[k]]``.

    No dense ``[out, in]`` gradient is formed.

    Args:
        dy: ``[B, out]``; x: ``[B, in]``; crow: ``[out+1]``; col, row: ``[nnz]`` (int32).

    Returns:
        ``[nnz]`` in ``x.dtype``.
    """
    if x.device.type == "cuda":
        from ..kernels import csr as K

        return K.csr_sdd(dy, x, row, col)
    return csr_sdd_host(dy, x, crow, col, row)


@triton_op("sparseops::csr_backward")
def csr_backward(
    dy: Tensor, x: Tensor, values: Tensor, crow: Tensor, col: Tensor, row: Tensor, t_crow: Tensor, t_row: Tensor,
    t_perm: Tensor,
) -> tuple[Tensor, Tensor]:
    """Both gradients of ``y = x Wᵀ``: ``(dx [B, in], dvalues [nnz])``, i.e. ``csr_dsd`` and ``csr_sdd`` fused.

    On CPU the C++ kernel packs ``dy`` once for both products and runs them in one parallel region.
    """
    if x.device.type == "cuda":
        from ..kernels import csr as K

        if _gpu.use_dense(dy.shape[0], "csr"):
            dx = dy @ _gpu.csr_weight_t(values, t_crow, t_row, t_perm, dy.shape[1]).t()
        else:
            dx = K.csr_dsd(dy, values, t_crow, t_row, t_perm, x.shape[1])
        return dx, K.csr_sdd(dy, x, row, col)
    return csr_backward_host(dy, x, values, crow, col, row, t_crow, t_row, t_perm)


# NOTE: eager cpu calls go straight to the c++ kernels: through the triton_op body and the
# host op they paid two python custom-op dispatches (~0.1 ms a call, measured on 8x16x16),
# which dominates decode-sized calls. under torch.compile the triton_op still decomposes into
# its body, where the host op is the opaque cpu node.
csr_dds.register_kernel("cpu")(_csr_dds_cpu)
csr_dsd.register_kernel("cpu")(_csr_dsd_cpu)
csr_sdd.register_kernel("cpu")(_csr_sdd_cpu)
csr_backward.register_kernel("cpu")(_csr_backward_cpu)


# ---- eager entry points for the autograd layer ----
# NOTE: torch's custom-op wrapper binds the python signature on every call (~50 us); eager cpu
# calls skip it and run the very kernel function registered above. anything traced
# (torch.compile, export) or on another device goes through torch.ops.sparseops.


def _eager_cpu(t: Tensor) -> bool:
    return t.device.type == "cpu" and not torch.compiler.is_compiling()


def dds(x, values, crow, col, bias, out_features: int) -> Tensor:
    """``csr_dds`` for the autograd layer (see :func:`csr_dds`)."""
    if _eager_cpu(x):
        return _csr_dds_cpu.unchecked(x, values, crow, col, bias, out_features)
    if _eager_cuda(x):
        return csr_dds.body(x, values, crow, col, bias, out_features)
    return torch.ops.sparseops.csr_dds(x, values, crow, col, bias, out_features)


def dsd(dy, values, t_crow, t_row, t_perm, in_features: int) -> Tensor:
    """``csr_dsd`` for the autograd layer (see :func:`csr_dsd`)."""
    if _eager_cpu(dy):
        return _csr_dsd_cpu.unchecked(dy, values, t_crow, t_row, t_perm, in_features)
    if _eager_cuda(dy):
        return csr_dsd.body(dy, values, t_crow, t_row, t_perm, in_features)
    return torch.ops.sparseops.csr_dsd(dy, values, t_crow, t_row, t_perm, in_features)


def sdd(dy, x, crow, col, row) -> Tensor:
    """``csr_sdd`` for the autograd layer (see :func:`csr_sdd`)."""
    if _eager_cpu(x):
        return _csr_sdd_cpu.unchecked(dy, x, crow, col, row)
    if _eager_cuda(x):
        return csr_sdd.body(dy, x, crow, col, row)
    return torch.ops.sparseops.csr_sdd(dy, x, crow, col, row)


def backward(dy, x, values, crow, col, row, t_crow, t_row, t_perm) -> tuple[Tensor, Tensor]:
    """``csr_backward`` for the autograd layer (see :func:`csr_backward`)."""
    if _eager_cpu(x):
        return _csr_backward_cpu.unchecked(dy, x, values, crow, col, row, t_crow, t_row, t_perm)
    if _eager_cuda(x):
        return csr_backward.body(dy, x, values, crow, col, row, t_crow, t_row, t_perm)
    return torch.ops.sparseops.csr_backward(dy, x, values, crow, col, row, t_crow, t_row, t_perm)
