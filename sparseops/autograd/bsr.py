"""Autograd for the block-sparse linear layer (SparseProp-style backward, as ``autograd.csr``).

- forward: ``bsr_dds``; saves x and the block index only.
- dX: ``bsr_dsd`` over Wᵀ's block index, built once with the format.
- dW: ``bsr_sdd`` on the stored blocks only; a block's padding (rows >= out, columns >= in) gets
  exactly 0, because the kernels read the padded activations as zero there.
"""

from __future__ import annotations

import torch
from torch import Tensor

from ._once import once_differentiable
from ..ops import bsr as bsr_ops
from .csr import apply_flat
from .saved import save_with_input, saved_with_input


class BlockLinearFunction(torch.autograd.Function):
    FACTORS = (0, 1)  # forward inputs that multiply each other (see autograd._once)
    # the classic forward(ctx, ...) form, for the reason given in autograd.csr
    @staticmethod
    def forward(ctx, x, values, bias, crow, col, row, t_crow, t_row, t_perm, out_features: int, in_features: int):
        save_with_input(ctx, x, values, col, row, t_crow, t_row, t_perm)
        ctx.has_bias = bias is not None
        ctx.in_features = in_features
        return bsr_ops.dds(x, values, crow, col, bias, out_features)

    @staticmethod
    def infer(x, values, bias, crow, col, row, t_crow, t_row, t_perm, out_features: int, in_features: int):
        """The forward alone, for calls that need no gradient (see ``autograd.csr.apply_flat``)."""
        return bsr_ops.dds(x, values, crow, col, bias, out_features)

    @staticmethod
    @once_differentiable
    def backward(ctx, dy):
        x, values, col, row, t_crow, t_row, t_perm = saved_with_input(ctx)
        need_x, need_v, need_b = ctx.needs_input_grad[:3]
        dx = dv = db = None
        if need_x:
            dx = bsr_ops.dsd(dy, values, t_crow, t_row, t_perm, ctx.in_features)
        if need_v:
            dv = bsr_ops.sdd(dy, x, row, col, values.shape[-1])
        if need_b and ctx.has_bias:
            db = dy.sum(0)
        return (dx, dv, db) + (None,) * 8


def block_linear(x: Tensor, values: Tensor, index: dict, bias: Tensor | None, out_features: int, in_features: int):
    """``x [*, in] -> [*, out]`` through a block-sparse weight (``values [nblk, b, b]``; ``index``: the
    block grid's CSR tensors by name, as ``formats.bsr.BSRWeight.tensors()``)."""
    return apply_flat(BlockLinearFunction, x, values, index, bias, out_features, in_features)
