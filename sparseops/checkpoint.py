"""Safetensors checkpoints of sparse models: :func:`save_safetensors` and :func:`load_safetensors`.

A safetensors file holds a flat dict of contiguous tensors that share no memory, plus a
``dict[str, str]`` of metadata. Most of a sparse model's ``state_dict`` is that already:
``SparseLinear`` stores its index as int32/uint8/int64 buffers next to ``values`` (every pattern),
``MonarchLinear`` its two factors, and the few-bit modules nothing. So
``safetensors.torch.save_file(model.state_dict(), path)`` works for those, and ``load_file`` plus
``load_state_dict`` reads them back. Two things in a ``state_dict`` do not fit:

- non-tensor extra state: ``ActivationSparseLinear`` checkpoints ``{"mode": ..., "sparsity": ...}``
  as ``_extra_state`` (the mode decides the shape of its ``threshold``);
- a tensor that is not contiguous (``ActivationSparseLinear.weight`` is ``[out, in]`` with ``Wᵀ``'s
  memory) or that shares memory with another entry (tied weights).

:func:`save_safetensors` handles both: tensors are written contiguous (a copy only where one is
not), an entry that is the very same tensor as an earlier one (tied weights) is written once and
named as an alias, and non-tensor entries are written as JSON into the metadata. The metadata keys
are ``"sparseops.extra_state"`` (``{state_dict key: value}``) and ``"sparseops.aliases"``
(``{key: the key it repeats}``). :func:`load_safetensors` puts both back and calls
``model.load_state_dict``, so every check of the layers applies: a checkpoint of another pattern or
shape raises ``RuntimeError`` naming the key, and the refused layer is left unchanged.

JSON keeps dicts, lists, strings, numbers, bools and None; a tuple comes back as a list.
"""

from __future__ import annotations

import json
import os

import torch
from torch import Tensor, nn

EXTRA_KEY = "sparseops.extra_state"
ALIAS_KEY = "sparseops.aliases"


def _safetensors():
    try:
        import safetensors.torch as st
    except ImportError as exc:  # pragma: no cover - depends on the environment
        raise ImportError("sparseops.save_safetensors/load_safetensors need safetensors: pip install safetensors") from exc
    return st


def _check_args(model, path) -> None:
    if not isinstance(model, nn.Module):
        raise TypeError(f"model: expected an nn.Module, got {type(model).__name__}")
    if not isinstance(path, (str, os.PathLike)):
        raise TypeError(f"path: expected a str or os.PathLike, got {type(path).__name__}")


def _same_view(a: Tensor, b: Tensor) -> bool:
    # empty tensors share no data whatever their pointers say
    return (a.numel() > 0 and a.data_ptr() == b.data_ptr() and a.dtype == b.dtype and a.shape == b.shape
            and a.stride() == b.stride())


def save_safetensors(model: nn.Module, path, metadata: dict[str, str] | None = None) -> None:
    """Write ``model.state_dict()`` to the safetensors file ``path``.

    Args:
        model: any module (sparse layers or not).
        path: the file to write.
        metadata: extra ``str -> str`` metadata to store (the two ``sparseops.*`` keys are reserved).

    Raises:
        TypeError: ``model`` is not a module, ``path`` not a path, ``metadata`` not ``str -> str``, or a
            non-tensor entry of the state dict that JSON cannot hold (the message names its key).
        ValueError: ``metadata`` uses a reserved key.
    """
    _check_args(model, path)
    meta = {} if metadata is None else metadata
    if not isinstance(meta, dict) or not all(isinstance(k, str) and isinstance(v, str) for k, v in meta.items()):
        raise TypeError("metadata: expected a dict of str -> str")
    reserved = {EXTRA_KEY, ALIAS_KEY} & set(meta)
    if reserved:
        raise ValueError(f"metadata: {sorted(reserved)} are reserved for sparseops")
    tensors, extra, aliases = {}, {}, {}
    written: list[tuple[str, Tensor]] = []
    storages: dict[int, str] = {}
    for key, value in model.state_dict().items():
        if not isinstance(value, Tensor):
            try:
                json.dumps(value, allow_nan=False)
            except (TypeError, ValueError) as exc:
                raise TypeError(f"{key}: a non-tensor entry of type {type(value).__name__} cannot be stored as JSON "
                                f"metadata ({exc})") from None
            extra[key] = value
            continue
        value = value.detach()
        same = next((k for k, t in written if _same_view(t, value)), None)
        if same is not None:
            aliases[key] = same
            continue
        ptr = value.untyped_storage().data_ptr() if value.numel() else None
        # another view of a storage already written: an independent copy (safetensors refuses shared memory)
        out = (value.clone(memory_format=torch.contiguous_format) if ptr is not None and ptr in storages
               else value.contiguous())
        if ptr is not None:
            storages.setdefault(ptr, key)
        written.append((key, value))
        tensors[key] = out
    meta = dict(meta, format=meta.get("format", "pt"))
    if extra:
        meta[EXTRA_KEY] = json.dumps(extra, allow_nan=False)
    if aliases:
        meta[ALIAS_KEY] = json.dumps(aliases)
    _safetensors().save_file(tensors, os.fspath(path), metadata=meta)


def load_safetensors(model: nn.Module, path, *, strict: bool = True):
    """Load a file written by :func:`save_safetensors` (or by ``safetensors.torch.save_file`` of a state
    dict) into ``model``, in place, through ``model.load_state_dict``.

    The model must be built the way the checkpoint's was: the same layers, patterns and shapes
    (``sparsify_`` it the same way first). The stored index replaces the model's, so the masks need not
    be the same ones.

    Args:
        model: the module to load into.
        path: the safetensors file.
        strict: as ``load_state_dict``.

    Returns:
        ``load_state_dict``'s ``(missing_keys, unexpected_keys)``.

    Raises:
        TypeError: ``model`` is not a module or ``path`` not a path.
        RuntimeError: the checkpoint does not fit the model (``load_state_dict``'s error, naming the key);
            a sparse layer that refuses its part is left unchanged.
    """
    _check_args(model, path)
    st = _safetensors()
    path = os.fspath(path)
    with st.safe_open(path, framework="pt") as f:
        meta = f.metadata() or {}
    state = st.load_file(path)
    for key, same in json.loads(meta.get(ALIAS_KEY, "{}")).items():
        state[key] = state[same]
    state.update(json.loads(meta.get(EXTRA_KEY, "{}")))
    return model.load_state_dict(state, strict=strict)
