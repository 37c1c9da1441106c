"""Autograd for the activation-sparse linear layer ``y = s(x) @ Wᵀ + b`` (see ``reference.act``).

- forward: ``act_dds``, which skips the rows of ``Wᵀ`` whose input is inactive; saves x, or s(x)
  compressed (see below).
- dX: ``act_dsd``, ``(dy @ W) ⊙ mask``, one dot product per *active* input and nothing for the rest:
  the sparsifier's own derivative is its mask (``s`` is the identity or ReLU on the active set and
  constant off it), so a ReLU in front of the layer costs nothing extra in backward.
- dW: ``act_sdd``, ``s(x)ᵀ @ dy`` through s(x)'s nonzeros only, returned as the gradient of the
  transposed weight ``Wᵀ [in, out]`` (the layout the layer stores).
- both: ``act_backward``, the two above in one pass (each active input reads its row of dy once for both).
- the bias gradient is a sum over rows; the threshold gets none.

What backward keeps of x: in relu mode on eager CPU, s(x) compressed, not x. The kernels above need only
s(x) (the active set of s(x) is that of x, and s(x) is x there), so the layer saves the 1-bit mask of the
active inputs (``ops.fewbit``'s packed layout) and their values, and rebuilds s(x) in backward: at 90%
zeros that is 0.125 + 0.4 bytes an input in fp32 instead of 4. When x is the output of a layer that saved
the same mask as its own 1-bit ReLU codes (``SparseLinear(activation="relu", act_bits=1)``,
``FewBitReLU``), that codes tensor is saved here too (``autograd.saved.relu_codes``): stated once, used
twice. Other modes (a magnitude threshold) and traced code save x.
"""

from __future__ import annotations

import torch
from torch import Tensor

from ._once import once_differentiable
from ..ops import act as act_ops
from .saved import relu_mask, save_with_input, saved_with_input


def _compresses(x: Tensor, threshold: Tensor, relu: bool) -> bool:
    return relu and x.device.type == "cpu" and threshold.numel() == 1 and not torch.compiler.is_compiling()


class ActLinearFunction(torch.autograd.Function):
    FACTORS = (0, 1)  # forward inputs that multiply each other (see autograd._once)
    # the classic forward(ctx, ...) form, for the reason given in autograd.csr
    @staticmethod
    def forward(ctx, x, weight_t, bias, threshold, relu: bool):
        codes = None
        if _compresses(x, threshold, relu) and any(ctx.needs_input_grad[:2]):
            # relu mode: active iff x > max(0, threshold) (see reference.act.act_mask); backward gets s(x)
            codes = relu_mask(x, float(threshold))[1]
        save_with_input(ctx, x, weight_t, threshold, codes=codes)
        ctx.has_bias = bias is not None
        ctx.relu = relu
        return act_ops.dds(x, weight_t, bias, threshold, relu)

    @staticmethod
    @once_differentiable
    def backward(ctx, dy):
        x, weight_t, threshold = saved_with_input(ctx)  # x or s(x): the kernels below give the same for both
        need_x, need_w, need_b = ctx.needs_input_grad[:3]
        dx = dw = db = None
        if need_x and need_w:
            dx, dw = act_ops.backward(dy, x, weight_t, threshold, ctx.relu)
        elif need_x:
            dx = act_ops.dsd(dy, x, weight_t, threshold, ctx.relu)
        elif need_w:
            dw = act_ops.sdd(dy, x, threshold, ctx.relu)
        if need_b and ctx.has_bias:
            db = dy.sum(0)
        return dx, dw, db, None, None


def act_linear(x: Tensor, weight_t: Tensor, bias: Tensor | None, threshold: Tensor, relu: bool) -> Tensor:
    """``x [*, in] -> [*, out]``: ``s(x) @ weight_t + bias``, differentiable in x, weight_t and bias.

    ``weight_t`` is ``Wᵀ [in, out]``; a non-contiguous one is copied first (the kernels stream its rows).
    """
    if not isinstance(x, Tensor) or not isinstance(weight_t, Tensor) or weight_t.dim() != 2:
        raise TypeError("x, weight_t: expected tensors, weight_t of shape [in, out]")
    in_features, out_features = weight_t.shape
    if x.dim() == 0 or x.shape[-1] != in_features:
        raise ValueError(f"x: expected last dimension in_features={in_features}, got shape {tuple(x.shape)}")
    lead = x.shape[:-1]
    x2 = x.reshape(lead.numel(), in_features)  # [B, in]
    # the operand checks the eager kernels skip (see ops._checks): dtypes, the bias, the threshold
    if not act_ops._act_ok(x2, weight_t=weight_t, bias=bias, threshold=threshold):
        act_ops._check_act(x2, weight_t=weight_t, bias=bias, threshold=threshold)
    if not weight_t.is_contiguous():
        weight_t = weight_t.contiguous()
    y = ActLinearFunction.apply(x2, weight_t, bias, threshold, relu)
    return y.reshape(*lead, out_features)
