"""What the layers keep of a ReLU-sparse input for backward: its 1-bit mask and its nonzeros, not the input.

Every sparse product's backward needs its input x only as s(x) (the weight gradient multiplies it, the
input gradient of an activation-sparse layer needs its mask). When x is ReLU-sparse (>= 0, mostly exact
zeros), the packed mask of its nonzeros (``ops.fewbit``'s 1-bit layout: 1/8 byte an element) and the
nonzeros themselves say the same in far fewer bytes: at 90% zeros, 0.525 bytes an fp32 element instead
of 4. Backward rebuilds x from them (``ops.fewbit.mask_expand``), bit for bit.

- :func:`relu_sparse_input`: a context in which the layers' autograd functions that save ``x`` (or a whole
  reshaped view of it) save it that way (:func:`save_with_input` / :func:`saved_with_input`).
  ``ActivationSparseLinear`` in relu mode runs its wrapped ``SparseLinear`` in it.
- :func:`record_relu_codes` / :func:`relu_codes`: the ReLU's 1-bit mask, stated once and used twice. A
  1-bit ReLU code is ``z > 0``, which is also ``relu(z) > 0``: the mask of the output's nonzeros. The
  layer that makes such an output on eager CPU records its codes on it (an attribute of the output,
  with the tensor's version), and a layer that saves that output compressed saves those same codes
  (one tensor, saved by both backward graphs, stored once). An in-place change of the output (a new
  version) or a view of part of it drops the record.

Eager CPU only: traced code (``torch.compile``) and other devices save x as it is.
"""

from __future__ import annotations

import contextlib
import threading

import torch
from torch import Tensor

from ._once import once_differentiable
from ..ops import fewbit as fewbit_ops

_RELU_CODES = "_sparseops_relu_codes"
_ZERO = torch.zeros(1)
_state = threading.local()


def record_relu_codes(y: Tensor, codes: Tensor) -> None:
    """Record on ``y`` that ``codes`` is the packed mask ``y > 0``."""
    if y.device.type == "cpu" and not torch.compiler.is_compiling():
        setattr(y, _RELU_CODES, (codes, y._version))


def relu_codes(x: Tensor) -> Tensor | None:
    """The packed 1-bit mask ``x > 0`` (1 bit an element in ``x``'s row-major order) that the layer which
    made ``x`` recorded on it (or on the tensor ``x`` is a whole contiguous view of), or None."""
    if torch.compiler.is_compiling():
        return None
    base = x if x._base is None else x._base
    rec = getattr(base, _RELU_CODES, None)
    if rec is None:
        return None
    codes, version = rec
    whole = x.numel() == base.numel() and x.storage_offset() == base.storage_offset()
    if x._version != version or not (whole and x.is_contiguous() and base.is_contiguous()):
        return None
    return codes


@contextlib.contextmanager
def relu_sparse_input(x: Tensor, codes: Tensor | None = None):
    """Inside, an autograd function that saves ``x`` through :func:`save_with_input` keeps its mask and
    nonzeros instead. ``x`` must be >= 0 with exact zeros (a ReLU's output, or s(x) of relu mode);
    ``codes``: its packed mask ``x > 0`` when already known (:func:`relu_codes`), else it is packed."""
    prev = getattr(_state, "spec", None)
    _state.spec = (x, codes)
    try:
        yield
    finally:
        _state.spec = prev


def _is_spec(t: Tensor, spec) -> bool:
    x = spec[0]
    return (t.device.type == "cpu" and t.dtype == x.dtype and t.numel() == x.numel() and t.data_ptr() == x.data_ptr()
            and t.is_contiguous() and x.is_contiguous())


def save_with_input(ctx, x: Tensor, *rest: Tensor, codes: Tensor | None = None) -> None:
    """``ctx.save_for_backward(x, *rest)``, with ``x`` kept as a packed mask and the elements it marks when
    ``codes`` gives that mask (backward then gets ``x`` where it is set and 0 elsewhere), or inside
    :func:`relu_sparse_input` of ``x`` (see the module docstring). Read back with :func:`saved_with_input`."""
    if codes is None:
        spec = getattr(_state, "spec", None)
        if spec is not None and not torch.compiler.is_compiling() and _is_spec(x, spec):
            codes = spec[1] if spec[1] is not None else fewbit_ops.pack(x, _ZERO, 1)
    ctx.input_shape = None
    if codes is None:
        ctx.save_for_backward(x, *rest)
    else:
        ctx.save_for_backward(codes, fewbit_ops.mask_select(x, codes), *rest)
        ctx.input_shape = x.shape


def saved_with_input(ctx) -> tuple:
    """``ctx.saved_tensors`` of :func:`save_with_input`, with ``x`` rebuilt when it was kept compressed."""
    if ctx.input_shape is None:
        return ctx.saved_tensors
    codes, values, *rest = ctx.saved_tensors
    return (fewbit_ops.mask_expand(codes, values, ctx.input_shape), *rest)


class _ReluSparse(torch.autograd.Function):
    # s(x) = x where x > border, else 0, keeping only the packed mask for backward (torch's relu and where
    # would keep their [B, in] results and masks)
    @staticmethod
    def forward(ctx, x, codes):
        ctx.save_for_backward(codes)
        return fewbit_ops.mask_where(codes, x)  # the mask already made: no second compare over x

    @staticmethod
    @once_differentiable
    def backward(ctx, g):
        (codes,) = ctx.saved_tensors
        return fewbit_ops.mask_where(codes, g), None


def relu_mask(x: Tensor, threshold: float = 0.0) -> tuple[Tensor, Tensor]:
    """``(border, codes)``: relu mode's border ``max(threshold, 0)`` as a 1-element tensor, and the packed
    mask ``x > border``: ``x``'s recorded ReLU codes (:func:`relu_codes`) when the border is 0 and it has
    them, else packed now. ``x`` on CPU. Compared in fp32, or in fp64 for an fp64 ``x``, as the forward's
    ``act_mask`` compares (an fp64 threshold such as 0.1 is not an fp32 value)."""
    value = max(float(threshold), 0.0)
    border = torch.tensor([value], dtype=torch.promote_types(x.dtype, torch.float32), device="cpu")
    codes = relu_codes(x) if value == 0.0 else None
    return border, (codes if codes is not None else fewbit_ops.pack(x, border, 1))


def relu_sparse(x: Tensor, threshold: float = 0.0) -> tuple[Tensor, Tensor]:
    """``(s, codes)``: ``s = x`` where ``x > max(threshold, 0)``, else 0 (relu mode's s(x)), differentiable in
    ``x``, and ``codes`` its packed mask (:func:`relu_mask`), which is all its backward keeps."""
    codes = relu_mask(x, threshold)[1]
    return _ReluSparse.apply(x, codes), codes
