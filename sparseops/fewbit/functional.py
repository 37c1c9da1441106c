"""Functional few-bit activations: ``sparseops.fewbit.gelu(x, bits=2)`` and one per activation.

Each returns exactly what ``torch.nn.functional``'s activation returns, except tanh, sigmoid, silu,
elu, selu, celu, softplus and logsigmoid on CPU, whose fused kernel computes its own forward (elu,
selu, celu and softplus with beta != 1: the correctly rounded value, from float64; sigmoid, silu, tanh,
logsigmoid and softplus with beta 1: float32, within 2.41, 3.35, 0.77, 0.85 and 0.85 ulp of it, where
torch's are within 2.3, 2.4, 1, 1.5 and 1.5); only the
gradient is approximated, through the activation's optimal table (see
:func:`sparseops.fewbit.get_table`).
"""

from __future__ import annotations

import functools

import torch
from torch import Tensor, nn

from ..autograd.fewbit import fewbit_activation
from .table import ACTIVATIONS, _resolve_params, activation_fn, get_table

# the fewest bits that make each piecewise-linear activation's gradient exact
EXACT_BITS = {"relu": 1, "leaky_relu": 1, "relu6": 2, "hardtanh": 2, "hardsigmoid": 2}
DEFAULT_BITS = 2


def default_bits(name: str) -> int:
    """Bits a few-bit ``name`` uses unless told: the exact count for piecewise-linear ones, else 2."""
    return EXACT_BITS.get(name, DEFAULT_BITS)


def check_bits(bits, name: str = "bits") -> int:
    """Return ``bits`` if it is an int in 1..4.

    Raises:
        TypeError: not an int; ValueError: out of range.
    """
    if isinstance(bits, bool) or not isinstance(bits, int):
        raise TypeError(f"{name}: expected an int in 1..4, got {type(bits).__name__}")
    if not 1 <= bits <= 4:
        raise ValueError(f"{name}: expected 1, 2, 3 or 4, got {bits}")
    return bits


def table_bits(name: str, bits: int, **params) -> tuple[Tensor, Tensor]:
    """The table of ``name`` at ``bits`` as fp32 bit patterns in int32 ``(borders, levels)``.

    Held as int32 so that a module's ``.to(dtype)`` / ``.half()`` moves them without rounding them;
    ``.view(torch.float32)`` gives the values back.
    Made on the CPU (whatever ``torch.set_default_device`` says): the callers move them.
    """
    t = get_table(name, bits, **params)
    borders = torch.tensor(t.borders, dtype=torch.float32, device="cpu").view(torch.int32)
    levels = torch.tensor(t.levels, dtype=torch.float32, device="cpu").view(torch.int32)
    return borders, levels


@functools.lru_cache(maxsize=None)
def _cached(name: str, bits: int, params: tuple, device: torch.device):
    # normal tensors even when the first call comes under torch.inference_mode(): an inference tensor kept
    # here could not be saved for backward by any later training call
    with torch.inference_mode(False):
        borders, levels = table_bits(name, bits, **dict(params))
        return (
            borders.view(torch.float32).to(device),
            levels.view(torch.float32).to(device),
            activation_fn(name, **dict(params)),
        )


@torch.compiler.assume_constant_result
def _table_floats(name: str, bits: int, params: tuple) -> tuple[tuple, tuple]:
    # what torch.compile reads instead of _cached: dynamo traces into an lru_cache (and the table code
    # imports and solves), but calls this once per (name, bits, params) and keeps its floats as constants
    t = get_table(name, bits, **dict(params))
    return tuple(t.borders), tuple(t.levels)


def activation(x: Tensor, name: str, bits: int | None = None, **params) -> Tensor:
    """``name(x)`` with a few-bit gradient.

    Args:
        x: any shape, fp32/bf16/fp16 (fp64 runs on the reference path).
        name: one of :data:`sparseops.fewbit.ACTIVATIONS`.
        bits: 1 to 4; default 2, or the exact count for piecewise-linear activations.
        params: the activation's own parameters, as ``torch.nn.functional`` names them.

    Returns:
        ``torch.nn.functional.<name>(x, **params)`` (tanh, sigmoid, silu, elu, selu, celu, softplus and
        logsigmoid on CPU: the fused kernel's own, see the module docstring); backward saves ``bits``
        bits an element.

    Raises:
        ValueError: unknown name or bits out of range; TypeError: x is not a floating-point tensor.
    """
    if name not in ACTIVATIONS:
        raise ValueError(f"name: expected one of {sorted(ACTIVATIONS)}, got {name!r}")
    bits = check_bits(default_bits(name) if bits is None else bits)
    if not isinstance(x, Tensor):
        raise TypeError(f"x: expected a torch.Tensor, got {type(x).__name__}")
    if torch.compiler.is_compiling():
        b, lv = _table_floats(name, bits, tuple(sorted(params.items())))
        borders = torch.tensor(b, dtype=torch.float32, device=x.device)
        levels = torch.tensor(lv, dtype=torch.float32, device=x.device)
        return fewbit_activation(x, activation_fn(name, **params), borders, levels, bits)
    try:
        borders, levels, fn = _cached(name, bits, tuple(sorted(params.items())), x.device)
    except TypeError:
        _resolve_params(name, params)  # an unhashable parameter: the error that names it
        raise
    return fewbit_activation(x, fn, borders, levels, bits)


def gelu(x: Tensor, bits: int = 2, approximate: str = "none") -> Tensor:
    """``F.gelu(x, approximate=approximate)`` with a ``bits``-bit gradient."""
    return activation(x, "gelu", bits, approximate=approximate)


def silu(x: Tensor, bits: int = 2) -> Tensor:
    """``F.silu(x)`` with a ``bits``-bit gradient (on CPU: within 3.35 ulp, see ``csrc/fmath.h``)."""
    return activation(x, "silu", bits)


def tanh(x: Tensor, bits: int = 2) -> Tensor:
    """``torch.tanh(x)`` with a ``bits``-bit gradient (on CPU: within 0.57 ulp, 0.77 on the AVX2 path; see
    ``csrc/fmath.h``)."""
    return activation(x, "tanh", bits)


def sigmoid(x: Tensor, bits: int = 2) -> Tensor:
    """``torch.sigmoid(x)`` with a ``bits``-bit gradient (on CPU: within 2.41 ulp, see ``csrc/fmath.h``)."""
    return activation(x, "sigmoid", bits)


def softplus(x: Tensor, bits: int = 2, beta: float = 1.0, threshold: float = 20.0) -> Tensor:
    """``F.softplus(x, beta, threshold)`` with a ``bits``-bit gradient."""
    return activation(x, "softplus", bits, beta=beta, threshold=threshold)


def elu(x: Tensor, bits: int = 2, alpha: float = 1.0) -> Tensor:
    """``F.elu(x, alpha)`` with a ``bits``-bit gradient."""
    return activation(x, "elu", bits, alpha=alpha)


def selu(x: Tensor, bits: int = 2) -> Tensor:
    """``F.selu(x)`` with a ``bits``-bit gradient."""
    return activation(x, "selu", bits)


def celu(x: Tensor, bits: int = 2, alpha: float = 1.0) -> Tensor:
    """``F.celu(x, alpha)`` with a ``bits``-bit gradient."""
    return activation(x, "celu", bits, alpha=alpha)


def mish(x: Tensor, bits: int = 2) -> Tensor:
    """``F.mish(x)`` with a ``bits``-bit gradient."""
    return activation(x, "mish", bits)


def logsigmoid(x: Tensor, bits: int = 2) -> Tensor:
    """``F.logsigmoid(x)`` with a ``bits``-bit gradient."""
    return activation(x, "logsigmoid", bits)


def hardswish(x: Tensor, bits: int = 2) -> Tensor:
    """``F.hardswish(x)`` with a ``bits``-bit gradient."""
    return activation(x, "hardswish", bits)


def softsign(x: Tensor, bits: int = 2) -> Tensor:
    """``F.softsign(x)`` with a ``bits``-bit gradient."""
    return activation(x, "softsign", bits)


def relu(x: Tensor, bits: int = 1) -> Tensor:
    """``F.relu(x)``; its gradient is exact at 1 bit (the sign mask)."""
    return activation(x, "relu", bits)


def leaky_relu(x: Tensor, bits: int = 1, negative_slope: float = 0.01) -> Tensor:
    """``F.leaky_relu(x, negative_slope)``; exact at 1 bit."""
    return activation(x, "leaky_relu", bits, negative_slope=negative_slope)


def relu6(x: Tensor, bits: int = 2) -> Tensor:
    """``F.relu6(x)``; exact at 2 bits."""
    return activation(x, "relu6", bits)


def hardtanh(x: Tensor, bits: int = 2, min_val: float = -1.0, max_val: float = 1.0) -> Tensor:
    """``F.hardtanh(x, min_val, max_val)``; exact at 2 bits."""
    return activation(x, "hardtanh", bits, min_val=min_val, max_val=max_val)


def hardsigmoid(x: Tensor, bits: int = 2) -> Tensor:
    """``F.hardsigmoid(x)``; exact at 2 bits."""
    return activation(x, "hardsigmoid", bits)


def convert_(model: nn.Module, bits: int = 2, *, filter_fn=None) -> nn.Module:
    """Swap ``model``'s torch activation modules for few-bit ones, in place.

    ``nn.GELU``, ``nn.SiLU``, ``nn.Tanh``, ... (every activation of
    :data:`sparseops.fewbit.ACTIVATIONS`) become the matching ``sparseops.nn.FewBit*`` with the
    same parameters. Smooth activations get ``bits``; piecewise-linear ones (ReLU, LeakyReLU,
    ReLU6, Hardtanh, Hardsigmoid) get their exact table, which needs 1 or 2 bits whatever
    ``bits`` says. Outputs are torch's, except that on CPU tanh, sigmoid, silu, elu, selu, celu, softplus
    and logsigmoid return the fused kernel's own forward (see the module docstring); backward memory and the
    gradient change.

    Also converted: the activation *function* of ``nn.TransformerEncoderLayer`` / ``DecoderLayer`` (``F.relu``
    or ``F.gelu``, what ``activation="relu"/"gelu"`` makes; it becomes a submodule ``activation``), and
    ``transformers``' ``GELUActivation``, ``GELUTanh`` (torch's tanh GELU) and ``SiLUActivation``, which call
    the torch function. Every other module is left as it is: a warning names the activation-like modules
    left (PReLU, GLU, ``NewGELUActivation``'s own formula, ...), or says that nothing was converted.

    Args:
        model: any module; the model itself is not replaced even if it is an activation.
        bits: 1 to 4, for the smooth activations.
        filter_fn: optional ``filter_fn(module, fqn) -> bool`` (as ``sparsify_``'s); only what it accepts is
            swapped. For a transformer layer's activation function, ``module`` is the function and ``fqn``
            ``"<layer>.activation"``.

    Returns:
        ``model``.

    Raises:
        TypeError: ``model`` is not an nn.Module; TypeError/ValueError: bad ``bits``.
    """
    import warnings

    from ..nn.activation import few_bit_from_torch, few_bit_from_function, looks_like_activation

    if not isinstance(model, nn.Module):
        raise TypeError(f"model: expected an nn.Module, got {type(model).__name__}")
    check_bits(bits)
    swaps, left = [], []
    made = {}  # id(old module) -> its few-bit twin: an instance used twice stays one shared module
    for qual, module in model.named_modules():
        if isinstance(module, (nn.TransformerEncoderLayer, nn.TransformerDecoderLayer)) \
                and "activation" not in module._modules:
            fn = getattr(module, "activation", None)
            full = f"{qual}.activation" if qual else "activation"
            if filter_fn is None or filter_fn(fn, full):
                new = few_bit_from_function(fn, bits)
                if new is not None:
                    new.train(module.training)
                    swaps.append((module, "activation", new))
                elif fn is not None:
                    left.append(f"{full} ({getattr(fn, '__name__', type(fn).__name__)})")
        # _modules, not named_children(): that skips a second slot holding the same instance
        # (Sequential(lin, act, lin, act)), which would stay a torch activation
        for child_name, child in list(module._modules.items()):
            if child is None:
                continue
            full = f"{qual}.{child_name}" if qual else child_name
            if filter_fn is not None and not filter_fn(child, full):
                continue  # a module the filter leaves alone is not even looked at
            if id(child) not in made:
                try:
                    made[id(child)] = few_bit_from_torch(child, bits)
                except (TypeError, ValueError) as exc:
                    raise type(exc)(f"model: module {full!r} ({type(child).__name__}): {exc}") from exc
                if made[id(child)] is not None:
                    made[id(child)].train(child.training)  # the mode carries over, as in SparseLinear.from_dense
                elif looks_like_activation(child):
                    left.append(f"{full} ({type(child).__name__})")
            new = made[id(child)]
            if new is not None:
                swaps.append((module, child_name, new))
    # the tables follow the model's device (an activation module has no tensors to say so)
    ref = next(iter([*model.parameters(), *model.buffers()]), None)
    for parent, child_name, new in swaps:
        setattr(parent, child_name, new if ref is None else new.to(ref.device))
    if left:
        warnings.warn(f"convert_: left {len(left)} activation(s) with no few-bit twin as they are "
                      f"({', '.join(left[:5])}{', ...' if len(left) > 5 else ''}); they keep their full backward memory",
                      stacklevel=2)
    elif not swaps:
        warnings.warn("convert_: found no activation to convert"
                      f"{' that filter_fn accepts (it is called as filter_fn(module, fqn))' if filter_fn else ''}: "
                      "nothing is swapped", stacklevel=2)
    return model
