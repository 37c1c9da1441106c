"""``torch.autocast`` for the sparse layers, as ``nn.Linear`` has it.

Under autocast, ``F.linear`` casts its input, weight and bias to the autocast dtype (bf16 on CPU and fp16 on
CUDA by default; fp64 tensors are left alone) and returns that dtype; the casts are differentiable, so fp32
parameters still get fp32 gradients. The layers do the same: :func:`autocast_dtype` tells a layer's forward
whether to, :func:`cast` casts one tensor, and the layer then runs with autocast off inside (its kernels and
their pure-torch fallbacks pick their own accumulation dtype, which autocast must not lower).
"""

from __future__ import annotations


import torch
from torch import Tensor


# torch.amp.is_autocast_available is in torch >= 2.4, the oldest this package supports; a fallback anyway
_available = getattr(torch.amp, "is_autocast_available", lambda dev: dev in ("cpu", "cuda", "xpu"))


def autocast_dtype(x: Tensor) -> torch.dtype | None:
    """The dtype autocast asks of a linear layer on ``x``'s device, or None where autocast is off (or x is
    no tensor: the layer's own check then names it)."""
    if not isinstance(x, Tensor):
        return None
    dev = x.device.type
    # (meta and other device types have no autocast: torch.is_autocast_enabled raises for them)
    if not _available(dev) or not torch.is_autocast_enabled(dev):
        return None
    return torch.get_autocast_dtype(dev)


def cast(t: Tensor | None, dt: torch.dtype | None) -> Tensor | None:
    """``t`` in ``dt`` as autocast casts an operand (a floating-point tensor but fp64), or as it is."""
    if t is None or dt is None or t.dtype == dt or t.dtype == torch.float64 or not t.is_floating_point():
        return t
    return t.to(dt)


def off(x: Tensor):
    """A context with autocast off on ``x``'s device."""
    return torch.autocast(x.device.type, enabled=False)


def run(layer_run, x: Tensor):
    """``layer_run(x, dt)`` with ``dt`` the autocast dtype (x cast to it, autocast off inside), or
    ``layer_run(x, None)`` where autocast is off."""
    dt = autocast_dtype(x)
    if dt is None:
        return layer_run(x, None)
    with off(x):
        return layer_run(cast(x, dt), dt)


__all__ = ["autocast_dtype", "cast", "off", "run"]
