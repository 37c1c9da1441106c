"""Model-level API: ``sparsify_`` swaps ``nn.Linear`` layers for sparse ones in place;
``sparsify_activations_`` swaps them for activation-sparse ones; ``densify_`` swaps either back."""

from __future__ import annotations

import dataclasses
import warnings
from typing import Callable

import torch
from torch import nn

from .masks import for_pattern, global_magnitude
from .nn import ActivationSparseLinear, SparseLinear
from .nn.act import _check_mode
from .patterns import Block, Monarch, Unstructured, as_pattern, check_sparsity


def _shared_weights(model: nn.Module) -> dict[int, list[str]]:
    """Parameters reachable under more than one name (tied weights, or one module registered twice)."""
    names: dict[int, list[str]] = {}
    for name, p in model.named_parameters(remove_duplicate=False):
        names.setdefault(id(p), []).append(name)
    return {k: v for k, v in names.items() if len(v) > 1}


def _targets(model: nn.Module, filter_fn, types=(nn.Linear,), skip=()):
    """``(fqn, module)`` of every module of exactly one of ``types`` that ``filter_fn`` takes, but those whose
    weight is shared (warned) and the modules in ``skip`` (by id)."""
    out, tied, sub, found = [], _shared_weights(model), [], False
    for fqn, mod in model.named_modules():
        if (isinstance(mod, types) and type(mod) not in types and id(mod) not in skip
                and type(mod) is not nn.modules.linear.NonDynamicallyQuantizableLinear  # MHA's out_proj: it reads .weight
                and (filter_fn is None or filter_fn(mod, fqn))):
            sub.append(f"{fqn or 'the model'} ({type(mod).__name__})")
        if isinstance(mod, (SparseLinear, ActivationSparseLinear)):
            found = True
        if type(mod) in types and id(mod) not in skip and (filter_fn is None or filter_fn(mod, fqn)):
            found = True
            w = mod.weight if type(mod) is nn.Linear else getattr(mod, "values", None)
            if w is not None and id(w) in tied:
                # a new layer would silently untie it (e.g. an lm_head tied to the input embedding), or
                # convert a module registered at two places at only one of them
                how = "dense" if type(mod) is nn.Linear else "as it is"
                warnings.warn(
                    f"sparsify: left {fqn or 'the model'} {how}: its weight is shared "
                    f"({', '.join(tied[id(w)])}), and a new layer would untie it; untie it first "
                    "(e.g. tie_word_embeddings=False) to convert it",
                    stacklevel=3,
                )
                continue
            out.append((fqn, mod))
    if sub:
        # a subclass may compute its own forward (a LoRA or quantized linear, a layer with a hook in its
        # forward): swapping it for a plain sparse layer would silently drop that
        warnings.warn(
            f"sparsify: left {len(sub)} subclass(es) of {types[0].__name__} as they are ({', '.join(sub[:5])}"
            f"{', ...' if len(sub) > 5 else ''}): a subclass may compute its own forward, which the sparse layer "
            "would not; only the exact types are swapped", stacklevel=3)
    elif not found:
        warnings.warn(f"sparsify: found no {' or '.join(t.__name__ for t in types)} in the model"
                      f"{' that filter_fn accepts (it is called as filter_fn(module, fqn))' if filter_fn else ''}: "
                      "nothing is swapped", stacklevel=3)
    return out


def _replace(model: nn.Module, fqn: str, new: nn.Module) -> None:
    parent_name, _, child = fqn.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, child, new)


def _warn_already_sparse(model: nn.Module, filter_fn) -> None:
    # a layer that is sparse already is left as it is, which a second call with another sparsity or pattern
    # would not expect: say so (SparseLinear.update_mask_ re-packs one); after the arguments were accepted
    again = [fqn or "the model" for fqn, mod in model.named_modules()
             if isinstance(mod, SparseLinear) and (filter_fn is None or filter_fn(mod, fqn))]
    if again:
        warnings.warn(
            f"sparsify_: left {len(again)} layer(s) already sparse as they are ({', '.join(again[:5])}"
            f"{', ...' if len(again) > 5 else ''}); re-pack one with SparseLinear.update_mask_, or densify_ first",
            stacklevel=3,
        )
    wrapped = [fqn or "the model" for fqn, mod in model.named_modules()
               if isinstance(mod, ActivationSparseLinear) and mod.sparse is None
               and (filter_fn is None or filter_fn(mod, fqn))]
    if wrapped:
        warnings.warn(
            f"sparsify_: left {len(wrapped)} activation-sparse layer(s) with a dense weight as they are "
            f"({', '.join(wrapped[:5])}{', ...' if len(wrapped) > 5 else ''}); run sparsify_ before "
            "sparsify_activations_ to have both sparsities",
            stacklevel=3,
        )


def sparsify_(
    model: nn.Module,
    sparsity: float | None = None,
    *,
    pattern="unstructured",
    filter_fn: Callable[[nn.Module, str], bool] | None = None,
    scope: str = "layer",
    only_if_faster: bool = False,
    batch: int | None = None,
    mode: str | None = None,
    timer=None,
    cache=True,
) -> nn.Module:
    """Swap every ``nn.Linear`` of ``model`` for a :class:`SparseLinear`, in place.

    Args:
        model: the model to modify.
        sparsity: fraction of zeros in [0, 1) for the unstructured pattern, or of zero blocks for
            ``Block`` (or carried by the pattern); N:M, fan-in and butterfly fix their own.
        pattern: ``"unstructured"``, ``NM(n, m)`` / ``"n:m"``, ``FanIn(k)``, ``Block(size)`` /
            ``"block:32"``, ``Butterfly(...)`` (Pixelfly with ``rank > 0``), or ``Monarch(nblocks)`` /
            ``"monarch:4"``, which swaps in an ``nn.MonarchLinear`` projected from each weight (layers
            with ``min(in, out) < nblocks`` stay ``nn.Linear``).
        filter_fn: ``filter_fn(module, fqn) -> bool``; only layers for which it is True are swapped.
        scope: ``"layer"`` prunes each layer to ``sparsity``; ``"global"`` ranks magnitudes across
            all swapped layers, so the total sparsity is ``sparsity`` and layers differ.
        only_if_faster: time each layer dense and sparse at its own shape on this machine (its
            device, dtype and ``torch.get_num_threads()``) and keep it dense where the sparse
            layer is not faster; see :mod:`sparseops.autoselect` for the method and the cache,
            and :func:`sparseops.explain` for the choices.
        batch: rows per call (tokens: batch x sequence) to decide at; required with ``only_if_faster``.
        mode: ``"fwd"`` or ``"fwdbwd"`` (forward + backward); default ``"fwdbwd"`` if
            ``model.training`` else ``"fwd"``.
        timer: ``timer(layer, step) -> ms`` replaces the measurement (tests inject one).
        cache: ``True`` (the user cache directory), ``False`` (measure every time), or a directory.

    Returns:
        ``model`` (or, if ``model`` is itself an ``nn.Linear``, its replacement).

    Raises:
        TypeError: ``model`` is not an ``nn.Module``; ValueError: bad sparsity, scope, batch or mode.
        RuntimeError: with ``only_if_faster``, a sparse layer whose output disagrees with its
            dense weight (it is never timed; the model is left unchanged).
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model: expected an nn.Module, got {type(model).__name__}")
    if not isinstance(only_if_faster, bool):
        raise TypeError(f"only_if_faster: expected a bool, got {type(only_if_faster).__name__}")
    if only_if_faster:
        if isinstance(batch, bool) or not isinstance(batch, int) or batch < 1:
            raise ValueError(f"batch: only_if_faster needs the rows per call to decide at, an int >= 1; got {batch!r}")
        mode = mode if mode is not None else ("fwdbwd" if model.training else "fwd")
        if mode not in ("fwd", "fwdbwd"):
            raise ValueError(f"mode: expected 'fwd' or 'fwdbwd', got {mode!r}")
        if timer is not None and not callable(timer):
            raise TypeError(f"timer: expected a callable timer(layer, step) -> ms, got {type(timer).__name__}")
        cache = _cache_dir(cache)
    pat = as_pattern(pattern)
    if scope not in ("layer", "global"):
        raise ValueError(f"scope: expected 'layer' or 'global', got {scope!r}")
    if isinstance(pat, Unstructured):
        if sparsity is None:
            sparsity = pat.sparsity
        if sparsity is None:
            raise ValueError("sparsity: give sparsity= (a float in [0, 1)) or a pattern that carries one")
        check_sparsity(sparsity)
    elif scope == "global":
        raise ValueError(
            f"scope: 'global' ranks magnitudes across layers, which only the unstructured pattern allows, not {pat.name}"
        )
    targets = _targets(model, filter_fn)
    if isinstance(pat, Monarch):
        if sparsity is not None:
            raise ValueError("sparsity: the Monarch pattern fixes its own structure; pass the pattern alone")
        from .nn.monarch import MonarchLinear

        # a layer narrower than nblocks has no Monarch form: it stays an nn.Linear
        targets = [(fqn, m) for fqn, m in targets if min(m.in_features, m.out_features) >= pat.nblocks]
        with torch.no_grad():
            new = [MonarchLinear.from_dense(m, pat.nblocks) for _, m in targets]
        if only_if_faster:
            targets, new = _keep_faster(targets, new, batch, mode, timer, cache)
        _warn_already_sparse(model, filter_fn)
        return _swap(model, targets, new)
    if scope == "global":
        masks = global_magnitude([m.weight for _, m in targets], sparsity)
    else:
        masks = [for_pattern(pat, m.weight.detach(), sparsity) for _, m in targets]
    # the masks carry the pattern's own sparsity now: the layers get the pattern without it
    layer_pat = dataclasses.replace(pat, sparsity=None) if isinstance(pat, (Unstructured, Block)) else pat
    with torch.no_grad():
        new = [SparseLinear.from_dense(m, mask=mk, pattern=layer_pat) for (_, m), mk in zip(targets, masks)]
    if only_if_faster:
        targets, new = _keep_faster(targets, new, batch, mode, timer, cache)
    _warn_already_sparse(model, filter_fn)
    return _swap(model, targets, new)


def _cache_dir(cache):
    from pathlib import Path

    from .autoselect import default_cache_dir

    if cache is True:
        return default_cache_dir()
    if cache is False or cache is None:
        return None
    if isinstance(cache, (str, Path)):
        return Path(cache)
    raise TypeError(f"cache: expected True, False or a directory path, got {type(cache).__name__}")


def _keep_faster(targets, new, batch, mode, timer, cache):
    """The targets whose sparse layer won (each layer, swapped or not, carries its Decision).

    Every layer is decided before any is swapped or marked: an error leaves the model unchanged.
    """
    from .autoselect import ATTR, decide

    decisions = [decide(fqn, m, s, batch=batch, mode=mode, timer=timer, cache=cache)
                 for (fqn, m), s in zip(targets, new)]
    keep_t, keep_n = [], []
    for (fqn, m), s, dec in zip(targets, new, decisions):
        if dec.chose == "sparse":
            setattr(s, ATTR, dec)
            keep_t.append((fqn, m))
            keep_n.append(s)
        else:
            setattr(m, ATTR, dec)
    return keep_t, keep_n


def _swap(model: nn.Module, targets, new) -> nn.Module:
    for (fqn, _), layer in zip(targets, new):
        if fqn == "":
            return layer
        _replace(model, fqn, layer)
    return model


def _torch_activation(name: str) -> nn.Module:
    """The torch module of a fused activation name (torch's default parameters, as the fused op uses)."""
    from .nn.activation import _FROM_TORCH

    return next(t() for t, (fb, _) in _FROM_TORCH.items() if fb.name == name)


def _dense_of(mod: nn.Module) -> nn.Module | None:
    from .nn.monarch import MonarchLinear

    if isinstance(mod, ActivationSparseLinear):
        inner = mod.to_dense()
        new = _dense_of(inner) if isinstance(inner, SparseLinear) else inner
    elif isinstance(mod, SparseLinear):
        new = mod.to_dense()
        if mod.activation is not None:
            new = nn.Sequential(new, _torch_activation(mod.activation))
    elif isinstance(mod, MonarchLinear):
        new = mod.to_dense()
    else:
        return None
    return new.train(mod.training)


def densify_(model: nn.Module) -> nn.Module:
    """Swap every :class:`SparseLinear`, :class:`~sparseops.nn.MonarchLinear` and
    :class:`~sparseops.nn.ActivationSparseLinear` of ``model`` for a dense ``nn.Linear`` holding the same
    weight, in place: e.g. to load a sparse checkpoint (into a model ``sparsify_``-ed the same way) and then
    run or export it with dense kernels only.

    - ``SparseLinear``: its ``to_dense()``, zeros off the mask (plus a Pixelfly's low-rank term); one with a
      fused ``activation`` becomes ``nn.Sequential(linear, <the torch activation>)``, so the output is the
      same (within an ulp or two for the activations whose CPU kernel computes its own forward: tanh,
      sigmoid, silu, elu, selu, celu, softplus, logsigmoid; its few-bit backward becomes torch's exact one).
    - ``MonarchLinear``: its ``to_dense()``, the product of the two factors.
    - ``ActivationSparseLinear``: the layer without its input sparsifier (a wrapped ``SparseLinear`` is then
      densified too). Its output becomes the dense product on every input, what the layer computed before
      ``sparsify_activations_``, not its sparsified output.

    The new modules are on the old ones' device and dtype, in their train/eval mode. Optimizers that held
    the old parameters do not see the new ones.

    Returns:
        ``model`` (or, if ``model`` is itself one of those layers, its replacement).

    Raises:
        TypeError: ``model`` is not an ``nn.Module``.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model: expected an nn.Module, got {type(model).__name__}")
    targets, new = [], []
    made: dict[int, nn.Module] = {}  # a module registered at several places gets one replacement, shared

    def walk(mod: nn.Module, fqn: str) -> None:
        dense = made.get(id(mod))
        if dense is None:
            dense = _dense_of(mod)
        if dense is not None:
            made[id(mod)] = dense
            targets.append((fqn, mod))
            new.append(dense)
            return
        # every registration (named_children skips a module it has seen: a second one would stay sparse)
        for name, child in mod._modules.items():
            if child is not None:
                walk(child, f"{fqn}.{name}" if fqn else name)

    with torch.no_grad():
        walk(model, "")
    return _swap(model, targets, new)


def sparsify_activations_(
    model: nn.Module,
    sparsity: float = 0.5,
    *,
    mode: str = "tensor",
    filter_fn: Callable[[nn.Module, str], bool] | None = None,
) -> nn.Module:
    """Swap every ``nn.Linear`` and :class:`SparseLinear` of ``model`` for an
    :class:`~sparseops.nn.ActivationSparseLinear`, in place; then :func:`calibrate_` it.

    Args:
        model: the model to modify.
        sparsity: target fraction of inputs to drop, in [0, 1).
        mode: ``"relu"``, ``"tensor"``, ``"channel"`` or ``"topk"``.
        filter_fn: ``filter_fn(module, fqn) -> bool``; only layers for which it is True are swapped.

    Returns:
        ``model`` (or, if ``model`` is itself a linear layer, its replacement).

    Raises:
        TypeError: ``model`` is not an ``nn.Module``; ValueError: bad sparsity or mode.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model: expected an nn.Module, got {type(model).__name__}")
    check_sparsity(sparsity)
    _check_mode(mode)
    # the SparseLinear inside an ActivationSparseLinear is its weight, not a layer to wrap again
    inner = {id(m.sparse) for m in model.modules() if isinstance(m, ActivationSparseLinear) and m.sparse is not None}
    targets = _targets(model, filter_fn, (nn.Linear, SparseLinear), skip=inner)
    again = [fqn or "the model" for fqn, m in model.named_modules()
             if isinstance(m, ActivationSparseLinear) and (filter_fn is None or filter_fn(m, fqn))]
    if again:
        warnings.warn(
            f"sparsify_activations_: left {len(again)} layer(s) already activation-sparse as they are "
            f"({', '.join(again[:5])}{', ...' if len(again) > 5 else ''}); set their mode and sparsity "
            "(set_mode) and calibrate them instead",
            stacklevel=2,
        )
    new = [ActivationSparseLinear.from_dense(m, sparsity, mode) for _, m in targets]
    return _swap(model, targets, new)
