"""``once_differentiable`` for the layers' backward: it also sees the weights and inputs it multiplies.

torch's ``once_differentiable`` makes a second differentiation raise only when an incoming gradient
requires grad. A linear layer's backward is bilinear: ``dx = dy W`` depends on the weight and ``dW`` on
``x``. With ``create_graph=True`` and an incoming gradient that needs none (the layer is the last one, as
in a critic's gradient penalty), torch's version returns ``dx`` detached from ``W``, and a penalty on
``dx`` would silently get no gradient for the weight. Here the outputs also get the error-raising node
when two or more of the Function's ``FACTORS`` (the indices of its forward inputs that multiply each
other: x and the weights, not the bias) require grad.
"""

from __future__ import annotations

import functools

import torch
from torch._C import _functions

_MESSAGE = (
    b"sparseops: the backward of a sparse layer cannot be differentiated again (create_graph=True through it: "
    b"a gradient penalty, double backward, a Hessian-vector product); its kernels compute the first-order "
    b"gradients only"
)


def once_differentiable(fn):
    """Run ``backward`` under ``no_grad``; make differentiating its outputs raise where a term would be lost."""

    @functools.wraps(fn)
    def wrapper(ctx, *args):
        with torch.no_grad():
            outputs = fn(ctx, *args)
        if not torch.is_grad_enabled():
            return outputs
        needs = ctx.needs_input_grad
        factors = getattr(ctx._forward_cls, "FACTORS", ())
        lost = sum(1 for i in factors if needs[i]) >= 2
        if not (lost or any(isinstance(a, torch.Tensor) and a.requires_grad for a in args)):
            return outputs
        outs = outputs if isinstance(outputs, tuple) else (outputs,)
        err_fn = _functions.DelayedError(_MESSAGE, len(outs))

        def fake_requires_grad(v):
            if v is not None:
                v = v.detach()
                v.requires_grad = True
            return v

        return err_fn(*[fake_requires_grad(v) for v in outs])

    return wrapper
