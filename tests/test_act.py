"""Activation-sparse linear layers on CPU: the ops (sparseops::act_dds / act_dsd / act_sdd) against the fp64
reference, the union GEMV (``_C.act_gemv``, up to 32 rows) and the row-sparse ``_C.act_spmm``, the C++ binding's
validation, ActivationSparseLinear (modes relu / tensor / channel / topk) against fp64 autograd, calibration,
checkpoints, torch.compile and a short training run.

fp32 goes through the C++ kernels (both ISA paths); bf16/fp16 too (the decode kernel reads a 16-bit weight as it is,
the rest runs on fp32 copies); fp64 through the reference. The ops are compared with
``sparseops.reference.act`` in fp64 (the oracle); the layers with torch autograd on ``act_mask(x) @ Wᵀ + b`` in fp64,
and top-k is sparsified here by sorting, independently of the layer.
"""

import copy
import io
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from helpers import assert_close_rms, guard_dtype_route
from torch import nn

import sparseops
import sparseops.ops.act as ops_act
import sparseops.reference.act as R
from sparseops import ActivationSparseLinear, SparseLinear, calibrate_, sparsify_activations_
from sparseops._cpp import _C

OPS = torch.ops.sparseops

needs_cpp = pytest.mark.skipif(_C is None, reason="sparseops._C is not built")


# ---- cases: inputs, a threshold aimed at a target sparsity, and the fp64 oracle ----


def _threshold(sp, relu, scale):
    """A threshold at which about ``sp`` of the inputs ``N(0, scale²)`` are inactive; negative for ``sp == 0``.

    ``|x|`` is half-normal: ``P(|x| <= t) = erf(t / (scale √2))``; with relu, the negative half is inactive anyway.
    """
    if sp == 0:
        return -(0.25 + torch.rand(scale.shape))  # every input active, whatever its value
    q = max(0.0, 2 * sp - 1) if relu else sp
    return scale * math.sqrt(2) * torch.special.erfinv(torch.tensor(q)).item()


class Case:
    """``x [B, in]`` (row 1 all zero when B >= 3), ``weight_t [in, out]``, bias, ``dy [B, out]`` and a threshold:
    0-d (``chan=False``) or ``[in]`` over inputs with per-channel scales (``chan=True``)."""

    def __init__(self, batch, in_f, out_f, chan, relu, sp, dtype=torch.float32, zero_row=True):
        self.batch, self.in_f, self.out_f, self.relu = batch, in_f, out_f, relu
        scale = torch.rand(in_f) * 1.5 + 0.25 if chan else torch.ones(())
        self.x = torch.randn(batch, in_f) * scale
        if zero_row and batch >= 3:
            self.x[1] = 0
        self.thr = _threshold(sp, relu, scale).float()
        self.w = torch.randn(in_f, out_f)
        self.bias = torch.randn(out_f)
        self.dy = torch.randn(batch, out_f)
        if dtype != torch.float32:
            # values (and thresholds) exactly representable in dtype: the reference sees the same numbers
            for name in ("x", "w", "bias", "dy"):
                setattr(self, name, getattr(self, name).to(dtype))
            self.thr = self.thr.to(dtype).float()

    def mask(self, x=None):
        x = self.x if x is None else x
        return R.act_mask(x.double(), self.thr.double(), self.relu)[1]

    def dds_ref(self, bias=None, x=None):
        x = self.x if x is None else x
        b = None if bias is None else bias.double()
        return R.act_dds(x.double(), self.w.double(), b, self.thr.double(), self.relu)

    def dsd_ref(self, dy=None, x=None):
        dy = self.dy if dy is None else dy
        x = self.x if x is None else x
        return R.act_dsd(dy.double(), x.double(), self.w.double(), self.thr.double(), self.relu)

    def sdd_ref(self, dy=None, x=None):
        dy = self.dy if dy is None else dy
        x = self.x if x is None else x
        return R.act_sdd(dy.double(), x.double(), self.thr.double(), self.relu)


def _case(batch, in_f, out_f, chan, relu, sp):
    tag = f"B{batch}-in{in_f}-out{out_f}-{'chan' if chan else 'tensor'}{'-relu' if relu else ''}-sp{sp}"
    return pytest.param(batch, in_f, out_f, chan, relu, sp, id=tag)


# B on both sides of the 32-row switch (GEMV up to 32, spmm above); in > 256 spans several 256-row panels; out not a
# multiple of 8 runs the scalar tails, out >= 64 whole 64-column SIMD strips; sparsity 0 is a negative threshold
SHAPES = [
    _case(1, 1000, 100, False, False, 0.5),
    _case(1, 37, 1, True, True, 0.5),
    _case(1, 1, 37, False, False, 0.0),
    _case(3, 37, 3, False, False, 0.0),
    _case(3, 100, 1000, True, False, 0.99),
    _case(32, 1000, 37, True, True, 0.5),
    _case(32, 100, 100, False, False, 0.99),
    _case(33, 1000, 100, False, False, 0.5),
    _case(33, 3, 37, True, False, 0.0),
    _case(37, 1000, 3, True, True, 0.99),
    _case(37, 100, 1000, False, True, 0.5),
    _case(37, 37, 1, True, False, 0.5),
    _case(37, 1, 100, True, False, 0.99),
]
PARAMS = "batch,in_f,out_f,chan,relu,sp"


def test_cases_have_the_advertised_sparsity():
    # the thresholds hit their targets (a large batch, so the fraction is close to the expectation)
    for chan in (False, True):
        for relu in (False, True):
            for sp in (0.5, 0.9, 0.99):
                c = Case(4000, 50, 1, chan, relu, sp, zero_row=False)
                assert abs((1 - c.mask().double().mean().item()) - sp) < 0.02, (chan, relu, sp)
    c = Case(5, 37, 3, False, False, 0.0)
    assert c.mask().all() and (c.x[1] == 0).all() and c.thr.dim() == 0 and c.thr < 0
    assert Case(5, 37, 3, True, False, 0.5).thr.shape == (37,)


class _Recorder:
    """Forwards to the real ``_C`` and records which kernels were called."""

    def __init__(self, real):
        self.real, self.calls = real, []

    def __getattr__(self, name):
        fn = getattr(self.real, name)

        def call(*args, **kwargs):
            self.calls.append(name)
            return fn(*args, **kwargs)

        return call


# ---- the ops against the fp64 reference, fp32 on both C++ paths ----


@pytest.mark.parametrize(PARAMS, SHAPES)
@pytest.mark.parametrize("bias", [True, False], ids=["bias", "nobias"])
def test_act_dds_matches_reference(isa, monkeypatch, batch, in_f, out_f, chan, relu, sp, bias):
    c = Case(batch, in_f, out_f, chan, relu, sp)
    rec = _Recorder(_C)
    monkeypatch.setattr(ops_act, "_C", rec)
    bb = c.bias if bias else None
    y = ops_act.dds(c.x, c.w, bb, c.thr, relu)
    assert rec.calls == ["act_gemv" if batch <= 32 else "act_spmm"], rec.calls
    assert ops_act.GEMV_MAX_ROWS == 32
    assert y.shape == (batch, out_f) and y.dtype == torch.float32
    assert_close_rms(y, c.dds_ref(bb), torch.float32, name="y")
    if batch >= 3:
        # the all-zero row adds nothing: exactly the bias
        assert torch.equal(y[1], c.bias if bias else torch.zeros(out_f)), "zero row: y must be exactly the bias"
    # the dispatcher's op gives the same numbers
    assert_close_rms(OPS.act_dds(c.x, c.w, bb, c.thr, relu), c.dds_ref(bb), torch.float32, name="y (op)")


@pytest.mark.parametrize(PARAMS, SHAPES)
def test_act_dsd_matches_reference(isa, batch, in_f, out_f, chan, relu, sp):
    c = Case(batch, in_f, out_f, chan, relu, sp)
    dx = ops_act.dsd(c.dy, c.x, c.w, c.thr, relu)
    assert dx.shape == (batch, in_f) and dx.dtype == torch.float32
    assert (dx[~c.mask()] == 0).all(), "inactive inputs must get exactly 0"
    assert_close_rms(dx, c.dsd_ref(), torch.float32, name="dx")
    assert_close_rms(OPS.act_dsd(c.dy, c.x, c.w, c.thr, relu), c.dsd_ref(), torch.float32, name="dx (op)")


@pytest.mark.parametrize(PARAMS, SHAPES)
def test_act_sdd_matches_reference(isa, batch, in_f, out_f, chan, relu, sp):
    c = Case(batch, in_f, out_f, chan, relu, sp)
    dw = ops_act.sdd(c.dy, c.x, c.thr, relu)
    assert dw.shape == (in_f, out_f) and dw.dtype == torch.float32
    assert_close_rms(dw, c.sdd_ref(), torch.float32, name="dweight_t")
    dead = ~c.mask().any(0)
    assert (dw[dead] == 0).all(), "rows of inputs that no row activates must be exactly 0"
    assert_close_rms(OPS.act_sdd(c.dy, c.x, c.thr, relu), c.sdd_ref(), torch.float32, name="dweight_t (op)")


@pytest.mark.parametrize("batch", [3, 37], ids=["B3-gemv", "B37-spmm"])
@pytest.mark.parametrize("how", ["huge-threshold", "zero-input"])
def test_act_ops_all_inactive(isa, batch, how):
    """No input active: y is exactly the bias (or 0), dx and dweight_t exactly 0."""
    c = Case(batch, 300, 77, False, False, 0.5)
    if how == "huge-threshold":
        c.thr = torch.tensor(1e30)
    else:
        c.x.zero_()
        c.thr = torch.tensor(0.0)
    assert not c.mask().any()
    assert torch.equal(ops_act.dds(c.x, c.w, c.bias, c.thr, False), c.bias.expand(batch, 77))
    assert torch.equal(ops_act.dds(c.x, c.w, None, c.thr, False), torch.zeros(batch, 77))
    assert torch.equal(ops_act.dsd(c.dy, c.x, c.w, c.thr, False), torch.zeros(batch, 300))
    assert torch.equal(ops_act.sdd(c.dy, c.x, c.thr, False), torch.zeros(300, 77))


def test_act_ops_threshold_is_strict(isa):
    """Active means ``|v| > threshold``: an input exactly at the threshold is skipped."""
    x = torch.tensor([[0.5, -0.5, 0.75, -1.0, 0.25]])
    w = torch.randn(5, 9)
    y = ops_act.dds(x, w, None, torch.tensor(0.5), False)
    assert_close_rms(y, x[:, 2:4].double() @ w[2:4].double(), torch.float32, name="y")
    y = ops_act.dds(x, w, None, torch.tensor(0.5), True)
    assert_close_rms(y, x[:, 2:3].double() @ w[2:3].double(), torch.float32, name="y (relu)")


# ---- strided inputs: x and dy as transposed views and NaN-padded column slices ----


def _transposed_view(t):
    v = t.t().contiguous().t()
    assert not v.is_contiguous() or min(t.shape) <= 1
    return v


def _nan_padded_slice(t, pad=19):
    wide = torch.full((t.shape[0], t.shape[1] + pad), float("nan"), dtype=t.dtype)
    wide[:, : t.shape[1]] = t
    return wide[:, : t.shape[1]]


LAYOUTS = {"transposed": _transposed_view, "nan-padded-slice": _nan_padded_slice}
STRIDED = [_case(3, 300, 77, True, False, 0.5), _case(37, 300, 77, False, True, 0.5),
           _case(32, 37, 3, False, False, 0.9)]


@pytest.mark.parametrize("layout", list(LAYOUTS))
@pytest.mark.parametrize(PARAMS, STRIDED)
def test_act_ops_strided_inputs(isa, layout, batch, in_f, out_f, chan, relu, sp):
    c = Case(batch, in_f, out_f, chan, relu, sp)
    x, dy = LAYOUTS[layout](c.x), LAYOUTS[layout](c.dy)
    assert_close_rms(ops_act.dds(x, c.w, c.bias, c.thr, relu), c.dds_ref(c.bias), torch.float32, name="y")
    assert_close_rms(ops_act.dsd(dy, x, c.w, c.thr, relu), c.dsd_ref(), torch.float32, name="dx")
    assert_close_rms(ops_act.sdd(dy, x, c.thr, relu), c.sdd_ref(), torch.float32, name="dweight_t")
    # weight_t, bias and threshold given non-contiguous: copied, same numbers
    w = _transposed_view(c.w)
    bias = torch.stack([c.bias, c.bias], 1)[:, 0]
    thr = torch.stack([c.thr, c.thr], -1)[..., 0] if c.thr.dim() else c.thr
    assert_close_rms(ops_act.dds(c.x, w, bias, thr, relu), c.dds_ref(c.bias), torch.float32, name="y (strided w)")
    assert_close_rms(ops_act.dsd(c.dy, c.x, w, thr, relu), c.dsd_ref(), torch.float32, name="dx (strided w)")


@pytest.mark.parametrize("batch", [3, 37], ids=["B3-gemv", "B37-spmm"])
def test_act_ops_broadcast_rows(isa, batch):
    """Rows with stride 0 (``t[:1].expand(B, n)``, what autograd hands back for ``y.sum(0)``) are valid inputs."""
    c = Case(batch, 100, 37, False, False, 0.5)
    x, dy = c.x[:1].expand(batch, 100), c.dy[:1].expand(batch, 37)
    xc, dyc = x.contiguous(), dy.contiguous()
    assert_close_rms(ops_act.dds(x, c.w, c.bias, c.thr, False), c.dds_ref(c.bias, x=xc), torch.float32, name="y")
    assert_close_rms(ops_act.dsd(dy, c.x, c.w, c.thr, False), c.dsd_ref(dy=dyc), torch.float32, name="dx")
    assert_close_rms(ops_act.sdd(dy, c.x, c.thr, False), c.sdd_ref(dy=dyc), torch.float32, name="dweight_t")


@pytest.mark.parametrize("op", ["dds", "dsd", "sdd"])
def test_act_ops_batch_zero(isa, op):
    c = Case(0, 37, 21, False, False, 0.5)
    if op == "dds":
        assert ops_act.dds(c.x, c.w, c.bias, c.thr, False).shape == (0, 21)
    elif op == "dsd":
        assert ops_act.dsd(c.dy, c.x, c.w, c.thr, False).shape == (0, 37)
    else:
        # an empty batch sums nothing: exactly zero, not left unwritten
        dw = ops_act.sdd(c.dy, c.x, c.thr, False)
        assert dw.shape == (37, 21) and (dw == 0).all()


# ---- sparsity 0 (a negative threshold): every input is active, exact zeros included ----


@pytest.mark.parametrize("chan", [False, True], ids=["tensor", "chan"])
@pytest.mark.parametrize("batch", [3, 37], ids=["B3", "B37"])
def test_act_dsd_negative_threshold_keeps_exact_zeros_active(isa, batch, chan):
    """With ``threshold < 0`` and no relu, ``s(x) = x`` everywhere, so ``dx = dy @ weight_tᵀ`` at every entry —
    also where ``x`` is exactly 0 (the reference's mask ``|x| > threshold`` is all true there)."""
    c = Case(batch, 40, 24, chan, False, 0.0)
    c.x[:, 5] = 0.0
    c.x[0, :7] = 0.0
    assert c.mask().all()
    dx = ops_act.dsd(c.dy, c.x, c.w, c.thr, False)
    assert_close_rms(dx, c.dy.double() @ c.w.double().T, torch.float32, name="dx (s(x) = x)")
    assert_close_rms(dx, c.dsd_ref(), torch.float32, name="dx vs reference")


@pytest.mark.parametrize("relu,thr", [(False, -1.0), (False, 0.4), (True, 0.4), (True, 0.0), (True, -1.0)],
                         ids=["thr-neg", "thr0.4", "relu-thr0.4", "relu-thr0", "relu-thr-neg"])
def test_reference_act_dsd_is_the_derivative_of_act_mask(relu, thr):
    """The oracle's input gradient is the true derivative of ``act_mask(x)[0] @ weight_t`` (torch autograd, fp64);
    exact zeros and negative inputs included."""
    x = torch.randn(6, 30, dtype=torch.float64)
    x[:, 3] = 0
    w = torch.randn(30, 11, dtype=torch.float64)
    dy = torch.randn(6, 11, dtype=torch.float64)
    t = torch.tensor(thr)
    xr = x.clone().requires_grad_()
    (R.act_mask(xr, t, relu)[0] @ w).backward(dy)
    assert_close_rms(R.act_dsd(dy, x, w, t, relu), xr.grad, name="reference dx vs autograd")


# ---- the C++ entry points called directly: NaN-filled outputs are fully written ----


def _np(t):
    return t.detach().contiguous().numpy()


def _nan(*shape, dtype=np.float32):
    return np.full(shape, np.nan, dtype)


def _thr_np(c):
    return _np(c.thr.reshape(-1))


# (batch, in, out, chan, relu, sp, nthreads): the last ones take the strip split of spmm (K > 256, >= 8 strips)
DIRECT = [
    pytest.param(1, 1000, 100, False, False, 0.5, 2, id="B1-in1000-out100-t2"),
    pytest.param(5, 37, 3, True, True, 0.5, 1, id="B5-in37-out3-chan-relu-t1"),
    pytest.param(32, 300, 77, False, False, 0.9, 2, id="B32-in300-out77-t2"),
    pytest.param(37, 1000, 37, True, False, 0.5, 2, id="B37-in1000-out37-chan-t2"),
    pytest.param(40, 300, 517, False, True, 0.5, 2, id="B40-in300-out517-relu-t2-strips"),
    pytest.param(300, 40, 517, False, False, 0.5, 2, id="B300-in40-out517-t2-strips"),
    # 33 strips, the last 48 columns wide: two groups of up to 8 strips per thread, a narrow strip in a group
    pytest.param(40, 300, 2100, True, True, 0.9, 2, id="B40-in300-out2100-chan-relu-t2-groups"),
    # dweight_t [4100, 1030] is over 16 MB: sdd writes it with streaming stores (rows alternate between
    # 64-byte aligned, streamed, and not, stored plainly)
    pytest.param(8, 4100, 1030, False, True, 0.9, 2, id="B8-in4100-out1030-relu-t2-streamed"),
]


@needs_cpp
@pytest.mark.parametrize("batch,in_f,out_f,chan,relu,sp,nt", DIRECT)
def test_act_binding_writes_every_output_element(isa, batch, in_f, out_f, chan, relu, sp, nt):
    c = Case(batch, in_f, out_f, chan, relu, sp)
    x, w, b, dy, thr = _np(c.x), _np(c.w), _np(c.bias), _np(c.dy), _thr_np(c)
    nnz = int(c.mask().sum())
    union = int(c.mask().any(0).sum())
    for kernel, expect in (("act_gemv", union), ("act_spmm", nnz)):
        if kernel == "act_gemv" and batch > 64:
            continue
        for bias in (b, None):
            y = _nan(batch, out_f)
            got = getattr(_C, kernel)(x, thr, relu, w, bias, y, nt)
            assert got == expect, f"{kernel} returned {got}, expected {expect}"
            bb = None if bias is None else c.bias
            assert_close_rms(torch.from_numpy(y), c.dds_ref(bb), torch.float32, name=f"{kernel} y")
    dx = _nan(batch, in_f)
    _C.act_dsd(dy, x, thr, relu, w, dx, nt)
    assert_close_rms(torch.from_numpy(dx), c.dsd_ref(), torch.float32, name="act_dsd dx")
    dw = _nan(in_f, out_f)
    _C.act_sdd(dy, x, thr, relu, dw, nt)
    assert_close_rms(torch.from_numpy(dw), c.sdd_ref(), torch.float32, name="act_sdd dweight_t")
    dx, dw = _nan(batch, in_f), _nan(in_f, out_f)
    _C.act_backward(dy, x, thr, relu, w, dx, dw, nt)
    assert_close_rms(torch.from_numpy(dx), c.dsd_ref(), torch.float32, name="act_backward dx")
    assert_close_rms(torch.from_numpy(dw), c.sdd_ref(), torch.float32, name="act_backward dweight_t")


@needs_cpp
def test_conftest_poisoning_reaches_act_op_outputs(monkeypatch):
    """With a kernel that writes nothing, every op's output is all NaN, so a missed write cannot pass."""

    class _WritesNothing:
        def __getattr__(self, name):
            return lambda *args: 0

    monkeypatch.setattr(ops_act, "_C", _WritesNothing())
    c = Case(4, 16, 16, False, False, 0.5)
    assert torch.isnan(ops_act.dds(c.x, c.w, c.bias, c.thr, False)).all()
    assert torch.isnan(ops_act.dsd(c.dy, c.x, c.w, c.thr, False)).all()
    assert torch.isnan(ops_act.sdd(c.dy, c.x, c.thr, False)).all()


@needs_cpp
def test_act_ops_same_result_for_any_thread_count(isa):
    c = Case(37, 300, 150, True, False, 0.5)
    small = Case(5, 300, 150, False, True, 0.5)
    prev = torch.get_num_threads()
    results = {}
    try:
        for t in (1, 2):
            torch.set_num_threads(t)
            results[t] = (ops_act.dds(c.x, c.w, c.bias, c.thr, False), ops_act.dsd(c.dy, c.x, c.w, c.thr, False),
                          ops_act.sdd(c.dy, c.x, c.thr, False), ops_act.dds(small.x, small.w, None, small.thr, True))
    finally:
        torch.set_num_threads(prev)
    for name, one, two in zip(("y", "dx", "dweight_t", "y (gemv)"), results[1], results[2]):
        assert_close_rms(two, one.double(), tol=1e-6, name=f"{name} with 2 threads vs 1")


# ---- the union GEMV: one read of each weight row any row activates ----


def _union_case(T, chan):
    """x [T, 300] where inputs 0..59 are small but nonzero (never active), 60..69 sit exactly at the threshold
    (never active: the test is strict), input 70 is active in the last row only, the rest at random."""
    in_f, out_f = 300, 77
    c = Case(T, in_f, out_f, chan, False, 0.6, zero_row=False)
    thr = c.thr.expand(in_f) if c.thr.dim() == 0 else c.thr
    sign = torch.where(torch.rand(T, 60) < 0.5, -1.0, 1.0)
    c.x[:, :60] = sign * thr[:60] * 0.5
    c.x[:, 60:70] = -thr[60:70]
    c.x[:, 70] = 0
    c.x[-1, 70] = thr[70] * 3 + 1
    return c


@needs_cpp
@pytest.mark.parametrize("chan", [False, True], ids=["tensor", "chan"])
@pytest.mark.parametrize("T", [1, 2, 8, 32], ids=lambda t: f"T{t}")
def test_act_gemv_returns_the_union_and_the_dense_product(isa, T, chan):
    c = _union_case(T, chan)
    mask = c.mask()
    union = mask.any(0)
    assert not union[:70].any() and union[70]
    y = _nan(T, 77)
    got = _C.act_gemv(_np(c.x), _thr_np(c), False, _np(c.w), _np(c.bias), y, 1)
    assert got == int(union.sum()), f"union size {got}, expected {int(union.sum())} (inputs active in any row)"
    # the dense linear layer on the sparsified input, computed here
    xs = torch.where(mask, c.x.double(), torch.zeros((), dtype=torch.float64))
    expected = F.linear(xs, c.w.double().T, c.bias.double())
    assert_close_rms(torch.from_numpy(y), expected, torch.float32, name="y")
    assert R.union_density(c.x, c.thr, False) == pytest.approx(union.double().mean().item())


@needs_cpp
@pytest.mark.parametrize("chan", [False, True], ids=["tensor", "chan"])
@pytest.mark.parametrize("T", [1, 2, 8, 32, 37], ids=lambda t: f"T{t}")
def test_act_kernels_never_read_weight_rows_outside_the_union(isa, T, chan):
    """NaN in every row of weight_t whose input no row activates: each output stays finite and correct."""
    c = _union_case(T, chan)
    mask = c.mask()
    union = mask.any(0)
    clean = c.w.clone()
    clean[~union] = 0
    c.w[~union] = float("nan")
    xs = torch.where(mask, c.x.double(), torch.zeros((), dtype=torch.float64))
    expected = F.linear(xs, clean.double().T, c.bias.double())
    kernels = ("act_gemv", "act_spmm") if T <= 32 else ("act_spmm",)
    for kernel in kernels:
        for nt in (1, 2):
            y = _nan(T, 77)
            getattr(_C, kernel)(_np(c.x), _thr_np(c), False, _np(c.w), _np(c.bias), y, nt)
            assert np.isfinite(y).all(), f"{kernel} read a weight row outside the union"
            assert_close_rms(torch.from_numpy(y), expected, torch.float32, name=f"{kernel} y")
    # through the op (gemv up to 32 rows, spmm above) and the input gradient, which reads active rows only
    assert_close_rms(ops_act.dds(c.x, c.w, c.bias, c.thr, False), expected, torch.float32, name="op y")
    dx = ops_act.dsd(c.dy, c.x, c.w, c.thr, False)
    expected_dx = (c.dy.double() @ clean.double().T) * mask
    assert_close_rms(dx, expected_dx, torch.float32, name="dx")


# ---- other dtypes: fp64 takes the reference, bf16/fp16 the C++ kernels ----


@pytest.mark.parametrize("dtype", [torch.float64, torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize(PARAMS, [_case(3, 100, 37, True, False, 0.5), _case(37, 300, 77, False, True, 0.5),
                                  _case(1, 37, 3, False, False, 0.9), _case(32, 1000, 1000, True, True, 0.5),
                                  _case(1, 1, 1, False, False, 0.0), _case(5, 37, 0, False, False, 0.5)])
def test_act_ops_other_dtypes_match_reference(isa, monkeypatch, batch, in_f, out_f, chan, relu, sp, dtype):
    calls = guard_dtype_route(monkeypatch, ops_act, ("act_dds", "act_dsd", "act_sdd"), dtype)
    c = Case(batch, in_f, out_f, chan, relu, sp, dtype=dtype)
    y = ops_act.dds(c.x, c.w, c.bias, c.thr.to(dtype), relu)
    assert y.dtype == dtype and y.shape == (batch, out_f)
    assert_close_rms(y, c.dds_ref(c.bias), dtype, name="y")
    y = ops_act.dds(c.x, c.w, None, c.thr.to(dtype), relu)
    assert_close_rms(y, c.dds_ref(), dtype, name="y (no bias)")
    dx = ops_act.dsd(c.dy, c.x, c.w, c.thr, relu)
    assert dx.dtype == dtype
    assert_close_rms(dx, c.dsd_ref(), dtype, name="dx")
    dw = ops_act.sdd(c.dy, c.x, c.thr, relu)
    assert dw.dtype == dtype
    assert_close_rms(dw, c.sdd_ref(), dtype, name="dweight_t")
    if dtype != torch.float64:
        # decode reads the 16-bit weight as it is; above 32 rows the fp32 kernels run on fp32 copies
        assert calls[0] == ("act_gemv16" if batch <= ops_act.GEMV_MAX_ROWS else "act_spmm")
        assert {"act_dsd", "act_sdd"} <= set(calls)


@needs_cpp
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
def test_act_gemv16_writes_every_output_and_reads_only_the_union(isa, dtype):
    # 16-bit weight rows outside the union hold nan: reading one would poison the output
    T, K, N = 3, 300, 77
    x = torch.randn(T, K)
    x[:, ::3] = 0.0
    w = torch.randn(K, N).to(dtype)
    w[::3] = float("nan")
    y = torch.full((T, N), float("nan"))
    thr = torch.zeros(1)
    u = _C.act_gemv16(x.numpy(), thr.numpy(), False, w.view(torch.int16).numpy(), str(dtype).split(".")[-1], None,
                      y.numpy(), 2)
    assert u == K - len(range(0, K, 3))
    keep = torch.ones(K, dtype=torch.bool)
    keep[::3] = False
    expect = x[:, keep].double() @ w[keep].double()
    assert_close_rms(y, expect, torch.float32, name="y")


@needs_cpp
def test_act_gemv16_binding_refuses_bad_arguments():
    x = np.random.randn(2, 5).astype(np.float32)
    w = np.zeros((5, 3), dtype=np.int16)
    thr = np.zeros(1, dtype=np.float32)
    y = np.empty((2, 3), dtype=np.float32)
    with pytest.raises(ValueError, match="dtype"):
        _C.act_gemv16(x, thr, False, w, "float32", None, y, 1)
    with pytest.raises(TypeError, match="weight_t"):
        _C.act_gemv16(x, thr, False, w.astype(np.float32), "bfloat16", None, y, 1)
    with pytest.raises(ValueError, match="weight_t"):
        _C.act_gemv16(x, thr, False, np.zeros((4, 3), dtype=np.int16), "bfloat16", None, y, 1)
    with pytest.raises(ValueError, match="weight_t"):
        _C.act_gemv16(x, thr, False, np.zeros((3, 5), dtype=np.int16).T, "bfloat16", None, y, 1)
    with pytest.raises(ValueError, match="y"):
        _C.act_gemv16(x, thr, False, w, "bfloat16", None, np.empty((2, 4), dtype=np.float32), 1)
    with pytest.raises(ValueError, match="bias"):
        _C.act_gemv16(x, thr, False, w, "bfloat16", np.zeros(4, dtype=np.float32), y, 1)
    with pytest.raises(ValueError, match="threshold"):
        _C.act_gemv16(x, np.zeros(2, dtype=np.float32), False, w, "bfloat16", None, y, 1)
    buf = np.zeros(16, dtype=np.float32)
    with pytest.raises(ValueError, match="shares memory"):
        _C.act_gemv16(buf[:10].reshape(2, 5), thr, False, w, "bfloat16", None, buf[4:10].reshape(2, 3), 1)


def test_reference_act_matches_dense_math():
    """The oracle itself against plain fp64 math written here."""
    x = torch.randn(7, 30, dtype=torch.float64)
    x[2] = 0
    w = torch.randn(30, 11, dtype=torch.float64)
    b = torch.randn(11, dtype=torch.float64)
    dy = torch.randn(7, 11, dtype=torch.float64)
    thr = torch.rand(30, dtype=torch.float64)
    for relu in (False, True):
        v = x.clamp_min(0) if relu else x
        m = v.abs() > thr
        xs = v * m
        xs_, m_ = R.act_mask(x, thr, relu)
        assert torch.equal(m_, m) and torch.equal(xs_, xs)
        assert_close_rms(R.act_dds(x, w, b, thr, relu), xs @ w + b, name="act_dds")
        assert_close_rms(R.act_dsd(dy, x, w, thr, relu), (dy @ w.T) * m, name="act_dsd")
        assert_close_rms(R.act_sdd(dy, x, thr, relu), xs.T @ dy, name="act_sdd")
        assert R.union_density(x, thr, relu) == pytest.approx(m.any(0).double().mean().item())


# ---- torch.library registration ----


def _opcheck_cases():
    cases = []
    for batch, in_f, out_f, chan, relu in [(3, 20, 13, False, True), (35, 9, 16, True, False)]:
        c = Case(batch, in_f, out_f, chan, relu, 0.5)
        tag = f"B{batch}-in{in_f}-out{out_f}-{'chan' if chan else 'tensor'}{'-relu' if relu else ''}"
        for op in ("act_dds", "act_dds_host"):
            cases.append(pytest.param(op, (c.x, c.w, c.bias, c.thr, relu), id=f"{op}-{tag}-bias"))
            cases.append(pytest.param(op, (c.x, c.w, None, c.thr, relu), id=f"{op}-{tag}-nobias"))
        for op in ("act_dsd", "act_dsd_host"):
            cases.append(pytest.param(op, (c.dy, c.x, c.w, c.thr, relu), id=f"{op}-{tag}"))
        for op in ("act_sdd", "act_sdd_host"):
            cases.append(pytest.param(op, (c.dy, c.x, c.thr, relu), id=f"{op}-{tag}"))
        for op in ("act_backward", "act_backward_host"):
            cases.append(pytest.param(op, (c.dy, c.x, c.w, c.thr, relu), id=f"{op}-{tag}"))
    return cases


@pytest.mark.parametrize("op,args", _opcheck_cases())
def test_act_ops_opcheck(op, args):
    torch.library.opcheck(getattr(OPS, op), args)


# ---- the C++ binding's validation: a clear error naming the argument, the output left untouched ----

_BB, _K, _N = 5, 24, 16


def _binding_args():
    rng = np.random.default_rng(0)
    return {
        "x": rng.standard_normal((_BB, _K)).astype(np.float32),
        "dy": rng.standard_normal((_BB, _N)).astype(np.float32),
        "threshold": np.array([0.5], np.float32),
        "weight_t": rng.standard_normal((_K, _N)).astype(np.float32),
        "bias": rng.standard_normal(_N).astype(np.float32),
    }


_OUT = {"act_gemv": (_BB, _N), "act_spmm": (_BB, _N), "act_dsd": (_BB, _K), "act_sdd": (_K, _N)}


def _call(kernel, a, out):
    if kernel in ("act_gemv", "act_spmm"):
        return getattr(_C, kernel)(a["x"], a["threshold"], False, a["weight_t"], a["bias"], out, 2)
    if kernel == "act_dsd":
        return _C.act_dsd(a["dy"], a["x"], a["threshold"], False, a["weight_t"], out, 2)
    return _C.act_sdd(a["dy"], a["x"], a["threshold"], False, out, 2)


def _readonly(shape):
    a = _nan(*shape)
    a.flags.writeable = False
    return a


def _bad(kernel, name, exc, id, **changes):
    return pytest.param(kernel, name, exc, changes, id=f"{kernel}-{id}")


def _forward_bad(kernel):
    return [
        _bad(kernel, "threshold", ValueError, "threshold-wrong-length", threshold=np.zeros(_K - 1, np.float32)),
        _bad(kernel, "threshold", ValueError, "threshold-empty", threshold=np.zeros(0, np.float32)),
        _bad(kernel, "threshold", ValueError, "threshold-2d", threshold=np.zeros((1, _K), np.float32)),
        _bad(kernel, "threshold", TypeError, "threshold-float64", threshold=np.zeros(1, np.float64)),
        _bad(kernel, "weight_t", ValueError, "weight_t-wrong-rows", weight_t=np.zeros((_K + 1, _N), np.float32)),
        _bad(kernel, "weight_t", ValueError, "weight_t-transposed",
             weight_t=np.zeros((_N, _K), np.float32).T),
        _bad(kernel, "weight_t", ValueError, "weight_t-column-slice",
             weight_t=np.zeros((_K, _N + 3), np.float32)[:, :_N]),
        _bad(kernel, "weight_t", TypeError, "weight_t-float64", weight_t=np.zeros((_K, _N), np.float64)),
        _bad(kernel, "weight_t", ValueError, "weight_t-1d", weight_t=np.zeros(_K * _N, np.float32)),
        _bad(kernel, "x", TypeError, "x-float64", x=np.zeros((_BB, _K), np.float64)),
        _bad(kernel, "x", ValueError, "x-features-non-contiguous", x=np.zeros((_BB, 2 * _K), np.float32)[:, ::2]),
        _bad(kernel, "x", ValueError, "x-1d", x=np.zeros(_K, np.float32)),
        _bad(kernel, "bias", ValueError, "bias-wrong-length", bias=np.zeros(_N + 1, np.float32)),
        _bad(kernel, "bias", TypeError, "bias-float64", bias=np.zeros(_N, np.float64)),
        _bad(kernel, "y", ValueError, "y-wrong-shape", out=_nan(_BB, _N + 1)),
        _bad(kernel, "y", ValueError, "y-wrong-batch", out=_nan(_BB + 1, _N)),
        _bad(kernel, "y", TypeError, "y-float64", out=_nan(_BB, _N, dtype=np.float64)),
        _bad(kernel, "y", ValueError, "y-not-c-contiguous", out=_nan(_N, _BB).T),
        _bad(kernel, "y", ValueError, "y-read-only", out=_readonly((_BB, _N))),
    ]


def _overlapping(out_shape, in_shape):
    """An output and an input that share 8 elements of one NaN buffer (both C-contiguous)."""
    n_out, n_in = int(np.prod(out_shape)), int(np.prod(in_shape))
    buf = np.full(n_out + n_in, np.nan, np.float32)
    return buf[:n_out].reshape(out_shape), buf[n_out - 8 : n_out - 8 + n_in].reshape(in_shape)


def _alias_cases():
    # an output that shares memory with something the kernel reads is refused (found by review: the act
    # bindings did not check it, and act_sdd wrote into dy as it read it)
    y, x = _overlapping((_BB, _N), (_BB, _K))
    dx, dy = _overlapping((_BB, _K), (_BB, _N))
    dw, dy2 = _overlapping((_K, _N), (_BB, _N))
    dw2, x2 = _overlapping((_K, _N), (_BB, _K))
    return [
        _bad("act_gemv", "y", ValueError, "y-overlaps-x", out=y, x=x),
        _bad("act_spmm", "y", ValueError, "y-overlaps-x", out=y, x=x),
        _bad("act_dsd", "dx", ValueError, "dx-overlaps-dy", out=dx, dy=dy),
        _bad("act_sdd", "dweight_t", ValueError, "dweight_t-overlaps-dy", out=dw, dy=dy2),
        _bad("act_sdd", "dweight_t", ValueError, "dweight_t-overlaps-x", out=dw2, x=x2),
    ]


BAD_BINDING_ARGS = _alias_cases() + _forward_bad("act_gemv") + _forward_bad("act_spmm") + [
    _bad("act_dsd", "threshold", ValueError, "threshold-wrong-length", threshold=np.zeros(_K + 1, np.float32)),
    _bad("act_dsd", "weight_t", ValueError, "weight_t-wrong-rows", weight_t=np.zeros((_K - 1, _N), np.float32)),
    _bad("act_dsd", "weight_t", ValueError, "weight_t-transposed", weight_t=np.zeros((_N, _K), np.float32).T),
    _bad("act_dsd", "dy", ValueError, "dy-wrong-rows", dy=np.zeros((_BB + 1, _N), np.float32)),
    _bad("act_dsd", "dy", ValueError, "dy-wrong-columns", dy=np.zeros((_BB, _N + 1), np.float32)),
    _bad("act_dsd", "dy", TypeError, "dy-float64", dy=np.zeros((_BB, _N), np.float64)),
    _bad("act_dsd", "dx", ValueError, "dx-wrong-shape", out=_nan(_BB, _N)),
    _bad("act_dsd", "dx", TypeError, "dx-float64", out=_nan(_BB, _K, dtype=np.float64)),
    _bad("act_sdd", "threshold", ValueError, "threshold-wrong-length", threshold=np.zeros(2, np.float32)),
    _bad("act_sdd", "x", TypeError, "x-float64", x=np.zeros((_BB, _K), np.float64)),
    _bad("act_sdd", "dy", ValueError, "dy-wrong-rows", dy=np.zeros((_BB - 1, _N), np.float32)),
    _bad("act_sdd", "dweight_t", ValueError, "dweight_t-wrong-shape", out=_nan(_K, _N + 1)),
    _bad("act_sdd", "dweight_t", ValueError, "dweight_t-not-c-contiguous", out=_nan(_N, _K).T),
    _bad("act_sdd", "dweight_t", TypeError, "dweight_t-float64", out=_nan(_K, _N, dtype=np.float64)),
]


@needs_cpp
@pytest.mark.parametrize("kernel", list(_OUT))
def test_act_binding_valid_arguments_match_reference(kernel):
    a = _binding_args()
    out = _nan(*_OUT[kernel])
    _call(kernel, a, out)
    t = {k: torch.from_numpy(v).double() for k, v in a.items()}
    expected = {
        "act_gemv": R.act_dds(t["x"], t["weight_t"], t["bias"], t["threshold"][0], False),
        "act_spmm": R.act_dds(t["x"], t["weight_t"], t["bias"], t["threshold"][0], False),
        "act_dsd": R.act_dsd(t["dy"], t["x"], t["weight_t"], t["threshold"][0], False),
        "act_sdd": R.act_sdd(t["dy"], t["x"], t["threshold"][0], False),
    }[kernel]
    assert_close_rms(torch.from_numpy(out), expected, torch.float32, name=kernel)


@needs_cpp
@pytest.mark.parametrize("kernel,name,exc,changes", BAD_BINDING_ARGS)
def test_act_binding_rejects_malformed_arguments(kernel, name, exc, changes):
    a = _binding_args()
    changes = dict(changes)
    out = changes.pop("out", None)
    a.update(changes)
    if out is None:
        out = _nan(*_OUT[kernel])
    with pytest.raises(exc, match=rf"^{name}:"):
        _call(kernel, a, out)
    base = out.base if out.base is not None else out
    assert np.isnan(base).all(), "the output was written although an error was raised"


def _backward_bad():
    dx, dy = _overlapping((_BB, _K), (_BB, _N))
    dw, x = _overlapping((_K, _N), (_BB, _K))
    dx2, dw2 = _overlapping((_BB, _K), (_K, _N))
    dw3, wt = _overlapping((_K, _N), (_K, _N))
    return [
        pytest.param("dx", ValueError, {"dx": dx, "dy": dy}, id="dx-overlaps-dy"),
        pytest.param("dweight_t", ValueError, {"dweight_t": dw, "x": x}, id="dweight_t-overlaps-x"),
        pytest.param("dweight_t", ValueError, {"dweight_t": dw3, "weight_t": wt}, id="dweight_t-overlaps-weight_t"),
        pytest.param("dx", ValueError, {"dx": dx2, "dweight_t": dw2}, id="dx-overlaps-dweight_t"),
        pytest.param("dx", ValueError, {"dx": _nan(_BB, _N)}, id="dx-wrong-shape"),
        pytest.param("dx", ValueError, {"dx": _readonly((_BB, _K))}, id="dx-read-only"),
        pytest.param("dweight_t", ValueError, {"dweight_t": _nan(_K, _N + 1)}, id="dweight_t-wrong-shape"),
        pytest.param("dweight_t", TypeError, {"dweight_t": _nan(_K, _N, dtype=np.float64)}, id="dweight_t-float64"),
        pytest.param("dy", ValueError, {"dy": np.zeros((_BB, _N + 1), np.float32)}, id="dy-wrong-columns"),
        pytest.param("dy", ValueError, {"dy": np.zeros((_BB + 1, _N), np.float32)}, id="dy-wrong-rows"),
        pytest.param("weight_t", ValueError, {"weight_t": np.zeros((_K - 1, _N), np.float32)}, id="weight_t-wrong-rows"),
        pytest.param("threshold", ValueError, {"threshold": np.zeros(_K + 1, np.float32)}, id="threshold-wrong-length"),
        pytest.param("x", TypeError, {"x": np.zeros((_BB, _K), np.float64)}, id="x-float64"),
    ]


@needs_cpp
def test_act_backward_binding_matches_both_gradients():
    a = _binding_args()
    dx, dw = _nan(_BB, _K), _nan(_K, _N)
    _C.act_backward(a["dy"], a["x"], a["threshold"], False, a["weight_t"], dx, dw, 2)
    t = {k: torch.from_numpy(v).double() for k, v in a.items()}
    assert_close_rms(torch.from_numpy(dx), R.act_dsd(t["dy"], t["x"], t["weight_t"], t["threshold"][0], False),
                     torch.float32, name="dx")
    assert_close_rms(torch.from_numpy(dw), R.act_sdd(t["dy"], t["x"], t["threshold"][0], False), torch.float32,
                     name="dweight_t")


@needs_cpp
@pytest.mark.parametrize("name,exc,changes", _backward_bad())
def test_act_backward_binding_rejects_malformed_arguments(name, exc, changes):
    a = _binding_args()
    a["dx"], a["dweight_t"] = _nan(_BB, _K), _nan(_K, _N)
    a.update(changes)
    with pytest.raises(exc, match=rf"^{name}:"):
        _C.act_backward(a["dy"], a["x"], a["threshold"], False, a["weight_t"], a["dx"], a["dweight_t"], 2)
    for out in ("dx", "dweight_t"):  # NaN buffers (the overlapping ones entirely), so a write shows
        base = a[out].base if a[out].base is not None else a[out]
        assert np.isnan(base).all(), f"{out} was written although an error was raised"


# ---- the dense fallback of large, dense-ish batches on an AVX-512 CPU (ops.act.DENSE_FALLBACK) ----


class _KernelSpy:
    """Stands in for _C in ops.act: records which kernels ran, and runs the real ones."""

    def __init__(self, real):
        self.real, self.calls = real, []

    def __getattr__(self, name):
        fn = getattr(self.real, name)
        if not name.startswith("act_"):
            return fn

        def call(*args):
            self.calls.append(name)
            return fn(*args)

        return call


@needs_cpp
@pytest.mark.parametrize("avx512", [True, False], ids=["avx512-cpu", "other-cpu"])
@pytest.mark.parametrize("sp", [0.2, 0.9], ids=["80pct-active", "10pct-active"])
def test_dense_fallback_runs_dense_gemms_only_above_the_crossover(monkeypatch, avx512, sp):
    monkeypatch.setattr(ops_act, "DENSE_FALLBACK", True)
    monkeypatch.setattr(ops_act, "_avx512_cpu", lambda: avx512)
    spy = _KernelSpy(ops_act._C)
    monkeypatch.setattr(ops_act, "_C", spy)
    c = Case(64, 100, 77, False, False, sp, zero_row=False)  # a magnitude threshold: sp of the inputs inactive
    y = ops_act.dds(c.x, c.w, c.bias, c.thr, False)
    dx, dw = ops_act.backward(c.dy, c.x, c.w, c.thr, False)
    dense = avx512 and sp == 0.2
    assert ("act_spmm" in spy.calls) != dense and ("act_backward" in spy.calls) != dense, spy.calls
    assert_close_rms(y, c.dds_ref(c.bias), torch.float32, name="y")
    assert_close_rms(dx, c.dsd_ref(), torch.float32, name="dx")
    assert_close_rms(dw, c.sdd_ref(), torch.float32, name="dweight_t")
    # an inactive input's gradient is exactly 0, even where dy @ weight_tᵀ overflows
    huge = torch.full_like(c.dy, 3e38)
    dx_inf, _ = ops_act.backward(huge, c.x, c.w, c.thr, False)
    assert (dx_inf[~c.mask()] == 0).all()


@pytest.mark.parametrize("relu", [True, False], ids=["relu", "magnitude"])
@pytest.mark.parametrize("thr", ["zero", "negative", "positive", "channel"])
def test_dense_fallback_mask_is_the_reference_mask(relu, thr):
    x = torch.randn(37, 300)
    x[0, :5] = float("nan")
    x[1, :5] = -0.0
    x[2, :5] = 0.0
    x[3, :5] = float("inf")
    t = {"zero": torch.tensor(0.0), "negative": torch.tensor(-0.5), "positive": torch.tensor(0.7),
         "channel": torch.rand(300) - 0.3}[thr]
    x[4] = t.expand(300)  # exactly at the threshold: inactive
    got, want = ops_act._masked(x, t, relu), R.act_mask(x, t, relu)
    assert torch.equal(got[1], want[1]) and torch.equal(got[0], want[0])


def test_dense_fallback_mask_rounds_a_float64_threshold_as_the_kernels():
    x = torch.tensor([[0.1, 0.2, -0.1]])
    thr = torch.tensor(0.1, dtype=torch.float64)  # fp32(0.1) > 0.1 in float64, == in float32
    got = ops_act._masked(x, thr, False)[1]
    assert torch.equal(got, R.act_mask(x, thr.float(), False)[1]) and not got[0, 0]
    c = Case(3, 3, 4, False, False, 0.5)
    kernel = ops_act.dsd(torch.ones(1, 4), x, c.w[:3, :4].contiguous(), thr.float(), False)
    assert torch.equal(kernel != 0, got)


@pytest.fixture
def forced_dense(monkeypatch):
    """The dense fallback on, whatever the CPU and the density."""
    monkeypatch.setattr(ops_act, "DENSE_FALLBACK", True)
    monkeypatch.setattr(ops_act, "_avx512_cpu", lambda: True)
    monkeypatch.setattr(ops_act, "DENSE_FWD_DENSITY", -1.0)
    monkeypatch.setattr(ops_act, "_dense_bwd_density", lambda batch: -1.0)


@pytest.mark.parametrize("layout", list(LAYOUTS))
@pytest.mark.parametrize("chan,relu,bias", [(False, True, True), (True, False, False)], ids=["relu-bias", "chan-nobias"])
def test_dense_fallback_strided_inputs(forced_dense, layout, chan, relu, bias):
    c = Case(37, 300, 77, chan, relu, 0.5)
    x, dy = LAYOUTS[layout](c.x), LAYOUTS[layout](c.dy)
    b = c.bias if bias else None
    assert_close_rms(ops_act.dds(x, c.w, b, c.thr, relu), c.dds_ref(b), torch.float32, name="y")
    dx, dw = ops_act.backward(dy, x, c.w, c.thr, relu)
    assert dx.is_contiguous() and dw.is_contiguous()
    assert_close_rms(dx, c.dsd_ref(), torch.float32, name="dx")
    assert_close_rms(dw, c.sdd_ref(), torch.float32, name="dweight_t")


@pytest.mark.parametrize("op", ["act_dds", "act_dds_host", "act_backward", "act_backward_host"])
def test_dense_fallback_opcheck(forced_dense, op):
    c = Case(35, 9, 16, True, False, 0.5)
    args = (c.x, c.w, c.bias, c.thr, False) if op.startswith("act_dds") else (c.dy, c.x, c.w, c.thr, False)
    torch.library.opcheck(getattr(OPS, op), args)


def test_dense_fallback_crossover_falls_with_the_batch():
    assert ops_act._dense_bwd_density(64) == ops_act._dense_bwd_density(256) == pytest.approx(0.6)
    assert ops_act._dense_bwd_density(512) == pytest.approx(0.4)
    assert ops_act._dense_bwd_density(1024) == pytest.approx(0.2)


def test_dense_fallback_density_sample():
    x = torch.zeros(256, 40)
    x[:, :10] = 1.0  # a quarter active in every row
    assert ops_act._density(x, torch.tensor(0.5), True) == pytest.approx(0.25)
    x = torch.zeros(47, 40)
    x[-1] = 1.0  # only the last row active: sampled (1 of 16 rows)
    assert ops_act._density(x, torch.tensor(0.5), True) == pytest.approx(1 / 16)
    assert ops_act._density(x[:0], torch.tensor(0.5), True) == 0.0
    # wide rows are sampled by column too, each column against its own threshold
    x = torch.ones(64, 10000)
    thr = torch.where(torch.arange(10000) % 2 == 0, 2.0, 0.5)  # the even columns inactive
    assert ops_act._density(x, thr, False) == pytest.approx(0.5, abs=0.01)


# ---- ActivationSparseLinear against fp64 autograd ----

MODES = ("relu", "tensor", "channel", "topk")
LAYER_SPARSITY = 0.6


def _topk_keep(x, k):
    """Bool mask of the ``k`` entries of largest magnitude in each row, by a full sort."""
    keep = torch.zeros(x.shape, dtype=torch.bool)
    if k > 0:
        order = x.detach().abs().argsort(dim=-1, descending=True)[..., :k]
        keep.scatter_(-1, order, True)
    return keep


def _sparsified_ref(layer, x64):
    """s(x) in fp64 for the layer's mode, differentiable in x64."""
    if layer.mode == "topk":
        k = layer.in_features - int(round(layer.sparsity * layer.in_features))
        return torch.where(_topk_keep(x64, k), x64, torch.zeros((), dtype=x64.dtype))
    thr = layer.threshold.detach().double()
    return R.act_mask(x64, thr, layer.mode == "relu")[0]


def _make_layer(in_f, out_f, mode, bias=True, sparsity=LAYER_SPARSITY):
    layer = ActivationSparseLinear(in_f, out_f, bias=bias, sparsity=sparsity, mode=mode)
    if mode in ("tensor", "channel"):
        scale = torch.rand(in_f) * 1.5 + 0.25
        layer.calibrate(torch.randn(512, in_f) * scale)
    return layer


def _check_layer_against_reference(layer, x, dense_weight=None, dense_bias=None):
    """Forward and backward of ``layer`` on ``x`` vs fp64 autograd on ``s(x) @ Wᵀ + b``."""
    w_param = layer.weight if dense_weight is None else dense_weight
    b_param = layer.bias if dense_weight is None else dense_bias
    W = w_param.detach().double().requires_grad_()
    b = None if b_param is None else b_param.detach().double().requires_grad_()
    x64 = x.detach().double().requires_grad_()
    y64 = F.linear(_sparsified_ref(layer, x64), W, b)
    xr = x.detach().clone().requires_grad_()
    y = layer(xr)
    assert y.shape == (*x.shape[:-1], layer.out_features) and y.dtype == x.dtype
    assert_close_rms(y, y64, x.dtype, name="y")
    g = torch.randn(y.shape)
    y.backward(g)
    y64.backward(g.double())
    assert_close_rms(xr.grad, x64.grad, x.dtype, name="dx")
    return W, b


LAYER_SHAPES = [
    pytest.param((2, 3, 37), 37, 21, id="2x3xin37-out21"),
    pytest.param((1, 37), 37, 21, id="B1-in37-out21"),
    pytest.param((37,), 37, 21, id="vector-in37-out21"),
    pytest.param((5, 8, 100), 100, 70, id="5x8xin100-out70"),
    pytest.param((4, 1), 1, 5, id="B4-in1-out5"),
    pytest.param((4, 37), 37, 1, id="B4-in37-out1"),
]


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("shape,in_f,out_f", LAYER_SHAPES)
def test_activation_sparse_linear_matches_autograd(mode, shape, in_f, out_f):
    layer = _make_layer(in_f, out_f, mode)
    if mode == "channel":
        assert layer.threshold.shape == (in_f,)
    else:
        assert layer.threshold.shape == ()
    assert layer.weight.shape == (out_f, in_f) and layer.weight.t().is_contiguous()
    x = torch.randn(shape)
    W, b = _check_layer_against_reference(layer, x)
    assert_close_rms(layer.weight.grad, W.grad, torch.float32, name="dweight")
    assert layer.weight.grad.stride() == layer.weight.stride(), "weight.grad must have the weight's strides"
    assert_close_rms(layer.bias.grad, b.grad, torch.float32, name="dbias")
    assert layer.threshold.grad is None


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("shape,in_f,out_f", [LAYER_SHAPES[0], LAYER_SHAPES[3]])
def test_activation_sparse_linear_without_bias(mode, shape, in_f, out_f):
    layer = _make_layer(in_f, out_f, mode, bias=False)
    assert layer.bias is None
    W, _ = _check_layer_against_reference(layer, torch.randn(shape))
    assert_close_rms(layer.weight.grad, W.grad, torch.float32, name="dweight")
    assert layer.weight.grad.stride() == layer.weight.stride()


def test_activation_sparse_linear_relu_mode_equals_the_dense_layer_after_relu():
    """relu mode on a ReLU's output changes nothing: same output and gradients as nn.Linear."""
    layer = _make_layer(64, 40, "relu")
    dense = layer.to_dense()
    assert isinstance(dense, nn.Linear) and torch.equal(dense.weight, layer.weight)
    x = torch.randn(6, 64, requires_grad=True)
    x2 = x.detach().clone().requires_grad_()
    y = layer(torch.relu(x))
    y2 = dense(torch.relu(x2))
    assert_close_rms(y, y2.double(), torch.float32, name="y")
    g = torch.randn(6, 40)
    y.backward(g)
    y2.backward(g)
    assert_close_rms(x.grad, x2.grad.double(), torch.float32, name="dx")
    assert_close_rms(layer.weight.grad, dense.weight.grad.double(), torch.float32, name="dweight")


def test_activation_sparse_linear_backward_of_a_batch_reduction():
    """``y.sum(0)`` hands back a gradient with row stride 0: the layer's backward takes it."""
    layer = _make_layer(37, 21, "tensor")
    x = torch.randn(6, 37)
    xr = x.clone().requires_grad_()
    layer(xr).sum(0).pow(2).sum().backward()
    x64 = x.double().requires_grad_()
    W = layer.weight.detach().double().requires_grad_()
    F.linear(_sparsified_ref(layer, x64), W, layer.bias.detach().double()).sum(0).pow(2).sum().backward()
    assert_close_rms(xr.grad, x64.grad, torch.float32, name="dx")
    assert_close_rms(layer.weight.grad, W.grad, torch.float32, name="dweight")


@pytest.mark.parametrize("mode", MODES)
def test_activation_sparse_linear_batch_zero(mode):
    layer = _make_layer(37, 21, mode)
    x = torch.randn(0, 37, requires_grad=True)
    y = layer(x)
    assert y.shape == (0, 21)
    y.sum().backward()
    assert x.grad.shape == (0, 37) and (layer.weight.grad == 0).all()


def test_activation_sparse_linear_topk_sparsity_zero_keeps_every_input():
    """topk with sparsity 0 keeps all inputs, so the layer is nn.Linear: dx = dy @ W everywhere, exact zeros
    of x included."""
    layer = _make_layer(37, 21, "topk", sparsity=0.0)
    x = torch.randn(4, 37)
    x[:, 3] = 0
    x[1] = 0
    xr = x.clone().requires_grad_()
    y = layer(xr)
    dense = layer.to_dense()
    assert_close_rms(y, dense(x).double(), torch.float32, name="y")
    g = torch.randn(4, 21)
    y.backward(g)
    assert_close_rms(xr.grad, g.double() @ layer.weight.detach().double(), torch.float32, name="dx")


def test_activation_sparse_linear_topk_drops_round_sparsity_in_per_row():
    for in_f, sp in ((37, 0.6), (100, 0.9), (10, 0.25), (10, 0.99)):
        layer = ActivationSparseLinear(in_f, 3, mode="topk", sparsity=sp)
        drop = int(round(sp * in_f))
        assert layer.keep == in_f - drop
        x = torch.randn(9, in_f)
        assert layer.measure(x) == pytest.approx(drop / in_f)
        # each row: exactly in - drop inputs reach the weight
        xs = _sparsified_ref(layer, x.double())
        assert ((xs != 0).sum(-1) == in_f - drop).all()
        assert torch.equal(layer.threshold, torch.zeros(()))
        assert layer.calibrate(x) == pytest.approx(drop / in_f)
        assert torch.equal(layer.threshold, torch.zeros(())), "topk has no threshold to calibrate"


def test_activation_sparse_linear_union_density():
    layer = _make_layer(50, 7, "channel", sparsity=0.5)
    x = torch.randn(3, 4, 50)
    m = R.act_mask(x.reshape(-1, 50), layer.threshold, False)[1]
    assert layer.union_density(x) == pytest.approx(m.any(0).float().mean().item())
    assert layer.union_density(x[0, :1]) == pytest.approx(m[0].float().mean().item())
    assert layer.union_density(torch.zeros(0, 50)) == 0.0


def test_activation_sparse_linear_from_dense_linear():
    lin = nn.Linear(37, 21)
    layer = ActivationSparseLinear.from_dense(lin, 0.7, "channel")
    assert (layer.mode, layer.sparsity, layer.in_features, layer.out_features) == ("channel", 0.7, 37, 21)
    assert torch.equal(layer.weight, lin.weight) and layer.weight.t().is_contiguous()
    assert torch.equal(layer.bias, lin.bias)
    assert layer.weight.data_ptr() != lin.weight.data_ptr() and layer.bias.data_ptr() != lin.bias.data_ptr()
    # uncalibrated: threshold 0, only exact zeros skipped, the output is the dense layer's
    x = torch.randn(5, 37)
    assert torch.equal(layer.threshold, torch.zeros(37))
    assert_close_rms(layer(x), F.linear(x.double(), lin.weight.double(), lin.bias.double()), torch.float32)
    nob = ActivationSparseLinear.from_dense(nn.Linear(37, 21, bias=False), 0.5, "relu")
    assert nob.bias is None
    _check_layer_against_reference(nob, x)
    back = layer.to_dense()
    assert isinstance(back, nn.Linear) and torch.equal(back.weight, lin.weight) and torch.equal(back.bias, lin.bias)


@pytest.mark.parametrize("mode", MODES)
def test_activation_sparse_linear_from_sparse_linear(mode):
    sparse = SparseLinear(37, 21, sparsity=0.5)
    layer = ActivationSparseLinear.from_dense(sparse, LAYER_SPARSITY, mode)
    assert layer.sparse is sparse and layer.weight is None
    if mode in ("tensor", "channel"):
        layer.calibrate(torch.randn(256, 37))
    x = torch.randn(2, 3, 37)
    Wd = sparse.dense_weight().detach()
    W, b = _check_layer_against_reference(layer, x, dense_weight=Wd, dense_bias=sparse.bias)
    # the SparseLinear applied to the sparsified input
    xs = _sparsified_ref(layer, x.double()).float()
    assert_close_rms(layer(x), sparse(xs).double(), torch.float32, name="y vs SparseLinear(s(x))")
    assert layer.to_dense() is sparse
    # its parameters get the gradient through the sparse layer (the mask of the weight)
    assert sparse.values.grad is not None and torch.isfinite(sparse.values.grad).all()
    assert_close_rms(sparse.bias.grad, b.grad, torch.float32, name="dbias")


# ---- calibration ----


def _calibration_samples(n, in_f, scale):
    return torch.distributions.Laplace(0.0, 1.0).sample((n, in_f)) * scale


@pytest.mark.parametrize("sparsity", [0.5, 0.7, 0.9])
@pytest.mark.parametrize("mode", ["tensor", "channel"])
def test_calibrate_reaches_the_target_on_fresh_samples(mode, sparsity):
    in_f = 64
    scale = torch.rand(in_f) * 3 + 0.1  # per-channel scales: a tensor threshold drops channels unevenly
    layer = ActivationSparseLinear(in_f, 8, sparsity=sparsity, mode=mode)
    calib = _calibration_samples(4096, in_f, scale)
    reached = layer.calibrate(calib)
    assert abs(reached - sparsity) < 1e-3, f"on its own samples: {reached}"
    assert layer.threshold.shape == (() if mode == "tensor" else (in_f,))
    # exactly round(s * n) of the samples (per channel, or of all of them) lie at or under the threshold
    # (continuous samples: no ties); an off-by-one rank would move this count by one
    below = (calib.abs() <= layer.threshold).sum(0 if mode == "channel" else None)
    n = calib.shape[0] if mode == "channel" else calib.numel()
    assert (below == round(sparsity * n)).all(), below
    assert layer.threshold.dtype == torch.float32 and (layer.threshold > 0).all()
    fresh = _calibration_samples(4096, in_f, scale)
    measured = layer.measure(fresh)
    assert abs(measured - sparsity) <= 0.02, f"fresh samples: {measured:.4f}, target {sparsity}"
    # measure is the dropped fraction under the layer's own mask
    m = R.act_mask(fresh, layer.threshold, False)[1]
    assert measured == pytest.approx(1 - m.float().mean().item())
    if mode == "channel":
        per_channel = 1 - m.float().mean(0)
        assert (per_channel - sparsity).abs().max() < 0.05, "each channel reaches the target"
    # iterables and leading dims are accepted and give the same threshold
    other = ActivationSparseLinear(in_f, 8, sparsity=sparsity, mode=mode)
    other.calibrate([calib[:1000].reshape(10, 100, in_f), calib[1000:]])
    assert torch.equal(other.threshold, layer.threshold)


def test_calibrate_relu_mode_keeps_threshold_zero():
    layer = ActivationSparseLinear(32, 8, sparsity=0.9, mode="relu")
    x = torch.randn(2048, 32)
    reached = layer.calibrate(x)
    assert torch.equal(layer.threshold, torch.zeros(()))
    assert reached == pytest.approx((x <= 0).float().mean().item())


def test_calibrate_rejects_bad_samples():
    layer = ActivationSparseLinear(16, 4, mode="tensor")
    with pytest.raises(ValueError, match="^samples:"):
        layer.calibrate([])
    with pytest.raises(ValueError, match="^samples:"):
        layer.calibrate(torch.zeros(0, 16))
    with pytest.raises(ValueError, match="^samples:"):
        layer.calibrate(torch.randn(10, 15))
    with pytest.raises(ValueError, match="^samples:"):
        layer.calibrate([torch.randn(10, 16), torch.randn(10, 17)])
    with pytest.raises(TypeError, match="^samples:"):
        layer.calibrate([torch.randn(10, 16), [1.0] * 16])
    assert torch.equal(layer.threshold, torch.zeros(())), "a failed calibration leaves the threshold alone"


def _mlp():
    return nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 8))


def test_calibrate_model_after_sparsify_activations():
    model = _mlp()
    dense = copy.deepcopy(model)
    out = sparsify_activations_(model, 0.7, mode="tensor")
    assert out is model
    layers = {name: m for name, m in model.named_modules() if isinstance(m, ActivationSparseLinear)}
    assert list(layers) == ["0", "2"] and all(m.mode == "tensor" and m.sparsity == 0.7 for m in layers.values())
    batches = [torch.randn(40, 16), torch.randn(24, 16)]
    result = calibrate_(model, batches)
    assert set(result) == {"0", "2"}
    for name, reached in result.items():
        assert abs(reached - 0.7) < 0.01, (name, reached)
    # each threshold is the 0.7-quantile of |input| of the dense model's activations
    inputs = torch.cat(batches)
    # calibration runs each layer dense (F.linear with the layer's own weight), batch by batch
    h0 = [torch.relu(F.linear(b, layers["0"].weight, layers["0"].bias)) for b in batches]
    acts = {"0": inputs, "2": torch.cat(h0).detach()}
    for name, a in acts.items():
        k = int(round(0.7 * a.numel()))
        assert torch.equal(layers[name].threshold, a.abs().flatten().kthvalue(k).values), name
        assert not layers[name]._calibrating
    # the calibrated model computes the sparsified forward
    x = torch.randn(3, 16)
    h = F.linear(R.act_mask(x.double(), layers["0"].threshold, False)[0], dense[0].weight.double(),
                 dense[0].bias.double())
    h = torch.relu(h)
    y = F.linear(R.act_mask(h, layers["2"].threshold, False)[0], dense[2].weight.double(), dense[2].bias.double())
    assert_close_rms(model(x), y, torch.float32, name="calibrated model")
    # mode and sparsity can be set for every layer at once
    result = calibrate_(model, [inputs], sparsity=0.5, mode="channel")
    assert all(m.mode == "channel" and m.threshold.shape == (m.in_features,) for m in layers.values())
    assert abs(result["0"] - 0.5) < 0.02
    # a ReLU output can be more than half zeros in a channel: at least the target is dropped there
    assert result["2"] >= 0.5 - 0.02


def test_calibrate_model_rejects_bad_arguments():
    model = sparsify_activations_(_mlp(), 0.5)
    with pytest.raises(ValueError, match="^batches:"):
        calibrate_(model, [])
    assert not any(getattr(m, "_calibrating", False) for m in model.modules())
    with pytest.raises(ValueError, match="^batches: layer '0' saw no input rows"):
        calibrate_(model, [torch.zeros(0, 16)])
    with pytest.raises(ValueError, match="^model:"):
        calibrate_(_mlp(), [torch.randn(2, 16)])
    with pytest.raises(TypeError, match="^model:"):
        calibrate_("model", [torch.randn(2, 16)])
    with pytest.raises(ValueError, match="^sparsity:"):
        calibrate_(model, [torch.randn(2, 16)], sparsity=1.0)
    with pytest.raises(ValueError, match="^mode:"):
        calibrate_(model, [torch.randn(2, 16)], mode="magnitude")


def test_sparsify_activations_swaps_linear_and_sparse_linear():
    model = nn.Sequential(nn.Linear(16, 32), nn.ReLU(), SparseLinear(32, 8, sparsity=0.5))
    sparse = model[2]
    sparsify_activations_(model, 0.5, mode="relu", filter_fn=lambda m, fqn: fqn != "0")
    assert type(model[0]) is nn.Linear
    assert isinstance(model[2], ActivationSparseLinear) and model[2].sparse is sparse and model[2].mode == "relu"
    single = sparsify_activations_(nn.Linear(8, 4), 0.3, mode="topk")
    assert isinstance(single, ActivationSparseLinear) and single.mode == "topk" and single.sparsity == 0.3
    with pytest.raises(TypeError, match="^model:"):
        sparsify_activations_("model")
    with pytest.raises(ValueError, match="^sparsity:"):
        sparsify_activations_(_mlp(), 1.0)
    with pytest.raises(ValueError, match="^mode:"):
        sparsify_activations_(_mlp(), 0.5, mode="block")


# ---- checkpoints, dtype, copies ----


def test_activation_sparse_linear_state_dict_round_trip():
    a = _make_layer(37, 21, "channel", sparsity=0.7)
    sd = a.state_dict()
    assert set(sd) == {"weight", "bias", "threshold", "_extra_state"}
    assert sd["_extra_state"] == {"mode": "channel", "sparsity": 0.7}
    buf = io.BytesIO()
    torch.save(sd, buf)
    buf.seek(0)
    sd = torch.load(buf, weights_only=True)
    b = ActivationSparseLinear(37, 21, mode="channel", sparsity=0.7)
    b.load_state_dict(sd)
    assert torch.equal(b.threshold, a.threshold) and torch.equal(b.weight, a.weight)
    assert b.weight.t().is_contiguous()
    x = torch.randn(4, 37)
    assert torch.equal(b(x), a(x))


@pytest.mark.parametrize("src,dst", [("tensor", "channel"), ("channel", "tensor"), ("channel", "relu"),
                                     ("tensor", "topk")])
def test_activation_sparse_linear_state_dict_restores_the_mode(src, dst):
    a = _make_layer(37, 21, src, sparsity=0.7)
    b = ActivationSparseLinear(37, 21, mode=dst, sparsity=0.3)
    b.load_state_dict(a.state_dict())
    assert (b.mode, b.sparsity) == (src, 0.7)
    assert b.threshold.shape == a.threshold.shape and torch.equal(b.threshold, a.threshold)
    x = torch.randn(4, 37)
    assert torch.equal(b(x), a(x))


def test_activation_sparse_linear_to_float64():
    a = _make_layer(37, 21, "channel")
    for moved in (copy.deepcopy(a).to(torch.float64), copy.deepcopy(a).double()):
        assert moved.weight.dtype == moved.bias.dtype == torch.float64
        assert moved.weight.t().is_contiguous(), "the transposed layout survives .to()"
        assert moved.threshold.dtype == torch.float64 and torch.equal(moved.threshold, a.threshold.double())
        assert torch.equal(moved.weight, a.weight.detach().double())
        x = torch.randn(5, 37, dtype=torch.float64)
        W, b = _check_layer_against_reference(moved, x)
        assert_close_rms(moved.weight.grad, W.grad, torch.float64, name="dweight")
        assert moved.weight.grad.stride() == moved.weight.stride()
        assert_close_rms(moved.bias.grad, b.grad, torch.float64, name="dbias")


def test_activation_sparse_linear_deepcopy():
    a = _make_layer(37, 21, "tensor")
    b = copy.deepcopy(a)
    assert b.mode == a.mode and b.sparsity == a.sparsity and b.weight.t().is_contiguous()
    x = torch.randn(3, 37)
    assert torch.equal(b(x), a(x))
    with torch.no_grad():
        b.threshold.fill_(100.0)
        b.weight.zero_()
    assert a.threshold < 100 and a.weight.abs().sum() > 0
    assert torch.equal(b(x), b.bias.expand(3, 21))


# ---- torch.compile ----


def _compile_check(model, x, backend):
    torch._dynamo.reset()
    compiled = torch.compile(model, fullgraph=True, backend=backend)
    results = []
    for mod in (model, compiled):
        xr = x.clone().requires_grad_()
        y = mod(xr)
        y.pow(2).sum().backward()
        results.append((y.detach(), xr.grad, *(p.grad.clone() for p in model.parameters())))
        model.zero_grad()
    for e, c in zip(*results):
        assert_close_rms(c, e.double(), torch.float32, name="compiled vs eager")
    torch._dynamo.reset()


def test_activation_sparse_linear_compile_inductor():
    """tensor mode (calibrated) and relu mode in one model, fullgraph, inductor: forward and backward."""
    first = _make_layer(24, 40, "tensor", sparsity=0.5)
    model = nn.Sequential(first, nn.ReLU(), ActivationSparseLinear(40, 6, mode="relu"))
    assert first.threshold > 0
    _compile_check(model, torch.randn(2, 5, 24), "inductor")


@pytest.mark.parametrize("mode", ["channel", "topk"])
def test_activation_sparse_linear_compile_aot_eager(mode):
    model = nn.Sequential(nn.Linear(12, 24), nn.ReLU(), _make_layer(24, 40, mode, sparsity=0.5))
    _compile_check(model, torch.randn(37, 12), "aot_eager")


# ---- bad input ----


def test_activation_sparse_linear_rejects_bad_input():
    layer = ActivationSparseLinear(16, 4)
    with pytest.raises(ValueError, match="^x:"):
        layer(torch.randn(3, 15))
    with pytest.raises(ValueError, match="^x:"):
        layer(torch.tensor(1.0))
    with pytest.raises(TypeError, match="^x:"):
        layer(torch.randn(3, 16, dtype=torch.float64))
    with pytest.raises(TypeError, match="^x:"):
        layer([0.0] * 16)


@pytest.mark.parametrize("sparsity,exc", [(1.0, ValueError), (-0.1, ValueError), (1.5, ValueError),
                                          (float("nan"), ValueError), ("0.5", TypeError), (True, TypeError),
                                          (None, TypeError), (torch.tensor(0.5), TypeError)],
                         ids=["1.0", "-0.1", "1.5", "nan", "str", "bool", "None", "tensor"])
def test_activation_sparse_linear_rejects_bad_sparsity(sparsity, exc):
    with pytest.raises(exc, match="^sparsity:"):
        ActivationSparseLinear(16, 4, sparsity=sparsity)
    with pytest.raises(exc, match="^sparsity:"):
        ActivationSparseLinear.from_dense(nn.Linear(16, 4), sparsity=sparsity)
    if sparsity is not None:  # set_mode(mode, None) keeps the sparsity
        layer = ActivationSparseLinear(16, 4)
        with pytest.raises(exc, match="^sparsity:"):
            layer.set_mode("tensor", sparsity)


def test_activation_sparse_linear_rejects_bad_mode_and_module():
    for bad in ("magnitude", "", None, "TENSOR"):
        with pytest.raises(ValueError, match="^mode:"):
            ActivationSparseLinear(16, 4, mode=bad)
        with pytest.raises(ValueError, match="^mode:"):
            ActivationSparseLinear.from_dense(nn.Linear(16, 4), 0.5, bad)
    layer = ActivationSparseLinear(16, 4, mode="channel")
    with pytest.raises(ValueError, match="^mode:"):
        layer.set_mode("columns")
    for module in (nn.Conv1d(16, 4, 1), nn.Bilinear(4, 4, 4), nn.ReLU()):
        with pytest.raises(TypeError, match="^linear:"):
            ActivationSparseLinear.from_dense(module)
    with pytest.raises(TypeError, match="^in_features:"):
        ActivationSparseLinear(16.0, 4)
    with pytest.raises(ValueError, match="^out_features:"):
        ActivationSparseLinear(16, -1)


# ---- training ----


def test_training_matches_nn_linear():
    """Three SGD steps of Linear -> ReLU -> ActivationSparseLinear(relu) track the all-dense model."""
    torch.manual_seed(1)
    ref = nn.Sequential(nn.Linear(64, 128), nn.ReLU(), nn.Linear(128, 32))
    model = nn.Sequential(copy.deepcopy(ref[0]), nn.ReLU(), ActivationSparseLinear.from_dense(ref[2], mode="relu"))
    assert torch.equal(model[2].weight, ref[2].weight) and model[2].weight.t().is_contiguous()
    opt_ref = torch.optim.SGD(ref.parameters(), lr=0.1)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    for step in range(3):
        x, target = torch.randn(16, 64), torch.randn(16, 32)
        losses = []
        for m, o in ((ref, opt_ref), (model, opt)):
            o.zero_grad()
            loss = F.mse_loss(m(x), target)
            loss.backward()
            o.step()
            losses.append(loss.detach())
        assert_close_rms(losses[1], losses[0].double(), torch.float32, name=f"loss at step {step}")
    for name, p, q in (("0.weight", model[0].weight, ref[0].weight), ("0.bias", model[0].bias, ref[0].bias),
                       ("2.weight", model[2].weight, ref[2].weight), ("2.bias", model[2].bias, ref[2].bias)):
        assert_close_rms(p, q.double(), torch.float32, name=name)
    assert model[2].weight.t().is_contiguous(), "the optimizer keeps the transposed layout"


# ---- refusals change nothing ----


def test_set_mode_refused_changes_nothing():
    layer = ActivationSparseLinear(4, 3, sparsity=0.5, mode="tensor")
    with pytest.raises(ValueError, match="sparsity"):
        layer.set_mode("channel", 1.5)
    assert layer.mode == "tensor" and layer.sparsity == 0.5 and layer.threshold.shape == ()


@pytest.mark.parametrize("samples,exc,match", [
    pytest.param(torch.ones(8, 4, dtype=torch.bool), TypeError, "^samples: expected floating-point", id="bool"),
    pytest.param(torch.randn(8, 4, dtype=torch.cfloat), TypeError, "^samples: expected floating-point", id="complex"),
    pytest.param(torch.tensor([[0.5, float("nan"), 1.0, 2.0]]), ValueError, "^samples: contain NaN", id="nan"),
    pytest.param(5, TypeError, "^samples: expected a tensor", id="int"),
])
def test_calibrate_refuses_bad_samples_before_changing_the_threshold(samples, exc, match):
    layer = ActivationSparseLinear(4, 3, sparsity=0.5, mode="channel")
    layer.threshold.copy_(torch.tensor([12.0, 13.0, 14.0, 15.0]))
    with pytest.raises(exc, match=match):
        layer.calibrate(samples)
    assert torch.equal(layer.threshold, torch.tensor([12.0, 13.0, 14.0, 15.0]))


def test_calibrate_model_runs_in_eval_mode_and_puts_training_back():
    # a norm layer in train mode would move its running statistics on the calibration batches
    model = nn.Sequential(nn.BatchNorm1d(4), ActivationSparseLinear(4, 4, sparsity=0.5), nn.Dropout(0.5))
    model.train()
    model[2].eval()  # a module whose own flag differs from its parent's comes back as it was
    before = {k: v.clone() for k, v in model.state_dict().items() if "running" in k}
    calibrate_(model, [torch.randn(16, 4) + 3.0])
    after = {k: v for k, v in model.state_dict().items() if "running" in k}
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert model.training and model[0].training and model[1].training and not model[2].training


def test_reference_compares_a_16_bit_input_with_the_float32_threshold():
    # found by review: the threshold was rounded to the input's dtype, which can round it up past an
    # input above it; the kernels compare in float32, and so does the reference now
    thr = torch.tensor(0.675, dtype=torch.float32)
    v = thr.to(torch.bfloat16)  # 0.67578125: the threshold rounded up, an input above it
    assert v.float() > thr
    below = torch.tensor(0.671875, dtype=torch.bfloat16)
    x = torch.stack([v, -v, below]).view(1, 3)
    s, mask = R.act_mask(x, thr, False)
    assert mask.tolist() == [[True, True, False]]
    assert torch.equal(s, torch.stack([v, -v, torch.zeros((), dtype=torch.bfloat16)]).view(1, 3))


def test_calibrate_records_copies_of_the_inputs():
    # found by review: calibrate_ kept views of the inputs, so batches fed through one buffer refilled
    # between them (or an input changed in place later) changed what had been recorded
    torch.manual_seed(0)
    model = nn.Sequential(ActivationSparseLinear.from_dense(nn.Linear(16, 4), sparsity=0.5, mode="tensor"))
    buf = torch.empty(64, 16)

    def feed():
        g = torch.Generator().manual_seed(1)
        for i in range(4):
            buf.copy_(torch.randn(64, 16, generator=g) * (i + 1))
            yield buf

    sparseops.calibrate_(model, feed(), sparsity=0.5, mode="tensor")
    g = torch.Generator().manual_seed(1)
    batches = torch.cat([torch.randn(64, 16, generator=g) * (i + 1) for i in range(4)])
    expect = batches.abs().flatten().quantile(0.5).item()
    last_only = buf.abs().flatten().quantile(0.5).item()  # what views of the one buffer would give
    assert abs(expect - last_only) > 0.1 * expect
    assert model[0].threshold.item() == pytest.approx(expect, rel=0.02)


def test_threshold_stays_float32_through_dtype_casts_and_measure_checks_its_input():
    # found by review: .to(bf16) rounded the threshold (0.67335 -> 0.671875); measure() reshaped a wrong
    # width silently
    layer = ActivationSparseLinear.from_dense(nn.Linear(8, 4), sparsity=0.5, mode="tensor")
    layer.threshold.fill_(0.67335)
    layer.to(torch.bfloat16)
    assert layer.threshold.dtype == torch.float32 and layer.threshold.item() == pytest.approx(0.67335, abs=1e-7)
    assert layer.weight.dtype == torch.bfloat16
    layer.float()
    assert layer.threshold.item() == pytest.approx(0.67335, abs=1e-7)
    with pytest.raises(ValueError, match="^x: expected last dimension in_features=8"):
        layer.measure(torch.randn(4, 16))
    with pytest.raises(TypeError, match="^x: expected a torch.Tensor"):
        layer.union_density([[1.0] * 8])


def test_calibrate_refuses_nan_inputs_before_changing_any_layer():
    # found by review: a NaN seen only by a later layer raised after the earlier ones were re-moded and
    # calibrated
    torch.manual_seed(0)
    a = ActivationSparseLinear.from_dense(nn.Linear(8, 8), sparsity=0.5, mode="tensor")
    b = ActivationSparseLinear.from_dense(nn.Linear(8, 8), sparsity=0.5, mode="tensor")

    class Poison(nn.Module):
        def forward(self, x):
            return x * float("nan")

    model = nn.Sequential(a, Poison(), b)
    with pytest.raises(ValueError, match="^batches: layer '2' saw NaN"):
        sparseops.calibrate_(model, [torch.randn(16, 8)], sparsity=0.9, mode="channel")
    for m in (a, b):
        assert m.mode == "tensor" and m.sparsity == 0.5 and m.threshold.shape == () and m.threshold.item() == 0.0


def test_threshold_dtype_after_set_mode_on_float64_and_a_16_bit_checkpoint_with_assign():
    layer = ActivationSparseLinear.from_dense(nn.Linear(8, 4), sparsity=0.5, mode="tensor").double()
    assert layer.threshold.dtype == torch.float64
    layer.set_mode("channel")
    assert layer.threshold.dtype == torch.float64, "a float64 layer keeps a float64 threshold"
    src = ActivationSparseLinear.from_dense(nn.Linear(8, 4), sparsity=0.5, mode="tensor")
    src.threshold.fill_(0.675)
    sd = {k: (v.to(torch.bfloat16) if v.is_floating_point() else v) if isinstance(v, torch.Tensor) else v
          for k, v in src.state_dict().items()}
    dst = ActivationSparseLinear.from_dense(nn.Linear(8, 4), sparsity=0.5, mode="tensor")
    dst.load_state_dict(sd, assign=True)
    assert dst.threshold.dtype == torch.float32
    assert dst.threshold.item() == torch.tensor(0.675).to(torch.bfloat16).item()


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("batch", [3, 37], ids=["B3-gemv", "B37-spmm"])
@pytest.mark.parametrize("grad", [False, True], ids=["nograd", "grad"])
def test_activation_sparse_linear_nan_input_is_inactive(isa, mode, batch, grad):
    """A NaN input is skipped like a zero (``|nan| > threshold`` is false), on every path: the output and
    the gradients equal those with the NaN replaced by 0, and the NaN's input gradient is 0."""
    torch.manual_seed(5)
    layer = _make_layer(100, 37, mode)
    x = torch.randn(batch, 100)
    x[0, 3] = float("nan")
    x[batch - 1, 99] = float("nan")
    x0 = torch.nan_to_num(x, nan=0.0)
    layer0 = copy.deepcopy(layer)
    xa, xb = x.clone().requires_grad_(grad), x0.clone().requires_grad_(grad)
    with torch.set_grad_enabled(grad):
        y, y0 = layer(xa), layer0(xb)
    assert torch.isfinite(y).all()
    torch.testing.assert_close(y, y0, rtol=0, atol=0)
    if grad:
        g = torch.randn(y.shape)
        y.backward(g)
        y0.backward(g)
        assert xa.grad[0, 3] == 0 and xa.grad[batch - 1, 99] == 0
        torch.testing.assert_close(xa.grad, xb.grad, rtol=0, atol=0)
        torch.testing.assert_close(layer.weight.grad, layer0.weight.grad, rtol=0, atol=0)


def test_sparsify_activations_twice_leaves_the_wrapped_layers_and_warns():
    """The SparseLinear inside an ActivationSparseLinear is its weight: a second call must not wrap it again
    (that broke the forward), and says it left the layer."""
    m = nn.Sequential(nn.Linear(16, 16), nn.ReLU(), nn.Linear(16, 8))
    sparseops.sparsify_(m, 0.5, filter_fn=lambda mod, fqn: fqn == "0")
    sparsify_activations_(m, 0.5, mode="relu")
    inner = m[0].sparse
    x = torch.randn(2, 16)
    y = m(x)
    with pytest.warns(UserWarning, match="already activation-sparse"):
        sparsify_activations_(m, 0.9, mode="topk")
    assert m[0].sparse is inner and m[0].mode == "relu" and m[2].mode == "relu"
    torch.testing.assert_close(m(x), y, rtol=0, atol=0)


def test_sparsify_activations_leaves_a_shared_sparse_linear_and_warns():
    """A SparseLinear registered at two places would be converted at one only (named_modules lists it
    once): left as it is, with a warning, as a shared nn.Linear is."""
    sl = SparseLinear(16, 16, sparsity=0.5)
    m = nn.Sequential(sl, nn.ReLU(), sl)
    with pytest.warns(UserWarning, match="shared"):
        sparsify_activations_(m, 0.5, mode="relu")
    assert m[0] is sl and m[2] is sl


def test_sparsify_after_sparsify_activations_warns_about_the_dense_wrapped_layers():
    m = nn.Sequential(nn.Linear(16, 16))
    sparsify_activations_(m, 0.5, mode="relu")
    with pytest.warns(UserWarning, match="activation-sparse layer"):
        sparseops.sparsify_(m, 0.9)
    assert m[0].sparse is None


@pytest.mark.parametrize("wrap", [False, True], ids=["dense", "over-csr"])
def test_float64_relu_mode_saves_the_mask_the_forward_used(wrap):
    # an fp64 threshold (0.1) is not an fp32 value: an input just above it in fp64 but not above
    # float32(0.1) is active in the forward, and must be active in what the backward saved too
    import copy

    from sparseops.reference.act import act_mask

    torch.manual_seed(0)
    base = SparseLinear(8, 4, sparsity=0.5) if wrap else None
    a = (ActivationSparseLinear.from_dense(base, mode="relu") if wrap
         else ActivationSparseLinear(8, 4, mode="relu")).double()
    with torch.no_grad():
        a.threshold.fill_(0.1)
    x = torch.full((3, 8), 0.05, dtype=torch.float64)
    x[:, 3] = 0.1000000005  # > 0.1, < float32(0.1) = 0.10000000149
    x.requires_grad_(True)
    y = a(x)
    y.backward(torch.ones_like(y))
    r = copy.deepcopy(a)
    xr = x.detach().clone().requires_grad_(True)
    w = r.sparse.to_dense().weight if wrap else r.weight
    b = r.sparse.bias if wrap else r.bias
    yr = torch.nn.functional.linear(act_mask(xr, r.threshold, True)[0], w, b)
    yr.backward(torch.ones_like(yr))
    torch.testing.assert_close(y, yr, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(x.grad, xr.grad, rtol=1e-12, atol=1e-12)
    assert (x.grad[:, 3] != 0).any()


def test_float64_layer_calibrates_in_float64():
    a = ActivationSparseLinear(16, 4, sparsity=0.5, mode="tensor").double()
    tiny = torch.randn(64, 16, dtype=torch.float64) * 1e-46  # normal in fp64, 0 in fp32
    assert a.calibrate(tiny) == pytest.approx(0.5, abs=1e-9)
    near = 1 + torch.arange(64 * 16, dtype=torch.float64).view(64, 16) * 1e-12  # distinct in fp64, ties in fp32
    assert a.calibrate(near) == pytest.approx(0.5, abs=1e-9)


def test_load_with_assign_keeps_the_transposed_weight_layout():
    # a row-major checkpoint weight taken as it is by assign=True made the decode kernel read W through
    # strides (4-12x slower, review 2026-11-24): the load lays it out as Wᵀ's rows again
    lin = nn.Linear(48, 40)
    src = ActivationSparseLinear.from_dense(lin, sparsity=0.5)
    src.calibrate(torch.randn(64, 48))
    sd = {k: v.contiguous().clone() if isinstance(v, torch.Tensor) else v for k, v in src.state_dict().items()}
    assert sd["weight"].is_contiguous()
    dst = ActivationSparseLinear(48, 40, sparsity=0.5)
    dst.load_state_dict(sd, assign=True)
    assert dst.weight.t().is_contiguous() and isinstance(dst.weight, nn.Parameter)
    torch.testing.assert_close(dst.weight, src.weight, rtol=0, atol=0)
    x = torch.randn(3, 48)
    with torch.no_grad():
        torch.testing.assert_close(dst(x), src(x), rtol=0, atol=0)
