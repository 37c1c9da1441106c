"""Sizes past 2**31 elements: index arithmetic is 64-bit.

A dense ``[out, in]`` weight here would hold ~2.8e9 (CSR) and ~4.6e9 (block) elements, more than an
int32 can count, but the layers are extremely sparse, so every tensor the ops touch is small (a few
MB). Nonzeros sit in the far corners (last row, last column), where ``row * in + col`` or a block
offset computed in 32 bits would wrap. Each product is checked against an fp64 oracle written from the
definition (index_add over the COO entries), on both CPU ISA paths, at batch 1 (gather kernels) and
batch 9 (the batched kernels).
"""

import pytest
import torch

from helpers import assert_close_rms
from sparseops.formats import BSRWeight, CSRWeight

INT32_MAX = 2**31 - 1


def _tall_csr(out_f, in_f, nnz, seed):
    g = torch.Generator().manual_seed(seed)
    corners = torch.tensor([0, in_f - 1, (out_f - 1) * in_f, out_f * in_f - 1, (out_f // 2) * in_f + in_f // 2])
    flat = torch.cat([torch.randint(0, out_f * in_f, (nnz,), generator=g, dtype=torch.int64), corners]).unique()
    rows, cols = flat // in_f, flat % in_f
    crow = torch.zeros(out_f + 1, dtype=torch.int64)
    crow[1:] = torch.cumsum(torch.bincount(rows, minlength=out_f), 0)
    fmt = CSRWeight.from_crow_col(out_f, in_f, crow.to(torch.int32), cols.to(torch.int32))
    values = torch.randn(fmt.nnz, generator=g)
    return fmt, values, rows, cols


@pytest.mark.parametrize("batch", [1, 9])
def test_csr_past_int32_elements(isa, batch):
    out_f, in_f = 70001, 40003
    assert out_f * in_f > INT32_MAX
    fmt, values, rows, cols = _tall_csr(out_f, in_f, 3000, seed=batch)
    g = torch.Generator().manual_seed(100 + batch)
    x = torch.randn(batch, in_f, generator=g)
    dy = torch.randn(batch, out_f, generator=g)
    bias = torch.randn(out_f, generator=g)
    xd, dyd, vd = x.double(), dy.double(), values.double()

    y = torch.ops.sparseops.csr_dds(x, values, fmt.crow, fmt.col, bias, out_f)
    ref = bias.double().expand(batch, out_f).clone().index_add_(1, rows, xd[:, cols] * vd)
    assert_close_rms(y, ref, name="y")
    # rows with no nonzero get exactly the bias (nothing else wrote there)
    empty = torch.ones(out_f, dtype=torch.bool)
    empty[rows] = False
    assert torch.equal(y[:, empty], bias[empty].expand(batch, -1))

    dx = torch.ops.sparseops.csr_dsd(dy, values, fmt.t_crow, fmt.t_row, fmt.t_perm, in_f)
    assert_close_rms(dx, torch.zeros(batch, in_f, dtype=torch.float64).index_add_(1, cols, dyd[:, rows] * vd), name="dx")

    dv = torch.ops.sparseops.csr_sdd(dy, x, fmt.crow, fmt.col, fmt.row)
    assert_close_rms(dv, (dyd[:, rows] * xd[:, cols]).sum(0), name="dvalues")


@pytest.mark.parametrize("batch", [1, 9])
def test_bsr_past_int32_elements(isa, batch):
    b = 32
    out_f, in_f = 70001, 65003  # not multiples of the block: the last block row and column are partial
    assert out_f * in_f > 2 * INT32_MAX
    nbr, nbc = -(-out_f // b), -(-in_f // b)
    g = torch.Generator().manual_seed(batch)
    grid = torch.zeros(nbr, nbc, dtype=torch.bool)
    grid.view(-1)[torch.randint(0, nbr * nbc, (24,), generator=g)] = True
    grid[0, 0] = grid[-1, -1] = grid[-1, 0] = grid[0, -1] = True
    fmt = BSRWeight.from_block_mask(grid, out_f, in_f, b)
    brow, bcol = fmt.grid.row.long(), fmt.grid.col.long()
    values = torch.randn(fmt.nblocks, b, b, generator=g)
    # the padding of the partial blocks holds zeros, as the layer stores it
    for k in range(fmt.nblocks):
        values[k, max(0, out_f - int(brow[k]) * b):, :] = 0
        values[k, :, max(0, in_f - int(bcol[k]) * b):] = 0
    x = torch.randn(batch, in_f, generator=g)
    dy = torch.randn(batch, out_f, generator=g)
    bias = torch.randn(out_f, generator=g)

    xp = torch.nn.functional.pad(x.double(), (0, nbc * b - in_f))
    dyp = torch.nn.functional.pad(dy.double(), (0, nbr * b - out_f))
    y_ref = torch.zeros(batch, nbr * b, dtype=torch.float64)
    dx_ref = torch.zeros(batch, nbc * b, dtype=torch.float64)
    dv_ref = torch.empty(fmt.nblocks, b, b, dtype=torch.float64)
    for k in range(fmt.nblocks):
        rs, cs = slice(int(brow[k]) * b, int(brow[k]) * b + b), slice(int(bcol[k]) * b, int(bcol[k]) * b + b)
        w = values[k].double()
        y_ref[:, rs] += xp[:, cs] @ w.T
        dx_ref[:, cs] += dyp[:, rs] @ w
        dv_ref[k] = dyp[:, rs].T @ xp[:, cs]
    dv_ref[values == 0] = 0  # compare on the stored positions that are inside the matrix

    y = torch.ops.sparseops.bsr_dds(x, values, fmt.grid.crow, fmt.grid.col, bias, out_f)
    assert_close_rms(y, y_ref[:, :out_f] + bias.double(), name="y")
    dx = torch.ops.sparseops.bsr_dsd(dy, values, fmt.grid.t_crow, fmt.grid.t_row, fmt.grid.t_perm, in_f)
    assert_close_rms(dx, dx_ref[:, :in_f], name="dx")
    dv = torch.ops.sparseops.bsr_sdd(dy, x, fmt.grid.row, fmt.grid.col, b)
    assert_close_rms(dv.masked_fill(values == 0, 0), dv_ref, name="dvalues")
