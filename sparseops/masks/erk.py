"""Random masks and Erdős–Rényi(-Kernel) layer-wise densities (RigL's ERK initialisation)."""

from __future__ import annotations

import math
import numbers
from typing import Sequence

import torch

from ..patterns import check_sparsity
from ._checks import check_int, check_weight
from .magnitude import _n_keep


def _check_shape(shape, name: str = "shape") -> tuple[int, ...]:
    if isinstance(shape, numbers.Integral) and not isinstance(shape, bool):
        shape = (shape,)
    try:
        dims = tuple(check_int(d, name) for d in shape)
    except TypeError:
        raise TypeError(f"{name}: expected a sequence of ints, got {shape!r}") from None
    if any(d < 0 for d in dims):
        raise ValueError(f"{name}: expected non-negative dims, got {dims}")
    return dims


def _check_generator(generator) -> None:
    if generator is not None and not isinstance(generator, torch.Generator):
        raise TypeError(f"generator: expected a torch.Generator or None, got {type(generator).__name__}")


def _random_keep(shape: tuple[int, ...], k: int, generator, device) -> torch.Tensor:
    """Bool mask with exactly ``k`` True at uniformly random places."""
    numel = math.prod(shape)
    # the permutation is drawn where the generator lives, so a CPU generator seeds a CUDA mask too
    src = generator.device if generator is not None else device
    perm = torch.randperm(numel, generator=generator, device=src)
    keep = torch.zeros(numel, dtype=torch.bool, device=src)
    keep[perm[:k]] = True
    return keep.view(shape).to(device)


def random(shape, sparsity: float, *, generator: torch.Generator | None = None, device=None) -> torch.Tensor:
    """Uniformly random mask with exactly ``numel - round(sparsity * numel)`` True (at least one).

    Args:
        shape: the mask's shape (an int or a sequence of ints).
        sparsity: fraction of zeros in [0, 1).
        generator: optional ``torch.Generator``; the same seed gives the same mask.
        device: where the mask lives (default: the generator's device, else CPU).

    Returns:
        bool mask of ``shape``.

    Raises:
        TypeError: ``shape`` is not ints, ``sparsity`` not a number.
        ValueError: negative dims, ``sparsity`` outside [0, 1).
    """
    dims = _check_shape(shape)
    s = check_sparsity(sparsity)
    _check_generator(generator)
    if device is None:
        device = generator.device if generator is not None else torch.device("cpu")
    return _random_keep(dims, _n_keep(math.prod(dims), s), generator, torch.device(device))


def erk_densities(
    shapes: Sequence, sparsity: float, *, power_scale: float = 1.0, min_per_layer: int = 0
) -> list[float]:
    """Erdős–Rényi-Kernel density per layer, as in RigL (Evci et al., 2020).

    ``density_l = eps * (sum(shape_l) / prod(shape_l)) ** power_scale``, with ``eps`` solved so
    that ``sum_l density_l * numel_l == (1 - sparsity) * sum_l numel_l``. A layer whose density
    would exceed 1 is made dense and ``eps`` is solved again for the rest, until none exceeds 1.
    With ``min_per_layer > 0`` a layer that would keep fewer than that many entries is pinned to
    ``min_per_layer / numel`` the same way (then the total can exceed the target only when the
    floors alone do). See ``docs/masks.md``.

    Args:
        shapes: one shape per layer (``[out, in]`` for linear, ``[out, in, kh, kw]`` for conv).
        sparsity: global fraction of zeros in [0, 1), parameter-weighted.
        power_scale: exponent on the raw ER score (RigL's ``erk_power_scale``; 0 gives uniform).
        min_per_layer: smallest number of entries any non-empty layer keeps.

    Returns:
        one density in (0, 1] per layer (0 for empty layers).

    Raises:
        TypeError: ``shapes`` is one shape (or a tensor) rather than a list of them, a shape is not ints,
            ``sparsity``/``power_scale`` not numbers.
        ValueError: negative dims, a 0-d shape, ``sparsity`` outside [0, 1), ``power_scale`` < 0, not
            finite, or so large that a layer's score under/overflows a float, ``min_per_layer`` < 0.
    """
    s = check_sparsity(sparsity)
    if isinstance(power_scale, bool) or not isinstance(power_scale, numbers.Real):
        raise TypeError(f"power_scale: expected a float, got {type(power_scale).__name__}")
    if not (math.isfinite(power_scale) and power_scale >= 0):
        raise ValueError(f"power_scale: expected a finite float >= 0, got {power_scale}")
    min_per_layer = check_int(min_per_layer, "min_per_layer")
    if min_per_layer < 0:
        raise ValueError(f"min_per_layer: expected >= 0, got {min_per_layer}")
    if isinstance(shapes, (torch.Tensor, torch.Size)) or (
            isinstance(shapes, Sequence) and any(isinstance(sh, numbers.Integral) for sh in shapes)):
        raise TypeError(f"shapes: expected a list of layer shapes (sequences of ints), got {shapes!r:.80}")
    dims = [_check_shape(sh, f"shapes[{i}]") for i, sh in enumerate(shapes)]
    for i, d in enumerate(dims):
        if not d:
            raise ValueError(f"shapes[{i}]: expected at least one dimension, got ()")
    numels = [math.prod(d) for d in dims]
    try:
        raw = [(sum(d) / ne) ** power_scale if ne else 0.0 for d, ne in zip(dims, numels)]
    except OverflowError:
        raise ValueError(f"power_scale: {power_scale} makes a layer's ER score overflow a float") from None
    if any(ne and not 0.0 < r < math.inf for r, ne in zip(raw, numels)):
        raise ValueError(f"power_scale: {power_scale} makes a layer's ER score underflow or overflow a float")
    target = (1.0 - s) * sum(numels)
    fixed: dict[int, float] = {i: 0.0 for i, ne in enumerate(numels) if ne == 0}
    while True:
        free = [i for i in range(len(dims)) if i not in fixed]
        if not free:
            break
        rest = target - sum(fixed[i] * numels[i] for i in fixed)
        eps = max(rest, 0.0) / sum(raw[i] * numels[i] for i in free)
        # clamp the densest layers first: making one dense lowers eps for no one, so others may follow
        top = max(raw[i] for i in free)
        if eps * top > 1.0:
            fixed.update({i: 1.0 for i in free if raw[i] == top})
            continue
        low = [i for i in free if eps * raw[i] * numels[i] < min(min_per_layer, numels[i])]
        if low:
            fixed.update({i: min(min_per_layer, numels[i]) / numels[i] for i in low})
            continue
        fixed.update({i: eps * raw[i] for i in free})
        break
    return [fixed[i] for i in range(len(dims))]


def erk(
    weights: Sequence[torch.Tensor],
    sparsity: float,
    *,
    power_scale: float = 1.0,
    generator: torch.Generator | None = None,
    min_per_layer: int = 1,
) -> list[torch.Tensor]:
    """Random masks with ERK layer-wise densities (see ``erk_densities``).

    Layer ``l`` keeps exactly ``round(density_l * numel_l)`` uniformly random entries, and never
    fewer than ``min(min_per_layer, numel_l)``, so no layer is pruned to nothing by default.

    Args:
        weights: floating tensors, one per layer (only shapes and devices are used).
        sparsity: global fraction of zeros in [0, 1), parameter-weighted.
        power_scale: exponent on the raw ER score.
        generator: optional ``torch.Generator``; the same seed gives the same masks.
        min_per_layer: smallest number of entries a non-empty layer keeps.

    Returns:
        one bool mask per weight, on that weight's device.

    Raises:
        TypeError: a weight is not a floating tensor, bad argument types.
        ValueError: ``sparsity`` outside [0, 1), bad ``power_scale`` or ``min_per_layer``.
    """
    _check_generator(generator)
    ws = [check_weight(w, f"weights[{i}]") for i, w in enumerate(weights)]
    dens = erk_densities([tuple(w.shape) for w in ws], sparsity, power_scale=power_scale, min_per_layer=min_per_layer)
    masks = []
    for w, d in zip(ws, dens):
        k = max(int(round(d * w.numel())), min(min_per_layer, w.numel()))
        masks.append(_random_keep(tuple(w.shape), min(k, w.numel()), generator, w.device))
    return masks
