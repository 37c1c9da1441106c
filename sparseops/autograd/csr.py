"""Autograd for the unstructured sparse linear layer (SparseProp-style backward).

- forward: ``y = x Wᵀ + b`` by ``csr_dds``; it saves x and the index, nothing dense of size out x in.
- dX: ``dy W`` by ``csr_dsd`` over the transposed index built with the format.
- dW: ``csr_sdd`` writes only the stored values (an SDDMM); no dense gradient is formed.
- db: a sum over rows.
"""

from __future__ import annotations

import torch
from torch import Tensor

from ._once import once_differentiable
from ..ops import csr as csr_ops
from .saved import save_with_input, saved_with_input


class SparseLinearFunction(torch.autograd.Function):
    FACTORS = (0, 1)  # forward inputs that multiply each other (see autograd._once)
    # NOTE: the classic forward(ctx, ...) form on purpose: with a separate setup_context,
    # Function.apply binds the signature through inspect on every call, ~100 us that a
    # decode-sized product (a few us of kernel) cannot afford.
    @staticmethod
    def forward(ctx, x, values, bias, crow, col, row, t_crow, t_row, t_perm, out_features: int, in_features: int):
        save_with_input(ctx, x, values, crow, col, row, t_crow, t_row, t_perm)
        ctx.has_bias = bias is not None
        ctx.in_features = in_features
        return csr_ops.dds(x, values, crow, col, bias, out_features)

    @staticmethod
    def infer(x, values, bias, crow, col, row, t_crow, t_row, t_perm, out_features: int, in_features: int):
        """The forward alone, for calls that need no gradient (see ``apply_flat``)."""
        return csr_ops.dds(x, values, crow, col, bias, out_features)

    @staticmethod
    @once_differentiable
    def backward(ctx, dy):
        x, values, crow, col, row, t_crow, t_row, t_perm = saved_with_input(ctx)
        dx, dv, db = linear_grads(
            ctx.needs_input_grad[:3], dy, x, values, crow, col, row, t_crow, t_row, t_perm, ctx.in_features,
            ctx.has_bias,
        )
        return dx, dv, db, None, None, None, None, None, None, None, None


def linear_grads(needs, dy, x, values, crow, col, row, t_crow, t_row, t_perm, in_features: int, has_bias: bool):
    """``(dx, dvalues, dbias)`` of ``y = x Wᵀ + b`` for the gradients ``needs`` asks for (else None)."""
    need_x, need_v, need_b = needs
    dx = dv = db = None
    if need_x and need_v:
        # one pass packs dy for both products
        dx, dv = csr_ops.backward(dy, x, values, crow, col, row, t_crow, t_row, t_perm)
    elif need_x:
        dx = csr_ops.dsd(dy, values, t_crow, t_row, t_perm, in_features)
    elif need_v:
        dv = csr_ops.sdd(dy, x, crow, col, row)
    if need_b and has_bias:
        db = dy.sum(0)
    return dx, dv, db


# what the layers compute in (the kernels: fp32, bf16, fp16; fp64 on the reference path); float8 has no
# matmul here, as it has none in nn.Linear
_LAYER_DTYPES = (torch.float32, torch.bfloat16, torch.float16, torch.float64)


def check_input(x, in_features: int, values: Tensor) -> None:
    """Raise a clear error for an input a layer of ``in_features`` with ``values`` cannot take.

    Raises:
        TypeError: ``x`` is not a tensor, or its dtype differs from the layer's.
        ValueError: ``x`` has no dimensions, a wrong last dimension, or sits on another device.
    """
    if not isinstance(x, Tensor):
        raise TypeError(f"x: expected a torch.Tensor, got {type(x).__name__}")
    if x.dim() == 0:
        raise ValueError(f"x: expected shape [*, in_features={in_features}], got a 0-d tensor")
    if x.shape[-1] != in_features:
        raise ValueError(f"x: expected last dimension in_features={in_features}, got shape {tuple(x.shape)}")
    if x.dtype != values.dtype:
        raise TypeError(f"x: expected dtype {values.dtype} (the layer's dtype), got {x.dtype}")
    if x.dtype not in _LAYER_DTYPES:  # a layer moved to float8 by .to(): no kernel or reference computes in it
        raise TypeError(f"x: expected torch.float32, bfloat16, float16 or float64, got {x.dtype}")
    if x.device != values.device:
        raise ValueError(f"x: expected device {values.device} (the layer's device), got {x.device}")


def check_bias(bias, out_features: int, values: Tensor) -> None:
    """Raise a clear error for a bias a layer of ``out_features`` with ``values`` cannot take."""
    if not isinstance(bias, Tensor):
        raise TypeError(f"bias: expected a torch.Tensor or None, got {type(bias).__name__}")
    if bias.shape != (out_features,):
        raise ValueError(f"bias: expected shape ({out_features},), got {tuple(bias.shape)}")
    if bias.dtype != values.dtype:
        raise TypeError(f"bias: expected dtype {values.dtype} (the layer's dtype), got {bias.dtype}")
    if bias.device != values.device:
        raise ValueError(f"bias: expected device {values.device} (the layer's device), got {bias.device}")


def sparse_linear(x: Tensor, values: Tensor, index: dict, bias: Tensor | None, out_features: int, in_features: int):
    """``x [*, in] -> [*, out]`` through a CSR weight, differentiable in x, values and bias.

    Args:
        x: ``[*, in]``.
        values: ``[nnz]``.
        index: the CSR index tensors by name (crow, col, row, t_crow, t_row, t_perm).
        bias: ``[out]`` or None.

    Returns:
        ``[*, out]``.
    """
    return apply_flat(SparseLinearFunction, x, values, index, bias, out_features, in_features)


_INDEX = ("crow", "col", "row", "t_crow", "t_row", "t_perm")


def apply_flat(function, x, values, index: dict, bias, out_features: int, in_features: int, *extra, names=None):
    """Run a sparse-linear autograd ``function`` on ``x [*, in]`` flattened to ``[B, in]``.

    ``function.apply`` gets ``(x2, values, bias, *index tensors, out_features, in_features, *extra)``, the
    index tensors in the order of ``names`` (default: the CSR names).
    """
    check_input(x, in_features, values)
    if bias is not None:  # (the kernels' own operand checks are skipped on this eager path, see ops._checks)
        check_bias(bias, out_features, values)
    lead = x.shape[:-1]
    # an explicit row count: reshape(-1, 0) is ambiguous when in_features == 0
    x2 = x.reshape(lead.numel(), in_features)  # [B, in]
    args = (x2, values, bias, *[index[k] for k in (names or _INDEX)], out_features, in_features, *extra)
    # eager and no gradient can flow: the forward op alone, without autograd.Function's per-call
    # cost (~50 us of a decode-sized call, measured on a 4096->64 layer). traced code keeps the
    # Function, which the compiler handles (and dynamo cannot look up attributes of)
    infer = None
    if not torch.compiler.is_compiling() and not (
        torch.is_grad_enabled() and (x.requires_grad or values.requires_grad or (bias is not None and bias.requires_grad))
    ):
        infer = getattr(function, "infer", None)
    y = infer(*args) if infer is not None else function.apply(*args)
    # a 2-d input gets the op's own output, not a view of it (as nn.Linear): FSDP2 warns about a module
    # that returns a view, since an in-place op on it would drop its pre-backward hook
    return y if x.dim() == 2 else y.reshape(*lead, out_features)
