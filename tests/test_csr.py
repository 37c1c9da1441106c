"""The CSR ops (torch.ops.sparseops.csr_dds / csr_dsd / csr_sdd) on CPU, against fp64 dense math.

fp32 goes through the C++ kernels (both ISA paths); other dtypes through the reference.
The C++ binding's validation and the CSRWeight format are tested here too.
"""

import dataclasses

import numpy as np
import pytest
import torch
from helpers import assert_close_rms, guard_dtype_route, shape_param

import sparseops
import sparseops.ops.csr as ops_csr
import sparseops.reference.csr as reference_csr
from sparseops._cpp import _C
from sparseops.formats import CSRWeight, validate_csr

OPS = torch.ops.sparseops



needs_cpp = pytest.mark.skipif(_C is None, reason="sparseops._C is not built")


# ---- cases: a dense weight, its mask, and inputs; the references use only dense torch math ----


def _holed_mask(out_f, in_f):
    """Random 50% mask with empty rows and empty columns; row 0 is full apart from the empty columns."""
    mask = torch.rand(out_f, in_f) >= 0.5
    mask[0, :] = True
    mask[1::3, :] = False
    mask[:, 2::5] = False
    return mask


def _mask(out_f, in_f, kind):
    if kind == "holed":
        return _holed_mask(out_f, in_f)
    if kind == "empty":
        return torch.zeros(out_f, in_f, dtype=torch.bool)
    if kind == "dense-row":
        mask = torch.zeros(out_f, in_f, dtype=torch.bool)
        mask[out_f // 2, :] = True
        return mask
    return torch.rand(out_f, in_f) >= kind


class Case:
    """A sparse weight ``w [out, in]`` (zeros off ``mask``) with its CSR index and fp32 inputs."""

    def __init__(self, batch, in_f, out_f, kind, dtype=torch.float32):
        self.mask = _mask(out_f, in_f, kind)
        self.w = torch.randn(out_f, in_f) * self.mask  # [out, in]
        self.fmt = CSRWeight.from_mask(self.mask)
        # boolean indexing walks row-major, the order CSR stores the values in
        self.values = self.w[self.mask].to(dtype)  # [nnz]
        self.x = torch.randn(batch, in_f).to(dtype)  # [B, in]
        self.dy = torch.randn(batch, out_f).to(dtype)  # [B, out]
        self.bias = torch.randn(out_f).to(dtype)  # [out]
        self.w = self.w.to(dtype)

    def dds(self, x=None, bias=None):
        x = self.x if x is None else x
        return OPS.csr_dds(x, self.values, self.fmt.crow, self.fmt.col, bias, self.fmt.out_features)

    def dsd(self, dy=None):
        dy = self.dy if dy is None else dy
        f = self.fmt
        return OPS.csr_dsd(dy, self.values, f.t_crow, f.t_row, f.t_perm, f.in_features)

    def sdd(self, dy=None, x=None):
        dy = self.dy if dy is None else dy
        x = self.x if x is None else x
        return OPS.csr_sdd(dy, x, self.fmt.crow, self.fmt.col, self.fmt.row)

    # fp64 dense references
    def dds_ref(self, x=None, bias=None):
        x = self.x if x is None else x
        y = x.double() @ self.w.double().T
        return y if bias is None else y + bias.double()

    def dsd_ref(self, dy=None):
        dy = self.dy if dy is None else dy
        return dy.double() @ self.w.double()

    def sdd_ref(self, dy=None, x=None):
        dy = self.dy if dy is None else dy
        x = self.x if x is None else x
        return (dy.double().T @ x.double())[self.mask]




def _special(batch, in_f, out_f, kind):
    return pytest.param(batch, in_f, out_f, kind, id=f"B{batch}-in{in_f}-out{out_f}-{kind}")


# the C++ takes gathers for B < 8, batch-major tiles of 8 / 16 / 24 lanes up to B = 24 and 32
# lanes beyond (64 from B = 128 on the avx512 path); in = 1000 sweeps several column chunks of a packed tile.
SHAPES = [
    shape_param(1, 1, 1, 0.0),
    shape_param(1, 1000, 37, 0.5),
    shape_param(3, 37, 3, 0.5),
    shape_param(5, 3, 1000, 0.5),
    shape_param(5, 37, 37, 0.99),
    shape_param(8, 37, 37, 0.5),
    shape_param(8, 1000, 3, 0.99),
    shape_param(9, 3, 37, 0.0),
    shape_param(9, 37, 1000, 0.5),
    shape_param(16, 1, 3, 0.0),
    shape_param(16, 1000, 37, 0.5),
    shape_param(17, 37, 37, 0.5),
    shape_param(17, 3, 1000, 0.99),
    shape_param(24, 37, 3, 0.5),
    shape_param(25, 37, 37, 0.0),
    shape_param(37, 1000, 3, 0.5),
    shape_param(37, 37, 37, 0.99),
    shape_param(64, 1000, 37, 0.5),
    shape_param(64, 3, 3, 0.0),
    shape_param(64, 1000, 1000, 0.99),
    # 64-lane tiles on the avx512 path (B >= 128) with in > 1024, where the walk splits into column chunks
    # (counted in 32-lane tiles): B=240 is four tiles, the last part padding; B=320 five, so the weight
    # gradient takes four tiles at once and then one; the input gradient's walk over Wᵀ splits at out > 1024
    shape_param(240, 1100, 37, 0.5),
    shape_param(320, 1100, 37, 0.9),
    shape_param(256, 37, 1100, 0.5),
    # the input gradient's gather of Wᵀ's values runs in blocks of 256 rows by 256 columns of Wᵀ at a density of
    # 1/4 or more (gather_blocked): several of each, on the B < 8 path and on one packed tile
    shape_param(5, 600, 520, 0.5),
    shape_param(16, 520, 600, 0.0),
    _special(3, 37, 37, "holed"),
    _special(17, 37, 37, "holed"),
    _special(37, 1000, 37, "holed"),
    _special(3, 37, 37, "empty"),
    _special(37, 37, 37, "empty"),
    _special(5, 1000, 3, "dense-row"),
    _special(37, 1000, 3, "dense-row"),
]
PARAMS = "batch,in_f,out_f,kind"


def test_masks_used_by_the_cases_have_the_advertised_structure():
    mask = _holed_mask(37, 37)
    assert (~mask.any(1)).any() and (~mask.any(0)).any()
    assert _mask(37, 37, "dense-row").all(1).sum() == 1
    assert not _mask(37, 37, "empty").any()


# ---- the ops against dense math, fp32 on both C++ paths ----


@pytest.mark.parametrize(PARAMS, SHAPES)
@pytest.mark.parametrize("bias", [True, False], ids=["bias", "nobias"])
def test_csr_dds_matches_dense(isa, batch, in_f, out_f, kind, bias):
    c = Case(batch, in_f, out_f, kind)
    b = c.bias if bias else None
    assert_close_rms(c.dds(bias=b), c.dds_ref(bias=b), torch.float32, name="y")


@pytest.mark.parametrize(PARAMS, SHAPES)
def test_csr_dsd_matches_dense(isa, batch, in_f, out_f, kind):
    c = Case(batch, in_f, out_f, kind)
    assert_close_rms(c.dsd(), c.dsd_ref(), torch.float32, name="dx")


@pytest.mark.parametrize(PARAMS, SHAPES)
def test_csr_sdd_matches_dense(isa, batch, in_f, out_f, kind):
    c = Case(batch, in_f, out_f, kind)
    assert_close_rms(c.sdd(), c.sdd_ref(), torch.float32, name="dvalues")


@pytest.mark.parametrize(PARAMS, SHAPES)
def test_csr_backward_matches_dense(isa, batch, in_f, out_f, kind):
    c = Case(batch, in_f, out_f, kind)
    f = c.fmt
    dx, dv = ops_csr.csr_backward(c.dy, c.x, c.values, f.crow, f.col, f.row, f.t_crow, f.t_row, f.t_perm)
    assert_close_rms(dx, c.dsd_ref(), torch.float32, name="dx")
    assert_close_rms(dv, c.sdd_ref(), torch.float32, name="dvalues")


@pytest.mark.parametrize("layout", ["transposed", "column-slice"])
def test_csr_backward_strided_inputs(isa, layout):
    c = Case(37, 1000, 37, 0.5)
    f = c.fmt
    dx, dv = ops_csr.csr_backward(
        LAYOUTS[layout](c.dy), LAYOUTS[layout](c.x), c.values, f.crow, f.col, f.row, f.t_crow, f.t_row, f.t_perm
    )
    assert_close_rms(dx, c.dsd_ref(), torch.float32, name="dx")
    assert_close_rms(dv, c.sdd_ref(), torch.float32, name="dvalues")


def test_csr_ops_batch_zero(isa):
    c = Case(0, 37, 5, 0.5)
    assert c.dds(bias=c.bias).shape == (0, 5)
    assert c.dsd().shape == (0, 37)
    # an empty batch sums nothing: the weight gradient is exactly zero, not left unwritten
    assert_close_rms(c.sdd(), torch.zeros(c.fmt.nnz, dtype=torch.float64), torch.float32, name="dvalues")


# ---- strided inputs: the binding reads strides, so views must give the same result ----


def _transposed_view(t):
    """Same values as ``t``, stored column-major (a non-contiguous view)."""
    v = t.t().contiguous().t()
    assert not v.is_contiguous()
    return v


def _column_slice(t, pad=5):
    """Same values as ``t`` as a column slice of a wider tensor (row stride > columns)."""
    wide = torch.randn(t.shape[0], t.shape[1] + 2 * pad, dtype=t.dtype)
    wide[:, pad : pad + t.shape[1]] = t
    v = wide[:, pad : pad + t.shape[1]]
    assert not v.is_contiguous() or t.shape[0] <= 1
    return v


def _broadcast_rows(t):
    """Every row equal to the first, with row stride 0 (what autograd hands back for ``y.sum()``)."""
    return t[:1].expand_as(t)


LAYOUTS = {"transposed": _transposed_view, "column-slice": _column_slice}
STRIDED = [shape_param(3, 37, 37, 0.5), shape_param(9, 37, 37, 0.5), shape_param(37, 1000, 37, 0.5)]


@pytest.mark.parametrize("layout", list(LAYOUTS))
@pytest.mark.parametrize("batch,in_f,out_f,sparsity", STRIDED)
def test_csr_dds_strided_x(isa, layout, batch, in_f, out_f, sparsity):
    c = Case(batch, in_f, out_f, sparsity)
    x = LAYOUTS[layout](c.x)
    assert_close_rms(c.dds(x=x, bias=c.bias), c.dds_ref(bias=c.bias), torch.float32, name="y")


@pytest.mark.parametrize("layout", list(LAYOUTS) + ["broadcast-rows"])
@pytest.mark.parametrize("batch,in_f,out_f,sparsity", STRIDED)
def test_csr_dsd_strided_dy(isa, layout, batch, in_f, out_f, sparsity):
    c = Case(batch, in_f, out_f, sparsity)
    if layout == "broadcast-rows":
        dy = _broadcast_rows(c.dy)
        expected = c.dsd_ref(dy=dy.contiguous())
    else:
        dy, expected = LAYOUTS[layout](c.dy), c.dsd_ref()
    assert_close_rms(c.dsd(dy=dy), expected, torch.float32, name="dx")


@pytest.mark.parametrize("layout", list(LAYOUTS) + ["broadcast-rows"])
@pytest.mark.parametrize("batch,in_f,out_f,sparsity", STRIDED)
def test_csr_sdd_strided_inputs(isa, layout, batch, in_f, out_f, sparsity):
    c = Case(batch, in_f, out_f, sparsity)
    if layout == "broadcast-rows":
        dy, x = _broadcast_rows(c.dy), _transposed_view(c.x)
        expected = c.sdd_ref(dy=dy.contiguous())
    else:
        dy, x = LAYOUTS[layout](c.dy), LAYOUTS[layout](c.x)
        expected = c.sdd_ref()
    assert_close_rms(c.sdd(dy=dy, x=x), expected, torch.float32, name="dvalues")


@pytest.mark.parametrize("lead", [(4,), (2, 3), (2, 1, 5)], ids=lambda s: "lead" + "x".join(map(str, s)))
def test_sparse_linear_strided_input_with_leading_dims(isa, lead):
    layer = sparseops.SparseLinear(37, 11, sparsity=0.5)
    # [*lead, in] taken as a permuted view of a [in, *lead] tensor: no dimension is contiguous
    x = torch.randn(37, *lead).permute(*range(1, len(lead) + 1), 0)
    assert not x.is_contiguous()
    w = layer.dense_weight().detach().double()
    expected = x.double() @ w.T + layer.bias.detach().double()
    assert_close_rms(layer(x), expected, torch.float32, name="y")


# ---- the NaN poisoning the suite relies on ----


def test_conftest_poisons_allocations_inside_sparseops():
    assert torch.isnan(ops_csr.torch.empty(3)).all()
    assert torch.isnan(ops_csr.torch.empty_like(torch.zeros(2, 2))).all()
    assert not torch.isnan(torch.empty(3).fill_(0)).any()


@needs_cpp
def test_conftest_poisoning_reaches_op_outputs(monkeypatch):
    """With a kernel that writes nothing, the op's output is all NaN, so a missed write cannot pass."""

    class _WritesNothing:
        def __getattr__(self, name):
            return lambda *args: None

    monkeypatch.setattr(ops_csr, "_C", _WritesNothing())
    c = Case(4, 6, 5, 0.5)
    assert torch.isnan(c.dds(bias=c.bias)).all()
    assert torch.isnan(c.dsd()).all()
    assert torch.isnan(c.sdd()).all()


# ---- other dtypes: fp64 on the reference, bf16/fp16 on the fp32 C++ kernels ----


@pytest.mark.parametrize("dtype", [torch.float64, torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize(
    "batch,in_f,out_f,kind",
    [shape_param(3, 37, 5, 0.5), shape_param(37, 1000, 37, 0.5), _special(9, 37, 37, "holed"),
     shape_param(1, 1000, 3, 0.99)],
)
def test_csr_ops_other_dtypes_match_dense(isa, monkeypatch, batch, in_f, out_f, kind, dtype):
    calls = guard_dtype_route(monkeypatch, ops_csr, ("csr_dds", "csr_dsd", "csr_sdd"), dtype)
    c = Case(batch, in_f, out_f, kind, dtype=dtype)
    y = c.dds(bias=c.bias)
    assert y.dtype == dtype
    assert_close_rms(y, c.dds_ref(bias=c.bias), dtype, name="y")
    dx, dv = c.dsd(), c.sdd()
    assert dx.dtype == dtype and dv.dtype == dtype
    assert_close_rms(dx, c.dsd_ref(), dtype, name="dx")
    assert_close_rms(dv, c.sdd_ref(), dtype, name="dvalues")
    if dtype != torch.float64:
        # up to 7 rows the forward reads the 16-bit values as they are; above, the fp32 kernel on a copy
        assert calls[0] == ("csr_dds16" if batch <= ops_csr.CSR16_MAX_ROWS else "csr_dds")
        assert {"csr_dsd", "csr_sdd"} <= set(calls)
        # the fused backward too
        idx = c.fmt
        dx2, dv2 = ops_csr._csr_backward_cpu(c.dy, c.x, c.values, idx.crow, idx.col, idx.row, idx.t_crow, idx.t_row,
                                             idx.t_perm)
        assert dx2.dtype == dtype and dv2.dtype == dtype
        assert_close_rms(dx2, c.dsd_ref(), dtype, name="dx (fused backward)")
        assert_close_rms(dv2, c.sdd_ref(), dtype, name="dvalues (fused backward)")


@pytest.mark.parametrize("chunk", [1 << 20, 64], ids=["one-chunk", "many-chunks"])
@pytest.mark.parametrize(
    "batch,in_f,out_f,kind",
    [shape_param(5, 37, 11, 0.5), _special(7, 37, 37, "holed"), _special(3, 9, 4, "empty"), shape_param(1, 1, 1, 0.0)],
)
def test_reference_csr_matches_dense_fp64(monkeypatch, batch, in_f, out_f, kind, chunk):
    monkeypatch.setattr(reference_csr, "_CHUNK_ELEMS", chunk)
    c = Case(batch, in_f, out_f, kind, dtype=torch.float64)
    f = c.fmt
    y = reference_csr.csr_dds(c.x, c.values, f.crow, f.col, c.bias, out_f)
    assert_close_rms(y, c.dds_ref(bias=c.bias), name="y")
    y = reference_csr.csr_dds(c.x, c.values, f.crow, f.col, None, out_f)
    assert_close_rms(y, c.dds_ref(), name="y-nobias")
    dx = reference_csr.csr_dsd(c.dy, c.values, f.t_crow, f.t_row, f.t_perm, in_f)
    assert_close_rms(dx, c.dsd_ref(), name="dx")
    dv = reference_csr.csr_sdd(c.dy, c.x, f.row, f.col)
    assert_close_rms(dv, c.sdd_ref(), name="dvalues")


# ---- torch.library registration ----


def _opcheck_cases():
    cases = []
    for batch, in_f, out_f, kind in [(3, 7, 5, 0.5), (9, 37, 3, "holed")]:
        c = Case(batch, in_f, out_f, kind)
        f = c.fmt
        tag = f"B{batch}-in{in_f}-out{out_f}"
        for op in ("csr_dds", "csr_dds_host"):
            cases.append(pytest.param(op, (c.x, c.values, f.crow, f.col, c.bias, out_f), id=f"{op}-{tag}-bias"))
            cases.append(pytest.param(op, (c.x, c.values, f.crow, f.col, None, out_f), id=f"{op}-{tag}-nobias"))
        for op in ("csr_dsd", "csr_dsd_host"):
            cases.append(pytest.param(op, (c.dy, c.values, f.t_crow, f.t_row, f.t_perm, in_f), id=f"{op}-{tag}"))
        for op in ("csr_sdd", "csr_sdd_host"):
            cases.append(pytest.param(op, (c.dy, c.x, f.crow, f.col, f.row), id=f"{op}-{tag}"))
        for op in ("csr_backward", "csr_backward_host"):
            args = (c.dy, c.x, c.values, f.crow, f.col, f.row, f.t_crow, f.t_row, f.t_perm)
            cases.append(pytest.param(op, args, id=f"{op}-{tag}"))
    return cases


@pytest.mark.parametrize("op,args", _opcheck_cases())
def test_csr_ops_opcheck(op, args):
    torch.library.opcheck(getattr(OPS, op), args)


# ---- threads ----


@pytest.mark.parametrize("batch,in_f,out_f,sparsity", [shape_param(3, 1000, 37, 0.5), shape_param(37, 1000, 37, 0.5)])
def test_csr_ops_same_result_for_any_thread_count(isa, batch, in_f, out_f, sparsity):
    c = Case(batch, in_f, out_f, sparsity)
    prev = torch.get_num_threads()
    results = {}
    try:
        for n in (1, 2, 3):
            torch.set_num_threads(n)
            results[n] = (c.dds(bias=c.bias), c.dsd(), c.sdd())
    finally:
        torch.set_num_threads(prev)
    for n in (2, 3):
        for name, one, many in zip(("y", "dx", "dvalues"), results[1], results[n]):
            assert_close_rms(many, one.double(), tol=1e-6, name=f"{name} with {n} threads vs 1")
    assert_close_rms(results[1][0], c.dds_ref(bias=c.bias), torch.float32, name="y")


# ---- the C++ binding's validation: a clear error, and the output left untouched ----

# W [3, 4]: row 0 -> cols {0, 2}, row 1 -> {1}, row 2 -> {0, 3}
_B, _IN, _OUT = 3, 4, 3
_W_DENSE = np.array([[1.0, 0.0, 2.0, 0.0], [0.0, 3.0, 0.0, 0.0], [4.0, 0.0, 0.0, 5.0]], np.float32)


def _i32(*v):
    return np.array(v, np.int32)


def _valid_binding_args():
    rng = np.random.default_rng(0)
    return {
        "x": rng.standard_normal((_B, _IN)).astype(np.float32),
        "dy": rng.standard_normal((_B, _OUT)).astype(np.float32),
        "values": np.array([1, 2, 3, 4, 5], np.float32),
        "crow": _i32(0, 2, 3, 5),
        "col": _i32(0, 2, 1, 0, 3),
        "t_crow": _i32(0, 2, 3, 4, 5),
        "t_row": _i32(0, 2, 1, 0, 2),
        "t_perm": _i32(0, 3, 2, 1, 4),
        "bias": rng.standard_normal(_OUT).astype(np.float32),
    }


def _nan(*shape, dtype=np.float32):
    return np.full(shape, np.nan, dtype)


def _call(op, a, out):
    if op == "dds":
        return _C.csr_dds(a["x"], a["values"], a["crow"], a["col"], a["bias"], out, 2)
    if op == "dsd":
        return _C.csr_dsd(a["dy"], a["values"], a["t_crow"], a["t_row"], a["t_perm"], out, 2)
    return _C.csr_sdd(a["dy"], a["x"], a["crow"], a["col"], out, 2)


_OUT_SHAPE = {"dds": (_B, _OUT), "dsd": (_B, _IN), "sdd": (5,)}


@needs_cpp
@pytest.mark.parametrize("op", ["dds", "dsd", "sdd"])
def test_csr_binding_refuses_an_output_it_would_have_to_convert(op):
    # a converted copy would take the writes and drop them: a list is refused, not copied
    out = np.full(_OUT_SHAPE[op], np.nan, np.float32).tolist()
    with pytest.raises(TypeError):
        _call(op, _valid_binding_args(), out)


@needs_cpp
def test_csr_binding_valid_hand_built_index_matches_dense():
    a = _valid_binding_args()
    y, dx, dv = _nan(_B, _OUT), _nan(_B, _IN), _nan(5)
    _call("dds", a, y)
    _call("dsd", a, dx)
    _call("sdd", a, dv)
    w = _W_DENSE.astype(np.float64)
    x, dy = a["x"].astype(np.float64), a["dy"].astype(np.float64)
    assert_close_rms(torch.from_numpy(y), torch.from_numpy(x @ w.T + a["bias"]), torch.float32, name="y")
    assert_close_rms(torch.from_numpy(dx), torch.from_numpy(dy @ w), torch.float32, name="dx")
    assert_close_rms(torch.from_numpy(dv), torch.from_numpy((dy.T @ x)[w != 0]), torch.float32, name="dvalues")


def _bad(op, name, exc, id, **changes):
    return pytest.param(op, name, exc, changes, id=f"{op}-{id}")


def _readonly(shape):
    a = _nan(*shape)
    a.flags.writeable = False
    return a


BAD_BINDING_ARGS = [
    _bad("dds", "col", ValueError, "col-negative", col=_i32(0, 2, -1, 0, 3)),
    _bad("dds", "col", ValueError, "col-past-in", col=_i32(0, 2, 1, 0, 4)),
    _bad("dds", "col", ValueError, "col-unsorted", col=_i32(2, 0, 1, 0, 3)),
    _bad("dds", "col", ValueError, "col-duplicate", col=_i32(2, 2, 1, 0, 3)),
    _bad("dds", "crow", ValueError, "crow-not-from-0", crow=_i32(1, 2, 3, 5)),
    _bad("dds", "crow", ValueError, "crow-decreasing", crow=_i32(0, 2, 1, 5)),
    _bad("dds", "crow", ValueError, "crow-end-not-nnz", crow=_i32(0, 2, 3, 4)),
    _bad("dds", "crow", ValueError, "crow-empty", crow=np.zeros(0, np.int32)),
    _bad("dds", "crow", TypeError, "crow-int64", crow=np.array([0, 2, 3, 5], np.int64)),
    _bad("dds", "col", TypeError, "col-int64", col=np.array([0, 2, 1, 0, 3], np.int64)),
    _bad("dds", "x", TypeError, "x-float64", x=np.zeros((_B, _IN), np.float64)),
    _bad("dds", "x", ValueError, "x-1d", x=np.zeros(_IN, np.float32)),
    _bad("dds", "values", TypeError, "values-float64", values=np.ones(5, np.float64)),
    _bad("dds", "values", ValueError, "values-wrong-length", values=np.ones(4, np.float32)),
    _bad("dds", "bias", ValueError, "bias-wrong-length", bias=np.ones(_OUT + 1, np.float32)),
    _bad("dds", "bias", TypeError, "bias-float64", bias=np.ones(_OUT, np.float64)),
    _bad("dds", "y", TypeError, "y-float64", out=_nan(_B, _OUT, dtype=np.float64)),
    _bad("dds", "y", ValueError, "y-wrong-shape", out=_nan(_B, _OUT + 1)),
    _bad("dds", "y", ValueError, "y-wrong-batch", out=_nan(_B + 1, _OUT)),
    _bad("dds", "y", ValueError, "y-not-c-contiguous", out=_nan(_OUT, _B).T),
    _bad("dds", "y", ValueError, "y-read-only", out=_readonly((_B, _OUT))),
    _bad("dsd", "t_row", ValueError, "t_row-past-out", t_row=_i32(0, 3, 1, 0, 2)),
    _bad("dsd", "t_row", ValueError, "t_row-unsorted", t_row=_i32(2, 0, 1, 0, 2)),
    _bad("dsd", "t_crow", ValueError, "t_crow-end-not-nnz", t_crow=_i32(0, 2, 3, 4, 4)),
    _bad("dsd", "t_perm", ValueError, "t_perm-past-nnz", t_perm=_i32(0, 3, 2, 1, 5)),
    _bad("dsd", "t_perm", ValueError, "t_perm-negative", t_perm=_i32(0, -1, 2, 1, 4)),
    _bad("dsd", "t_perm", ValueError, "t_perm-wrong-length", t_perm=_i32(0, 3, 2, 1)),
    _bad("dsd", "t_perm", TypeError, "t_perm-int64", t_perm=np.array([0, 3, 2, 1, 4], np.int64)),
    _bad("dsd", "dy", TypeError, "dy-float64", dy=np.zeros((_B, _OUT), np.float64)),
    _bad("dsd", "dx", ValueError, "dx-wrong-shape", out=_nan(_B, _IN + 1)),
    _bad("dsd", "dx", ValueError, "dx-not-c-contiguous", out=_nan(_IN, _B).T),
    _bad("dsd", "dx", ValueError, "dx-read-only", out=_readonly((_B, _IN))),
    _bad("sdd", "col", ValueError, "col-past-in", col=_i32(0, 2, 1, 0, 4)),
    _bad("sdd", "crow", ValueError, "crow-wrong-length", crow=_i32(0, 2, 5)),
    _bad("sdd", "crow", ValueError, "crow-decreasing", crow=_i32(0, 2, 1, 5)),
    _bad("sdd", "dy", ValueError, "dy-rows-differ-from-x", dy=np.zeros((_B + 1, _OUT), np.float32)),
    _bad("sdd", "x", TypeError, "x-float64", x=np.zeros((_B, _IN), np.float64)),
    _bad("sdd", "dvalues", ValueError, "dvalues-wrong-length", out=_nan(4)),
    _bad("sdd", "dvalues", ValueError, "dvalues-2d", out=_nan(5, 1)),
    _bad("sdd", "dvalues", ValueError, "dvalues-read-only", out=_readonly((5,))),
    _bad("sdd", "dvalues", TypeError, "dvalues-float64", out=_nan(5, dtype=np.float64)),
    pytest.param(
        "dds",
        "crow",
        ValueError,
        # row 1 claims entries 2..8 of a 5-entry col: the check must catch crow before walking col
        {"crow": _i32(0, 2, 9, 5)},
        id="dds-crow-entry-past-nnz",
    ),
]


@needs_cpp
@pytest.mark.parametrize("op,name,exc,changes", BAD_BINDING_ARGS)
def test_csr_binding_rejects_malformed_arguments(op, name, exc, changes):
    a = _valid_binding_args()
    out = changes.pop("out", None)
    a.update(changes)
    if out is None:
        out = _nan(*_OUT_SHAPE[op])
    with pytest.raises(exc, match=rf"^{name}:"):
        _call(op, a, out)
    base = out.base if out.base is not None else out
    assert np.isnan(base).all(), "the output was written although an error was raised"


# ---- the format ----


@pytest.mark.parametrize("kind", ["holed", "empty", 0.0, 0.9], ids=str)
def test_csr_weight_from_mask_describes_the_mask(kind):
    mask = _mask(11, 13, kind)
    w = torch.randn(11, 13) * mask
    f = CSRWeight.from_mask(mask)
    f.validate()
    assert (f.nnz, f.shape) == (int(mask.sum()), (11, 13))
    rows, cols = mask.nonzero(as_tuple=True)
    assert torch.equal(f.row.long(), rows) and torch.equal(f.col.long(), cols)
    assert torch.equal(f.crow.long(), torch.cat([torch.zeros(1, dtype=torch.long), mask.sum(1).cumsum(0)]))
    # the transposed orientation: columns in order, rows ascending within each
    t_cols, t_rows = mask.t().nonzero(as_tuple=True)
    assert torch.equal(f.t_row.long(), t_rows)
    assert torch.equal(f.t_crow.long(), torch.cat([torch.zeros(1, dtype=torch.long), mask.sum(0).cumsum(0)]))
    values = w[mask]
    assert torch.equal(values[f.t_perm.long()], w.t()[mask.t()])
    assert all(t.dtype == torch.int32 for t in f.tensors().values())
    assert torch.equal(f.to_mask(), mask)
    assert torch.equal(f.to_dense(values), w)
    g, v = CSRWeight.from_dense(w, mask)
    assert torch.equal(v, values) and torch.equal(g.to_mask(), mask)


def test_csr_weight_from_dense_defaults_to_nonzeros():
    w = torch.randn(6, 8) * (torch.rand(6, 8) > 0.5)
    f, v = CSRWeight.from_dense(w)
    assert torch.equal(f.to_mask(), w != 0)
    assert torch.equal(f.to_dense(v), w)


def test_csr_weight_from_crow_col_rebuilds_the_index():
    f = CSRWeight.from_mask(_holed_mask(9, 12))
    g = CSRWeight.from_crow_col(9, 12, f.crow, f.col)
    g.validate()
    for name, t in f.tensors().items():
        assert torch.equal(getattr(g, name), t), name


def _broken(f, **changes):
    return dataclasses.replace(f, **changes)


def _bad_format(name, exc, id, make):
    return pytest.param(name, exc, make, id=id)


BAD_FORMATS = [
    _bad_format("crow", TypeError, "crow-int64", lambda f: _broken(f, crow=f.crow.long())),
    _bad_format("col", TypeError, "col-float", lambda f: _broken(f, col=f.col.float())),
    _bad_format("t_perm", TypeError, "t_perm-list", lambda f: _broken(f, t_perm=f.t_perm.tolist())),
    _bad_format("crow", ValueError, "crow-2d", lambda f: _broken(f, crow=f.crow[None])),
    _bad_format("crow", ValueError, "crow-too-short", lambda f: _broken(f, crow=f.crow[:-1])),
    _bad_format("crow", ValueError, "crow-end-not-nnz", lambda f: _broken(f, crow=_edit(f.crow, -1, -1))),
    _bad_format("crow", ValueError, "crow-not-from-0", lambda f: _broken(f, crow=_edit(f.crow, 0, 1))),
    _bad_format("crow", ValueError, "crow-decreasing", lambda f: _broken(f, crow=_swap(f.crow, 1, 2))),
    _bad_format("col", ValueError, "col-past-in", lambda f: _broken(f, col=_edit(f.col, 0, 12))),
    _bad_format("col", ValueError, "col-negative", lambda f: _broken(f, col=_edit(f.col, 0, -1))),
    _bad_format("col", ValueError, "col-unsorted", lambda f: _broken(f, col=_swap(f.col, 0, 1))),
    _bad_format("row", ValueError, "row-wrong", lambda f: _broken(f, row=_edit(f.row, 0, 1))),
    _bad_format("row", ValueError, "row-wrong-length", lambda f: _broken(f, row=f.row[1:])),
    _bad_format("t_crow", ValueError, "t_crow-end-not-nnz", lambda f: _broken(f, t_crow=_edit(f.t_crow, -1, -1))),
    _bad_format("t_row", ValueError, "t_row-past-out", lambda f: _broken(f, t_row=_edit(f.t_row, 0, 9))),
    _bad_format("t_perm", ValueError, "t_perm-past-nnz", lambda f: _broken(f, t_perm=_edit(f.t_perm, 0, f.nnz))),
    _bad_format("t_perm", ValueError, "t_perm-wrong-permutation", lambda f: _broken(f, t_perm=_swap(f.t_perm, 0, 1))),
    _bad_format("shape", ValueError, "negative-features", lambda f: _broken(f, out_features=-1)),
]


def _edit(t, i, delta):
    t = t.clone()
    t[i] += delta
    return t


def _swap(t, i, j):
    t = t.clone()
    t[i], t[j] = t[j].clone(), t[i].clone()
    return t


def test_csr_weight_validate_accepts_valid_formats():
    for mask in (_holed_mask(9, 12), torch.zeros(9, 12, dtype=torch.bool), torch.ones(9, 12, dtype=torch.bool)):
        f = CSRWeight.from_mask(mask)
        f.validate()
        validate_csr(f.out_features, f.in_features, **f.tensors())


@pytest.mark.parametrize("name,exc,make", BAD_FORMATS)
def test_csr_weight_validate_rejects_malformed_index(name, exc, make):
    torch.manual_seed(1)
    mask = _holed_mask(9, 12)
    # a first row with two entries and a column 0 with two entries make every edit above meaningful
    mask[0, :2] = True
    mask[1, 0] = True
    f = CSRWeight.from_mask(mask)
    assert f.crow[1] != f.crow[2]
    bad = make(f)
    with pytest.raises(exc, match=rf"^{name}:"):
        bad.validate()


# ---- NaN and Inf: they propagate through every stored weight, as the same sums do in dense ----


@pytest.mark.parametrize("batch", [pytest.param(3, id="B3-gather"), pytest.param(37, id="B37-packed")])
def test_csr_ops_propagate_nan_and_inf(isa, batch):
    in_f, out_f = 40, 23
    mask = torch.rand(out_f, in_f) < 0.5
    mask[:, 7] = True  # every output reads input column 7
    mask[:, 11] = False  # no output reads input column 11
    w = torch.randn(out_f, in_f) * mask
    fmt, values = CSRWeight.from_dense(w, mask)
    x = torch.randn(batch, in_f)
    x[0, 7] = float("nan")
    x[1, 7] = float("inf")
    x[2, 11] = float("nan")  # meets no stored weight, so it reaches no output
    dy = torch.randn(batch, out_f)
    dy[1, 4] = float("inf")
    values[0] = float("nan")
    y = ops_csr.csr_dds(x, values, fmt.crow, fmt.col, None, out_f)
    dx = ops_csr.csr_dsd(dy, values, fmt.t_crow, fmt.t_row, fmt.t_perm, in_f)
    dv = ops_csr.csr_sdd(dy, x, fmt.crow, fmt.col, fmt.row)
    # the oracle: the same sums over the stored weights, in fp64, written out by hand
    wd = fmt.to_dense(values.double())
    stored = fmt.to_mask()
    y_ref = torch.stack([
        torch.stack([(wd[i][stored[i]] * x.double()[b][stored[i]]).sum() for i in range(out_f)]) for b in range(batch)
    ])
    dx_ref = torch.stack([
        torch.stack([(wd[:, j][stored[:, j]] * dy.double()[b][stored[:, j]]).sum() for j in range(in_f)])
        for b in range(batch)
    ])
    r, c = fmt.row.long(), fmt.col.long()
    dv_ref = (dy.double()[:, r] * x.double()[:, c]).sum(0)
    # a NaN input meeting stored weights, and a NaN stored weight, poison what they touch
    assert torch.isnan(y[0]).all() and torch.isnan(y[:, fmt.row[0].long()]).all()
    assert torch.isnan(dx[:, fmt.col[0].long()]).all()
    # the NaN in column 11 meets no stored weight
    others = torch.ones(out_f, dtype=torch.bool)
    others[fmt.row[0].long()] = False
    assert torch.isfinite(y[2, others]).all()
    assert_close_rms(y, y_ref, torch.float32, name="y")
    assert_close_rms(dx, dx_ref, torch.float32, name="dx")
    assert_close_rms(dv, dv_ref, torch.float32, name="dvalues")
