"""All-or-nothing ``load_state_dict`` for the sparse layers.

torch's ``_load_from_state_dict`` copies a module's tensors one by one and records a mismatch as a
message, so a refused checkpoint can leave a layer half loaded: a sparse layer's index rebuilt but its
values not, or its bias copied before its values were refused. The layers take a :func:`snapshot`
before loading and :func:`restore` it when the load added an error message.
"""

from __future__ import annotations

from torch import nn


def snapshot(module: nn.Module, attrs: tuple[str, ...] = ()) -> tuple:
    """What a load may change on ``module`` itself (not its children): parameters and buffers by object
    and, for the persistent ones that a load copies into in place, by a clone of their data; ``attrs``
    by value.

    NOTE: the clones cost one extra copy of the layer's persistent tensors for the duration of its load.
    """
    params = {n: (p, p.data.clone()) for n, p in module._parameters.items() if p is not None}
    nonpersistent = set(module._non_persistent_buffers_set)
    buffers = {n: b if b is None or n in nonpersistent else b.clone() for n, b in module._buffers.items()}
    return params, dict(module._parameters), buffers, nonpersistent, {a: getattr(module, a) for a in attrs}


def restore(module: nn.Module, snap: tuple) -> None:
    """Put back what :func:`snapshot` saw: the same Parameter objects (an optimizer keeps tracking them)
    holding their old data, the old buffers, and the old attributes."""
    params, slots, buffers, nonpersistent, attrs = snap
    for p, data in params.values():
        p.data = data
    module._parameters.clear()
    module._parameters.update(slots)
    module._buffers.clear()
    module._buffers.update(buffers)
    module._non_persistent_buffers_set.clear()
    module._non_persistent_buffers_set.update(nonpersistent)
    for a, v in attrs.items():
        setattr(module, a, v)
