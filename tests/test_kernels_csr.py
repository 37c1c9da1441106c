"""The Triton CSR kernels against the fp64 reference (interpreter on CPU, or CUDA when present)."""

import pytest
import torch
from helpers import assert_close_rms, shape_param

from sparseops.formats.csr import CSRWeight
from sparseops.kernels import csr as K
from sparseops.reference import csr as R

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")


def _random_mask(out_f, in_f, sparsity):
    return torch.rand(out_f, in_f) >= sparsity


def _holed_mask():
    # row 2 and column 4 are empty, row 0 is full
    mask = _random_mask(7, 9, 0.5)
    mask[2, :] = False
    mask[:, 4] = False
    mask[0, :] = True
    mask[0, 4] = False
    return mask


def _case(mask, batch, dtype=torch.float32):
    """Index, inputs in ``dtype`` on DEVICE, and the same inputs upcast to fp64 for the reference."""
    fmt = CSRWeight.from_mask(mask).to(DEVICE)
    out_f, in_f = mask.shape
    # drawn in fp32 and rounded, so the reference sees exactly the kernel's inputs
    t = {
        "x": torch.randn(batch, in_f),
        "dy": torch.randn(batch, out_f),
        "values": torch.randn(fmt.nnz),
        "bias": torch.randn(out_f),
    }
    t = {k: v.to(DEVICE, dtype) for k, v in t.items()}
    ref = {k: v.double() for k, v in t.items()}
    return fmt, t, ref


def _dds(fmt, t, bias, **kw):
    return K.csr_dds(t["x"], t["values"], fmt.crow, fmt.col, t["bias"] if bias else None, fmt.out_features, **kw)


def _dds_ref(fmt, ref, bias):
    return R.csr_dds(ref["x"], ref["values"], fmt.crow, fmt.col, ref["bias"] if bias else None, fmt.out_features)


def _dsd(fmt, t, **kw):
    return K.csr_dsd(t["dy"], t["values"], fmt.t_crow, fmt.t_row, fmt.t_perm, fmt.in_features, **kw)


def _dsd_ref(fmt, ref):
    return R.csr_dsd(ref["dy"], ref["values"], fmt.t_crow, fmt.t_row, fmt.t_perm, fmt.in_features)


def _sdd(fmt, t, **kw):
    return K.csr_sdd(t["dy"], t["x"], fmt.row, fmt.col, **kw)


def _sdd_ref(fmt, ref):
    return R.csr_sdd(ref["dy"], ref["x"], fmt.row, fmt.col)




# 37 is past one 32-wide tile and two 16-wide chunks, so every tail mask is hit
SHAPES = [
    shape_param(1, 1, 1, 0.0),
    shape_param(1, 37, 3, 0.5),
    shape_param(1, 37, 37, 0.5),
    shape_param(3, 3, 37, 0.5),
    shape_param(3, 37, 37, 0.99),
    shape_param(37, 1, 3, 0.0),
    shape_param(37, 3, 37, 0.5),
    shape_param(37, 37, 1, 0.5),
    shape_param(37, 37, 37, 0.0),
    shape_param(37, 37, 37, 0.99),
    shape_param(37, 100, 64, 0.5),
    # the two sides of the decode kernel's limit (_MAX_ROWS_B rows of the dense operand)
    shape_param(K._MAX_ROWS_B, 37, 37, 0.5),
    shape_param(K._MAX_ROWS_B + 1, 37, 37, 0.5),
]


@pytest.mark.parametrize("bias", [True, False], ids=["bias", "nobias"])
@pytest.mark.parametrize("batch, in_f, out_f, sparsity", SHAPES)
def test_dds(batch, in_f, out_f, sparsity, bias):
    fmt, t, ref = _case(_random_mask(out_f, in_f, sparsity), batch)
    assert_close_rms(_dds(fmt, t, bias), _dds_ref(fmt, ref, bias), name="dds")


@pytest.mark.parametrize("batch, in_f, out_f, sparsity", SHAPES)
def test_dsd(batch, in_f, out_f, sparsity):
    fmt, t, ref = _case(_random_mask(out_f, in_f, sparsity), batch)
    assert_close_rms(_dsd(fmt, t), _dsd_ref(fmt, ref), name="dsd")


@pytest.mark.parametrize("batch, in_f, out_f, sparsity", SHAPES)
def test_sdd(batch, in_f, out_f, sparsity):
    fmt, t, ref = _case(_random_mask(out_f, in_f, sparsity), batch)
    assert_close_rms(_sdd(fmt, t), _sdd_ref(fmt, ref), name="sdd")


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
@pytest.mark.parametrize("batch, in_f, out_f, sparsity", [shape_param(3, 37, 3, 0.5), shape_param(37, 37, 37, 0.5)])
def test_half_dtypes(batch, in_f, out_f, sparsity, dtype):
    fmt, t, ref = _case(_random_mask(out_f, in_f, sparsity), batch, dtype)
    y, dx, dv = _dds(fmt, t, True), _dsd(fmt, t), _sdd(fmt, t)
    assert y.dtype == dx.dtype == dv.dtype == dtype
    assert_close_rms(y, _dds_ref(fmt, ref, True), name="dds")
    assert_close_rms(dx, _dsd_ref(fmt, ref), name="dsd")
    assert_close_rms(dv, _sdd_ref(fmt, ref), name="sdd")


@pytest.mark.parametrize(
    "mask",
    [
        pytest.param(_holed_mask, id="empty-row-and-col"),
        pytest.param(lambda: torch.zeros(5, 4, dtype=torch.bool), id="nnz0"),
        pytest.param(lambda: torch.zeros(0, 4, dtype=torch.bool), id="out0"),
        pytest.param(lambda: torch.zeros(5, 0, dtype=torch.bool), id="in0"),
    ],
)
@pytest.mark.parametrize("batch", [1, 37], ids=["B1", "B37"])
def test_degenerate_masks(mask, batch):
    fmt, t, ref = _case(mask(), batch)
    assert_close_rms(_dds(fmt, t, True), _dds_ref(fmt, ref, True), name="dds")
    assert_close_rms(_dds(fmt, t, False), _dds_ref(fmt, ref, False), name="dds-nobias")
    assert_close_rms(_dsd(fmt, t), _dsd_ref(fmt, ref), name="dsd")
    assert_close_rms(_sdd(fmt, t), _sdd_ref(fmt, ref), name="sdd")


def test_empty_batch():
    fmt, t, ref = _case(_random_mask(5, 4, 0.5), 0)
    assert _dds(fmt, t, True).shape == (0, 5)
    assert _dsd(fmt, t).shape == (0, 4)
    # no batch rows: the weight gradient is exactly zero
    assert torch.equal(_sdd(fmt, t), torch.zeros(fmt.nnz, device=DEVICE))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_out_buffer_fully_written(dtype):
    fmt, t, ref = _case(_holed_mask(), 37, dtype)
    nan = float("nan")
    y = torch.full((37, fmt.out_features), nan, dtype=dtype, device=DEVICE)
    dx = torch.full((37, fmt.in_features), nan, dtype=dtype, device=DEVICE)
    dv = torch.full((fmt.nnz,), nan, dtype=dtype, device=DEVICE)
    assert _dds(fmt, t, True, out=y) is y
    assert _dsd(fmt, t, out=dx) is dx
    assert _sdd(fmt, t, out=dv) is dv
    assert_close_rms(y, _dds_ref(fmt, ref, True), name="dds")
    assert_close_rms(dx, _dsd_ref(fmt, ref), name="dsd")
    assert_close_rms(dv, _sdd_ref(fmt, ref), name="sdd")
    # a transposed view: the kernel writes through the buffer's own strides
    yt = torch.full((fmt.out_features, 37), nan, dtype=dtype, device=DEVICE).t()
    _dds(fmt, t, False, out=yt)
    assert_close_rms(yt, _dds_ref(fmt, ref, False), name="dds-strided-out")


def test_noncontiguous_inputs():
    fmt, t, ref = _case(_random_mask(6, 5, 0.5), 7)
    # same values, transposed storage
    t = {k: (v.t().contiguous().t() if v.dim() == 2 else v) for k, v in t.items()}
    assert not t["x"].is_contiguous()
    assert_close_rms(_dds(fmt, t, True), _dds_ref(fmt, ref, True), name="dds")
    assert_close_rms(_dsd(fmt, t), _dsd_ref(fmt, ref), name="dsd")
    assert_close_rms(_sdd(fmt, t), _sdd_ref(fmt, ref), name="sdd")


def _bad_inputs():
    fmt, t, _ = _case(_random_mask(5, 4, 0.5), 3)
    x, dy, v, b = t["x"], t["dy"], t["values"], t["bias"]
    crow, col, row = fmt.crow, fmt.col, fmt.row
    half_out, small_out = torch.empty(3, 5, device=DEVICE).half(), torch.empty(3, 4, device=DEVICE)
    return [
        ("col-int64", TypeError, "col", lambda: K.csr_dds(x, v, crow, col.long(), None, 5)),
        ("crow-int64", TypeError, "crow", lambda: K.csr_dds(x, v, crow.long(), col, None, 5)),
        ("t_perm-int64", TypeError, "t_perm", lambda: K.csr_dsd(dy, v, fmt.t_crow, fmt.t_row, fmt.t_perm.long(), 4)),
        ("x-int", TypeError, "x", lambda: K.csr_dds(x.int(), v, crow, col, None, 5)),
        ("x-fp64", TypeError, "x", lambda: K.csr_dds(x.double(), v.double(), crow, col, None, 5)),
        ("values-dtype", TypeError, "values", lambda: K.csr_dds(x, v.half(), crow, col, None, 5)),
        ("bias-dtype", TypeError, "bias", lambda: K.csr_dds(x, v, crow, col, b.half(), 5)),
        ("out-dtype", TypeError, "out", lambda: K.csr_dds(x, v, crow, col, None, 5, out=half_out)),
        ("x-1d", ValueError, "x", lambda: K.csr_dds(x[0], v, crow, col, None, 5)),
        ("crow-length", ValueError, "crow", lambda: K.csr_dds(x, v, crow, col, None, 6)),
        ("values-length", ValueError, "col", lambda: K.csr_dds(x, v[:-1], crow, col, None, 5)),
        ("bias-length", ValueError, "bias", lambda: K.csr_dds(x, v, crow, col, b[:-1], 5)),
        ("out-shape", ValueError, "out", lambda: K.csr_dds(x, v, crow, col, None, 5, out=small_out)),
        ("t_crow-length", ValueError, "t_crow", lambda: K.csr_dsd(dy, v, fmt.t_crow, fmt.t_row, fmt.t_perm, 5)),
        ("sdd-batch", ValueError, "dy", lambda: K.csr_sdd(dy[:2], x, row, col)),
        ("sdd-row-length", ValueError, "row", lambda: K.csr_sdd(dy, x, row[:-1], col)),
        ("sdd-dtype", TypeError, "dy", lambda: K.csr_sdd(dy.half(), x, row, col)),
    ]


def test_bad_inputs_raise():
    for case_id, exc, arg, call in _bad_inputs():
        with pytest.raises(exc, match=rf"^{arg}:"):
            call()


def test_every_public_launcher_runs_on_its_tensors_device():
    """A Triton launch uses the current CUDA device, not its arguments': each launcher the ops call is wrapped
    so that a layer on cuda:1 launches there while cuda:0 is current (kernels.csr._on_device)."""
    import importlib

    launchers = {"act": ["act_dds"], "bsr": ["bsr_dds", "bsr_dsd", "bsr_sdd"], "csr": ["csr_dds", "csr_dsd", "csr_sdd"],
                 "fewbit": ["fewbit_pack", "fewbit_unpack"], "nm": ["nm_dds", "nm_sdd"]}
    for mod, names in launchers.items():
        m = importlib.import_module(f"sparseops.kernels.{mod}")
        public = {n for n in dir(m) if not n.startswith("_") and callable(getattr(m, n))
                  and getattr(getattr(m, n), "__module__", None) == m.__name__}
        assert public == set(names), f"kernels.{mod}: launchers {sorted(public)}, expected {names}"
        for n in names:
            assert getattr(getattr(m, n), "device_guarded", False), f"kernels.{mod}.{n} has no device guard"
