"""The mask of a pattern: produce one from a weight, or check a given one against the pattern."""

from __future__ import annotations

import torch

from ..patterns import NM, Block, Butterfly, FanIn, Monarch, Unstructured, as_pattern, check_sparsity
from .block import block_magnitude, flat_block_butterfly, is_block_sparse
from .fan_in import fan_in, is_fan_in
from .magnitude import magnitude
from .nm import is_nm, nm
from .transposable import is_transposable_nm, transposable_nm


def for_pattern(pattern, weight: torch.Tensor, sparsity: float | None = None, mask: torch.Tensor | None = None):
    """The bool mask ``[out, in]`` of ``pattern`` for ``weight``.

    Unstructured needs ``sparsity`` (magnitude pruning) or ``mask``. N:M and fan-in fix their
    own sparsity, so they take no ``sparsity``; a given ``mask`` must satisfy the pattern.

    Args:
        pattern: a pattern object or shorthand.
        weight: ``[out, in]``.
        sparsity: fraction of zeros in [0, 1) (unstructured only).
        mask: bool ``[out, in]`` to use instead of producing one.

    Returns:
        bool mask ``[out, in]`` on ``weight.device``.

    Raises:
        TypeError: ``weight`` is not a 2-D tensor.
        ValueError: a missing or superfluous ``sparsity``, both ``sparsity`` and ``mask``, a ``mask`` that
            is not bool of the weight's shape or breaks the pattern, or ``k > in_features``.
    """
    pat = as_pattern(pattern)
    if not isinstance(weight, torch.Tensor) or weight.dim() != 2:
        got = f"shape {tuple(weight.shape)}" if isinstance(weight, torch.Tensor) else type(weight).__name__
        raise TypeError(f"weight: expected a 2-D tensor [out, in], got {got}")
    if mask is not None and (not isinstance(mask, torch.Tensor) or mask.dtype != torch.bool
                             or mask.shape != weight.shape):
        got = f"{mask.dtype} {tuple(mask.shape)}" if isinstance(mask, torch.Tensor) else type(mask).__name__
        raise ValueError(f"mask: expected a bool tensor of the weight's shape {tuple(weight.shape)}, got {got}")
    if sparsity is None and isinstance(pat, (Unstructured, Block)):
        sparsity = pat.sparsity
    if mask is not None and sparsity is not None:
        raise ValueError("sparsity: give either sparsity= or mask=, not both")
    if isinstance(pat, Unstructured):
        if mask is None and sparsity is None:
            raise ValueError("sparsity: give sparsity= (a float in [0, 1)) or mask= to fix the pattern")
        return magnitude(weight, check_sparsity(sparsity)) if mask is None else mask
    if isinstance(pat, Block):
        if mask is None and sparsity is None:
            raise ValueError("sparsity: give sparsity= (the fraction of zero blocks) or mask= for a Block pattern")
        if mask is None:
            return block_magnitude(weight, check_sparsity(sparsity), pat.size)
        if not is_block_sparse(mask, pat.size):
            raise ValueError(f"mask: is not constant on {pat.size}x{pat.size} blocks (the Block({pat.size}) pattern)")
        return mask
    if sparsity is not None:
        raise ValueError(f"sparsity: the {pat.name} pattern fixes its own sparsity; pass the pattern alone")
    if isinstance(pat, NM):
        if mask is None:
            return transposable_nm(weight, pat.n, pat.m) if pat.transposable else nm(weight, pat.n, pat.m)
        ok = is_transposable_nm(mask, pat.n, pat.m) if pat.transposable else is_nm(mask, pat.n, pat.m)
        if not ok:
            kind = "transposable " if pat.transposable else ""
            raise ValueError(f"mask: does not satisfy the {kind}{pat.n}:{pat.m} pattern")
        return mask
    if isinstance(pat, FanIn):
        if pat.k > weight.shape[-1]:
            raise ValueError(f"k: expected k <= in_features={weight.shape[-1]}, got {pat.k}")
        if mask is None:
            return fan_in(weight, pat.k)
        if not is_fan_in(mask, pat.k):
            # rows with none are ablated neurons (SRigL): a fan-in layer's own mask can have them
            counts = mask.reshape(mask.shape[0], -1).sum(1)  # rows as is_fan_in counts them (first dim)
            if not (((counts == pat.k) | (counts == 0)).all() and bool((counts == pat.k).any())):
                raise ValueError(f"mask: does not have exactly k={pat.k} nonzeros in every row (or none: an "
                                 "ablated row), with at least one row of k")
        return mask
    if isinstance(pat, Butterfly):
        if mask is None:
            out_f, in_f = weight.shape
            return flat_block_butterfly(
                out_f, in_f, butterfly_size=pat.butterfly_size, n_factors=pat.n_factors, block=pat.block,
                global_size=pat.global_size, shuffle=pat.shuffle, device=weight.device,
            )
        if not is_block_sparse(mask, pat.block):
            raise ValueError(f"mask: is not constant on {pat.block}x{pat.block} blocks (the butterfly's block)")
        return mask
    if isinstance(pat, Monarch):
        raise ValueError(
            "pattern: Monarch has no mask; use sparseops.nn.MonarchLinear (or sparsify_(model, pattern='monarch:4'))"
        )
    raise TypeError(f"pattern: unsupported pattern {pat!r}")
