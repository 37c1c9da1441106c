"""Block masks: block-magnitude pruning and the flat block butterfly of Pixelated Butterfly.

Flat block butterfly (Dao et al. 2022). For a power of two ``n = butterfly_size`` and
``k = n_factors`` (``2**(k-1) < n``), the base ``n x n`` pattern has entry ``(i, j)`` on iff
``i XOR j`` is 0 or one of ``1, 2, 4, ..., 2**(k-1)``: the union of the supports of the first
``k`` butterfly factors, flattened into one sparse matrix. Every row holds ``k + 1`` entries,
so its density is ``(k + 1) / n``.

The base pattern is expanded to the layer: weight row ``r`` belongs to base row
``floor(r * n / out)`` and column ``c`` to base column ``floor(c * n / in)``, so each base entry
becomes a tile of about ``out/n x in/n``. ``global_size > 0`` then turns the first
``global_size`` rows and columns on (the global tokens of Pixelfly). Last, the mask is coarsened
to ``block``: a block is on if any entry in it is on (padding past ``[out, in]`` counts as off).

Density: when ``out/n`` and ``in/n`` are multiples of ``block`` (e.g. 4096 x 4096, n=16,
block=32: tiles of 256 = 8 blocks), every block lies inside one tile and the density is exactly
``(k + 1) / n`` (18.75% for n=16, k=2). When a block cuts across tiles, coarsening can only
turn more entries on, so the density is at least ``(k + 1) / n``; ``global_size`` adds its rows
and columns on top.
"""

from __future__ import annotations

import torch

from ..formats.bsr import BSRWeight, block_view, check_block, grid_shape
from ..patterns import Butterfly, check_sparsity
from ._checks import check_int, check_weight
from .magnitude import _keep_largest, _n_keep, _rank_dtype


def _expand_blocks(block_mask: torch.Tensor, out_features: int, in_features: int, block: int) -> torch.Tensor:
    m = block_mask.repeat_interleave(block, 0).repeat_interleave(block, 1)
    return m[:out_features, :in_features].contiguous()


def block_magnitude(weight: torch.Tensor, sparsity: float, block: int = 32) -> torch.Tensor:
    """Keep the ``1 - sparsity`` fraction of ``block x block`` blocks with the largest Frobenius norm.

    ``round(sparsity * nblocks)`` blocks of the padded ``ceil(out/b) x ceil(in/b)`` grid are
    dropped, but never all of them (ties go to the lower block index); the mask is constant on every
    block.

    Args:
        weight: ``[out, in]`` floating tensor.
        sparsity: fraction of zero blocks in [0, 1).
        block: 8, 16, 32 or 64.

    Returns:
        bool mask ``[out, in]`` on ``weight.device``.

    Raises:
        TypeError: ``weight`` not floating, ``block`` not an int.
        ValueError: ``weight`` not 2-D or holds NaN, ``sparsity`` outside [0, 1), a bad ``block``.
    """
    w = check_weight(weight, "weight", min_dim=2)
    if w.dim() != 2:
        raise ValueError(f"weight: expected a 2-D [out, in] tensor, got shape {tuple(w.shape)}")
    s = check_sparsity(sparsity)
    b = check_block(block)
    out_f, in_f = w.shape
    nbr, nbc = grid_shape(out_f, in_f, b)
    norms = block_view(w.to(_rank_dtype(w)).square(), b).sum((2, 3)).reshape(-1)
    keep = _keep_largest(norms, _n_keep(norms.numel(), s)).reshape(nbr, nbc)
    return _expand_blocks(keep, out_f, in_f, b)


def _base_butterfly(n: int, k: int, device) -> torch.Tensor:
    i = torch.arange(n, device=device)
    x = i[:, None] ^ i[None, :]
    on = x == 0
    for f in range(k):
        on |= x == (1 << f)
    return on


def flat_block_butterfly(
    out_features: int,
    in_features: int,
    *,
    butterfly_size: int = 16,
    n_factors: int = 2,
    block: int = 32,
    global_size: int = 0,
    shuffle: bool = False,
    device=None,
) -> torch.Tensor:
    """The flat block-butterfly mask of Pixelated Butterfly (see the module docstring for the math).

    Args:
        out_features, in_features: the layer's shape.
        butterfly_size: ``n``, a power of two >= 2.
        n_factors: ``k`` with ``1 <= 2**(k-1) < n``.
        block: 8, 16, 32 or 64; the mask is constant on these blocks.
        global_size: dense leading rows and columns (>= 0).
        shuffle: permute the base pattern's rows with ``torch.randperm`` (seed torch for a fixed mask).
        device: where the mask is made.

    Returns:
        bool mask ``[out, in]``, block-constant, density >= ``(k + 1) / n``.

    Raises:
        TypeError, ValueError: a bad size or option (the message names it).
    """
    out_f = check_int(out_features, "out_features")
    in_f = check_int(in_features, "in_features")
    if out_f < 1 or in_f < 1:
        raise ValueError(f"out_features, in_features: expected >= 1, got ({out_f}, {in_f})")
    pat = Butterfly(butterfly_size=butterfly_size, n_factors=n_factors, block=block, global_size=global_size,
                    shuffle=shuffle)
    n = pat.butterfly_size
    base = _base_butterfly(n, pat.n_factors, device)
    if pat.shuffle:
        base = base[torch.randperm(n).to(base.device)]
    rows = torch.arange(out_f, device=device) * n // out_f
    cols = torch.arange(in_f, device=device) * n // in_f
    full = base[rows][:, cols]
    g = pat.global_size
    if g:
        full[:g, :] = True
        full[:, :g] = True
    b = pat.block
    on = block_view(full.to(torch.uint8), b).amax((2, 3)).bool()
    return _expand_blocks(on, out_f, in_f, b)


def is_block_sparse(mask: torch.Tensor, block: int) -> bool:
    """Whether the bool ``mask [out, in]`` is constant on every ``block x block`` block (ragged edges included)."""
    try:
        BSRWeight.from_mask(mask, block)
    except ValueError:
        return False
    return True
