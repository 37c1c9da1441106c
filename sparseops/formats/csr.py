"""CSR weight format: a plain container of index tensors, both orientations.

A weight ``W [out, in]`` is stored as its nonzero values (kept separately, as the
trainable parameter) plus index tensors:

- ``crow [out+1]``, ``col [nnz]``: row-major CSR; columns sorted and unique per row.
- ``row [nnz]``: the row of each nonzero (COO), used by the weight gradient (sdd).
- ``t_crow [in+1]``, ``t_row [nnz]``, ``t_perm [nnz]``: CSR of ``Wᵀ``. ``t_row`` holds,
  for each input column, the output rows that touch it (ascending), and ``t_perm``
  points at the position of that entry in ``values``. The input gradient (dsd)
  walks this index, so neither pass transposes the weight at run time.

All indices are int32: half the index bytes of int64, and the kernels index with
64-bit arithmetic. A weight with more than 2**31 - 1 nonzeros is refused.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

INDEX_DTYPE = torch.int32
_INDEX_NAMES = ("crow", "col", "row", "t_crow", "t_row", "t_perm")


def check_weight_and_mask(weight, mask) -> None:
    """What every format's ``from_dense`` packs from: a floating-point 2-D ``weight`` and, when given, a
    ``mask`` of its shape on its device (a larger weight would be packed by its corner, silently)."""
    if not isinstance(weight, torch.Tensor) or not weight.is_floating_point() or weight.dim() != 2:
        raise TypeError(f"weight: expected a floating-point 2-D torch.Tensor, got "
                        f"{getattr(weight, 'dtype', type(weight).__name__)} of shape {tuple(getattr(weight, 'shape', ()))}")
    if mask is not None:
        if not isinstance(mask, torch.Tensor):
            raise TypeError(f"mask: expected a torch.Tensor, got {type(mask).__name__}")
        if tuple(mask.shape) != tuple(weight.shape):
            raise ValueError(f"weight: expected the mask's shape {tuple(mask.shape)}, got {tuple(weight.shape)}")
        if mask.device != weight.device:
            raise ValueError(f"weight: expected the mask's device {mask.device}, got {weight.device}")


@dataclass(frozen=True)
class CSRWeight:
    """Index tensors of an unstructured sparse weight ``[out, in]``.

    Build it with :meth:`from_mask` or :meth:`from_dense`; a hand-built one is
    checked with :meth:`validate` before any kernel sees it.
    """

    out_features: int
    in_features: int
    crow: torch.Tensor  # [out+1]
    col: torch.Tensor  # [nnz]
    row: torch.Tensor  # [nnz]
    t_crow: torch.Tensor  # [in+1]
    t_row: torch.Tensor  # [nnz]
    t_perm: torch.Tensor  # [nnz]

    @property
    def nnz(self) -> int:
        return int(self.col.numel())

    @property
    def shape(self) -> tuple[int, int]:
        return (self.out_features, self.in_features)

    @property
    def device(self) -> torch.device:
        return self.col.device

    @property
    def density(self) -> float:
        total = self.out_features * self.in_features
        return self.nnz / total if total else 0.0

    @classmethod
    def from_mask(cls, mask: torch.Tensor) -> "CSRWeight":
        """Build the index of a bool mask ``[out, in]``.

        Args:
            mask: bool tensor ``[out, in]``; True marks a stored weight.

        Returns:
            CSRWeight on ``mask.device``.

        Raises:
            TypeError: if ``mask`` is not a bool tensor.
            ValueError: if ``mask`` is not 2-D or has more than 2**31 - 1 nonzeros.
        """
        if not isinstance(mask, torch.Tensor):
            raise TypeError(f"mask: expected a torch.Tensor, got {type(mask).__name__}")
        if mask.dtype != torch.bool:
            raise TypeError(f"mask: expected dtype torch.bool, got {mask.dtype}")
        if mask.dim() != 2:
            raise ValueError(f"mask: expected a 2-D [out, in] tensor, got shape {tuple(mask.shape)}")
        out_f, in_f = mask.shape
        # nonzero() walks row-major, so columns come out sorted within each row
        rows, cols = mask.nonzero(as_tuple=True)
        if rows.numel() > torch.iinfo(torch.int32).max:
            raise ValueError(f"mask: {rows.numel()} nonzeros exceed the int32 index limit")
        return cls._build(out_f, in_f, rows, cols)

    @classmethod
    def from_crow_col(cls, out_features: int, in_features: int, crow: torch.Tensor, col: torch.Tensor) -> "CSRWeight":
        """Rebuild the full index (COO rows and the transpose) from ``crow``/``col``, e.g. from a checkpoint.

        Raises:
            TypeError: ``crow``/``col`` are not int32 tensors.
            ValueError: a size, range or order that breaks the CSR layout.
        """
        for name, t in (("crow", crow), ("col", col)):
            if not isinstance(t, torch.Tensor):
                raise TypeError(f"{name}: expected a torch.Tensor, got {type(t).__name__}")
            if t.dtype != INDEX_DTYPE:
                raise TypeError(f"{name}: expected dtype {INDEX_DTYPE}, got {t.dtype}")
            if t.dim() != 1:
                raise ValueError(f"{name}: expected a 1-D tensor, got shape {tuple(t.shape)}")
        nnz = col.numel()
        _check_ptr("crow", crow, out_features, nnz)
        _check_idx("col", crow, col, in_features)
        counts = crow.long()[1:] - crow.long()[:-1]
        rows = torch.repeat_interleave(torch.arange(out_features, device=col.device), counts, output_size=nnz)
        return cls._build(out_features, in_features, rows, col.long())

    @classmethod
    def _build(cls, out_f: int, in_f: int, rows: torch.Tensor, cols: torch.Tensor) -> "CSRWeight":
        # rows, cols: int64 COO of the nonzeros in row-major order, columns sorted within a row
        dev = cols.device
        crow = torch.zeros(out_f + 1, dtype=torch.int64, device=dev)
        crow[1:] = torch.cumsum(torch.bincount(rows, minlength=out_f), 0)
        # stable sort by column keeps rows ascending inside each column
        order = torch.sort(cols, stable=True).indices
        t_crow = torch.zeros(in_f + 1, dtype=torch.int64, device=dev)
        t_crow[1:] = torch.cumsum(torch.bincount(cols, minlength=in_f), 0)
        return cls(
            out_features=out_f,
            in_features=in_f,
            crow=crow.to(INDEX_DTYPE),
            col=cols.to(INDEX_DTYPE),
            row=rows.to(INDEX_DTYPE),
            t_crow=t_crow.to(INDEX_DTYPE),
            t_row=rows[order].to(INDEX_DTYPE),
            t_perm=order.to(INDEX_DTYPE),
        )

    def select(self, keep: torch.Tensor) -> "CSRWeight":
        """The index of the stored entries for which ``keep [nnz]`` (bool, CSR order) is True.

        Both orientations are filtered, not rebuilt: no dense mask and no sort, O(nnz) (a drop-only
        mask update of a 4096² layer at 90% takes milliseconds instead of the ~100 ms of
        :meth:`from_mask`). The kept values are ``values[keep]``.

        Raises:
            TypeError, ValueError: ``keep`` is not a bool ``[nnz]`` tensor.
        """
        if not isinstance(keep, torch.Tensor) or keep.dtype != torch.bool:
            raise TypeError(f"keep: expected a bool torch.Tensor, got {getattr(keep, 'dtype', type(keep).__name__)}")
        if tuple(keep.shape) != (self.nnz,):
            raise ValueError(f"keep: expected shape ({self.nnz},) (one per stored weight), got {tuple(keep.shape)}")
        keep = keep.to(self.col.device)
        newpos = torch.cumsum(keep.to(torch.int64), 0) - 1  # new position of each kept entry
        # kept entries before each old pointer: the new pointers
        seen = torch.cat([keep.new_zeros(1, dtype=torch.int64), torch.cumsum(keep.to(torch.int64), 0)])
        crow = seen[self.crow.long()]
        t_keep = keep[self.t_perm.long()]
        t_seen = torch.cat([keep.new_zeros(1, dtype=torch.int64), torch.cumsum(t_keep.to(torch.int64), 0)])
        t_crow = t_seen[self.t_crow.long()]
        return CSRWeight(
            out_features=self.out_features,
            in_features=self.in_features,
            crow=crow.to(INDEX_DTYPE),
            col=self.col[keep],
            row=self.row[keep],
            t_crow=t_crow.to(INDEX_DTYPE),
            t_row=self.t_row[t_keep],
            t_perm=newpos[self.t_perm.long()][t_keep].to(INDEX_DTYPE),
        )

    @classmethod
    def from_dense(cls, weight: torch.Tensor, mask: torch.Tensor | None = None) -> tuple["CSRWeight", torch.Tensor]:
        """Pack a dense weight ``[out, in]``; ``mask`` defaults to ``weight != 0``.

        Returns:
            (index, values) with ``values [nnz]`` in ``weight.dtype``.
        """
        check_weight_and_mask(weight, mask)
        if mask is None:
            mask = weight != 0
        fmt = cls.from_mask(mask)
        return fmt, weight[fmt.row.long(), fmt.col.long()]

    def gather(self, weight: torch.Tensor) -> torch.Tensor:
        """``values [nnz]`` of a dense ``weight [out, in]`` (the layout the layer's ``values`` has)."""
        return weight[self.row.long(), self.col.long()]

    def to_mask(self) -> torch.Tensor:
        """The bool pattern ``[out, in]``."""
        mask = torch.zeros(self.out_features, self.in_features, dtype=torch.bool, device=self.device)
        mask[self.row.long(), self.col.long()] = True
        return mask

    def to_dense(self, values: torch.Tensor) -> torch.Tensor:
        """Scatter ``values [nnz]`` into a dense ``[out, in]`` weight, zeros off the mask."""
        dense = torch.zeros(self.out_features, self.in_features, dtype=values.dtype, device=values.device)
        dense[self.row.long(), self.col.long()] = values
        return dense

    def tensors(self) -> dict[str, torch.Tensor]:
        return {name: getattr(self, name) for name in _INDEX_NAMES}

    def to(self, device: torch.device | str) -> "CSRWeight":
        return CSRWeight(self.out_features, self.in_features, **{k: v.to(device) for k, v in self.tensors().items()})

    def validate(self) -> None:
        """Check every invariant a kernel relies on (shapes, dtypes, ranges, order).

        Raises:
            TypeError: an index tensor is not int32.
            ValueError: a shape, range, order or orientation is inconsistent.
        """
        validate_csr(self.out_features, self.in_features, **self.tensors())


def _check_ptr(name: str, ptr: torch.Tensor, n: int, nnz: int) -> None:
    if ptr.numel() != n + 1:
        raise ValueError(f"{name}: expected {n + 1} entries, got {ptr.numel()}")
    p = ptr.long()
    if p[0].item() != 0 or p[-1].item() != nnz:
        raise ValueError(f"{name}: must start at 0 and end at nnz={nnz}, got {p[0].item()}..{p[-1].item()}")
    if n > 0 and bool((p[1:] < p[:-1]).any()):
        raise ValueError(f"{name}: must be non-decreasing")


def _check_idx(name: str, ptr: torch.Tensor, idx: torch.Tensor, limit: int) -> None:
    i = idx.long()
    if i.numel() and (int(i.min()) < 0 or int(i.max()) >= limit):
        raise ValueError(f"{name}: indices must lie in [0, {limit}), got [{int(i.min())}, {int(i.max())}]")
    if i.numel() > 1:
        # strictly increasing inside each segment; a drop is allowed only at a segment start
        seg_start = torch.zeros(i.numel(), dtype=torch.bool, device=i.device)
        starts = ptr.long()[:-1]
        starts = starts[starts < i.numel()]
        seg_start[starts] = True
        bad = (i[1:] <= i[:-1]) & ~seg_start[1:]
        if bool(bad.any()):
            k = int(bad.nonzero()[0, 0]) + 1
            raise ValueError(f"{name}: indices must be sorted and unique within each segment (position {k})")


def validate_csr(
    out_features: int,
    in_features: int,
    crow: torch.Tensor,
    col: torch.Tensor,
    row: torch.Tensor,
    t_crow: torch.Tensor,
    t_row: torch.Tensor,
    t_perm: torch.Tensor,
) -> None:
    """Validate a hand-built CSR index; see :class:`CSRWeight` for the layout."""
    for name, t in zip(_INDEX_NAMES, (crow, col, row, t_crow, t_row, t_perm)):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{name}: expected a torch.Tensor, got {type(t).__name__}")
        if t.dtype != INDEX_DTYPE:
            raise TypeError(f"{name}: expected dtype {INDEX_DTYPE}, got {t.dtype}")
        if t.dim() != 1:
            raise ValueError(f"{name}: expected a 1-D tensor, got shape {tuple(t.shape)}")
    if out_features < 0 or in_features < 0:
        raise ValueError(f"shape: features must be >= 0, got ({out_features}, {in_features})")
    nnz = col.numel()
    for name, t in (("row", row), ("t_row", t_row), ("t_perm", t_perm)):
        if t.numel() != nnz:
            raise ValueError(f"{name}: expected nnz={nnz} entries, got {t.numel()}")
    _check_ptr("crow", crow, out_features, nnz)
    _check_ptr("t_crow", t_crow, in_features, nnz)
    _check_idx("col", crow, col, in_features)
    _check_idx("t_row", t_crow, t_row, out_features)
    if nnz:
        counts = crow.long()[1:] - crow.long()[:-1]
        expect_row = torch.repeat_interleave(torch.arange(out_features, device=crow.device), counts)
        if not torch.equal(expect_row, row.long()):
            raise ValueError("row: must equal the row of each nonzero implied by crow")
        p = t_perm.long()
        if int(p.min()) < 0 or int(p.max()) >= nnz:
            raise ValueError(f"t_perm: indices must lie in [0, {nnz})")
        # the transposed entry k must be the same (row, col) as values[t_perm[k]]
        t_counts = t_crow.long()[1:] - t_crow.long()[:-1]
        t_col = torch.repeat_interleave(torch.arange(in_features, device=crow.device), t_counts)
        if not (torch.equal(row.long()[p], t_row.long()) and torch.equal(col.long()[p], t_col)):
            raise ValueError("t_perm: the transposed index does not describe the same nonzeros as crow/col")
