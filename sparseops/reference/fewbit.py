"""Pure-torch few-bit codes (Few-Bit Backward): the oracle of the kernels and their fallback.

An element's code is the number of borders it exceeds, ``code(x) = #{k : x > borders[k]}``
(nan exceeds none), so with ``2^b - 1`` sorted borders it is a b-bit interval index. Codes are
packed in groups of 32 elements: group ``g`` owns the ``b`` int32 words
``codes[g*b : g*b + b]``, and bit ``i`` of word ``j`` is bit ``j`` of the code of element
``32*g + i``, in the flattened (row-major) order of the input. That is b bits an element;
the unused bits of the last group are zero.
"""

from __future__ import annotations

import torch
from torch import Tensor


def num_words(n: int, bits: int) -> int:
    """The int32 words that hold the codes of ``n`` elements at ``bits`` bits."""
    return (n + 31) // 32 * bits


def fewbit_codes(x: Tensor, borders: Tensor) -> Tensor:
    """The unpacked codes: int64 of ``x``'s shape, ``#{k : x > borders[k]}`` (nan -> 0)."""
    xf = x.to(torch.promote_types(x.dtype, torch.float32))
    b = borders.to(device=x.device, dtype=xf.dtype).contiguous()
    # searchsorted's left insertion point counts the borders strictly below x
    codes = torch.searchsorted(b, xf.contiguous())
    return torch.where(torch.isnan(xf), torch.zeros_like(codes), codes)


def fewbit_pack(x: Tensor, borders: Tensor, bits: int) -> Tensor:
    """Pack the codes of every element of ``x``.

    Args:
        x: any shape; compared in fp32 (fp64 stays fp64).
        borders: ``[2^bits - 1]``, sorted.
        bits: 1 to 4.

    Returns:
        ``[ceil(x.numel() / 32) * bits]`` int32, the layout in the module docstring.
    """
    n = x.numel()
    groups = (n + 31) // 32
    codes = torch.zeros(groups * 32, dtype=torch.int64, device=x.device)
    codes[:n] = fewbit_codes(x, borders).reshape(-1)
    codes = codes.view(groups, 1, 32)
    planes = (codes >> torch.arange(bits, device=x.device).view(1, bits, 1)) & 1  # [G, bits, 32]
    words = (planes << torch.arange(32, device=x.device)).sum(-1)  # [G, bits], < 2^32
    # reinterpret as int32: words at or above 2^31 are the negative ones
    words = torch.where(words >= 1 << 31, words - (1 << 32), words)
    return words.reshape(-1).to(torch.int32)


def fewbit_unpack_codes(codes: Tensor, n: int, bits: int) -> Tensor:
    """The inverse of the packing: int64 ``[n]`` codes from ``[ceil(n / 32) * bits]`` words."""
    words = codes.to(torch.int64).view(-1, bits, 1) & 0xFFFFFFFF
    lanes = (words >> torch.arange(32, device=codes.device)) & 1  # [G, bits, 32]
    c = (lanes << torch.arange(bits, device=codes.device).view(1, bits, 1)).sum(1)  # [G, 32]
    return c.reshape(-1)[:n]


def fewbit_unpack(grad: Tensor, codes: Tensor, levels: Tensor, bits: int) -> Tensor:
    """``grad * levels[code]`` elementwise, computed in fp32 (fp64 stays fp64) and rounded once.

    Args:
        grad: any shape, ``n`` elements.
        codes: from :func:`fewbit_pack` for ``n`` elements at ``bits``.
        levels: ``[2^bits]``.

    Returns:
        grad's shape and dtype, contiguous.
    """
    c = fewbit_unpack_codes(codes, grad.numel(), bits)
    gf = grad.to(torch.promote_types(grad.dtype, torch.float32))
    lv = levels.to(device=grad.device, dtype=gf.dtype)[c].view(grad.shape)
    return (gf * lv).to(grad.dtype).contiguous()


def fewbit_fused_forward(x: Tensor, kind: str, a: float = 0.0, b: float = 0.0) -> Tensor:
    """The forward that ``sparseops::fewbit_fused`` computes next to the codes, in pure torch.

    Args:
        x: any shape, floating point.
        kind: ``"clamp"`` (``min(max(x, a), b)``: relu, relu6, hardtanh), ``"leaky"`` (``x`` above 0,
            else ``x * a``), ``"hardswish"``, ``"hardsigmoid"``, ``"tanh"``, ``"sigmoid"``,
            ``"elu"`` (``x * b`` for x >= 0, else ``a * (e^x - 1)``: elu, and selu with a = alpha * scale,
            b = scale), ``"celu"`` (alpha ``a``), ``"softplus"`` (beta ``a``, threshold ``b``),
            ``"logsigmoid"`` or ``"silu"``.
        a, b: the activation's constants, as above.

    Returns:
        x's shape and dtype. clamp, leaky, hardswish and hardsigmoid are torch's own functions. The others
        are computed in float64 by torch and rounded to x's dtype (the correctly rounded value) for 16-
        and 32-bit floats. The CPU kernel gives this value for elu, celu and softplus with beta != 1; its
        float32 sigmoid, silu, tanh, logsigmoid and softplus with beta 1 are within 2.41, 3.35, 0.77,
        0.85 and 0.85 ulp of it (``csrc/fmath.h``): for those this is the oracle, not their bit pattern.
        silu(-inf) is -0 (its limit; torch's silu gives nan there).

    Raises:
        ValueError: unknown kind.
    """
    if kind == "clamp":
        return torch.clamp(x, a, b) if b != float("inf") else torch.clamp(x, min=a)
    if kind == "leaky":
        return torch.nn.functional.leaky_relu(x, a)
    if kind == "hardswish":
        return torch.nn.functional.hardswish(x)
    if kind == "hardsigmoid":
        return torch.nn.functional.hardsigmoid(x)
    own = {
        "tanh": torch.tanh,
        "sigmoid": torch.sigmoid,
        "silu": lambda d: torch.where(d == float("-inf"), torch.zeros_like(d).neg(), torch.nn.functional.silu(d)),
        "logsigmoid": torch.nn.functional.logsigmoid,
        "elu": lambda d: torch.where(d >= 0, d * b, a * torch.expm1(d)),
        "celu": lambda d: torch.where(d >= 0, d, a * torch.expm1(d * (1.0 / a))),
        # torch's rule (x where x * beta > threshold, tested as torch's float32 forward tests it: the
        # float32 product against float32 constants) and, below it, log(1 + e^(x beta)) / beta in the
        # form that cannot overflow: torch's own gives inf above x * beta = 709.8 in float64 (88.7 in
        # float32), which only a threshold above those reaches
        "softplus": lambda d: torch.where(
            d.float() * torch.tensor(a, dtype=torch.float32) > torch.tensor(b, dtype=torch.float32), d,
            (torch.clamp(d * a, min=0) + torch.log1p(torch.exp(-(d * a).abs()))) * (1.0 / a)),
    }
    if kind in own:
        if x.dtype in (torch.float32, torch.bfloat16, torch.float16):
            return own[kind](x.double()).to(x.dtype)
        return own[kind](x)
    raise ValueError(
        f"kind: expected 'clamp', 'leaky', 'hardswish', 'hardsigmoid', 'tanh', 'sigmoid', 'elu', 'celu', "
        f"'softplus', 'logsigmoid' or 'silu', got {kind!r}"
    )
