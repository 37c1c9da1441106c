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
    found, where = False, None
    for group in optimizer.param_groups:
        for i, p in enumerate(group["params"]):
            if p is old:
                group["params"][i] = new
                found, where = True, group
    state = optimizer.state.pop(old, None)
    if found and state:
        fills = _fresh_fills(optimizer, where, state) if remap is not None else {}
        fresh = None
        if fills:
            # the entries no old one maps to (grown weights): 0 through remap, 1 for every moved one
            fresh = remap(torch.ones(old.shape, dtype=torch.float32, device=old.device)) == 0
        moved = {}
        for k, v in state.items():
            if remap is not None and isinstance(v, Tensor) and v.shape == old.shape:
                v = remap(v)
                if k in fills:
                    v = torch.where(fresh.to(v.device), torch.full((), fills[k], dtype=v.dtype, device=v.device), v)
            moved[k] = v
        optimizer.state[new] = moved
    return found


def _fresh_fills(optimizer: torch.optim.Optimizer, group: dict, state: dict) -> dict:
    """The state entries whose value for a fresh weight is not 0, and that value, as the optimizer itself
    starts them: Rprop's ``step_size`` (the learning rate; at 0 a grown weight would never move, since
    Rprop only scales its step), Adagrad's ``sum`` (``initial_accumulator_value``). The other per-weight
    states of torch's optimizers start at 0, which the re-map gives grown weights (SGD's momentum buffer
    starts as the first gradient; at 0 with no dampening its first update is the same)."""
    fills = {}
    if isinstance(optimizer, torch.optim.Rprop) and "step_size" in state:
        fills["step_size"] = float(group["lr"])
    if isinstance(optimizer, torch.optim.Adagrad) and "sum" in state:
        init = float(group.get("initial_accumulator_value", 0.0))
        if init != 0.0:
            fills["sum"] = init
    return fills


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
