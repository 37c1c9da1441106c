"""The Triton activation-sparse forward against the fp64 reference (interpreter on CPU, or CUDA when present)."""

import pytest
import torch
from helpers import assert_close_rms

from sparseops.kernels import act as K
from sparseops.reference import act as R

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")


# --------------------------------------------------------------------------- helpers


def _case(T, in_f, out_f, dtype=torch.float32, chan=False, thr_dtype=torch.float32):
    """Kernel inputs in ``dtype`` on DEVICE: about half of the inputs active (fewer with relu)."""
    x = torch.randn(T, in_f)
    w = torch.randn(in_f, out_f)
    b = torch.randn(out_f)
    # per channel: thresholds spread over [0, 1.2], a few channels (almost) never active
    thr = torch.rand(in_f) * 1.2 if chan else torch.tensor(0.6)
    t = {"x": x.to(dtype), "w": w.to(dtype), "b": b.to(dtype), "thr": thr.to(thr_dtype)}
    return {k: v.to(DEVICE) for k, v in t.items()}


def _run(t, relu, bias=True, **kw):
    return K.act_dds(t["x"], t["w"], t["b"] if bias else None, t["thr"], relu, **kw)


def _ref(t, relu, bias=True):
    """The reference in fp64 on the kernel's (rounded) inputs; the threshold as given (the comparison is
    exact in fp64, as it is in the kernel's float32)."""
    thr = t["thr"].double().cpu()
    b = t["b"].double().cpu() if bias else None
    return R.act_dds(t["x"].double().cpu(), t["w"].double().cpu(), b, thr, relu)


def _id(T, in_f, out_f, chan, relu):
    return f"T{T}-in{in_f}-out{out_f}-{'chan' if chan else 'scalar'}{'-relu' if relu else ''}"


def _param(T, in_f, out_f, chan, relu):
    return pytest.param(T, in_f, out_f, chan, relu, id=_id(T, in_f, out_f, chan, relu))


# T <= 8 runs the multiply-and-sum path (a T tile of 1, 2, 4 or 8), T > 8 the tl.dot path
# (16-token tiles under the interpreter, 37 leaves a masked tail); 37 inputs are two 32-wide
# chunks with a tail; SPLIT_IN runs the split-K path
# the split-K shapes: room for four splits of at least _MIN_SPLIT_K inputs and a ragged end
# (300 under the interpreter); on a GPU also wide enough that 37 tokens' fp32 partials stay
# under the cap on their bytes (a tenth of the weight's)
SPLIT_IN = max(4 * K._MIN_SPLIT_K + 44, 3044 if K._CAP_PARTIALS else 0)

SHAPES = [
    _param(1, 1, 1, False, False),
    _param(1, 37, 100, False, True),
    _param(3, 3, 1, True, False),
    _param(3, 100, 37, True, False),
    _param(8, 37, 100, True, True),
    _param(32, 100, 3, False, False),
    _param(37, 37, 37, True, True),
    _param(37, 1, 100, False, True),
    _param(1, SPLIT_IN, 3, False, True),
    _param(4, SPLIT_IN, 200, True, True),
    _param(37, SPLIT_IN, 37, False, False),
]


# --------------------------------------------------------------------------- tests


def test_split_choice():
    # the shapes above run the split path where they should
    assert K._split(1, 37, 100, 1) == 1
    assert K._split(37, 100, 37, 32) == 1
    assert K._split(1, SPLIT_IN, 3, 1) > 1
    assert K._split(4, SPLIT_IN, 200, 4) > 1
    assert K._split(37, SPLIT_IN, 37, 32) > 1
    assert 1 < K._split(1, 10**6, 1, 1) <= K._MAX_SPLIT


@pytest.mark.parametrize("bias", [True, False], ids=["bias", "nobias"])
@pytest.mark.parametrize("T, in_f, out_f, chan, relu", SHAPES)
def test_act_dds(T, in_f, out_f, chan, relu, bias):
    t = _case(T, in_f, out_f, chan=chan)
    y = _run(t, relu, bias)
    assert y.shape == (T, out_f) and y.dtype == torch.float32
    assert_close_rms(y, _ref(t, relu, bias), name="act_dds")


HALF_SHAPES = [
    _param(1, 100, 37, False, True),  # one row: the 8-rows-a-pass decode loop and its tails
    _param(3, 100, 37, True, True),
    _param(37, 37, 37, False, False),
    _param(4, SPLIT_IN, 200, True, False),
]


@pytest.mark.parametrize("thr_dtype", ["fp32", "same"], ids=["thr-fp32", "thr-same"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
@pytest.mark.parametrize("T, in_f, out_f, chan, relu", HALF_SHAPES)
def test_half_dtypes(T, in_f, out_f, chan, relu, dtype, thr_dtype):
    t = _case(T, in_f, out_f, dtype, chan=chan, thr_dtype=torch.float32 if thr_dtype == "fp32" else dtype)
    y = _run(t, relu)
    assert y.dtype == dtype
    assert_close_rms(y, _ref(t, relu), name="act_dds")


EXTREME_SHAPES = [
    pytest.param(3, 37, 37, id="T3-in37-out37"),
    pytest.param(37, 37, 37, id="T37-in37-out37"),
    pytest.param(4, SPLIT_IN, 37, id="T4-insplit-out37"),
]


# a threshold of 1e30 overflows to inf in fp16, on purpose
@pytest.mark.filterwarnings("ignore:overflow encountered in cast:RuntimeWarning")
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["fp32", "fp16"])
@pytest.mark.parametrize("T, in_f, out_f", EXTREME_SHAPES)
def test_sparsity_extremes(T, in_f, out_f, dtype):
    t = _case(T, in_f, out_f, dtype)
    bias = t["b"].expand(T, out_f)
    # sparsity 0: a negative threshold keeps every input, zeros (and relu's zeros) included
    for relu in (False, True):
        dense = dict(t, thr=torch.tensor(-1.0, device=DEVICE))
        assert_close_rms(_run(dense, relu), _ref(dense, relu), name=f"sparsity0-relu{relu}")
    # nothing active: exactly the bias, or exactly 0
    # 1e30 is inf in fp16: still nothing is above it
    huge = dict(t, thr=torch.tensor(1e30, device=DEVICE))
    assert torch.equal(_run(huge, False), bias)
    assert torch.equal(_run(huge, True, bias=False), torch.zeros(T, out_f, dtype=dtype, device=DEVICE))
    zero = dict(t, x=torch.zeros_like(t["x"]), thr=torch.tensor(0.0, device=DEVICE))
    assert torch.equal(_run(zero, False), bias)
    # relu of an all-negative input: nothing is active even at threshold 0
    neg = dict(t, x=-t["x"].abs(), thr=torch.tensor(0.0, device=DEVICE))
    assert torch.equal(_run(neg, True), bias)


@pytest.mark.parametrize(
    "T, in_f, out_f",
    [
        pytest.param(3, 37, 37, id="T3-in37-out37"),
        pytest.param(37, 37, 37, id="T37-in37-out37"),
        pytest.param(4, SPLIT_IN, 37, id="T4-insplit-out37"),
    ],
)
def test_noncontiguous_inputs(T, in_f, out_f):
    t = _case(T, in_f, out_f, chan=True)
    ref = _ref(t, True)
    # x: transposed storage, then a column slice of a wider buffer (NaN around it)
    xt = t["x"].t().contiguous().t()
    wide_x = torch.full((T, in_f + 5), float("nan"), device=DEVICE)
    wide_x[:, 2 : 2 + in_f] = t["x"]
    # weight_t: a column slice of a wider matrix, row stride out + 7 (NaN in the other columns)
    wide_w = torch.full((in_f, out_f + 7), float("nan"), device=DEVICE)
    wide_w[:, 3 : 3 + out_f] = t["w"]
    w = wide_w[:, 3 : 3 + out_f]
    assert w.stride() == (out_f + 7, 1)
    # a strided per-channel threshold
    wide_thr = torch.full((2 * in_f,), float("nan"), device=DEVICE)
    wide_thr[::2] = t["thr"]
    for name, x in (("x-transposed", xt), ("x-column-slice", wide_x[:, 2 : 2 + in_f])):
        assert not x.is_contiguous()
        y = K.act_dds(x, w, t["b"], wide_thr[::2], True)
        assert_close_rms(y, ref, name=name)
    # a strided bias (NaN between its entries): the kernels read bias_ptr + o, so it must be made contiguous
    wide_b = torch.full((2 * out_f,), float("nan"), device=DEVICE)
    wide_b[::2] = t["b"]
    y = K.act_dds(t["x"], t["w"], wide_b[::2], t["thr"], True)
    assert_close_rms(y, ref, name="bias-strided")


@pytest.mark.parametrize(
    "T, in_f, out_f",
    [
        pytest.param(1, 37, 100, id="T1-in37-out100"),
        pytest.param(3, 100, 37, id="T3-in100-out37"),
        pytest.param(37, 100, 37, id="T37-in100-out37"),
        pytest.param(4, SPLIT_IN, 200, id="T4-insplit-out200"),
    ],
)
@pytest.mark.parametrize("chan", [False, True], ids=["scalar", "chan"])
def test_rows_outside_union_never_read(T, in_f, out_f, chan):
    # a third of the inputs are inactive for every token; their rows of weight_t hold NaN, and
    # any read of one would put NaN in the output (0 * NaN is NaN)
    t = _case(T, in_f, out_f, chan=chan)
    dead = torch.arange(in_f, device=DEVICE) % 3 == 1
    if chan:
        t["thr"] = torch.where(dead, torch.tensor(float("inf"), device=DEVICE), t["thr"])
    else:
        # |x| <= 0.5 < threshold 0.6
        t["x"][:, dead] = t["x"][:, dead].clamp(-0.5, 0.5)
    ref = _ref(t, False)
    t["w"][dead] = float("nan")
    y = _run(t, False)
    assert torch.isfinite(y).all()
    assert_close_rms(y, ref, name="act_dds")


@pytest.mark.parametrize("split", [2, 5, 16], ids=["split2", "split5", "split16"])
def test_forced_split(split, monkeypatch):
    # in = 100 is four 32-wide chunks: 5 and 16 splits leave some splits with no chunk at all,
    # and those must still write their (zero) partial sums
    monkeypatch.setattr(K, "_split", lambda *a: split)
    t = _case(3, 100, 37, chan=True)
    y = _run(t, True)
    assert_close_rms(y, _ref(t, True), name=f"split{split}")
    # deterministic: the same bits on a rerun
    assert torch.equal(_run(t, True), y)


@pytest.mark.parametrize(
    "T, in_f, out_f",
    [pytest.param(3, 37, 37, id="T3-in37-out37-nosplit"), pytest.param(4, SPLIT_IN, 37, id="T4-insplit-out37-split")],
)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_out_buffer_fully_written(T, in_f, out_f, dtype):
    t = _case(T, in_f, out_f, dtype, chan=True)
    nan = float("nan")
    y = torch.full((T, out_f), nan, dtype=dtype, device=DEVICE)
    assert _run(t, True, out=y) is y
    assert_close_rms(y, _ref(t, True), name="out")
    # a transposed view: written through its own strides
    yt = torch.full((out_f, T), nan, dtype=dtype, device=DEVICE).t()
    assert _run(t, False, bias=False, out=yt) is yt
    assert_close_rms(yt, _ref(t, False, bias=False), name="out-strided")


def test_empty_dims():
    # T == 0 and out == 0: empty outputs
    t = _case(0, 37, 5)
    assert _run(t, True).shape == (0, 5)
    t = _case(3, 37, 0)
    assert _run(t, True).shape == (3, 0)
    # in == 0: y is the bias, or 0
    t = _case(3, 0, 5, chan=True)
    assert t["thr"].shape == (0,)
    assert torch.equal(_run(t, True), t["b"].expand(3, 5))
    assert torch.equal(_run(t, True, bias=False), torch.zeros(3, 5, device=DEVICE))
    y = torch.full((3, 5), float("nan"), device=DEVICE)
    assert _run(t, False, out=y) is y and torch.equal(y, t["b"].expand(3, 5))


def _bad_inputs():
    t = _case(3, 37, 5, chan=True)
    x, w, b, thr = t["x"], t["w"], t["b"], t["thr"]
    s = torch.tensor(0.5, device=DEVICE)
    return [
        ("x-1d", ValueError, "x", lambda: K.act_dds(x[0], w, b, s, True)),
        ("x-int", TypeError, "x", lambda: K.act_dds(x.int(), w, b, s, True)),
        ("x-fp64", TypeError, "x", lambda: K.act_dds(x.double(), w.double(), b.double(), s, True)),
        ("x-list", TypeError, "x", lambda: K.act_dds(x.tolist(), w, b, s, True)),
        ("weight-dtype", TypeError, "weight_t", lambda: K.act_dds(x, w.half(), b, s, True)),
        ("weight-3d", ValueError, "weight_t", lambda: K.act_dds(x, w[None], b, s, True)),
        ("weight-rows", ValueError, "weight_t", lambda: K.act_dds(x, w[:-1], b, s, True)),
        ("weight-stride", ValueError, "weight_t", lambda: K.act_dds(x, w.t().contiguous().t(), b, s, True)),
        ("weight-step", ValueError, "weight_t", lambda: K.act_dds(x, w[:, ::2], b[:3], s, True)),
        ("bias-dtype", TypeError, "bias", lambda: K.act_dds(x, w, b.half(), s, True)),
        ("bias-length", ValueError, "bias", lambda: K.act_dds(x, w, b[:-1], s, True)),
        ("bias-2d", ValueError, "bias", lambda: K.act_dds(x, w, b[None], s, True)),
        ("thr-float", TypeError, "threshold", lambda: K.act_dds(x, w, b, 0.5, True)),
        ("thr-fp16", TypeError, "threshold", lambda: K.act_dds(x, w, b, s.half(), True)),
        ("thr-fp64", TypeError, "threshold", lambda: K.act_dds(x, w, b, s.double(), True)),
        ("thr-length", ValueError, "threshold", lambda: K.act_dds(x, w, b, thr[:-1], True)),
        ("thr-1", ValueError, "threshold", lambda: K.act_dds(x, w, b, s[None], True)),
        ("thr-2d", ValueError, "threshold", lambda: K.act_dds(x, w, b, thr[None], True)),
        ("relu-int", TypeError, "relu", lambda: K.act_dds(x, w, b, s, 1)),
        ("out-shape", ValueError, "out", lambda: K.act_dds(x, w, b, s, True, out=torch.zeros(3, 4))),
        ("out-dtype", TypeError, "out", lambda: K.act_dds(x, w, b, s, True, out=torch.zeros(3, 5).half())),
    ]


def test_bad_inputs_raise():
    for case_id, exc, arg, call in _bad_inputs():
        with pytest.raises(exc, match=rf"^{arg}:"):
            call()
