"""Few-bit activation modules: ``FewBitGELU(bits=2)`` and one per torch activation.

Each takes the constructor arguments of its torch counterpart plus ``bits``, returns exactly
what the torch module returns (on CPU, tanh, sigmoid, silu, elu, selu, celu, softplus and logsigmoid
return the fused kernel's own, more accurate forward: see :mod:`sparseops.fewbit.functional`), and saves ``bits`` bits an element for
backward instead of its input. ``inplace=True`` is accepted for drop-in compatibility but never
honoured: the input is not modified.
"""

from __future__ import annotations

import functools

import torch
from torch import Tensor, nn

from ..autograd.fewbit import fewbit_activation
from ..fewbit.functional import EXACT_BITS, check_bits, default_bits, table_bits
from ..fewbit.table import _resolve_params, activation_fn


class FewBitActivation(nn.Module):
    """Base class: the activation ``name`` with the few-bit table at ``bits`` (see ``sparseops.fewbit``).

    The table is held in two non-persistent int32 buffers (fp32 bit patterns): they follow
    ``.to(device)``, are not rounded by ``.to(dtype)``/``.half()``, and add nothing to ``state_dict``,
    so converting a model keeps its checkpoints loadable.
    """

    name = ""

    def __init__(self, bits: int | None = None, **params):
        super().__init__()
        self.bits = check_bits(default_bits(self.name) if bits is None else bits)
        # validated (an error names the parameter) and as floats, before anything uses them
        resolved = _resolve_params(self.name, params)
        self.params = {k: resolved[k] for k in params}
        borders, levels = table_bits(self.name, self.bits, **self.params)  # (on the CPU)
        where = torch.get_default_device()  # where torch's own modules put their tensors
        self.register_buffer("borders_bits", borders.to(where), persistent=False)
        self.register_buffer("levels_bits", levels.to(where), persistent=False)
        self._fn = activation_fn(self.name, **self.params)

    def _apply(self, fn, recurse=True):
        # the table is a constant of (name, bits, params), never data: written again after every move, so
        # that ``to_empty()`` after a meta-device build (which fills buffers with garbage, and a
        # non-persistent buffer is not restored by load_state_dict) leaves the right table
        out = super()._apply(fn, recurse)
        custom = self.__dict__.get("_custom_table")
        borders, levels = custom if custom is not None else table_bits(self.name, self.bits, **self.params)
        self.borders_bits = borders.to(self.borders_bits.device)
        self.levels_bits = levels.to(self.levels_bits.device)
        return out

    def set_table_(self, borders, levels) -> "FewBitActivation":
        """Use the table ``(borders, levels)`` instead of the shipped one, e.g. one weighted by the activations
        this module sees (``sparseops.fewbit.optimal_table(name, bits, weight=histogram)``, see docs/fewbit.md).

        The forward stays exact; the gradient becomes ``grad * levels[code]``. The table is kept through
        ``.to()`` / ``to_empty()`` like the shipped one, but is not part of ``state_dict`` (whose keys stay those
        of the torch module): call this again after building the model from a checkpoint.

        Args:
            borders: ``2^bits - 1`` sorted finite values (a sequence or a tensor); levels: ``2^bits`` finite values.

        Returns:
            ``self``.

        Raises:
            TypeError, ValueError: a table of the wrong size, unsorted, or not finite (nothing is changed).
        """
        from ..ops.fewbit import _check_table

        def as_f32(name, t):
            try:
                t = torch.as_tensor(t, dtype=torch.float64, device="cpu").detach()
            except (TypeError, ValueError, RuntimeError) as exc:
                raise TypeError(f"{name}: expected a sequence of floats or a tensor, got {type(t).__name__}") from exc
            if not bool(torch.isfinite(t).all()):
                raise ValueError(f"{name}: must be finite")
            return t.to(torch.float32)

        b, lv = as_f32("borders", borders), as_f32("levels", levels)
        _check_table(self.bits, b, lv)
        table = (b.view(torch.int32).clone(), lv.view(torch.int32).clone())
        self.__dict__["_custom_table"] = table
        self.borders_bits = table[0].to(self.borders_bits.device)
        self.levels_bits = table[1].to(self.levels_bits.device)
        return self

    @property
    def borders(self) -> Tensor:
        """``[2^bits - 1]`` fp32: an input's code is how many of these it exceeds."""
        return self.borders_bits.view(torch.float32)

    @property
    def levels(self) -> Tensor:
        """``[2^bits]`` fp32: the derivative used on each interval."""
        return self.levels_bits.view(torch.float32)

    def forward(self, x: Tensor) -> Tensor:
        return fewbit_activation(x, self._fn, self.borders, self.levels, self.bits)

    def extra_repr(self) -> str:
        return ", ".join([f"{k}={v!r}" for k, v in self.params.items()] + [f"bits={self.bits}"])


def _ignore_inplace(inplace) -> None:
    if not isinstance(inplace, bool):
        raise TypeError(f"inplace: expected a bool, got {type(inplace).__name__}")


class FewBitGELU(FewBitActivation):
    """``nn.GELU(approximate)`` with a few-bit gradient (default 2 bits)."""

    name = "gelu"

    def __init__(self, approximate: str = "none", bits: int = 2):
        if approximate not in ("none", "tanh"):
            raise ValueError(f"approximate: expected 'none' or 'tanh', got {approximate!r}")
        super().__init__(bits, approximate=approximate)


class FewBitSiLU(FewBitActivation):
    """``nn.SiLU`` with a few-bit gradient."""

    name = "silu"

    def __init__(self, inplace: bool = False, bits: int = 2):
        _ignore_inplace(inplace)
        super().__init__(bits)


class FewBitTanh(FewBitActivation):
    """``nn.Tanh`` with a few-bit gradient."""

    name = "tanh"

    def __init__(self, bits: int = 2):
        super().__init__(bits)


class FewBitSigmoid(FewBitActivation):
    """``nn.Sigmoid`` with a few-bit gradient."""

    name = "sigmoid"

    def __init__(self, bits: int = 2):
        super().__init__(bits)


class FewBitSoftplus(FewBitActivation):
    """``nn.Softplus(beta, threshold)`` with a few-bit gradient."""

    name = "softplus"

    def __init__(self, beta: float = 1.0, threshold: float = 20.0, bits: int = 2):
        super().__init__(bits, beta=beta, threshold=threshold)


class FewBitELU(FewBitActivation):
    """``nn.ELU(alpha)`` with a few-bit gradient."""

    name = "elu"

    def __init__(self, alpha: float = 1.0, inplace: bool = False, bits: int = 2):
        _ignore_inplace(inplace)
        super().__init__(bits, alpha=alpha)


class FewBitSELU(FewBitActivation):
    """``nn.SELU`` with a few-bit gradient."""

    name = "selu"

    def __init__(self, inplace: bool = False, bits: int = 2):
        _ignore_inplace(inplace)
        super().__init__(bits)


class FewBitCELU(FewBitActivation):
    """``nn.CELU(alpha)`` with a few-bit gradient."""

    name = "celu"

    def __init__(self, alpha: float = 1.0, inplace: bool = False, bits: int = 2):
        _ignore_inplace(inplace)
        super().__init__(bits, alpha=alpha)


class FewBitMish(FewBitActivation):
    """``nn.Mish`` with a few-bit gradient."""

    name = "mish"

    def __init__(self, inplace: bool = False, bits: int = 2):
        _ignore_inplace(inplace)
        super().__init__(bits)


class FewBitLogSigmoid(FewBitActivation):
    """``nn.LogSigmoid`` with a few-bit gradient."""

    name = "logsigmoid"

    def __init__(self, bits: int = 2):
        super().__init__(bits)


class FewBitHardswish(FewBitActivation):
    """``nn.Hardswish`` with a few-bit gradient."""

    name = "hardswish"

    def __init__(self, inplace: bool = False, bits: int = 2):
        _ignore_inplace(inplace)
        super().__init__(bits)


class FewBitSoftsign(FewBitActivation):
    """``nn.Softsign`` with a few-bit gradient."""

    name = "softsign"

    def __init__(self, bits: int = 2):
        super().__init__(bits)


class FewBitReLU(FewBitActivation):
    """``nn.ReLU``; 1 bit (the sign mask) makes its gradient exact."""

    name = "relu"

    def __init__(self, inplace: bool = False, bits: int = 1):
        _ignore_inplace(inplace)
        super().__init__(bits)


class FewBitLeakyReLU(FewBitActivation):
    """``nn.LeakyReLU(negative_slope)``; exact at 1 bit."""

    name = "leaky_relu"

    def __init__(self, negative_slope: float = 0.01, inplace: bool = False, bits: int = 1):
        _ignore_inplace(inplace)
        super().__init__(bits, negative_slope=negative_slope)


class FewBitReLU6(FewBitActivation):
    """``nn.ReLU6``; exact at 2 bits."""

    name = "relu6"

    def __init__(self, inplace: bool = False, bits: int = 2):
        _ignore_inplace(inplace)
        super().__init__(bits)


class FewBitHardtanh(FewBitActivation):
    """``nn.Hardtanh(min_val, max_val)``; exact at 2 bits."""

    name = "hardtanh"

    def __init__(self, min_val: float = -1.0, max_val: float = 1.0, inplace: bool = False, bits: int = 2):
        _ignore_inplace(inplace)
        super().__init__(bits, min_val=min_val, max_val=max_val)


class FewBitHardsigmoid(FewBitActivation):
    """``nn.Hardsigmoid``; exact at 2 bits."""

    name = "hardsigmoid"

    def __init__(self, inplace: bool = False, bits: int = 2):
        _ignore_inplace(inplace)
        super().__init__(bits)


# torch module -> (few-bit class, the constructor arguments read off the torch module)
_FROM_TORCH = {
    nn.GELU: (FewBitGELU, ("approximate",)),
    nn.SiLU: (FewBitSiLU, ()),
    nn.Tanh: (FewBitTanh, ()),
    nn.Sigmoid: (FewBitSigmoid, ()),
    nn.Softplus: (FewBitSoftplus, ("beta", "threshold")),
    nn.ELU: (FewBitELU, ("alpha",)),
    nn.SELU: (FewBitSELU, ()),
    nn.CELU: (FewBitCELU, ("alpha",)),
    nn.Mish: (FewBitMish, ()),
    nn.LogSigmoid: (FewBitLogSigmoid, ()),
    nn.Hardswish: (FewBitHardswish, ()),
    nn.Softsign: (FewBitSoftsign, ()),
    nn.ReLU: (FewBitReLU, ()),
    nn.LeakyReLU: (FewBitLeakyReLU, ("negative_slope",)),
    nn.ReLU6: (FewBitReLU6, ()),
    nn.Hardsigmoid: (FewBitHardsigmoid, ()),
    nn.Hardtanh: (FewBitHardtanh, ("min_val", "max_val")),
}


def few_bit_from_torch(module: nn.Module, bits: int) -> FewBitActivation | None:
    """The few-bit twin of a torch activation module (None for anything else).

    Smooth activations get ``bits``; piecewise-linear ones their exact bit count. The match is
    on the exact type: torch makes ReLU6 a subclass of Hardtanh, and a user's subclass may
    override forward.
    """
    entry = _FROM_TORCH.get(type(module))
    if entry is None:
        return _from_transformers(module, bits)
    cls, attrs = entry
    kwargs = {a: getattr(module, a) for a in attrs}
    return cls(**kwargs, bits=EXACT_BITS.get(cls.name, bits))


def _from_transformers(module: nn.Module, bits: int) -> FewBitActivation | None:
    # Hugging Face's activation modules that call the torch function (so the twin's forward is theirs):
    # GELUActivation (F.gelu), GELUTanh (F.gelu, approximate="tanh"), SiLUActivation (F.silu). Matched by
    # module and class name: transformers is not imported here. Their python-formula variants (NewGELU,
    # FastGELU, use_gelu_python) compute other bits and are left
    cls = type(module)
    if cls.__module__ != "transformers.activations":
        return None
    act = getattr(module, "act", None)
    if cls.__name__ == "GELUActivation" and act is nn.functional.gelu:
        return FewBitGELU(bits=bits)
    if cls.__name__ == "GELUTanh" and isinstance(act, functools.partial) and act.func is nn.functional.gelu \
            and not act.args and act.keywords == {"approximate": "tanh"}:
        return FewBitGELU(approximate="tanh", bits=bits)
    if cls.__name__ == "SiLUActivation":
        return FewBitSiLU(bits=bits)
    return None


def few_bit_from_function(fn, bits: int) -> FewBitActivation | None:
    """The few-bit twin of a transformer layer's activation function (``F.relu`` or ``F.gelu``), else None."""
    if fn is nn.functional.relu:
        return FewBitReLU()
    if fn is nn.functional.gelu:
        return FewBitGELU(bits=bits)
    return None


def looks_like_activation(module: nn.Module) -> bool:
    """Whether ``module``, which has no few-bit twin, is an activation a user may expect converted (convert_
    names those it leaves): torch's other activations and subclasses of the converted ones, ``transformers``'
    activation modules and any other leaf module whose class name ends in ``Activation``."""
    if isinstance(module, (FewBitActivation, nn.MultiheadAttention, nn.Softmax, nn.LogSoftmax, nn.Softmax2d,
                           nn.Softmin)):
        return False
    cls = type(module)
    if isinstance(module, tuple(_FROM_TORCH)) or cls.__module__ == "torch.nn.modules.activation":
        return True
    if cls.__name__ == "LinearActivation":  # transformers' identity
        return False
    return (cls.__module__ == "transformers.activations" or cls.__name__.endswith("Activation")) \
        and not list(module.children())
