"""Every SparseLinear pattern on CUDA, end to end, against an fp64 copy of the same layer on the CPU.

The kernel tests (test_kernels_*.py) check each Triton kernel; these check what a user runs: the
layer's forward, input gradient and weight gradient through the ops' CUDA dispatch, on both of
its paths for the unstructured and N:M products (the Triton kernel below
``ops._gpu.*_DENSE_MIN_ROWS`` rows, cuBLAS on the rebuilt dense weight at or above it), plus
opcheck and torch.compile on CUDA. Skipped where there is no GPU (CI has none; see bench/gpu/run.sh).
"""

import copy

import pytest
import torch
from helpers import assert_close_rms

import sparseops
from sparseops.ops import _gpu
from sparseops.patterns import NM

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")

PATTERNS = [
    pytest.param("unstructured", 0.9, id="csr90"),
    pytest.param("unstructured", 0.0, id="csr0"),
    pytest.param(NM(2, 4), None, id="2:4"),
    pytest.param(NM(1, 8), None, id="1:8"),
    pytest.param(NM(3, 5), None, id="3:5"),
    pytest.param(NM(2, 4, transposable=True), None, id="2:4T"),
    pytest.param("fanin:4", None, id="fanin4"),
    pytest.param("block:16", 0.75, id="block16"),
]


@pytest.fixture(params=["kernel", "cublas"])
def path(request, monkeypatch):
    """Run the test with the Triton kernels (threshold out of reach) or cuBLAS (threshold 1)."""
    for name in ("CSR_DENSE_MIN_ROWS", "NM_DENSE_MIN_ROWS"):
        monkeypatch.setattr(_gpu, name, 10**9 if request.param == "kernel" else 1)
    return request.param


def _layers(pattern, sparsity, in_f, out_f, dtype):
    lin = torch.nn.Linear(in_f, out_f)
    kw = {} if sparsity is None else {"sparsity": sparsity}
    cpu = sparseops.SparseLinear.from_dense(lin, pattern=pattern, **kw)
    ref = copy.deepcopy(cpu).double()
    gpu = copy.deepcopy(cpu).to("cuda", dtype)
    return ref, gpu


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("batch, in_f, out_f", [(1, 37, 100), (37, 64, 3), (300, 1000, 37)])
@pytest.mark.parametrize("pattern, sparsity", PATTERNS)
def test_layer_forward_backward(pattern, sparsity, batch, in_f, out_f, dtype, path):
    ref, gpu = _layers(pattern, sparsity, in_f, out_f, dtype)
    x = torch.randn(batch, in_f).to(dtype)
    dy = torch.randn(batch, out_f).to(dtype)
    # non-contiguous input on the GPU: every other column of a wider buffer
    xg = torch.zeros(batch, 2 * in_f, dtype=dtype, device="cuda")[:, ::2]
    xg.copy_(x)
    xg.requires_grad_(True)
    xr = x.double().requires_grad_(True)
    y, yr = gpu(xg), ref(xr)
    assert y.dtype == dtype and y.device.type == "cuda"
    assert_close_rms(y.cpu(), yr.detach(), name="y")
    y.backward(dy.cuda())
    yr.backward(dy.double())
    assert_close_rms(xg.grad.cpu(), xr.grad, name="dx")
    for (name, p), (_, pr) in zip(gpu.named_parameters(), ref.named_parameters()):
        assert p.grad is not None, name
        assert_close_rms(p.grad.cpu(), pr.grad, name=f"d{name}")


def test_dense_path_threshold_is_consulted(monkeypatch):
    # the cublas path must not call the triton products at all
    from sparseops.kernels import csr as KC

    monkeypatch.setattr(_gpu, "CSR_DENSE_MIN_ROWS", 1)
    monkeypatch.setattr(KC, "csr_dds", lambda *a, **k: pytest.fail("csr_dds kernel ran on the cublas path"))
    _, gpu = _layers("unstructured", 0.9, 64, 32, torch.float32)
    gpu(torch.randn(4, 64, device="cuda"))


@pytest.mark.parametrize("pattern", ["unstructured", "2:4"])
def test_opcheck_cuda(pattern, path):
    _, gpu = _layers(pattern, 0.5 if pattern == "unstructured" else None, 40, 24, torch.float32)
    f = gpu.format
    x = torch.randn(5, 40, device="cuda")
    if pattern == "unstructured":
        args = (x, gpu.values.detach(), f.crow, f.col, gpu.bias.detach(), 24)
        torch.library.opcheck(torch.ops.sparseops.csr_dds.default, args)
    else:
        args = (x, gpu.values.detach(), f.idx, gpu.bias.detach(), 2, 4)
        torch.library.opcheck(torch.ops.sparseops.nm_dds.default, args)


@pytest.mark.parametrize("pattern", ["unstructured", "2:4"])
def test_compile_fullgraph_cuda(pattern, path):
    _, gpu = _layers(pattern, 0.5 if pattern == "unstructured" else None, 64, 48, torch.float32)
    model = torch.nn.Sequential(gpu, torch.nn.ReLU())
    x = torch.randn(16, 64, device="cuda", requires_grad=True)
    eager = model(x)
    eager.sum().backward()
    gx = x.grad.clone()
    x.grad = None
    compiled = torch.compile(model, fullgraph=True)
    out = compiled(x)
    out.sum().backward()
    assert_close_rms(out, eager, name="y")
    assert_close_rms(x.grad, gx, name="dx")
