"""N:M weight format: at most ``n`` nonzeros in every ``m`` consecutive weights of a row.

A weight ``W [out, in]`` has ``G = ceil(in / m)`` groups and ``S = G * n`` slots per row:

- ``values [out, S]`` (the trainable parameter, kept by the layer): slot ``j`` of row ``o`` holds
  ``W[o, (j // n) * m + pos]``.
- ``idx [out, ceil(S / 2)]`` uint8: the 4-bit in-group positions ``pos``, two a byte (slot ``j`` in
  the low nibble when ``j`` is even). Half a byte per stored weight, against 4 for a CSR column
  index: a 2:4 fp32 weight moves 4.5 bytes per stored value instead of 8.
- ``empty [E]`` int64: flat slot numbers (``o * S + j``) that hold no weight, when a group has fewer
  than ``n`` nonzeros (a hand-made mask, or a last group narrower than ``n``). Their value is zero,
  their position is the smallest one unused in the group, and the weight gradient is zeroed there,
  so they stay zero. Positions within a group are strictly increasing.
- Columns ``in .. G*m`` are padding: only empty slots may point there, and kernels read zeros.

The input gradient ``dx = dy W`` needs ``Wᵀ``:

- any N:M weight: ``t_crow [in+1]``, ``t_row [nnz]``, ``t_perm [nnz]``, the CSR of ``Wᵀ`` over the
  real nonzeros, with ``t_perm`` the flat slot of each in ``values``;
- a transposable weight (N:M along the columns too, BDWP): ``t_idx [in, ceil(S_t / 2)]`` and
  ``t_slot [in, S_t]`` (``S_t = ceil(out / m) * n``), ``Wᵀ`` in this same format with its values
  read through ``t_slot`` (``-1`` for an empty slot), so that ``dx`` runs on the N:M kernel.

Only ``idx`` and ``empty`` are checkpointed; the rest is rebuilt from them.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from .csr import INDEX_DTYPE, check_weight_and_mask

_INDEX_NAMES = ("idx", "empty", "t_crow", "t_row", "t_perm", "t_idx", "t_slot")


def _check_nm(n, m) -> tuple[int, int]:
    for name, v in (("n", n), ("m", m)):
        if isinstance(v, bool) or not isinstance(v, int):
            raise TypeError(f"{name}: expected an int, got {type(v).__name__}")
    if not (1 <= n < m <= 16):
        raise ValueError(f"n: expected 1 <= n < m <= 16, got n={n}, m={m}")
    return n, m


def slots_per_row(in_features: int, n: int, m: int) -> int:
    return -(-in_features // m) * n


def pack_positions(pos: torch.Tensor) -> torch.Tensor:
    """``[R, S]`` positions in [0, 16) -> ``[R, ceil(S / 2)]`` uint8, even slots in the low nibble."""
    p = pos.to(torch.uint8)
    if p.shape[1] % 2:
        p = F.pad(p, (0, 1))
    return (p[:, 0::2] | (p[:, 1::2] << 4)).contiguous()


def unpack_positions(idx: torch.Tensor, slots: int) -> torch.Tensor:
    """Inverse of :func:`pack_positions`: ``[R, slots]`` int64."""
    lo, hi = (idx & 15).long(), (idx >> 4).long()
    return torch.stack((lo, hi), dim=2).reshape(idx.shape[0], 2 * idx.shape[1])[:, :slots]


def _cumsum_m(t: torch.Tensor) -> torch.Tensor:
    """Inclusive cumsum over the last (short, m <= 16) dim as m slice adds: torch's cumsum over a
    4-wide last dim of a 4096x11008 mask took 0.5 s, the slices a few ms each."""
    out = torch.empty_like(t)
    out[..., 0] = t[..., 0]
    for p in range(1, t.shape[-1]):
        torch.add(out[..., p - 1], t[..., p], out=out[..., p])
    return out


def _select(mask: torch.Tensor, n: int, m: int):
    """The slot layout of a mask ``[R, K]``: ``(mg [R, G, m], sel, srank)``.

    A group's slots hold its kept positions and then the smallest unused ones, all ascending:
    ``sel`` marks the ``n`` selected positions of each group and ``srank`` (int16) is each selected
    position's slot within the group. Elementwise work over slices of ``m``: no sort.
    """
    R, K = mask.shape
    G = -(-K // m)
    mg = F.pad(mask, (0, G * m - K)).view(R, G, m)
    kept = _cumsum_m(mg.to(torch.int16))  # kept positions up to and including p
    cnt = kept[:, :, -1:]  # kept in the group (<= n)
    ar = torch.arange(1, m + 1, device=mask.device, dtype=torch.int16)
    # an unused position is selected while the unused ones up to it fill the group's n - cnt free slots
    sel = mg | ((ar - kept) <= (n - cnt))
    srank = _cumsum_m(sel.to(torch.int16)).sub_(1)
    return mg, sel, srank


def _slots_of(mask: torch.Tensor, n: int, m: int, layout=None):
    """Positions ``[R, G, n]`` (int64, ascending per group) and their validity for a mask ``[R, K]``."""
    mg, sel, srank = layout if layout is not None else _select(mask, n, m)
    R, G, _ = mg.shape
    pos = torch.zeros(R, G, n, dtype=torch.int64, device=mask.device)
    # slot j holds the selected position whose rank is j: exactly one per (group, j)
    slot = torch.arange(n, device=mask.device, dtype=torch.int16)
    for p in range(1, m):  # position 0 adds nothing
        hit = sel[:, :, p : p + 1] & (srank[:, :, p : p + 1] == slot)
        pos.add_(hit.to(torch.int64) * p)
    return pos, mg.gather(2, pos)


@dataclass(frozen=True)
class NMWeight:
    """Index tensors of an N:M weight ``[out, in]``; see the module docstring for the layout."""

    out_features: int
    in_features: int
    n: int
    m: int
    transposable: bool
    idx: torch.Tensor
    empty: torch.Tensor
    t_crow: torch.Tensor
    t_row: torch.Tensor
    t_perm: torch.Tensor
    t_idx: torch.Tensor
    t_slot: torch.Tensor

    @property
    def slots(self) -> int:
        return slots_per_row(self.in_features, self.n, self.m)

    @property
    def nnz(self) -> int:
        return self.out_features * self.slots - int(self.empty.numel())

    @property
    def shape(self) -> tuple[int, int]:
        return (self.out_features, self.in_features)

    @property
    def device(self) -> torch.device:
        return self.idx.device

    @classmethod
    def from_mask(cls, mask: torch.Tensor, n: int, m: int, transposable: bool = False) -> "NMWeight":
        """Build the index of a bool mask ``[out, in]`` that is N:M along its rows (and columns if transposable).

        Raises:
            TypeError: ``mask`` is not a bool tensor, or ``n``/``m`` are not ints.
            ValueError: ``mask`` is not 2-D, or breaks the pattern.
        """
        from ..masks.nm import is_nm  # masks import formats' neighbours only at call time

        n, m = _check_nm(n, m)
        if not isinstance(mask, torch.Tensor):
            raise TypeError(f"mask: expected a torch.Tensor, got {type(mask).__name__}")
        if mask.dtype != torch.bool:
            raise TypeError(f"mask: expected dtype torch.bool, got {mask.dtype}")
        if mask.dim() != 2:
            raise ValueError(f"mask: expected a 2-D [out, in] tensor, got shape {tuple(mask.shape)}")
        if not is_nm(mask, n, m):
            raise ValueError(f"mask: has more than n={n} nonzeros in some group of m={m} consecutive inputs of a row")
        if transposable and not is_nm(mask.t(), n, m):
            raise ValueError(
                f"mask: is {n}:{m} along rows but not along columns, so it is not transposable "
                f"(use sparseops.masks.transposable_nm)"
            )
        out_f, in_f = mask.shape
        dev = mask.device
        layout = _select(mask, n, m)
        pos, valid = _slots_of(mask, n, m, layout)
        S = pos.shape[1] * n
        flat_valid = valid.reshape(out_f, S)
        empty = (~flat_valid).reshape(-1).nonzero().flatten()
        idx = pack_positions(pos.reshape(out_f, S))
        # the slot of every position (r, c): r * S + (c // m) * n + its rank among the group's
        # slots (read on the mask only); int32 where the slot count allows
        sdt = torch.int32 if out_f * S < 2**31 else torch.int64
        slot_of = (layout[2].reshape(out_f, pos.shape[1] * m)[:, :in_f].to(sdt)
                   + (torch.arange(in_f, device=dev, dtype=sdt) // m * n).view(1, -1)
                   + (torch.arange(out_f, device=dev, dtype=sdt) * S).view(-1, 1))

        # the nonzeros of Wᵀ in its row-major order are W's sorted by column, then row: t_row and
        # t_perm straight from mask.t(), with no sort
        tc, tr = mask.t().nonzero(as_tuple=True)  # tc: column of W (row of Wᵀ), tr: row of W
        t_crow = torch.zeros(in_f + 1, dtype=torch.int64, device=dev)
        t_crow[1:] = torch.cumsum(torch.bincount(tc, minlength=in_f), 0)
        t_row, t_perm = tr, slot_of.t()[mask.t()]
        if transposable:
            tpos, tvalid = _slots_of(mask.t(), n, m)
            St = tpos.shape[1] * n
            t_idx = pack_positions(tpos.reshape(in_f, St))
            tcols = (torch.arange(tpos.shape[1], device=dev).view(1, -1, 1) * m + tpos).reshape(in_f, St)
            # padded rows of Wᵀ (columns of W >= out) are never valid slots
            t_slot = torch.full((in_f, St), -1, dtype=torch.int64, device=dev)
            ti, tj = tvalid.reshape(in_f, St).nonzero(as_tuple=True)
            t_slot[ti, tj] = slot_of[tcols[ti, tj], ti].long()
        else:
            t_idx = torch.zeros(0, 0, dtype=torch.uint8, device=dev)
            t_slot = torch.zeros(0, 0, dtype=torch.int64, device=dev)
        return cls(
            out_features=out_f,
            in_features=in_f,
            n=n,
            m=m,
            transposable=bool(transposable),
            idx=idx,
            empty=empty,
            t_crow=t_crow.to(INDEX_DTYPE),
            t_row=t_row.to(INDEX_DTYPE),
            t_perm=t_perm.to(INDEX_DTYPE),
            t_idx=t_idx,
            t_slot=t_slot.to(INDEX_DTYPE).contiguous(),
        )

    @classmethod
    def from_dense(
        cls, weight: torch.Tensor, mask: torch.Tensor, n: int, m: int, transposable: bool = False
    ) -> tuple["NMWeight", torch.Tensor]:
        """Pack a dense weight ``[out, in]`` on ``mask``; returns ``(index, values [out, S])``."""
        check_weight_and_mask(weight, mask)
        fmt = cls.from_mask(mask, n, m, transposable)
        return fmt, fmt.gather(weight)

    @classmethod
    def from_idx(
        cls, out_features: int, in_features: int, n: int, m: int, idx: torch.Tensor, empty: torch.Tensor,
        transposable: bool = False,
    ) -> "NMWeight":
        """Rebuild the full index from the checkpointed ``idx``/``empty`` (validated).

        Raises:
            TypeError, ValueError: a dtype, shape, position or empty slot that breaks the layout.
        """
        n, m = _check_nm(n, m)
        S = slots_per_row(in_features, n, m)
        if not isinstance(idx, torch.Tensor) or idx.dtype != torch.uint8:
            raise TypeError(f"idx: expected a uint8 tensor, got {getattr(idx, 'dtype', type(idx).__name__)}")
        if tuple(idx.shape) != (out_features, (S + 1) // 2):
            raise ValueError(f"idx: expected shape ({out_features}, {(S + 1) // 2}), got {tuple(idx.shape)}")
        if not isinstance(empty, torch.Tensor) or empty.dtype != torch.int64 or empty.dim() != 1:
            raise TypeError("empty: expected a 1-D int64 tensor")
        if empty.numel() and (int(empty.min()) < 0 or int(empty.max()) >= out_features * S):
            raise ValueError(f"empty: slot numbers must lie in [0, {out_features * S})")
        mask = _mask_of(out_features, in_features, n, m, idx, empty, check=True)
        fmt = cls.from_mask(mask, n, m, transposable)
        if not (torch.equal(fmt.idx, idx) and torch.equal(fmt.empty, torch.unique(empty))):
            raise ValueError("idx: positions must be strictly increasing within each group, and empty slots must take "
                             "the smallest positions unused in their group")
        return fmt

    def validate(self) -> None:
        """Check every invariant a kernel relies on, for a hand-built index: ``idx``/``empty`` as
        :meth:`from_idx` checks them, and every derived tensor equal to the one they imply.

        Raises:
            TypeError, ValueError: a dtype, shape, position, empty slot or derived tensor that breaks the layout.
        """
        ref = NMWeight.from_idx(self.out_features, self.in_features, self.n, self.m, self.idx, self.empty,
                                self.transposable)
        for name in _INDEX_NAMES[1:]:
            t, want = getattr(self, name), getattr(ref, name)
            if not (isinstance(t, torch.Tensor) and t.dtype == want.dtype and t.shape == want.shape
                    and torch.equal(t, want)):
                raise ValueError(f"{name}: does not match the index that idx/empty describe (rebuild it with "
                                 "NMWeight.from_idx)")

    def columns(self) -> torch.Tensor:
        """The column of every slot, ``[out, S]`` int64 (columns ``>= in`` only for empty slots)."""
        return _columns(self.idx, self.slots, self.n, self.m)

    def gather(self, weight: torch.Tensor) -> torch.Tensor:
        """``values [out, S]`` of a dense ``weight [out, in]`` (zero at empty slots)."""
        w = F.pad(weight, (0, -(-self.in_features // self.m) * self.m - self.in_features))
        v = w.gather(1, self.columns()).contiguous()
        if self.empty.numel():
            v.view(-1)[self.empty] = 0
        return v

    def to_mask(self) -> torch.Tensor:
        """The bool pattern ``[out, in]``."""
        return _mask_of(self.out_features, self.in_features, self.n, self.m, self.idx, self.empty)

    def to_dense(self, values: torch.Tensor) -> torch.Tensor:
        """Scatter ``values [out, S]`` into a dense ``[out, in]`` weight (differentiable), zeros off the mask."""
        Kp = -(-self.in_features // self.m) * self.m
        v = values
        if self.empty.numel():
            keep = torch.ones(v.numel(), dtype=v.dtype, device=v.device)
            keep[self.empty] = 0
            v = v * keep.view_as(v)
        dense = torch.zeros(self.out_features, Kp, dtype=values.dtype, device=values.device)
        return dense.scatter(1, self.columns(), v)[:, : self.in_features]

    def tensors(self) -> dict[str, torch.Tensor]:
        return {name: getattr(self, name) for name in _INDEX_NAMES}

    def to(self, device) -> "NMWeight":
        return NMWeight(self.out_features, self.in_features, self.n, self.m, self.transposable,
                        **{k: v.to(device) for k, v in self.tensors().items()})


def _columns(idx: torch.Tensor, S: int, n: int, m: int) -> torch.Tensor:
    pos = unpack_positions(idx, S)
    return torch.arange(S, device=idx.device).div(n, rounding_mode="floor").mul(m).view(1, -1) + pos


def _mask_of(out_f, in_f, n, m, idx, empty, check: bool = False) -> torch.Tensor:
    S = slots_per_row(in_f, n, m)
    cols = _columns(idx, S, n, m)
    valid = torch.ones(out_f * S, dtype=torch.bool, device=idx.device)
    valid[empty] = False
    valid = valid.view(out_f, S)
    if check:
        if bool((unpack_positions(idx, S) >= m).any()):
            raise ValueError(f"idx: positions must lie in [0, m={m})")
        if bool((valid & (cols >= in_f)).any()):
            raise ValueError(f"idx: a non-empty slot points past in_features={in_f}")
    Kp = -(-in_f // m) * m
    mask = torch.zeros(out_f, Kp, dtype=torch.bool, device=idx.device)
    mask.scatter_(1, cols, valid)
    return mask[:, :in_f]
