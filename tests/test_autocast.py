"""``torch.autocast`` on the sparse layers, as on ``nn.Linear``: under autocast a layer casts its input and
parameters to the autocast dtype (the casts are differentiable: fp32 parameters get fp32 gradients) and
returns that dtype. The result and every gradient equal those of a twin layer kept in that dtype and fed the
cast input, bit for bit."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

import sparseops
from helpers import weight_sparse_layers

_LAYERS = {
    **weight_sparse_layers(),
    "butterfly": lambda: sparseops.SparseLinear.from_dense(nn.Linear(64, 64), pattern=sparseops.Butterfly(block=8, rank=4)),
    "fused-gelu": lambda: sparseops.SparseLinear(64, 24, sparsity=0.8, activation="gelu", act_bits=2),
    "nm-relu": lambda: sparseops.SparseLinear(64, 24, pattern="2:4", activation="relu"),
    "monarch": lambda: sparseops.nn.MonarchLinear.from_dense(nn.Linear(64, 64), nblocks=4),
    "act-tensor": lambda: sparseops.ActivationSparseLinear.from_dense(nn.Linear(64, 24), sparsity=0.5, mode="tensor"),
    "act-relu-over-csr": lambda: sparseops.ActivationSparseLinear.from_dense(
        sparseops.SparseLinear.from_dense(nn.Linear(64, 24), sparsity=0.8), mode="relu"),
}


def _make(kind):
    torch.manual_seed(0)
    layer = _LAYERS[kind]()
    if kind == "act-tensor":
        layer.calibrate(torch.randn(256, 64))
    return layer


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("batch", [1, 37])
@pytest.mark.parametrize("kind", sorted(_LAYERS))
def test_layer_under_autocast_equals_its_twin_in_that_dtype(isa, kind, batch, dtype):
    layer = _make(kind)
    twin = copy.deepcopy(layer).to(dtype)
    x = torch.randn(batch, layer.in_features).relu_() if "relu" in kind else torch.randn(batch, layer.in_features)
    x.requires_grad_(True)
    with torch.autocast("cpu", dtype=dtype):
        y = layer(x)
    assert y.dtype == dtype
    dy = torch.randn(y.shape).to(dtype)
    y.backward(dy)
    xt = x.detach().to(dtype).requires_grad_(True)
    yt = twin(xt)
    yt.backward(dy)
    assert torch.equal(y, yt)
    assert x.grad.dtype == torch.float32 and torch.equal(x.grad, xt.grad.float())
    for (name, p), pt in zip(layer.named_parameters(), twin.parameters()):
        assert p.dtype == torch.float32, name
        if pt.grad is None:
            assert p.grad is None, name
        else:
            assert p.grad.dtype == torch.float32 and torch.equal(p.grad, pt.grad.float()), name


@pytest.mark.parametrize("kind", ["csr", "2:4", "block", "monarch", "act-tensor", "fused-gelu"])
def test_dense_then_sparse_model_under_autocast_and_compiled(kind):
    # the reviewers' case: an autocast nn.Linear hands a bf16 activation to an fp32 sparse layer (before,
    # a TypeError naming the dtypes); the compiled model gives the same output
    torch._dynamo.reset()  # (every test's Sequential shares one code object: a fresh recompile budget)
    layer = _make(kind)
    net = nn.Sequential(nn.Linear(32, layer.in_features), nn.ReLU(), layer)
    x = torch.randn(5, 32)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = net(x)
        yc = torch.compile(net, fullgraph=True, backend="aot_eager")(x)
    assert y.dtype == torch.bfloat16 and torch.equal(y, yc)
    y.float().sum().backward()
    assert all(p.grad is not None and p.grad.dtype == torch.float32 for p in layer.parameters())


def test_autocast_leaves_float64_alone_and_off_changes_nothing():
    layer = _make("csr")
    x = torch.randn(3, 64)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        with torch.autocast("cpu", enabled=False):
            y_off = layer(x)
        with pytest.raises(TypeError, match="^x: expected dtype torch.bfloat16"):
            layer(x.double())  # fp64 is not cast (as autocast does), so it meets the bf16 weight
    assert y_off.dtype == torch.float32 and torch.equal(y_off, layer(x))
    d = copy.deepcopy(layer).double()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y64 = d(x.double())  # an fp64 layer on fp64 input: nothing is cast
    assert y64.dtype == torch.float64 and torch.equal(y64, d(x.double()))


def test_inference_under_autocast_casts_each_parameter_once_and_sees_updates():
    # decoding token by token under autocast: the bf16 copy of the weights is made once (as torch caches a
    # leaf's cast within a region), made again after an in-place change, and dropped once autocast is off
    layer = _make("csr")
    x = torch.randn(1, 64)
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        y1 = layer(x)
        first = layer._autocast_cache["values"][-1]
        y2 = layer(x)
        assert layer._autocast_cache["values"][-1] is first and torch.equal(y1, y2)
        layer.values.mul_(2)  # an optimizer step or an edit: the version moves
        y3 = layer(x)
        assert layer._autocast_cache["values"][-1] is not first
        layer.update_mask_(layer.mask)  # a new Parameter under the same name: cast afresh
        assert torch.equal(layer(x), y3) and layer._autocast_cache["values"][0] is layer.values
    twin = copy.deepcopy(layer).to(torch.bfloat16)
    assert torch.equal(y3, twin(x.to(torch.bfloat16)))
    with torch.no_grad():
        layer(x)
    assert "_autocast_cache" not in layer.__dict__
    with torch.autocast("cpu", dtype=torch.bfloat16):  # recording a gradient: cast each call, nothing kept
        layer(x.requires_grad_(True)).float().sum().backward()
    assert "_autocast_cache" not in layer.__dict__ and layer.values.grad is not None


def test_autocast_cache_and_inference_mode():
    # a cast cached under inference_mode is an inference tensor, which autograd cannot save: it is not used
    # when a gradient is recorded later; parameters made under inference_mode (no version counter) are cast
    # each call; a call that records a gradient drops the copy an earlier inference call kept
    layer = _make("csr").requires_grad_(False)
    x = torch.randn(2, 64)
    with torch.inference_mode(), torch.autocast("cpu", dtype=torch.bfloat16):
        y0 = layer(x)
    xg = x.clone().requires_grad_(True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = layer(xg)
    y.float().sum().backward()
    assert torch.equal(y.detach(), y0) and xg.grad is not None
    with torch.inference_mode():
        built = _make("csr")
    with torch.inference_mode(), torch.autocast("cpu", dtype=torch.bfloat16):
        assert built(x).dtype == torch.bfloat16
    trained = _make("csr")
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        trained(x)
    assert "values" in trained._autocast_cache
    with torch.autocast("cpu", dtype=torch.bfloat16):
        trained(x.requires_grad_(True)).float().sum().backward()
    assert "values" not in trained._autocast_cache
