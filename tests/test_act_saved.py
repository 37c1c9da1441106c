"""What an activation-sparse layer keeps for backward in relu mode: its input's 1-bit mask plus the values the
mask marks (``ops.fewbit.mask_select`` / ``mask_expand``, C++ ``_C.mask_select`` / ``mask_expand``), not the
input, and, when the input is a 1-bit few-bit ReLU's output, that ReLU's own codes tensor (stated once, used
twice).

Gradients are compared bit for bit with the same layer saving its input whole (``_compresses`` switched off):
the kernels see s(x) instead of x, which must change nothing.
"""

import pytest
import torch

import sparseops
import sparseops.autograd.act as autograd_act
import sparseops.autograd.saved as autograd_saved
from sparseops import ActivationSparseLinear, SparseLinear
from sparseops._cpp import _C
from sparseops.ops import fewbit as fewbit_ops
from sparseops.reference.fewbit import fewbit_pack

needs_cpp = pytest.mark.skipif(_C is None, reason="sparseops._C is not built")

DTYPES = [torch.float32, torch.bfloat16, torch.float16]
COMPRESSES = autograd_act._compresses  # before any test patches it


def _relu_input(shape, zeros, dtype=torch.float32):
    x = torch.randn(*shape)
    x[torch.rand(*shape) < zeros] = -1.0
    return torch.relu(x).to(dtype)


# ---- mask_select / mask_expand / mask_where ----


def _path_and_mask(cpp, n, dtype, monkeypatch):
    """The C++ path or the reference (``_C`` hidden), and a ReLU-sparse ``x [n]`` with its packed mask."""
    if cpp and _C is None:
        pytest.skip("sparseops._C is not built")
    if not cpp:
        monkeypatch.setattr(fewbit_ops, "_C", None)
    x = _relu_input((n,), 0.6, dtype)
    return x, fewbit_pack(x, torch.zeros(1), 1)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("n", [0, 1, 3, 31, 32, 33, 37, 1000, 70001])
@pytest.mark.parametrize("cpp", [True, False], ids=["cpp", "reference"])
def test_mask_select_and_expand_round_trip(n, dtype, cpp, monkeypatch):
    x, codes = _path_and_mask(cpp, n, dtype, monkeypatch)
    v = fewbit_ops.mask_select(x, codes)
    assert v.dtype == dtype and torch.equal(v, x[x > 0])
    e = fewbit_ops.mask_expand(codes, v, (n,))  # an empty output: a slot no pass wrote would be garbage
    assert e.dtype == dtype and torch.equal(e, x)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("n", [0, 1, 33, 1000, 70001])
@pytest.mark.parametrize("cpp", [True, False], ids=["cpp", "reference"])
def test_mask_where_zeroes_off_the_mask_even_nan(n, dtype, cpp, monkeypatch):
    x, codes = _path_and_mask(cpp, n, torch.float32, monkeypatch)
    g = torch.randn(n).to(dtype)
    g[::7] = float("nan")  # a nan off the mask gives 0, as torch.where does (not nan * 0)
    got = fewbit_ops.mask_where(codes, g)
    assert got.dtype == dtype
    torch.testing.assert_close(got, torch.where(x > 0, g, torch.zeros((), dtype=dtype)), rtol=0, atol=0,
                               equal_nan=True)  # the nans on the mask stay
    assert not torch.isnan(got[x <= 0]).any()


@needs_cpp
def test_mask_where_binding_in_place_and_refusals():
    codes = torch.tensor([0b101], dtype=torch.int32).numpy()
    g = torch.arange(1.0, 4.0)
    _C.mask_where(codes, g.numpy(), g.numpy(), 1)  # out may be x
    assert g.tolist() == [1.0, 0.0, 3.0]
    out = torch.full((3,), float("nan"))
    with pytest.raises(TypeError, match="out: expected the dtype of x"):
        _C.mask_where(codes, g.numpy(), torch.zeros(3, dtype=torch.int16).numpy(), 1)
    with pytest.raises(ValueError, match="out: expected 3 elements"):
        _C.mask_where(codes, g.numpy(), torch.zeros(4).numpy(), 1)
    buf = torch.zeros(5)
    with pytest.raises(ValueError, match="out: shares memory with x"):
        _C.mask_where(codes, buf[:3].numpy(), buf[2:].numpy(), 1)
    with pytest.raises(ValueError, match="mask: expected 1 entries"):
        _C.mask_where(torch.zeros(2, dtype=torch.int32).numpy(), g.numpy(), out.numpy(), 1)
    assert torch.isnan(out).all(), "a refused call wrote its output"


@needs_cpp
def test_mask_select_reads_the_row_major_order_of_a_non_contiguous_input():
    x = _relu_input((40, 37), 0.5).t()
    codes = fewbit_pack(x, torch.zeros(1), 1)
    assert torch.equal(fewbit_ops.mask_select(x, codes), x[x > 0])
    assert torch.equal(fewbit_ops.mask_expand(codes, x[x > 0], x.shape), x)


@needs_cpp
def test_mask_bits_past_the_end_are_ignored():
    x = torch.ones(5)
    codes = torch.tensor([-1], dtype=torch.int32)  # all 32 bits set, 5 elements
    assert torch.equal(fewbit_ops.mask_select(x, codes), x)
    assert torch.equal(fewbit_ops.mask_expand(codes, torch.arange(5.0), (5,)), torch.arange(5.0))


@needs_cpp
def test_mask_bindings_refuse_bad_arguments():
    x = torch.ones(40).numpy()
    codes = torch.tensor([0b1011, 0], dtype=torch.int32).numpy()
    with pytest.raises(ValueError, match="mask: expected 2 entries"):
        _C.mask_select(x, codes[:1], 1)
    with pytest.raises(TypeError, match="x: expected float32"):
        _C.mask_select(torch.ones(40, dtype=torch.float64).numpy(), codes, 1)
    out = torch.full((40,), float("nan"))
    with pytest.raises(ValueError, match="values: expected 3 entries"):
        _C.mask_expand(codes, torch.ones(4).numpy(), out.numpy(), 1)
    with pytest.raises(TypeError, match="out: expected the dtype of values"):
        _C.mask_expand(codes, torch.ones(3).numpy(), torch.zeros(40, dtype=torch.int16).numpy(), 1)
    buf = torch.zeros(43)
    with pytest.raises(ValueError, match="out: shares memory with values"):
        _C.mask_expand(codes, buf[38:41].numpy(), buf[:40].numpy(), 1)
    assert torch.isnan(out).all(), "a refused call wrote its output"


# ---- the layer ----


def _saved(fn):
    """(the result, [tensors saved for backward that are not Parameters])"""
    saved = []

    def pack(t):
        if not isinstance(t, torch.nn.Parameter):
            saved.append(t)
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = fn()
    return out, saved


def _grads(layer, x, dy, compress, monkeypatch):
    monkeypatch.setattr(autograd_act, "_compresses", COMPRESSES if compress else (lambda *a: False))
    layer.zero_grad(set_to_none=True)
    xr = x.detach().clone().requires_grad_(True)
    y = layer(xr)
    y.backward(dy)
    return y.detach(), xr.grad, layer.weight.grad, layer.bias.grad


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("B,in_f,out_f,zeros", [(1, 37, 3, 0.5), (3, 1000, 37, 0.9), (37, 64, 1, 0.0),
                                                (8, 3, 5, 1.0), (64, 256, 100, 0.99)])
def test_relu_layer_saves_the_mask_and_values_and_gets_the_same_gradients(B, in_f, out_f, zeros, dtype, monkeypatch):
    layer = ActivationSparseLinear.from_dense(torch.nn.Linear(in_f, out_f), mode="relu").to(dtype)
    x = torch.randn(B, in_f).to(dtype)  # the layer's relu makes the zeros: negatives as well as exact ones
    x[torch.rand(B, in_f) < zeros] = 0
    dy = torch.randn(B, out_f).to(dtype)
    want = _grads(layer, x, dy, False, monkeypatch)
    got = _grads(layer, x, dy, True, monkeypatch)
    for name, a, b in zip(("y", "dx", "dweight", "dbias"), got, want):
        assert torch.equal(a, b), f"{name} differs from the layer that saves x"
    _, saved = _saved(lambda: layer(x.clone().requires_grad_(True)))
    active = int((x > 0).sum())
    params = {p.untyped_storage().data_ptr() for p in layer.parameters()}
    big = [t for t in saved if t.dim() > 0 and t.untyped_storage().data_ptr() not in params]  # not Wᵀ
    assert sum(t.numel() * t.element_size() for t in big) == (B * in_f + 31) // 32 * 4 + active * x.element_size()
    assert all(t.data_ptr() != x.data_ptr() for t in saved)


def test_non_contiguous_input_and_a_positive_threshold(monkeypatch):
    layer = ActivationSparseLinear.from_dense(torch.nn.Linear(40, 9), mode="relu")
    layer.threshold.fill_(0.5)  # active: x > 0.5
    x = torch.randn(40, 6).t()
    dy = torch.randn(6, 9)
    want = _grads(layer, x, dy, False, monkeypatch)
    got = _grads(layer, x, dy, True, monkeypatch)
    for a, b in zip(got, want):
        assert torch.equal(a, b)


def test_threshold_modes_still_save_the_input():
    layer = ActivationSparseLinear.from_dense(torch.nn.Linear(16, 4), sparsity=0.5, mode="tensor")
    layer.calibrate(torch.randn(64, 16))
    x = torch.randn(8, 16, requires_grad=True)
    _, saved = _saved(lambda: layer(x))
    assert any(t is x or t.data_ptr() == x.data_ptr() for t in saved)


def _first_layer(kind):
    torch.manual_seed(0)
    if kind == "sparse-csr":
        return SparseLinear.from_dense(torch.nn.Linear(24, 96), sparsity=0.5, activation="relu", act_bits=1)
    if kind == "sparse-nm":
        return SparseLinear.from_dense(torch.nn.Linear(24, 96), pattern="2:4", activation="relu", act_bits=1)
    return torch.nn.Sequential(torch.nn.Linear(24, 96), sparseops.nn.FewBitReLU(bits=1))


@needs_cpp
@pytest.mark.parametrize("kind", ["sparse-csr", "sparse-nm", "fewbit-relu"])
@pytest.mark.parametrize("lead", [(10,), (2, 5)], ids=["2d", "3d"])
def test_the_relu_codes_are_saved_once_for_both_layers(kind, lead, monkeypatch):
    first = _first_layer(kind)
    second = ActivationSparseLinear.from_dense(torch.nn.Linear(96, 7), mode="relu")
    x = torch.randn(*lead, 24, requires_grad=True)
    y, saved = _saved(lambda: second(first(x)))
    codes = [t for t in saved if t.dtype == torch.int32 and t.numel() == (x.numel() // 24 * 96 + 31) // 32]
    assert len(codes) == 2 and codes[0] is codes[1], "the second layer packed a mask of its own"
    # and the gradients are those of the same model without the sharing
    y.backward(torch.ones_like(y))
    got = x.grad.clone()
    monkeypatch.setattr(autograd_saved, "relu_codes", lambda t: None)
    x.grad = None
    second(first(x)).backward(torch.ones_like(y))
    assert torch.equal(got, x.grad)


@needs_cpp
def test_the_codes_are_not_shared_after_an_in_place_change_or_for_part_of_the_output():
    first = _first_layer("sparse-csr")
    second = ActivationSparseLinear.from_dense(torch.nn.Linear(96, 7), mode="relu")
    x = torch.randn(10, 24, requires_grad=True)

    def changed():
        h = first(x) * 1  # a new tensor: nothing recorded on it
        return second(h)

    def bumped():
        h = first(x)
        with torch.no_grad():
            h.clamp_(max=0.5)  # same tensor, new version: its mask may have changed
        return second(h)

    for fn in (changed, bumped):
        _, saved = _saved(fn)
        codes = [t for t in saved if t.dtype == torch.int32 and t.numel() == (10 * 96 + 31) // 32]
        assert len(codes) == 2 and codes[0] is not codes[1]
    h = first(x)
    part = ActivationSparseLinear.from_dense(torch.nn.Linear(48, 7), mode="relu")
    _, saved = _saved(lambda: part(h[:, :48]))  # the first 48 of each row: not the whole output
    codes = [t for t in saved if t.dtype == torch.int32]
    assert codes and all(c is not h._sparseops_relu_codes[0] for c in codes)


def test_compiled_model_matches_eager():
    first = _first_layer("sparse-csr")
    second = ActivationSparseLinear.from_dense(torch.nn.Linear(96, 7), mode="relu")
    model = torch.nn.Sequential(first, second)
    x = torch.randn(6, 24, requires_grad=True)
    eager = model(x)
    eager.sum().backward()
    gx = x.grad.clone()
    x.grad = None
    compiled = torch.compile(model, fullgraph=True)(x)
    compiled.sum().backward()
    torch.testing.assert_close(compiled, eager)
    torch.testing.assert_close(x.grad, gx)


# ---- over a SparseLinear: the SparseLinear keeps s(x) compressed (autograd.saved) ----

PATTERNS = {"csr": dict(sparsity=0.7), "nm": dict(pattern="2:4"), "fanin": dict(pattern=sparseops.FanIn(5)),
            "block": dict(pattern=sparseops.Block(16), sparsity=0.5)}


def _over_sparse(kind, in_f, out_f, activation=None):
    torch.manual_seed(1)
    sp = SparseLinear.from_dense(torch.nn.Linear(in_f, out_f), **PATTERNS[kind],
                                 **({} if activation is None else dict(activation=activation, act_bits=1)))
    return ActivationSparseLinear.from_dense(sp, mode="relu")


def _grads_sparse(layer, x, dy, compress, monkeypatch):
    """The layer's forward and gradients; without ``compress``, those of the plain composition it stands for:
    the SparseLinear on ``act_mask(x)`` (torch's relu and where keep what they keep, the SparseLinear s(x))."""
    from sparseops.reference.act import act_mask

    layer.zero_grad(set_to_none=True)
    xr = x.detach().clone().requires_grad_(True)
    if compress:
        y, saved = _saved(lambda: layer(xr))
    else:
        y, saved = _saved(lambda: layer.sparse(act_mask(xr, layer.threshold, True)[0]))
    y.backward(dy)
    return (y.detach(), xr.grad, layer.sparse.values.grad, layer.sparse.bias.grad), saved


@pytest.mark.parametrize("kind", list(PATTERNS))
@pytest.mark.parametrize("B,in_f,out_f", [(1, 32, 3), (5, 64, 37), (37, 48, 16)])
def test_over_a_sparse_linear_the_input_is_kept_compressed(kind, B, in_f, out_f, monkeypatch):
    layer = _over_sparse(kind, in_f, out_f)
    x = torch.randn(B, in_f)
    dy = torch.randn(B, out_f)
    want, plain = _grads_sparse(layer, x, dy, False, monkeypatch)
    got, saved = _grads_sparse(layer, x, dy, True, monkeypatch)
    for name, a, b in zip(("y", "dx", "dvalues", "dbias"), got, want):
        assert torch.equal(a, b), f"{name} differs from the layer that saves s(x)"
    shapes = [tuple(t.shape) for t in saved if t.is_floating_point()]
    assert (B, in_f) in [tuple(t.shape) for t in plain] and (B, in_f) not in shapes
    assert (int((x > 0).sum()),) in shapes


def _same_grads(layer, x, dy, monkeypatch) -> list:
    """Asserts the layer's output and gradients equal the plain composition's; returns the float shapes saved."""
    want, _ = _grads_sparse(layer, x, dy, False, monkeypatch)
    got, saved = _grads_sparse(layer, x, dy, True, monkeypatch)
    for a, b in zip(got, want):
        assert torch.equal(a, b)
    return [tuple(t.shape) for t in saved if t.is_floating_point()]


def test_over_a_padded_block_layer_the_input_is_kept_compressed(monkeypatch):
    layer = _over_sparse("block", 40, 16)  # 40 inputs: blocks of 16 pad them to 48 inside the op
    shapes = _same_grads(layer, torch.randn(3, 40), torch.randn(3, 16), monkeypatch)
    assert (3, 40) not in shapes and (3, 48) not in shapes


@needs_cpp
@pytest.mark.parametrize("kind", ["csr", "nm", "block"])
def test_over_a_sparse_linear_the_relu_codes_are_shared(kind):
    first = _first_layer("sparse-csr")
    second = _over_sparse(kind, 96, 16)
    x = torch.randn(4, 24, requires_grad=True)
    _, saved = _saved(lambda: second(first(x)))
    codes = [t for t in saved if t.dtype == torch.int32 and t.numel() == (4 * 96 + 31) // 32]
    # the first layer's codes, s(x)'s backward and the SparseLinear's compressed input: one tensor
    assert len(codes) == 3 and all(c is codes[0] for c in codes)


def test_over_a_fused_sparse_linear_the_input_is_kept_compressed(monkeypatch):
    layer = _over_sparse("csr", 64, 24, activation="gelu")
    assert (6, 64) not in _same_grads(layer, torch.randn(6, 64), torch.randn(6, 24), monkeypatch)


@pytest.mark.parametrize("kind", ["csr", "block"])
def test_over_a_sparse_linear_non_contiguous_input_and_a_threshold(kind, monkeypatch):
    layer = _over_sparse(kind, 48, 16)
    layer.threshold.fill_(0.3)  # active: x > 0.3
    _same_grads(layer, torch.randn(48, 7).t(), torch.randn(7, 16), monkeypatch)
