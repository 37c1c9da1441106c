"""The weight- and activation-sparse forward: ``sparseops::act_csr_dds`` (``_C.act_csr_gemv``), which skips the
inputs no row activates *and* the weight's zeros, and ActivationSparseLinear over a SparseLinear, which runs it at
inference on CPU.

The op is compared with an fp64 oracle written here from the definition (a dense ``Wᵀ`` scattered from the CSR,
then ``act_mask(x) @ Wᵀ + b``). The binding's checks are driven with hand-made indices: a bad index in a row some
input activates is refused with a ValueError and the output left as it was; one in a row no input activates is
never read.
"""

import numpy as np
import pytest
import torch
from helpers import assert_close_rms

import sparseops
import sparseops.ops.act as ops_act
from sparseops import ActivationSparseLinear, SparseLinear
from sparseops._cpp import _C
from sparseops.reference.act import act_mask

OPS = torch.ops.sparseops
needs_cpp = pytest.mark.skipif(_C is None, reason="sparseops._C is not built")


def _csr_t(w: torch.Tensor):
    """``(t_crow, t_col, t_values)``: the CSR of ``wt = w.t()`` [in, out] over its nonzeros, columns ascending."""
    wt = w.t()
    nz = wt != 0
    t_crow = torch.zeros(wt.shape[0] + 1, dtype=torch.int32)
    t_crow[1:] = nz.sum(1).cumsum(0).to(torch.int32)
    j, o = nz.nonzero(as_tuple=True)  # row-major: rows ascending, columns ascending within a row
    return t_crow, o.to(torch.int32), wt[j, o].contiguous()


def _oracle(x, w, bias, thr, relu):
    xs, _ = act_mask(x.double(), thr.double(), relu)
    y = xs @ w.double().t()
    return y + bias.double() if bias is not None else y


def _weight(out_f, in_f, sparsity, empty_rows=False):
    w = torch.randn(out_f, in_f)
    w = w * (torch.rand(out_f, in_f) >= sparsity)
    if empty_rows and in_f >= 3 and out_f >= 3:
        w[:, 1] = 0  # an input that multiplies nothing: an empty row of Wᵀ
        w[2] = 0  # an output nothing feeds
    return w


def _thr(x, sp, chan):
    a = x.abs()
    if chan:
        return a.quantile(sp, dim=0) if x.shape[0] > 1 else torch.full((x.shape[1],), a.quantile(sp).item())
    return a.quantile(sp) if sp > 0 else torch.tensor(-1.0)


SHAPES = [(1, 1, 1), (1, 37, 3), (3, 37, 37), (1, 1000, 37), (32, 100, 1000), (3, 3, 1000), (8, 37, 1)]


@needs_cpp
@pytest.mark.parametrize("relu", [False, True], ids=["abs", "relu"])
@pytest.mark.parametrize("chan", [False, True], ids=["tensor", "channel"])
@pytest.mark.parametrize("wsp", [0.0, 0.5, 0.99])
@pytest.mark.parametrize("T,in_f,out_f", SHAPES)
def test_act_csr_dds_matches_the_oracle(T, in_f, out_f, wsp, chan, relu):
    w = _weight(out_f, in_f, wsp, empty_rows=True)
    t_crow, t_col, tv = _csr_t(w)
    x = torch.randn(T, in_f)
    if T >= 3:
        x[1] = 0  # a row of x that activates nothing
    bias = torch.randn(out_f)
    thr = _thr(x, 0.5, chan)
    y = ops_act.csr_dds(x, t_crow, t_col, tv, bias, thr, relu, out_f)
    assert y.dtype == torch.float32 and y.shape == (T, out_f)
    assert torch.isfinite(y).all(), "an output element was not written (NaN poison)"
    assert_close_rms(y, _oracle(x, w, bias, thr, relu), name="act_csr_dds")
    # and through the dispatcher, without a bias
    y2 = OPS.act_csr_dds(x, t_crow, t_col, tv, None, thr, relu, out_f)
    assert_close_rms(y2, _oracle(x, w, None, thr, relu), name="act_csr_dds (op)")


@needs_cpp
@pytest.mark.parametrize("active", [0.0, 1.0], ids=["all-inactive", "all-active"])
def test_act_csr_dds_all_or_nothing(active):
    w = _weight(40, 50, 0.7)
    t_crow, t_col, tv = _csr_t(w)
    x = torch.randn(4, 50)
    thr = torch.tensor(-1.0 if active else 1e9)
    bias = torch.randn(40)
    y = ops_act.csr_dds(x, t_crow, t_col, tv, bias, thr, False, 40)
    assert_close_rms(y, _oracle(x, w, bias, thr, False), name="act_csr_dds")
    if not active:
        assert torch.equal(y, bias.expand(4, 40))


@needs_cpp
def test_act_csr_dds_non_contiguous_input_and_thread_counts():
    w = _weight(300, 200, 0.8)
    t_crow, t_col, tv = _csr_t(w)
    big = torch.randn(200, 10)
    x = big.t()[:5]  # [5, 200], column stride 10
    thr = torch.tensor(0.7)
    want = _oracle(x, w, None, thr, False)
    for n in (1, 2, 3):
        y = torch.empty(5, 300)
        _C.act_csr_gemv(x.contiguous().numpy(), thr.reshape(1).numpy(), False, t_crow.numpy(), t_col.numpy(),
                        tv.numpy(), 300, None, y.numpy(), n)
        assert_close_rms(y, want, name=f"{n} threads")
    assert_close_rms(ops_act.csr_dds(x, t_crow, t_col, tv, None, thr, False, 300), want, name="strided x")


@needs_cpp
def test_act_csr_gemv_returns_the_union_size():
    w = _weight(20, 30, 0.5)
    t_crow, t_col, tv = _csr_t(w)
    x = torch.randn(3, 30)
    thr = torch.tensor(0.8)
    y = np.empty((3, 20), dtype=np.float32)
    u = _C.act_csr_gemv(x.numpy(), thr.reshape(1).numpy(), False, t_crow.numpy(), t_col.numpy(), tv.numpy(), 20,
                        None, y, 2)
    assert u == int((x.abs() > thr).any(0).sum())


# ---- the binding's checks: hand-made indices ----


def _call(x, thr, t_crow, t_col, tv, out_f, y):
    return _C.act_csr_gemv(x.numpy(), thr.reshape(1).numpy(), False, t_crow.numpy(), t_col.numpy(), tv.numpy(),
                           out_f, None, y, 2)


def _bad_cases():
    # (name, mutate(t_crow, t_col), message): each breaks row 0, which input 0 activates
    return [
        ("crow-start", lambda p, c: p.__setitem__(0, 1), "t_crow"),
        ("crow-end", lambda p, c: p.__setitem__(-1, int(p[-1]) + 1), "t_crow"),
        ("crow-decreasing", lambda p, c: p.__setitem__(1, int(p[2]) + 1), "t_crow"),
        ("col-too-large", lambda p, c: c.__setitem__(0, 1000), "t_col"),
        ("col-negative", lambda p, c: c.__setitem__(0, -1), "t_col"),
        ("col-unsorted", lambda p, c: c.__setitem__(slice(0, 2), c[:2].flip(0).clone()), "t_col"),
        ("col-duplicate", lambda p, c: c.__setitem__(1, int(c[0])), "t_col"),
    ]


@needs_cpp
@pytest.mark.parametrize("name,mutate,msg", _bad_cases(), ids=[c[0] for c in _bad_cases()])
def test_act_csr_gemv_refuses_a_bad_index_in_an_active_row(name, mutate, msg):
    w = torch.randn(50, 6)  # dense: every row of Wᵀ holds 50 entries
    t_crow, t_col, tv = _csr_t(w)
    mutate(t_crow, t_col)
    x = torch.zeros(2, 6)
    x[0, 0] = 5.0  # input 0 (row 0 of Wᵀ) is active
    y = np.full((2, 50), 7.0, dtype=np.float32)
    with pytest.raises(ValueError, match=msg):
        _call(x, torch.tensor(0.5), t_crow, t_col, tv, 50, y)
    assert (y == 7.0).all(), "the output was modified by a call that raised"
    # the op's reference path (float64) makes the same checks
    with pytest.raises(ValueError, match=msg):
        OPS.act_csr_dds(x.double(), t_crow, t_col, tv.double(), None, torch.tensor(0.5), False, 50)


@needs_cpp
def test_act_csr_gemv_never_reads_an_inactive_row():
    # row 3 of Wᵀ is garbage (out of range, unsorted) and its values NaN, but no input activates it
    w = torch.randn(50, 6)
    t_crow, t_col, tv = _csr_t(w)
    s, e = int(t_crow[3]), int(t_crow[4])
    t_col[s:e] = torch.arange(10**6, 10**6 - (e - s), -1, dtype=torch.int32)
    tv[s:e] = float("nan")
    x = torch.randn(2, 6)
    x[:, 3] = 0.0
    thr = torch.tensor(0.1)
    y = np.empty((2, 50), dtype=np.float32)
    _call(x, thr, t_crow, t_col, tv, 50, y)
    clean = w.clone()
    clean[:, 3] = 0
    assert_close_rms(torch.from_numpy(y), _oracle(x, clean, None, thr, False), name="inactive garbage row")


@needs_cpp
def test_act_csr_gemv_checks_shapes_and_dtypes():
    w = _weight(8, 5, 0.5)
    t_crow, t_col, tv = _csr_t(w)
    x = torch.randn(2, 5)
    thr = np.array([0.1], dtype=np.float32)
    y = np.empty((2, 8), dtype=np.float32)
    with pytest.raises(ValueError, match="t_crow"):
        _C.act_csr_gemv(x.numpy(), thr, False, t_crow[:-1].numpy(), t_col.numpy(), tv.numpy(), 8, None, y, 1)
    with pytest.raises(ValueError, match="t_values"):
        _C.act_csr_gemv(x.numpy(), thr, False, t_crow.numpy(), t_col.numpy(), tv[:-1].numpy(), 8, None, y, 1)
    with pytest.raises(ValueError, match="y"):
        _C.act_csr_gemv(x.numpy(), thr, False, t_crow.numpy(), t_col.numpy(), tv.numpy(), 8, None,
                        np.empty((2, 7), dtype=np.float32), 1)
    with pytest.raises(ValueError, match="bias"):
        _C.act_csr_gemv(x.numpy(), thr, False, t_crow.numpy(), t_col.numpy(), tv.numpy(), 8,
                        np.zeros(3, dtype=np.float32), y, 1)
    with pytest.raises((TypeError, ValueError), match="t_col"):
        _C.act_csr_gemv(x.numpy(), thr, False, t_crow.numpy(), t_col.long().numpy(), tv.numpy(), 8, None, y, 1)


@needs_cpp
def test_act_csr_dds_opcheck():
    w = _weight(9, 7, 0.5)
    t_crow, t_col, tv = _csr_t(w)
    x = torch.randn(3, 7)
    torch.library.opcheck(OPS.act_csr_dds, (x, t_crow, t_col, tv, torch.randn(9), torch.tensor(0.3), False, 9))
    torch.library.opcheck(OPS.act_csr_dds, (x, t_crow, t_col, tv, None, torch.rand(7), True, 9))


# ---- the layer: ActivationSparseLinear over a SparseLinear skips both at inference ----


def _layer(pattern, in_f=64, out_f=48, mode="tensor"):
    lin = torch.nn.Linear(in_f, out_f)
    if pattern == "unstructured":
        sp = SparseLinear.from_dense(lin, sparsity=0.8)
    else:
        sp = SparseLinear.from_dense(lin, pattern=pattern)
    layer = ActivationSparseLinear.from_dense(sp, sparsity=0.5, mode=mode)
    if mode in ("tensor", "channel"):
        layer.calibrate(torch.randn(256, in_f))
    return layer


def _layer_oracle(layer, x):
    sp = layer.sparse
    xs, thr, relu = layer._sparsifier(x)
    w = sp.to_dense().weight.detach()
    return _oracle(xs.reshape(-1, layer.in_features), w, sp.bias.detach(), thr, relu).reshape(*x.shape[:-1], -1)


@needs_cpp
@pytest.mark.parametrize("pattern", ["unstructured", "2:4", "fanin:16", "1:8"])
@pytest.mark.parametrize("mode", ["tensor", "channel", "relu", "topk"])
def test_layer_skips_both_at_inference(pattern, mode, monkeypatch):
    layer = _layer(pattern, mode=mode)
    calls = []
    real = ops_act.csr_dds
    monkeypatch.setattr(ops_act, "csr_dds", lambda *a: calls.append(1) or real(*a))
    x = torch.randn(2, 3, 64)  # 6 rows, leading dims kept
    with torch.no_grad():
        y = layer(x)
    assert calls, "inference did not take the two-way skip"
    assert y.shape == (2, 3, 48)
    assert_close_rms(y, _layer_oracle(layer, x), name="layer")
    # with gradients the SparseLinear runs on s(x), and gives the same output
    calls.clear()
    y2 = layer(x)
    assert not calls
    assert_close_rms(y2.detach(), _layer_oracle(layer, x), name="layer (training path)")


@needs_cpp
def test_layer_block_weight_keeps_the_sparse_path(monkeypatch):
    layer = _layer(sparseops.Block(16, sparsity=0.5), in_f=64, out_f=64)
    monkeypatch.setattr(ops_act, "csr_dds", lambda *a: pytest.fail("a block weight took the CSR kernel"))
    x = torch.randn(3, 64)
    with torch.no_grad():
        assert_close_rms(layer(x), _layer_oracle(layer, x), name="block")


@needs_cpp
def test_layer_more_rows_than_the_gemv_keeps_the_sparse_path(monkeypatch):
    layer = _layer("unstructured")
    monkeypatch.setattr(ops_act, "csr_dds", lambda *a: pytest.fail("a large batch took the decode kernel"))
    x = torch.randn(ops_act.GEMV_MAX_ROWS + 1, 64)
    with torch.no_grad():
        assert_close_rms(layer(x), _layer_oracle(layer, x), name="large batch")


@needs_cpp
def test_layer_cached_values_follow_updates():
    layer = _layer("unstructured")
    sp = layer.sparse
    x = torch.randn(1, 64)
    with torch.no_grad():
        layer(x)
        # an optimizer-style in-place update of the values: the transposed copy is rebuilt
        sp.values.mul_(-2.0)
        assert_close_rms(layer(x), _layer_oracle(layer, x), name="after an in-place update")
        # a mask update re-packs values and index: a new values Parameter and a new index
        sp.prune_(sp.values.abs() > sp.values.abs().median())
        assert_close_rms(layer(x), _layer_oracle(layer, x), name="after prune_")
    # .to() a dtype: bf16 keeps the SparseLinear on s(x) (the kernel is fp32), still right
    lb = layer.to(torch.bfloat16)
    with torch.no_grad():
        assert not lb._skips_both(x.bfloat16())
        y = lb(x.bfloat16())
    assert y.dtype == torch.bfloat16
    assert_close_rms(y.float(), _layer_oracle(lb, x.bfloat16()).float(), name="bf16", dtype=torch.bfloat16)


@needs_cpp
def test_layer_compiles_with_the_same_output():
    layer = _layer("unstructured")
    x = torch.randn(2, 64)
    with torch.no_grad():
        want = layer(x)
        got = torch.compile(layer, fullgraph=True)(x)
    assert_close_rms(got, want, name="torch.compile")


@needs_cpp
@pytest.mark.parametrize("nthreads", [1, 2, 3, 4])
def test_act_csr_gemv_refuses_every_shuffled_active_row(nthreads):
    # a row whose columns are a permutation of a clean row's: whatever the thread split finds by binary
    # search in it, some thread sees an entry out of its range or out of order, and nothing is written
    g = torch.Generator().manual_seed(nthreads)
    w = torch.randn(64, 3)
    t_crow, t_col, tv = _csr_t(w)
    x = torch.tensor([[4.0, 0.0, 0.0]])
    for trial in range(200):
        col = t_col.clone()
        s, e = int(t_crow[0]), int(t_crow[1])
        perm = torch.randperm(e - s, generator=g)
        if torch.equal(perm, torch.arange(e - s)):
            continue
        col[s:e] = col[s:e][perm]
        y = np.full((1, 64), 7.0, dtype=np.float32)
        with pytest.raises(ValueError, match="t_col"):
            _C.act_csr_gemv(x.numpy(), np.array([0.5], dtype=np.float32), False, t_crow.numpy(), col.numpy(),
                            tv.numpy(), 64, None, y, nthreads)
        assert (y == 7.0).all(), f"trial {trial}: the output was modified"


@needs_cpp
def test_layer_built_under_inference_mode_decodes():
    # values made under torch.inference_mode() have no version counter: the cached Wᵀ order could not be
    # keyed, and the decode call raised "Inference tensors do not track version counter" (review, 2026-11-24)
    with torch.inference_mode():
        layer = _layer("unstructured")
        x = torch.randn(1, 64)
        assert not layer._skips_both(x)
        assert_close_rms(layer(x), _layer_oracle(layer, x), name="built under inference_mode")
    with torch.no_grad():
        assert_close_rms(layer(x.clone()), _layer_oracle(layer, x), name="called after it")


@needs_cpp
@pytest.mark.parametrize("kind", ["pre", "post", "global"])
def test_hooks_on_the_wrapped_layer_run_at_decode(kind):
    # the two-way kernel does not call the wrapped SparseLinear: with a hook on it, its own forward runs,
    # so the hook sees the call (review, 2026-11-24: a pre-hook zeroing the input was ignored at decode)
    layer = _layer("unstructured").eval()
    sp = layer.sparse
    calls = []
    if kind == "pre":
        h = sp.register_forward_pre_hook(lambda m, args: (args[0] * 0,))
    elif kind == "post":
        h = sp.register_forward_hook(lambda m, args, out: out * 0)
    else:
        h = torch.nn.modules.module.register_module_forward_hook(
            lambda m, args, out: calls.append(m) if m is sp else None)
    try:
        x = torch.randn(1, 64)
        with torch.no_grad():
            y = layer(x)
    finally:
        h.remove()
    if kind == "pre":
        torch.testing.assert_close(y[0], sp.bias.detach())
    elif kind == "post":
        assert not y.any()
    else:
        assert calls == [sp]
    with torch.no_grad():
        assert layer._skips_both(x), "without hooks the decode kernel runs again"
