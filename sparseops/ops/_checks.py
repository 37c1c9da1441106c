"""Operand checks shared by the CPU kernels of every op family, run on every path (the C++ one and the
pure-torch one, which would otherwise broadcast a mismatch or fail with a bare IndexError) and before
``half_via_fp32`` converts anything: the same ``ValueError``/``TypeError`` naming the argument whichever
path a dtype takes, and a result whose shape and dtype the fake impl predicted."""

from __future__ import annotations

from torch import Tensor


def check_operands(mats: dict, *, same_dtype: dict | None = None, bias: Tensor | None = None,
                   out_features: int | None = None, cols: dict | None = None) -> None:
    """``mats``: name -> 2-D matrix, all with the first one's row count. ``cols``: name -> (tensor, expected
    last dimension, what it must match). ``bias``: ``[out_features]``. ``same_dtype``: name -> tensor (None
    entries skipped), all of one dtype (the result's)."""
    rows = first = None
    for name, t in mats.items():
        if t.dim() != 2:
            raise ValueError(f"{name}: expected a 2-D tensor, got shape {tuple(t.shape)}")
        if first is None:
            rows, first = t.shape[0], name
        elif t.shape[0] != rows:
            raise ValueError(f"{name}: expected {rows} rows to match {first}, got {t.shape[0]}")
    for name, (t, n, what) in (cols or {}).items():
        if t.dim() < 1 or t.shape[-1] != n:
            raise ValueError(f"{name}: expected {n} columns ({what}), got shape {tuple(t.shape)}")
    if bias is not None and tuple(bias.shape) != (out_features,):
        raise ValueError(f"bias: expected shape ({out_features},), got {tuple(bias.shape)}")
    named = {k: v for k, v in (same_dtype or {}).items() if v is not None}
    if len({t.dtype for t in named.values()}) > 1:
        got = ", ".join(f"{n} {t.dtype}" for n, t in named.items())
        raise TypeError(f"{', '.join(named)}: expected one floating-point dtype, got {got}")


def check_threshold(threshold: Tensor, k: int) -> None:
    """An activation-sparsity threshold: one for the tensor or one per input channel (``k``)."""
    if threshold.dim() > 1 or threshold.numel() not in (1, k):
        raise ValueError(f"threshold: expected a scalar or [{k}] (one per input channel), got shape "
                         f"{tuple(threshold.shape)}")


def mats_ok(a: Tensor, b: Tensor | None = None) -> bool:
    """Quick test (no message) that ``a`` (and ``b``) are 2-D with one row count."""
    return a.dim() == 2 and (b is None or (b.dim() == 2 and b.shape[0] == a.shape[0]))


def dtypes_ok(a: Tensor, b: Tensor | None = None, c: Tensor | None = None, d: Tensor | None = None,
              e: Tensor | None = None) -> bool:
    """Quick test (no message) that the tensors given (None skipped) share ``a``'s dtype."""
    dt = a.dtype
    return ((b is None or b.dtype == dt) and (c is None or c.dtype == dt) and (d is None or d.dtype == dt)
            and (e is None or e.dtype == dt))


def checked(check, ok=None):
    """A decorator: ``check(*args)`` runs before the kernel (and before ``half_via_fp32`` converts anything);
    with ``ok``, a quick test of the same conditions (~1 us against ~4 for the check's bookkeeping, on a
    decode call of ~50 us), the check runs only where that fails, to raise its message."""

    def wrap(kernel):
        def run(*args):
            if ok is None or not ok(*args):
                check(*args)
            return kernel(*args)

        run.__name__ = kernel.__name__
        run.__doc__ = kernel.__doc__
        # the eager helpers of the autograd layer call this: their operands come from a layer that checked x
        # (check_input) and from autograd, which gives dy the output's shape and dtype (~3 us a call saved)
        run.unchecked = kernel
        return run

    return wrap
