"""Autograd for few-bit activations, alone and fused after a sparse linear layer.

Forward computes the activation exactly and saves only the packed b-bit codes of its input
(``ceil(n / 32) * b`` int32 words: b/8 bytes an element) plus the ``2^b`` levels. Backward
is ``grad_in = grad_out * levels[code]``. Nothing is written in place.
"""

from __future__ import annotations

import torch
from torch import Tensor

from ._once import once_differentiable
from ..ops import fewbit as fewbit_ops
from .csr import apply_flat, linear_grads
from .saved import record_relu_codes, save_with_input, saved_with_input


def _dense_perm(x: Tensor):
    """``(perm, inverse)``: the order of ``x``'s dims by falling stride, for an ``x`` that is not contiguous and
    not in row-major order (channels_last, a transpose, a slice of either); None otherwise. The kernels run
    over ``x.permute(perm)``, which is contiguous for a dense ``x`` (no copy; a slice takes the one copy it
    took before), and their output, permuted back, has torch's layout: the strides of a dense ``x``, the
    same dim order for a slice (torch's elementwise ops order their output's dims by the input's strides).
    The codes are in that order. Not while compiling (strides may be symbolic there): row-major there."""
    if x.is_contiguous() or x.dim() < 2 or torch.compiler.is_compiling():
        return None
    st, sz = x.stride(), x.shape
    if any(st[d] == 0 and sz[d] > 1 for d in range(x.dim())):
        return None  # expanded (overlapping): torch gives a row-major output, and so does the copy
    perm = sorted(range(x.dim()), key=lambda d: -st[d])  # stable: ties (size-1 dims) keep their order
    if perm == list(range(x.dim())):
        return None  # row-major order already (a gapped slice): the kernels' row-major copy is torch's layout
    inv = [0] * len(perm)
    for i, d in enumerate(perm):
        inv[d] = i
    return perm, inv


def _forward(x: Tensor, fn, borders: Tensor, bits: int) -> Tensor:
    # no backward to save for: torch's forward alone, except where the fused kernel's forward is its
    # own (fn.fused_own: tanh, sigmoid, silu, elu, selu, celu, softplus, logsigmoid on CPU, see
    # ops.fewbit.fused), which then holds with and without a gradient
    if getattr(fn, "fused_own", False) and x.device.type == "cpu":
        p = _dense_perm(x)
        if p is None:
            return fewbit_ops.fused(x, fn, borders, bits, codes=False)[0]
        return fewbit_ops.fused(x.permute(p[0]), fn, borders, bits, codes=False)[0].permute(p[1])
    return fn(x)


def _is_relu(fn, bits: int, borders: Tensor) -> bool:
    # the 1-bit relu table has the single border 0 (checked on cpu only: no device sync; not while
    # compiling, where the border is data and record_relu_codes records nothing anyway)
    # (.item(), not float(borders[0]): the index made a view, ~15 us of a ~190 us small call)
    return (bits == 1 and getattr(fn, "fused", None) == ("clamp", 0.0, float("inf")) and borders.numel() == 1
            and borders.device.type == "cpu" and not torch.compiler.is_compiling() and borders.item() == 0.0)


class FewBitActivationFunction(torch.autograd.Function):
    # the classic forward(ctx, ...) form, for the reason given in autograd/csr.py
    @staticmethod
    def forward(ctx, x, fn, borders, levels, bits: int):
        if not ctx.needs_input_grad[0]:
            return _forward(x, fn, borders, bits)
        ctx.perm = p = _dense_perm(x)  # channels_last and the like: codes in memory order, y in x's layout
        if p is None:
            # the fused kinds on cpu (fn.fused): y and the codes in one pass (see ops.fewbit.fused)
            y, codes = fewbit_ops.fused(x, fn, borders, bits)
            if _is_relu(fn, bits, borders):  # (a row-major mask: recorded for a row-major y only)
                record_relu_codes(y, codes)
        elif getattr(fn, "fused", None) is not None and x.device.type == "cpu":
            y, codes = fewbit_ops.fused(x.permute(p[0]), fn, borders, bits)
            y = y.permute(p[1])
        else:  # torch's forward on x as it is (its bits can depend on the layout), the codes in memory order
            y, codes = fn(x), fewbit_ops.pack(x.permute(p[0]), borders, bits)
        ctx.save_for_backward(codes, levels)
        ctx.bits = bits
        return y

    @staticmethod
    def backward(ctx, dy):
        codes, levels = ctx.saved_tensors
        p = ctx.perm
        if p is None:
            return _unpack(dy, codes, levels, ctx.bits), None, None, None, None
        # dy in the codes' order (free when dy has x's layout, as torch's ops give it), then back
        return _unpack(dy.permute(p[0]), codes, levels, ctx.bits).permute(p[1]), None, None, None, None


def _unpack(g: Tensor, codes: Tensor, levels: Tensor, bits: int) -> Tensor:
    # create_graph=True (grad mode on in backward): a product that is itself differentiable
    if torch.is_grad_enabled():
        return FewBitUnpackFunction.apply(g, codes, levels, bits)
    return fewbit_ops.unpack(g, codes, levels, bits)


class FewBitUnpackFunction(torch.autograd.Function):
    """``dy * levels[code]`` as a differentiable function of ``dy``, for double backward (a gradient
    penalty, MAML): linear in ``dy``, so its own backward is the same product. Its derivative in x is
    0, the derivative of the piecewise-constant ``q`` (exact for the piecewise-linear activations,
    whose second derivative is 0 wherever it exists)."""

    @staticmethod
    def forward(ctx, dy, codes, levels, bits: int):
        ctx.save_for_backward(codes, levels)
        ctx.bits = bits
        return fewbit_ops.unpack(dy, codes, levels, bits)

    @staticmethod
    def backward(ctx, g):
        codes, levels = ctx.saved_tensors
        return _unpack(g, codes, levels, ctx.bits), None, None, None


def fewbit_activation(x: Tensor, fn, borders: Tensor, levels: Tensor, bits: int) -> Tensor:
    """``fn(x)``, differentiable in x through the few-bit table ``(borders, levels)``.

    Args:
        x: any shape, floating point.
        fn: the exact forward (e.g. ``torch.nn.functional.gelu``).
        borders: ``[2^bits - 1]`` fp32 on x's device; levels: ``[2^bits]`` fp32.
        bits: 1 to 4.

    Returns:
        ``fn(x)`` (where ``fn.fused_own``, on CPU the kernel's own value, see ``ops.fewbit.fused``); its
        gradient is ``grad * levels[code(x)]``.

    Raises:
        TypeError: x is not a floating-point tensor.
    """
    if not isinstance(x, Tensor):
        raise TypeError(f"x: expected a torch.Tensor, got {type(x).__name__}")
    if not x.is_floating_point():
        raise TypeError(f"x: expected a floating-point tensor, got {x.dtype}")
    if borders.device != x.device:  # (a .to() that changes nothing still costs a dispatch a call)
        borders, levels = borders.to(x.device), levels.to(x.device)
    if not (torch.is_grad_enabled() and x.requires_grad):
        return _forward(x, fn, borders, bits)  # no_grad, inference: nothing is packed
    return FewBitActivationFunction.apply(x, fn, borders, levels, bits)


class SparseLinearFewBitFunction(torch.autograd.Function):
    """``act(x Wᵀ + b)`` with a CSR weight: saves x, the index and the codes, not ``x Wᵀ + b``."""
    FACTORS = (0, 1)  # forward inputs that multiply each other (see autograd._once)

    @staticmethod
    def forward(ctx, x, values, bias, crow, col, row, t_crow, t_row, t_perm, out_features: int, in_features: int,
                activation: str, borders, levels, bits: int):
        y, codes = fewbit_ops.dds_fewbit(x, values, crow, col, bias, out_features, activation, borders, bits)
        if activation == "relu" and bits == 1:  # the layer's 1-bit relu table: the border 0
            record_relu_codes(y, codes)
        save_with_input(ctx, x, values, crow, col, row, t_crow, t_row, t_perm, codes, levels)
        ctx.has_bias = bias is not None
        ctx.in_features = in_features
        ctx.bits = bits
        return y

    @staticmethod
    @once_differentiable
    def backward(ctx, dy):
        x, values, crow, col, row, t_crow, t_row, t_perm, codes, levels = saved_with_input(ctx)
        dz = fewbit_ops.unpack(dy, codes, levels, ctx.bits)  # [B, out]
        dx, dv, db = linear_grads(
            ctx.needs_input_grad[:3], dz, x, values, crow, col, row, t_crow, t_row, t_perm, ctx.in_features,
            ctx.has_bias,
        )
        return (dx, dv, db) + (None,) * 12


def sparse_linear_fewbit(
    x: Tensor, values: Tensor, index: dict, bias: Tensor | None, out_features: int, in_features: int,
    activation: str, borders: Tensor, levels: Tensor, bits: int,
) -> Tensor:
    """``act(x Wᵀ + b)``: :func:`sparseops.autograd.csr.sparse_linear` followed by a few-bit activation, fused.

    Args:
        x: ``[*, in]``; values, index, bias, out_features, in_features: as ``sparse_linear``.
        activation: a name of ``sparseops.fewbit.ACTIVATIONS`` (torch's default parameters).
        borders, levels, bits: the activation's few-bit table (fp32, on x's device).

    Returns:
        ``[*, out]``.
    """
    return apply_flat(
        SparseLinearFewBitFunction, x, values, index, bias, out_features, in_features, activation, borders, levels,
        bits,
    )
