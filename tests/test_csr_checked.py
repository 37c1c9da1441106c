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


# ---- the 16-bit decode: a bf16/fp16 weight read as it is (csr_dds16) ----

HALF = [torch.bfloat16, torch.float16]
NAME = {torch.bfloat16: "bfloat16", torch.float16: "float16"}


def _i16(values):
    return values.contiguous().view(torch.int16).numpy()


@pytest.mark.parametrize("dtype", HALF, ids=str)
@pytest.mark.parametrize("batch", [1, 2, 7])
@pytest.mark.parametrize("threads", [1, 2])
def test_dds16_equals_the_fp32_copy_bit_for_bit(isa, dtype, batch, threads):
    crow, col = _index()
    v = torch.randn(col.numel()).to(dtype)
    x = torch.randn(batch, IN)
    b = torch.randn(crow.numel() - 1)
    y16 = np.full((batch, crow.numel() - 1), np.nan, np.float32)  # poisoned: every entry must be written
    _C().csr_dds16(x.numpy(), _i16(v), NAME[dtype], crow.numpy(), col.numpy(), b.numpy(), y16, threads)
    y32 = np.full_like(y16, np.nan)
    _C().csr_dds(x.numpy(), v.float().numpy(), crow.numpy(), col.numpy(), b.numpy(), y32, threads)
    assert np.isfinite(y16).all()
    assert np.array_equal(y16, y32)
    w = torch.zeros(crow.numel() - 1, IN, dtype=torch.float64)
    rows = torch.repeat_interleave(torch.arange(crow.numel() - 1), crow.long().diff())
    w[rows, col.long()] = v.double()
    np.testing.assert_allclose(y16, (x.double() @ w.t() + b.double()).numpy(), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("dtype", HALF, ids=str)
@pytest.mark.parametrize("kind,where", [c for c in CASES if c.values[0] in ("past-in", "negative", "descending")])
def test_dds16_refuses_a_malformed_column_and_leaves_y(isa, dtype, kind, where):
    crow, col = _index()
    bad = _break(crow, col, where[0], where[1], kind)
    v = torch.randn(col.numel()).to(dtype)
    y = np.full((2, crow.numel() - 1), 7.0, np.float32)
    with pytest.raises(ValueError, match=r"^col: (index|indices must be sorted)"):
        _C().csr_dds16(torch.randn(2, IN).numpy(), _i16(v), NAME[dtype], crow.numpy(), bad.numpy(), None, y, 2)
    assert (y == 7.0).all()


def test_dds16_refuses_bad_arguments():
    crow, col = _index()
    v16 = _i16(torch.randn(col.numel()).to(torch.bfloat16))
    x = torch.randn(3, IN).numpy()
    y = np.empty((3, crow.numel() - 1), np.float32)
    _C().csr_dds16(x, v16, "bfloat16", crow.numpy(), col.numpy(), None, y, 1)  # valid
    with pytest.raises(ValueError, match=r"^dtype: "):
        _C().csr_dds16(x, v16, "float32", crow.numpy(), col.numpy(), None, y, 1)
    with pytest.raises(TypeError, match=r"^values: expected an int16/uint16 view"):
        _C().csr_dds16(x, torch.randn(col.numel()).numpy(), "bfloat16", crow.numpy(), col.numpy(), None, y, 1)
    with pytest.raises(ValueError, match=r"^values: expected shape"):
        _C().csr_dds16(x, v16[:-1], "bfloat16", crow.numpy(), col.numpy(), None, y, 1)
    with pytest.raises(ValueError, match=r"^values: must be C-contiguous"):
        _C().csr_dds16(x, np.repeat(v16, 2)[::2], "bfloat16", crow.numpy(), col.numpy(), None, y, 1)
    with pytest.raises(ValueError, match=r"^x: at most 7 rows"):
        _C().csr_dds16(np.zeros((8, IN), np.float32), v16, "bfloat16", crow.numpy(), col.numpy(), None,
                       np.empty((8, crow.numel() - 1), np.float32), 1)
    with pytest.raises(ValueError, match=r"^crow: must start at 0"):
        _C().csr_dds16(x, v16, "bfloat16", (crow + 1).numpy(), col.numpy(), None, y, 1)
    buf = np.zeros(400, np.float32)
    with pytest.raises(ValueError, match="shares memory"):
        _C().csr_dds16(buf[:3 * IN].reshape(3, IN), v16, "bfloat16", crow.numpy(), col.numpy(), None,
                       buf[100:127].reshape(3, 9), 1)
    raw = bytearray(v16.nbytes + 1)  # values at an odd address: read through a uint16_t*, undefined
    misaligned = np.frombuffer(raw, dtype=np.int16, offset=1, count=v16.size)
    with pytest.raises(ValueError, match=r"^values: data must be aligned"):
        _C().csr_dds16(x, misaligned, "bfloat16", crow.numpy(), col.numpy(), None, y, 1)


@pytest.mark.parametrize("dtype", HALF, ids=str)
@pytest.mark.parametrize("batch", [1, 7, 8])
@pytest.mark.parametrize("pattern", ["unstructured", "fanin"])
def test_16bit_layer_decode_takes_the_16bit_kernel_up_to_7_rows(isa, monkeypatch, dtype, batch, pattern):
    from sparseops.ops import csr as ops_csr

    calls = []
    real = _C()

    class Spy:
        def __getattr__(self, name):
            fn = getattr(real, name)
            if name.startswith("csr_dds"):
                return lambda *a, **k: (calls.append(name), fn(*a, **k))[1]
            return fn

    monkeypatch.setattr(ops_csr, "_C", Spy())
    torch.manual_seed(1)
    lin = torch.nn.Linear(IN, 23)
    kw = {"pattern": sparseops.FanIn(7)} if pattern == "fanin" else {"sparsity": 0.8}
    layer = sparseops.SparseLinear.from_dense(lin, **kw).to(dtype)
    x = torch.randn(batch, IN).to(dtype)
    with torch.no_grad():
        y = layer(x)
    ref = x.double() @ layer.dense_weight().detach().double().t() + layer.bias.detach().double()
    assert y.dtype == dtype
    torch.testing.assert_close(y.double(), ref, rtol=2e-2, atol=2e-2)
    assert calls == ["csr_dds16" if batch <= ops_csr.CSR16_MAX_ROWS else "csr_dds"]
    # the 16-bit kernel gives the fp32-copy path's result, rounded once: bit for bit
    monkeypatch.setattr(ops_csr, "CSR16_MAX_ROWS", 0)
    with torch.no_grad():
        assert torch.equal(layer(x), y)
