"""ELL weight format for constant fan-in (SRigL's condensed layout): ``[rows, k]`` values and columns.

A weight ``W [out, in]`` whose rows all hold the same number ``k`` of nonzeros (or none: a neuron
that SRigL's ablation emptied) is stored as

- ``rows [a]``: the output rows that hold weights, ascending (``a = out`` when no row is empty);
- ``col [a, k]``: the columns of row ``rows[i]``, sorted and unique along the row;
- values ``[a, k]`` (kept separately, as the trainable parameter): ``W[rows[i], col[i, j]]``.

No row pointers and no per-nonzero row index are stored or checkpointed: row ``i`` starts at ``i * k``.
The kernels are the CSR ones (a row of constant length is a CSR row), so the format also carries the
CSR view they read (:attr:`csr`): its ``crow [out+1]`` follows from ``rows`` and ``k`` (an empty row
for every row not in ``rows``), its ``col`` is ``col.reshape(-1)`` (the same memory), and its
transposed index (``t_crow``, ``t_row``, ``t_perm``) drives the input gradient, as for CSR. Values
``[a, k]`` flattened are in that CSR's order, so every CSR op takes ``values.reshape(-1)``.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .csr import INDEX_DTYPE, CSRWeight, check_weight_and_mask, validate_csr


@dataclass(frozen=True)
class ELLWeight:
    """Index of a constant fan-in weight ``[out, in]``: ``rows [a]`` and ``col [a, k]`` plus the CSR view.

    Build it with :meth:`from_mask`, :meth:`from_dense`, :meth:`from_rows_col` (a checkpoint) or
    :meth:`from_csr` (a re-packed CSR index).
    """

    k: int
    rows: torch.Tensor  # [a] int32, ascending
    csr: CSRWeight  # the CSR view the kernels read; csr.col is col.reshape(-1)

    @property
    def out_features(self) -> int:
        return self.csr.out_features

    @property
    def in_features(self) -> int:
        return self.csr.in_features

    @property
    def col(self) -> torch.Tensor:
        """``[a, k]`` int32: the columns of each held row (a view of the CSR view's ``col``)."""
        return self.csr.col.view(self.rows.numel(), self.k)

    @property
    def nnz(self) -> int:
        return self.csr.nnz

    @property
    def shape(self) -> tuple[int, int]:
        return self.csr.shape

    @property
    def values_shape(self) -> tuple[int, int]:
        """The shape of the layer's ``values``: ``(a, k)``."""
        return (int(self.rows.numel()), self.k)

    @property
    def device(self) -> torch.device:
        return self.rows.device

    @property
    def density(self) -> float:
        return self.csr.density

    @classmethod
    def from_csr(cls, csr: CSRWeight, what: str = "index") -> "ELLWeight":
        """The ELL form of a CSR index whose rows all hold the same number of entries, or none.

        Raises:
            ValueError: rows of different nonzero lengths, or no entry at all (naming ``what``).
        """
        counts = csr.crow.long().diff()
        held = counts > 0
        if not bool(held.any()):
            raise ValueError(f"{what}: holds no weight at all; a fan-in layer needs at least one row of k >= 1")
        lengths = counts[held]
        k = int(lengths[0])
        if not bool((lengths == k).all()):
            raise ValueError(f"{what}: rows hold {sorted(set(lengths.tolist()))[:6]} weights; the rows of a fan-in "
                             "layer all hold the same number k, or none")
        rows = held.nonzero().flatten().to(INDEX_DTYPE)
        return cls(k, rows, csr)

    @classmethod
    def from_mask(cls, mask: torch.Tensor) -> "ELLWeight":
        """The index of a bool mask ``[out, in]`` whose rows hold k entries each, or none."""
        return cls.from_csr(CSRWeight.from_mask(mask), "mask")

    @classmethod
    def from_dense(cls, weight: torch.Tensor, mask: torch.Tensor | None = None) -> tuple["ELLWeight", torch.Tensor]:
        """Pack a dense weight ``[out, in]`` on ``mask`` (default ``weight != 0``).

        Returns:
            (index, values) with ``values [a, k]`` in ``weight.dtype``.
        """
        check_weight_and_mask(weight, mask)
        if mask is None:
            mask = weight != 0
        fmt = cls.from_mask(mask)
        return fmt, fmt.gather(weight)

    @classmethod
    def from_rows_col(cls, out_features: int, in_features: int, rows: torch.Tensor, col: torch.Tensor) -> "ELLWeight":
        """Rebuild the index (the CSR view with its transpose) from ``rows``/``col``, e.g. from a checkpoint.

        Raises:
            TypeError: ``rows``/``col`` are not int32 tensors.
            ValueError: a shape, range or order that breaks the layout.
        """
        for name, t, dim in (("rows", rows, 1), ("col", col, 2)):
            if not isinstance(t, torch.Tensor):
                raise TypeError(f"{name}: expected a torch.Tensor, got {type(t).__name__}")
            if t.dtype != INDEX_DTYPE:
                raise TypeError(f"{name}: expected dtype {INDEX_DTYPE}, got {t.dtype}")
            if t.dim() != dim:
                raise ValueError(f"{name}: expected a {dim}-D tensor, got shape {tuple(t.shape)}")
        a, k = col.shape
        if rows.numel() != a:
            raise ValueError(f"rows: expected {a} entries (one per row of col [a, k]), got {rows.numel()}")
        if a == 0 or k == 0:
            raise ValueError(f"col: expected at least one row of k >= 1 weights, got shape {tuple(col.shape)}")
        r = rows.long()
        if int(r.min()) < 0 or int(r.max()) >= out_features:
            raise ValueError(f"rows: entries must lie in [0, {out_features}), got [{int(r.min())}, {int(r.max())}]")
        if a > 1 and bool((r[1:] <= r[:-1]).any()):
            raise ValueError("rows: must be strictly ascending")
        counts = torch.zeros(out_features, dtype=torch.int64, device=rows.device)
        counts[r] = k
        crow = torch.zeros(out_features + 1, dtype=torch.int64, device=rows.device)
        crow[1:] = torch.cumsum(counts, 0)
        csr = CSRWeight.from_crow_col(out_features, in_features, crow.to(INDEX_DTYPE), col.reshape(-1).contiguous())
        return cls(k, rows.contiguous(), csr)

    def gather(self, weight: torch.Tensor) -> torch.Tensor:
        """``values [a, k]`` of a dense ``weight [out, in]``."""
        return self.csr.gather(weight).view(self.values_shape)

    def to_mask(self) -> torch.Tensor:
        """The bool pattern ``[out, in]``."""
        return self.csr.to_mask()

    def to_dense(self, values: torch.Tensor) -> torch.Tensor:
        """Scatter ``values [a, k]`` into a dense ``[out, in]`` weight, zeros off the mask."""
        return self.csr.to_dense(values.reshape(-1))

    def to(self, device: torch.device | str) -> "ELLWeight":
        return ELLWeight(self.k, self.rows.to(device), self.csr.to(device))

    def validate(self) -> None:
        """Check every invariant a kernel relies on: the CSR view's, plus its agreement with ``rows`` and ``k``.

        Raises:
            TypeError, ValueError: as :func:`~sparseops.formats.validate_csr`, or rows/k that do not
            describe the CSR view's row lengths.
        """
        validate_csr(self.out_features, self.in_features, **self.csr.tensors())
        if not isinstance(self.rows, torch.Tensor) or self.rows.dtype != INDEX_DTYPE or self.rows.dim() != 1:
            raise TypeError(f"rows: expected a 1-D {INDEX_DTYPE} tensor, got {getattr(self.rows, 'dtype', None)}")
        counts = self.csr.crow.long().diff()
        expect = torch.zeros_like(counts)
        r = self.rows.long()
        if r.numel() and (int(r.min()) < 0 or int(r.max()) >= self.out_features):
            raise ValueError(f"rows: entries must lie in [0, {self.out_features})")
        if r.numel() > 1 and bool((r[1:] <= r[:-1]).any()):
            raise ValueError("rows: expected strictly ascending row indices (values [rows, k] follows them)")
        expect[r] = self.k
        if self.k < 1 or not torch.equal(counts, expect):
            raise ValueError(f"rows, k: the index's rows do not all hold k={self.k} weights where rows says, none elsewhere")
