"""bf16 / fp16 layers on CPU: forward and both gradients against fp64 autograd on the same weights.

The products run the C++ kernels (fp32 copies of the 16-bit operands, or the 16-bit weight read natively by the
activation-sparse decode kernel); the oracle is the dense fp64 computation from the very same 16-bit values.
"""

import pytest
import torch
import torch.nn.functional as F
from helpers import assert_close_rms
from torch import nn

from sparseops import ActivationSparseLinear, Block, SparseLinear
from sparseops._cpp import _C

pytestmark = pytest.mark.skipif(_C is None, reason="sparseops._C is not built")

DTYPES = [torch.bfloat16, torch.float16]


def _fp64_step(layer, x, dy):
    """(y, dx, dweight) of the dense fp64 layer with the 16-bit layer's weight."""
    w = layer.to_dense().weight.detach().double().requires_grad_(True)
    b = layer.bias.detach().double() if layer.bias is not None else None
    xd = x.detach().double().requires_grad_(True)
    y = F.linear(xd, w, b)
    y.backward(dy.double())
    return y, xd.grad, w.grad


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("pattern", ["unstructured", "2:4", "2:4t", Block(8)], ids=str)
@pytest.mark.parametrize("batch", [1, 37])
def test_sparse_linear_16bit_matches_fp64(isa, dtype, pattern, batch):
    torch.manual_seed(0)
    dense = nn.Linear(64, 40)
    kw = {} if pattern in ("2:4", "2:4t") else {"sparsity": 0.75}
    layer = SparseLinear.from_dense(dense, pattern=pattern, **kw).to(dtype)
    x = torch.randn(batch, 64).to(dtype).requires_grad_(True)
    dy = torch.randn(batch, 40).to(dtype)
    y = layer(x)
    assert y.dtype == dtype
    y.backward(dy)
    y_ref, dx_ref, dw_ref = _fp64_step(layer, x, dy)
    assert_close_rms(y, y_ref, dtype, name="y")
    assert_close_rms(x.grad, dx_ref, dtype, name="dx")
    assert layer.values.grad.dtype == dtype
    # the weight gradient, scattered to dense through the layer's own layout (values <- their gradient)
    with torch.no_grad():
        saved = layer.values.detach().clone()
        layer.values.copy_(layer.values.grad)
        dense_grad = layer.to_dense().weight.double()
        layer.values.copy_(saved)
    assert_close_rms(dense_grad, dw_ref * layer.mask.double(), dtype, name="dW on the mask")


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("batch", [1, 8, 33])
def test_activation_sparse_linear_16bit_matches_fp64(isa, dtype, batch):
    torch.manual_seed(1)
    dense = nn.Linear(96, 50)
    layer = ActivationSparseLinear.from_dense(dense, sparsity=0.7, mode="tensor")
    layer.calibrate(torch.randn(256, 96))
    layer = layer.to(dtype)
    x = torch.randn(batch, 96).to(dtype)
    with torch.no_grad():
        y = layer(x)
    assert y.dtype == dtype
    thr = layer.threshold.double()
    xs = torch.where(x.double().abs() > thr, x.double(), 0.0)
    ref = F.linear(xs, layer.weight.double(), layer.bias.double())
    assert_close_rms(y, ref, dtype, name="y")


def test_staging_buffers_are_distinct_per_argument_and_per_thread(isa):
    # x and dy of one size (2^18 elements each, the smallest size that is staged): each argument needs its own
    # fp32 buffer, and two threads must not share one
    import threading

    import sparseops.ops.csr as ops_csr
    from sparseops.formats import CSRWeight

    torch.manual_seed(2)
    n = 512
    fmt = CSRWeight.from_mask(torch.rand(n, n) > 0.9)
    results, errors = {}, []

    def work(seed):
        try:
            g = torch.Generator().manual_seed(seed)
            x = torch.randn(n, n, generator=g).to(torch.bfloat16)
            dy = torch.randn(n, n, generator=g).to(torch.bfloat16)
            v = torch.randn(fmt.nnz, generator=g).to(torch.bfloat16)
            for _ in range(3):
                dx, dv = ops_csr._csr_backward_cpu(dy, x, v, fmt.crow, fmt.col, fmt.row, fmt.t_crow, fmt.t_row,
                                                   fmt.t_perm)
            w = torch.zeros(n, n, dtype=torch.float64)
            w[fmt.row.long(), fmt.col.long()] = v.double()
            results[seed] = (dx, dv, dy.double() @ w, (dy.double().T @ x.double())[fmt.row.long(), fmt.col.long()])
        except Exception as e:  # noqa: BLE001 - reported below
            errors.append(e)

    threads = [threading.Thread(target=work, args=(s,)) for s in (1, 2, 3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors
    for dx, dv, dx_ref, dv_ref in results.values():
        assert_close_rms(dx, dx_ref, torch.bfloat16, name="dx")
        assert_close_rms(dv, dv_ref, torch.bfloat16, name="dvalues")


@pytest.mark.parametrize("pattern", ["unstructured", "2:4", Block(8)], ids=str)
def test_inference_mode_then_training_then_inference_mode(isa, pattern):
    # the staging pool is shared by calls in and out of inference_mode: a buffer made inside it is an
    # inference tensor, which refuses the in-place copy of a later ordinary call (and the other way round)
    torch.manual_seed(3)
    kw = {} if pattern == "2:4" else {"sparsity": 0.9}
    layer = SparseLinear.from_dense(nn.Linear(1024, 16), pattern=pattern, **kw).to(torch.bfloat16)
    x = torch.randn(256, 1024).to(torch.bfloat16)  # 2^18 elements: staged
    with torch.inference_mode():
        y0 = layer(x)
    xg = x.clone().requires_grad_(True)
    y = layer(xg)
    y.backward(torch.ones_like(y))
    assert xg.grad is not None and layer.values.grad is not None
    with torch.inference_mode():
        y1 = layer(x)
    assert torch.equal(y0, y1) and torch.equal(y.detach(), y0)
    y_ref, _, _ = _fp64_step(layer, x, torch.ones_like(y, dtype=torch.float64))
    assert_close_rms(y1, y_ref, torch.bfloat16, name="y")
