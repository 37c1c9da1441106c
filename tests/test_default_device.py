"""CPU layers keep working when a script sets another default device (``torch.set_default_device``, common in
LLM code): every tensor the CPU path allocates for the C++ kernels is placed on the CPU explicitly."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import sparseops
from helpers import weight_sparse_layers
from sparseops._cpp import _C

pytestmark = pytest.mark.skipif(_C is None, reason="sparseops._C is not built")

_LAYERS = {
    **weight_sparse_layers(),
    "gelu2": lambda: sparseops.SparseLinear(64, 24, sparsity=0.8, activation="gelu", act_bits=2),
    "act": lambda: sparseops.ActivationSparseLinear.from_dense(nn.Linear(64, 24), sparsity=0.5, mode="tensor"),
    "fewbit": lambda: nn.Sequential(nn.Linear(64, 24), sparseops.nn.FewBitGELU(bits=2)),
}


def _run(layer, x, dtype):
    layer = layer.to(dtype)
    xx = x.to(dtype).requires_grad_(True)
    y = layer(xx)
    y.backward(torch.ones_like(y))
    return y.detach(), xx.grad, [p.grad for p in layer.parameters()]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("kind", sorted(_LAYERS))
def test_cpu_layer_under_a_meta_default_device(kind, dtype):
    torch.manual_seed(0)
    layer = _LAYERS[kind]()
    if kind == "act":
        layer.calibrate(torch.randn(64, 64))
    x = torch.randn(4096, 64)  # 2^18 elements: a bf16 input of this size goes through the fp32 staging pool
    want = _run(layer, x, dtype)
    for p in layer.parameters():
        p.grad = None
    torch.set_default_device("meta")
    try:
        got = _run(layer, x, dtype)
    finally:
        torch.set_default_device(None)
    assert got[0].device.type == "cpu"
    assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1])
    for g, w in zip(got[2], want[2]):
        assert (g is None and w is None) or torch.equal(g, w)


def test_mask_updates_under_a_meta_default_device():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(64, 64))
    sparseops.sparsify_(model, 0.9)
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    x = torch.randn(32, 64)
    rigl = sparseops.RigL(model, opt, update_every=1, drop_fraction=0.3)
    sset = sparseops.SET(model, opt, update_every=1, drop_fraction=0.3, generator=torch.Generator().manual_seed(1))
    nnz = model[0].format.nnz
    model(x).pow(2).mean().backward()
    opt.step()
    torch.set_default_device("meta")
    try:
        rigl.update(0.3)
        sset.update(0.3)
        y = model(x)
    finally:
        torch.set_default_device(None)
    assert model[0].format.nnz == nnz and y.device.type == "cpu" and torch.isfinite(y).all()


def test_tables_and_patterns_computed_under_a_meta_default_device():
    # a few-bit table that is not shipped (custom parameters) and the transposable N:M patterns are computed
    # on first use: on the CPU, whatever the default device
    from sparseops.fewbit.table import _cached_table
    from sparseops.masks.transposable import _patterns

    _cached_table.cache_clear()
    _patterns.cache_clear()
    x = torch.randn(4, 4)
    w = torch.randn(24, 64)
    torch.set_default_device("meta")
    try:
        y = sparseops.fewbit.activation(x.requires_grad_(True), "elu", 2, alpha=0.7123)
        act = sparseops.nn.FewBitLeakyReLU(0.3123)  # a module's tensors follow the default device, as torch's
        layer = sparseops.SparseLinear(64, 24, pattern=sparseops.NM(2, 4, transposable=True), device="cpu")
        mask = sparseops.masks.transposable_nm(w, 2, 4)
    finally:
        torch.set_default_device(None)
    assert y.device.type == "cpu" and act.borders.device.type == "meta"
    assert layer.values.device.type == "cpu" and mask.device.type == "cpu"
    assert sparseops.masks.is_transposable_nm(layer.mask, 2, 4) and sparseops.masks.is_transposable_nm(mask, 2, 4)
