"""``torch.autocast`` for the sparse layers, as ``nn.Linear`` has it.

Under autocast, ``F.linear`` casts its input, weight and bias to the autocast dtype (bf16 on CPU and fp16 on
CUDA by default; fp64 tensors are left alone) and returns that dtype; the casts are differentiable, so fp32
parameters still get fp32 gradients. The layers do the same: :func:`run` calls a layer's ``_run(x, dt)``
with ``dt`` the autocast dtype (or None), with x cast and autocast off inside (the kernels and their
pure-torch fallbacks pick their own accumulation dtype, which autocast must not lower), and
:func:`param` casts one parameter.

torch caches the casts of leaf parameters within an autocast region; here, without a gradient to record
(inference, decoding), a layer keeps the cast copy of each parameter while it keeps being called under
autocast and the parameter is unchanged (the same object, its ``_version`` and storage), and drops it at
its first call with autocast off or with a gradient to record; with a gradient, each call casts (a
training step calls a layer once). An edit through ``.data`` moves no version, so it is not seen (as for
``ActivationSparseLinear``'s transposed copy): edit a parameter itself under ``torch.no_grad()``.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

# torch.amp.is_autocast_available is in torch >= 2.4, the oldest this package supports; a fallback anyway
_available = getattr(torch.amp, "is_autocast_available", lambda dev: dev in ("cpu", "cuda", "xpu"))


def autocast_dtype(x: Tensor) -> torch.dtype | None:
    """The dtype autocast asks of a linear layer on ``x``'s device, or None where autocast is off (or x is
    no tensor: the layer's own check then names it)."""
    if not isinstance(x, Tensor):
        return None
    dev = x.device.type
    # (meta and other device types have no autocast: torch.is_autocast_enabled raises for them)
    if dev not in ("cpu", "cuda") and not _available(dev):
        return None
    if not torch.is_autocast_enabled(dev):
        return None
    return torch.get_autocast_dtype(dev)


def cast_dtype(t: Tensor, dt: torch.dtype | None) -> torch.dtype:
    """The dtype autocast gives an operand ``t``: ``dt`` for a floating-point tensor but fp64, else its own."""
    if dt is None or t.dtype == torch.float64 or not t.is_floating_point():
        return t.dtype
    return dt


def cast(t: Tensor | None, dt: torch.dtype | None) -> Tensor | None:
    """``t`` in :func:`cast_dtype`, or as it is."""
    if t is None:
        return t
    want = cast_dtype(t, dt)
    return t if want == t.dtype else t.to(want)


def param(module: nn.Module, name: str, dt: torch.dtype | None) -> Tensor | None:
    """``cast(getattr(module, name), dt)``, from the module's cache where nothing is recorded for autograd."""
    t = getattr(module, name)
    if dt is None:
        return t
    c = cast(t, dt)
    if c is t or torch.compiler.is_compiling():
        return c
    if (torch.is_grad_enabled() and t.requires_grad) or t.is_inference():
        # recorded for autograd (or an inference tensor, which has no version): cast each call, and keep no
        # copy from an earlier inference call alive through training
        cache = module.__dict__.get("_autocast_cache")
        if cache:
            cache.pop(name, None)
        return c
    cache = module.__dict__.setdefault("_autocast_cache", {})
    # the parameter object itself is held (a replaced Parameter, as update_mask_ makes, can then never share
    # an address with the one cached) with its version (an in-place edit moves it; one through .data does not)
    # and the mode (a copy made under inference_mode is an inference tensor, which autograd cannot save)
    key = (t._version, t.data_ptr(), dt, torch.is_inference_mode_enabled())
    hit = cache.get(name)
    if hit is not None and hit[0] is t and hit[1] == key:
        return hit[2]
    cache[name] = (t, key, c)
    return c


# one call that says whether autocast is on for any device (~0.2 us): the common case, autocast off, costs
# no more (torch >= 2.4 has it; without it, the per-device check)
_any_enabled = getattr(torch._C, "_is_any_autocast_enabled", None)


def run(module: nn.Module, x: Tensor):
    """``module._run(x, dt)`` with ``dt`` the autocast dtype (x cast to it, autocast off inside), or
    ``module._run(x, None)`` where autocast is off (which drops the module's cached casts)."""
    dt = autocast_dtype(x) if _any_enabled is None or _any_enabled() else None
    if dt is None:
        if "_autocast_cache" in module.__dict__ and not torch.compiler.is_compiling():
            del module.__dict__["_autocast_cache"]
        return module._run(x, None)
    with torch.autocast(x.device.type, enabled=False):
        return module._run(cast(x, dt), dt)
