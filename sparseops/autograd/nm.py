"""Autograd for the N:M sparse linear layer (SparseProp-style backward, as ``autograd.csr``).

- forward: ``nm_dds``; saves x and the index only.
- dX: a transposable weight runs ``nm_dsd``, the N:M kernel over ``Wᵀ``; any other N:M weight
  runs ``nm_dsd_csr`` over the CSR of ``Wᵀ`` (``Wᵀ`` of a plain N:M weight has no N:M structure).
- dW: ``nm_sdd`` on the slots only, then zero at the empty slots so that they stay empty.
"""

from __future__ import annotations

import torch
from torch import Tensor

from ._once import once_differentiable
from ..ops import nm as nm_ops
from .csr import apply_flat
from .saved import save_with_input, saved_with_input

NM_INDEX = ("idx", "empty", "t_crow", "t_row", "t_perm", "t_idx", "t_slot")


class NMLinearFunction(torch.autograd.Function):
    FACTORS = (0, 1)  # forward inputs that multiply each other (see autograd._once)
    @staticmethod
    def forward(ctx, x, values, bias, idx, empty, t_crow, t_row, t_perm, t_idx, t_slot, out_features: int,
                in_features: int, n: int, m: int, transposable: bool):
        save_with_input(ctx, x, values, idx, empty, t_crow, t_row, t_perm, t_idx, t_slot)
        ctx.has_bias = bias is not None
        ctx.cfg = (in_features, n, m, transposable)
        return nm_ops.dds(x, values, idx, bias, n, m)

    @staticmethod
    def infer(x, values, bias, idx, empty, t_crow, t_row, t_perm, t_idx, t_slot, out_features: int,
              in_features: int, n: int, m: int, transposable: bool):
        """The forward alone, for calls that need no gradient (see ``autograd.csr.apply_flat``)."""
        return nm_ops.dds(x, values, idx, bias, n, m)

    @staticmethod
    @once_differentiable
    def backward(ctx, dy):
        x, values, idx, empty, t_crow, t_row, t_perm, t_idx, t_slot = saved_with_input(ctx)
        in_features, n, m, transposable = ctx.cfg
        need_x, need_v, need_b = ctx.needs_input_grad[:3]
        dx = dv = db = None
        if need_x:
            if transposable:
                dx = nm_ops.dsd(dy, values, t_idx, t_slot, n, m)
            else:
                dx = nm_ops.dsd_csr(dy, values, t_crow, t_row, t_perm, in_features)
        if need_v:
            dv = nm_ops.sdd(dy, x, idx, n, m)
            if empty.numel():
                dv = dv.view(-1).index_fill(0, empty, 0).view_as(dv)
        if need_b and ctx.has_bias:
            db = dy.sum(0)
        return (dx, dv, db) + (None,) * 12


def nm_linear(x: Tensor, values: Tensor, index: dict, bias: Tensor | None, out_features: int, in_features: int,
              n: int, m: int, transposable: bool) -> Tensor:
    """``x [*, in] -> [*, out]`` through an N:M weight (``values [out, S]``, ``index`` of ``NMWeight``)."""
    return apply_flat(NMLinearFunction, x, values, index, bias, out_features, in_features, n, m, transposable,
                      names=NM_INDEX)
