"""torch.library ops for few-bit activation codes: schema, device dispatch, fake impls.

- ``sparseops::fewbit_pack(x, borders, bits) -> codes``: the b-bit interval index of every
  element, bit-packed (layout in :mod:`sparseops.reference.fewbit`).
- ``sparseops::fewbit_unpack(grad, codes, levels, bits) -> grad_in``: ``grad * levels[code]``.
- ``sparseops::fewbit_fused(x, borders, bits, kind, a, b, codes) -> (y, codes)``: an activation
  and its codes in one pass over x (relu-like clamps, leaky_relu, hardswish, hardsigmoid: torch's
  forward bit for bit; elu, selu, celu, softplus with beta != 1: the correctly rounded one; sigmoid,
  silu, tanh, logsigmoid and softplus with beta 1: float32 ones within 2.41, 3.35, 0.77 (0.57 on the avx-512
  and portable paths), 0.85 and 0.85 ulp).
- ``sparseops::csr_dds_fewbit(...) -> (y, codes)``: a sparse linear layer and its activation in
  one op, ``y = act(x Wᵀ + b)``, returning the codes of the pre-activation instead of it.

Dispatch follows :mod:`sparseops.ops.csr`: each public op is a ``triton_op`` whose CUDA body
launches the Triton kernels; elsewhere it calls an opaque host op whose CPU kernel is ``_C``
(fp32, bf16 and fp16) and whose default is the reference.
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from .. import reference
from .._cpp import _C
from ..fewbit.table import activation_fn
from ..reference.fewbit import fewbit_unpack_codes as _unpack_codes, num_words
from . import _gpu
from .csr import _CPU, _csr_dds_cpu, _eager_cuda, triton_op


_CPP_DTYPES = {torch.float32: "float32", torch.bfloat16: "bfloat16", torch.float16: "float16"}

# NOTE: a second thread pays from 64k elements on (fused relu + codes, 2 threads against 1, ad hoc
# medians: 9.9 / 15.3 us at 64k, 16.3 / 26.2 at 128k; equal at 32k, where the C++ chunk of 32k is
# one chunk anyway). Before, 256k: a [32, 4096] activation ran on one thread.
_MIN_ELEMS_PER_THREAD = 1 << 15


def _threads(n: int) -> int:
    return max(1, min(torch.get_num_threads(), n // _MIN_ELEMS_PER_THREAD))


def _np_elems(t: Tensor):
    # 16-bit floats cross into numpy as their int16 bit patterns; the binding is told the dtype
    return (t if t.dtype == torch.float32 else t.view(torch.int16)).detach().numpy()


def _f32(t: Tensor) -> Tensor:
    # a table as _C reads it (the check skips two dispatches a call: ~4 us of a ~20 us small call)
    return t if t.dtype == torch.float32 and t.is_contiguous() else t.to(torch.float32).contiguous()


def _use_cpp(t: Tensor) -> bool:
    return _C is not None and t.device.type == "cpu" and t.dtype in _CPP_DTYPES


# ---- the binding's checks, for the reference path (fp64, other devices, no C++ build) ----


def _check_table(bits: int, borders: Tensor | None = None, levels: Tensor | None = None, codes: Tensor | None = None,
                 n: int | None = None) -> None:
    """What the C++ binding checks before a kernel runs, with its messages: without them the reference
    packed a code past 2^bits - 1 into fewer bits, ignored surplus codes, or failed with a bare IndexError."""
    if isinstance(bits, bool) or not isinstance(bits, int) or not 1 <= bits <= 4:
        raise ValueError(f"bits: expected 1, 2, 3 or 4, got {bits}")
    for name, t, want in (("borders", borders, (1 << bits) - 1), ("levels", levels, 1 << bits)):
        if t is None:
            continue
        if t.dim() != 1:
            raise ValueError(f"{name}: expected a 1-D array, got shape {tuple(t.shape)}")
        if t.numel() != want:
            raise ValueError(f"{name}: expected {want} entries, got {t.numel()}")
    if borders is not None:
        b = borders.tolist()
        for k, v in enumerate(b):
            if v != v:
                raise ValueError(f"borders: entry {k} is nan")
            if k and v < b[k - 1]:
                raise ValueError(f"borders: must be sorted (non-decreasing) at {k}")
    if codes is not None:
        if codes.dtype != torch.int32:
            raise TypeError(f"codes: expected dtype int32, got {codes.dtype}")
        want = num_words(n, bits)
        if codes.dim() != 1 or codes.numel() != want:
            raise ValueError(f"codes: expected shape ({want},) for {n} elements at {bits} bits, got "
                             f"{tuple(codes.shape)}")


def _pack_reference(x, borders, bits):
    _check_table(bits, borders=borders)
    return reference.fewbit_pack(x, borders, bits)


def _unpack_reference(grad, codes, levels, bits):
    _check_table(bits, levels=levels, codes=codes, n=grad.numel())
    return reference.fewbit_unpack(grad, codes, levels, bits)


# ---- host ops: cpu -> _C, anything else -> reference ----


@torch.library.custom_op("sparseops::fewbit_pack_host", mutates_args=())
def fewbit_pack_host(x: Tensor, borders: Tensor, bits: int) -> Tensor:
    return _pack_reference(x, borders, bits)


@fewbit_pack_host.register_kernel("cpu")
def _fewbit_pack_cpu(x, borders, bits):
    if not _use_cpp(x):
        return _pack_reference(x, borders, bits)
    x = x.contiguous()
    codes = torch.empty(num_words(x.numel(), bits), dtype=torch.int32, device=_CPU)
    b = _f32(borders)
    _C.fewbit_pack(_np_elems(x), _CPP_DTYPES[x.dtype], b.numpy(), bits, codes.numpy(), _threads(x.numel()))
    return codes


@fewbit_pack_host.register_fake
def _(x, borders, bits):
    return x.new_empty(num_words(x.numel(), bits), dtype=torch.int32)


@torch.library.custom_op("sparseops::fewbit_unpack_host", mutates_args=())
def fewbit_unpack_host(grad: Tensor, codes: Tensor, levels: Tensor, bits: int) -> Tensor:
    return _unpack_reference(grad, codes, levels, bits)


@fewbit_unpack_host.register_kernel("cpu")
def _fewbit_unpack_cpu(grad, codes, levels, bits):
    if not _use_cpp(grad):
        return _unpack_reference(grad, codes, levels, bits)
    grad = grad.contiguous()
    out = torch.empty(grad.shape, dtype=grad.dtype, device=_CPU)
    lv = _f32(levels)
    _C.fewbit_unpack(
        _np_elems(grad), _CPP_DTYPES[grad.dtype], codes.contiguous().numpy(), lv.numpy(), bits, _np_elems(out),
        _threads(grad.numel()),
    )
    return out


@fewbit_unpack_host.register_fake
def _(grad, codes, levels, bits):
    return torch.empty_like(grad, memory_format=torch.contiguous_format)


# ---- public ops: cuda -> triton, else -> host op ----


def _triton(t: Tensor) -> bool:
    # the Triton kernels take fp32/bf16/fp16; a float64 tensor on CUDA takes the reference (the host
    # op's default kernel), as on CPU
    return t.device.type == "cuda" and t.dtype in _CPP_DTYPES


@triton_op("sparseops::fewbit_pack")
def fewbit_pack(x: Tensor, borders: Tensor, bits: int) -> Tensor:
    """Bit-packed few-bit codes of ``x``.

    Args:
        x: any shape, fp32/bf16/fp16 (others take the reference path); read in row-major order.
        borders: ``[2^bits - 1]`` sorted fp32 borders; an element's code is how many it exceeds.
        bits: 1 to 4.

    Returns:
        ``[ceil(x.numel() / 32) * bits]`` int32 (layout in :mod:`sparseops.reference.fewbit`).
    """
    if _triton(x):
        from ..kernels import fewbit as K

        return K.fewbit_pack(x, borders, bits)
    return fewbit_pack_host(x, borders, bits)


@triton_op("sparseops::fewbit_unpack")
def fewbit_unpack(grad: Tensor, codes: Tensor, levels: Tensor, bits: int) -> Tensor:
    """``grad * levels[code]`` elementwise: the few-bit backward of an activation.

    Args:
        grad: the output gradient, any shape, ``n`` elements.
        codes: from :func:`fewbit_pack` of the activation's input (``n`` elements, ``bits``).
        levels: ``[2^bits]`` fp32, the derivative's value on each interval.
        bits: 1 to 4.

    Returns:
        grad's shape and dtype (contiguous); the product is taken in fp32 and rounded once.
    """
    if _triton(grad):
        from ..kernels import fewbit as K

        return K.fewbit_unpack(grad, codes, levels, bits)
    return fewbit_unpack_host(grad, codes, levels, bits)


fewbit_pack.register_kernel("cpu")(_fewbit_pack_cpu)
fewbit_unpack.register_kernel("cpu")(_fewbit_unpack_cpu)


# ---- the fused forward: an activation and its codes in one pass ----


def _no_codes(x: Tensor) -> Tensor:
    return x.new_empty(0, dtype=torch.int32)


_FUSED_KINDS = ("clamp", "leaky", "hardswish", "hardsigmoid", "tanh", "sigmoid", "elu", "celu", "softplus",
                "logsigmoid", "silu")


def _fused_reference(x, borders, bits, kind, a, b, codes):
    # the binding's checks first (see _check_table)
    _check_table(bits, borders=borders)
    if kind not in _FUSED_KINDS:
        raise ValueError(f"kind: expected one of {', '.join(repr(k) for k in _FUSED_KINDS)}, got {kind!r}")
    if a != a or b != b:
        raise ValueError("a, b: expected numbers, got nan")
    if kind in ("celu", "softplus") and not (2.2250738585072014e-308 <= a < float("inf")):
        raise ValueError(f"a: expected a finite number >= 2.2250738585072014e-308 for {kind!r}, got {a}")
    y = reference.fewbit.fewbit_fused_forward(x, kind, a, b)
    return y, (reference.fewbit_pack(x, borders, bits) if codes else _no_codes(x))


@torch.library.custom_op("sparseops::fewbit_fused", mutates_args=())
def fewbit_fused(x: Tensor, borders: Tensor, bits: int, kind: str, a: float, b: float, codes: bool) -> tuple[Tensor, Tensor]:
    """An activation of ``x`` and, in the same pass, its few-bit codes.

    Args:
        x: any shape, fp32/bf16/fp16 on CPU run ``_C`` (others, and other devices, the reference).
        borders, bits: as :func:`fewbit_pack`.
        kind: ``"clamp"`` (``min(max(x, a), b)``: relu, relu6, hardtanh), ``"leaky"`` (slope ``a``),
            ``"hardswish"``, ``"hardsigmoid"``, ``"tanh"``, ``"sigmoid"``, ``"elu"`` (elu and selu),
            ``"celu"``, ``"softplus"``, ``"logsigmoid"`` or ``"silu"``; see
            :func:`sparseops.reference.fewbit.fewbit_fused_forward`.
        a, b: the activation's constants.
        codes: False for the forward alone.

    Returns:
        ``(y, codes)``: y of x's shape and dtype (contiguous); codes as :func:`fewbit_pack`, or
        ``[0]`` int32 when ``codes`` is False. clamp, leaky, hardswish and hardsigmoid equal torch's
        forward bit for bit; elu, celu and softplus with beta != 1 are torch's float64 function rounded
        to x's dtype (the CPU kernel computes them in float64 too); sigmoid, silu, tanh, logsigmoid and
        softplus with beta 1 are, off the CPU kernel, torch's float64 function rounded to x's dtype and,
        on it, a float32 one within 2.41, 3.35, 0.77, 0.85 and 0.85 ulp of that (torch's own float32 ones:
        2.3, 2.4, 1, 1.5 and 1.5 ulp) rounded to x's dtype.
    """
    return _fused_reference(x, borders, bits, kind, a, b, codes)


@fewbit_fused.register_kernel("cpu")
def _fewbit_fused_cpu(x, borders, bits, kind, a, b, codes):
    if not _use_cpp(x) or x.numel() == 0:
        return _fused_reference(x, borders, bits, kind, a, b, codes)
    x = x.contiguous()
    y = torch.empty_like(x, memory_format=torch.contiguous_format)
    c = torch.empty(num_words(x.numel(), bits), dtype=torch.int32, device=_CPU) if codes else _no_codes(x)
    bd = _f32(borders)
    _C.fewbit_pack_fused(_np_elems(x), _CPP_DTYPES[x.dtype], bd.numpy(), bits, c.numpy() if codes else None, kind,
                         a, b, _np_elems(y), _threads(x.numel()))
    return y, c


@fewbit_fused.register_fake
def _(x, borders, bits, kind, a, b, codes):
    n = num_words(x.numel(), bits) if codes else 0
    return torch.empty_like(x, memory_format=torch.contiguous_format), x.new_empty(n, dtype=torch.int32)


# ---- the fused sparse linear + activation ----


def _dds_fewbit(z: Tensor, activation: str, borders: Tensor, bits: int, pack) -> tuple[Tensor, Tensor]:
    # z is the op's own temporary: it is freed when the op returns, so only y and the codes live on
    fn = activation_fn(activation)
    if fn.fused_own and fn.fused_exact:
        # the CPU kernel's own forward, which the reference reproduces (elu, selu, celu, softplus with
        # beta != 1: correctly rounded); the float32 ones (sigmoid, silu, tanh, logsigmoid, softplus with
        # beta 1) have no such twin, so off the CPU kernel they are torch's
        return reference.fewbit.fewbit_fused_forward(z, *fn.fused), pack(z, borders, bits)
    return fn(z), pack(z, borders, bits)


def _dds_fewbit_cpu(z: Tensor, activation: str, borders: Tensor, bits: int) -> tuple[Tensor, Tensor]:
    fn = activation_fn(activation)
    if fn.fused is None:
        return fn(z), _fewbit_pack_cpu(z, borders, bits)
    return _fewbit_fused_cpu(z, borders, bits, *fn.fused, True)


@torch.library.custom_op("sparseops::csr_dds_fewbit_host", mutates_args=())
def csr_dds_fewbit_host(
    x: Tensor, values: Tensor, crow: Tensor, col: Tensor, bias: Optional[Tensor], out_features: int,
    activation: str, borders: Tensor, bits: int,
) -> tuple[Tensor, Tensor]:
    z = reference.csr_dds(x, values, crow, col, bias, out_features)
    return _dds_fewbit(z, activation, borders, bits, reference.fewbit_pack)


@csr_dds_fewbit_host.register_kernel("cpu")
def _csr_dds_fewbit_cpu(x, values, crow, col, bias, out_features, activation, borders, bits):
    z = _csr_dds_cpu(x, values, crow, col, bias, out_features)
    return _dds_fewbit_cpu(z, activation, borders, bits)


@csr_dds_fewbit_host.register_fake
def _(x, values, crow, col, bias, out_features, activation, borders, bits):
    return x.new_empty(x.shape[0], out_features), x.new_empty(num_words(x.shape[0] * out_features, bits), dtype=torch.int32)


@triton_op("sparseops::csr_dds_fewbit")
def csr_dds_fewbit(
    x: Tensor, values: Tensor, crow: Tensor, col: Tensor, bias: Optional[Tensor], out_features: int,
    activation: str, borders: Tensor, bits: int,
) -> tuple[Tensor, Tensor]:
    """``y = act(x Wᵀ + b)`` for a CSR weight, and the few-bit codes of ``x Wᵀ + b``.

    Args:
        x, values, crow, col, bias, out_features: as :func:`sparseops.ops.csr.csr_dds`.
        activation: a name of :data:`sparseops.fewbit.table.ACTIVATIONS` (torch's default parameters).
        borders: ``[2^bits - 1]`` of the activation's table; bits: 1 to 4.

    Returns:
        ``(y [B, out], codes)``, codes as :func:`fewbit_pack` of the pre-activation.
    """
    if x.device.type == "cuda":
        from ..kernels import csr as KC
        from ..kernels import fewbit as KF

        if _gpu.use_dense(x.shape[0], "csr"):  # as ops.csr.csr_dds: cuBLAS on the rebuilt weight
            z = torch.nn.functional.linear(x, _gpu.csr_weight(values, crow, col, out_features, x.shape[1]), bias)
        else:
            z = KC.csr_dds(x, values, crow, col, bias, out_features)
        return _dds_fewbit(z, activation, borders, bits, KF.fewbit_pack if _triton(z) else reference.fewbit_pack)
    return csr_dds_fewbit_host(x, values, crow, col, bias, out_features, activation, borders, bits)


csr_dds_fewbit.register_kernel("cpu")(_csr_dds_fewbit_cpu)


# ---- eager entry points for the autograd layer (see sparseops.ops.csr) ----


def _eager_cpu(t: Tensor) -> bool:
    return t.device.type == "cpu" and not torch.compiler.is_compiling()


def pack(x: Tensor, borders: Tensor, bits: int) -> Tensor:
    """:func:`fewbit_pack` for the autograd layer."""
    if _eager_cpu(x):
        return _fewbit_pack_cpu(x, borders, bits)
    if _eager_cuda(x):
        return fewbit_pack.body(x, borders, bits)
    return torch.ops.sparseops.fewbit_pack(x, borders, bits)


def fused(x: Tensor, fn, borders: Tensor, bits: int, codes: bool = True) -> tuple[Tensor, Optional[Tensor]]:
    """``(fn(x), pack(x, borders, bits))`` for the autograd layer (codes None when ``codes`` is False).

    For an activation with a fused CPU kernel (``fn.fused``, set by ``fewbit.table.activation_fn``:
    relu, relu6, hardtanh, leaky_relu, hardswish, hardsigmoid, tanh, sigmoid, silu, elu, selu, celu,
    softplus, logsigmoid) on a CPU tensor, one pass reads x and writes both (:func:`fewbit_fused`): for the
    piecewise-linear ones and hardswish the same values as torch's forward, bit for bit; for the others
    (``fn.fused_own``) the kernel's own (elu, selu, celu, softplus with beta != 1: correctly rounded from
    float64; sigmoid, silu, tanh, logsigmoid, softplus with beta 1: float32, within 2.41, 3.35, 0.77, 0.85
    and 0.85 ulp), which
    the layer then uses everywhere on CPU.
    Anything else runs ``fn`` and :func:`pack` one after the other.
    """
    spec = getattr(fn, "fused", None)
    if spec is None or x.device.type != "cpu":
        return fn(x), (pack(x, borders, bits) if codes else None)
    if _eager_cpu(x):
        y, c = _fewbit_fused_cpu(x, borders, bits, *spec, codes)
    else:
        y, c = torch.ops.sparseops.fewbit_fused(x, borders, bits, *spec, codes)
    return y, (c if codes else None)


def unpack(grad: Tensor, codes: Tensor, levels: Tensor, bits: int) -> Tensor:
    """:func:`fewbit_unpack` for the autograd layer."""
    if _eager_cpu(grad):
        return _fewbit_unpack_cpu(grad, codes, levels, bits)
    if _eager_cuda(grad):
        return fewbit_unpack.body(grad, codes, levels, bits)
    return torch.ops.sparseops.fewbit_unpack(grad, codes, levels, bits)


def dds_fewbit(x, values, crow, col, bias, out_features: int, activation: str, borders: Tensor, bits: int):
    """:func:`csr_dds_fewbit` for the autograd layer."""
    if _eager_cpu(x):
        return _csr_dds_fewbit_cpu(x, values, crow, col, bias, out_features, activation, borders, bits)
    if _eager_cuda(x):
        return csr_dds_fewbit.body(x, values, crow, col, bias, out_features, activation, borders, bits)
    return torch.ops.sparseops.csr_dds_fewbit(x, values, crow, col, bias, out_features, activation, borders, bits)


# ---- the elements a packed 1-bit mask marks ----
# Eager helpers for what an autograd layer saves (``autograd.act`` keeps a ReLU-sparse input as its 1-bit
# mask plus the values the mask marks), not torch.library ops: the layer calls them outside any trace.


def mask_select(x: Tensor, codes: Tensor) -> Tensor:
    """The elements of ``x`` (row-major) whose bit the packed 1-bit ``codes`` set (the layout of
    :func:`fewbit_pack` at 1 bit), as a 1-D tensor of ``x``'s dtype."""
    if _use_cpp(x):
        out = torch.from_numpy(_C.mask_select(_np_elems(x.contiguous()), codes.contiguous().numpy(),
                                              _threads(x.numel())))
        return out if x.dtype == torch.float32 else out.view(x.dtype)
    mask = _unpack_codes(codes, x.numel(), 1).to(device=x.device, dtype=torch.bool)
    return x.reshape(-1)[mask]


def mask_expand(codes: Tensor, values: Tensor, shape) -> Tensor:
    """The inverse of :func:`mask_select`: a tensor of ``shape`` holding the next of ``values`` where
    ``codes`` set a bit and 0 elsewhere."""
    out = torch.empty(shape, dtype=values.dtype, device=values.device)
    if _use_cpp(values):
        _C.mask_expand(codes.contiguous().numpy(), _np_elems(values.contiguous()), _np_elems(out),
                       _threads(out.numel()))
        return out
    mask = _unpack_codes(codes, out.numel(), 1).to(device=values.device, dtype=torch.bool)
    out.zero_().view(-1)[mask] = values
    return out


def mask_where(codes: Tensor, g: Tensor) -> Tensor:
    """``g`` where the packed 1-bit ``codes`` set a bit (``g``'s row-major order), 0 elsewhere: the gradient
    through a mask, with 0 (not ``nan * 0``) off it."""
    if _use_cpp(g):
        g = g.contiguous()
        out = torch.empty_like(g)
        _C.mask_where(codes.contiguous().numpy(), _np_elems(g), _np_elems(out), _threads(g.numel()))
        return out
    mask = _unpack_codes(codes, g.numel(), 1).to(device=g.device, dtype=torch.bool).view(g.shape)
    return torch.where(mask, g, torch.zeros((), dtype=g.dtype, device=g.device))
