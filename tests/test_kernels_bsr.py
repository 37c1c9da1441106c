"""The Triton block-sparse kernels against an fp64 dense reference (interpreter on CPU, or CUDA when present)."""

import pytest
import torch
import torch.nn.functional as F
from helpers import assert_close_rms

from sparseops.kernels import bsr as K

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")


# --------------------------------------------------------------------------- format helpers


def _grid(out_f, in_f, b):
    return -(-out_f // b), -(-in_f // b)


def _random_block_mask(out_f, in_f, b, density, empty_rows=(), empty_cols=()):
    """A random ``[nbr, nbc]`` block mask with about ``density`` of the blocks kept."""
    nbr, nbc = _grid(out_f, in_f, b)
    mask = torch.rand(nbr, nbc) < density
    mask[list(empty_rows), :] = False
    mask[:, list(empty_cols)] = False
    return mask


def _index(mask):
    """``crow, bcol, brow, t_crow, t_row, t_perm`` (int32) of a block mask, in pure torch."""
    brow, bcol = mask.nonzero(as_tuple=True)  # row-major: block columns ascend within a row
    nbr = mask.shape[0]
    crow = F.pad(mask.sum(1).cumsum(0), (1, 0))
    t_crow = F.pad(mask.sum(0).cumsum(0), (1, 0))
    # block column major, block rows ascending within a column
    t_perm = (bcol * nbr + brow).argsort()
    t_row = brow[t_perm]
    i32 = {"dtype": torch.int32}
    return {
        "crow": crow.to(**i32),
        "bcol": bcol.to(**i32),
        "brow": brow.to(**i32),
        "t_crow": t_crow.to(**i32),
        "t_row": t_row.to(**i32),
        "t_perm": t_perm.to(**i32),
    }


def _pad_mask(idx, out_f, in_f, b):
    """``[nblk, b, b]`` True where a block entry lies inside ``[out, in]``."""
    r = idx["brow"].long()[:, None, None] * b + torch.arange(b)[None, :, None]
    c = idx["bcol"].long()[:, None, None] * b + torch.arange(b)[None, None, :]
    return (r < out_f) & (c < in_f)


def _to_dense(values, idx, out_f, in_f, b):
    """The dense ``[out, in]`` weight of ``values``, by the format's definition."""
    nbr, nbc = _grid(out_f, in_f, b)
    blocks = torch.zeros(nbr, nbc, b, b, dtype=values.dtype)
    blocks[idx["brow"].long(), idx["bcol"].long()] = values
    return blocks.transpose(1, 2).reshape(nbr * b, nbc * b)[:out_f, :in_f]


def _gather_blocks(dense, idx, b):
    """The stored blocks of a dense ``[out, in]`` matrix, zero-padded: ``[nblk, b, b]``."""
    out_f, in_f = dense.shape
    nbr, nbc = _grid(out_f, in_f, b)
    padded = F.pad(dense, (0, nbc * b - in_f, 0, nbr * b - out_f))
    blocks = padded.reshape(nbr, b, nbc, b).transpose(1, 2)
    return blocks[idx["brow"].long(), idx["bcol"].long()]


def _case(out_f, in_f, batch, b, density, dtype=torch.float32, mask=None):
    """Kernel inputs in ``dtype`` on DEVICE, and fp64 copies of the same (rounded) numbers."""
    mask = _random_block_mask(out_f, in_f, b, density) if mask is None else mask
    idx = _index(mask)
    values = torch.randn(idx["bcol"].numel(), b, b) * _pad_mask(idx, out_f, in_f, b)
    # drawn in fp32 and rounded, so the reference sees exactly the kernel's inputs
    t = {
        "x": torch.randn(batch, in_f),
        "dy": torch.randn(batch, out_f),
        "values": values,
        "bias": torch.randn(out_f),
    }
    t = {k: v.to(dtype) for k, v in t.items()}
    ref = {k: v.double() for k, v in t.items()}
    ref["w"] = _to_dense(ref["values"], idx, out_f, in_f, b)
    t = {k: v.to(DEVICE) for k, v in t.items()}
    t.update({k: v.to(DEVICE) for k, v in idx.items()})
    t["out_f"], t["in_f"], t["b"] = out_f, in_f, b
    return t, ref


def _dds(t, bias, **kw):
    return K.bsr_dds(t["x"], t["values"], t["crow"], t["bcol"], t["bias"] if bias else None, t["out_f"], **kw)


def _dsd(t, **kw):
    return K.bsr_dsd(t["dy"], t["values"], t["t_crow"], t["t_row"], t["t_perm"], t["in_f"], **kw)


def _sdd(t, **kw):
    return K.bsr_sdd(t["dy"], t["x"], t["brow"], t["bcol"], t["b"], **kw)


def _dds_ref(ref, bias):
    y = ref["x"] @ ref["w"].T
    return y + ref["bias"] if bias else y


def _dsd_ref(ref):
    return ref["dy"] @ ref["w"]


def _sdd_ref(t, ref):
    """The dense fp64 gradient ``dyᵀ x`` read at the stored blocks (0 in the padding)."""
    idx = {k: t[k].cpu() for k in ("brow", "bcol")}
    return _gather_blocks(ref["dy"].T @ ref["x"], idx, t["b"])


def _check_all(t, ref, bias=True, name=""):
    assert_close_rms(_dds(t, bias), _dds_ref(ref, bias), name=f"dds{name}")
    assert_close_rms(_dsd(t), _dsd_ref(ref), name=f"dsd{name}")
    assert_close_rms(_sdd(t), _sdd_ref(t, ref), name=f"sdd{name}")


# --------------------------------------------------------------------------- tests


def test_format_helpers():
    # the test's own format builder: dense round trip, transposed index, padding zeroed
    t, ref = _case(37, 45, 1, 16, 0.5)
    idx = {k: t[k].cpu() for k in ("crow", "bcol", "brow", "t_crow", "t_row", "t_perm")}
    assert torch.equal(_gather_blocks(ref["w"], idx, 16), ref["values"])
    perm = idx["t_perm"].long()
    assert torch.equal(idx["t_row"], idx["brow"][perm])
    assert (idx["bcol"][perm].diff() >= 0).all()
    assert torch.equal(idx["t_crow"][1:].long(), torch.bincount(idx["bcol"].long(), minlength=3).cumsum(0))


# (b, batch, in, out, density): out/in of 1, 3, 37, 100 divide by no block size; batch 1 and 37
# (past one 32-row tile and two 16-row chunks, with a tail); density 1 keeps every block
CASES = [
    pytest.param(8, 37, 37, 100, 0.5, id="b8-B37-in37-out100-d0.5"),
    pytest.param(8, 1, 3, 1, 1.0, id="b8-B1-in3-out1-d1"),
    pytest.param(16, 37, 100, 37, 0.4, id="b16-B37-in100-out37-d0.4"),
    pytest.param(16, 1, 1, 3, 1.0, id="b16-B1-in1-out3-d1"),
    pytest.param(32, 37, 37, 37, 1.0, id="b32-B37-in37-out37-d1"),
    pytest.param(32, 37, 100, 3, 0.5, id="b32-B37-in100-out3-d0.5"),
    pytest.param(32, 1, 37, 100, 0.5, id="b32-B1-in37-out100-d0.5"),
    pytest.param(64, 37, 100, 37, 0.5, id="b64-B37-in100-out37-d0.5"),
    # features that divide by b (the padded activations some callers pass): no masked tail
    pytest.param(16, 37, 64, 32, 0.5, id="b16-B37-in64-out32-d0.5"),
]


@pytest.mark.parametrize("bias", [True, False], ids=["bias", "nobias"])
@pytest.mark.parametrize("b, batch, in_f, out_f, density", CASES)
def test_bsr_dds(b, batch, in_f, out_f, density, bias):
    t, ref = _case(out_f, in_f, batch, b, density)
    y = _dds(t, bias)
    assert y.shape == (batch, out_f) and y.dtype == torch.float32
    assert_close_rms(y, _dds_ref(ref, bias), name="dds")


@pytest.mark.parametrize("b, batch, in_f, out_f, density", CASES)
def test_bsr_dsd(b, batch, in_f, out_f, density):
    t, ref = _case(out_f, in_f, batch, b, density)
    dx = _dsd(t)
    assert dx.shape == (batch, in_f) and dx.dtype == torch.float32
    assert_close_rms(dx, _dsd_ref(ref), name="dsd")


@pytest.mark.parametrize("b, batch, in_f, out_f, density", CASES)
def test_bsr_sdd(b, batch, in_f, out_f, density):
    t, ref = _case(out_f, in_f, batch, b, density)
    dv = _sdd(t)
    assert dv.shape == t["values"].shape and dv.dtype == torch.float32
    assert_close_rms(dv, _sdd_ref(t, ref), name="sdd")
    # padding gets exactly 0, not merely something small
    pad = ~_pad_mask({k: t[k].cpu() for k in ("brow", "bcol")}, out_f, in_f, b)
    assert (dv.cpu()[pad] == 0).all()


@pytest.mark.parametrize("b", [8, 32], ids=["b8", "b32"])
def test_no_blocks(b):
    # density 0: no stored block, yet every output element is written
    t, ref = _case(37, 37, 37, b, 0.0)
    assert t["values"].shape == (0, b, b)
    assert torch.equal(_dds(t, True), t["bias"].expand(37, 37))
    assert torch.equal(_dds(t, False), torch.zeros(37, 37, device=DEVICE))
    assert torch.equal(_dsd(t), torch.zeros(37, 37, device=DEVICE))
    assert _sdd(t).shape == (0, b, b)


@pytest.mark.parametrize("b", [8, 16], ids=["b8", "b16"])
def test_empty_block_rows_and_columns(b):
    # the first, a middle and the last (partial) block row and column hold no block
    out_f, in_f = 100, 75
    nbr, nbc = _grid(out_f, in_f, b)
    mask = _random_block_mask(out_f, in_f, b, 1.0, empty_rows=(0, 2, nbr - 1), empty_cols=(0, 3, nbc - 1))
    t, ref = _case(out_f, in_f, 37, b, 1.0, mask=mask)
    assert (t["crow"].diff() == 0).sum() == 3 and (t["t_crow"].diff() == 0).sum() == 3
    _check_all(t, ref)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
@pytest.mark.parametrize("b", [8, 32], ids=["b8", "b32"])
def test_half_dtypes(b, dtype):
    t, ref = _case(37, 37, 37, b, 0.6, dtype)
    y, dx, dv = _dds(t, True), _dsd(t), _sdd(t)
    assert y.dtype == dx.dtype == dv.dtype == dtype
    assert_close_rms(y, _dds_ref(ref, True), name="dds")
    assert_close_rms(dx, _dsd_ref(ref), name="dsd")
    assert_close_rms(dv, _sdd_ref(t, ref), name="sdd")


@pytest.mark.parametrize("b", [8, 16], ids=["b8", "b16"])
def test_noncontiguous_inputs(b):
    t, ref = _case(37, 37, 37, b, 0.6)
    # transposed storage
    t["x"], t["dy"] = t["x"].t().contiguous().t(), t["dy"].t().contiguous().t()
    assert not t["x"].is_contiguous() and not t["dy"].is_contiguous()
    _check_all(t, ref, name="-transposed")
    # column-strided views of wider buffers
    x2 = torch.randn(37, 74, device=DEVICE)
    x2[:, ::2] = t["x"]
    dy2 = torch.randn(37, 74, device=DEVICE)
    dy2[:, 1::2] = t["dy"]
    t["x"], t["dy"] = x2[:, ::2], dy2[:, 1::2]
    assert not t["x"].is_contiguous() and not t["dy"].is_contiguous()
    _check_all(t, ref, name="-sliced")


@pytest.mark.parametrize("b", [8, 32], ids=["b8", "b32"])
def test_padding_never_read(b):
    # x and dy are views into wider buffers that hold NaN past their columns, and the padding
    # of values holds NaN: a read of either would show up in every product
    out_f, in_f = 37, 45
    t, ref = _case(out_f, in_f, 37, b, 1.0)
    for name, cols in (("x", in_f), ("dy", out_f)):
        wide = torch.full((37, cols + 64), float("nan"), device=DEVICE)
        wide[:, :cols] = t[name]
        t[name] = wide[:, :cols]
    pad = ~_pad_mask({k: t[k].cpu() for k in ("brow", "bcol")}, out_f, in_f, b).to(DEVICE)
    t["values"] = t["values"].masked_fill(pad, float("nan"))
    y, dx, dv = _dds(t, True), _dsd(t), _sdd(t)
    assert not y.isnan().any() and not dx.isnan().any() and not dv.isnan().any()
    _check_all(t, ref)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_out_buffer_fully_written(dtype):
    t, ref = _case(37, 45, 37, 16, 0.6, dtype)
    nan = float("nan")
    y = torch.full((37, 37), nan, dtype=dtype, device=DEVICE)
    dx = torch.full((37, 45), nan, dtype=dtype, device=DEVICE)
    dv = torch.full(tuple(t["values"].shape), nan, dtype=dtype, device=DEVICE)
    assert _dds(t, True, out=y) is y
    assert _dsd(t, out=dx) is dx
    assert _sdd(t, out=dv) is dv
    assert_close_rms(y, _dds_ref(ref, True), name="dds")
    assert_close_rms(dx, _dsd_ref(ref), name="dsd")
    assert_close_rms(dv, _sdd_ref(t, ref), name="sdd")
    # strided buffers: the kernels write through the buffers' own strides
    yt = torch.full((37, 37), nan, dtype=dtype, device=DEVICE).t()
    dxt = torch.full((45, 37), nan, dtype=dtype, device=DEVICE).t()
    dvt = torch.full(tuple(t["values"].shape[::-1]), nan, dtype=dtype, device=DEVICE).permute(2, 1, 0)
    _dds(t, False, out=yt)
    _dsd(t, out=dxt)
    _sdd(t, out=dvt)
    assert_close_rms(yt, _dds_ref(ref, False), name="dds-strided-out")
    assert_close_rms(dxt, _dsd_ref(ref), name="dsd-strided-out")
    assert_close_rms(dvt, _sdd_ref(t, ref), name="sdd-strided-out")


def test_empty_batch():
    t, ref = _case(37, 45, 0, 16, 0.6)
    assert _dds(t, True).shape == (0, 37)
    assert _dsd(t).shape == (0, 45)
    # no batch rows: the weight gradient is exactly zero
    assert torch.equal(_sdd(t), torch.zeros(t["values"].shape, device=DEVICE))


@pytest.mark.parametrize("batch", [1, 37], ids=["B1", "B37"])
def test_empty_features(batch):
    # out == 0: no block rows, so no blocks; dx is 0
    t, ref = _case(0, 37, batch, 16, 1.0)
    assert t["values"].shape == (0, 16, 16)
    assert _dds(t, True).shape == (batch, 0)
    assert torch.equal(_dsd(t), torch.zeros(batch, 37, device=DEVICE))
    assert _sdd(t).shape == (0, 16, 16)
    # in == 0: y is the bias (or 0)
    t, ref = _case(37, 0, batch, 16, 1.0)
    assert_close_rms(_dds(t, True), _dds_ref(ref, True), name="dds-in0")
    assert torch.equal(_dds(t, False), torch.zeros(batch, 37, device=DEVICE))
    assert _dsd(t).shape == (batch, 0)


def _bad_inputs():
    t, _ = _case(37, 45, 3, 16, 0.6)
    x, dy, v, b = t["x"], t["dy"], t["values"], t["bias"]
    crow, bcol, brow = t["crow"], t["bcol"], t["brow"]
    tc, tr, tp = t["t_crow"], t["t_row"], t["t_perm"]
    small_out = torch.empty(3, 4, device=DEVICE)
    half_out = torch.empty(3, 37, dtype=torch.float16, device=DEVICE)
    return [
        ("x-int", TypeError, "x", lambda: K.bsr_dds(x.int(), v, crow, bcol, None, 37)),
        ("x-fp64", TypeError, "x", lambda: K.bsr_dds(x.double(), v.double(), crow, bcol, None, 37)),
        ("x-1d", ValueError, "x", lambda: K.bsr_dds(x[0], v, crow, bcol, None, 37)),
        ("x-list", TypeError, "x", lambda: K.bsr_dds(x.tolist(), v, crow, bcol, None, 37)),
        ("values-dtype", TypeError, "values", lambda: K.bsr_dds(x, v.half(), crow, bcol, None, 37)),
        ("values-2d", ValueError, "values", lambda: K.bsr_dds(x, v[0], crow, bcol, None, 37)),
        ("values-b12", ValueError, "values", lambda: K.bsr_dds(x, v[:, :12, :12], crow, bcol, None, 37)),
        ("values-not-square", ValueError, "values", lambda: K.bsr_dds(x, v[:, :, :8], crow, bcol, None, 37)),
        ("crow-length", ValueError, "crow", lambda: K.bsr_dds(x, v, crow, bcol, None, 49)),
        ("crow-dtype", TypeError, "crow", lambda: K.bsr_dds(x, v, crow.long(), bcol, None, 37)),
        ("bcol-length", ValueError, "bcol", lambda: K.bsr_dds(x, v, crow, bcol[:-1], None, 37)),
        ("bias-dtype", TypeError, "bias", lambda: K.bsr_dds(x, v, crow, bcol, b.half(), 37)),
        ("bias-length", ValueError, "bias", lambda: K.bsr_dds(x, v, crow, bcol, b[:-1], 37)),
        ("out-shape", ValueError, "out", lambda: K.bsr_dds(x, v, crow, bcol, None, 37, out=small_out)),
        ("out-dtype", TypeError, "out", lambda: K.bsr_dds(x, v, crow, bcol, None, 37, out=half_out)),
        ("out-features-float", TypeError, "out_features", lambda: K.bsr_dds(x, v, crow, bcol, None, 37.0)),
        ("out-features-negative", ValueError, "out_features", lambda: K.bsr_dds(x, v, crow, bcol, None, -1)),
        ("dsd-dy-dtype", TypeError, "dy", lambda: K.bsr_dsd(dy.short(), v, tc, tr, tp, 45)),
        ("dsd-values-dtype", TypeError, "values", lambda: K.bsr_dsd(dy, v.bfloat16(), tc, tr, tp, 45)),
        ("dsd-t-crow-length", ValueError, "t_crow", lambda: K.bsr_dsd(dy, v, tc, tr, tp, 49)),
        ("dsd-t-row-length", ValueError, "t_row", lambda: K.bsr_dsd(dy, v, tc, tr[:-1], tp, 45)),
        ("dsd-t-perm-dtype", TypeError, "t_perm", lambda: K.bsr_dsd(dy, v, tc, tr, tp.long(), 45)),
        ("dsd-in-negative", ValueError, "in_features", lambda: K.bsr_dsd(dy, v, tc, tr, tp, -1)),
        ("dsd-out-shape", ValueError, "out", lambda: K.bsr_dsd(dy, v, tc, tr, tp, 45, out=small_out)),
        ("sdd-batch", ValueError, "dy", lambda: K.bsr_sdd(dy[:2], x, brow, bcol, 16)),
        ("sdd-dtype", TypeError, "dy", lambda: K.bsr_sdd(dy.half(), x, brow, bcol, 16)),
        ("sdd-block-12", ValueError, "block", lambda: K.bsr_sdd(dy, x, brow, bcol, 12)),
        ("sdd-block-float", TypeError, "block", lambda: K.bsr_sdd(dy, x, brow, bcol, 16.0)),
        ("sdd-brow-length", ValueError, "brow", lambda: K.bsr_sdd(dy, x, brow[:-1], bcol, 16)),
        ("sdd-bcol-dtype", TypeError, "bcol", lambda: K.bsr_sdd(dy, x, brow, bcol.long(), 16)),
        ("sdd-out-shape", ValueError, "out", lambda: K.bsr_sdd(dy, x, brow, bcol, 8, out=v)),
        ("sdd-out-dtype", TypeError, "out", lambda: K.bsr_sdd(dy, x, brow, bcol, 16, out=v.half())),
    ]


def test_bad_inputs_raise():
    for case_id, exc, arg, call in _bad_inputs():
        with pytest.raises(exc, match=rf"^{arg}:"):
            call()


@pytest.mark.skipif(DEVICE.type != "cuda", reason="devices differ only with a GPU")
def test_device_mismatch_raises():
    t, _ = _case(37, 45, 3, 16, 0.6)
    with pytest.raises(ValueError, match=r"^values:"):
        K.bsr_dds(t["x"], t["values"].cpu(), t["crow"], t["bcol"], None, 37)
    with pytest.raises(ValueError, match=r"^brow:"):
        K.bsr_sdd(t["dy"], t["x"], t["brow"].cpu(), t["bcol"], 16)
