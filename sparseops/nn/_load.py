"""All-or-nothing ``load_state_dict`` for the sparse layers.

torch's ``_load_from_state_dict`` copies a module's tensors one by one and records a mismatch as a
message, so a refused checkpoint can leave a layer half loaded: a sparse layer's index rebuilt but its
values not, or its bias copied before its values were refused. The layers take a :func:`snapshot`
before loading and :func:`restore` it when the load refused the checkpoint (:func:`refused`).

This is per layer, as torch loads module by module: when a later layer refuses a checkpoint, the layers
before it keep what they loaded. For all or nothing over a model, load into a fresh model (or keep a copy
of its ``state_dict`` to load back).
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


def load_marks(error_msgs: list) -> tuple:
    """Where the load's error messages stand before a layer loads (for :func:`refused`)."""
    return error_msgs, len(error_msgs)


def refused(marks: tuple) -> bool:
    """Whether the checkpoint was refused since :func:`load_marks`: an error message was added.

    NOTE: a missing or unexpected key is not a refusal here. torch calls every module's
    ``_load_from_state_dict`` with ``strict=True`` whatever the caller asked (so that it reports those
    keys) and decides only at the end whether they raise; a layer cannot tell a strict load that will
    raise from a ``strict=False`` one that loads what is there. Either way the keys present load, as for
    any torch module, and the layer is consistent (its own checks passed).
    """
    errors, n_err = marks
    return len(errors) > n_err


def load_all_or_nothing(module: nn.Module, load, state_dict, prefix, local_metadata, strict, missing_keys,
                        unexpected_keys, error_msgs, attrs: tuple[str, ...] = ()) -> None:
    """``load(...)`` (a layer's own checked load, with ``_load_from_state_dict``'s arguments), then
    :func:`restore` the layer when the checkpoint was :func:`refused`."""
    marks = load_marks(error_msgs)
    snap = snapshot(module, attrs)
    load(state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs)
    if refused(marks):
        restore(module, snap)
