"""Optimal piecewise-constant derivative tables for Few-Bit Backward (Novikov et al. 2023).

A pointwise activation ``f`` keeps, for its backward pass, only a ``bits``-bit code per
element: the index of the interval its input falls in. Backward then computes
``grad_in = grad_out * levels[code]``, i.e. it multiplies by a step function ``q`` that
approximates ``f'``.

Code convention (the kernels rely on it): ``code(x)`` is the number of borders ``b`` with
``x > b`` (strict), borders sorted non-decreasing, ``len(borders) == 2**bits - 1`` and
``len(levels) == 2**bits``. Borders are float64 values that are exactly representable in
float32, because the kernels compare in float32; levels are float64 and the kernels use them
rounded to float32.

For smooth activations the step function minimises ``∫ (f'(x) - q(x))² w(x) dx`` over
``[lo, hi]``, solved exactly on a grid by dynamic programming (``optimal_table``). The
piecewise-linear activations get analytic tables that reproduce torch's float32 backward bit
for bit (``exact_table``). ``get_table`` returns the shipped table (``_tables.py``) for
default parameters and computes and caches any other.

Regenerate the shipped tables and print the error table of ``docs/fewbit.md`` with::

    python -m sparseops.fewbit.table --write
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import importlib
import math
import numbers
import os
import pprint
import sys
import time
from typing import Callable

import numpy as np
import torch
import torch.nn.functional as F

__all__ = [
    "ACTIVATIONS",
    "SMOOTH_ACTIVATIONS",
    "PWL_ACTIVATIONS",
    "Table",
    "activation_fn",
    "approximation_error",
    "derivative",
    "discretize",
    "encode",
    "error_markdown",
    "exact_table",
    "get_table",
    "optimal_partition",
    "optimal_table",
    "shipped_tables",
]

# name -> (torch forward, default parameters); names and defaults as in torch.nn.functional.
# ``inplace`` is deliberately not accepted: a table describes the math, not the memory.
_SPECS = {
    "gelu": (F.gelu, {"approximate": "none"}),
    "silu": (F.silu, {}),
    "tanh": (torch.tanh, {}),
    "sigmoid": (torch.sigmoid, {}),
    "softplus": (F.softplus, {"beta": 1.0, "threshold": 20.0}),
    "elu": (F.elu, {"alpha": 1.0}),
    "selu": (F.selu, {}),
    "celu": (F.celu, {"alpha": 1.0}),
    "mish": (F.mish, {}),
    "logsigmoid": (F.logsigmoid, {}),
    "hardswish": (F.hardswish, {}),
    "softsign": (F.softsign, {}),
    "relu": (F.relu, {}),
    "leaky_relu": (F.leaky_relu, {"negative_slope": 0.01}),
    "relu6": (F.relu6, {}),
    "hardtanh": (F.hardtanh, {"min_val": -1.0, "max_val": 1.0}),
    "hardsigmoid": (F.hardsigmoid, {}),
}

#: activations whose tables are optimal step approximations of f' (some are only piecewise
#: smooth: hardswish and selu have jumps in f', softsign a cusp at 0)
SMOOTH_ACTIVATIONS = (
    "gelu",
    "silu",
    "tanh",
    "sigmoid",
    "softplus",
    "elu",
    "selu",
    "celu",
    "mish",
    "logsigmoid",
    "hardswish",
    "softsign",
)
#: piecewise-linear activations: f' is itself a step function, so a table can be exact
PWL_ACTIVATIONS = ("relu", "leaky_relu", "relu6", "hardtanh", "hardsigmoid")
#: every supported activation name
ACTIVATIONS = SMOOTH_ACTIVATIONS + PWL_ACTIVATIONS

# bits an exact table needs (number of distinct slopes 2 -> 1 bit, 3 -> 2 bits)
_EXACT_BITS = {"relu": 1, "leaky_relu": 1, "relu6": 2, "hardtanh": 2, "hardsigmoid": 2}

# defaults of the shipped tables and of optimal_table
_LO = -10.0
_HI = 10.0
_GRID = 4096
_WEIGHT = "uniform"
_MAX_BITS = 4

# the error measures: 2**18 fine cells for the rms integral and 2**18 + 1 float32 sample
# points for the max, refined locally (see _max_abs_error)
_FINE = 1 << 18
# elements per dp block: a handful of float64 temporaries of this size stay well under 64 MB
_DP_BLOCK = 1 << 19


@dataclasses.dataclass(frozen=True)
class Table:
    """One few-bit derivative table with its measured approximation error.

    Attributes:
        name: activation name (one of ``ACTIVATIONS``).
        bits: code width, 1..4.
        params: the activation's parameters, defaults included, as sorted ``(name, value)``
            pairs (``dict(table.params)`` gives a dict).
        borders: ``2**bits - 1`` non-decreasing float32-representable floats.
        levels: ``2**bits`` floats; ``q(x) = levels[#{b in borders: x > b}]``.
        lo, hi: the range the table was optimised and measured on.
        weight: the weight of the objective (``"uniform"`` or ``"normal"``).
        rms_error: ``sqrt(∫ w (f' - q)² / ∫ w)`` over ``[lo, hi]``.
        max_error: ``max |f'(x) - q(x)|`` over float32 ``x`` in ``[lo, hi]``.
        exact: True when the table reproduces torch's float32 backward exactly.
    """

    name: str
    bits: int
    params: tuple
    borders: tuple
    levels: tuple
    lo: float
    hi: float
    weight: str
    rms_error: float
    max_error: float
    exact: bool


# --------------------------------------------------------------------------- activations


def _check_name(name):
    if not isinstance(name, str):
        raise TypeError(f"name must be a str, got {type(name).__name__}")
    if name not in _SPECS:
        raise ValueError(f"unknown activation {name!r}; valid names: {', '.join(ACTIVATIONS)}")


def _is_real(v):
    return isinstance(v, numbers.Real) and not isinstance(v, bool)


def _resolve_params(name, params):
    """Validated parameters of ``name`` with defaults filled in, numbers as floats."""
    _check_name(name)
    defaults = _SPECS[name][1]
    for key in params:
        if key not in defaults:
            valid = ", ".join(defaults) or "none"
            raise TypeError(f"unknown parameter {key!r} for activation {name!r}; valid parameters: {valid}")
    out = dict(defaults)
    out.update(params)
    for key, value in out.items():
        if key == "approximate":
            if value not in ("none", "tanh"):
                raise ValueError(f"approximate must be 'none' or 'tanh', got {value!r}")
            continue
        if not _is_real(value):
            raise TypeError(f"{key} must be a real number, got {type(value).__name__}")
        if not math.isfinite(value):
            raise ValueError(f"{key} must be finite, got {value!r}")
        out[key] = float(value)
    if name == "hardtanh" and not out["min_val"] < out["max_val"]:
        raise ValueError(f"min_val must be < max_val, got min_val={out['min_val']!r}, max_val={out['max_val']!r}")
    if name == "celu" and out["alpha"] == 0.0:
        raise ValueError("alpha must be non-zero for celu")
    if name == "softplus" and out["beta"] == 0.0:
        raise ValueError("beta must be non-zero for softplus")
    return out


class ActivationFn:
    """An activation with its parameters bound: ``fn(x)`` is ``f(x, **params)``.

    ``fused`` is ``(kind, a, b)`` of the fused CPU kernel that computes it next to the few-bit codes
    (:func:`sparseops.ops.fewbit.fewbit_fused`), or None; ``fused_own`` is True where that kernel's
    forward is its own rather than torch's (elu, selu, celu, softplus with beta != 1: the correctly
    rounded value; sigmoid, silu, tanh, logsigmoid and softplus with beta 1: float32 ones within 2.41,
    3.35, 0.77, 0.85 and 0.85 ulp of it); ``fused_exact`` is True where
    :func:`sparseops.reference.fewbit.fewbit_fused_forward` gives that kernel's forward bit for bit
    (every fused kind but those float32 ones, whose reference is the exact value they are within their
    bound of), so
    the layer can use it off the CPU kernel too. A plain class, not a
    ``functools.partial`` with attributes: ``torch.compile`` reads these attributes as they are
    (on a partial it did not see them, so a compiled model ran torch's tanh).
    """

    def __init__(self, name: str, f: Callable, params: dict, fused: tuple | None, fused_own: bool,
                 fused_exact: bool):
        self.name, self.f, self.params = name, f, params
        self.fused, self.fused_own, self.fused_exact = fused, fused_own, fused_exact

    def __call__(self, x):
        return self.f(x, **self.params)

    def __repr__(self) -> str:
        return f"ActivationFn({self.name!r}, {self.params!r})"


def activation_fn(name: str, **params) -> ActivationFn:
    """The torch forward of a supported activation.

    The callable works on any dtype; the layers use it as their exact forward, and the
    table code calls it in float64 to differentiate it.

    Args:
        name: one of ``ACTIVATIONS``.
        **params: the activation's ``torch.nn.functional`` parameters (``approximate`` for
            gelu, ``beta``/``threshold`` for softplus, ``alpha`` for elu/celu,
            ``negative_slope`` for leaky_relu, ``min_val``/``max_val`` for hardtanh).

    Returns:
        A callable ``fn(x) -> Tensor``.

    Raises:
        TypeError: ``name`` is not a str, a parameter is unknown or not a number.
        ValueError: ``name`` is unknown or a parameter value is invalid.
    """
    resolved = _resolve_params(name, params)
    # the ones the fused CPU kernel (ops.fewbit.fused) computes next to the codes say how; the
    # piecewise-linear ones and hardswish are torch's forward bit for bit there; elu, selu, celu and
    # softplus with beta != 1 the correctly rounded one (computed in float64); sigmoid, silu, tanh,
    # logsigmoid and softplus with beta 1 float32 ones within 2.41, 3.35, 0.77, 0.85 and 0.85 ulp of it
    # (fused_own: the kernel's forward is its own)
    fused, own = None, False
    if name == "relu":
        fused = ("clamp", 0.0, math.inf)
    elif name == "relu6":
        fused = ("clamp", 0.0, 6.0)
    elif name == "hardtanh":
        fused = ("clamp", resolved["min_val"], resolved["max_val"])
    elif name == "leaky_relu":
        fused = ("leaky", resolved["negative_slope"], 0.0)
    elif name in ("hardswish", "hardsigmoid"):
        fused = (name, 0.0, 0.0)
    elif name in ("tanh", "sigmoid", "logsigmoid", "silu"):
        fused, own = (name, 0.0, 0.0), True
    elif name == "elu":
        fused, own = ("elu", resolved["alpha"], 1.0), True
    elif name == "selu":
        fused, own = ("elu", _SELU_ALPHA * _SELU_SCALE, _SELU_SCALE), True
    elif name == "celu" and resolved["alpha"] >= sys.float_info.min:  # the kernel takes 1/alpha: others run torch's
        fused, own = ("celu", resolved["alpha"], 0.0), True
    elif name == "softplus" and resolved["beta"] >= sys.float_info.min:  # likewise 1/beta
        fused, own = ("softplus", resolved["beta"], resolved["threshold"]), True
    exact = fused is not None and name not in ("sigmoid", "silu", "tanh", "logsigmoid") and fused[:2] != ("softplus", 1.0)
    return ActivationFn(name, _SPECS[name][0], resolved, fused, own, exact)


# torch's selu constants (float64): selu(x) = scale * (x if x > 0 else alpha * (e^x - 1))
_SELU_ALPHA = 1.6732632423543772848170429916717
_SELU_SCALE = 1.0507009873554804934193349852946


def derivative(fn: Callable | str, x) -> torch.Tensor:
    """f'(x) in float64 through torch.autograd.

    Args:
        fn: an elementwise torch-differentiable callable, or a name from ``ACTIVATIONS``
            (default parameters).
        x: points (tensor, array or number); they are converted to float64.

    Returns:
        A float64 tensor of ``x``'s shape. At kinks it is whatever torch's backward gives.

    Raises:
        TypeError: ``fn`` is not callable, or its output is not a differentiable tensor of
            ``x``'s shape.
    """
    if isinstance(fn, str):
        fn = activation_fn(fn)
    if not callable(fn):
        raise TypeError(f"fn must be a callable or an activation name, got {type(fn).__name__}")
    x = torch.as_tensor(x, dtype=torch.float64).detach().clone().requires_grad_(True)
    with torch.enable_grad():
        y = fn(x)
        if not isinstance(y, torch.Tensor) or y.shape != x.shape:
            raise TypeError("fn must return a tensor of its input's shape (an elementwise function)")
        if not y.requires_grad:
            raise TypeError("fn's output does not depend differentiably on its input (use torch ops)")
        (grad,) = torch.autograd.grad(y.sum(), x, allow_unused=True)
    if grad is None:
        return torch.zeros(x.shape, dtype=torch.float64)
    return grad.detach().to(torch.float64)


# ----------------------------------------------------------------------------- helpers


def _f32(v):
    """float64 tensor of the float32 values nearest to ``v``."""
    return torch.as_tensor(v, dtype=torch.float64).to(torch.float32).to(torch.float64)


def _f32_ceil(v):
    """The smallest float32 value >= v, as a Python float."""
    r = torch.tensor(v, dtype=torch.float32)
    if float(r) < v:
        r = torch.nextafter(r, torch.tensor(math.inf, dtype=torch.float32))
    return float(r)


def _f32_floor(v):
    """The largest float32 value <= v, as a Python float."""
    r = torch.tensor(v, dtype=torch.float32)
    if float(r) > v:
        r = torch.nextafter(r, torch.tensor(-math.inf, dtype=torch.float32))
    return float(r)


def _prev_f32(v):
    """The float32 value just below float32(v), as a Python float."""
    r = torch.tensor(v, dtype=torch.float32)
    return float(torch.nextafter(r, torch.tensor(-math.inf, dtype=torch.float32)))


def _ulp_neighbours(x, count):
    """``x`` (float32 values) together with the ``count`` float32 values on each side."""
    t = torch.as_tensor(x, dtype=torch.float64).to(torch.float32)
    up, down = t, t
    out = [t]
    for _ in range(count):
        up = torch.nextafter(up, torch.full_like(up, math.inf))
        down = torch.nextafter(down, torch.full_like(down, -math.inf))
        out += [up, down]
    return torch.cat(out).to(torch.float64)


def _check_bits(bits):
    if not isinstance(bits, numbers.Integral) or isinstance(bits, bool):
        raise TypeError(f"bits must be an int, got {type(bits).__name__}")
    if not 1 <= bits <= _MAX_BITS:
        raise ValueError(f"bits must be in 1..{_MAX_BITS}, got {bits}")
    return int(bits)


def _check_range(lo, hi):
    for label, v in (("lo", lo), ("hi", hi)):
        if not _is_real(v):
            raise TypeError(f"{label} must be a real number, got {type(v).__name__}")
        if not math.isfinite(v) or abs(v) > float(torch.finfo(torch.float32).max):
            raise ValueError(f"{label} must be finite in float32, got {v!r}")
    if not lo < hi:
        raise ValueError(f"lo must be < hi, got lo={lo!r}, hi={hi!r}")
    return float(lo), float(hi)


def _check_grid(grid, bits=None):
    if not isinstance(grid, numbers.Integral) or isinstance(grid, bool):
        raise TypeError(f"grid must be an int, got {type(grid).__name__}")
    need = 2 if bits is None else 1 << bits
    if grid < need:
        raise ValueError(f"grid must be >= {need} (2**bits cells, one per interval), got {grid}")
    return int(grid)


def _as_fn(fn):
    if isinstance(fn, str):
        return activation_fn(fn)
    if not callable(fn):
        raise TypeError(f"fn must be a callable or an activation name, got {type(fn).__name__}")
    return fn


def _weight_density(weight, x, lo, hi):
    """The weight density at ``x`` (float64), for a str, callable or per-cell array weight."""
    if isinstance(weight, str):
        if weight == "uniform":
            return torch.ones_like(x)
        if weight == "normal":
            return torch.exp(-0.5 * x * x) / math.sqrt(2.0 * math.pi)
        raise ValueError(f"weight must be 'uniform', 'normal', an array or a callable, got {weight!r}")
    if callable(weight):
        w = weight(x)
        w = torch.as_tensor(w, dtype=torch.float64)
        if w.shape != x.shape:
            raise ValueError(f"weight(x) must return one value per point: shape {tuple(w.shape)} for {tuple(x.shape)}")
        _check_weight_values(w)
        return w
    w = _weight_array(weight)
    # an array weight is a piecewise-constant density over len(w) equal cells of [lo, hi]
    idx = ((x - lo) / (hi - lo) * w.numel()).floor().long().clamp_(0, w.numel() - 1)
    return w[idx]


def _weight_array(weight):
    if isinstance(weight, torch.Tensor):
        w = weight.detach().to("cpu", torch.float64)
    else:
        try:
            w = torch.from_numpy(np.asarray(weight, dtype=np.float64))
        except (TypeError, ValueError) as exc:
            raise TypeError(
                f"weight must be 'uniform', 'normal', a 1-D array or a callable, got {type(weight).__name__}"
            ) from exc
    if w.dim() != 1:
        raise ValueError(f"weight array must be 1-D, got shape {tuple(w.shape)}")
    _check_weight_values(w)
    return w


def _check_weight_values(w):
    if not bool(torch.isfinite(w).all()):
        raise ValueError("weight must be finite")
    if bool((w < 0).any()):
        raise ValueError("weight must be non-negative")


def encode(x, borders) -> torch.Tensor:
    """The few-bit code of each element: the number of borders ``b`` with ``x > b``.

    This is the reference for the kernels. Comparisons run in float64, which gives the same
    answer as the kernels' float32 comparisons for float32/bfloat16/float16 inputs (all
    exactly representable); NaN gets code 0, as ``NaN > b`` is false.

    Args:
        x: input tensor (any floating dtype).
        borders: sorted borders (sequence or tensor).

    Returns:
        An int64 tensor of ``x``'s shape with values in ``0..len(borders)``.
    """
    b = torch.as_tensor(borders, dtype=torch.float64)
    x64 = torch.as_tensor(x).to(torch.float64)
    codes = torch.searchsorted(b, x64.contiguous(), right=False)
    return torch.where(torch.isnan(x64), torch.zeros_like(codes), codes)


def _q(x, borders, levels):
    """The step function ``q(x) = levels[code(x)]`` in float64."""
    lv = torch.as_tensor(levels, dtype=torch.float64)
    return lv[encode(x, borders)]


# ----------------------------------------------------------------------------- the dp


def discretize(
    fn: Callable | str, lo: float = _LO, hi: float = _HI, weight=_WEIGHT, grid: int = _GRID
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The grid the dynamic programme works on.

    ``[lo, hi]`` is split into ``grid`` equal cells whose edges are then rounded to float32,
    so that every candidate border is float32-representable (with the defaults the edges
    ``-10 + k * 20/4096`` are exact already).

    Args:
        fn: elementwise callable or activation name.
        lo, hi: the range (finite, ``lo < hi``).
        weight: ``"uniform"``, ``"normal"`` (standard normal pdf), a callable ``w(x)`` giving
            a density (cell weight ``w(midpoint) * cell width``), or a 1-D array of
            ``grid`` non-negative cell weights with positive sum (e.g. a histogram).
        grid: number of cells (int >= 2).

    Returns:
        ``(edges, d, w)`` float64 tensors: ``grid + 1`` edges, ``d[i] = f'(midpoint i)``,
        ``w[i]`` the weight of cell i.

    Raises:
        TypeError: an argument has the wrong type.
        ValueError: an argument has an invalid value, or f' is not finite on the grid.
    """
    fn = _as_fn(fn)
    lo, hi = _check_range(lo, hi)
    grid = _check_grid(grid)
    steps = torch.arange(grid + 1, dtype=torch.float64)
    edges = _f32(lo + (hi - lo) * steps / grid)
    if not bool((edges[1:] > edges[:-1]).all()):
        raise ValueError(f"grid={grid} is too fine for float32 resolution on [{lo}, {hi}]: cell edges collide")
    mids = 0.5 * (edges[1:] + edges[:-1])
    widths = edges[1:] - edges[:-1]
    d = derivative(fn, mids)
    if not bool(torch.isfinite(d).all()):
        raise ValueError("fn's derivative is not finite on the grid")
    if isinstance(weight, str) or callable(weight):
        w = _weight_density(weight, mids, lo, hi) * widths
    else:
        w = _weight_array(weight)
        if w.numel() != grid:
            raise ValueError(f"weight array must have grid={grid} entries, got {w.numel()}")
    if not float(w.sum()) > 0.0:
        raise ValueError("weight must have a positive sum over [lo, hi]")
    return edges, d, w


def _dp(d, w, kmax):
    """Exact dp over all splits into 1..kmax non-empty intervals.

    Returns ``(E, P)``: ``E[k, j]`` the least cost of ``k`` intervals covering cells
    ``[0, j)`` and ``P[k, j]`` the start of the last interval of that optimum.
    """
    n = d.numel()
    total = float(w.sum())
    # cost is shift-invariant; centring d on its mean keeps S2 - S1²/S0 well conditioned
    center = float((w * d).sum()) / total if total > 0 else float(d.mean())
    dc = d - center
    zero = torch.zeros(1, dtype=torch.float64)
    s0 = torch.cat([zero, torch.cumsum(w, 0)])
    s1 = torch.cat([zero, torch.cumsum(w * dc, 0)])
    s2 = torch.cat([zero, torch.cumsum(w * dc * dc, 0)])
    E = torch.full((kmax + 1, n + 1), math.inf, dtype=torch.float64)
    E[0, 0] = 0.0
    P = torch.zeros((kmax + 1, n + 1), dtype=torch.int64)
    rows = min(n, max(1, _DP_BLOCK // (n + 1)))
    tri = torch.ones(rows, rows, dtype=torch.bool).tril_(-1).logical_not_()
    # blocks of end points j in increasing order: E[k, j] only needs E[k-1, i] for i < j,
    # which earlier blocks (and, for k-1, this block's previous layer) have filled in
    for j0 in range(1, n + 1, rows):
        j1 = min(n + 1, j0 + rows)
        a0 = s0[j0:j1, None] - s0[None, :j1]
        a1 = s1[j0:j1, None] - s1[None, :j1]
        a2 = s2[j0:j1, None] - s2[None, :j1]
        # a zero-weight run has a0 = a1 = a2 = 0 exactly (prefix sums of zeros do not move),
        # so clamping a0 away from 0 gives it cost 0 without a division by zero
        cost = a1.square_().div_(a0.clamp_(min=1e-300)).neg_().add_(a2)
        # the true cost lies in [0, a2]; clamping keeps tiny-weight runs from picking up
        # cancellation noise of order (rounding of a1)² / a0
        cost = torch.minimum(cost.clamp_(min=0.0), a2.clamp_(min=0.0))
        # only the square part i in [j0, j1) holds starts i >= j, which are not allowed
        cost[:, j0:j1].masked_fill_(tri[: j1 - j0, : j1 - j0], math.inf)
        for k in range(1, kmax + 1):
            # torch.min returns the first index of a tie, so the result is deterministic
            v, idx = torch.min(E[k - 1, :j1][None, :] + cost, dim=1)
            E[k, j0:j1] = v
            P[k, j0:j1] = idx
    return E, P


def _backtrack(P, k, n):
    cuts = []
    j = n
    for layer in range(k, 0, -1):
        j = int(P[layer, j])
        cuts.append(j)
    assert cuts[-1] == 0
    return torch.tensor(sorted(cuts[:-1]), dtype=torch.int64)


def _check_dw(d, w):
    d = torch.as_tensor(d, dtype=torch.float64).detach().cpu()
    w = torch.as_tensor(w, dtype=torch.float64).detach().cpu()
    if d.dim() != 1 or w.shape != d.shape:
        raise ValueError(f"d and w must be 1-D of equal length, got shapes {tuple(d.shape)} and {tuple(w.shape)}")
    if not bool(torch.isfinite(d).all()):
        raise ValueError("d must be finite")
    _check_weight_values(w)
    return d, w


def optimal_partition(d, w, intervals: int) -> tuple[torch.Tensor, float]:
    """Split cells into ``intervals`` non-empty runs minimising ``Σ w (d - mean_w(run))²``.

    Exact dynamic programme with prefix sums ``S0 = Σw``, ``S1 = Σw·d``, ``S2 = Σw·d²``:
    the cost of cells ``[i, j)`` is ``S2 - S1²/S0`` (0 for zero total weight) and
    ``E[k][j] = min_{i<j} E[k-1][i] + cost(i, j)``. Time ``O(intervals · n²)``, memory
    ``O(intervals · n)`` plus bounded blocks.

    Args:
        d: 1-D values per cell.
        w: 1-D non-negative weights per cell, same length.
        intervals: number of runs, ``1 <= intervals <= len(d)``.

    Returns:
        ``(cuts, cost)``: int64 tensor of the ``intervals - 1`` increasing cut positions
        (run r covers cells ``[cuts[r-1], cuts[r])``) and the optimal cost as a float.

    Raises:
        TypeError: ``intervals`` is not an int.
        ValueError: bad shapes, non-finite ``d``, negative ``w`` or ``intervals`` out of range.
    """
    d, w = _check_dw(d, w)
    if not isinstance(intervals, numbers.Integral) or isinstance(intervals, bool):
        raise TypeError(f"intervals must be an int, got {type(intervals).__name__}")
    if not 1 <= intervals <= d.numel():
        raise ValueError(f"intervals must be in 1..{d.numel()}, got {intervals}")
    E, P = _dp(d, w, int(intervals))
    return _backtrack(P, int(intervals), d.numel()), float(E[intervals, d.numel()])


def _levels(d, w, cuts):
    """The weighted mean of d on each run (the unweighted mean where a run weighs nothing)."""
    bounds = [0] + [int(c) for c in cuts] + [d.numel()]
    out = []
    for a, b in zip(bounds[:-1], bounds[1:]):
        ws = w[a:b].sum()
        out.append(float((w[a:b] * d[a:b]).sum() / ws) if float(ws) > 0 else float(d[a:b].mean()))
    return torch.tensor(out, dtype=torch.float64)


def optimal_table(
    fn: Callable | str, bits: int, lo: float = _LO, hi: float = _HI, weight=_WEIGHT, grid: int = _GRID
) -> tuple[torch.Tensor, torch.Tensor]:
    """The L2-optimal step approximation of f' with ``2**bits`` levels.

    Minimises ``∫_lo^hi (f'(x) - q(x))² w(x) dx`` with ``f'`` and ``w`` sampled at the cell
    midpoints of ``discretize`` and borders restricted to the (float32-rounded) cell edges;
    on that grid the result is exact (``optimal_partition``). Each level is the weighted mean
    of ``f'`` over its interval's cells. Inputs outside ``[lo, hi]`` fall in the first or
    last interval.

    Args:
        fn: a name from ``ACTIVATIONS`` (default parameters) or an elementwise
            torch-differentiable callable.
        bits: 1..4.
        lo, hi: the range (finite, ``lo < hi``).
        weight: ``"uniform"``, ``"normal"``, a callable density ``w(x)`` or a 1-D array of
            ``grid`` non-negative cell weights (an empirical histogram, say).
        grid: number of cells, int ``>= 2**bits``.

    Returns:
        ``(borders, levels)``: float64 tensors of length ``2**bits - 1`` (strictly
        increasing, float32-representable) and ``2**bits``.

    Raises:
        TypeError: an argument has the wrong type (the message names it).
        ValueError: an argument has an invalid value (the message names it).
    """
    bits = _check_bits(bits)
    _check_grid(grid, bits)
    edges, d, w = discretize(fn, lo, hi, weight, grid)
    cuts, _ = optimal_partition(d, w, 1 << bits)
    return edges[cuts].clone(), _levels(d, w, cuts)


# ------------------------------------------------------------------------ exact tables


def _pad(borders, levels, bits):
    """Pad an exact table to ``2**bits`` levels by repeating the last border.

    Codes past the real ones then never occur except for the top one, which keeps the last
    level; the unused codes repeat that level too.
    """
    extra = (1 << bits) - len(levels)
    borders = list(borders) + [borders[-1]] * extra
    levels = list(levels[:-1]) + [levels[-1]] * (extra + 1)
    return torch.tensor(borders, dtype=torch.float64), torch.tensor(levels, dtype=torch.float64)


def exact_table(name: str, bits: int, **params) -> tuple[torch.Tensor, torch.Tensor]:
    """The analytic table of a piecewise-linear activation.

    Ties follow torch's backward exactly: relu has gradient 0 at 0, leaky_relu the slope at
    0, hardtanh/relu6/hardsigmoid gradient 0 at and beyond both corners. The levels are
    torch's float64 backward at a point inside each piece. The upper corner
    border is the float32 value just below the corner, so that under the strict ``x > b``
    rule the corner itself gets the outer code. hardtanh's ``min_val``/``max_val`` are
    rounded to float32 first, as torch's float32 backward does.

    relu and leaky_relu need 1 bit, relu6/hardtanh/hardsigmoid 2 bits; extra bits pad by
    repeating the last border. With too few bits (1 bit for the three-slope ones) there is no
    exact table and this falls back to ``optimal_table`` with its defaults (check
    ``get_table(...).exact``).

    Args:
        name: one of ``PWL_ACTIVATIONS``.
        bits: 1..4.
        **params: the activation's parameters.

    Returns:
        ``(borders, levels)`` float64 tensors of length ``2**bits - 1`` and ``2**bits``.

    Raises:
        TypeError: bad ``bits`` type or unknown parameter.
        ValueError: ``name`` is not piecewise-linear, or a bad ``bits``/parameter value.
    """
    p = _resolve_params(name, params)
    if name not in PWL_ACTIVATIONS:
        raise ValueError(f"{name!r} is not piecewise-linear; exact tables exist for {', '.join(PWL_ACTIVATIONS)}")
    bits = _check_bits(bits)
    if bits < _EXACT_BITS[name]:
        return optimal_table(activation_fn(name, **p), bits)
    if name in ("relu", "leaky_relu"):
        borders = [0.0]
    elif name == "hardsigmoid":
        borders = [-3.0, _prev_f32(3.0)]
    else:
        lo, hi = (0.0, 6.0) if name == "relu6" else (p["min_val"], p["max_val"])
        lo32 = float(_f32(lo))
        if not lo32 < float(_f32(hi)):
            raise ValueError(f"min_val and max_val must differ in float32, got {lo!r} and {hi!r}")
        borders = [lo32, _prev_f32(hi)]
    # each level is torch's own float64 backward inside its piece (0, 1, the slope, and for
    # hardsigmoid float32(1/6), the constant torch's kernel uses in every dtype), so the table
    # and torch agree in float64 as well as bit for bit in float32
    inner = [borders[0] - 1.0] + [0.5 * (a + b) for a, b in zip(borders[:-1], borders[1:])] + [borders[-1] + 1.0]
    levels = derivative(activation_fn(name, **p), inner).tolist()
    return _pad(borders, levels, bits)


# ------------------------------------------------------------------------------ errors


_MAX_INT_PROBE = 2**15


def _max_abs_error(fn, borders, levels, lo, hi):
    """max |f'(x) - q(x)| over float32 x in [lo, hi].

    A dense float32 sample (2**18 + 1 points) plus exact float32 neighbourhoods (±16 ulps)
    of every border, of lo/hi and of every integer in range within ±2^15 (where kinks usually sit); then
    every sampled local maximum of the error among the 64 largest, and each interval's
    largest, is refined: 10 rounds of 129 float32 points over a window that shrinks 64-fold
    each round, ending with the ±16 float32 neighbours of the final point. Every evaluated
    point is a float32 input, so the result never overstates the true maximum; the
    refinement catches peaks between samples and jumps of f' at float32 resolution.
    """
    lo32, hi32 = _f32_ceil(lo), _f32_floor(hi)

    def err(x):
        return (derivative(fn, x) - _q(x, borders, levels)).abs()

    xs = _f32(torch.linspace(lo32, hi32, _FINE + 1, dtype=torch.float64)).clamp_(lo32, hi32)
    # integers in range, at most the 2^16 + 1 nearest 0 (the kinks of the activations here sit at small
    # integers: 0, ±1, ±3, 6); a range of 1e8 would otherwise ask for gigabytes
    ints = torch.arange(math.ceil(max(lo32, -_MAX_INT_PROBE)), math.floor(min(hi32, _MAX_INT_PROBE)) + 1,
                        dtype=torch.float64)
    corners = torch.tensor([lo32, hi32, 0.0], dtype=torch.float64)
    special = torch.cat([corners, ints, torch.as_tensor(borders, dtype=torch.float64)])
    special = _ulp_neighbours(special, 16)
    special = special[(special >= lo32) & (special <= hi32)]
    best = float(err(special).max()) if special.numel() else 0.0

    e = err(xs)
    best = max(best, float(e.max()))
    left = torch.cat([torch.full((1,), -1.0, dtype=torch.float64), e[:-1]])
    right = torch.cat([e[1:], torch.full((1,), -1.0, dtype=torch.float64)])
    peaks = torch.nonzero((e >= left) & (e >= right)).flatten()
    peaks = peaks[torch.argsort(e[peaks], descending=True)[:64]]
    codes = encode(xs, borders)
    per_interval = []
    for c in torch.unique(codes).tolist():
        members = torch.nonzero(codes == c).flatten()
        per_interval.append(int(members[torch.argmax(e[members])]))
    centers = xs[torch.unique(torch.cat([peaks, torch.tensor(per_interval, dtype=torch.int64)]))]

    half = float(xs[1] - xs[0])
    offsets = torch.linspace(-1.0, 1.0, 129, dtype=torch.float64)
    for _ in range(10):
        pts = _f32(centers[:, None] + half * offsets[None, :]).clamp_(lo32, hi32)
        ev = err(pts.flatten()).view(pts.shape)
        best = max(best, float(ev.max()))
        centers = pts[torch.arange(pts.shape[0]), torch.argmax(ev, dim=1)]
        half /= 64.0
    final = _ulp_neighbours(centers, 16)
    final = final[(final >= lo32) & (final <= hi32)]
    if final.numel():
        best = max(best, float(err(final).max()))
    return best


def approximation_error(
    fn: Callable | str, borders, levels, lo: float = _LO, hi: float = _HI, weight=_WEIGHT
) -> tuple[float, float]:
    """How well ``q`` (the table) approximates f' on ``[lo, hi]``.

    rms: ``sqrt(∫ w (f' - q)² / ∫ w)`` by the midpoint rule on 2**18 equal cells (an array
    weight is read as a piecewise-constant density over ``len(weight)`` equal cells).
    max: ``max |f'(x) - q(x)|`` over float32 inputs ``x`` in ``[lo, hi]``, unweighted,
    found by dense sampling plus local refinement down to single float32 steps (see
    ``_max_abs_error``); f' is evaluated in float64 and the levels are taken as stored
    (the kernels' float32 rounding of a level moves q by at most 6e-8 relative).

    Args:
        fn: elementwise callable or activation name.
        borders, levels: the table (sequences or tensors).
        lo, hi: the range.
        weight: as in ``optimal_table`` (an array may have any length).

    Returns:
        ``(rms, max_abs)`` as floats.

    Raises:
        TypeError, ValueError: bad arguments (the message names them).
    """
    fn = _as_fn(fn)
    lo, hi = _check_range(lo, hi)
    b = torch.as_tensor(borders, dtype=torch.float64).flatten()
    lv = torch.as_tensor(levels, dtype=torch.float64).flatten()
    if lv.numel() != b.numel() + 1:
        raise ValueError(f"levels must have len(borders) + 1 = {b.numel() + 1} entries, got {lv.numel()}")
    if b.numel() > 1 and bool((b[1:] < b[:-1]).any()):
        raise ValueError("borders must be sorted non-decreasing")
    mids = lo + (hi - lo) * (torch.arange(_FINE, dtype=torch.float64) + 0.5) / _FINE
    rho = _weight_density(weight, mids, lo, hi)
    if not float(rho.sum()) > 0.0:
        raise ValueError("weight must have a positive sum over [lo, hi]")
    e = derivative(fn, mids) - _q(mids, b, lv)
    rms = math.sqrt(float((rho * e * e).sum() / rho.sum()))
    return rms, _max_abs_error(fn, b, lv, lo, hi)


# ----------------------------------------------------------------------- table lookup


def _make_table(name, bits, params, borders, levels, exact):
    fn = activation_fn(name, **params)
    rms, mx = approximation_error(fn, borders, levels, _LO, _HI, _WEIGHT)
    return Table(
        name=name,
        bits=bits,
        params=tuple(sorted(params.items())),
        borders=tuple(float(v) for v in borders),
        levels=tuple(float(v) for v in levels),
        lo=_LO,
        hi=_HI,
        weight=_WEIGHT,
        rms_error=rms,
        max_error=mx,
        exact=exact,
    )


def _compute_table(name, bits, params):
    # on the CPU whatever torch.set_default_device says (a table is a constant of the package, not data)
    with torch.device("cpu"):
        return _compute_table_cpu(name, bits, params)


def _compute_table_cpu(name, bits, params):
    if name in PWL_ACTIVATIONS:
        borders, levels = exact_table(name, bits, **params)
        return _make_table(name, bits, params, borders, levels, bits >= _EXACT_BITS[name])
    borders, levels = optimal_table(activation_fn(name, **params), bits)
    return _make_table(name, bits, params, borders, levels, False)


def _shipped():
    # relative to __package__, so this also works under ``python -m``
    try:
        return importlib.import_module("._tables", __package__).TABLES
    except ImportError:
        return {}


@functools.lru_cache(maxsize=None)
def _cached_table(name, bits, key):
    if key == tuple(sorted(_resolve_params(name, {}).items())):
        entry = _shipped().get((name, bits))
        if entry is not None:
            return Table(name=name, bits=bits, **entry)
    return _compute_table(name, bits, dict(key))


def get_table(name: str, bits: int, **params) -> Table:
    """The table for ``name`` at ``bits`` bits.

    Default parameters give the shipped table (``lo=-10``, ``hi=10``, uniform weight,
    ``grid=4096``); other parameters compute it once (``exact_table`` for piecewise-linear
    activations, ``optimal_table`` otherwise) and cache it.

    Args:
        name: one of ``ACTIVATIONS``.
        bits: 1..4.
        **params: the activation's parameters.

    Returns:
        A ``Table``.

    Raises:
        TypeError, ValueError: bad name, bits or parameters (the message names them).
    """
    p = _resolve_params(name, params)
    bits = _check_bits(bits)
    return _cached_table(name, bits, tuple(sorted(p.items())))


# -------------------------------------------------------------------------- generator


def _generate():
    """Every shipped table, freshly computed: {(name, bits): Table}."""
    out = {}
    for name in SMOOTH_ACTIVATIONS:
        p = _resolve_params(name, {})
        fn = activation_fn(name, **p)
        edges, d, w = discretize(fn, _LO, _HI, _WEIGHT, _GRID)
        # one dp up to 2**_MAX_BITS intervals serves every bit width
        E, P = _dp(d, w, 1 << _MAX_BITS)
        for bits in range(1, _MAX_BITS + 1):
            cuts = _backtrack(P, 1 << bits, d.numel())
            out[(name, bits)] = _make_table(name, bits, p, edges[cuts], _levels(d, w, cuts), False)
    for name in PWL_ACTIVATIONS:
        for bits in range(1, _MAX_BITS + 1):
            out[(name, bits)] = _compute_table(name, bits, _resolve_params(name, {}))
    return out


def _source(tables):
    entries = {}
    for key, t in tables.items():
        entry = dataclasses.asdict(t)
        del entry["name"], entry["bits"]
        entries[key] = entry
    body = pprint.pformat(entries, width=100, sort_dicts=False)
    return (
        "# generated by `python -m sparseops.fewbit.table --write`; do not edit by hand.\n"
        '"""Shipped few-bit backward tables: (name, bits) -> Table fields (see table.py)."""\n\n'
        f"TABLES = {body}\n"
    )


def _fmt(v):
    return "0" if v == 0.0 else f"{v:.2e}"


def error_markdown(tables: dict) -> str:
    """The markdown error table of ``docs/fewbit.md`` for ``{(name, bits): Table}``."""
    bits = range(1, _MAX_BITS + 1)
    lines = [
        "| activation | " + " | ".join(f"{b} bit{'s' if b > 1 else ''}: rms / max" for b in bits) + " |",
        "|---|" + "---|" * len(bits),
    ]
    for name in ACTIVATIONS:
        cells = []
        for b in bits:
            t = tables[(name, b)]
            cells.append("exact" if t.exact else f"{_fmt(t.rms_error)} / {_fmt(t.max_error)}")
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def shipped_tables() -> dict:
    """Every shipped table as ``{(name, bits): Table}`` (read from ``_tables.py``)."""
    return {key: Table(name=key[0], bits=key[1], **entry) for key, entry in _shipped().items()}


def main(argv: list[str] | None = None) -> int:
    """Command line: ``--write`` regenerates ``_tables.py``, ``--check`` compares, else print."""
    parser = argparse.ArgumentParser(prog="python -m sparseops.fewbit.table", description=__doc__.splitlines()[0])
    group = parser.add_mutually_exclusive_group()
    group.add_argument("--write", action="store_true", help="recompute every table and write _tables.py")
    group.add_argument("--check", action="store_true", help="recompute every table and compare with _tables.py")
    args = parser.parse_args(argv)
    if not (args.write or args.check):
        print(error_markdown(shipped_tables()))
        return 0
    start = time.perf_counter()
    tables = _generate()
    elapsed = time.perf_counter() - start
    print(f"computed {len(tables)} tables in {elapsed:.1f} s", file=sys.stderr)
    if args.check:
        same = tables == shipped_tables()
        print("_tables.py is up to date" if same else "_tables.py differs from a fresh computation", file=sys.stderr)
        return 0 if same else 1
    path = os.path.join(os.path.dirname(os.path.abspath(__file__)), "_tables.py")
    with open(path, "w") as fh:
        fh.write(_source(tables))
    print(f"wrote {path}", file=sys.stderr)
    print(error_markdown(tables))
    return 0


if __name__ == "__main__":
    sys.exit(main())
