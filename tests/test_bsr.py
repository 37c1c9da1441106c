"""Block-sparse (BSR) weights on CPU: the BSRWeight format, the ops (torch.ops.sparseops.bsr_dds / bsr_dsd /
bsr_sdd) against fp64 dense math, the C++ binding's validation, SparseLinear(pattern=Block(...) or Butterfly(...)),
sparsify_, and the block masks (block_magnitude, flat_block_butterfly, is_block_sparse).

fp32 goes through the C++ kernels (both ISA paths); other dtypes through the reference. Every reference here is
built independently of the code under test: block masks are expanded, values gathered and dense weights scattered
by index arithmetic written in this file, and the products are dense fp64 matmuls.
"""

import copy

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from helpers import assert_close_rms, guard_dtype_route
from torch import nn

import sparseops
import sparseops.ops.bsr as ops_bsr
import sparseops.reference.bsr as reference_bsr
from sparseops import Block, Butterfly, SparseLinear, sparsify_
from sparseops._cpp import _C
from sparseops.formats import BSRWeight
from sparseops.masks import block_magnitude, flat_block_butterfly, is_block_sparse
from sparseops.patterns import as_pattern

OPS = torch.ops.sparseops

needs_cpp = pytest.mark.skipif(_C is None, reason="sparseops._C is not built")

BLOCKS = (8, 16, 32, 64)


# ---- independent helpers: the layout as documented in formats/bsr.py, in plain index arithmetic ----


def _grid(out_f, in_f, b):
    return -(-out_f // b), -(-in_f // b)


def _block_mask(nbr, nbc, kind):
    """A bool block mask ``[nbr, nbc]``.

    ``float``: each block kept with that probability; ``full``/``empty``: all / none; ``holed``: ~60% with every
    third block row and the second block column empty (block row 0 full apart from that column).
    """
    if kind == "full":
        return torch.ones(nbr, nbc, dtype=torch.bool)
    if kind == "empty":
        return torch.zeros(nbr, nbc, dtype=torch.bool)
    if kind == "holed":
        m = torch.rand(nbr, nbc) < 0.6
        m[0] = True
        m[1::3] = False
        if nbc > 1:
            m[:, 1] = False
        return m
    return torch.rand(nbr, nbc) < kind


def _expand(bmask, out_f, in_f, b):
    """Element mask ``[out, in]`` of a block mask: entry (r, c) is on iff block (r // b, c // b) is."""
    r = torch.arange(out_f) // b
    c = torch.arange(in_f) // b
    return bmask[r[:, None], c[None, :]]


def _index(bmask):
    """``crow, col, row, t_crow, t_row, t_perm`` (int32) of a block mask, with python loops."""
    nbr, nbc = bmask.shape
    crow, col, row = [0], [], []
    for r in range(nbr):
        for c in range(nbc):
            if bmask[r, c]:
                col.append(c)
                row.append(r)
        crow.append(len(col))
    pos = {(r, c): k for k, (r, c) in enumerate(zip(row, col))}
    t_crow, t_row, t_perm = [0], [], []
    for c in range(nbc):
        for r in range(nbr):
            if bmask[r, c]:
                t_row.append(r)
                t_perm.append(pos[(r, c)])
        t_crow.append(len(t_row))
    i32 = lambda v: torch.tensor(v, dtype=torch.int32)  # noqa: E731
    return {"crow": i32(crow), "col": i32(col), "row": i32(row), "t_crow": i32(t_crow), "t_row": i32(t_row),
            "t_perm": i32(t_perm)}


def _padded(w, b):
    """``w [out, in]`` zero-padded to whole blocks."""
    nbr, nbc = _grid(*w.shape, b)
    p = torch.zeros(nbr * b, nbc * b, dtype=w.dtype)
    p[: w.shape[0], : w.shape[1]] = w
    return p


def _gather(w, idx, b):
    """``values [nblk, b, b]``: block k is the padded ``w``'s block at (row[k], col[k])."""
    p = _padded(w, b)
    blocks = [p[r * b:(r + 1) * b, c * b:(c + 1) * b] for r, c in zip(idx["row"].tolist(), idx["col"].tolist())]
    return torch.stack(blocks) if blocks else torch.zeros(0, b, b, dtype=w.dtype)


def _scatter(values, idx, out_f, in_f, b):
    """The dense ``[out, in]`` weight of ``values`` (padding cut)."""
    nbr, nbc = _grid(out_f, in_f, b)
    p = torch.zeros(nbr * b, nbc * b, dtype=values.dtype)
    for k, (r, c) in enumerate(zip(idx["row"].tolist(), idx["col"].tolist())):
        p[r * b:(r + 1) * b, c * b:(c + 1) * b] = values[k]
    return p[:out_f, :in_f]


def _pad_mask(idx, out_f, in_f, b):
    """Bool ``[nblk, b, b]``: True where block k's entry lies inside ``[out, in]``."""
    i = torch.arange(b)
    r = idx["row"].long()[:, None, None] * b + i[None, :, None]
    c = idx["col"].long()[:, None, None] * b + i[None, None, :]
    return (r < out_f) & (c < in_f)


def _base_butterfly(n, k):
    """The documented base pattern: (i, j) on iff i XOR j is 0 or one of 1, 2, 4, ..., 2**(k-1)."""
    allowed = {0} | {1 << f for f in range(k)}
    return np.array([[(i ^ j) in allowed for j in range(n)] for i in range(n)], dtype=bool)


def _brute_butterfly(out_f, in_f, n, k, b, global_size=0, base=None):
    """flat_block_butterfly by its documented math, one element and one block at a time."""
    base = _base_butterfly(n, k) if base is None else base
    full = np.zeros((out_f, in_f), dtype=bool)
    for r in range(out_f):
        for c in range(in_f):
            full[r, c] = base[(r * n) // out_f, (c * n) // in_f] or r < global_size or c < global_size
    nbr, nbc = _grid(out_f, in_f, b)
    out = np.zeros((out_f, in_f), dtype=bool)
    for br in range(nbr):
        for bc in range(nbc):
            sl = (slice(br * b, (br + 1) * b), slice(bc * b, (bc + 1) * b))
            out[sl] = full[sl].any()
    return torch.from_numpy(out)


def _brute_block_magnitude(w, sparsity, b):
    """Keep the ``nblk - round(sparsity * nblk)`` blocks of largest Frobenius norm (loops, fp64)."""
    out_f, in_f = w.shape
    nbr, nbc = _grid(out_f, in_f, b)
    norms = []
    for br in range(nbr):
        for bc in range(nbc):
            blk = w[br * b:(br + 1) * b, bc * b:(bc + 1) * b].double()
            norms.append((float((blk * blk).sum()), br, bc))
    keep = len(norms) - int(round(sparsity * len(norms)))
    norms.sort(key=lambda t: -t[0])
    bm = torch.zeros(nbr, nbc, dtype=torch.bool)
    for _, br, bc in norms[:keep]:
        bm[br, bc] = True
    return bm, keep


def test_helpers_agree_with_a_hand_worked_example():
    # out = 10, in = 20, b = 8: a 2 x 3 grid, blocks (0, 0), (0, 2), (1, 1), (1, 2)
    bm = torch.tensor([[1, 0, 1], [0, 1, 1]], dtype=torch.bool)
    idx = _index(bm)
    assert idx["crow"].tolist() == [0, 2, 4] and idx["col"].tolist() == [0, 2, 1, 2]
    assert idx["row"].tolist() == [0, 0, 1, 1]
    assert idx["t_crow"].tolist() == [0, 1, 2, 4] and idx["t_row"].tolist() == [0, 1, 0, 1]
    assert idx["t_perm"].tolist() == [0, 2, 1, 3]
    m = _expand(bm, 10, 20, 8)
    assert m.shape == (10, 20) and int(m.sum()) == 8 * 8 + 8 * 4 + 2 * 8 + 2 * 4
    assert m[0, 0] and not m[0, 8] and m[0, 16] and m[9, 19] and m[8, 8] and not m[8, 0]
    w = torch.arange(200.0).reshape(10, 20) * m
    v = _gather(w, idx, 8)
    assert v.shape == (4, 8, 8) and v[1, 0, 0] == w[0, 16] and v[1, 0, 3] == w[0, 19] and (v[1, :, 4:] == 0).all()
    assert (v[3, 2:] == 0).all() and torch.equal(_scatter(v, idx, 10, 20, 8), w)
    pm = _pad_mask(idx, 10, 20, 8)
    assert int(pm.sum()) == int(m.sum())
    assert _base_butterfly(4, 2).sum(1).tolist() == [3, 3, 3, 3]
    assert _base_butterfly(8, 3)[0].tolist() == [True, True, True, False, True, False, False, False]


# ---- the format ----

FORMAT_SHAPES = [(o, i) for o in (1, 3, 37, 100) for i in (1, 3, 37, 100)]


@pytest.mark.parametrize("b", BLOCKS)
@pytest.mark.parametrize("out_f,in_f", FORMAT_SHAPES, ids=[f"out{o}-in{i}" for o, i in FORMAT_SHAPES])
def test_bsr_weight_from_mask_round_trips(b, out_f, in_f):
    nbr, nbc = _grid(out_f, in_f, b)
    bm = _block_mask(nbr, nbc, 0.5)
    bm.view(-1)[-1] = True  # the ragged corner block is stored
    mask = _expand(bm, out_f, in_f, b)
    idx = _index(bm)
    f = BSRWeight.from_mask(mask, b)
    f.validate()
    assert (f.out_features, f.in_features, f.block) == (out_f, in_f, b)
    assert f.shape == (out_f, in_f) and f.padded_shape == (nbr * b, nbc * b)
    assert (f.grid.out_features, f.grid.in_features) == (nbr, nbc)
    for name, t in idx.items():
        got = getattr(f.grid, name)
        assert got.dtype == torch.int32 and torch.equal(got, t), name
    assert f.nblocks == int(bm.sum())
    assert f.nnz == int(mask.sum()), "nnz counts the stored weights inside [out, in], padding excluded"
    assert torch.equal(f.block_mask(), bm) and torch.equal(f.to_mask(), mask)
    assert torch.equal(f.padding_mask(), _pad_mask(idx, out_f, in_f, b))

    w = torch.randn(out_f, in_f) * mask
    values = f.gather(w)
    assert values.shape == (f.nblocks, b, b) and values.is_contiguous()
    assert torch.equal(values, _gather(w, idx, b))
    assert (values[~_pad_mask(idx, out_f, in_f, b)] == 0).all()
    assert torch.equal(f.to_dense(values), w)
    # gather reads the stored blocks only, whatever lies off the mask
    noisy = w + torch.randn(out_f, in_f) * ~mask
    assert torch.equal(f.to_dense(f.gather(noisy)), w)

    g, v2 = BSRWeight.from_dense(noisy, mask, b)
    assert torch.equal(v2, values) and torch.equal(g.grid.col, f.grid.col)
    h = BSRWeight.from_block_mask(bm, out_f, in_f, b)
    for name, t in idx.items():
        assert torch.equal(getattr(h.grid, name), t), name
    r = BSRWeight.from_crow_col(out_f, in_f, b, idx["crow"], idx["col"])
    for name, t in idx.items():
        assert torch.equal(getattr(r.grid, name), t), name


def test_bsr_weight_nnz_excludes_padding():
    # 37 x 100 with b = 32: a 2 x 4 grid of 1024-entry blocks holding 37 * 100 real weights
    f = BSRWeight.from_mask(torch.ones(37, 100, dtype=torch.bool), 32)
    assert f.nblocks == 8 and f.nnz == 3700
    assert int(f.padding_mask().sum()) == 3700 and f.padding_mask().numel() == 8 * 32 * 32
    # only the corner block (rows 32..36, cols 96..99)
    bm = torch.zeros(2, 4, dtype=torch.bool)
    bm[1, 3] = True
    f = BSRWeight.from_block_mask(bm, 37, 100, 32)
    assert f.nblocks == 1 and f.nnz == 5 * 4
    pm = f.padding_mask()
    assert pm[0, :5, :4].all() and int(pm.sum()) == 20
    empty = BSRWeight.from_mask(torch.zeros(37, 100, dtype=torch.bool), 8)
    assert empty.nblocks == 0 and empty.nnz == 0 and empty.padding_mask().shape == (0, 8, 8)
    assert empty.to_dense(torch.zeros(0, 8, 8)).shape == (37, 100)


def test_bsr_weight_to_dense_is_differentiable_and_padding_gets_no_gradient():
    bm = torch.tensor([[1, 1], [0, 1]], dtype=torch.bool)
    f = BSRWeight.from_block_mask(bm, 12, 11, 8)
    v = torch.randn(3, 8, 8, dtype=torch.float64, requires_grad=True)
    g = torch.randn(12, 11, dtype=torch.float64)
    (f.to_dense(v) * g).sum().backward()
    idx = _index(bm)
    assert_close_rms(v.grad, _gather(g * _expand(bm, 12, 11, 8), idx, 8), name="d to_dense / d values")
    assert (v.grad[~_pad_mask(idx, 12, 11, 8)] == 0).all()


def test_bsr_weight_from_mask_refuses_a_partly_on_block():
    mask = _expand(torch.tensor([[1, 0], [1, 1]], dtype=torch.bool), 32, 32, 16)
    assert BSRWeight.from_mask(mask, 16).nblocks == 3
    bad = mask.clone()
    bad[20, 5] = False  # one hole in block (1, 0)
    with pytest.raises(ValueError, match=r"^mask: .*block \(1, 0\)"):
        BSRWeight.from_mask(bad, 16)
    bad = mask.clone()
    bad[3, 17] = True  # one entry in the off block (0, 1)
    with pytest.raises(ValueError, match=r"^mask: .*block \(0, 1\)"):
        BSRWeight.from_mask(bad, 16)
    # the same mask is block-constant at b = 8
    assert BSRWeight.from_mask(bad[:, :16].contiguous(), 8).nblocks >= 1
    # a ragged edge block is whole when its valid part is all on, partly on when not
    ragged = torch.zeros(37, 21, dtype=torch.bool)
    ragged[32:, 16:] = True
    f = BSRWeight.from_mask(ragged, 16)
    assert f.nblocks == 1 and f.nnz == 5 * 5 and torch.equal(f.to_mask(), ragged)
    ragged[36, 20] = False
    with pytest.raises(ValueError, match=r"^mask: .*block \(2, 1\)"):
        BSRWeight.from_mask(ragged, 16)


def test_bsr_weight_rejects_bad_arguments():
    m = torch.ones(16, 16, dtype=torch.bool)
    with pytest.raises(TypeError, match="^mask:"):
        BSRWeight.from_mask(m.float(), 8)
    with pytest.raises(ValueError, match="^mask:"):
        BSRWeight.from_mask(torch.ones(16, dtype=torch.bool), 8)
    for bad in (12, 0, 4, 128):
        with pytest.raises(ValueError, match="^block:"):
            BSRWeight.from_mask(m, bad)
    for bad in ("8", 8.0, True):
        with pytest.raises(TypeError, match="^block:"):
            BSRWeight.from_mask(m, bad)
    # block_mask: the grid shape of [out, in] in blocks, bool
    assert BSRWeight.from_block_mask(torch.ones(3, 3, dtype=torch.bool), 37, 40, 16).nnz == 37 * 40
    with pytest.raises(ValueError, match=r"^block_mask: expected shape \(3, 3\)"):
        BSRWeight.from_block_mask(torch.ones(2, 2, dtype=torch.bool), 37, 40, 16)
    with pytest.raises(ValueError, match=r"^block_mask: expected shape \(5, 5\)"):
        BSRWeight.from_block_mask(torch.ones(3, 3, dtype=torch.bool), 37, 40, 8)
    with pytest.raises(ValueError, match="^block_mask:"):
        BSRWeight.from_block_mask(torch.ones(3, 3).T.bool()[:, :2], 37, 40, 16)
    with pytest.raises(ValueError, match="^block_mask:"):
        BSRWeight.from_block_mask(torch.ones(9, dtype=torch.bool), 37, 40, 16)
    with pytest.raises(TypeError, match="^block_mask:"):
        BSRWeight.from_block_mask(torch.ones(3, 3), 37, 40, 16)
    with pytest.raises(ValueError, match="^block:"):
        BSRWeight.from_block_mask(torch.ones(3, 3, dtype=torch.bool), 37, 40, 12)


_I32 = lambda *v: torch.tensor(v, dtype=torch.int32)  # noqa: E731

# grid of 37 x 40 with b = 16: 3 x 3 blocks; valid crow [0, 2, 2, 4], col [0, 2, 1, 2]
BAD_CROW_COL = [
    pytest.param(_I32(0, 2, 4), _I32(0, 2, 1, 2), ValueError, "^crow:", id="crow-too-short"),
    pytest.param(_I32(0, 2, 2, 4, 4), _I32(0, 2, 1, 2), ValueError, "^crow:", id="crow-too-long"),
    pytest.param(_I32(1, 2, 2, 4), _I32(0, 2, 1, 2), ValueError, "^crow:", id="crow-not-starting-at-0"),
    pytest.param(_I32(0, 2, 2, 3), _I32(0, 2, 1, 2), ValueError, "^crow:", id="crow-not-ending-at-nblk"),
    pytest.param(_I32(0, 2, 2, 5), _I32(0, 2, 1, 2), ValueError, "^crow:", id="crow-past-nblk"),
    pytest.param(_I32(0, 3, 1, 4), _I32(0, 2, 1, 2), ValueError, "^crow:", id="crow-decreasing"),
    pytest.param(_I32(0, 2, 2, 4), _I32(0, 3, 1, 2), ValueError, "^col:", id="col-past-grid"),
    pytest.param(_I32(0, 2, 2, 4), _I32(0, 2, -1, 2), ValueError, "^col:", id="col-negative"),
    pytest.param(_I32(0, 2, 2, 4), _I32(2, 0, 1, 2), ValueError, "^col:", id="col-unsorted"),
    pytest.param(_I32(0, 2, 2, 4), _I32(0, 2, 2, 2), ValueError, "^col:", id="col-duplicate"),
    pytest.param(_I32(0, 2, 2, 4).long(), _I32(0, 2, 1, 2), TypeError, "^crow:", id="crow-int64"),
    pytest.param(_I32(0, 2, 2, 4), _I32(0, 2, 1, 2).long(), TypeError, "^col:", id="col-int64"),
    pytest.param(_I32(0, 2, 2, 4)[None], _I32(0, 2, 1, 2), ValueError, "^crow:", id="crow-2d"),
    pytest.param([0, 2, 2, 4], _I32(0, 2, 1, 2), TypeError, "^crow:", id="crow-list"),
]


@pytest.mark.parametrize("crow,col,exc,match", BAD_CROW_COL)
def test_bsr_weight_from_crow_col_rejects_malformed_index(crow, col, exc, match):
    with pytest.raises(exc, match=match):
        BSRWeight.from_crow_col(37, 40, 16, crow, col)


def test_bsr_weight_from_crow_col_rebuilds_the_index():
    f = BSRWeight.from_crow_col(37, 40, 16, _I32(0, 2, 2, 4), _I32(0, 2, 1, 2))
    bm = torch.tensor([[1, 0, 1], [0, 0, 0], [0, 1, 1]], dtype=torch.bool)
    for name, t in _index(bm).items():
        assert torch.equal(getattr(f.grid, name), t), name
    assert torch.equal(f.block_mask(), bm) and f.nnz == int(_expand(bm, 37, 40, 16).sum())
    with pytest.raises(ValueError, match="^block:"):
        BSRWeight.from_crow_col(37, 40, 12, _I32(0, 2, 2, 4), _I32(0, 2, 1, 2))


def test_bsr_weight_validate_rejects_a_grid_of_the_wrong_shape():
    f = BSRWeight.from_block_mask(torch.ones(3, 3, dtype=torch.bool), 37, 40, 16)
    f.validate()
    with pytest.raises(ValueError, match=r"^grid:"):
        BSRWeight(37, 40, 8, f.grid).validate()
    with pytest.raises(ValueError, match=r"^grid:"):
        BSRWeight(50, 40, 16, f.grid).validate()
    with pytest.raises(ValueError, match="^block:"):
        BSRWeight(37, 40, 12, f.grid).validate()


# ---- the ops against dense math, fp32 on both C++ paths ----


class Case:
    """A block-sparse weight ``w [out, in]`` (zeros off its blocks), its index and values built here, and inputs."""

    def __init__(self, batch, in_f, out_f, b, kind, dtype=torch.float32):
        self.b, self.in_f, self.out_f = b, in_f, out_f
        self.bmask = _block_mask(*_grid(out_f, in_f, b), kind)
        self.mask = _expand(self.bmask, out_f, in_f, b)
        self.idx = _index(self.bmask)
        self.w = torch.randn(out_f, in_f) * self.mask  # [out, in]
        self.values = _gather(self.w, self.idx, b).to(dtype)  # [nblk, b, b]
        self.pad = _pad_mask(self.idx, out_f, in_f, b)  # [nblk, b, b]
        self.x = torch.randn(batch, in_f).to(dtype)  # [B, in]
        self.dy = torch.randn(batch, out_f).to(dtype)  # [B, out]
        self.bias = torch.randn(out_f).to(dtype)  # [out]
        self.w = self.w.to(dtype)

    def dds(self, x=None, bias=None, values=None):
        x = self.x if x is None else x
        v = self.values if values is None else values
        return OPS.bsr_dds(x, v, self.idx["crow"], self.idx["col"], bias, self.out_f)

    def dsd(self, dy=None, values=None):
        dy = self.dy if dy is None else dy
        v = self.values if values is None else values
        i = self.idx
        return OPS.bsr_dsd(dy, v, i["t_crow"], i["t_row"], i["t_perm"], self.in_f)

    def sdd(self, dy=None, x=None):
        dy = self.dy if dy is None else dy
        x = self.x if x is None else x
        return OPS.bsr_sdd(dy, x, self.idx["row"], self.idx["col"], self.b)

    # fp64 dense references
    def dds_ref(self, x=None, bias=None):
        x = self.x if x is None else x
        y = x.double() @ self.w.double().T
        return y if bias is None else y + bias.double()

    def dsd_ref(self, dy=None):
        dy = self.dy if dy is None else dy
        return dy.double() @ self.w.double()

    def sdd_ref(self, dy=None, x=None):
        """The dense weight gradient ``dyᵀ x`` gathered at the blocks; 0 at the padding."""
        dy = self.dy if dy is None else dy
        x = self.x if x is None else x
        return _gather(dy.double().T @ x.double(), self.idx, self.b)


def _case(batch, in_f, out_f, b, kind):
    return pytest.param(batch, in_f, out_f, b, kind, id=f"B{batch}-in{in_f}-out{out_f}-b{b}-{kind}")


# batch 1 and 37 (six-row tiles and a ragged last tile), odd features that leave a ragged last block, 1 and 3
# narrower than any block, every block size, densities 0 (no blocks), 1 and random, empty block rows and columns
SHAPES = [
    _case(1, 1, 1, 8, "full"),
    _case(37, 37, 100, 8, "holed"),
    _case(1, 100, 37, 8, 0.5),
    _case(7, 3, 37, 16, "full"),
    _case(37, 100, 37, 16, "holed"),
    _case(1, 37, 100, 16, "empty"),
    _case(37, 100, 100, 32, 0.5),
    _case(5, 37, 3, 32, "full"),
    _case(37, 1, 100, 32, "holed"),
    _case(37, 100, 37, 64, "full"),
    _case(1, 100, 100, 64, 0.5),
    _case(6, 37, 37, 64, "empty"),
    _case(13, 128, 96, 32, "holed"),
]
PARAMS = "batch,in_f,out_f,b,kind"


def test_cases_have_the_advertised_structure():
    c = Case(3, 100, 100, 8, "holed")
    assert not c.bmask[1::3].any() and not c.bmask[:, 1].any() and c.bmask.any()
    assert (c.idx["crow"][1:] - c.idx["crow"][:-1])[1] == 0 and (c.idx["t_crow"][1:] - c.idx["t_crow"][:-1])[1] == 0
    assert c.values.shape == (int(c.bmask.sum()), 8, 8)
    assert Case(1, 37, 37, 16, "empty").values.shape == (0, 16, 16)
    assert Case(1, 37, 37, 16, "full").bmask.all()


@pytest.mark.parametrize(PARAMS, SHAPES)
@pytest.mark.parametrize("bias", [True, False], ids=["bias", "nobias"])
def test_bsr_dds_matches_dense(isa, batch, in_f, out_f, b, kind, bias):
    c = Case(batch, in_f, out_f, b, kind)
    bb = c.bias if bias else None
    y = c.dds(bias=bb)
    assert y.shape == (batch, out_f) and y.dtype == torch.float32
    assert_close_rms(y, c.dds_ref(bias=bb), torch.float32, name="y")
    if kind == "empty":
        expected = c.bias.expand(batch, out_f) if bias else torch.zeros(batch, out_f)
        assert torch.equal(y, expected), "no blocks: y must be exactly the bias"


@pytest.mark.parametrize(PARAMS, SHAPES)
def test_bsr_dsd_matches_dense(isa, batch, in_f, out_f, b, kind):
    c = Case(batch, in_f, out_f, b, kind)
    dx = c.dsd()
    assert dx.shape == (batch, in_f)
    assert_close_rms(dx, c.dsd_ref(), torch.float32, name="dx")
    if kind == "empty":
        assert (dx == 0).all(), "no blocks: dx must be exactly 0"


@pytest.mark.parametrize(PARAMS, SHAPES)
def test_bsr_sdd_matches_dense(isa, batch, in_f, out_f, b, kind):
    c = Case(batch, in_f, out_f, b, kind)
    dv = c.sdd()
    assert dv.shape == (c.values.shape[0], b, b) and dv.dtype == torch.float32
    assert_close_rms(dv, c.sdd_ref(), torch.float32, name="dvalues")
    # the padding (rows >= out, columns >= in) is exactly 0
    assert (dv[~c.pad] == 0).all()


@pytest.mark.parametrize("b", BLOCKS)
def test_bsr_ops_ignore_the_values_padding(isa, b):
    """The kernels read x and dy as zero past out/in: a (wrongly) nonzero padding entry changes no output."""
    c = Case(9, 37, 21, b, "full")
    dirty = c.values.clone()
    dirty[~c.pad] = 1e3
    assert (~c.pad).any()
    assert_close_rms(c.dds(bias=c.bias, values=dirty), c.dds_ref(bias=c.bias), torch.float32, name="y")
    assert_close_rms(c.dsd(values=dirty), c.dsd_ref(), torch.float32, name="dx")


@pytest.mark.parametrize("in_f,out_f", [(37, 21), (32, 48)], ids=["ragged", "whole-blocks"])
@pytest.mark.parametrize("op", ["dds", "dsd", "sdd"])
def test_bsr_ops_batch_zero(isa, op, in_f, out_f):
    c = Case(0, in_f, out_f, 16, "holed")
    if op == "dds":
        assert c.dds(bias=c.bias).shape == (0, out_f)
    elif op == "dsd":
        assert c.dsd().shape == (0, in_f)
    else:
        # an empty batch sums nothing: the weight gradient is exactly zero, not left unwritten
        dv = c.sdd()
        assert dv.shape == c.values.shape and (dv == 0).all()


def _bad_op_calls():
    """(description, call, error match): arguments a public op must refuse before any kernel runs."""
    g = BSRWeight.from_block_mask(torch.ones(3, 3, dtype=torch.bool), 20, 20, 8).grid
    v, x = torch.randn(9, 8, 8), torch.randn(2, 20)
    return [
        ("out_features past the grid", lambda d: OPS.bsr_dds(x.to(d), v.to(d), g.crow, g.col, None, 40), "crow:"),
        ("in_features past the grid", lambda d: OPS.bsr_dsd(x.to(d), v.to(d), g.t_crow, g.t_row, g.t_perm, 50),
         "t_crow:"),
        ("bias of length 1", lambda d: OPS.bsr_dds(x.to(d), v.to(d), g.crow, g.col, torch.randn(1).to(d), 20),
         "bias:"),
        ("bias too long", lambda d: OPS.bsr_dds(x.to(d), v.to(d), g.crow, g.col, torch.randn(22).to(d), 20),
         "bias:"),
        ("1-D x", lambda d: OPS.bsr_dds(x[0].to(d), v.to(d), g.crow, g.col, None, 20), "x:"),
        ("1-D dy", lambda d: OPS.bsr_dsd(x[0].to(d), v.to(d), g.t_crow, g.t_row, g.t_perm, 20), "dy:"),
        ("blocks not square", lambda d: OPS.bsr_dds(x.to(d), torch.randn(9, 8, 4).to(d), g.crow, g.col, None, 20),
         "values:"),
        ("block of 4", lambda d: OPS.bsr_dds(x.to(d), torch.randn(9, 4, 4).to(d), g.crow, g.col, None, 20),
         "values:"),
        ("sdd block of 5", lambda d: OPS.bsr_sdd(x.to(d), x.to(d), g.row, g.col, 5), "block:"),
        ("sdd batch mismatch", lambda d: OPS.bsr_sdd(x[:1].to(d), x.to(d), g.row, g.col, 8), "dy:"),
    ]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["fp32-cpp", "fp64-reference"])
@pytest.mark.parametrize("case", range(len(_bad_op_calls())))
def test_bsr_ops_refuse_mismatched_arguments(isa, dtype, case):
    """The C++ kernel sizes its output from the block grid and pads the bias to it: a grid or bias that does
    not match the features, or values that are not square blocks of a known size, get a ValueError naming
    the argument (before, the fp32 path returned a tensor of another width than the fake promised)."""
    _, call, match = _bad_op_calls()[case]
    with pytest.raises(ValueError, match=match):
        call(dtype)


def test_block_sparse_linear_batch_zero(isa):
    layer = SparseLinear(37, 21, pattern=Block(16), sparsity=0.5)
    x = torch.randn(0, 37, requires_grad=True)
    y = layer(x)
    assert y.shape == (0, 21)
    y.sum().backward()
    assert x.grad.shape == (0, 37) and (layer.values.grad == 0).all()


# ---- strided inputs: the op pads or copies, the binding reads the row stride ----


def _transposed_view(t):
    """Same values as ``t``, stored column-major (a non-contiguous view)."""
    v = t.t().contiguous().t()
    assert not v.is_contiguous() or min(t.shape) <= 1
    return v


def _nan_padded_slice(t, pad=19):
    """Same values as ``t`` as a column slice of a wider tensor whose other columns are NaN (row stride > width)."""
    wide = torch.full((t.shape[0], t.shape[1] + pad), float("nan"), dtype=t.dtype)
    wide[:, : t.shape[1]] = t
    return wide[:, : t.shape[1]]


def _broadcast_rows(t):
    """Every row equal to the first, with row stride 0 (what autograd hands back for ``y.sum()``)."""
    return t[:1].expand_as(t)


LAYOUTS = {"transposed": _transposed_view, "nan-padded-slice": _nan_padded_slice}
# 64 x 48 divide by 16: no padding copy, so the kernel reads the strides as given
STRIDED = [_case(9, 37, 21, 8, "holed"), _case(13, 64, 48, 16, "holed"), _case(37, 100, 37, 32, 0.5)]


@pytest.mark.parametrize("layout", list(LAYOUTS))
@pytest.mark.parametrize(PARAMS, STRIDED)
def test_bsr_ops_strided_inputs(isa, layout, batch, in_f, out_f, b, kind):
    c = Case(batch, in_f, out_f, b, kind)
    x, dy = LAYOUTS[layout](c.x), LAYOUTS[layout](c.dy)
    assert_close_rms(c.dds(x=x, bias=c.bias), c.dds_ref(bias=c.bias), torch.float32, name="y")
    assert_close_rms(c.dsd(dy=dy), c.dsd_ref(), torch.float32, name="dx")
    dv = c.sdd(dy=dy, x=x)
    assert_close_rms(dv, c.sdd_ref(), torch.float32, name="dvalues")
    assert (dv[~c.pad] == 0).all()


@pytest.mark.parametrize(PARAMS, STRIDED)
def test_bsr_ops_non_contiguous_values_and_bias(isa, batch, in_f, out_f, b, kind):
    c = Case(batch, in_f, out_f, b, kind)
    values = c.values.transpose(1, 2).contiguous().transpose(1, 2)
    bias = torch.stack([c.bias, c.bias], 1)[:, 0]
    assert (not values.is_contiguous() or values.numel() == 0) and not bias.is_contiguous()
    assert_close_rms(c.dds(bias=bias, values=values), c.dds_ref(bias=c.bias), torch.float32, name="y")
    assert_close_rms(c.dsd(values=values), c.dsd_ref(), torch.float32, name="dx")


@pytest.mark.parametrize(PARAMS, STRIDED)
def test_bsr_ops_broadcast_dy(isa, batch, in_f, out_f, b, kind):
    c = Case(batch, in_f, out_f, b, kind)
    dy = _broadcast_rows(c.dy)
    assert_close_rms(c.dsd(dy=dy), c.dsd_ref(dy=dy.contiguous()), torch.float32, name="dx")
    assert_close_rms(c.sdd(dy=dy), c.sdd_ref(dy=dy.contiguous()), torch.float32, name="dvalues")


# ---- the NaN poisoning reaches the BSR op outputs ----


@needs_cpp
def test_conftest_poisoning_reaches_bsr_op_outputs(monkeypatch):
    """With a kernel that writes nothing, every op's output is all NaN, so a missed write cannot pass."""

    class _WritesNothing:
        def __getattr__(self, name):
            return lambda *args: None

    monkeypatch.setattr(ops_bsr, "_C", _WritesNothing())
    c = Case(4, 16, 16, 8, "full")
    assert torch.isnan(c.dds(bias=c.bias)).all()
    assert torch.isnan(c.dsd()).all()
    assert torch.isnan(c.sdd()).all()


# ---- other dtypes: the reference path ----


@pytest.mark.parametrize("dtype", [torch.float64, torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize(PARAMS, [_case(3, 37, 21, 8, "holed"), _case(37, 100, 37, 32, 0.5),
                                  _case(5, 37, 37, 16, "empty")])
def test_bsr_ops_other_dtypes_match_dense(isa, monkeypatch, batch, in_f, out_f, b, kind, dtype):
    # fp64 goes to the reference, never to _C; bf16/fp16 to the fp32 C++ kernels, never to the reference
    calls = guard_dtype_route(monkeypatch, ops_bsr, ("bsr_dds", "bsr_dsd", "bsr_sdd"), dtype)
    c = Case(batch, in_f, out_f, b, kind, dtype=dtype)
    y = c.dds(bias=c.bias)
    assert y.dtype == dtype
    assert_close_rms(y, c.dds_ref(bias=c.bias), dtype, name="y")
    dx = c.dsd()
    assert dx.dtype == dtype
    assert_close_rms(dx, c.dsd_ref(), dtype, name="dx")
    dv = c.sdd()
    assert dv.dtype == dtype
    assert_close_rms(dv, c.sdd_ref(), dtype, name="dvalues")
    assert (dv[~c.pad] == 0).all()
    if dtype != torch.float64:
        assert {"bsr_dds", "bsr_dsd", "bsr_sdd"} <= set(calls)


@pytest.mark.parametrize("chunk", [1 << 20, 100], ids=["one-chunk", "many-chunks"])
@pytest.mark.parametrize(PARAMS, [_case(5, 37, 21, 8, "holed"), _case(3, 100, 37, 32, "full"),
                                  _case(2, 37, 37, 16, "empty")])
def test_reference_bsr_matches_dense_fp64(monkeypatch, chunk, batch, in_f, out_f, b, kind):
    monkeypatch.setattr(reference_bsr, "_CHUNK_ELEMS", chunk)
    c = Case(batch, in_f, out_f, b, kind, dtype=torch.float64)
    i = c.idx
    y = reference_bsr.bsr_dds(c.x, c.values, i["crow"], i["col"], c.bias, out_f)
    assert_close_rms(y, c.dds_ref(bias=c.bias), name="y")
    assert_close_rms(reference_bsr.bsr_dds(c.x, c.values, i["crow"], i["col"], None, out_f), c.dds_ref(), name="y")
    dx = reference_bsr.bsr_dsd(c.dy, c.values, i["t_crow"], i["t_row"], i["t_perm"], in_f)
    assert_close_rms(dx, c.dsd_ref(), name="dx")
    dv = reference_bsr.bsr_sdd(c.dy, c.x, i["row"], i["col"], b)
    assert_close_rms(dv, c.sdd_ref(), name="dvalues")
    assert (dv[~c.pad] == 0).all()


# ---- threads ----


def test_bsr_ops_same_result_for_any_thread_count(isa):
    c = Case(37, 200, 150, 8, "holed")
    prev = torch.get_num_threads()
    results = {}
    try:
        for t in (1, 2, 3):
            torch.set_num_threads(t)
            results[t] = (c.dds(bias=c.bias), c.dsd(), c.sdd())
    finally:
        torch.set_num_threads(prev)
    for t in (2, 3):
        for name, one, many in zip(("y", "dx", "dvalues"), results[1], results[t]):
            assert_close_rms(many, one.double(), tol=1e-6, name=f"{name} with {t} threads vs 1")


# ---- torch.library registration ----


def _opcheck_cases():
    cases = []
    for batch, in_f, out_f, b, kind in [(3, 20, 13, 8, "holed"), (5, 32, 16, 16, "full"), (2, 9, 9, 8, "empty")]:
        c = Case(batch, in_f, out_f, b, kind)
        i = c.idx
        tag = f"B{batch}-in{in_f}-out{out_f}-b{b}-{kind}"
        for op in ("bsr_dds", "bsr_dds_host"):
            cases.append(pytest.param(op, (c.x, c.values, i["crow"], i["col"], c.bias, out_f), id=f"{op}-{tag}-bias"))
            cases.append(pytest.param(op, (c.x, c.values, i["crow"], i["col"], None, out_f), id=f"{op}-{tag}-nobias"))
        for op in ("bsr_dsd", "bsr_dsd_host"):
            args = (c.dy, c.values, i["t_crow"], i["t_row"], i["t_perm"], in_f)
            cases.append(pytest.param(op, args, id=f"{op}-{tag}"))
        for op in ("bsr_sdd", "bsr_sdd_host"):
            cases.append(pytest.param(op, (c.dy, c.x, i["row"], i["col"], b), id=f"{op}-{tag}"))
    return cases


@pytest.mark.parametrize("op,args", _opcheck_cases())
def test_bsr_ops_opcheck(op, args):
    torch.library.opcheck(getattr(OPS, op), args)


# ---- the C++ binding's validation: a clear error, and the output left untouched ----

# a hand-built 2 x 3 grid of b = 8 blocks: [[1, 0, 1], [0, 1, 1]] (x [5, 24], dy [5, 16], values [4, 8, 8])
_B, _BS = 5, 8
_HAND_BMASK = torch.tensor([[1, 0, 1], [0, 1, 1]], dtype=torch.bool)
_HAND = {"crow": [0, 2, 4], "col": [0, 2, 1, 2], "row": [0, 0, 1, 1], "t_crow": [0, 1, 2, 4], "t_row": [0, 1, 0, 1],
         "t_perm": [0, 2, 1, 3]}


def _i32(*v):
    return np.array(v, np.int32)


def _nan(*shape, dtype=np.float32):
    return np.full(shape, np.nan, dtype)


def _valid_binding_args():
    rng = np.random.default_rng(0)
    a = {name: _i32(*v) for name, v in _HAND.items()}
    a.update(
        x=rng.standard_normal((_B, 24)).astype(np.float32),
        dy=rng.standard_normal((_B, 16)).astype(np.float32),
        values=rng.standard_normal((4, _BS, _BS)).astype(np.float32),
        bias=rng.standard_normal(16).astype(np.float32),
        block=_BS,
    )
    return a


def _call(op, a, out):
    if op == "dds":
        return _C.bsr_dds(a["x"], a["values"], a["crow"], a["col"], a["block"], a["bias"], out, 2)
    if op == "dsd":
        return _C.bsr_dsd(a["dy"], a["values"], a["t_crow"], a["t_row"], a["t_perm"], a["block"], out, 2)
    return _C.bsr_sdd(a["dy"], a["x"], a["row"], a["col"], a["block"], out, 2)


_OUT_SHAPE = {"dds": (_B, 16), "dsd": (_B, 24), "sdd": (4, _BS, _BS)}


@needs_cpp
@pytest.mark.parametrize("op", list(_OUT_SHAPE))
def test_bsr_binding_valid_hand_built_index_matches_dense(op):
    a = _valid_binding_args()
    out = _nan(*_OUT_SHAPE[op])
    _call(op, a, out)
    idx = {k: torch.tensor(v) for k, v in _HAND.items()}
    w = _scatter(torch.from_numpy(a["values"]).double(), idx, 16, 24, 8)
    x, dy = torch.from_numpy(a["x"]).double(), torch.from_numpy(a["dy"]).double()
    expected = {
        "dds": x @ w.T + torch.from_numpy(a["bias"]).double(),
        "dsd": dy @ w,
        "sdd": _gather(dy.T @ x, idx, 8),
    }[op]
    assert_close_rms(torch.from_numpy(out), expected, torch.float32, name=op)


@needs_cpp
@pytest.mark.parametrize("op", list(_OUT_SHAPE))
def test_bsr_binding_refuses_an_output_it_would_have_to_convert(op):
    # a converted copy would take the writes and drop them: a list is refused, not copied
    out = _nan(*_OUT_SHAPE[op]).tolist()
    with pytest.raises(TypeError):
        _call(op, _valid_binding_args(), out)


@needs_cpp
@pytest.mark.parametrize("op", list(_OUT_SHAPE))
def test_bsr_binding_accepts_an_empty_batch_whatever_its_strides(op):
    """``torch.empty(0, n).numpy()`` has strides (0, 0): an empty batch has no feature stride to check."""
    assert torch.zeros(0, 24).numpy().strides == (0, 0)
    a = _valid_binding_args()
    a["x"] = np.lib.stride_tricks.as_strided(np.zeros(1, np.float32), (0, 24), (0, 0))
    a["dy"] = np.lib.stride_tricks.as_strided(np.zeros(1, np.float32), (0, 16), (0, 0))
    shape = {"dds": (0, 16), "dsd": (0, 24), "sdd": (4, _BS, _BS)}[op]
    out = _nan(*shape)
    _call(op, a, out)
    assert (out == 0).all()


def _bad(op, name, exc, id, **changes):
    return pytest.param(op, name, exc, changes, id=f"{op}-{id}")


def _readonly(shape):
    a = _nan(*shape)
    a.flags.writeable = False
    return a


def _with(name, k, value):
    t = _i32(*_HAND[name])
    t[k] = value
    return t


def _strided_rows(rows, cols):
    """A float32 [rows, cols] array whose features are not contiguous (column stride 2)."""
    return np.zeros((rows, 2 * cols), np.float32)[:, ::2]


BAD_BINDING_ARGS = [
    # bsr_dds
    _bad("dds", "col", ValueError, "col-out-of-range", col=_with("col", 1, 3)),
    _bad("dds", "col", ValueError, "col-negative", col=_with("col", 0, -1)),
    _bad("dds", "col", ValueError, "col-unsorted", col=_i32(2, 0, 1, 2)),
    _bad("dds", "col", ValueError, "col-duplicate", col=_i32(0, 2, 2, 2)),
    _bad("dds", "col", TypeError, "col-int64", col=np.array(_HAND["col"], np.int64)),
    _bad("dds", "crow", ValueError, "crow-not-ending-at-nblk", crow=_i32(0, 2, 3)),
    _bad("dds", "crow", ValueError, "crow-not-starting-at-0", crow=_i32(1, 2, 4)),
    _bad("dds", "crow", ValueError, "crow-decreasing", crow=_i32(0, 5, 4)),
    _bad("dds", "crow", ValueError, "crow-entry-past-nblk", crow=_i32(0, 9, 4)),
    _bad("dds", "crow", ValueError, "crow-empty", crow=np.zeros(0, np.int32)),
    _bad("dds", "crow", TypeError, "crow-int64", crow=np.array(_HAND["crow"], np.int64)),
    _bad("dds", "values", ValueError, "values-too-few-blocks", values=np.ones((3, 8, 8), np.float32)),
    _bad("dds", "values", ValueError, "values-wrong-block", values=np.ones((4, 16, 16), np.float32)),
    _bad("dds", "values", ValueError, "values-not-square", values=np.ones((4, 8, 4), np.float32)),
    _bad("dds", "values", ValueError, "values-flat", values=np.ones(4 * 64, np.float32)),
    _bad("dds", "values", ValueError, "values-not-c-contiguous",
         values=np.ones((8, 8, 4), np.float32).transpose(2, 0, 1)),
    _bad("dds", "values", TypeError, "values-float64", values=np.ones((4, 8, 8), np.float64)),
    _bad("dds", "x", ValueError, "x-features-not-a-multiple-of-block", x=np.zeros((_B, 20), np.float32)),
    _bad("dds", "x", ValueError, "x-features-non-contiguous", x=_strided_rows(_B, 24)),
    _bad("dds", "x", ValueError, "x-1d", x=np.zeros(24, np.float32)),
    _bad("dds", "x", TypeError, "x-float64", x=np.zeros((_B, 24), np.float64)),
    _bad("dds", "block", ValueError, "block-12", block=12),
    _bad("dds", "block", ValueError, "block-0", block=0),
    _bad("dds", "bias", ValueError, "bias-wrong-length", bias=np.ones(10, np.float32)),
    _bad("dds", "bias", TypeError, "bias-float64", bias=np.ones(16, np.float64)),
    _bad("dds", "y", TypeError, "y-float64", out=_nan(_B, 16, dtype=np.float64)),
    _bad("dds", "y", ValueError, "y-wrong-shape", out=_nan(_B, 17)),
    _bad("dds", "y", ValueError, "y-wrong-batch", out=_nan(_B + 1, 16)),
    _bad("dds", "y", ValueError, "y-not-c-contiguous", out=_nan(16, _B).T),
    _bad("dds", "y", ValueError, "y-read-only", out=_readonly((_B, 16))),
    # bsr_dsd
    _bad("dsd", "t_perm", ValueError, "t_perm-out-of-range", t_perm=_with("t_perm", 2, 4)),
    _bad("dsd", "t_perm", ValueError, "t_perm-far-out-of-range", t_perm=_with("t_perm", 0, 1 << 30)),
    _bad("dsd", "t_perm", ValueError, "t_perm-negative", t_perm=_with("t_perm", 3, -1)),
    _bad("dsd", "t_perm", ValueError, "t_perm-wrong-length", t_perm=_i32(0, 2, 1)),
    _bad("dsd", "t_perm", TypeError, "t_perm-int64", t_perm=np.array(_HAND["t_perm"], np.int64)),
    _bad("dsd", "t_row", ValueError, "t_row-out-of-range", t_row=_with("t_row", 1, 2)),
    _bad("dsd", "t_row", ValueError, "t_row-negative", t_row=_with("t_row", 0, -1)),
    _bad("dsd", "t_row", ValueError, "t_row-unsorted", t_row=_i32(0, 1, 1, 0)),
    _bad("dsd", "t_crow", ValueError, "t_crow-not-ending-at-nblk", t_crow=_i32(0, 1, 2, 3)),
    _bad("dsd", "t_crow", ValueError, "t_crow-decreasing", t_crow=_i32(0, 2, 1, 4)),
    _bad("dsd", "t_crow", ValueError, "t_crow-empty", t_crow=np.zeros(0, np.int32)),
    _bad("dsd", "values", ValueError, "values-too-many-blocks", values=np.ones((5, 8, 8), np.float32)),
    _bad("dsd", "values", TypeError, "values-float64", values=np.ones((4, 8, 8), np.float64)),
    _bad("dsd", "dy", ValueError, "dy-features-not-a-multiple-of-block", dy=np.zeros((_B, 12), np.float32)),
    _bad("dsd", "dy", ValueError, "dy-features-non-contiguous", dy=_strided_rows(_B, 16)),
    _bad("dsd", "dy", TypeError, "dy-float64", dy=np.zeros((_B, 16), np.float64)),
    _bad("dsd", "block", ValueError, "block-12", block=12),
    _bad("dsd", "dx", ValueError, "dx-wrong-shape", out=_nan(_B, 16)),
    _bad("dsd", "dx", ValueError, "dx-not-c-contiguous", out=_nan(24, _B).T),
    _bad("dsd", "dx", ValueError, "dx-read-only", out=_readonly((_B, 24))),
    _bad("dsd", "dx", TypeError, "dx-float64", out=_nan(_B, 24, dtype=np.float64)),
    # bsr_sdd
    _bad("sdd", "row", ValueError, "row-out-of-range", row=_with("row", 3, 2)),
    _bad("sdd", "row", ValueError, "row-negative", row=_with("row", 0, -1)),
    _bad("sdd", "row", TypeError, "row-int64", row=np.array(_HAND["row"], np.int64)),
    _bad("sdd", "col", ValueError, "col-out-of-range", col=_with("col", 2, 3)),
    _bad("sdd", "col", ValueError, "col-far-out-of-range", col=_with("col", 1, 1 << 30)),
    _bad("sdd", "col", ValueError, "col-wrong-length", col=_i32(0, 2, 1)),
    _bad("sdd", "x", ValueError, "x-features-not-a-multiple-of-block", x=np.zeros((_B, 20), np.float32)),
    _bad("sdd", "x", ValueError, "x-features-non-contiguous", x=_strided_rows(_B, 24)),
    _bad("sdd", "dy", ValueError, "dy-rows-differ-from-x", dy=np.zeros((_B + 1, 16), np.float32)),
    _bad("sdd", "dy", ValueError, "dy-features-not-a-multiple-of-block", dy=np.zeros((_B, 12), np.float32)),
    _bad("sdd", "dy", TypeError, "dy-float64", dy=np.zeros((_B, 16), np.float64)),
    _bad("sdd", "block", ValueError, "block-12", block=12),
    _bad("sdd", "dvalues", ValueError, "dvalues-wrong-shape", out=_nan(4, 16, 16)),
    _bad("sdd", "dvalues", ValueError, "dvalues-too-few-blocks", out=_nan(3, 8, 8)),
    _bad("sdd", "dvalues", ValueError, "dvalues-flat", out=_nan(4 * 64)),
    _bad("sdd", "dvalues", ValueError, "dvalues-not-c-contiguous", out=_nan(8, 8, 4).transpose(2, 0, 1)),
    _bad("sdd", "dvalues", ValueError, "dvalues-read-only", out=_readonly((4, 8, 8))),
    _bad("sdd", "dvalues", TypeError, "dvalues-float64", out=_nan(4, 8, 8, dtype=np.float64)),
]


@needs_cpp
@pytest.mark.parametrize("op,name,exc,changes", BAD_BINDING_ARGS)
def test_bsr_binding_rejects_malformed_arguments(op, name, exc, changes):
    a = _valid_binding_args()
    changes = dict(changes)
    out = changes.pop("out", None)
    a.update(changes)
    if out is None:
        out = _nan(*_OUT_SHAPE[op])
    with pytest.raises(exc, match=rf"^{name}:"):
        _call(op, a, out)
    base = out.base if out.base is not None else out
    assert np.isnan(base).all(), "the output was written although an error was raised"


# ---- SparseLinear with Block / Butterfly patterns ----


def _layer_pair(in_f, out_f, pattern, bias=True, sparsity=None):
    """A SparseLinear made from a random nn.Linear, and the fp64 reference tensors built here.

    Returns ``(layer, mask, w, b, u, v)``: ``mask`` is computed here by brute force (block magnitude or the
    butterfly's math); ``w = weight * mask``, ``b``, and the low-rank factors ``u``, ``v`` (or None) are fp64 leaves.
    """
    p = as_pattern(pattern)
    linear = nn.Linear(in_f, out_f, bias=bias)
    if isinstance(p, Block):
        # large ragged edge blocks, so that block-magnitude pruning keeps blocks with padding
        with torch.no_grad():
            linear.weight[out_f - out_f % p.size:] *= 8
            linear.weight[:, in_f - in_f % p.size:] *= 8
    layer = SparseLinear.from_dense(linear, sparsity, pattern=pattern)
    weight = linear.weight.detach()
    if isinstance(p, Block):
        bm, _ = _brute_block_magnitude(weight, sparsity if sparsity is not None else p.sparsity, p.size)
        mask = _expand(bm, out_f, in_f, p.size)
    else:
        mask = _brute_butterfly(out_f, in_f, p.butterfly_size, p.n_factors, p.block, p.global_size)
    w = (weight * mask).double().requires_grad_()  # [out, in]
    b = linear.bias.detach().double().requires_grad_() if bias else None  # [out]
    u = v = None
    if getattr(p, "rank", 0):
        u = layer.lr_u.detach().double().requires_grad_()  # [out, r]
        v = layer.lr_v.detach().double().requires_grad_()  # [r, in]
    return layer, mask, w, b, u, v


def _ref_forward(x, w, b, u, v):
    weight = w if u is None else w + u @ v
    return F.linear(x, weight, b)


def _layer_index(layer):
    b = layer._block
    return _index(layer.format.block_mask()), b


LAYER_PATTERNS = [
    pytest.param(Block(16), 0.5, id="block16-sp0.5"),
    pytest.param(Butterfly(butterfly_size=4, n_factors=2, block=8, rank=3), None, id="butterfly4x2b8-r3"),
]


@pytest.mark.parametrize("pattern,sparsity", LAYER_PATTERNS)
@pytest.mark.parametrize("lead", [(1,), (2, 3), (9,)], ids=lambda t: "lead" + "x".join(map(str, t)))
@pytest.mark.parametrize("bias", [True, False], ids=["bias", "nobias"])
def test_block_sparse_linear_matches_dense_linear(isa, pattern, sparsity, lead, bias):
    in_f, out_f = 37, 50
    layer, mask, w, b, u, v = _layer_pair(in_f, out_f, pattern, bias, sparsity)
    assert torch.equal(layer.mask, mask), "the layer's mask differs from the brute-force mask"
    idx, bs = _layer_index(layer)
    assert layer.values.shape == (int(idx["col"].numel()), bs, bs)
    assert torch.equal(layer.values.detach(), _gather(w.detach().float(), idx, bs))
    assert layer.nnz == int(mask.sum())
    assert (~_pad_mask(idx, out_f, in_f, bs)).any(), "the case must store blocks with padding"
    assert abs(layer.sparsity - (1 - int(mask.sum()) / (in_f * out_f))) < 1e-12
    # dense_weight() is code under test too: check it against a scatter of values (+ u v) built here
    dw = _scatter(layer.values.detach().double(), idx, out_f, in_f, bs)
    if u is not None:
        dw = dw + u.detach() @ v.detach()
    assert_close_rms(layer.dense_weight(), dw, torch.float32, name="dense_weight")
    assert torch.equal(layer.to_dense().weight.detach(), layer.dense_weight().detach())

    x = torch.randn(*lead, in_f, requires_grad=True)
    g = torch.randn(*lead, out_f)  # upstream gradient
    y = layer(x)
    assert y.shape == (*lead, out_f)
    (y * g).sum().backward()

    x64 = x.detach().double().requires_grad_()
    y64 = _ref_forward(x64, w, b, u, v)
    (y64 * g.double()).sum().backward()

    assert_close_rms(y, y64, torch.float32, name="y")
    assert_close_rms(x.grad, x64.grad, torch.float32, name="dx")
    # the weight gradient gathered at the blocks: exactly 0 at the padding
    assert_close_rms(layer.values.grad, _gather(w.grad, idx, bs), torch.float32, name="dvalues")
    assert (layer.values.grad[~_pad_mask(idx, out_f, in_f, bs)] == 0).all()
    if bias:
        assert_close_rms(layer.bias.grad, b.grad, torch.float32, name="dbias")
    else:
        assert layer.bias is None
    if u is not None:
        assert_close_rms(layer.lr_u.grad, u.grad, torch.float32, name="dlr_u")
        assert_close_rms(layer.lr_v.grad, v.grad, torch.float32, name="dlr_v")


def test_block_sparse_linear_backward_of_sum(isa):
    """``y.sum()`` hands the backward a broadcast dy (stride 0)."""
    layer, mask, w, b, _, _ = _layer_pair(64, 48, Block(16), sparsity=0.5)
    x = torch.randn(17, 64, requires_grad=True)
    layer(x).sum().backward()
    x64 = x.detach().double().requires_grad_()
    F.linear(x64, w, b).sum().backward()
    idx, bs = _layer_index(layer)
    assert_close_rms(x.grad, x64.grad, torch.float32, name="dx")
    assert_close_rms(layer.values.grad, _gather(w.grad, idx, bs), torch.float32, name="dvalues")


@pytest.mark.filterwarnings("ignore:Initializing zero-element tensors is a no-op")
def test_block_sparse_linear_zero_features(isa):
    linear = nn.Linear(0, 4)
    layer = SparseLinear.from_dense(linear, 0.5, pattern=Block(8))
    x = torch.randn(3, 0)
    assert torch.equal(layer(x), linear(x))
    layer = SparseLinear(5, 0, pattern=Block(8), sparsity=0.5)
    assert layer(torch.randn(3, 5)).shape == (3, 0) and layer.mask.shape == (0, 5)


def test_block_sparse_linear_gradcheck():
    bm = torch.tensor([[1, 0], [1, 1]], dtype=torch.bool)
    layer = SparseLinear(11, 13, mask=_expand(bm, 13, 11, 8), pattern=Block(8)).double()
    x = torch.randn(3, 11, dtype=torch.float64, requires_grad=True)
    values = layer.values.detach().clone().requires_grad_()
    bias = layer.bias.detach().clone().requires_grad_()
    index = layer.format.tensors()

    def f(x, v, b):
        return sparseops.autograd.block_linear(x, v, index, b, 13, 11)

    assert torch.autograd.gradcheck(f, (x, values, bias))


def test_block_pattern_shorthand_and_checks():
    assert as_pattern("block:32") == Block(32) and as_pattern("block:8") == Block(8)
    with pytest.raises(ValueError, match="^size:"):
        Block(12)
    with pytest.raises(ValueError, match="^size:"):
        as_pattern("block:12")
    with pytest.raises(ValueError, match="^sparsity:"):
        Block(16, sparsity=1.0)
    layer = SparseLinear(40, 24, pattern="block:8", sparsity=0.5)
    assert layer.pattern == Block(8) and is_block_sparse(layer.mask, 8)
    bm = layer.format.block_mask()
    assert bm.shape == (3, 5) and int(bm.sum()) == 15 - round(0.5 * 15)
    assert set(layer.state_dict()) == {"values", "bias", "crow", "col", "dense_shape"}
    # a mask that is not block-constant is refused
    with pytest.raises(ValueError, match="^mask:"):
        SparseLinear(16, 16, mask=torch.eye(16, dtype=torch.bool), pattern=Block(8))
    with pytest.raises(ValueError, match="^mask:"):
        SparseLinear(16, 16, mask=torch.eye(16, dtype=torch.bool), pattern=Butterfly(4, 1, 8))


@pytest.mark.parametrize("pattern,sparsity", LAYER_PATTERNS)
def test_block_sparse_linear_adamw_keeps_padding_zero(isa, pattern, sparsity):
    in_f, out_f = 37, 50
    layer, mask, *_ = _layer_pair(in_f, out_f, pattern, True, sparsity)
    idx, bs = _layer_index(layer)
    pad = ~_pad_mask(idx, out_f, in_f, bs)
    assert pad.any()
    start = layer.values.detach().clone()
    rank = getattr(layer.pattern, "rank", 0)
    # the dense twin (sparse part only, without a low-rank term): same weights, gradient masked
    dense = None
    if not rank:
        dense = nn.Linear(in_f, out_f).double()
        with torch.no_grad():
            dense.weight.copy_(_scatter(layer.values.detach().double(), idx, out_f, in_f, bs))
            dense.bias.copy_(layer.bias.detach())
    opt = torch.optim.AdamW(layer.parameters(), lr=1e-2, weight_decay=0.1)
    opt_d = torch.optim.AdamW(dense.parameters(), lr=1e-2, weight_decay=0.1) if dense is not None else None
    for _ in range(5):
        x, t = torch.randn(8, in_f), torch.randn(8, out_f)
        opt.zero_grad()
        (layer(x) - t).pow(2).mean().backward()
        assert (layer.values.grad[pad] == 0).all()
        opt.step()
        if dense is not None:
            opt_d.zero_grad()
            (dense(x.double()) - t.double()).pow(2).mean().backward()
            dense.weight.grad *= mask
            opt_d.step()
    assert (layer.values.detach()[pad] == 0).all(), "a padding entry of values moved"
    assert torch.equal(layer.mask, mask)
    assert not torch.equal(layer.values.detach(), start)
    if dense is not None:
        after = layer.to_dense().weight.detach()
        assert (after[~mask] == 0).all()
        assert_close_rms(after, dense.weight.detach(), tol=1e-4, name="weight after AdamW")


def _other_block_mask(out_f, in_f, b):
    bm = torch.zeros(*_grid(out_f, in_f, b), dtype=torch.bool)
    bm[0, 0] = True
    bm[-1, -1] = True
    return _expand(bm, out_f, in_f, b)


@pytest.mark.parametrize("pattern,sparsity", LAYER_PATTERNS)
def test_block_sparse_linear_state_dict_round_trip(isa, pattern, sparsity):
    in_f, out_f = 37, 50
    a, mask, *_ = _layer_pair(in_f, out_f, pattern, True, sparsity)
    bs = a._block
    sd = a.state_dict()
    expected_keys = {"values", "bias", "crow", "col", "dense_shape"}
    if getattr(a.pattern, "rank", 0):
        expected_keys |= {"lr_u", "lr_v"}
    assert set(sd) == expected_keys
    # a fresh layer with another mask (and another block count): the structure comes from the checkpoint
    b = SparseLinear(in_f, out_f, mask=_other_block_mask(out_f, in_f, bs), pattern=pattern)
    assert b.values.shape[0] != a.values.shape[0]
    b.load_state_dict(sd)
    assert torch.equal(b.mask, mask) and b.nnz == a.nnz and b.values.shape == a.values.shape
    for name, t in _index(_grid_mask_of(mask, bs)).items():
        assert torch.equal(getattr(b, name), t), name
    x = torch.randn(5, in_f, requires_grad=True)
    ya, yb = a(x), b(x)
    assert torch.equal(ya, yb)
    # the rebuilt transposed index drives the backward
    params_a = [p for p in a.parameters()]
    params_b = [p for p in b.parameters()]
    ga = torch.autograd.grad(ya.sum(), [x, *params_a])
    gb = torch.autograd.grad(yb.sum(), [x, *params_b])
    for i, (p, q) in enumerate(zip(ga, gb)):
        assert torch.equal(p, q), f"gradient {i} differs after the round trip"


def _grid_mask_of(mask, b):
    """The block mask of a block-constant element mask, read at each block's first entry."""
    return mask[::b, ::b].contiguous()


def _corrupt(sd, key, edit):
    sd = dict(sd)
    sd[key] = edit(sd[key].clone())
    return sd


def _crow_end_past(t):
    t[-1] += 1
    return t


def _crow_decreasing(t):
    t[1] = t[-1] + 1
    return t


def _col_past_grid(t):
    t[0] = 99
    return t


BAD_CHECKPOINTS = [
    pytest.param(lambda sd: _corrupt(sd, "crow", _crow_end_past), "crow:", id="crow-end-not-nblk"),
    pytest.param(lambda sd: _corrupt(sd, "crow", _crow_decreasing), "crow:", id="crow-decreasing"),
    pytest.param(lambda sd: _corrupt(sd, "crow", lambda t: t[:-1]), "crow:", id="crow-too-short"),
    pytest.param(lambda sd: _corrupt(sd, "crow", lambda t: t.long()), "crow", id="crow-int64"),
    pytest.param(lambda sd: _corrupt(sd, "col", _col_past_grid), "col:", id="col-past-grid"),
    pytest.param(lambda sd: _corrupt(sd, "values", lambda t: t[:-1]), "values:", id="values-too-few-blocks"),
    pytest.param(lambda sd: _corrupt(sd, "values", lambda t: t[:, :8, :8]), "values:", id="values-wrong-block"),
]


@pytest.mark.parametrize("make,match", BAD_CHECKPOINTS)
def test_block_sparse_linear_bad_checkpoint_refused_and_layer_unchanged(make, match):
    a = SparseLinear(37, 50, pattern=Block(16), sparsity=0.5)
    b = SparseLinear(37, 50, pattern=Block(16), sparsity=0.25)
    before = copy.deepcopy(b.state_dict())
    derived = {name: getattr(b, name).clone() for name in ("row", "t_crow", "t_row", "t_perm")}
    x = torch.randn(3, 37)
    y_before = b(x)
    with pytest.raises(RuntimeError, match=match):
        b.load_state_dict(make(a.state_dict()))
    after = b.state_dict()
    assert set(after) == set(before)
    for k, v in after.items():
        assert torch.equal(v, before[k]), f"{k} changed by a failed load"
    for k, v in derived.items():
        assert torch.equal(getattr(b, k), v), f"{k} changed by a failed load"
    assert torch.equal(b(x), y_before)


@pytest.mark.parametrize("fill", [5.0, float("nan"), float("inf")], ids=["five", "nan", "inf"])
@pytest.mark.parametrize("with_index", [True, False], ids=["with-index", "values-only"])
def test_block_sparse_linear_checkpoint_with_nonzero_padding_is_refused(fill, with_index):
    """The padding of the ragged edge blocks must be 0: the kernels multiply it by zero-padded activations,
    so a NaN or inf there would reach every output of its rows. A checkpoint with anything else is refused,
    and the layer is left as it was."""
    mask = _expand(torch.ones(4, 3, dtype=torch.bool), 50, 37, 16)
    a = SparseLinear(37, 50, mask=mask, pattern=Block(16))
    pad = ~a.format.padding_mask()
    assert pad.any()
    sd = {k: v.clone() for k, v in a.state_dict().items()}
    sd["values"][pad] = fill
    if not with_index:
        sd = {k: v for k, v in sd.items() if k not in ("crow", "col")}
    b = SparseLinear(37, 50, mask=mask, pattern=Block(16)) if not with_index else SparseLinear(
        37, 50, pattern=Block(16), sparsity=0.5)
    before = copy.deepcopy(b.state_dict())
    with pytest.raises(RuntimeError, match="values: nonzero in the padding"):
        b.load_state_dict(sd, strict=with_index)
    for k, v in b.state_dict().items():
        assert torch.equal(v, before[k]), f"{k} changed by a refused load"
    sd["values"][pad] = 0.0  # the same checkpoint with its padding 0 loads
    b.load_state_dict(sd, strict=with_index)
    assert torch.equal(b.values, sd["values"])


def test_block_sparse_linear_refuses_a_checkpoint_of_another_shape():
    a = SparseLinear(37, 50, pattern=Block(16), sparsity=0.5)
    b = SparseLinear(40, 50, pattern=Block(16), sparsity=0.5)
    with pytest.raises(RuntimeError, match="out_features=50, in_features=40"):
        b.load_state_dict(a.state_dict())


@pytest.mark.parametrize("pattern,sparsity", LAYER_PATTERNS)
def test_block_sparse_linear_to_float64(pattern, sparsity):
    in_f, out_f = 37, 50
    layer, mask, w, b, u, v = _layer_pair(in_f, out_f, pattern, True, sparsity)
    idx, bs = _layer_index(layer)
    for moved in (copy.deepcopy(layer).to(torch.float64), copy.deepcopy(layer).double()):
        assert moved.values.dtype == moved.bias.dtype == torch.float64
        assert all(getattr(moved, n).dtype == torch.int32 for n in ("crow", "col", "row", "t_crow", "t_row", "t_perm"))
        # the weights are the same numbers, widened
        assert torch.equal(moved.values, layer.values.detach().double())
        x = torch.randn(5, in_f, dtype=torch.float64, requires_grad=True)
        y = moved(x)
        assert y.dtype == torch.float64
        x64 = x.detach().clone().requires_grad_()
        w64 = (w.detach().float().double()).requires_grad_()
        b64 = b.detach().clone().requires_grad_()
        u64 = None if u is None else moved.lr_u.detach().clone().requires_grad_()
        v64 = None if v is None else moved.lr_v.detach().clone().requires_grad_()
        y64 = _ref_forward(x64, w64, b64, u64, v64)
        assert_close_rms(y, y64, torch.float64, name="y")
        g = torch.randn(5, out_f, dtype=torch.float64)
        (y * g).sum().backward()
        (y64 * g).sum().backward()
        assert_close_rms(x.grad, x64.grad, torch.float64, name="dx")
        assert_close_rms(moved.values.grad, _gather(w64.grad, idx, bs), torch.float64, name="dvalues")
        assert (moved.values.grad[~_pad_mask(idx, out_f, in_f, bs)] == 0).all()
        assert_close_rms(moved.bias.grad, b64.grad, torch.float64, name="dbias")
        if u is not None:
            assert_close_rms(moved.lr_u.grad, u64.grad, torch.float64, name="dlr_u")
            assert_close_rms(moved.lr_v.grad, v64.grad, torch.float64, name="dlr_v")


# ---- torch.compile ----


def _small_block_model():
    return nn.Sequential(
        SparseLinear(37, 24, pattern=Block(8), sparsity=0.5), nn.ReLU(),
        SparseLinear(24, 20, pattern=Butterfly(butterfly_size=4, n_factors=1, block=8, rank=2)), nn.ReLU(),
        SparseLinear(20, 5, pattern="block:16", sparsity=0.0),
    )


def test_block_sparse_linear_compile_forward_backward_aot_eager():
    torch._dynamo.reset()
    model = _small_block_model()
    compiled = torch.compile(model, fullgraph=True, backend="aot_eager")
    x = torch.randn(2, 5, 37)
    grads = []
    for mod in (model, compiled):
        xr = x.clone().requires_grad_()
        y = mod(xr)
        y.pow(2).sum().backward()
        grads.append((y.detach(), xr.grad, *(p.grad.clone() for p in model.parameters())))
        model.zero_grad()
    for e, c in zip(*grads):
        assert_close_rms(c, e.double(), torch.float32, name="compiled vs eager")
    torch._dynamo.reset()


def test_block_sparse_linear_compile_inductor():
    torch._dynamo.reset()
    model = _small_block_model()
    compiled = torch.compile(model, fullgraph=True)
    x = torch.randn(2, 3, 37)
    grads = []
    for mod in (model, compiled):
        xr = x.clone().requires_grad_()
        y = mod(xr)
        y.pow(2).sum().backward()
        grads.append((y.detach(), xr.grad, *(p.grad.clone() for p in model.parameters())))
        model.zero_grad()
    for e, c in zip(*grads):
        assert_close_rms(c, e.double(), torch.float32, name="compiled vs eager")
    torch._dynamo.reset()


# ---- sparsify_ ----


def _mlp():
    return nn.Sequential(nn.Linear(40, 48), nn.ReLU(), nn.Linear(48, 24), nn.ReLU(), nn.Linear(24, 8))


def _masked_forward(dense_model, masks, x, low_rank=None):
    """fp64 forward of ``dense_model`` with each Linear's weight multiplied by its mask (+ its low-rank term)."""
    h = x.double()
    i = 0
    for mod in dense_model:
        if isinstance(mod, nn.Linear):
            w = mod.weight.detach().double() * masks[i]
            if low_rank is not None:
                w = w + low_rank[i]
            h = F.linear(h, w, mod.bias.detach().double())
            i += 1
        else:
            h = mod(h)
    return h


def test_sparsify_block_pattern(isa):
    model = _mlp()
    dense = copy.deepcopy(model)
    out = sparsify_(model, 0.5, pattern="block:16")
    assert out is model
    layers = [m for m in model if isinstance(m, SparseLinear)]
    assert len(layers) == 3 and not any(type(m) is nn.Linear for m in model)
    masks = []
    for layer, lin in zip(layers, [m for m in dense if isinstance(m, nn.Linear)]):
        assert layer.pattern == Block(16)
        bm, keep = _brute_block_magnitude(lin.weight.detach(), 0.5, 16)
        mask = _expand(bm, lin.out_features, lin.in_features, 16)
        assert torch.equal(layer.mask, mask) and layer.format.nblocks == keep
        masks.append(mask)
    x = torch.randn(6, 40)
    assert_close_rms(model(x), _masked_forward(dense, masks, x), torch.float32, name="sparsified model")
    with pytest.raises(ValueError, match="^sparsity:"):
        sparsify_(copy.deepcopy(dense), pattern="block:16")
    with pytest.raises(ValueError, match="^scope:"):
        sparsify_(copy.deepcopy(dense), 0.5, pattern="block:16", scope="global")


def test_sparsify_block_pattern_carrying_its_sparsity():
    """``Block(16, sparsity=0.5)`` carries the sparsity (the docstring of sparsify_ says so): same masks as ``0.5``."""
    model = _mlp()
    dense = copy.deepcopy(model)
    sparsify_(model, pattern=Block(16, sparsity=0.5))
    layers = [m for m in model if isinstance(m, SparseLinear)]
    assert len(layers) == 3
    for layer, lin in zip(layers, [m for m in dense if isinstance(m, nn.Linear)]):
        bm, _ = _brute_block_magnitude(lin.weight.detach(), 0.5, 16)
        assert torch.equal(layer.mask, _expand(bm, lin.out_features, lin.in_features, 16))


def test_sparsify_butterfly_pattern(isa):
    model = _mlp()
    dense = copy.deepcopy(model)
    pat = Butterfly(butterfly_size=4, n_factors=1, block=8, rank=2)
    sparsify_(model, pattern=pat)
    layers = [m for m in model if isinstance(m, SparseLinear)]
    lins = [m for m in dense if isinstance(m, nn.Linear)]
    assert len(layers) == 3
    masks, low_rank = [], []
    for layer, lin in zip(layers, lins):
        mask = _brute_butterfly(lin.out_features, lin.in_features, 4, 1, 8)
        assert layer.pattern == pat and torch.equal(layer.mask, mask)
        values = _gather(lin.weight.detach() * mask, _index(_grid_mask_of(mask, 8)), 8)
        assert torch.equal(layer.values.detach(), values)
        assert layer.lr_u.shape == (lin.out_features, 2) and layer.lr_v.shape == (2, lin.in_features)
        masks.append(mask)
        low_rank.append(layer.lr_u.detach().double() @ layer.lr_v.detach().double())
    x = torch.randn(6, 40)
    assert_close_rms(model(x), _masked_forward(dense, masks, x, low_rank), torch.float32, name="sparsified model")
    # the low-rank term fits the residual the mask drops: it brings the layer closer to the dense weight
    for layer, lin, mask in zip(layers, lins, masks):
        resid = lin.weight.detach().double() * ~mask
        if resid.norm() == 0:  # a layer the butterfly covers fully
            continue
        assert (resid - layer.lr_u.detach().double() @ layer.lr_v.detach().double()).norm() < resid.norm()
    # rank 0: outputs match the masked dense model alone
    model0 = copy.deepcopy(dense)
    sparsify_(model0, pattern=Butterfly(butterfly_size=4, n_factors=1, block=8))
    assert not hasattr(model0[0], "lr_u") or model0[0].lr_u is None
    assert_close_rms(model0(x), _masked_forward(dense, masks, x), torch.float32, name="sparsified model (rank 0)")


# ---- masks: flat_block_butterfly ----


@pytest.mark.parametrize("out_f,in_f,n,b", [(512, 256, 8, 16), (256, 512, 4, 32), (128, 128, 16, 8),
                                           (512, 128, 2, 64)])
def test_flat_block_butterfly_aligned_density_is_exact(out_f, in_f, n, b):
    for k in range(1, n.bit_length()):
        m = flat_block_butterfly(out_f, in_f, butterfly_size=n, n_factors=k, block=b)
        assert m.shape == (out_f, in_f) and m.dtype == torch.bool
        assert int(m.sum()) * n == (k + 1) * out_f * in_f, f"k={k}: density {m.float().mean():.4f} != {(k + 1) / n}"
        assert is_block_sparse(m, b)
        assert torch.equal(m, _brute_butterfly(out_f, in_f, n, k, b))


BUTTERFLY_CASES = [
    (37, 100, 4, 2, 8, 0),
    (100, 37, 8, 3, 16, 0),
    (1, 3, 2, 1, 8, 0),
    (3, 1, 4, 1, 8, 0),
    (64, 200, 16, 4, 32, 0),
    (300, 70, 16, 2, 64, 0),
    (100, 37, 8, 2, 8, 5),
    (37, 100, 4, 1, 16, 20),
    (96, 96, 8, 3, 16, 1),
]


@pytest.mark.parametrize("out_f,in_f,n,k,b,g", BUTTERFLY_CASES,
                         ids=[f"out{o}-in{i}-n{n}-k{k}-b{b}-g{g}" for o, i, n, k, b, g in BUTTERFLY_CASES])
def test_flat_block_butterfly_matches_brute_force(out_f, in_f, n, k, b, g):
    m = flat_block_butterfly(out_f, in_f, butterfly_size=n, n_factors=k, block=b, global_size=g)
    expected = _brute_butterfly(out_f, in_f, n, k, b, g)
    assert torch.equal(m, expected)
    assert is_block_sparse(m, b)
    # coarsening only adds entries: the density is at least (k + 1) / n
    assert int(m.sum()) * n >= (k + 1) * out_f * in_f or g
    if g:
        assert m[:g].all() and m[:, :g].all()
        # the whole blocks of the global rows and columns are on
        gb = -(-g // b) * b
        assert m[:gb].all() and m[:, :gb].all()


def test_flat_block_butterfly_shuffle_permutes_the_base_rows():
    out_f, in_f, n, k, b = 256, 128, 8, 2, 16
    plain = flat_block_butterfly(out_f, in_f, butterfly_size=n, n_factors=k, block=b)
    base = _base_butterfly(n, k)
    differs = False
    for seed in range(4):
        torch.manual_seed(seed)
        m = flat_block_butterfly(out_f, in_f, butterfly_size=n, n_factors=k, block=b, shuffle=True)
        torch.manual_seed(seed)
        again = flat_block_butterfly(out_f, in_f, butterfly_size=n, n_factors=k, block=b, shuffle=True)
        assert torch.equal(m, again), "a seeded shuffle must be reproducible"
        assert int(m.sum()) == int(plain.sum()) and is_block_sparse(m, b)
        # the tile pattern (one entry per base tile) is the base pattern with its rows permuted
        tiles = m[:: out_f // n, :: in_f // n].numpy()
        assert sorted(map(tuple, tiles.tolist())) == sorted(map(tuple, base.tolist()))
        perm = [next(j for j in range(n) if (base[j] == tiles[i]).all()) for i in range(n)]
        assert sorted(perm) == list(range(n))
        assert torch.equal(m, _brute_butterfly(out_f, in_f, n, k, b, base=base[perm]))
        differs |= not torch.equal(m, plain)
    assert differs, "shuffle=True never changed the mask"


@pytest.mark.parametrize("kwargs,exc,match", [
    pytest.param({"butterfly_size": 6}, ValueError, "^butterfly_size:", id="size-not-power-of-two"),
    pytest.param({"butterfly_size": 1}, ValueError, "^butterfly_size:", id="size-1"),
    pytest.param({"butterfly_size": 4, "n_factors": 3}, ValueError, "^n_factors:", id="n_factors-too-large"),
    pytest.param({"butterfly_size": 16, "n_factors": 0}, ValueError, "^n_factors:", id="n_factors-0"),
    pytest.param({"block": 12}, ValueError, "^block:", id="block-12"),
    pytest.param({"block": 8.0}, TypeError, "^block:", id="block-float"),
    pytest.param({"global_size": -1}, ValueError, "^global_size:", id="global-negative"),
])
def test_flat_block_butterfly_rejects_bad_arguments(kwargs, exc, match):
    with pytest.raises(exc, match=match):
        flat_block_butterfly(64, 64, **kwargs)
    with pytest.raises(exc, match=match):
        Butterfly(**kwargs)


def test_flat_block_butterfly_rejects_bad_sizes():
    with pytest.raises(ValueError, match="out_features"):
        flat_block_butterfly(0, 16)
    with pytest.raises(TypeError, match="^in_features:"):
        flat_block_butterfly(16, 16.0)


# ---- masks: block_magnitude and is_block_sparse ----


@pytest.mark.parametrize("out_f,in_f,b,sparsity", [(37, 50, 8, 0.5), (64, 64, 16, 0.75), (100, 37, 32, 0.3),
                                                   (5, 70, 64, 0.5), (37, 50, 8, 0.0), (24, 40, 8, 0.9)])
def test_block_magnitude_keeps_the_largest_blocks(out_f, in_f, b, sparsity):
    w = torch.randn(out_f, in_f)
    m = block_magnitude(w, sparsity, b)
    bm, keep = _brute_block_magnitude(w, sparsity, b)
    assert m.shape == (out_f, in_f) and m.dtype == torch.bool
    assert int(m[::b, ::b].sum()) == keep
    assert torch.equal(m, _expand(bm, out_f, in_f, b))
    assert is_block_sparse(m, b)
    # the input is untouched and fp64 ranks the same blocks
    assert torch.equal(block_magnitude(w.double(), sparsity, b), m)


def test_block_magnitude_rejects_bad_arguments():
    w = torch.randn(16, 16)
    with pytest.raises(ValueError, match="^sparsity:"):
        block_magnitude(w, 1.0, 8)
    with pytest.raises(ValueError, match="^block:"):
        block_magnitude(w, 0.5, 12)
    with pytest.raises(TypeError, match="^weight:"):
        block_magnitude(torch.ones(16, 16, dtype=torch.int32), 0.5, 8)
    with pytest.raises(ValueError, match="^weight:"):
        block_magnitude(torch.randn(2, 16, 16), 0.5, 8)
    nan = w.clone()
    nan[3, 3] = float("nan")
    with pytest.raises(ValueError, match="^weight:"):
        block_magnitude(nan, 0.5, 8)


def test_is_block_sparse():
    for b in BLOCKS:
        bm = _block_mask(*_grid(37, 100, b), 0.5)
        m = _expand(bm, 37, 100, b)
        assert is_block_sparse(m, b)
        assert is_block_sparse(torch.zeros(37, 100, dtype=torch.bool), b)
        assert is_block_sparse(torch.ones(37, 100, dtype=torch.bool), b)
        bad = m.clone()
        r, c = 0, 0
        bad[r, c] = not bool(bad[r, c])
        assert not is_block_sparse(bad, b)
    # block-constant at 16 is block-constant at 8, not the other way round
    m16 = _expand(_block_mask(3, 3, 0.5), 40, 40, 16)
    assert is_block_sparse(m16, 8)
    m8 = _expand(torch.tensor([[1, 0], [0, 1]], dtype=torch.bool), 16, 16, 8)
    assert is_block_sparse(m8, 8) and not is_block_sparse(m8, 16)
    assert not is_block_sparse(torch.eye(16, dtype=torch.bool), 8)
