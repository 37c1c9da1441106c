"""Block-sparse (BSR) weight format: square blocks on a CSR index of the block grid.

A weight ``W [out, in]`` with square blocks of ``b`` (8, 16, 32 or 64) is padded to
``[out_p, in_p] = [ceil(out/b)*b, ceil(in/b)*b]`` and cut into a grid of ``nbr x nbc``
blocks. The stored blocks are

- ``values [nblk, b, b]`` (the trainable parameter, kept separately): block ``k``'s entry
  ``[i, j]`` is ``W[brow[k]*b + i, bcol[k]*b + j]``. Entries at rows ``>= out`` or columns
  ``>= in`` are padding: they hold 0 and get a zero gradient (the kernels read ``x`` and
  ``dy`` as zero there), so they stay 0 through training;
- ``grid``: a :class:`~sparseops.formats.csr.CSRWeight` of the ``[nbr, nbc]`` block mask,
  which carries both orientations: ``crow``/``col`` (block columns of each block row,
  ascending), ``row`` (the block row of each block), and ``t_crow``/``t_row``/``t_perm``
  (for each block column, its block rows and the blocks' positions in ``values``), so the
  input gradient walks ``Wᵀ`` without transposing anything at run time.

The ops take the padded activations ``[B, in_p]``/``[B, out_p]``; ``SparseLinear`` pads and
slices around them when the features do not divide by ``b``.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from .csr import CSRWeight, check_weight_and_mask

BLOCK_SIZES = (8, 16, 32, 64)


def check_block(block) -> int:
    """``block`` as an int after checking it is one of :data:`BLOCK_SIZES`.

    Raises:
        TypeError: not an int.
        ValueError: not 8, 16, 32 or 64.
    """
    if isinstance(block, bool) or not isinstance(block, int):
        raise TypeError(f"block: expected an int in {BLOCK_SIZES}, got {type(block).__name__}")
    if block not in BLOCK_SIZES:
        raise ValueError(f"block: expected one of {BLOCK_SIZES}, got {block}")
    return block


def grid_shape(out_features: int, in_features: int, block: int) -> tuple[int, int]:
    """``(nbr, nbc)``: block rows and block columns of the padded weight."""
    return -(-out_features // block), -(-in_features // block)


def block_view(weight: torch.Tensor, block: int) -> torch.Tensor:
    """``weight [out, in]`` zero-padded and viewed as ``[nbr, nbc, b, b]`` blocks (a copy)."""
    out_f, in_f = weight.shape
    nbr, nbc = grid_shape(out_f, in_f, block)
    w = F.pad(weight, (0, nbc * block - in_f, 0, nbr * block - out_f))
    return w.reshape(nbr, block, nbc, block).transpose(1, 2)


@dataclass(frozen=True)
class BSRWeight:
    """Block index of a block-sparse weight ``[out, in]`` (see the module docstring)."""

    out_features: int
    in_features: int
    block: int
    grid: CSRWeight  # [nbr, nbc] block mask

    @property
    def nblocks(self) -> int:
        return self.grid.nnz

    @property
    def nnz(self) -> int:
        """Stored weights inside ``[out, in]`` (padding excluded)."""
        if not self.nblocks:
            return 0
        b = self.block
        rows = (self.out_features - self.grid.row.long() * b).clamp(max=b)
        cols = (self.in_features - self.grid.col.long() * b).clamp(max=b)
        return int((rows * cols).sum())

    @property
    def shape(self) -> tuple[int, int]:
        return (self.out_features, self.in_features)

    @property
    def padded_shape(self) -> tuple[int, int]:
        return (self.grid.out_features * self.block, self.grid.in_features * self.block)

    @property
    def device(self) -> torch.device:
        return self.grid.device

    @classmethod
    def from_block_mask(cls, block_mask: torch.Tensor, out_features: int, in_features: int, block: int) -> "BSRWeight":
        """Build the index of a bool block mask ``[nbr, nbc]``.

        Raises:
            TypeError: ``block_mask`` is not a bool tensor, or ``block`` not an int.
            ValueError: ``block_mask`` does not have the grid shape of ``[out, in]`` in blocks of ``block``.
        """
        block = check_block(block)
        if not isinstance(block_mask, torch.Tensor) or block_mask.dtype != torch.bool:
            raise TypeError(f"block_mask: expected a bool torch.Tensor, got {getattr(block_mask, 'dtype', type(block_mask))}")
        expect = grid_shape(out_features, in_features, block)
        if tuple(block_mask.shape) != expect:
            raise ValueError(
                f"block_mask: expected shape {expect} = (ceil(out/{block}), ceil(in/{block})), got {tuple(block_mask.shape)}"
            )
        return cls(out_features, in_features, block, CSRWeight.from_mask(block_mask))

    @classmethod
    def from_mask(cls, mask: torch.Tensor, block: int) -> "BSRWeight":
        """Build the index of an element mask ``[out, in]`` that is constant on every block.

        Raises:
            TypeError: ``mask`` is not a bool tensor.
            ValueError: ``mask`` is not 2-D, or a block of it is partly on (name the first such block).
        """
        block = check_block(block)
        if not isinstance(mask, torch.Tensor):
            raise TypeError(f"mask: expected a torch.Tensor, got {type(mask).__name__}")
        if mask.dtype != torch.bool:
            raise TypeError(f"mask: expected dtype torch.bool, got {mask.dtype}")
        if mask.dim() != 2:
            raise ValueError(f"mask: expected a 2-D [out, in] tensor, got shape {tuple(mask.shape)}")
        out_f, in_f = mask.shape
        blocks = block_view(mask.to(torch.uint8), block)  # [nbr, nbc, b, b]
        count = blocks.sum((2, 3), dtype=torch.int64)
        inside = block_view(torch.ones(out_f, in_f, dtype=torch.uint8, device=mask.device), block).sum(
            (2, 3), dtype=torch.int64
        )
        partial = (count > 0) & (count < inside)
        if bool(partial.any()):
            r, c = (int(v) for v in partial.nonzero()[0])
            raise ValueError(
                f"mask: not block-sparse with block={block}: block ({r}, {c}) (rows {r * block}.., cols {c * block}..) "
                f"is partly on; use sparseops.masks.block_magnitude or coarsen the mask to whole blocks"
            )
        return cls(out_f, in_f, block, CSRWeight.from_mask(count > 0))

    @classmethod
    def from_dense(cls, weight: torch.Tensor, mask: torch.Tensor, block: int) -> tuple["BSRWeight", torch.Tensor]:
        """Pack ``weight [out, in]`` on a block-constant ``mask``.

        Returns:
            (index, values) with ``values [nblk, b, b]`` in ``weight.dtype``, padding zeroed.
        """
        check_weight_and_mask(weight, mask)
        fmt = cls.from_mask(mask, block)
        return fmt, fmt.gather(weight)

    @classmethod
    def from_crow_col(cls, out_features: int, in_features: int, block: int, crow: torch.Tensor, col: torch.Tensor) -> "BSRWeight":
        """Rebuild the index from the block grid's ``crow``/``col`` (e.g. from a checkpoint), validated."""
        block = check_block(block)
        nbr, nbc = grid_shape(out_features, in_features, block)
        return cls(out_features, in_features, block, CSRWeight.from_crow_col(nbr, nbc, crow, col))

    def gather(self, weight: torch.Tensor) -> torch.Tensor:
        """``values [nblk, b, b]`` of a dense ``weight [out, in]`` (padding 0)."""
        g = self.grid
        return block_view(weight, self.block)[g.row.long(), g.col.long()].contiguous()

    def block_mask(self) -> torch.Tensor:
        """The bool block mask ``[nbr, nbc]``."""
        return self.grid.to_mask()

    def to_mask(self) -> torch.Tensor:
        """The bool element mask ``[out, in]``."""
        b = self.block
        m = self.block_mask().repeat_interleave(b, 0).repeat_interleave(b, 1)
        return m[: self.out_features, : self.in_features].contiguous()

    def to_dense(self, values: torch.Tensor) -> torch.Tensor:
        """Scatter ``values [nblk, b, b]`` into a dense ``[out, in]`` weight (differentiable in ``values``)."""
        g, b = self.grid, self.block
        nbr, nbc = g.out_features, g.in_features
        dense = values.new_zeros(nbr, nbc, b, b)
        dense = dense.index_put((g.row.long(), g.col.long()), values)
        dense = dense.transpose(1, 2).reshape(nbr * b, nbc * b)
        return dense[: self.out_features, : self.in_features]

    def padding_mask(self) -> torch.Tensor:
        """Bool ``[nblk, b, b]``: True where a stored entry lies inside ``[out, in]``."""
        g, b = self.grid, self.block
        i = torch.arange(b, device=self.device)
        rows = g.row.long()[:, None] * b + i[None, :]  # [nblk, b]
        cols = g.col.long()[:, None] * b + i[None, :]
        return (rows < self.out_features)[:, :, None] & (cols < self.in_features)[:, None, :]

    def tensors(self) -> dict[str, torch.Tensor]:
        return self.grid.tensors()

    def to(self, device) -> "BSRWeight":
        return BSRWeight(self.out_features, self.in_features, self.block, self.grid.to(device))

    def validate(self) -> None:
        """Check every invariant a kernel relies on (see :meth:`CSRWeight.validate`)."""
        check_block(self.block)
        nbr, nbc = grid_shape(self.out_features, self.in_features, self.block)
        if (self.grid.out_features, self.grid.in_features) != (nbr, nbc):
            raise ValueError(f"grid: expected a ({nbr}, {nbc}) block grid, got {self.grid.shape}")
        self.grid.validate()
