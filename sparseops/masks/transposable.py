"""Transposable (bidirectional) N:M masks: N:M along rows and along columns at once.

A transposable mask lets the same sparse weight serve the forward pass (groups along the input
dim of ``W``) and the input-gradient pass (groups along the input dim of ``W^T``) on N:M
hardware. The math, the two solvers and measured quality are in ``docs/masks.md``.
"""

from __future__ import annotations

import functools
import itertools

import torch
import torch.nn.functional as F

from ._checks import check_mask, check_nm, check_weight, scores_of
from .nm import group_counts

# the exhaustive solver scores every maximal feasible block pattern: at most 186 for m = 4, but the
# count explodes with m (8 x 8 blocks with exactly 2 per row and column alone number about 1.9e8),
# so larger m goes to the greedy solver
_EXHAUSTIVE_MAX_M = 4
# largest intermediate, in elements, that one chunk of blocks may create
_CHUNK_ELEMS = 1 << 18
# NOTE: on a gaussian 1024x1024, 8 rounds reach the converged quality for 4:8 and 2:8 (~1-4 s on a
# 2-core box); for 8:16 they take ~35 s for +0.4 points, so above m = 8 swaps are opt-in
_DEFAULT_SWAPS = 8
_SWAP_MAX_M = 8
# finite stand-in for |inf| so that block sums never produce inf - inf
_BIG = 1e300


@functools.lru_cache(maxsize=None)
def _patterns(r: int, c: int, n: int, m: int) -> torch.Tensor:
    """Every maximal ``r x c`` 0/1 pattern with at most ``n`` ones per row and per column.

    Maximal: no further one can be added without breaking a row or column limit. Scores are
    ``>= 0``, so some maximal pattern is always optimal, and there are far fewer of them
    (2:4: 186 of 7343, 3:4: 184 of 41503). Returned embedded in ``m x m`` as ``[P, m * m]`` bool,
    ordered by number of ones (most first) and then with ones at lower flat indices first, so
    that argmax over tied block scores picks the fullest pattern and then the lowest indices.
    """
    # (built on the CPU whatever torch.set_default_device says: it is cached, and moved by the caller)
    with torch.device("cpu"):
        return _patterns_cpu(r, c, n, m)


def _patterns_cpu(r: int, c: int, n: int, m: int) -> torch.Tensor:
    # rows are subsets of the c columns with at most n ones; a pattern is r such rows whose
    # column sums stay <= n (at most 15^4 = 50625 candidates for m = 4, filtered in one go)
    opts = [s for k in range(min(n, c), -1, -1) for s in itertools.combinations(range(c), k)]
    row_vecs = torch.zeros(len(opts), m, dtype=torch.bool)
    for o, cols in enumerate(opts):
        row_vecs[o, list(cols)] = True
    grid = torch.cartesian_prod(*[torch.arange(len(opts))] * r).view(-1, r)  # [O^r, r]
    pats = torch.zeros(grid.shape[0], m, m, dtype=torch.bool)
    pats[:, :r] = row_vecs[grid]
    pats = pats[(pats.sum(1) <= n).all(1)]
    valid = torch.zeros(m, m, dtype=torch.bool)
    valid[:r, :c] = True
    room_r = pats.sum(2) < n  # [P, m]
    room_c = pats.sum(1) < n  # [P, m]
    addable = valid & ~pats & room_r[:, :, None] & room_c[:, None, :]
    flat = pats[~addable.flatten(1).any(1)].flatten(1)
    keys = sorted(range(flat.shape[0]), key=lambda i: (-int(flat[i].sum()), (~flat[i]).tolist()))
    return flat[keys]


def _solve_exhaustive(s: torch.Tensor, r: int, c: int, n: int, m: int) -> torch.Tensor:
    """Best feasible pattern per block by scoring all maximal ones: ``s`` ``[B, m*m]`` fp64 -> bool ``[B, m*m]``."""
    pats = _patterns(r, c, n, m).to(s.device)
    pf = pats.to(s.dtype).t()  # [m*m, P]
    out = torch.zeros(s.shape, dtype=torch.bool, device=s.device)
    step = max(1, _CHUNK_ELEMS // pats.shape[0])
    for lo in range(0, s.shape[0], step):
        out[lo : lo + step] = pats[(s[lo : lo + step] @ pf).argmax(-1)]
    return out


def _solve_greedy(s: torch.Tensor, r: int, c: int, n: int, m: int, swaps: int) -> torch.Tensor:
    """Greedy fill by descending score, then 2-swap hill climbing: ``[B, m*m]`` fp64 -> bool ``[B, m*m]``."""
    nb, dev = s.shape[0], s.device
    valid = torch.zeros(m, m, dtype=torch.bool, device=dev)
    valid[:r, :c] = True
    valid = valid.flatten()
    # padding must sort after every real entry and lose every swap
    s = s.masked_fill(~valid, -_BIG)
    order = torch.sort(s, dim=-1, descending=True, stable=True).indices  # [B, m*m]
    sel = torch.zeros(nb, m * m, dtype=torch.bool, device=dev)
    rowc = torch.zeros(nb, m, dtype=torch.int32, device=dev)
    colc = torch.zeros(nb, m, dtype=torch.int32, device=dev)
    for t in range(r * c):
        idx = order[:, t : t + 1]  # [B, 1]
        i, j = idx // m, idx % m
        ok = (rowc.gather(1, i) < n) & (colc.gather(1, j) < n)
        sel.scatter_(1, idx, ok)
        rowc.scatter_add_(1, i, ok.to(torch.int32))
        colc.scatter_add_(1, j, ok.to(torch.int32))
    if swaps > 0:
        _improve_2swap(s, sel, n, m, swaps)
    return sel


def _improve_2swap(s: torch.Tensor, sel: torch.Tensor, n: int, m: int, iters: int) -> None:
    """In place: per block, apply the best swap (i1,j1),(i2,j2) -> (i1,j2),(i2,j1) while it gains.

    A swap keeps every row and column count, so feasibility and greedy's maximality are kept.
    With ``d[i, j, j'] = s[i, j'] - s[i, j]`` (move row i's kept j to a free j') the swap gains
    ``d[i1, j1, j2] + d[i2, j2, j1]``: one broadcast over ``m^4`` per block and no gathers. The
    gain is exactly antisymmetric in floating point, so a swap and its undo never both win.
    """
    dev = s.device
    active = torch.arange(s.shape[0], device=dev)
    step = max(1, _CHUNK_ELEMS // m**4)
    for _ in range(iters):
        improved = []
        for lo in range(0, active.numel(), step):
            blk = active[lo : lo + step]
            sb, mb = s[blk].view(-1, m, m), sel[blk].view(-1, m, m)
            d = sb[:, :, None, :] - sb[:, :, :, None]  # [b, i, j, j']
            d = d.masked_fill(~(mb[:, :, :, None] & ~mb[:, :, None, :]), float("-inf"))
            # gain[b, i1, j1, i2, j2] = d[b, i1, j1, j2] + d[b, i2, j2, j1]
            gain = d[:, :, :, None, :] + d.permute(0, 3, 1, 2)[:, None]
            gain = gain.flatten(1)
            best = gain.argmax(-1)
            win = gain.gather(1, best[:, None]).squeeze(1) > 0
            if not win.any():
                continue
            best, rows = best[win], blk[win]
            i1, j1, i2, j2 = best // m**3, best // m**2 % m, best // m % m, best % m
            sel[rows, i1 * m + j1] = False
            sel[rows, i2 * m + j2] = False
            sel[rows, i1 * m + j2] = True
            sel[rows, i2 * m + j1] = True
            improved.append(rows)
        if not improved:
            return
        active = torch.cat(improved)


def transposable_nm(weight: torch.Tensor, n: int, m: int, *, method: str = "auto", swaps: int | None = None) -> torch.Tensor:
    """A mask that is N:M along the last dim and along the second-to-last dim, keeping as much ``|w|`` as it can.

    Every aligned ``m x m`` block is solved on its own: at most ``n`` kept per block row and per
    block column, maximising the kept ``sum |w|``. ``m <= 4`` is solved exactly by scoring every
    feasible block pattern; larger ``m`` by a greedy fill in descending ``|w|`` followed by 2-swap
    hill climbing. Dims that are not multiples of ``m`` are padded internally and the padding is
    never kept. Ties go to the lower index.

    Args:
        weight: floating tensor ``[..., out, in]``; leading dims are independent matrices.
        n: kept per block row and per block column, ``1 <= n < m``.
        m: block size, ``m <= 16``.
        method: ``"auto"`` (exhaustive for ``m <= 4``, else greedy), ``"exhaustive"`` or ``"greedy"``.
        swaps: rounds of 2-swap improvement after the greedy fill; None means 8 for ``m <= 8`` and
            0 above, where one round costs ``m^4`` per block (8:16 on 1024x1024: ~35 s vs 0.1 s).

    Returns:
        bool mask with ``weight``'s shape; ``is_transposable_nm(mask, n, m)`` holds: at most ``n`` per
        row and column of every block. The exhaustive solver keeps the most magnitude over the
        maximal feasible patterns, which are not all ``n``-regular: a full block can keep fewer than
        ``n`` in some rows (8 of the 256 blocks of one random 64x64 weight at 2:4, a density of
        0.498); the greedy one may also keep fewer where it gets stuck.

    Raises:
        TypeError: ``weight`` is not a floating tensor, or ``n``/``m``/``swaps`` are not ints.
        ValueError: ``n``/``m`` out of range, ``weight`` has fewer than 2 dims or holds NaN,
            ``method`` unknown or ``"exhaustive"`` with ``m > 4``, ``swaps < 0``.
    """
    w = check_weight(weight, min_dim=2)
    n, m = check_nm(n, m)
    if method not in ("auto", "exhaustive", "greedy"):
        raise ValueError(f"method: expected 'auto', 'exhaustive' or 'greedy', got {method!r}")
    if method == "exhaustive" and m > _EXHAUSTIVE_MAX_M:
        raise ValueError(f"method: 'exhaustive' needs m <= {_EXHAUSTIVE_MAX_M}, got m={m}")
    if swaps is None:
        swaps = _DEFAULT_SWAPS if m <= _SWAP_MAX_M else 0
    if isinstance(swaps, bool) or not isinstance(swaps, int):
        raise TypeError(f"swaps: expected an int, got {type(swaps).__name__}")
    if swaps < 0:
        raise ValueError(f"swaps: expected >= 0, got {swaps}")
    exhaustive = method == "exhaustive" or (method == "auto" and m <= _EXHAUSTIVE_MAX_M)
    if w.numel() == 0:
        return torch.zeros(w.shape, dtype=torch.bool, device=w.device)

    rows, cols = w.shape[-2:]
    pr, pc = -rows % m, -cols % m
    s = scores_of(w).to(torch.float64).nan_to_num(posinf=_BIG).reshape(-1, rows, cols)
    s = F.pad(s, (0, pc, 0, pr))  # [T, R, C] padded to multiples of m
    t, gr, gc = s.shape[0], s.shape[1] // m, s.shape[2] // m
    blocks = s.view(t, gr, m, gc, m).permute(0, 1, 3, 2, 4)  # [T, gr, gc, m, m]
    out = torch.zeros(blocks.shape, dtype=torch.bool, device=w.device)
    # the last block row / column may be partial; each of the (up to) four regions has one real size
    fr, fc = rows // m, cols // m
    for rs, r in ((slice(0, fr), m), (slice(fr, gr), rows - fr * m)):
        for cs, c in ((slice(0, fc), m), (slice(fc, gc), cols - fc * m)):
            region = blocks[:, rs, cs]
            if region.numel() == 0:
                continue
            flat = region.reshape(-1, m * m)
            if exhaustive:
                sol = _solve_exhaustive(flat, r, c, n, m)
            else:
                sol = _solve_greedy(flat, r, c, n, m, swaps)
            out[:, rs, cs] = sol.view(region.shape)
    out = out.permute(0, 1, 3, 2, 4).reshape(t, gr * m, gc * m)[:, :rows, :cols]
    return out.reshape(w.shape)


def is_transposable_nm(mask: torch.Tensor, n: int, m: int) -> bool:
    """Whether ``mask`` is N:M along its last dim and along its second-to-last dim.

    Equivalently: every aligned ``m x m`` block has at most ``n`` True in each of its rows and
    columns (partial edge blocks included).

    Args:
        mask: bool tensor ``[..., out, in]``.
        n: allowed True per group, ``1 <= n < m``.
        m: group size, ``m <= 16``.

    Returns:
        True when both orientations are N:M.

    Raises:
        TypeError: ``mask`` is not a bool tensor, or ``n``/``m`` are not ints.
        ValueError: ``n``/``m`` out of range or ``mask`` has fewer than 2 dims.
    """
    mask = check_mask(mask, min_dim=2)
    n, m = check_nm(n, m)
    if mask.numel() == 0:
        return True
    return bool((group_counts(mask, m) <= n).all() and (group_counts(mask.transpose(-1, -2), m) <= n).all())
