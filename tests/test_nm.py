"""N:M weights on CPU: the NMWeight format, the ops (torch.ops.sparseops.nm_dds / nm_sdd / nm_dsd / nm_dsd_csr)
against fp64 dense math, SparseLinear(pattern="n:m" or NM(n, m, transposable=True)), and the C++ binding's validation.

fp32 goes through the C++ kernels (both ISA paths); other dtypes through the reference.
"""

import copy

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from helpers import assert_close_rms, guard_dtype_route
from torch import nn

import sparseops
import sparseops.ops.nm as ops_nm
import sparseops.reference.nm as reference_nm
from sparseops import NM, SparseLinear
from sparseops._cpp import _C
from sparseops.formats import NMWeight
from sparseops.masks import is_nm, is_transposable_nm

OPS = torch.ops.sparseops

needs_cpp = pytest.mark.skipif(_C is None, reason="sparseops._C is not built")

# n = 1 (1:4, 1:2), n = m - 1 (1:2, 15:16), an odd n with a non-power-of-two m (3:5: an odd S leaves a
# padding nibble), and m = 16, where every nibble value is a position
NM_PARAMS = [
    pytest.param(2, 4, id="2:4"),
    pytest.param(1, 4, id="1:4"),
    pytest.param(2, 8, id="2:8"),
    pytest.param(3, 5, id="3:5"),
    pytest.param(1, 2, id="1:2"),
    pytest.param(15, 16, id="15:16"),
]


# ---- masks and cases; the references use only dense torch math and the layout as documented ----


def _nm_mask(out_f, in_f, n, m, kind):
    """An N:M mask ``[out, in]``.

    ``full``: ``n`` random positions in every group of ``m`` (a last group narrower than ``m`` keeps
    those that fall inside it); ``holed``: that with ~30% dropped, every third row empty and one group
    column empty, so that groups hold fewer than ``n``; ``empty``: nothing.
    """
    groups = -(-in_f // m)
    keep = (torch.rand(out_f, groups, m).argsort(-1).argsort(-1) < n).reshape(out_f, groups * m)[:, :in_f]
    if kind == "empty":
        return torch.zeros(out_f, in_f, dtype=torch.bool)
    if kind == "holed":
        keep = keep & (torch.rand(out_f, in_f) >= 0.3)
        keep[1::3] = False
        keep[:, :m] = False
    return keep.contiguous()


def _transposable_mask(out_f, in_f, n, m, kind):
    """N:M along rows and columns: in each aligned m x m block, ``(j - i + shift) % m < n``; ``kind`` as above."""
    if kind == "empty":
        return torch.zeros(out_f, in_f, dtype=torch.bool)
    rows, cols = -(-out_f // m) * m, -(-in_f // m) * m
    i, j = torch.arange(rows)[:, None], torch.arange(cols)[None, :]
    shift = torch.randint(0, m, (rows // m, cols // m)).repeat_interleave(m, 0).repeat_interleave(m, 1)
    keep = ((j - i + shift) % m < n)[:out_f, :in_f]
    if kind == "holed":
        keep = keep & (torch.rand(out_f, in_f) >= 0.3)
        keep[1::3] = False
    return keep.contiguous()


def _slot_columns(idx, slots, n, m):
    """``[out, S]`` column of every slot by the documented layout: ``(j // n) * m + pos``, even slots low nibble."""
    j = torch.arange(slots)
    pos = (idx[:, j // 2].long() >> (4 * (j % 2))) & 15
    return (j // n) * m + pos


class Case:
    """An N:M weight ``w [out, in]`` (zeros off ``mask``), its NMWeight, values and fp32 inputs."""

    def __init__(self, batch, in_f, out_f, n, m, kind, transposable=False, dtype=torch.float32):
        make = _transposable_mask if transposable else _nm_mask
        self.n, self.m, self.in_f = n, m, in_f
        self.mask = make(out_f, in_f, n, m, kind)
        self.w = torch.randn(out_f, in_f) * self.mask  # [out, in]
        self.fmt, values = NMWeight.from_dense(self.w, self.mask, n, m, transposable)
        self.values = values.to(dtype)  # [out, S]
        self.x = torch.randn(batch, in_f).to(dtype)  # [B, in]
        self.dy = torch.randn(batch, out_f).to(dtype)  # [B, out]
        self.bias = torch.randn(out_f).to(dtype)  # [out]
        self.w = self.w.to(dtype)

    def dds(self, x=None, bias=None):
        x = self.x if x is None else x
        return OPS.nm_dds(x, self.values, self.fmt.idx, bias, self.n, self.m)

    def sdd(self, dy=None, x=None):
        dy = self.dy if dy is None else dy
        x = self.x if x is None else x
        return OPS.nm_sdd(dy, x, self.fmt.idx, self.n, self.m)

    def dsd(self, dy=None):
        dy = self.dy if dy is None else dy
        return OPS.nm_dsd(dy, self.values, self.fmt.t_idx, self.fmt.t_slot, self.n, self.m)

    def dsd_csr(self, dy=None):
        dy = self.dy if dy is None else dy
        f = self.fmt
        return OPS.nm_dsd_csr(dy, self.values, f.t_crow, f.t_row, f.t_perm, self.in_f)

    # fp64 dense references
    def dds_ref(self, x=None, bias=None):
        x = self.x if x is None else x
        y = x.double() @ self.w.double().T
        return y if bias is None else y + bias.double()

    def dsd_ref(self, dy=None):
        dy = self.dy if dy is None else dy
        return dy.double() @ self.w.double()

    def sdd_ref(self, dy=None, x=None):
        """``dyᵀ x`` read at every slot's column, empty slots included; 0 at the padding columns past ``in``."""
        dy = self.dy if dy is None else dy
        x = self.x if x is None else x
        g = dy.double().T @ x.double()  # [out, in]
        cols = _slot_columns(self.fmt.idx, self.fmt.slots, self.n, self.m)
        return F.pad(g, (0, self.m)).gather(1, cols)


def _case(batch, in_f, out_f, kind):
    return pytest.param(batch, in_f, out_f, kind, id=f"B{batch}-in{in_f}-out{out_f}-{kind}")


# B < 8 takes the gather path, 8 / 17 / 37 the packed tiles of 8 / 24 / 32 lanes (37: a partial second
# tile); in = 37 is no multiple of any m, in = 1 and 3 are narrower than a group. The N:M walk splits
# its rows into column chunks from 2 tiles whose packed tile passes 32 KB: B = 37 at in = 1000 (a partial
# second tile) and B = 240 at in = 2100. At 8 tiles past 256 KB (B = 240, in = 2100) the CSR walk splits
# too (block_rows' run copy, and the weight gradient's copy back by runs); its transposed walk (the
# input gradient, over Wᵀ) splits from 2 tiles and 32 KB too: B = 37 at out = 300. B = 240 at out = 2100 does the
# same for the input gradient, whose walk runs over Wᵀ (2100 columns): its values are then gathered
# through the permutation chunk by chunk, in both the CSR and the transposable N:M walk. From B = 128 the
# N:M walks take 64-lane tiles where the last tile is more than half full (nm_tile_width): B = 240 (a
# 48-lane last tile) and B = 128 (two full ones); B = 160 (a half-full last tile) stays at 32 lanes.
SHAPES = [
    _case(1, 1, 1, "full"),
    _case(3, 37, 3, "holed"),
    _case(8, 37, 100, "full"),
    _case(37, 100, 37, "holed"),
    _case(1, 100, 100, "holed"),
    _case(1, 50, 37, "full"),  # batch 1 walks 8 (AVX-512) or 4 rows at once: 37 leaves a tail; 2:4 an odd block count
    _case(17, 3, 37, "full"),
    _case(37, 1000, 3, "full"),
    _case(8, 37, 37, "empty"),
    _case(3, 100, 1, "full"),
    _case(240, 2100, 5, "holed"),
    _case(240, 37, 2100, "full"),
    _case(37, 37, 300, "holed"),
    _case(128, 300, 37, "holed"),
    _case(160, 37, 41, "full"),
    # Wᵀ's values gathered in blocks of 256 rows by the slots of 256 columns (nm_gather_blocked, gather_blocked):
    # several of each, on the B < 8 path and on one packed tile
    _case(3, 520, 600, "holed"),
    _case(17, 600, 520, "full"),
]
PARAMS = "batch,in_f,out_f,kind"


def test_masks_used_by_the_cases_have_the_advertised_structure():
    for n, m in [(2, 4), (3, 5), (15, 16)]:
        full = _nm_mask(37, 37, n, m, "full")
        assert is_nm(full, n, m)
        holed = _nm_mask(37, 37, n, m, "holed")
        assert is_nm(holed, n, m) and not holed[1::3].any() and not holed[:, :m].any() and holed.any()
        for kind in ("full", "holed"):
            t = _transposable_mask(37, 100, n, m, kind)
            assert is_nm(t, n, m) and is_nm(t.T, n, m) and is_transposable_nm(t, n, m) and t.any()
    # full: exactly n in every full group
    full = _nm_mask(5, 37, 2, 4, "full")
    assert (full[:, :36].reshape(5, 9, 4).sum(-1) == 2).all()


# ---- the ops against dense math, fp32 on both C++ paths ----


@pytest.mark.parametrize(PARAMS, SHAPES)
@pytest.mark.parametrize("n,m", NM_PARAMS)
@pytest.mark.parametrize("bias", [True, False], ids=["bias", "nobias"])
def test_nm_dds_matches_dense(isa, n, m, batch, in_f, out_f, kind, bias):
    c = Case(batch, in_f, out_f, n, m, kind)
    b = c.bias if bias else None
    assert_close_rms(c.dds(bias=b), c.dds_ref(bias=b), torch.float32, name="y")


@pytest.mark.parametrize(PARAMS, SHAPES)
@pytest.mark.parametrize("n,m", NM_PARAMS)
def test_nm_sdd_matches_dense(isa, n, m, batch, in_f, out_f, kind):
    c = Case(batch, in_f, out_f, n, m, kind)
    dv = c.sdd()
    assert_close_rms(dv, c.sdd_ref(), torch.float32, name="dvalues")
    # on the stored weights it is the dense weight gradient sampled on the mask
    g = c.dy.double().T @ c.x.double()
    stored = torch.ones(dv.numel(), dtype=torch.bool)
    stored[c.fmt.empty] = False
    assert_close_rms(dv.view(-1)[stored], c.fmt.gather(g).view(-1)[stored], torch.float32, name="dvalues on the mask")
    # slots past in read the zero padding: exactly 0
    past = _slot_columns(c.fmt.idx, c.fmt.slots, n, m) >= in_f
    assert (dv[past] == 0).all()


@pytest.mark.parametrize(PARAMS, SHAPES)
@pytest.mark.parametrize("n,m", NM_PARAMS)
def test_nm_dsd_csr_matches_dense(isa, n, m, batch, in_f, out_f, kind):
    c = Case(batch, in_f, out_f, n, m, kind)
    assert_close_rms(c.dsd_csr(), c.dsd_ref(), torch.float32, name="dx")


@pytest.mark.parametrize(PARAMS, SHAPES)
@pytest.mark.parametrize("n,m", NM_PARAMS)
def test_nm_dsd_transposable_matches_dense(isa, n, m, batch, in_f, out_f, kind):
    c = Case(batch, in_f, out_f, n, m, kind, transposable=True)
    assert_close_rms(c.dsd(), c.dsd_ref(), torch.float32, name="dx")
    # the CSR path over the same transposable weight agrees
    assert_close_rms(c.dsd_csr(), c.dsd_ref(), torch.float32, name="dx (csr)")


@pytest.mark.parametrize("n,m", NM_PARAMS)
def test_nm_ops_batch_zero(isa, n, m):
    c = Case(0, 37, 5, n, m, "holed", transposable=True)
    assert c.dds(bias=c.bias).shape == (0, 5)
    assert c.dsd().shape == (0, 37) and c.dsd_csr().shape == (0, 37)
    # an empty batch sums nothing: the weight gradient is exactly zero, not left unwritten
    dv = c.sdd()
    assert dv.shape == (5, c.fmt.slots) and (dv == 0).all()


# ---- strided inputs: the binding reads strides ----


def _transposed_view(t):
    """Same values as ``t``, stored column-major (a non-contiguous view)."""
    v = t.t().contiguous().t()
    assert not v.is_contiguous() or min(t.shape) <= 1
    return v


def _nan_padded_slice(t, pad=19):
    """Same values as ``t`` as a column slice of a wider tensor whose other columns are NaN.

    A kernel that reads a column past ``in`` (the padding of the last group) picks up a NaN.
    """
    wide = torch.full((t.shape[0], t.shape[1] + pad), float("nan"), dtype=t.dtype)
    wide[:, : t.shape[1]] = t
    return wide[:, : t.shape[1]]


def _broadcast_rows(t):
    """Every row equal to the first, with row stride 0 (what autograd hands back for ``y.sum()``)."""
    return t[:1].expand_as(t)


LAYOUTS = {"transposed": _transposed_view, "nan-padded-slice": _nan_padded_slice}
STRIDED = [_case(3, 37, 37, "holed"), _case(8, 37, 11, "full"), _case(37, 100, 37, "holed")]
STRIDED_NM = [pytest.param(2, 4, id="2:4"), pytest.param(3, 8, id="3:8"), pytest.param(15, 16, id="15:16")]


@pytest.mark.parametrize("layout", list(LAYOUTS))
@pytest.mark.parametrize(PARAMS, STRIDED)
@pytest.mark.parametrize("n,m", STRIDED_NM)
def test_nm_dds_and_sdd_strided_inputs(isa, layout, n, m, batch, in_f, out_f, kind):
    c = Case(batch, in_f, out_f, n, m, kind)
    x, dy = LAYOUTS[layout](c.x), LAYOUTS[layout](c.dy)
    assert_close_rms(c.dds(x=x, bias=c.bias), c.dds_ref(bias=c.bias), torch.float32, name="y")
    assert_close_rms(c.sdd(dy=dy, x=x), c.sdd_ref(), torch.float32, name="dvalues")


@pytest.mark.parametrize("layout", list(LAYOUTS) + ["broadcast-rows"])
@pytest.mark.parametrize(PARAMS, STRIDED)
@pytest.mark.parametrize("n,m", STRIDED_NM)
def test_nm_dsd_strided_dy(isa, layout, n, m, batch, in_f, out_f, kind):
    c = Case(batch, in_f, out_f, n, m, kind, transposable=True)
    if layout == "broadcast-rows":
        dy = _broadcast_rows(c.dy)
        expected = c.dsd_ref(dy=dy.contiguous())
    else:
        dy, expected = LAYOUTS[layout](c.dy), c.dsd_ref()
    assert_close_rms(c.dsd(dy=dy), expected, torch.float32, name="dx")
    assert_close_rms(c.dsd_csr(dy=dy), expected, torch.float32, name="dx (csr)")


# ---- the NaN poisoning reaches the N:M ops ----


@needs_cpp
def test_conftest_poisoning_reaches_nm_op_outputs(monkeypatch):
    """With a kernel that writes nothing, every op's output is all NaN, so a missed write cannot pass."""

    class _WritesNothing:
        def __getattr__(self, name):
            return lambda *args: None

    monkeypatch.setattr(ops_nm, "_C", _WritesNothing())
    c = Case(4, 6, 5, 2, 4, "full", transposable=True)
    assert torch.isnan(c.dds(bias=c.bias)).all()
    assert torch.isnan(c.sdd()).all()
    assert torch.isnan(c.dsd()).all()
    assert torch.isnan(c.dsd_csr()).all()


# ---- other dtypes: the reference path ----


@pytest.mark.parametrize("dtype", [torch.float64, torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("n,m", [pytest.param(2, 4, id="2:4"), pytest.param(3, 5, id="3:5"),
                                 pytest.param(1, 16, id="1:16"), pytest.param(4, 8, id="4:8")])
@pytest.mark.parametrize(PARAMS, [_case(3, 37, 5, "holed"), _case(37, 100, 37, "full"), _case(1, 1000, 3, "full"),
                                  _case(7, 300, 37, "full"), _case(1, 50, 37, "full")])
def test_nm_ops_other_dtypes_match_dense(isa, monkeypatch, n, m, batch, in_f, out_f, kind, dtype):
    # fp64 goes to the reference, never to _C; bf16/fp16 to the fp32 C++ kernels, never to the reference
    calls = guard_dtype_route(monkeypatch, ops_nm, ("nm_dds", "nm_sdd", "nm_dsd", "nm_dsd_csr"), dtype)
    c = Case(batch, in_f, out_f, n, m, kind, transposable=True, dtype=dtype)
    y = c.dds(bias=c.bias)
    assert y.dtype == dtype
    assert_close_rms(y, c.dds_ref(bias=c.bias), dtype, name="y")
    for got, ref, name in ((c.sdd(), c.sdd_ref(), "dvalues"), (c.dsd(), c.dsd_ref(), "dx"),
                           (c.dsd_csr(), c.dsd_ref(), "dx (csr)")):
        assert got.dtype == dtype
        assert_close_rms(got, ref, dtype, name=name)
    if dtype != torch.float64:
        # up to 7 rows the forward reads the 16-bit values as they are; above, the fp32 kernel on a copy
        assert calls[0] == ("nm_dds16" if batch <= ops_nm.NM16_MAX_ROWS else "nm_dds")
        assert {"nm_sdd", "nm_dsd", "nm_dsd_csr"} <= set(calls)


@pytest.mark.parametrize("n,m", NM_PARAMS)
def test_reference_nm_matches_dense_fp64(n, m):
    c = Case(5, 37, 11, n, m, "holed", transposable=True, dtype=torch.float64)
    f = c.fmt
    assert_close_rms(reference_nm.nm_dds(c.x, c.values, f.idx, c.bias, n, m), c.dds_ref(bias=c.bias), name="y")
    assert_close_rms(reference_nm.nm_sdd(c.dy, c.x, f.idx, n, m), c.sdd_ref(), name="dvalues")
    assert_close_rms(reference_nm.nm_dsd(c.dy, c.values, f.t_idx, f.t_slot, n, m), c.dsd_ref(), name="dx")
    dx = reference_nm.nm_dsd_csr(c.dy, c.values, f.t_crow, f.t_row, f.t_perm, 37)
    assert_close_rms(dx, c.dsd_ref(), name="dx (csr)")


# ---- threads ----


def test_nm_ops_same_result_for_any_thread_count(isa):
    c = Case(37, 1000, 37, 2, 4, "holed", transposable=True)
    prev = torch.get_num_threads()
    results = {}
    try:
        for t in (1, 2, 3):
            torch.set_num_threads(t)
            results[t] = (c.dds(bias=c.bias), c.sdd(), c.dsd(), c.dsd_csr())
    finally:
        torch.set_num_threads(prev)
    for t in (2, 3):
        for name, one, many in zip(("y", "dvalues", "dx", "dx (csr)"), results[1], results[t]):
            assert_close_rms(many, one.double(), tol=1e-6, name=f"{name} with {t} threads vs 1")


# ---- torch.library registration ----


def _opcheck_cases():
    cases = []
    for batch, in_f, out_f, n, m, kind in [(3, 7, 5, 2, 4, "full"), (9, 37, 3, 3, 5, "holed")]:
        c = Case(batch, in_f, out_f, n, m, kind, transposable=True)
        f = c.fmt
        tag = f"B{batch}-in{in_f}-out{out_f}-{n}:{m}"
        for op in ("nm_dds", "nm_dds_host"):
            cases.append(pytest.param(op, (c.x, c.values, f.idx, c.bias, n, m), id=f"{op}-{tag}-bias"))
            cases.append(pytest.param(op, (c.x, c.values, f.idx, None, n, m), id=f"{op}-{tag}-nobias"))
        for op in ("nm_sdd", "nm_sdd_host"):
            cases.append(pytest.param(op, (c.dy, c.x, f.idx, n, m), id=f"{op}-{tag}"))
        for op in ("nm_dsd", "nm_dsd_host"):
            cases.append(pytest.param(op, (c.dy, c.values, f.t_idx, f.t_slot, n, m), id=f"{op}-{tag}"))
        for op in ("nm_dsd_csr", "nm_dsd_csr_host"):
            cases.append(pytest.param(op, (c.dy, c.values, f.t_crow, f.t_row, f.t_perm, in_f), id=f"{op}-{tag}"))
    return cases


@pytest.mark.parametrize("op,args", _opcheck_cases())
def test_nm_ops_opcheck(op, args):
    torch.library.opcheck(getattr(OPS, op), args)


# ---- the format ----

# W [3, 6] with 2:4 (G = 2 groups, S = 4 slots a row, columns 6 and 7 are padding); also transposable
_HAND_MASK = torch.tensor(
    [[1, 0, 1, 0, 1, 0], [0, 1, 0, 0, 0, 1], [1, 1, 0, 0, 0, 0]], dtype=torch.bool
)
_HAND_W = torch.tensor([[1.0, 0, 2, 0, 3, 0], [0, 4, 0, 0, 0, 5], [6, 7, 0, 0, 0, 0]])
# positions: row 0 [0 2 | 0 1*], row 1 [0* 1 | 0* 1], row 2 [0 1 | 0* 1*]   (* empty: smallest unused)
_HAND = {
    "values": [[1.0, 2, 3, 0], [0, 4, 0, 5], [6, 7, 0, 0]],
    "idx": [[0x20, 0x10], [0x10, 0x10], [0x10, 0x10]],
    "empty": [3, 4, 6, 10, 11],
    # Wᵀ as CSR over the real nonzeros; t_perm: the flat slot in values
    "t_crow": [0, 2, 4, 5, 5, 6, 7],
    "t_row": [0, 2, 1, 2, 0, 0, 1],
    "t_perm": [0, 8, 5, 9, 1, 2, 7],
    # Wᵀ [6, 3] as 2:4 (S_t = 2): its positions, and the flat slot of values each reads (-1: empty)
    "t_idx": [[0x20], [0x21], [0x10], [0x10], [0x10], [0x10]],
    "t_slot": [[0, 8], [5, 9], [1, -1], [-1, -1], [2, -1], [-1, 7]],
}
_HAND_DTYPES = {"idx": torch.uint8, "empty": torch.int64, "t_crow": torch.int32, "t_row": torch.int32,
                "t_perm": torch.int32, "t_idx": torch.uint8, "t_slot": torch.int32}


def test_nm_weight_hand_built_layout():
    f, values = NMWeight.from_dense(_HAND_W, _HAND_MASK, 2, 4, transposable=True)
    assert (f.shape, f.slots, f.nnz, f.transposable) == ((3, 6), 4, 7, True)
    assert torch.equal(values, torch.tensor(_HAND["values"]))
    for name, dtype in _HAND_DTYPES.items():
        t = getattr(f, name)
        assert t.dtype == dtype, name
        assert torch.equal(t, torch.tensor(_HAND[name], dtype=dtype)), name
    # without transposable, Wᵀ has only its CSR
    g = NMWeight.from_mask(_HAND_MASK, 2, 4)
    assert not g.transposable and g.t_idx.numel() == 0 and g.t_slot.numel() == 0
    for name in ("idx", "empty", "t_crow", "t_row", "t_perm"):
        assert torch.equal(getattr(g, name), getattr(f, name)), name


def test_nm_weight_last_group_narrower_than_n():
    # 3:8 with in = 10: the last group has 2 columns, so each row has an empty slot at column 10 (padding)
    mask = torch.zeros(4, 10, dtype=torch.bool)
    mask[:, [0, 3, 7, 8, 9]] = True
    mask[1, 9] = False
    mask[3] = False
    w = torch.randn(4, 10) * mask
    f, v = NMWeight.from_dense(w, mask, 3, 8)
    assert f.slots == 6 and f.idx.shape == (4, 3)
    cols = _slot_columns(f.idx, 6, 3, 8)
    assert cols[0].tolist() == [0, 3, 7, 8, 9, 10]
    assert cols[1].tolist() == [0, 3, 7, 8, 9, 10]  # col 9 dropped: its slot is empty, at the smallest free position
    assert cols[3].tolist() == [0, 1, 2, 8, 9, 10]
    assert f.empty.tolist() == [5, 6 + 4, 6 + 5, 12 + 5, 18, 19, 20, 21, 22, 23]
    assert torch.equal(f.to_mask(), mask) and torch.equal(f.to_dense(v), w)
    assert f.nnz == int(mask.sum())


FORMAT_CASES = [
    pytest.param(2, 4, 11, 37, "full", id="2:4-in37-full"),
    pytest.param(3, 8, 11, 37, "holed", id="3:8-in37-holed"),
    pytest.param(15, 16, 5, 37, "full", id="15:16-in37-last-group-narrower-than-n"),
    pytest.param(3, 5, 7, 3, "full", id="3:5-in3"),
    pytest.param(1, 2, 9, 1, "full", id="1:2-in1"),
    pytest.param(2, 4, 8, 16, "full", id="2:4-in16-no-empty-slot"),
    pytest.param(1, 4, 6, 100, "holed", id="1:4-in100-holed"),
    pytest.param(2, 8, 4, 37, "empty", id="2:8-in37-empty"),
]


@pytest.mark.parametrize("transposable", [False, True], ids=["plain", "transposable"])
@pytest.mark.parametrize("n,m,out_f,in_f,kind", FORMAT_CASES)
def test_nm_weight_from_mask_describes_the_mask(n, m, out_f, in_f, kind, transposable):
    mask = (_transposable_mask if transposable else _nm_mask)(out_f, in_f, n, m, kind)
    w = torch.randn(out_f, in_f) * mask
    f, values = NMWeight.from_dense(w, mask, n, m, transposable)
    S = -(-in_f // m) * n
    assert (f.shape, f.slots, f.n, f.m, f.transposable) == ((out_f, in_f), S, n, m, transposable)
    assert values.shape == (out_f, S) and f.idx.shape == (out_f, (S + 1) // 2) and f.idx.dtype == torch.uint8
    assert f.nnz == int(mask.sum())
    # the layout as documented: decoded independently of the format's own helpers
    cols = _slot_columns(f.idx, S, n, m)
    pos = cols - (torch.arange(S) // n * m)
    assert ((pos >= 0) & (pos < m)).all()
    g_pos = pos.view(out_f, -1, n)
    assert (g_pos[..., 1:] > g_pos[..., :-1]).all(), "positions must increase strictly within a group"
    stored = torch.ones(out_f * S, dtype=torch.bool)
    stored[f.empty] = False
    stored = stored.view(out_f, S)
    assert (cols[stored] < in_f).all()
    rows = torch.arange(out_f)[:, None].expand(out_f, S)
    assert mask[rows[stored], cols[stored]].all()
    assert int(stored.sum()) == int(mask.sum())
    assert (values[~stored] == 0).all()
    # an empty slot takes the smallest position its group does not use
    padded = F.pad(mask, (0, m))
    for o, j in (~stored).nonzero().tolist()[:50]:
        g = j // n
        used = set(pos[o, g * n : (g + 1) * n][stored[o, g * n : (g + 1) * n]].tolist())
        free = [p for p in range(m) if p not in used and not padded[o, g * m + p]]
        empties = pos[o, g * n : (g + 1) * n][~stored[o, g * n : (g + 1) * n]].tolist()
        assert empties == sorted(free)[: len(empties)]
    # dense round trips
    dense = torch.zeros(out_f, -(-in_f // m) * m + m)
    dense.scatter_(1, cols, values)
    assert torch.equal(dense[:, :in_f], w)
    assert torch.equal(f.to_mask(), mask)
    assert torch.equal(f.to_dense(values), w)
    assert torch.equal(f.gather(w), values)
    assert torch.equal(f.gather(torch.randn(out_f, in_f)).view(-1)[f.empty], torch.zeros(f.empty.numel()))
    # Wᵀ: its CSR over the real nonzeros reads values through t_perm
    t_cols, t_rows = mask.t().nonzero(as_tuple=True)
    assert torch.equal(f.t_row.long(), t_rows)
    assert torch.equal(f.t_crow.long(), torch.cat([torch.zeros(1, dtype=torch.long), mask.sum(0).cumsum(0)]))
    assert torch.equal(values.view(-1)[f.t_perm.long()], w.t()[mask.t()])
    if transposable:
        St = -(-out_f // m) * n
        assert f.t_idx.shape == (in_f, (St + 1) // 2) and f.t_slot.shape == (in_f, St)
        tv = torch.where(f.t_slot >= 0, values.view(-1)[f.t_slot.long().clamp(min=0)], torch.zeros(()))
        dense_t = torch.zeros(in_f, -(-out_f // m) * m + m)
        dense_t.scatter_(1, _slot_columns(f.t_idx, St, n, m), tv)
        assert torch.equal(dense_t[:, :out_f], w.t())
    # from_idx rebuilds the very same index from the checkpointed idx/empty
    g = NMWeight.from_idx(out_f, in_f, n, m, f.idx, f.empty, transposable)
    for name, t in f.tensors().items():
        assert torch.equal(getattr(g, name), t), name
    assert g.transposable == transposable


def test_nm_weight_to_dense_is_differentiable_and_ignores_empty_slots():
    f, values = NMWeight.from_dense(_HAND_W, _HAND_MASK, 2, 4)
    v = (values + 1).requires_grad_()  # nonzero at the empty slots too
    dense = f.to_dense(v)
    assert (dense[~_HAND_MASK] == 0).all()
    dense.sum().backward()
    expected = torch.ones(3, 4)
    expected.view(-1)[f.empty] = 0
    assert torch.equal(v.grad, expected)


def _edited(t, i, value):
    t = t.clone()
    t.view(-1)[i] = value
    return t


# (idx, empty) of the hand weight edited; (name, exception, match)
BAD_FROM_IDX = [
    pytest.param(lambda f: (_edited(f.idx, 0, 0x25), f.empty), "idx", ValueError, r"\[0, m=4\)", id="position-ge-m"),
    pytest.param(lambda f: (_edited(f.idx, 0, 0xF0), f.empty), "idx", ValueError, r"\[0, m=4\)", id="high-nibble-ge-m"),
    pytest.param(lambda f: (_edited(f.idx, 0, 0x02), f.empty), "idx", ValueError, "strictly increasing",
                 id="decreasing-positions"),
    pytest.param(lambda f: (_edited(f.idx, 0, 0x22), f.empty), "idx", ValueError, "strictly increasing",
                 id="repeated-position"),
    # an empty slot that does not take the smallest free position (row 2, group 1: [0*, 1*] -> [0*, 3*])
    pytest.param(lambda f: (_edited(f.idx, 5, 0x30), f.empty), "idx", ValueError, "smallest", id="empty-not-smallest"),
    # row 0 slot 3 (column 5) made non-empty at position 3: column 7 is padding
    pytest.param(lambda f: (_edited(f.idx, 1, 0x30), f.empty[f.empty != 3]), "idx", ValueError, "past in_features",
                 id="stored-slot-past-in"),
    pytest.param(lambda f: (f.idx.long(), f.empty), "idx", TypeError, "uint8", id="idx-int64"),
    pytest.param(lambda f: (f.idx.tolist(), f.empty), "idx", TypeError, "uint8", id="idx-list"),
    pytest.param(lambda f: (f.idx[:, :1], f.empty), "idx", ValueError, "shape", id="idx-too-narrow"),
    pytest.param(lambda f: (f.idx[:2], f.empty), "idx", ValueError, "shape", id="idx-too-few-rows"),
    pytest.param(lambda f: (f.idx.view(-1), f.empty), "idx", ValueError, "shape", id="idx-1d"),
    pytest.param(lambda f: (f.idx, f.empty.int()), "empty", TypeError, "int64", id="empty-int32"),
    pytest.param(lambda f: (f.idx, f.empty[None]), "empty", TypeError, "1-D", id="empty-2d"),
    pytest.param(lambda f: (f.idx, torch.cat([f.empty, torch.tensor([12])])), "empty", ValueError, r"\[0, 12\)",
                 id="empty-past-last-slot"),
    pytest.param(lambda f: (f.idx, torch.cat([f.empty, torch.tensor([-1])])), "empty", ValueError, r"\[0, 12\)",
                 id="empty-negative"),
]


@pytest.mark.parametrize("make,name,exc,match", BAD_FROM_IDX)
@pytest.mark.parametrize("transposable", [False, True], ids=["plain", "transposable"])
def test_nm_weight_from_idx_rejects_malformed_index(make, name, exc, match, transposable):
    f = NMWeight.from_mask(_HAND_MASK, 2, 4, transposable)
    idx, empty = make(f)
    with pytest.raises(exc, match=rf"^{name}: .*{match}"):
        NMWeight.from_idx(3, 6, 2, 4, idx, empty, transposable)


def test_nm_weight_from_idx_takes_a_legal_other_pattern():
    f = NMWeight.from_mask(_HAND_MASK, 2, 4)
    # slot 0 of row 0 (column 0) made empty: position 0 is then the smallest free one, still a valid layout
    g = NMWeight.from_idx(3, 6, 2, 4, f.idx, torch.cat([torch.tensor([0]), f.empty]))
    expected = _HAND_MASK.clone()
    expected[0, 0] = False
    assert torch.equal(g.to_mask(), expected) and g.nnz == 6


BAD_MASKS = [
    pytest.param(lambda: torch.ones(3, 6, dtype=torch.bool), 2, 4, False, ValueError, "more than n=2", id="not-2:4"),
    pytest.param(lambda: _HAND_MASK, 1, 4, False, ValueError, "more than n=1", id="not-1:4"),
    pytest.param(lambda: torch.tensor([[1, 1, 0, 0], [1, 1, 0, 0], [1, 0, 0, 0]], dtype=torch.bool), 2, 4, True,
                 ValueError, "not transposable", id="rows-only-2:4"),
    pytest.param(lambda: torch.tensor([[1, 0, 0, 0, 0]] * 3, dtype=torch.bool), 2, 5, True, ValueError,
                 "not transposable", id="column-breaks-2:5"),
    pytest.param(lambda: _HAND_MASK.float(), 2, 4, False, TypeError, "bool", id="float-mask"),
    pytest.param(lambda: _HAND_MASK.tolist(), 2, 4, False, TypeError, "Tensor", id="list-mask"),
    pytest.param(lambda: _HAND_MASK[0], 2, 4, False, ValueError, "2-D", id="1d-mask"),
]


@pytest.mark.parametrize("make,n,m,transposable,exc,match", BAD_MASKS)
def test_nm_weight_from_mask_rejects_a_mask_that_breaks_the_pattern(make, n, m, transposable, exc, match):
    with pytest.raises(exc, match=rf"^mask: .*{match}"):
        NMWeight.from_mask(make(), n, m, transposable)


@pytest.mark.parametrize("n,m,exc", [(4, 4, ValueError), (0, 4, ValueError), (2, 17, ValueError), (2.0, 4, TypeError),
                                     (True, 4, TypeError)])
def test_nm_weight_rejects_bad_n_m(n, m, exc):
    with pytest.raises(exc, match=r"^n: |^m: "):
        NMWeight.from_mask(_HAND_MASK, n, m)


# ---- SparseLinear with an N:M pattern, against fp64 dense nn.Linear ----


def _layer_case(lead, in_f, out_f, pattern, kind="full", bias=True):
    tag = "x".join(map(str, lead))
    p = sparseops.patterns.as_pattern(pattern)
    return pytest.param(lead, in_f, out_f, pattern, kind, bias,
                        id=f"lead{tag}-in{in_f}-out{out_f}-{p.name}-{kind}" + ("" if bias else "-nobias"))


LAYER_CASES = [
    _layer_case((1,), 37, 3, "2:4"),
    _layer_case((5,), 37, 37, "2:4", "holed"),
    _layer_case((2, 3), 100, 37, "3:5", "holed", bias=False),
    _layer_case((37,), 37, 100, "1:2"),
    _layer_case((9,), 37, 37, "15:16", "holed"),
    _layer_case((3,), 3, 37, "15:16"),
    _layer_case((1,), 37, 3, NM(2, 4, transposable=True)),
    _layer_case((4, 5), 37, 37, NM(2, 4, transposable=True), "holed"),
    _layer_case((37,), 100, 37, NM(1, 4, transposable=True)),
    _layer_case((8,), 37, 11, NM(3, 8, transposable=True), "holed", bias=False),
]


def _nm_pair(in_f, out_f, pattern, kind="full", bias=True):
    """A SparseLinear made from a random nn.Linear on a mask of ``pattern``, plus the fp64 dense weight and bias."""
    p = sparseops.patterns.as_pattern(pattern)
    linear = nn.Linear(in_f, out_f, bias=bias)
    mask = (_transposable_mask if p.transposable else _nm_mask)(out_f, in_f, p.n, p.m, kind)
    layer = SparseLinear.from_dense(linear, mask=mask, pattern=pattern)
    w = (linear.weight.detach() * mask).double().requires_grad_()  # [out, in]
    b = linear.bias.detach().double().requires_grad_() if bias else None  # [out]
    return layer, mask, w, b


@pytest.mark.parametrize("lead,in_f,out_f,pattern,kind,bias", LAYER_CASES)
def test_nm_sparse_linear_matches_dense_linear(isa, lead, in_f, out_f, pattern, kind, bias):
    layer, mask, w, b = _nm_pair(in_f, out_f, pattern, kind, bias)
    assert torch.equal(layer.mask, mask) and layer.nnz == int(mask.sum())
    x = torch.randn(*lead, in_f, requires_grad=True)
    g = torch.randn(*lead, out_f)  # upstream gradient
    y = layer(x)
    (y * g).sum().backward()

    x64 = x.detach().double().requires_grad_()
    y64 = F.linear(x64, w, b)
    (y64 * g.double()).sum().backward()

    assert_close_rms(y, y64, torch.float32, name="y")
    assert_close_rms(x.grad, x64.grad, torch.float32, name="dx")
    # the weight gradient on the slots, zero at the empty ones
    assert_close_rms(layer.values.grad, layer.format.gather(w.grad), torch.float32, name="dvalues")
    assert (layer.values.grad.view(-1)[layer.empty] == 0).all()
    if bias:
        assert_close_rms(layer.bias.grad, b.grad, torch.float32, name="dbias")


@pytest.mark.parametrize("pattern", ["2:4", NM(2, 4, transposable=True)], ids=["2:4", "2:4T"])
def test_nm_sparse_linear_backward_of_sum(isa, pattern):
    """``y.sum()`` hands the backward a broadcast dy (stride 0)."""
    layer, mask, w, b = _nm_pair(37, 11, pattern, "holed")
    x = torch.randn(17, 37, requires_grad=True)
    layer(x).sum().backward()
    x64 = x.detach().double().requires_grad_()
    F.linear(x64, w, b).sum().backward()
    assert_close_rms(x.grad, x64.grad, torch.float32, name="dx")
    assert_close_rms(layer.values.grad, layer.format.gather(w.grad), torch.float32, name="dvalues")


def test_nm_sparse_linear_gradcheck():
    # a mask with no empty slot: the forward reads every slot, and the backward zeroes empty ones
    layer, *_ = _nm_pair(8, 5, NM(2, 4, transposable=True), "full")
    layer = layer.double()
    assert layer.empty.numel() == 0
    x = torch.randn(3, 8, dtype=torch.float64, requires_grad=True)
    values = layer.values.detach().clone().requires_grad_()
    bias = layer.bias.detach().clone().requires_grad_()
    index = layer.format.tensors()

    def f(x, v, b):
        return sparseops.autograd.nm_linear(x, v, index, b, 5, 8, 2, 4, True)

    assert torch.autograd.gradcheck(f, (x, values, bias))


def test_nm_sparse_linear_defaults_to_magnitude_nm():
    linear = nn.Linear(37, 11)
    layer = SparseLinear.from_dense(linear, pattern="2:4")
    assert layer.pattern == NM(2, 4) and is_nm(layer.mask, 2, 4)
    assert torch.equal(layer.mask, sparseops.masks.nm(linear.weight.detach(), 2, 4))
    # 9 full groups of 2 and a last group of 1 column: 19 a row, one empty slot a row
    assert layer.values.shape == (11, 20) and layer.nnz == 11 * 19 and layer.empty.numel() == 11
    assert torch.equal(layer.to_dense().weight.detach(), linear.weight.detach() * layer.mask)
    assert "pattern=2:4" in repr(layer) and f"nnz={layer.nnz}" in repr(layer)
    assert set(layer.state_dict()) == {"values", "bias", "idx", "empty", "dense_shape"}


# ---- training keeps the empty slots empty ----


@pytest.mark.parametrize("pattern", ["2:4", NM(2, 4, transposable=True)], ids=["2:4", "2:4T"])
def test_nm_sparse_linear_adamw_keeps_empty_slots_zero(isa, pattern):
    p = sparseops.patterns.as_pattern(pattern)
    mask = (_transposable_mask if p.transposable else _nm_mask)(11, 37, 2, 4, "holed")
    layer = SparseLinear(37, 11, mask=mask, pattern=pattern)
    empty = layer.empty.clone()
    assert empty.numel() > 11  # holes beyond the narrow last group
    start = layer.values.detach().clone()
    # the dense twin: same weights, gradient masked; AdamW leaves zero weights with zero gradient at zero
    dense = layer.to_dense().double()
    opt = torch.optim.AdamW(layer.parameters(), lr=1e-2, weight_decay=0.1)
    opt_d = torch.optim.AdamW(dense.parameters(), lr=1e-2, weight_decay=0.1)
    for _ in range(5):
        x, t = torch.randn(8, 37), torch.randn(8, 11)
        for model, o, xx, tt in ((layer, opt, x, t), (dense, opt_d, x.double(), t.double())):
            o.zero_grad()
            (model(xx) - tt).pow(2).mean().backward()
            if model is dense:
                model.weight.grad *= mask
            o.step()
        assert (layer.values.grad.view(-1)[empty] == 0).all()
    assert (layer.values.detach().view(-1)[empty] == 0).all()
    assert torch.equal(layer.empty, empty) and torch.equal(layer.mask, mask)
    after = layer.to_dense().weight.detach()
    assert (after[~mask] == 0).all()
    assert not torch.equal(layer.values.detach(), start)
    assert_close_rms(after, dense.weight.detach(), tol=1e-4, name="weight after AdamW")


# ---- transposable: the input gradient runs on the N:M kernel over Wᵀ ----


def _count_calls(monkeypatch, name):
    calls = []
    real = getattr(ops_nm, name)

    def counted(*args, **kwargs):
        calls.append(name)
        return real(*args, **kwargs)

    monkeypatch.setattr(ops_nm, name, counted)
    return calls


@pytest.mark.parametrize("n,m", [pytest.param(2, 4, id="2:4"), pytest.param(1, 4, id="1:4"),
                                 pytest.param(3, 8, id="3:8")])
def test_nm_transposable_from_dense_backward_runs_on_nm_dsd(isa, monkeypatch, n, m):
    linear = nn.Linear(37, 22)
    layer = SparseLinear.from_dense(linear, pattern=NM(n, m, transposable=True))
    mask = layer.mask
    assert is_transposable_nm(mask, n, m) and is_nm(mask, n, m) and is_nm(mask.T, n, m)
    f = layer.format
    assert f.transposable and f.t_idx.shape == (37, (-(-22 // m) * n + 1) // 2)
    dsd, dsd_csr = _count_calls(monkeypatch, "dsd"), _count_calls(monkeypatch, "dsd_csr")
    x = torch.randn(9, 37, requires_grad=True)
    g = torch.randn(9, 22)
    (layer(x) * g).sum().backward()
    assert len(dsd) == 1 and not dsd_csr, "the transposable weight's dx must run on nm_dsd, not the CSR path"
    w = linear.weight.detach().double() * mask
    assert_close_rms(x.grad, g.double() @ w, torch.float32, name="dx")
    # and a plain N:M weight takes the CSR of Wᵀ
    plain = SparseLinear.from_dense(linear, mask=mask, pattern=NM(n, m))
    x2 = x.detach().clone().requires_grad_()
    (plain(x2) * g).sum().backward()
    assert len(dsd) == 1 and len(dsd_csr) == 1
    assert_close_rms(x2.grad, g.double() @ w, torch.float32, name="dx (plain)")


def test_nm_transposable_constructor_mask_checks():
    mask = _transposable_mask(11, 37, 2, 4, "holed")
    layer = SparseLinear(37, 11, mask=mask, pattern=NM(2, 4, transposable=True))
    assert torch.equal(layer.mask, mask) and layer.format.transposable
    rows_only = _nm_mask(11, 37, 2, 4, "full")
    assert not is_nm(rows_only.T, 2, 4)
    with pytest.raises(ValueError, match="^mask: .*transposable 2:4"):
        SparseLinear(37, 11, mask=rows_only, pattern=NM(2, 4, transposable=True))
    with pytest.raises(ValueError, match="^mask: .*2:4"):
        SparseLinear(37, 11, mask=torch.ones(11, 37, dtype=torch.bool), pattern="2:4")


# ---- torch.compile ----


def _small_nm_model():
    return nn.Sequential(
        SparseLinear(16, 8, pattern="2:4"), nn.ReLU(), SparseLinear(8, 6, pattern=NM(2, 4, transposable=True)),
        nn.ReLU(), SparseLinear(6, 4, mask=_nm_mask(4, 6, 1, 4, "holed"), pattern="1:4"),
    )


def test_nm_sparse_linear_compile_forward_backward_aot_eager():
    torch._dynamo.reset()
    model = _small_nm_model()
    compiled = torch.compile(model, fullgraph=True, backend="aot_eager")
    x = torch.randn(2, 5, 16)
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


def test_nm_sparse_linear_compile_inductor():
    torch._dynamo.reset()
    model = _small_nm_model()
    compiled = torch.compile(model, fullgraph=True)
    x = torch.randn(2, 3, 16)
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


# ---- state_dict, moving, copying ----


@pytest.mark.parametrize("pattern", ["2:4", NM(2, 4, transposable=True), "3:5"], ids=["2:4", "2:4T", "3:5"])
def test_nm_sparse_linear_state_dict_round_trip(isa, pattern):
    p = sparseops.patterns.as_pattern(pattern)
    mask = (_transposable_mask if p.transposable else _nm_mask)(11, 37, p.n, p.m, "holed")
    a = SparseLinear(37, 11, mask=mask, pattern=pattern)
    sd = a.state_dict()
    assert set(sd) == {"values", "bias", "idx", "empty", "dense_shape"}
    b = SparseLinear(37, 11, pattern=pattern)
    assert b.empty.numel() != a.empty.numel()
    b.load_state_dict(sd)
    assert b.nnz == a.nnz and torch.equal(b.mask, a.mask) and b.format.transposable == p.transposable
    for name, t in a.format.tensors().items():
        assert torch.equal(getattr(b, name), t), name
    x = torch.randn(5, 37, requires_grad=True)
    ya, yb = a(x), b(x)
    assert torch.equal(ya, yb)
    # the rebuilt Wᵀ index drives the backward
    ga = torch.autograd.grad(ya.sum(), (x, a.values))
    gb = torch.autograd.grad(yb.sum(), (x, b.values))
    assert torch.equal(ga[0], gb[0]) and torch.equal(ga[1], gb[1])


def _corrupt(sd, key, edit):
    sd = dict(sd)
    sd[key] = edit(sd[key].clone())
    return sd


def _set_high_nibble(idx):
    idx[0, 0] = (idx[0, 0] & 0x0F) | 0xF0
    return idx


BAD_CHECKPOINTS = [
    pytest.param(lambda sd: _corrupt(sd, "idx", _set_high_nibble), r"idx: positions must lie in \[0, m=4\)",
                 id="idx-position-ge-m"),
    pytest.param(lambda sd: _corrupt(sd, "idx", lambda t: t.long()), "idx: expected a uint8 tensor", id="idx-int64"),
    pytest.param(lambda sd: _corrupt(sd, "idx", lambda t: t[:, :-1]), r"idx: expected shape \(11, 10\)",
                 id="idx-wrong-shape"),
    pytest.param(lambda sd: _corrupt(sd, "empty", lambda t: t + 1000), r"empty: slot numbers must lie in \[0, 220\)",
                 id="empty-out-of-range"),
    pytest.param(lambda sd: _corrupt(sd, "values", lambda t: t[:, :-1]), r"values: checkpoint holds \(11, 19\)",
                 id="values-wrong-shape"),
]


@pytest.mark.parametrize("make,match", BAD_CHECKPOINTS)
def test_nm_sparse_linear_load_bad_checkpoint_raises_a_clear_error(make, match):
    a = SparseLinear(37, 11, pattern="2:4")
    b = SparseLinear(37, 11, pattern="2:4")
    with pytest.raises(RuntimeError, match=match):
        b.load_state_dict(make(a.state_dict()))


def test_nm_sparse_linear_load_non_transposable_checkpoint_into_transposable_fails():
    a = SparseLinear(37, 11, pattern="2:4")
    assert not is_nm(a.mask.T, 2, 4)
    b = SparseLinear(37, 11, pattern=NM(2, 4, transposable=True))
    with pytest.raises(RuntimeError, match="mask: .*not transposable"):
        b.load_state_dict(a.state_dict())


def test_nm_sparse_linear_failed_load_leaves_layer_unchanged():
    a = SparseLinear(37, 11, pattern="2:4")
    b = SparseLinear(37, 11, pattern="2:4")
    before = copy.deepcopy(b.state_dict())
    with pytest.raises(RuntimeError, match=r"idx: positions must lie in \[0, m=4\)"):
        b.load_state_dict(_corrupt(a.state_dict(), "idx", _set_high_nibble))
    for k, v in b.state_dict().items():
        assert torch.equal(v, before[k]), f"{k} changed by a failed load"


def test_nm_sparse_linear_checkpoint_with_nonzero_empty_slots_is_consistent():
    # holes inside the groups: empty slots then point at real columns (not only at the padding past in)
    a = SparseLinear(37, 11, mask=_nm_mask(11, 37, 2, 4, "holed"), pattern="2:4")
    sd = a.state_dict()
    sd["values"] = sd["values"].clone()
    sd["values"].view(-1)[sd["empty"]] = 5.0
    b = SparseLinear(37, 11, pattern="2:4")
    before = copy.deepcopy(b.state_dict())
    # the weight would differ between the kernels (which skip empty slots) and to_dense: refused, and the
    # layer keeps what it had
    with pytest.raises(RuntimeError, match="nonzero at an empty slot"):
        b.load_state_dict(sd)
    for k, v in b.state_dict().items():
        assert torch.equal(v, before[k]), f"{k} changed by a failed load"
    x = torch.randn(3, 37)
    assert_close_rms(b(x), b.to_dense()(x).double(), torch.float32, name="forward vs to_dense")


@pytest.mark.parametrize("pattern", ["2:4", NM(2, 4, transposable=True)], ids=["2:4", "2:4T"])
def test_nm_sparse_linear_to_float64_runs_the_reference(pattern):
    layer, mask, w, b = _nm_pair(37, 11, pattern, "holed")
    for moved in (copy.deepcopy(layer).to(torch.float64), copy.deepcopy(layer).double()):
        assert moved.values.dtype == moved.bias.dtype == torch.float64
        f = moved.format
        assert f.idx.dtype == f.t_idx.dtype == torch.uint8 and f.empty.dtype == torch.int64
        assert all(t.dtype == torch.int32 for t in (f.t_crow, f.t_row, f.t_perm, f.t_slot))
        x = torch.randn(5, 37, dtype=torch.float64, requires_grad=True)
        y = moved(x)
        assert y.dtype == torch.float64
        y64 = F.linear(x.detach(), w.detach(), b.detach())
        assert_close_rms(y, y64, torch.float64, name="y")
        g = torch.randn(5, 11, dtype=torch.float64)
        (y * g).sum().backward()
        assert_close_rms(x.grad, g @ w.detach(), torch.float64, name="dx")
        assert_close_rms(moved.values.grad, f.gather(g.T @ x.detach()), torch.float64, name="dvalues")


def test_nm_sparse_linear_deepcopy():
    layer = SparseLinear(37, 11, pattern=NM(2, 4, transposable=True))
    twin = copy.deepcopy(layer)
    x = torch.randn(4, 37)
    assert torch.equal(twin(x), layer(x))
    with torch.no_grad():
        twin.values.add_(1.0)
    assert not torch.equal(twin(x), layer(x))


@pytest.mark.filterwarnings("ignore:Initializing zero-element tensors is a no-op")
def test_nm_sparse_linear_zero_in_features(isa):
    linear = nn.Linear(0, 4)
    layer = SparseLinear.from_dense(linear, pattern="2:4")
    x = torch.randn(3, 0)
    assert torch.equal(layer(x), linear(x))


@pytest.mark.filterwarnings("ignore:Initializing zero-element tensors is a no-op")
def test_nm_sparse_linear_zero_out_features(isa):
    layer = SparseLinear(5, 0, pattern="2:4")
    assert layer(torch.randn(3, 5)).shape == (3, 0)
    assert layer.mask.shape == (0, 5)


# ---- the C++ binding's validation: a clear error, and the output left untouched ----

_B, _IN, _OUT, _N, _M = 5, 6, 3, 2, 4


def _u8(rows):
    return np.array(rows, np.uint8)


def _i32(*v):
    return np.array(v, np.int32)


def _valid_binding_args():
    rng = np.random.default_rng(0)
    return {
        "x": rng.standard_normal((_B, _IN)).astype(np.float32),
        "dy": rng.standard_normal((_B, _OUT)).astype(np.float32),
        "values": np.array(_HAND["values"], np.float32),
        "idx": _u8(_HAND["idx"]),
        "bias": rng.standard_normal(_OUT).astype(np.float32),
        "t_idx": _u8(_HAND["t_idx"]),
        "t_slot": np.array(_HAND["t_slot"], np.int32),
        "t_crow": _i32(*_HAND["t_crow"]),
        "t_row": _i32(*_HAND["t_row"]),
        "t_perm": _i32(*_HAND["t_perm"]),
        "n": _N,
        "m": _M,
    }


def _nan(*shape, dtype=np.float32):
    return np.full(shape, np.nan, dtype)


def _call(op, a, out):
    if op == "dds":
        return _C.nm_dds(a["x"], a["values"], a["idx"], a["n"], a["m"], a["bias"], out, 2)
    if op == "sdd":
        return _C.nm_sdd(a["dy"], a["x"], a["idx"], a["n"], a["m"], out, 2)
    if op == "dsd":
        return _C.nm_dsd(a["dy"], a["values"], a["t_idx"], a["t_slot"], a["n"], a["m"], out, 2)
    return _C.nm_dsd_csr(a["dy"], a["values"], a["t_crow"], a["t_row"], a["t_perm"], out, 2)


_OUT_SHAPE = {"dds": (_B, _OUT), "sdd": (_OUT, 4), "dsd": (_B, _IN), "dsd_csr": (_B, _IN)}


@needs_cpp
@pytest.mark.parametrize("op", list(_OUT_SHAPE))
def test_nm_binding_valid_hand_built_index_matches_dense(op):
    a = _valid_binding_args()
    out = _nan(*_OUT_SHAPE[op])
    _call(op, a, out)
    w = _HAND_W.double().numpy()
    x, dy = a["x"].astype(np.float64), a["dy"].astype(np.float64)
    expected = {
        "dds": x @ w.T + a["bias"],
        "sdd": F.pad(torch.from_numpy(dy.T @ x), (0, 4)).gather(1, _slot_columns(torch.tensor(_HAND["idx"]), 4, 2, 4)),
        "dsd": dy @ w,
        "dsd_csr": dy @ w,
    }[op]
    assert_close_rms(torch.from_numpy(out), torch.as_tensor(expected), torch.float32, name=op)


@needs_cpp
@pytest.mark.parametrize("op", list(_OUT_SHAPE))
def test_nm_binding_refuses_an_output_it_would_have_to_convert(op):
    # a converted copy would take the writes and drop them: a list is refused, not copied
    out = _nan(*_OUT_SHAPE[op]).tolist()
    with pytest.raises(TypeError):
        _call(op, _valid_binding_args(), out)


@needs_cpp
def test_nm_binding_ignores_the_padding_nibble_of_an_odd_slot_count():
    # 3:4 with in = 4: S = 3, so the high nibble of the last byte is no slot
    mask = torch.tensor([[1, 0, 1, 1], [0, 1, 0, 0]], dtype=torch.bool)
    w = torch.randn(2, 4) * mask
    f, v = NMWeight.from_dense(w, mask, 3, 4)
    idx = f.idx.numpy().copy()
    idx[:, -1] |= 0xF0
    x = np.random.default_rng(1).standard_normal((3, 4)).astype(np.float32)
    y = _nan(3, 2)
    _C.nm_dds(x, v.numpy(), idx, 3, 4, None, y, 1)
    assert_close_rms(torch.from_numpy(y), torch.from_numpy(x.astype(np.float64) @ w.double().numpy().T),
                     torch.float32, name="y")


def _bad(op, name, exc, id, **changes):
    return pytest.param(op, name, exc, changes, id=f"{op}-{id}")


def _readonly(shape):
    a = _nan(*shape)
    a.flags.writeable = False
    return a


def _idx_with(byte_row, byte_col, value, key="idx"):
    rows = np.array(_HAND[key], np.uint8)
    rows[byte_row, byte_col] = value
    return rows


def _t_slot_with(i, j, value):
    t = np.array(_HAND["t_slot"], np.int32)
    t[i, j] = value
    return t


def _perm_with(k, value):
    t = _i32(*_HAND["t_perm"])
    t[k] = value
    return t


BAD_BINDING_ARGS = [
    # nm_dds
    _bad("dds", "idx", ValueError, "idx-low-nibble-ge-m", idx=_idx_with(0, 0, 0x24)),
    _bad("dds", "idx", ValueError, "idx-high-nibble-ge-m", idx=_idx_with(2, 1, 0x50)),
    _bad("dds", "idx", ValueError, "idx-nibble-15", idx=_idx_with(1, 0, 0xFF)),
    _bad("dds", "idx", ValueError, "idx-too-narrow", idx=np.zeros((_OUT, 1), np.uint8)),
    _bad("dds", "idx", ValueError, "idx-too-wide", idx=np.zeros((_OUT, 3), np.uint8)),
    _bad("dds", "idx", ValueError, "idx-1d", idx=np.zeros(2 * _OUT, np.uint8)),
    _bad("dds", "idx", ValueError, "idx-0d", idx=np.array(16, np.uint8)),
    _bad("dds", "idx", ValueError, "idx-not-c-contiguous", idx=np.asfortranarray(_u8(_HAND["idx"]))),
    _bad("dds", "idx", TypeError, "idx-int32", idx=np.array(_HAND["idx"], np.int32)),
    _bad("dds", "idx", TypeError, "idx-int8", idx=np.array(_HAND["idx"], np.int8)),
    _bad("dds", "values", ValueError, "values-too-few-slots", values=np.ones((_OUT, 3), np.float32)),
    _bad("dds", "values", ValueError, "values-too-few-rows", values=np.ones((_OUT - 1, 4), np.float32)),
    _bad("dds", "values", ValueError, "values-flat", values=np.ones(_OUT * 4, np.float32)),
    _bad("dds", "values", ValueError, "values-not-c-contiguous", values=np.ones((4, _OUT), np.float32).T),
    _bad("dds", "values", TypeError, "values-float64", values=np.ones((_OUT, 4), np.float64)),
    _bad("dds", "x", TypeError, "x-float64", x=np.zeros((_B, _IN), np.float64)),
    _bad("dds", "x", ValueError, "x-1d", x=np.zeros(_IN, np.float32)),
    _bad("dds", "bias", ValueError, "bias-wrong-length", bias=np.ones(_OUT + 1, np.float32)),
    _bad("dds", "bias", TypeError, "bias-float64", bias=np.ones(_OUT, np.float64)),
    _bad("dds", "n, m", ValueError, "n-equals-m", n=4),
    _bad("dds", "n, m", ValueError, "n-zero", n=0),
    _bad("dds", "n, m", ValueError, "m-17", m=17),
    _bad("dds", "y", TypeError, "y-float64", out=_nan(_B, _OUT, dtype=np.float64)),
    _bad("dds", "y", ValueError, "y-wrong-shape", out=_nan(_B, _OUT + 1)),
    _bad("dds", "y", ValueError, "y-wrong-batch", out=_nan(_B + 1, _OUT)),
    _bad("dds", "y", ValueError, "y-not-c-contiguous", out=_nan(_OUT, _B).T),
    _bad("dds", "y", ValueError, "y-read-only", out=_readonly((_B, _OUT))),
    # nm_sdd
    _bad("sdd", "idx", ValueError, "idx-low-nibble-ge-m", idx=_idx_with(0, 1, 0x17)),
    _bad("sdd", "idx", ValueError, "idx-high-nibble-ge-m", idx=_idx_with(2, 0, 0x90)),
    _bad("sdd", "idx", ValueError, "idx-too-few-rows", idx=np.zeros((_OUT - 1, 2), np.uint8)),
    _bad("sdd", "idx", TypeError, "idx-int64", idx=np.array(_HAND["idx"], np.int64)),
    _bad("sdd", "dy", ValueError, "dy-rows-differ-from-x", dy=np.zeros((_B + 1, _OUT), np.float32)),
    _bad("sdd", "dy", TypeError, "dy-float64", dy=np.zeros((_B, _OUT), np.float64)),
    _bad("sdd", "x", TypeError, "x-float64", x=np.zeros((_B, _IN), np.float64)),
    _bad("sdd", "n, m", ValueError, "n-gt-m", n=5),
    _bad("sdd", "dvalues", ValueError, "dvalues-wrong-shape", out=_nan(_OUT, 5)),
    _bad("sdd", "dvalues", ValueError, "dvalues-flat", out=_nan(_OUT * 4)),
    _bad("sdd", "dvalues", ValueError, "dvalues-not-c-contiguous", out=_nan(4, _OUT).T),
    _bad("sdd", "dvalues", ValueError, "dvalues-read-only", out=_readonly((_OUT, 4))),
    _bad("sdd", "dvalues", TypeError, "dvalues-float64", out=_nan(_OUT, 4, dtype=np.float64)),
    # nm_dsd (the binding calls t_slot "t_perm")
    _bad("dsd", "t_idx", ValueError, "t_idx-position-ge-m", t_idx=_idx_with(1, 0, 0x41, key="t_idx")),
    _bad("dsd", "t_idx", ValueError, "t_idx-too-wide", t_idx=np.zeros((_IN, 2), np.uint8)),
    _bad("dsd", "t_idx", TypeError, "t_idx-int32", t_idx=np.array(_HAND["t_idx"], np.int32)),
    _bad("dsd", "t_perm", ValueError, "t_slot-past-values", t_slot=_t_slot_with(3, 1, 12)),
    _bad("dsd", "t_perm", ValueError, "t_slot-far-past-values", t_slot=_t_slot_with(5, 0, 1 << 30)),
    _bad("dsd", "t_perm", ValueError, "t_slot-below-minus-one", t_slot=_t_slot_with(0, 0, -2)),
    _bad("dsd", "t_perm", ValueError, "t_slot-wrong-shape", t_slot=np.zeros((_IN, 1), np.int32)),
    _bad("dsd", "t_perm", ValueError, "t_slot-not-c-contiguous", t_slot=np.asfortranarray(_t_slot_with(0, 0, 0))),
    _bad("dsd", "t_perm", TypeError, "t_slot-int64", t_slot=np.array(_HAND["t_slot"], np.int64)),
    _bad("dsd", "values", TypeError, "values-float64", values=np.ones((_OUT, 4), np.float64)),
    _bad("dsd", "values", ValueError, "values-not-c-contiguous", values=np.ones((4, _OUT), np.float32).T),
    _bad("dsd", "dy", TypeError, "dy-float64", dy=np.zeros((_B, _OUT), np.float64)),
    _bad("dsd", "n, m", ValueError, "m-1", m=1),
    _bad("dsd", "dx", ValueError, "dx-wrong-shape", out=_nan(_B, _IN + 1)),
    _bad("dsd", "dx", ValueError, "dx-not-c-contiguous", out=_nan(_IN, _B).T),
    _bad("dsd", "dx", ValueError, "dx-read-only", out=_readonly((_B, _IN))),
    _bad("dsd", "dx", TypeError, "dx-float64", out=_nan(_B, _IN, dtype=np.float64)),
    # nm_dsd_csr
    _bad("dsd_csr", "t_perm", ValueError, "t_perm-past-values", t_perm=_perm_with(0, 12)),
    _bad("dsd_csr", "t_perm", ValueError, "t_perm-negative", t_perm=_perm_with(3, -1)),
    _bad("dsd_csr", "t_perm", ValueError, "t_perm-wrong-length", t_perm=_i32(*_HAND["t_perm"][:-1])),
    _bad("dsd_csr", "t_perm", TypeError, "t_perm-int64", t_perm=np.array(_HAND["t_perm"], np.int64)),
    _bad("dsd_csr", "t_row", ValueError, "t_row-past-out", t_row=_i32(0, 3, 1, 2, 0, 0, 1)),
    _bad("dsd_csr", "t_row", ValueError, "t_row-unsorted", t_row=_i32(2, 0, 1, 2, 0, 0, 1)),
    _bad("dsd_csr", "t_crow", ValueError, "t_crow-end-not-nnz", t_crow=_i32(0, 2, 4, 5, 5, 6, 6)),
    _bad("dsd_csr", "t_crow", ValueError, "t_crow-decreasing", t_crow=_i32(0, 2, 1, 5, 5, 6, 7)),
    _bad("dsd_csr", "t_crow", ValueError, "t_crow-entry-past-nnz", t_crow=_i32(0, 2, 9, 5, 5, 6, 7)),
    _bad("dsd_csr", "t_crow", ValueError, "t_crow-empty", t_crow=np.zeros(0, np.int32)),
    _bad("dsd_csr", "values", TypeError, "values-float64", values=np.ones((_OUT, 4), np.float64)),
    _bad("dsd_csr", "dy", TypeError, "dy-float64", dy=np.zeros((_B, _OUT), np.float64)),
    _bad("dsd_csr", "dx", ValueError, "dx-wrong-shape", out=_nan(_B, _IN - 1)),
    _bad("dsd_csr", "dx", ValueError, "dx-read-only", out=_readonly((_B, _IN))),
]


@needs_cpp
@pytest.mark.parametrize("n,m", [(2, 4), (1, 4), (2, 8)], ids=["2:4", "1:4", "2:8"])
@pytest.mark.parametrize("bad_row", [0, 9, 36], ids=["first-group", "inner-group", "tail"])
def test_nm_dds_batch1_bad_row_raises_and_writes_nothing(isa, bad_row, n, m):
    """The batch-1 window walks (2:4's own, and the general one of 1:4 and 2:8) take 8 (AVX-512) or 4 rows
    at once: a malformed position in any row of a group, or among the rows past the last whole group, is
    refused before y is written, and the good rows around it are not read through the bad one."""
    rng = np.random.default_rng(bad_row)
    out_f, in_f = 37, 50
    mask = _nm_mask(out_f, in_f, n, m, "full")
    from sparseops.formats.nm import NMWeight

    f = NMWeight.from_mask(mask, n, m, False)
    x = rng.standard_normal((1, in_f)).astype(np.float32)
    idx = f.idx.numpy().copy()
    values = rng.standard_normal((out_f, f.slots)).astype(np.float32)
    y = _nan(1, out_f)
    _C.nm_dds(x, values, idx, n, m, None, y, 2)  # the valid index runs
    assert not np.isnan(y).any()
    idx[bad_row, 1] = (idx[bad_row, 1] & 0x0F) | (m << 4)  # a position m in the row's fourth slot
    y = _nan(1, out_f)
    with pytest.raises(ValueError, match=r"^idx:"):
        _C.nm_dds(x, values, idx, n, m, None, y, 2)
    assert np.isnan(y).all(), "y was written although the call raised"


@needs_cpp
@pytest.mark.parametrize("op,name,exc,changes", BAD_BINDING_ARGS)
def test_nm_binding_rejects_malformed_arguments(op, name, exc, changes):
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


@pytest.mark.parametrize("n, m", [(2, 4), (1, 4), (3, 5), (7, 16), (1, 2)])
@pytest.mark.parametrize("transposable", [False, True], ids=["plain", "transposable"])
def test_from_mask_layout_by_its_definition(n, m, transposable):
    # an independent per-group oracle of the layout: a group's slots hold its kept positions, then
    # the smallest unused ones, ascending; t_row/t_perm list Wᵀ's nonzeros row by row with their slot
    from sparseops.formats.nm import NMWeight, unpack_positions

    torch.manual_seed(1)
    out_f, in_f = 13, 37
    w = torch.randn(out_f, in_f)
    mask = sparseops.masks.transposable_nm(w, n, m) if transposable else sparseops.masks.nm(w, n, m)
    mask &= torch.rand(out_f, in_f) > 0.3
    f = NMWeight.from_mask(mask, n, m, transposable)
    G = -(-in_f // m)
    S = G * n
    pos = unpack_positions(f.idx, S)
    empty = set(f.empty.tolist())
    for r in range(out_f):
        for g in range(G):
            cols = range(g * m, min(in_f, g * m + m))
            kept = [c - g * m for c in cols if mask[r, c]]
            unused = [p for p in range(m) if p not in kept]
            want = sorted(kept + unused[: n - len(kept)])
            assert pos[r, g * n : g * n + n].tolist() == want, (r, g)
            for j, p in enumerate(want):
                assert ((r * S + g * n + j) in empty) == (p not in kept)
    t_crow, t_row, t_perm = f.t_crow.long(), f.t_row.long(), f.t_perm.long()
    for c in range(in_f):
        rows = t_row[t_crow[c] : t_crow[c + 1]].tolist()
        assert rows == mask[:, c].nonzero().flatten().tolist()
        for k in range(int(t_crow[c]), int(t_crow[c + 1])):
            s = int(t_perm[k])
            r, j = divmod(s, S)
            assert r == rows[k - int(t_crow[c])] and (j // n) * m + int(pos[r, j]) == c


@pytest.mark.skipif(_C is None, reason="sparseops._C is not built")
def test_binding_nm_dds16_refuses_bad_arguments():
    c = Case(3, 37, 5, 2, 4, "full")
    f = c.fmt
    x = c.x.numpy()
    v16 = c.values.detach().to(torch.bfloat16).view(torch.int16).numpy()
    y = np.empty((3, 5), dtype=np.float32)
    idx = f.idx.numpy()
    _C.nm_dds16(x, v16, "bfloat16", idx, 2, 4, None, y, 1)  # valid
    with pytest.raises(ValueError, match="dtype"):
        _C.nm_dds16(x, v16, "float32", idx, 2, 4, None, y, 1)
    with pytest.raises(TypeError, match="values"):
        _C.nm_dds16(x, c.values.detach().numpy(), "bfloat16", idx, 2, 4, None, y, 1)
    with pytest.raises(ValueError, match="values"):
        _C.nm_dds16(x, v16[:, :-1], "bfloat16", idx, 2, 4, None, y, 1)
    with pytest.raises(ValueError, match="x: at most 7 rows"):
        _C.nm_dds16(np.zeros((8, 37), dtype=np.float32), v16, "bfloat16", idx, 2, 4, None,
                    np.empty((8, 5), dtype=np.float32), 1)
    bad = idx.copy()
    bad[0, 0] = 0xFF  # a position past m
    with pytest.raises(ValueError, match="idx"):
        _C.nm_dds16(x, v16, "bfloat16", bad, 2, 4, None, y, 1)
    buf = np.zeros(200, dtype=np.float32)
    with pytest.raises(ValueError, match="shares memory"):
        _C.nm_dds16(buf[:111].reshape(3, 37), v16, "bfloat16", idx, 2, 4, None, buf[100:115].reshape(3, 5), 1)
