"""The Triton N:M kernels against an fp64 dense reference (interpreter on CPU, or CUDA when present)."""

import pytest
import torch
import torch.nn.functional as F
from helpers import assert_close_rms

from sparseops.kernels import nm as K

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")

# 3:5 and 7:16 have a non-power-of-two m and an odd n (an odd S leaves a half byte); m = 16 uses
# every nibble value
NM = [
    pytest.param(2, 4, id="2:4"),
    pytest.param(1, 4, id="1:4"),
    pytest.param(2, 8, id="2:8"),
    pytest.param(3, 5, id="3:5"),
    pytest.param(1, 2, id="1:2"),
    pytest.param(7, 16, id="7:16"),
]


# --------------------------------------------------------------------------- format helpers


def _random_nm_mask(out_f, in_f, n, m, drop=0.3):
    """The ``n`` best of random scores per group of ``m``, then each kept entry dropped with ``drop``."""
    groups = -(-in_f // m)
    keep = torch.rand(out_f, groups, m).argsort(-1).argsort(-1) < n  # n random positions a group
    keep &= torch.rand(out_f, groups, m) >= drop  # some groups fall short of n
    return keep.reshape(out_f, groups * m)[:, :in_f]


def _transposable_mask(out_f, in_f, n, m, drop=0.3):
    """N:M along rows and columns: in each m x m block, ``(j - i + shift) % m < n``, then drops."""
    rows, cols = -(-out_f // m) * m, -(-in_f // m) * m
    i, j = torch.arange(rows)[:, None], torch.arange(cols)[None, :]
    shift = torch.randint(0, m, (rows // m, cols // m)).repeat_interleave(m, 0).repeat_interleave(m, 1)
    keep = (j - i + shift) % m < n
    keep &= torch.rand(rows, cols) >= drop
    return keep[:out_f, :in_f]


def _compress(weight, mask, n, m):
    """``(values, idx)`` of ``weight * mask`` for an N:M ``mask``, in pure torch.

    In each group the sorted True positions fill the slots in order; the unused slots get
    value 0 and the smallest positions the group does not use. Even slots take the low nibble.
    """
    out_f, in_f = mask.shape
    groups = -(-in_f // m)
    pad = groups * m - in_f
    keep = F.pad(mask, (0, pad)).reshape(out_f, groups, m)
    assert (keep.sum(-1) <= n).all(), "mask is not N:M"
    w = F.pad(torch.where(mask, weight, torch.zeros_like(weight)), (0, pad)).reshape(out_f, groups, m)
    # True positions first, then the unused ones, each ascending
    key = (~keep).long() * m + torch.arange(m)
    pos = key.argsort(-1)[..., :n]  # [out, G, n]
    values = w.gather(-1, pos).reshape(out_f, groups * n)
    pos = pos.reshape(out_f, groups * n).to(torch.uint8)
    if pos.shape[1] % 2:
        pos = F.pad(pos, (0, 1))
    idx = pos[:, 0::2] | (pos[:, 1::2] << 4)
    return values.contiguous(), idx.contiguous()


def _slot_cols(idx, slots, n, m):
    """``[out, S]`` column of every slot: ``(j // n) * m + pos``, the nibble unpacked."""
    j = torch.arange(slots)
    pos = (idx[:, j // 2].long() >> (4 * (j % 2))) & 15
    return (j // n) * m + pos


def _decompress(values, idx, in_f, n, m):
    """The dense ``[out, in]`` weight of ``(values, idx)``, by the format's definition."""
    out_f, slots = values.shape
    dense = torch.zeros(out_f, in_f + m, dtype=values.dtype)  # a column past in is < in + m
    dense.scatter_(1, _slot_cols(idx, slots, n, m), values)
    return dense[:, :in_f]


def _case(out_f, in_f, batch, n, m, dtype=torch.float32, drop=0.3, mask=None):
    """Kernel inputs in ``dtype`` on DEVICE, and fp64 copies of the same (rounded) numbers."""
    mask = _random_nm_mask(out_f, in_f, n, m, drop) if mask is None else mask
    # drawn in fp32 and rounded, so the reference sees exactly the kernel's inputs
    t = {
        "x": torch.randn(batch, in_f),
        "dy": torch.randn(batch, out_f),
        "w": torch.randn(out_f, in_f) * mask,
        "bias": torch.randn(out_f),
    }
    t = {k: v.to(dtype) for k, v in t.items()}
    ref = {k: v.double() for k, v in t.items()}
    values, idx = _compress(t["w"], mask, n, m)
    t = {k: v.to(DEVICE) for k, v in t.items()}
    t["values"], t["idx"] = values.to(DEVICE), idx.to(DEVICE)
    return t, ref


def _dds(t, n, m, bias, **kw):
    out_f, in_f = t["w"].shape
    return K.nm_dds(t["x"], t["values"], t["idx"], t["bias"] if bias else None, out_f, in_f, n, m, **kw)


def _dds_ref(ref, bias):
    y = ref["x"] @ ref["w"].T
    return y + ref["bias"] if bias else y


def _sdd(t, n, m, **kw):
    return K.nm_sdd(t["dy"], t["x"], t["idx"], n, m, t["w"].shape[1], **kw)


def _sdd_ref(t, ref, n, m):
    """The dense fp64 gradient ``dyᵀ x`` read at the slots' columns (0 past ``in``)."""
    dense = F.pad(ref["dy"].T @ ref["x"], (0, m))  # zero columns past in
    return dense.gather(1, _slot_cols(t["idx"].cpu(), t["values"].shape[1], n, m))


# --------------------------------------------------------------------------- tests


@pytest.mark.parametrize("n, m", NM)
def test_compress_roundtrip(n, m):
    t, ref = _case(5, 37, 1, n, m)
    assert t["values"].shape == (5, -(-37 // m) * n) and t["idx"].shape == (5, -(-t["values"].shape[1] // 2))
    assert torch.equal(_decompress(t["values"].cpu(), t["idx"].cpu(), 37, n, m), t["w"].cpu())


# (batch, in, out): 37 and 40 are past one 32-wide tile and two 16-wide chunks; 37 is no
# multiple of any m, 40 is one of 2, 4, 5 and 8
SHAPES = [
    pytest.param(1, 37, 1, id="B1-in37-out1"),
    pytest.param(3, 37, 3, id="B3-in37-out3"),
    pytest.param(33, 37, 37, id="B33-in37-out37"),
    pytest.param(33, 40, 3, id="B33-in40-out3"),
    # the two sides of the decode kernel's limit (_MAX_GEMV_B rows of x)
    pytest.param(K._MAX_GEMV_B, 37, 37, id="Bgemv-in37-out37"),
    pytest.param(K._MAX_GEMV_B + 1, 40, 5, id="Bgemv+1-in40-out5"),
]


@pytest.mark.parametrize("bias", [True, False], ids=["bias", "nobias"])
@pytest.mark.parametrize("batch, in_f, out_f", SHAPES)
@pytest.mark.parametrize("n, m", NM)
def test_dds(n, m, batch, in_f, out_f, bias):
    t, ref = _case(out_f, in_f, batch, n, m)
    assert_close_rms(_dds(t, n, m, bias), _dds_ref(ref, bias), name="dds")


@pytest.mark.parametrize("batch, in_f, out_f", SHAPES)
@pytest.mark.parametrize("n, m", NM)
def test_sdd(n, m, batch, in_f, out_f):
    t, ref = _case(out_f, in_f, batch, n, m)
    assert_close_rms(_sdd(t, n, m), _sdd_ref(t, ref, n, m), name="sdd")


@pytest.mark.parametrize("batch", [3, 33], ids=["B3", "B33"])
@pytest.mark.parametrize("drop", [0.0, 1.0], ids=["full-groups", "all-empty"])
def test_full_and_empty_groups(drop, batch):
    t, ref = _case(37, 37, batch, 2, 4, drop=drop)
    assert_close_rms(_dds(t, 2, 4, True), _dds_ref(ref, True), name="dds")
    assert_close_rms(_sdd(t, 2, 4), _sdd_ref(t, ref, 2, 4), name="sdd")


@pytest.mark.parametrize("batch", [3, 33], ids=["B3", "B33"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
@pytest.mark.parametrize("n, m", [pytest.param(2, 4, id="2:4"), pytest.param(3, 5, id="3:5")])
def test_half_dtypes(n, m, dtype, batch):
    t, ref = _case(37, 37, batch, n, m, dtype)
    y, dv = _dds(t, n, m, True), _sdd(t, n, m)
    assert y.dtype == dv.dtype == dtype
    assert_close_rms(y, _dds_ref(ref, True), name="dds")
    assert_close_rms(dv, _sdd_ref(t, ref, n, m), name="sdd")


@pytest.mark.parametrize("n, m", [pytest.param(2, 4, id="2:4"), pytest.param(2, 8, id="2:8")])
def test_noncontiguous_inputs(n, m):
    t, ref = _case(37, 37, 33, n, m)
    # same numbers, transposed storage
    t["x"], t["dy"] = t["x"].t().contiguous().t(), t["dy"].t().contiguous().t()
    assert not t["x"].is_contiguous() and not t["dy"].is_contiguous()
    assert_close_rms(_dds(t, n, m, True), _dds_ref(ref, True), name="dds")
    assert_close_rms(_sdd(t, n, m), _sdd_ref(t, ref, n, m), name="sdd")


@pytest.mark.parametrize("n, m", [pytest.param(2, 8, id="2:8"), pytest.param(3, 5, id="3:5")])
def test_columns_past_in_never_read(n, m):
    # x is a view into a wider buffer that holds NaN past `in`: a read there would show up.
    # 37 % 8 == 5 and 37 % 5 == 2: the last group is partial and its free slots point past in
    t, ref = _case(37, 37, 33, n, m, drop=0.5)
    wide = torch.full((33, 37 + m), float("nan"), device=DEVICE)
    wide[:, :37] = t["x"]
    t["x"] = wide[:, :37]
    y, dv = _dds(t, n, m, False), _sdd(t, n, m)
    assert not y.isnan().any() and not dv.isnan().any()
    assert_close_rms(y, _dds_ref(ref, False), name="dds")
    assert_close_rms(dv, _sdd_ref(t, ref, n, m), name="sdd")


@pytest.mark.parametrize("n, m", [pytest.param(2, 4, id="2:4"), pytest.param(3, 5, id="3:5")])
def test_transposed_product(n, m):
    # dx = dy @ W through Wᵀ's own N:M format, for a mask that is N:M both ways
    out_f, in_f, batch = 37, 35, 33
    mask = _transposable_mask(out_f, in_f, n, m)
    t, ref = _case(out_f, in_f, batch, n, m, mask=mask)
    t_values, t_idx = _compress(t["w"].cpu().t(), mask.t(), n, m)
    dx = K.nm_dds(t["dy"], t_values.to(DEVICE), t_idx.to(DEVICE), None, in_f, out_f, n, m)
    assert dx.shape == (batch, in_f)
    assert_close_rms(dx, ref["dy"] @ ref["w"], name="dsd")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_out_buffer_fully_written(dtype):
    n, m = 2, 4
    t, ref = _case(37, 37, 33, n, m, dtype)
    nan = float("nan")
    y = torch.full((33, 37), nan, dtype=dtype, device=DEVICE)
    dv = torch.full(tuple(t["values"].shape), nan, dtype=dtype, device=DEVICE)
    assert _dds(t, n, m, True, out=y) is y
    assert _sdd(t, n, m, out=dv) is dv
    assert_close_rms(y, _dds_ref(ref, True), name="dds")
    assert_close_rms(dv, _sdd_ref(t, ref, n, m), name="sdd")
    # transposed views: the kernels write through the buffers' own strides
    yt = torch.full((37, 33), nan, dtype=dtype, device=DEVICE).t()
    dvt = torch.full(tuple(t["values"].shape[::-1]), nan, dtype=dtype, device=DEVICE).t()
    _dds(t, n, m, False, out=yt)
    _sdd(t, n, m, out=dvt)
    assert_close_rms(yt, _dds_ref(ref, False), name="dds-strided-out")
    assert_close_rms(dvt, _sdd_ref(t, ref, n, m), name="sdd-strided-out")


def test_empty_batch():
    t, ref = _case(5, 37, 0, 2, 4)
    assert _dds(t, 2, 4, True).shape == (0, 5)
    # no batch rows: the weight gradient is exactly zero
    assert torch.equal(_sdd(t, 2, 4), torch.zeros(t["values"].shape, device=DEVICE))


@pytest.mark.parametrize("batch", [1, 33], ids=["B1", "B33"])
def test_empty_features(batch):
    # out == 0
    t, ref = _case(0, 37, batch, 2, 4)
    assert _dds(t, 2, 4, True).shape == (batch, 0)
    assert _sdd(t, 2, 4).shape == (0, 20)
    # in == 0: y is the bias (or 0), dv has no slots
    t, ref = _case(5, 0, batch, 2, 4)
    assert t["values"].shape == (5, 0)
    assert_close_rms(_dds(t, 2, 4, True), _dds_ref(ref, True), name="dds-in0")
    assert torch.equal(_dds(t, 2, 4, False), torch.zeros(batch, 5, device=DEVICE))
    assert _sdd(t, 2, 4).shape == (5, 0)


def _bad_inputs():
    t, _ = _case(5, 37, 3, 2, 4)
    x, dy, v, i, b = t["x"], t["dy"], t["values"], t["idx"], t["bias"]
    small_out = torch.empty(3, 4, device=DEVICE)
    return [
        ("x-int", TypeError, "x", lambda: K.nm_dds(x.int(), v, i, None, 5, 37, 2, 4)),
        ("x-fp64", TypeError, "x", lambda: K.nm_dds(x.double(), v.double(), i, None, 5, 37, 2, 4)),
        ("x-1d", ValueError, "x", lambda: K.nm_dds(x[0], v, i, None, 5, 37, 2, 4)),
        ("x-columns", ValueError, "x", lambda: K.nm_dds(x[:, :36], v, i, None, 5, 37, 2, 4)),
        ("values-dtype", TypeError, "values", lambda: K.nm_dds(x, v.half(), i, None, 5, 37, 2, 4)),
        ("values-shape", ValueError, "values", lambda: K.nm_dds(x, v[:, :-1], i, None, 5, 37, 2, 4)),
        ("values-rows", ValueError, "values", lambda: K.nm_dds(x, v, i, None, 6, 37, 2, 4)),
        ("idx-dtype", TypeError, "idx", lambda: K.nm_dds(x, v, i.int(), None, 5, 37, 2, 4)),
        ("idx-shape", ValueError, "idx", lambda: K.nm_dds(x, v, i[:, :-1], None, 5, 37, 2, 4)),
        ("bias-dtype", TypeError, "bias", lambda: K.nm_dds(x, v, i, b.half(), 5, 37, 2, 4)),
        ("bias-length", ValueError, "bias", lambda: K.nm_dds(x, v, i, b[:-1], 5, 37, 2, 4)),
        ("out-shape", ValueError, "out", lambda: K.nm_dds(x, v, i, None, 5, 37, 2, 4, out=small_out)),
        ("n-ge-m", ValueError, "n", lambda: K.nm_dds(x, v, i, None, 5, 37, 4, 4)),
        ("m-17", ValueError, "m", lambda: K.nm_dds(x, v, i, None, 5, 37, 2, 17)),
        ("n-float", TypeError, "n", lambda: K.nm_dds(x, v, i, None, 5, 37, 2.0, 4)),
        ("in-negative", ValueError, "in_features", lambda: K.nm_dds(x, v, i, None, 5, -1, 2, 4)),
        ("sdd-batch", ValueError, "dy", lambda: K.nm_sdd(dy[:2], x, i, 2, 4, 37)),
        ("sdd-dtype", TypeError, "dy", lambda: K.nm_sdd(dy.half(), x, i, 2, 4, 37)),
        ("sdd-idx-rows", ValueError, "idx", lambda: K.nm_sdd(dy[:, :4], x, i, 2, 4, 37)),
        ("sdd-in", ValueError, "x", lambda: K.nm_sdd(dy, x, i, 2, 4, 36)),
        ("sdd-out-dtype", TypeError, "out", lambda: K.nm_sdd(dy, x, i, 2, 4, 37, out=v.half())),
    ]


def test_bad_inputs_raise():
    for case_id, exc, arg, call in _bad_inputs():
        with pytest.raises(exc, match=rf"^{arg}:"):
            call()
