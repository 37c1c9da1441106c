"""Index work of mask updates on CSR weights: select by magnitude, sample free positions, re-pack.

Dynamic sparse training and pruning change a layer's structure every few hundred steps. These helpers
do it on the packed index, with no dense ``[out, in]`` mask: the C++ extension (``csrc/dst.cpp``) on
CPU, writing into tensors allocated here (torch owns every result), and the pure-torch code below
elsewhere (CUDA tensors, a build without C++), which is also the oracle of the tests. Positions are
flat, ``row * in_features + col``, int64 and ascending.

They are not ``torch.library`` ops: they run between training steps, under ``torch.no_grad``, and
nothing traces them.
"""

from __future__ import annotations

import torch
from torch import Tensor

from .._cpp import _C
from ..formats.csr import CSRWeight
from ..masks.magnitude import _keep_largest
from .csr import _CPU, _np, _threads


def _cpp(*tensors: Tensor) -> bool:
    return _C is not None and all(t.device.type == "cpu" for t in tensors)


def _mag_keys(s: Tensor) -> Tensor:
    """|s| as int64 keys ordered as the C++ ranks them: a float32's bits without the sign (nan above inf)."""
    return (s.contiguous().view(torch.int32).long() & 0x7FFFFFFF)


def _keys(fmt: CSRWeight) -> Tensor:
    return fmt.row.long() * fmt.in_features + fmt.col.long()


def top_abs(scores: Tensor, n: int, exclude: CSRWeight | None = None, eligible: Tensor | None = None) -> Tensor:
    """The flat positions (ascending) of the ``n`` largest ``|scores|`` of a 2-D ``scores``, leaving out the
    positions ``exclude`` stores and those where the bool ``eligible`` (``scores``' shape) is False. Ties go
    to the lower position; nan ranks above everything (NaNs among themselves by their bits). Scores are
    ranked in float32.

    Raises:
        ValueError: ``n`` is negative or more than the eligible entries.
    """
    rows, cols = scores.shape
    s = scores.detach().to(torch.float32).contiguous()
    if eligible is not None:
        eligible = eligible.to(device=s.device, dtype=torch.bool).reshape(rows, cols).contiguous()
    if _cpp(s, *(() if exclude is None else (exclude.col,)), *(() if eligible is None else (eligible,))):
        ex = (None, None) if exclude is None else (_np(exclude.crow), _np(exclude.col))
        el = None if eligible is None else _np(eligible)
        if n < 0:
            raise ValueError(f"n: expected 0 <= n (the eligible entries), got {n}")
        out = torch.empty(n, dtype=torch.int64, device=_CPU)
        _C.dst_top_abs(_np(s), *ex, n, _threads(rows * cols), el, _np(out))
        return out
    a = _mag_keys(s).flatten()
    if exclude is not None:
        a[_keys(exclude).to(a.device)] = -1
    if eligible is not None:
        a[~eligible.flatten()] = -1
    count = int((a >= 0).sum())
    if not 0 <= n <= count:
        raise ValueError(f"n: expected 0 <= n <= {count} (the eligible entries), got {n}")
    return _keep_largest(a, n).nonzero().flatten()


def top_abs_rows(scores: Tensor, fmt: CSRWeight, keep: Tensor, need: Tensor) -> Tensor:
    """Row ``r`` gets ``need[r]`` flat positions: its largest ``|scores|`` among the positions ``fmt`` does not
    store, then (when those run out) among its stored entries whose ``keep`` flag is False. Ties to the
    lower column; the result is ascending.

    Args:
        scores: ``[out, in]``; fmt: the layer's index; keep: bool ``[nnz]``; need: int ``[out]``.
    """
    rows, cols = scores.shape
    ptr = torch.zeros(rows + 1, dtype=torch.int64, device=need.device)
    ptr[1:] = torch.cumsum(need.long(), 0)
    s = scores.detach().to(torch.float32).contiguous()
    if _cpp(s, fmt.col, keep, need):
        out = torch.empty(max(int(ptr[-1]), 0), dtype=torch.int64, device=_CPU)  # a bad need is refused by the binding
        _C.dst_top_abs_rows(_np(s), _np(fmt.crow), _np(fmt.col), _np(keep.contiguous()), _np(ptr),
                            _threads(rows * cols), _np(out))
        return out
    kept_rows = torch.bincount(fmt.row.long()[keep.to(fmt.device)], minlength=rows).to(need.device)
    bad = (need < 0) | (need > cols - kept_rows)
    if bool(bad.any()):
        r = int(bad.nonzero()[0, 0])
        raise ValueError(f"need: row {r} asks for {int(need[r])} positions, expected 0..{cols - int(kept_rows[r])} "
                         "(its columns not kept)")
    # the reference: a free position ranks by its key + 2^31 (above every dropped one), a dropped one by
    # its key, a kept one -1; each row sorted (stable: ties keep the lower column first) and cut at need
    a = _mag_keys(s) + (1 << 31)
    flat = a.view(-1)
    keys = _keys(fmt).to(a.device)
    flat[keys] = torch.where(keep.to(a.device), torch.full_like(flat[keys], -1), flat[keys] - (1 << 31))
    order = torch.sort(a, dim=1, descending=True, stable=True).indices
    take = torch.arange(cols, device=a.device)[None, :] < need.to(a.device).long()[:, None]
    chosen = torch.where(take, order, torch.full_like(order, cols))  # cols: not chosen, sorts last
    chosen = torch.sort(chosen, dim=1).values
    pos = chosen + torch.arange(rows, device=a.device)[:, None] * cols
    return pos[chosen < cols]


def count_off_kept(fmt: CSRWeight, keep: Tensor, pos: Tensor) -> Tensor:
    """Per row of ``fmt``: how many of the flat positions ``pos`` (ascending) in it are not a stored entry
    whose ``keep [nnz]`` flag is set (int64 ``[out]``)."""
    rows, cols = fmt.shape
    if _cpp(fmt.col, keep, pos):
        out = torch.empty(rows, dtype=torch.int64, device=_CPU)
        _C.dst_count_off_kept(rows, cols, _np(fmt.crow), _np(fmt.col), _np(keep.contiguous()), _np(pos.contiguous()),
                              _threads(fmt.nnz + pos.numel()), _np(out))
        return out
    _check_positions("pos", pos, rows * cols)
    kept_keys = _keys(fmt)[keep.to(fmt.device)]
    hit = torch.isin(pos.to(fmt.device), kept_keys)
    return torch.bincount(pos.to(fmt.device)[~hit] // cols, minlength=rows)


def gather(src: Tensor, tensors: list[Tensor]) -> list[Tensor]:
    """``t[src]`` for each ``t`` (all laid out like the old ``values``), with 0 where ``src`` is -1: the old
    tensors re-laid on the new positions (``src`` from :func:`repack`), in one pass over ``src`` on CPU."""
    fp32 = [i for i, t in enumerate(tensors) if t.dtype == torch.float32 and t.dim() == 1]
    out: list = [None] * len(tensors)
    if fp32 and _cpp(src, *(tensors[i] for i in fp32)) and src.dtype == torch.int32:
        res = [torch.empty(src.numel(), dtype=torch.float32, device=_CPU) for _ in fp32]
        _C.dst_gather(_np(src.contiguous()), [_np(tensors[i].contiguous()) for i in fp32],
                      _threads(src.numel() * len(fp32)), [_np(t) for t in res])
        for i, t in zip(fp32, res):
            out[i] = t
    for i, t in enumerate(tensors):
        if out[i] is None:
            s = src.to(t.device).long()
            out[i] = torch.where(s >= 0, t[s.clamp(min=0)], torch.zeros((), dtype=t.dtype, device=t.device))
    return out


def sample_off(fmt: CSRWeight, n: int, generator: torch.Generator | None = None) -> Tensor:
    """``n`` distinct flat positions that ``fmt`` does not store, uniformly at random, ascending.

    The C++ path draws from a seed taken from ``generator`` (or torch's default one), so a seeded
    generator gives the same positions again.

    Raises:
        ValueError: ``n`` is negative or more than the free positions.
    """
    rows, cols = fmt.shape
    free = rows * cols - fmt.nnz
    if not 0 <= n <= free:
        raise ValueError(f"n: expected 0 <= n <= {free} (the free positions), got {n}")
    seed = int(torch.randint(0, 2**62, (1,), generator=generator,
                             device=_CPU if generator is None else generator.device).item())
    if _cpp(fmt.col):
        out = torch.empty(n, dtype=torch.int64, device=_CPU)
        _C.dst_sample_off(rows, cols, _np(fmt.crow), _np(fmt.col), n, seed, _np(out), _threads(rows * cols))
        return out
    held = torch.zeros(rows * cols, dtype=torch.bool, device=_CPU)
    held[_keys(fmt).cpu()] = True
    g = torch.Generator(device=_CPU).manual_seed(seed)
    chosen = torch.empty(0, dtype=torch.int64, device=_CPU)
    while chosen.numel() < n:  # rejection: no random number per position
        draw = torch.randint(rows * cols, (2 * (n - chosen.numel()) + 64,), generator=g, device=_CPU)
        chosen = torch.unique(torch.cat([chosen, draw[~held[draw]]]))
    pick = torch.randperm(chosen.numel(), generator=g, device=_CPU)[:n]
    return chosen[pick].sort().values.to(fmt.device)


def repack(fmt: CSRWeight, kept: Tensor, grown: Tensor, remap: list[Tensor] | None = None):
    """The index of the entries at positions ``kept`` (ascending indices into ``values``) plus new entries at
    the flat positions ``grown`` (ascending), both orientations built in one pass, and ``src [nnz']`` (int32):
    the old position of each new entry, -1 for a grown one.

    With ``remap`` (tensors laid out like the old ``values``) it returns ``(index, src, remapped)``, where
    ``remapped`` is :func:`gather` of them through ``src``; on CPU the float32 ones are re-mapped inside the
    re-pack's merge (no second pass over ``src``). Without it, ``(index, src)``.

    Raises:
        ValueError: ``kept``/``grown`` out of range, not strictly ascending, or a grown position that is
            also a kept one.
    """
    rows, cols = fmt.shape
    if _cpp(fmt.col, kept, grown):
        nn = kept.numel() + grown.numel()
        if nn > torch.iinfo(torch.int32).max:
            raise ValueError(f"kept, grown: {nn} entries exceed the int32 index limit")
        out = [torch.empty(k, dtype=torch.int32, device=_CPU) for k in (rows + 1, nn, nn, cols + 1, nn, nn, nn)]
        fused = [] if remap is None else [
            i for i, t in enumerate(remap)
            if t.dtype == torch.float32 and t.dim() == 1 and t.numel() == fmt.nnz and _cpp(t)]
        xs = [remap[i].contiguous() for i in fused]
        outs = [torch.empty(nn, dtype=torch.float32, device=_CPU) for _ in fused]
        _C.dst_csr_repack(rows, cols, _np(fmt.crow), _np(fmt.col), _np(kept.contiguous()), _np(grown.contiguous()),
                          _threads(fmt.nnz), [_np(t) for t in out], [_np(t) for t in xs] if fused else None,
                          [_np(t) for t in outs] if fused else None, scratch=True)  # ours: dropped on an error
        crow, col, row, t_crow, t_row, t_perm, src = out
        new = CSRWeight(rows, cols, crow, col, row, t_crow, t_row, t_perm)
        if remap is None:
            return new, src
        done = dict(zip(fused, outs))
        rest = [i for i in range(len(remap)) if i not in done]
        for i, t in zip(rest, gather(src, [remap[i] for i in rest])):
            done[i] = t
        return new, src, [done[i] for i in range(len(remap))]
    _check_positions("kept", kept, fmt.nnz)
    _check_positions("grown", grown, rows * cols)
    old = _keys(fmt)[kept.long().to(fmt.device)]
    grown = grown.long().to(fmt.device)
    keys, order = torch.sort(torch.cat([old, grown]), stable=True)
    if keys.numel() > 1 and bool((keys[1:] == keys[:-1]).any()):
        raise ValueError("grown: a grown position is also a kept one")
    src = torch.cat([kept.long().to(fmt.device), torch.full_like(grown, -1)])[order].to(torch.int32)
    new = CSRWeight._build(rows, cols, keys // cols, keys % cols)
    return (new, src) if remap is None else (new, src, gather(src, list(remap)))


def _check_positions(name: str, p: Tensor, limit: int) -> None:
    if p.dtype != torch.int64 or p.dim() != 1:
        raise TypeError(f"{name}: expected a 1-D int64 tensor, got {p.dtype} of shape {tuple(p.shape)}")
    if p.numel() and (int(p.min()) < 0 or int(p.max()) >= limit):
        raise ValueError(f"{name}: positions must lie in [0, {limit})")
    if p.numel() > 1 and bool((p[1:] <= p[:-1]).any()):
        raise ValueError(f"{name}: positions must be strictly increasing")

