"""Keeping an optimizer consistent when a layer's parameters are replaced (swaps and re-packs)."""

from __future__ import annotations

from typing import Callable

import torch
from torch import Tensor, nn


def replace_parameter(optimizer: torch.optim.Optimizer, old: nn.Parameter, new: nn.Parameter,
                      remap: Callable[[Tensor], Tensor] | None = None) -> bool:
    """Put ``new`` where ``old`` sits in ``optimizer``'s param groups and move its state.

    State tensors shaped like ``old`` go through ``remap`` (default: as they are); others (``step``)
    move unchanged. Returns whether ``old`` was found.
    """
    found = False
    for group in optimizer.param_groups:
        for i, p in enumerate(group["params"]):
            if p is old:
                group["params"][i] = new
                found = True
    state = optimizer.state.pop(old, None)
    if found and state:
        optimizer.state[new] = {
            k: (remap(v) if remap is not None and isinstance(v, Tensor) and v.shape == old.shape else v)
            for k, v in state.items()
        }
    return found


def check_holds(optimizer: torch.optim.Optimizer, params: dict[str, nn.Parameter]) -> None:
    """Raise ValueError unless ``optimizer`` holds every parameter of ``params`` (name -> Parameter).

    A swap or re-pack moves a parameter's place and state in the optimizer; one the optimizer does not
    hold would be replaced silently and never trained (typically: an optimizer built before sparsify_).
    """
    held = {id(p) for group in optimizer.param_groups for p in group["params"]}
    missing = [name for name, p in params.items() if id(p) not in held]
    if missing:
        shown = ", ".join(missing[:4]) + (f" and {len(missing) - 4} more" if len(missing) > 4 else "")
        raise ValueError(f"optimizer: does not hold {shown}; build it from model.parameters() after the "
                         "layers it trains exist (after sparsify_)")
