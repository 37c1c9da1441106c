"""Triton kernels for few-bit activation codes, and their launchers.

The codes are those of :mod:`sparseops.reference.fewbit` (the oracle): an element's code is
how many borders it exceeds, packed in groups of 32 elements into ``bits`` int32 words, bit
``i`` of word ``j`` being bit ``j`` of element ``32g + i``'s code.

- ``fewbit_pack``: one program per ``GROUPS`` groups of 32. It loads a ``[GROUPS, 32]`` tile,
  counts the borders below each element, and ORs bit ``j`` of the 32 codes of a group into
  word ``j`` with one reduction per bit plane.
- ``fewbit_unpack``: one program per ``BLOCK`` elements. Each element reads its group's
  words (a group's words are shared by 32 neighbours, so they come from L1/L2), rebuilds its
  code, looks up the level and scales the gradient in fp32.

Both are single streaming passes; the codes cost ``bits/8`` bytes an element. Addresses are
int64. The launchers use only torch ops and ``wrap_triton`` launches, so they can be the body
of a ``torch.library.triton_op``.
"""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

from .csr import _same_device, _tensor, _on_device

_FLOAT_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
_INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"

# the interpreter's cost grows with the number of programs, not their width
_GROUPS = 64 if _INTERPRET else 32
_BLOCK = 4096 if _INTERPRET else 1024


@triton.jit
def _or(a, b):
    return a | b


@triton.jit
def _fewbit_pack_kernel(
    x_ptr,  # [n]
    borders_ptr,  # [2^BITS - 1] fp32
    codes_ptr,  # [ceil(n / 32) * BITS] int32
    n,
    n_groups,
    BITS: tl.constexpr,
    GROUPS: tl.constexpr,
):
    pid = tl.program_id(0)
    g = pid.to(tl.int64) * GROUPS + tl.arange(0, GROUPS)  # [GROUPS]
    lane = tl.arange(0, 32)  # [32]
    offs = g[:, None] * 32 + lane[None, :]  # [GROUPS, 32]
    # -inf exceeds no border: the unused bits of the last group stay zero
    x = tl.load(x_ptr + offs, mask=offs < n, other=float("-inf")).to(tl.float32)
    code = tl.zeros([GROUPS, 32], dtype=tl.int32)
    for k in tl.static_range((1 << BITS) - 1):
        code += (x > tl.load(borders_ptr + k)).to(tl.int32)
    mask_g = g < n_groups
    for j in tl.static_range(BITS):
        plane = ((code >> j) & 1) << lane[None, :]  # [GROUPS, 32], distinct bits per group
        word = tl.reduce(plane, 1, _or)  # [GROUPS]
        tl.store(codes_ptr + g * BITS + j, word, mask=mask_g)


@triton.jit
def _fewbit_unpack_kernel(
    grad_ptr,  # [n]
    codes_ptr,  # [ceil(n / 32) * BITS] int32
    levels_ptr,  # [2^BITS] fp32
    out_ptr,  # [n]
    n,
    BITS: tl.constexpr,
    BLOCK: tl.constexpr,
    ROUND_BF16: tl.constexpr,
):
    pid = tl.program_id(0)
    offs = pid.to(tl.int64) * BLOCK + tl.arange(0, BLOCK)  # [BLOCK]
    mask = offs < n
    group = offs // 32
    lane = (offs % 32).to(tl.int32)
    code = tl.zeros([BLOCK], dtype=tl.int32)
    for j in tl.static_range(BITS):
        w = tl.load(codes_ptr + group * BITS + j, mask=mask, other=0)
        # an arithmetic shift only fills the bits above `lane`, so & 1 still reads bit `lane`
        code |= ((w >> lane) & 1) << j
    level = tl.load(levels_ptr + code, mask=mask, other=0.0)
    g = tl.load(grad_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    y = g * level
    if ROUND_BF16:
        # round to nearest even by hand, so that the cast below only drops zero bits: the
        # interpreter's fp32 -> bf16 cast truncates, the gpu's rounds, and both must match torch
        u = y.to(tl.int32, bitcast=True)
        u = (u + 0x7FFF + ((u >> 16) & 1)) & -65536
        y = tl.where(y != y, y, u.to(tl.float32, bitcast=True))
    tl.store(out_ptr + offs, y.to(out_ptr.dtype.element_ty), mask=mask)


# --------------------------------------------------------------------------- checks


def _elements(name: str, t) -> torch.Tensor:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name}: expected a torch.Tensor, got {type(t).__name__}")
    if t.dtype not in _FLOAT_DTYPES:
        raise TypeError(f"{name}: expected dtype float32, bfloat16 or float16, got {t.dtype}")
    return t


def _bits(bits) -> int:
    if isinstance(bits, bool) or not isinstance(bits, int):
        raise TypeError(f"bits: expected an int in 1..4, got {type(bits).__name__}")
    if not 1 <= bits <= 4:
        raise ValueError(f"bits: expected 1, 2, 3 or 4, got {bits}")
    return bits


def _table(name: str, t, entries: int) -> torch.Tensor:
    t = _tensor(name, t, 1)
    if t.numel() != entries:
        raise ValueError(f"{name}: expected {entries} entries, got {t.numel()}")
    return t.to(torch.float32).contiguous()


# --------------------------------------------------------------------------- launchers


@_on_device
def fewbit_pack(x, borders, bits, out=None):
    """The packed few-bit codes of every element of ``x`` (row-major order).

    Args:
        x: any shape, float32, bfloat16 or float16.
        borders: ``[2^bits - 1]`` sorted (compared in fp32).
        bits: 1 to 4.
        out: optional int32 ``[ceil(x.numel() / 32) * bits]`` buffer; every word is written.

    Returns:
        the int32 codes (``out`` when given).

    Raises:
        TypeError: a wrong type or dtype. ValueError: a wrong size, bits or device.
    """
    x = _elements("x", x)
    bits = _bits(bits)
    borders = _table("borders", borders, (1 << bits) - 1)
    _same_device(x, borders=borders)
    n = x.numel()
    n_groups = triton.cdiv(n, 32)
    if out is None:
        out = torch.empty(n_groups * bits, dtype=torch.int32, device=x.device)
    elif not isinstance(out, torch.Tensor) or out.dtype != torch.int32 or out.shape != (n_groups * bits,):
        raise ValueError(f"out: expected an int32 tensor of shape ({n_groups * bits},)")
    elif not out.is_contiguous() or out.device != x.device:
        raise ValueError(f"out: expected a contiguous tensor on {x.device}")
    if n == 0:
        return out
    x = x.contiguous()
    grid = (triton.cdiv(n_groups, _GROUPS),)
    torch.library.wrap_triton(_fewbit_pack_kernel)[grid](x, borders, out, n, n_groups, BITS=bits, GROUPS=_GROUPS)
    return out


@_on_device
def fewbit_unpack(grad, codes, levels, bits, out=None):
    """``grad * levels[code]`` elementwise, in fp32, rounded once to ``grad.dtype``.

    Args:
        grad: any shape, float32, bfloat16 or float16.
        codes: int32 ``[ceil(grad.numel() / 32) * bits]`` from :func:`fewbit_pack`.
        levels: ``[2^bits]``.
        bits: 1 to 4.
        out: optional contiguous buffer of grad's shape and dtype; every element is written.

    Returns:
        grad's shape and dtype (``out`` when given).

    Raises:
        TypeError: a wrong type or dtype. ValueError: a wrong size, bits or device.
    """
    grad = _elements("grad", grad)
    bits = _bits(bits)
    levels = _table("levels", levels, 1 << bits)
    codes = _tensor("codes", codes, 1)
    n = grad.numel()
    if codes.dtype != torch.int32 or codes.numel() != triton.cdiv(n, 32) * bits:
        raise ValueError(f"codes: expected int32 of {triton.cdiv(n, 32) * bits} words, got {codes.dtype} of {codes.numel()}")
    _same_device(grad, codes=codes, levels=levels)
    if out is None:
        out = torch.empty(grad.shape, dtype=grad.dtype, device=grad.device)
    elif (
        not isinstance(out, torch.Tensor) or out.shape != grad.shape or out.dtype != grad.dtype
        or not out.is_contiguous() or out.device != grad.device
    ):
        raise ValueError(f"out: expected a contiguous {grad.dtype} tensor of shape {tuple(grad.shape)} on {grad.device}")
    if n == 0:
        return out
    grad, codes = grad.contiguous(), codes.contiguous()
    grid = (triton.cdiv(n, _BLOCK),)
    torch.library.wrap_triton(_fewbit_unpack_kernel)[grid](
        grad, codes, levels, out, n, BITS=bits, BLOCK=_BLOCK, ROUND_BF16=grad.dtype == torch.bfloat16
    )
    return out
