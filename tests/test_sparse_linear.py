"""SparseLinear, its autograd, sparsify_ and the magnitude masks, against fp64 dense nn.Linear."""

import copy
import math

import pytest
import torch
from helpers import assert_close_rms
from torch import nn

import sparseops
from sparseops import SparseLinear, sparsify_
from sparseops.autograd import sparse_linear
from sparseops.masks import global_magnitude, magnitude



def _dense_pair(in_f, out_f, sparsity, bias=True, dtype=torch.float32):
    """A SparseLinear made from a random nn.Linear and mask, plus the fp64 dense weight and bias."""
    linear = nn.Linear(in_f, out_f, bias=bias, dtype=dtype)
    mask = torch.rand(out_f, in_f) >= sparsity
    layer = SparseLinear.from_dense(linear, mask=mask)
    w = (linear.weight.detach() * mask).double().requires_grad_()  # [out, in]
    b = linear.bias.detach().double().requires_grad_() if bias else None  # [out]
    return layer, mask, w, b


def _layer_case(lead, in_f, out_f, sparsity, bias=True):
    tag = "x".join(map(str, lead))
    return pytest.param(lead, in_f, out_f, sparsity, bias, id=f"lead{tag}-in{in_f}-out{out_f}-sp{sparsity}" + ("" if bias else "-nobias"))


LAYER_CASES = [
    _layer_case((1,), 37, 3, 0.5),
    _layer_case((5,), 37, 37, 0.0),
    _layer_case((2, 3), 1000, 37, 0.99),
    _layer_case((4, 5), 37, 1000, 0.5),
    _layer_case((2, 3, 7), 3, 37, 0.5),
    _layer_case((37,), 1, 1, 0.0),
    _layer_case((9,), 37, 37, 0.99, bias=False),
    _layer_case((64,), 1000, 37, 0.5),
    _layer_case((1, 1, 1), 37, 3, 0.5),
]


# ---- autograd ----


@pytest.mark.parametrize("x_shape", [(3, 7), (2, 3, 7)], ids=["2d", "3d"])
def test_sparse_linear_gradcheck(x_shape):
    layer = SparseLinear(7, 5, sparsity=0.5, dtype=torch.float64)
    index = layer.format.tensors()
    x = torch.randn(*x_shape, dtype=torch.float64, requires_grad=True)
    values = layer.values.detach().clone().requires_grad_()
    bias = layer.bias.detach().clone().requires_grad_()
    assert torch.autograd.gradcheck(lambda x, v, b: sparse_linear(x, v, index, b, 5, 7), (x, values, bias))


@pytest.mark.parametrize("lead,in_f,out_f,sparsity,bias", LAYER_CASES)
def test_sparse_linear_matches_dense_linear(isa, lead, in_f, out_f, sparsity, bias):
    layer, mask, w, b = _dense_pair(in_f, out_f, sparsity, bias)
    x = torch.randn(*lead, in_f, requires_grad=True)
    g = torch.randn(*lead, out_f)  # upstream gradient
    y = layer(x)
    (y * g).sum().backward()

    x64 = x.detach().double().requires_grad_()
    y64 = nn.functional.linear(x64, w, b)
    (y64 * g.double()).sum().backward()

    assert_close_rms(y, y64, torch.float32, name="y")
    assert_close_rms(x.grad, x64.grad, torch.float32, name="dx")
    # the sparse gradient is compared on the mask, in the order of layer.values
    assert_close_rms(layer.values.grad, w.grad[layer.row.long(), layer.col.long()], torch.float32, name="dvalues")
    if bias:
        assert_close_rms(layer.bias.grad, b.grad, torch.float32, name="dbias")


def test_sparse_linear_backward_of_sum(isa):
    """``y.sum()`` hands the backward a broadcast dy (stride 0)."""
    layer, mask, w, b = _dense_pair(37, 11, 0.5)
    x = torch.randn(17, 37, requires_grad=True)
    layer(x).sum().backward()
    x64 = x.detach().double().requires_grad_()
    nn.functional.linear(x64, w, b).sum().backward()
    assert_close_rms(x.grad, x64.grad, torch.float32, name="dx")
    assert_close_rms(layer.values.grad, w.grad[layer.row.long(), layer.col.long()], torch.float32, name="dvalues")
    assert_close_rms(layer.bias.grad, b.grad, torch.float32, name="dbias")


def test_sparse_linear_values_follow_the_mask_in_row_major_order():
    linear = nn.Linear(13, 9)
    mask = torch.rand(9, 13) >= 0.5
    layer = SparseLinear.from_dense(linear, mask=mask)
    assert torch.equal(layer.values.detach(), linear.weight.detach()[mask])


def test_sparse_linear_only_needed_grads():
    layer = SparseLinear(7, 5, sparsity=0.5)
    layer.values.requires_grad_(False)
    x = torch.randn(3, 7, requires_grad=True)
    layer(x).sum().backward()
    assert layer.values.grad is None and x.grad is not None and layer.bias.grad is not None


# ---- training keeps the pattern ----


def test_sparse_linear_adamw_keeps_off_mask_weights_zero(isa):
    torch.manual_seed(0)
    layer = SparseLinear(37, 11, sparsity=0.7)
    mask = layer.mask.clone()
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
    after = layer.to_dense().weight.detach()
    assert (after[~mask] == 0).all()
    assert torch.equal(layer.mask, mask)
    assert not torch.equal(layer.values.detach(), start)
    assert_close_rms(after, dense.weight.detach(), tol=1e-4, name="weight after AdamW")


# ---- state_dict, moving, copying ----


def test_sparse_linear_state_dict_round_trip(isa):
    a = SparseLinear(37, 11, sparsity=0.5)
    sd = a.state_dict()
    assert set(sd) == {"values", "bias", "crow", "col", "dense_shape"}
    b = SparseLinear(37, 11, sparsity=0.9)
    assert b.nnz != a.nnz
    b.load_state_dict(sd)
    assert b.nnz == a.nnz and torch.equal(b.mask, a.mask)
    for name, t in a.format.tensors().items():
        assert torch.equal(getattr(b, name), t), name
    x = torch.randn(5, 37, requires_grad=True)
    ya, yb = a(x), b(x)
    assert torch.equal(ya, yb)
    # the rebuilt transposed index drives the backward
    ga = torch.autograd.grad(ya.sum(), (x, a.values))
    gb = torch.autograd.grad(yb.sum(), (x, b.values))
    assert torch.equal(ga[0], gb[0]) and torch.equal(ga[1], gb[1])


def test_sparse_linear_load_state_dict_other_out_features_fails():
    a = SparseLinear(37, 11, sparsity=0.5)
    b = SparseLinear(37, 12, sparsity=0.5)
    before = copy.deepcopy(b.state_dict())
    with pytest.raises(RuntimeError, match="out_features=12"):
        b.load_state_dict(a.state_dict())
    for k, v in b.state_dict().items():
        assert torch.equal(v, before[k]), k


def test_sparse_linear_load_state_dict_fewer_in_features_fails():
    a = SparseLinear(37, 11, sparsity=0.0)
    b = SparseLinear(20, 11, sparsity=0.0)
    with pytest.raises(RuntimeError, match=r"in_features=20"):
        b.load_state_dict(a.state_dict())


def test_sparse_linear_load_state_dict_more_in_features_fails():
    a = SparseLinear(20, 11, sparsity=0.5)
    b = SparseLinear(37, 11, sparsity=0.5)
    with pytest.raises(RuntimeError, match="in_features"):
        b.load_state_dict(a.state_dict())


def test_sparse_linear_to_float64_and_cpu():
    layer = SparseLinear(37, 11, sparsity=0.5)
    w = layer.dense_weight().detach().double()
    b = layer.bias.detach().double()
    for moved in (copy.deepcopy(layer).to(torch.float64), copy.deepcopy(layer).double()):
        assert moved.values.dtype == moved.bias.dtype == torch.float64
        assert all(t.dtype == torch.int32 for t in moved.format.tensors().values())
        x = torch.randn(5, 37, dtype=torch.float64)
        y = moved(x)
        assert y.dtype == torch.float64
        assert_close_rms(y, x @ w.T + b, torch.float64, name="y")
    on_cpu = layer.to("cpu")
    assert on_cpu.values.device.type == "cpu"
    assert all(t.device.type == "cpu" for t in on_cpu.format.tensors().values())


def test_sparse_linear_deepcopy():
    layer = SparseLinear(37, 11, sparsity=0.5)
    twin = copy.deepcopy(layer)
    x = torch.randn(4, 37)
    assert torch.equal(twin(x), layer(x))
    with torch.no_grad():
        twin.values.add_(1.0)
    assert not torch.equal(twin(x), layer(x))
    assert twin.values.data_ptr() != layer.values.data_ptr()


# ---- construction ----


def test_sparse_linear_from_dense_keeps_top_magnitudes():
    linear = nn.Linear(40, 30)
    layer = SparseLinear.from_dense(linear, sparsity=0.9)
    w = linear.weight.detach()
    k = w.numel() - round(0.9 * w.numel())
    expected = torch.zeros(w.numel(), dtype=torch.bool)
    expected[torch.topk(w.abs().flatten(), k).indices] = True
    assert torch.equal(layer.mask, expected.view_as(w))
    assert torch.equal(layer.values.detach(), w[expected.view_as(w)])
    assert torch.equal(layer.bias.detach(), linear.bias.detach())
    assert layer.bias.data_ptr() != linear.bias.data_ptr()
    assert torch.equal(layer.to_dense().weight.detach(), w * layer.mask)


def test_sparse_linear_from_dense_keeps_given_mask():
    linear = nn.Linear(13, 9, bias=False)
    m = torch.rand(9, 13) >= 0.6
    layer = SparseLinear.from_dense(linear, mask=m)
    assert layer.mask.shape == (9, 13) and layer.mask.dtype == torch.bool
    assert torch.equal(layer.mask, m)
    assert layer.bias is None and layer.to_dense().bias is None
    dense = layer.to_dense()
    assert isinstance(dense, nn.Linear) and (dense.in_features, dense.out_features) == (13, 9)
    assert torch.equal(dense.weight.detach(), linear.weight.detach() * m)


def test_sparse_linear_extra_repr():
    layer = SparseLinear(40, 30, sparsity=0.9)
    text = repr(layer)
    assert "pattern=unstructured" in text
    assert f"nnz={layer.nnz}" in text and layer.nnz == 120
    assert "sparsity=0.9000" in text


def test_sparse_linear_sparsity_zero_is_dense(isa):
    linear = nn.Linear(37, 11)
    layer = SparseLinear.from_dense(linear, sparsity=0)
    assert layer.nnz == 37 * 11 and layer.mask.all()
    x = torch.randn(6, 37)
    expected = nn.functional.linear(x.double(), linear.weight.double(), linear.bias.double())
    assert_close_rms(layer(x), expected, torch.float32, name="y")


@pytest.mark.parametrize("sparsity", [0.0, 0.25, 0.5, 0.9, 0.99])
def test_sparse_linear_constructor_sparsity(sparsity):
    layer = SparseLinear(40, 30, sparsity=sparsity)
    assert layer.nnz == 1200 - round(sparsity * 1200)
    assert layer.mask.sum() == layer.nnz
    # initialised as nn.Linear: kaiming-uniform bound 1/sqrt(in) on the weights and bias
    bound = 1 / math.sqrt(40)
    assert layer.values.abs().max() <= bound and layer.bias.abs().max() <= bound


def test_sparse_linear_device_and_dtype_arguments():
    layer = SparseLinear(7, 5, sparsity=0.5, device="cpu", dtype=torch.float64)
    assert layer.values.dtype == layer.bias.dtype == torch.float64
    assert layer.values.device.type == layer.crow.device.type == "cpu"
    assert layer.crow.dtype == torch.int32
    assert layer(torch.randn(2, 7, dtype=torch.float64)).dtype == torch.float64


def test_sparse_linear_pattern_carries_sparsity():
    layer = SparseLinear(40, 30, pattern=sparseops.Unstructured(0.75))
    assert layer.nnz == 300


@pytest.mark.filterwarnings("ignore:Initializing zero-element tensors is a no-op")
def test_sparse_linear_zero_sized_features(isa):
    linear = nn.Linear(0, 4)
    layer = SparseLinear.from_dense(linear, sparsity=0.5)
    x = torch.randn(3, 0)
    assert torch.equal(layer(x), linear(x))
    empty_out = SparseLinear(5, 0, sparsity=0.5)
    assert empty_out(torch.randn(3, 5)).shape == (3, 0)


# ---- sparsify_ ----


def _mlp(d_in=16, hidden=32, d_out=1):
    return nn.Sequential(nn.Linear(d_in, hidden), nn.ReLU(), nn.Linear(hidden, hidden), nn.ReLU(), nn.Linear(hidden, d_out))


def test_sparsify_swaps_every_linear():
    model = _mlp()
    dense = copy.deepcopy(model)
    assert sparsify_(model, 0.5) is model
    for i in (0, 2, 4):
        layer = model[i]
        assert isinstance(layer, SparseLinear)
        assert layer.nnz == dense[i].weight.numel() - round(0.5 * dense[i].weight.numel())
        assert torch.equal(layer.mask, magnitude(dense[i].weight, 0.5))
        assert torch.equal(layer.to_dense().weight, dense[i].weight * layer.mask)
        assert torch.equal(layer.bias, dense[i].bias)
    assert not any(type(m) is nn.Linear for m in model.modules())


def test_sparsify_respects_filter_fn():
    model = _mlp()
    seen = []

    def keep_last_dense(module, fqn):
        seen.append((type(module), fqn))
        return fqn != "4"

    sparsify_(model, 0.5, filter_fn=keep_last_dense)
    assert seen == [(nn.Linear, "0"), (nn.Linear, "2"), (nn.Linear, "4")]
    assert isinstance(model[0], SparseLinear) and isinstance(model[2], SparseLinear)
    assert type(model[4]) is nn.Linear


def test_sparsify_nested_modules_and_bare_linear():
    model = nn.Sequential(nn.Sequential(nn.Linear(4, 8)), nn.ModuleDict({"head": nn.Linear(8, 2)}))
    sparsify_(model, 0.5)
    assert isinstance(model[0][0], SparseLinear) and isinstance(model[1]["head"], SparseLinear)
    assert isinstance(sparsify_(nn.Linear(4, 4), 0.5), SparseLinear)


def test_sparsify_global_scope():
    model = _mlp()
    weights = [model[i].weight.detach().clone() for i in (0, 2, 4)]
    total = sum(w.numel() for w in weights)
    sparsify_(model, 0.8, scope="global")
    layers = [model[i] for i in (0, 2, 4)]
    kept = sum(layer.nnz for layer in layers)
    # exact, plus at most one rescued weight per layer that global ranking would have emptied
    assert total - round(0.8 * total) <= kept <= total - round(0.8 * total) + len(layers)
    assert len({round(layer.sparsity, 3) for layer in layers}) > 1
    # one threshold: every kept magnitude is at least every pruned one, across layers
    kept_min = min(w[layer.mask].abs().min() for w, layer in zip(weights, layers))
    pruned_max = max(w[~layer.mask].abs().max() for w, layer in zip(weights, layers))
    assert kept_min >= pruned_max


def test_sparsify_trains_regression(isa):
    torch.manual_seed(0)
    a = torch.randn(8, 2)
    x = torch.randn(256, 8)
    y = torch.sin(x @ a)
    model = nn.Sequential(nn.Linear(8, 64), nn.Tanh(), nn.Linear(64, 64), nn.Tanh(), nn.Linear(64, 2))
    sparsify_(model, 0.5)
    masks = [m.mask.clone() for m in model if isinstance(m, SparseLinear)]
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    losses = []
    for _ in range(200):
        opt.zero_grad()
        loss = (model(x) - y).pow(2).mean()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    # a generous bound: seeds 0-2 all ended below 0.6% of the initial loss
    assert losses[-1] < 0.02 * losses[0], (losses[0], losses[-1])
    assert all(torch.equal(m.mask, mk) for m, mk in zip((m for m in model if isinstance(m, SparseLinear)), masks))


# ---- torch.compile ----


def _small_model():
    return nn.Sequential(SparseLinear(16, 8, sparsity=0.5), nn.ReLU(), SparseLinear(8, 4, sparsity=0.5))


def test_sparse_linear_compile_forward_backward_aot_eager():
    torch._dynamo.reset()
    model = _small_model()
    compiled = torch.compile(model, fullgraph=True, backend="aot_eager")
    x = torch.randn(2, 5, 16)
    grads = []
    for m in (model, compiled):
        xr = x.clone().requires_grad_()
        y = m(xr)
        y.pow(2).sum().backward()
        grads.append((y.detach(), xr.grad, *(p.grad.clone() for p in model.parameters())))
        model.zero_grad()
    for e, c in zip(*grads):
        assert_close_rms(c, e.double(), torch.float32, name="compiled vs eager")
    torch._dynamo.reset()


def test_sparse_linear_compile_forward_inductor():
    torch._dynamo.reset()
    layer = SparseLinear(16, 8, sparsity=0.5)
    compiled = torch.compile(layer, fullgraph=True)
    x = torch.randn(2, 3, 16)
    with torch.no_grad():
        y = compiled(x)
        expected = x.double() @ layer.dense_weight().double().T + layer.bias.double()
    assert_close_rms(y, expected, torch.float32, name="y")
    torch._dynamo.reset()


# ---- masks ----


@pytest.mark.parametrize("numel,sparsity", [(10, 0.25), (10, 0.35), (7, 0.5), (1000, 0.999), (1, 0.0), (3, 0.9)])
def test_magnitude_keeps_exact_count_of_largest(numel, sparsity):
    w = torch.randn(numel)
    m = magnitude(w, sparsity)
    assert m.dtype == torch.bool and m.shape == w.shape
    # the exact count, but never none (3 at 0.9 rounds to 3 pruned: the guard keeps the largest)
    assert int(m.sum()) == max(numel - round(sparsity * numel), 1)
    if m.any() and (~m).any():
        assert w[m].abs().min() >= w[~m].abs().max()


def test_conversions_keep_frozen_parameters_frozen_and_the_mode():
    lin = nn.Linear(12, 6)
    lin.weight.requires_grad_(False)
    lin.eval()
    for pattern in ("unstructured", "2:4", sparseops.FanIn(3)):
        sl = SparseLinear.from_dense(lin, 0.5 if pattern == "unstructured" else None, pattern=pattern)
        assert not sl.values.requires_grad and sl.bias.requires_grad and not sl.training
        back = sl.to_dense()
        assert not back.weight.requires_grad and back.bias.requires_grad and not back.training
    model = nn.Sequential(nn.Linear(8, 8), nn.Linear(8, 4))
    for p in model[0].parameters():
        p.requires_grad_(False)
    sparsify_(model, 0.5)
    assert [p.requires_grad for p in model[0].parameters()] == [False, False]
    assert all(p.requires_grad for p in model[1].parameters())
    big = nn.Linear(32, 32)
    big.weight.requires_grad_(False)
    pixelfly = SparseLinear.from_dense(big, pattern=sparseops.Butterfly(butterfly_size=4, n_factors=2, block=8, rank=3))
    assert not any(p.requires_grad for p in (pixelfly.values, pixelfly.lr_u, pixelfly.lr_v))
    act = sparseops.ActivationSparseLinear.from_dense(lin, sparsity=0.5, mode="tensor")
    assert not act.weight.requires_grad and act.bias.requires_grad and not act.training
    back = act.to_dense()
    assert not back.weight.requires_grad and back.bias.requires_grad and not back.training


def test_no_producer_prunes_a_layer_to_nothing():
    from sparseops.masks import block_magnitude, random as random_mask, wanda

    w = torch.randn(3, 5)
    assert int(magnitude(w, 0.99).sum()) == 1 and magnitude(w, 0.99)[w.abs() == w.abs().max()].all()
    assert int(random_mask((3, 5), 0.99, generator=torch.Generator().manual_seed(0)).sum()) == 1
    assert int(block_magnitude(torch.randn(3, 3), 0.6, 8).sum()) > 0
    assert (wanda(torch.randn(5, 7), torch.ones(7), 0.99).sum(1) == 1).all()  # per row: one each
    model = nn.Sequential(nn.Linear(8, 6), nn.Linear(6, 2))
    sparseops.sparsify_(model, 0.99)
    assert all(m.nnz >= 1 for m in model), [m.nnz for m in model]
    assert sparseops.SparseLinear(10, 5, sparsity=0.99).nnz == 1


def test_magnitude_ties_go_to_lower_index():
    m = magnitude(torch.ones(2, 500), 0.5)
    assert m[0].all() and not m[1].any()
    w = torch.tensor([3.0, -1.0, 2.0, 1.0, -2.0, 1.0])
    assert magnitude(w, 0.5).tolist() == [True, False, True, False, True, False]


def test_magnitude_ranks_float64_without_rounding():
    # distinct in fp64, equal once rounded to fp32
    w = torch.tensor([1.0, 1.0 + 1e-12], dtype=torch.float64)
    assert magnitude(w, 0.5).tolist() == [False, True]


def test_global_magnitude_never_empties_a_layer():
    big = torch.randn(50, 50) * 100
    tiny = torch.randn(3, 4) * 1e-3
    masks = global_magnitude([big, tiny], 0.9)
    assert masks[1].sum() == 1 and masks[1].view(-1)[tiny.abs().argmax()]
    assert masks[0].sum() == (2500 + 12) - round(0.9 * (2500 + 12))
    assert [m.shape for m in masks] == [big.shape, tiny.shape]


@pytest.mark.parametrize("pattern", ["unstructured", "2:4", "block:8"])
def test_no_grad_forward_skips_autograd_function_and_matches(pattern, monkeypatch):
    # under no_grad (or with nothing requiring grad) the layer runs its forward op directly; the
    # output is the autograd path's, bit for bit
    from sparseops.autograd import bsr, csr, nm

    lin = torch.nn.Linear(40, 24)
    layer = sparseops.SparseLinear.from_dense(lin, pattern=pattern, sparsity=0.5 if pattern != "2:4" else None)
    x = torch.randn(3, 5, 40)
    with_grad = layer(x)
    assert with_grad.requires_grad
    for fn in (csr.SparseLinearFunction, nm.NMLinearFunction, bsr.BlockLinearFunction):
        monkeypatch.setattr(fn, "apply", lambda *a: pytest.fail("autograd.Function ran without a gradient to track"))
    with torch.no_grad():
        y = layer(x)
    assert not y.requires_grad and torch.equal(y, with_grad.detach())
    layer.requires_grad_(False)
    assert torch.equal(layer(x), with_grad.detach())  # grad mode on, but nothing requires grad


@pytest.mark.parametrize("swap", ["sparsify_", "sparsify_activations_"])
def test_tied_linear_is_left_dense_with_a_warning(swap):
    # an lm_head tied to the input embedding: a sparse copy would silently untie the two
    torch.manual_seed(0)
    model = nn.ModuleDict({"emb": nn.Embedding(10, 8), "body": nn.Linear(8, 8), "head": nn.Linear(8, 10, bias=False)})
    model["head"].weight = model["emb"].weight
    with pytest.warns(UserWarning, match=r"left head dense: its weight is shared \(emb.weight, head.weight\)"):
        if swap == "sparsify_":
            sparseops.sparsify_(model, sparsity=0.5)
        else:
            sparseops.sparsify_activations_(model, 0.5, mode="relu")
    assert type(model["head"]) is nn.Linear and model["head"].weight is model["emb"].weight
    assert type(model["body"]) is not nn.Linear  # the untied layer was swapped


def test_sparsify_again_warns_that_it_leaves_sparse_layers_alone():
    # found by review: a second sparsify_ with another sparsity or pattern changed nothing, silently
    model = nn.Sequential(nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 8))
    sparsify_(model, 0.5)
    nnz = [model[0].nnz, model[2].nnz]
    with pytest.warns(UserWarning, match=r"sparsify_: left 2 layer\(s\) already sparse as they are \(0, 2\)"):
        sparsify_(model, 0.9)
    assert [model[0].nnz, model[2].nnz] == nnz


@pytest.mark.parametrize("swap", ["sparsify_", "sparsify_activations_"])
def test_sparsify_names_linear_subclasses_it_leaves(swap):
    # a subclass may compute its own forward: it is left as it is, but no longer silently (review, 2026-11-24)
    class MyLinear(nn.Linear):
        pass

    model = nn.Sequential(MyLinear(8, 8), nn.ReLU(), nn.Linear(8, 8), nn.MultiheadAttention(8, 2))
    with pytest.warns(UserWarning, match=r"left 1 subclass\(es\) of Linear as they are \(0 \(MyLinear\)\)"):
        if swap == "sparsify_":
            sparsify_(model, 0.5)
        else:
            sparseops.sparsify_activations_(model, 0.5)
    assert type(model[0]) is MyLinear and type(model[2]) is not nn.Linear
    assert type(model[3].out_proj) is nn.modules.linear.NonDynamicallyQuantizableLinear  # MHA reads its weight


def test_sparsify_warns_when_it_swaps_nothing():
    with pytest.warns(UserWarning, match="found no Linear in the model: nothing is swapped"):
        sparsify_(nn.Sequential(nn.ReLU()), 0.5)
    # a filter_fn written with its arguments the other way round accepts nothing
    model = nn.Sequential(nn.Linear(8, 8))
    with pytest.warns(UserWarning, match=r"that filter_fn accepts \(it is called as filter_fn\(module, fqn\)\)"):
        sparsify_(model, 0.5, filter_fn=lambda fqn, mod: isinstance(mod, nn.Linear))
    assert type(model[0]) is nn.Linear


# ---- every subset of gradients, every pattern, against fp64 (review 2026-11-24: the dx-only branch) ----

_GRAD_PATTERNS = {
    "csr": lambda lin: SparseLinear.from_dense(lin, sparsity=0.6),
    "nm": lambda lin: SparseLinear.from_dense(lin, pattern="2:4"),
    "nm_t": lambda lin: SparseLinear.from_dense(lin, pattern=sparseops.NM(2, 4, transposable=True)),
    "fanin": lambda lin: SparseLinear.from_dense(lin, pattern=sparseops.FanIn(k=9)),
    "block": lambda lin: SparseLinear.from_dense(lin, pattern=sparseops.Block(8), sparsity=0.5),
    "fused_gelu": lambda lin: SparseLinear.from_dense(lin, sparsity=0.6, activation="gelu", act_bits=2),
}


@pytest.mark.parametrize("needs", [(True, False, False), (True, False, True), (False, True, False),
                                   (False, False, True), (True, True, False)],
                         ids=["x", "x+bias", "values", "bias", "x+values"])
@pytest.mark.parametrize("pattern", list(_GRAD_PATTERNS))
def test_every_subset_of_gradients_matches_fp64(isa, pattern, needs):
    need_x, need_v, need_b = needs
    torch.manual_seed(1)
    layer = _GRAD_PATTERNS[pattern](nn.Linear(40, 24))
    layer.values.requires_grad_(need_v)
    layer.bias.requires_grad_(need_b)
    # the fp64 reference: the format's own values -> dense map, differentiated by torch
    v = layer.values.detach().double().requires_grad_(need_v)
    w = layer.format.to_dense(v)
    assert torch.equal(w.float(), layer.dense_weight().detach())
    b = layer.bias.detach().double().requires_grad_(need_b)
    x = torch.randn(5, 40)
    xd = x.double().requires_grad_(need_x)
    x.requires_grad_(need_x)
    dy = torch.randn(5, 24)
    z = xd @ w.t() + b
    if pattern == "fused_gelu":  # value gelu(z), derivative the 2-bit table's q(z): what the layer computes
        from sparseops import fewbit, reference

        t = fewbit.get_table("gelu", 2)
        q = torch.tensor(t.levels, dtype=torch.float64)[
            reference.fewbit_codes(z.detach().float(), torch.tensor(t.borders, dtype=torch.float32))]
        z = torch.nn.functional.gelu(z).detach() + (z - z.detach()) * q
    z.backward(dy.double())
    layer(x).backward(dy)
    for got, want, name in ((x.grad, xd.grad, "x"), (layer.values.grad, v.grad, "values"),
                            (layer.bias.grad, b.grad, "bias")):
        if want is None:
            assert got is None, f"{name}: a gradient nobody asked for"
        else:
            assert_close_rms(got, want, name=f"{name}.grad")


@pytest.mark.parametrize("pattern", ["csr", "nm", "fanin", "block"])
def test_repacking_a_frozen_layer_keeps_it_frozen(pattern):
    torch.manual_seed(2)
    layer = _GRAD_PATTERNS[pattern](nn.Linear(40, 24))
    layer.values.requires_grad_(False)
    mask = layer.mask.clone()
    if pattern == "nm":  # another valid 2:4 mask: swap the kept and dropped pairs of the first group of each row
        mask[:, :4] = ~mask[:, :4]
    elif pattern == "block":
        mask = mask.flip(0)
    elif pattern == "fanin":
        mask = mask.flip(1)
    else:
        mask = torch.rand(24, 40) > 0.5
    layer.update_mask_(mask)
    assert torch.equal(layer.mask, mask) and not layer.values.requires_grad
    if pattern == "csr":
        layer.prune_(torch.rand(layer.nnz) > 0.3)
        assert not layer.values.requires_grad
        layer.rewire_(torch.arange(layer.nnz - 1), torch.zeros(0, dtype=torch.int64))
        assert not layer.values.requires_grad
