"""The CSR forward checks its column index inside the kernel (each row before it is read through, at
small batches): every malformed index is still refused with the entry named, on both ISAs, both batch
paths and 1 or 2 threads, and the output buffer is left untouched; a valid one gives the fp64 result."""

import numpy as np
import pytest
import torch

import sparseops

pytestmark = pytest.mark.skipif(not sparseops.cpp_available(), reason="sparseops._C is not built")

IN = 50


def _C():
    from sparseops._cpp import _C as ext

    return ext


def _index(rows=9, k=(0, 1, 7, 8, 9, 17, 25, 40, 3)):
    """CSR of ``rows`` rows with the given lengths (empty rows, rows under 8, exactly 8, and with a tail)."""
    g = torch.Generator().manual_seed(0)
    cols = [torch.randperm(IN, generator=g)[:n].sort().values for n in k[:rows]]
    crow = torch.tensor([0] + [len(c) for c in cols]).cumsum(0).to(torch.int32)
    col = torch.cat(cols).to(torch.int32)
    return crow, col


def _break(crow, col, row, at, kind):
    """A copy of ``col`` with entry ``at`` of row ``row`` made bad."""
    col = col.clone()
    s, e = int(crow[row]), int(crow[row + 1])
    j = s + (at if at >= 0 else e - s + at)
    if kind == "past-in":
        col[j] = IN
    elif kind == "far-past-in":
        col[j] = 2**31 - 1
    elif kind == "negative":
        col[j] = -1
    elif kind == "duplicate":
        col[j] = col[j - 1]
    elif kind == "descending":
        col[j - 1], col[j] = col[j].clone(), col[j - 1].clone()
    return col


# (row, position in the row): the first entry, inside the 8-wide part, in the scalar tail, the last row
WHERE = [(3, 0), (5, 9), (5, -1), (6, 12), (8, -1), (7, 3)]
KINDS = ["past-in", "far-past-in", "negative", "duplicate", "descending"]


# an order fault needs an entry before it in its row: not at position 0
CASES = [pytest.param(kind, where, id=f"{kind}-row{where[0]}-at{where[1]}")
         for kind in KINDS for where in WHERE if not (kind in ("duplicate", "descending") and where[1] == 0)]


@pytest.mark.parametrize("batch", [1, 3, 16])
@pytest.mark.parametrize("threads", [1, 2])
@pytest.mark.parametrize("kind,where", CASES)
def test_malformed_column_is_refused_and_y_untouched(isa, batch, threads, kind, where):
    row, at = where
    crow, col = _index()
    bad = _break(crow, col, row, at, kind)
    x = torch.randn(batch, IN).numpy()
    v = torch.randn(col.numel()).numpy()
    y = np.full((batch, crow.numel() - 1), 7.0, np.float32)
    with pytest.raises(ValueError, match=r"^col: (index|indices must be sorted)"):
        _C().csr_dds(x, v, crow.numpy(), bad.numpy(), None, y, threads)
    assert (y == 7.0).all(), "the output was written before the index was refused"


@pytest.mark.parametrize("batch", [1, 3, 7, 8, 16])
@pytest.mark.parametrize("threads", [1, 2])
def test_valid_index_gives_the_fp64_product(isa, batch, threads):
    crow, col = _index()
    x = torch.randn(batch, IN)
    v = torch.randn(col.numel())
    b = torch.randn(crow.numel() - 1)
    y = np.full((batch, crow.numel() - 1), np.nan, np.float32)  # poisoned: every entry must be written
    _C().csr_dds(x.numpy(), v.numpy(), crow.numpy(), col.numpy(), b.numpy(), y, threads)
    w = torch.zeros(crow.numel() - 1, IN, dtype=torch.float64)
    rows = torch.repeat_interleave(torch.arange(crow.numel() - 1), crow.long().diff())
    w[rows, col.long()] = v.double()
    ref = x.double() @ w.t() + b.double()
    assert np.isfinite(y).all()
    np.testing.assert_allclose(y, ref.numpy(), rtol=1e-5, atol=1e-5)


def test_bad_row_pointers_are_named_before_any_kernel(isa):
    crow, col = _index()
    x = torch.randn(1, IN).numpy()
    v = torch.randn(col.numel()).numpy()
    y = np.full((1, crow.numel() - 1), 7.0, np.float32)
    down = crow.clone()
    down[4] = down[3] - 1
    with pytest.raises(ValueError, match=r"^crow: must be non-decreasing \(at 3\)"):
        _C().csr_dds(x, v, down.numpy(), col.numpy(), None, y, 1)
    end = crow.clone()
    end[-1] -= 1
    with pytest.raises(ValueError, match=r"^crow: must start at 0 and end at nnz"):
        _C().csr_dds(x, v, end.numpy(), col.numpy(), None, y, 1)
    assert (y == 7.0).all()
