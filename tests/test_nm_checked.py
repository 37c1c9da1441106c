"""The N:M forward checks its 4-bit positions inside the kernel (each row before it is read through, at
small batches): a position at or past m is refused with the entry named, on both ISAs, every small-batch
kernel (2:4's, the window and the gather kernels), the batched path and 16-bit weights, with the output
buffer untouched; a valid index gives the fp64 result."""

import numpy as np
import pytest
import torch

import sparseops
from sparseops.formats import NMWeight

pytestmark = pytest.mark.skipif(not sparseops.cpp_available(), reason="sparseops._C is not built")

OUT, IN = 13, 70


def _C():
    from sparseops._cpp import _C as ext

    return ext


def _case(n, m, seed=0):
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(OUT, IN, generator=g)
    mask = sparseops.masks.nm(w, n, m)  # the n largest of every m (70 % m: a padded last group)
    fmt, values = NMWeight.from_dense(w, mask, n, m)
    return fmt, values


def _set_position(idx, row, slot, pos):
    """A copy of the packed 4-bit positions with slot ``slot`` of row ``row`` set to ``pos``."""
    idx = idx.clone()
    byte, hi = divmod(slot, 2)
    old = int(idx[row, byte])
    idx[row, byte] = (old & 0x0F) | (pos << 4) if hi else (old & 0xF0) | pos
    return idx


# 2:4 (its own kernel), 1:4 and 2:8 (the window kernels), 1:16 (never invalid), 3:7 and 2:12 (the gather kernel)
PATTERNS = [(2, 4), (1, 4), (2, 8), (3, 7), (2, 12)]
# (row, slot): the first slot, a slot inside the 8-slot blocks, the last slot, the last row
WHERE = [(0, 0), (5, 9), (7, -1), (OUT - 1, 3)]


@pytest.mark.parametrize("batch", [1, 3, 16])
@pytest.mark.parametrize("threads", [1, 2])
@pytest.mark.parametrize("n,m", PATTERNS, ids=lambda v: str(v))
@pytest.mark.parametrize("where", WHERE, ids=lambda w: f"row{w[0]}-slot{w[1]}")
@pytest.mark.parametrize("pos", ["m", "15"])
def test_position_past_m_is_refused_and_y_untouched(isa, batch, threads, n, m, where, pos):
    fmt, values = _case(n, m)
    S = values.shape[1]
    row, slot = where[0], where[1] % S
    bad = _set_position(fmt.idx, row, slot, m if pos == "m" else 15)
    y = np.full((batch, OUT), 7.0, np.float32)
    with pytest.raises(ValueError, match=rf"^idx: row {row} slot {slot} holds position"):
        _C().nm_dds(torch.randn(batch, IN).numpy(), values.numpy(), bad.numpy(), n, m, None, y, threads)
    assert (y == 7.0).all(), "the output was written before the index was refused"
    if batch <= 7:
        y16 = np.full((batch, OUT), 7.0, np.float32)
        v16 = values.to(torch.bfloat16).view(torch.int16).numpy()
        with pytest.raises(ValueError, match=rf"^idx: row {row} slot {slot} holds position"):
            _C().nm_dds16(torch.randn(batch, IN).numpy(), v16, "bfloat16", bad.numpy(), n, m, None, y16, threads)
        assert (y16 == 7.0).all()


@pytest.mark.parametrize("batch", [1, 3, 7, 8, 16])
@pytest.mark.parametrize("n,m", PATTERNS + [(1, 16)], ids=lambda v: str(v))
def test_valid_index_gives_the_fp64_product(isa, batch, n, m):
    fmt, values = _case(n, m, seed=1)
    x = torch.randn(batch, IN)
    b = torch.randn(OUT)
    y = np.full((batch, OUT), np.nan, np.float32)  # poisoned: every entry must be written
    _C().nm_dds(x.numpy(), values.numpy(), fmt.idx.numpy(), n, m, b.numpy(), y, 2)
    ref = x.double() @ fmt.to_dense(values).double().t() + b.double()
    assert np.isfinite(y).all()
    np.testing.assert_allclose(y, ref.numpy(), rtol=1e-5, atol=1e-5)
