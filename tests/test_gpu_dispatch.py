"""The dense rebuilds behind the CUDA cuBLAS path (``ops._gpu``), checked on the CPU against each
format's own dense weight: they are plain torch, device-agnostic, so CI checks them without a GPU."""

import pytest
import torch

import sparseops
from sparseops.formats.csr import CSRWeight
from sparseops.ops import _gpu
from sparseops.ops.nm import _gather_t
from sparseops.patterns import NM


@pytest.mark.parametrize("out_f, in_f, density", [(1, 1, 1.0), (37, 53, 0.3), (3, 1000, 0.01), (37, 53, 0.0)])
def test_csr_weight(out_f, in_f, density):
    w = torch.randn(out_f, in_f)
    mask = torch.rand(out_f, in_f) < density
    if out_f > 3:
        mask[3] = False  # an empty row
        mask[:, 5 % in_f] = False  # an empty column
    f = CSRWeight.from_mask(mask)
    values = w[mask]  # row-major, the CSR order
    assert torch.equal(_gpu.csr_weight(values, f.crow, f.col, out_f, in_f), w * mask)
    assert torch.equal(_gpu.csr_weight_t(values, f.t_crow, f.t_row, f.t_perm, out_f), (w * mask).t())


@pytest.mark.parametrize(
    "pattern",
    [NM(2, 4), NM(1, 8), NM(3, 5), NM(7, 16), NM(2, 4, transposable=True)],
    ids=["2:4", "1:8", "3:5", "7:16", "2:4T"],
)
@pytest.mark.parametrize("in_f", [37, 64])  # 37: the last group is padded
def test_nm_weight(pattern, in_f):
    lin = torch.nn.Linear(in_f, 24)
    layer = sparseops.SparseLinear.from_dense(lin, pattern=pattern)
    f, v = layer.format, layer.values.detach()
    dense = layer.dense_weight().detach()
    assert torch.equal(_gpu.nm_weight(v, f.idx, f.n, f.m, in_f), dense)
    if f.transposable:
        assert torch.equal(_gpu.nm_weight(_gather_t(v, f.t_slot), f.t_idx, f.n, f.m, 24), dense.t())


def test_thresholds():
    assert not _gpu.use_dense(_gpu.CSR_DENSE_MIN_ROWS - 1, "csr") and _gpu.use_dense(_gpu.CSR_DENSE_MIN_ROWS, "csr")
    assert not _gpu.use_dense(_gpu.NM_DENSE_MIN_ROWS - 1, "nm") and _gpu.use_dense(_gpu.NM_DENSE_MIN_ROWS, "nm")


# --------------------------------------------------------------------------- the eager CUDA shortcut
# The autograd layer runs a triton_op's body itself on eager CUDA calls (ops.csr._eager_cuda): the body
# must run as the op's own eager call runs it, with torch's wrap_triton switch off (on, each launch goes
# through a higher-order op whose eager dispatch costs ~0.3 ms), and only where no dispatch mode is active.


def test_body_runs_with_wrap_triton_off():
    from torch._library.triton import is_wrap_triton_enabled

    from sparseops.ops.csr import triton_op

    seen = []

    @triton_op("sparseops_test::probe_wrap_triton")
    def probe(x: torch.Tensor) -> torch.Tensor:
        seen.append(is_wrap_triton_enabled())
        return x.clone()

    x = torch.randn(3)
    assert torch.equal(probe.body(x), x)
    probe(x)  # the op's own eager call, for comparison
    assert seen == [False, False]
    assert is_wrap_triton_enabled()  # restored after the body


def test_eager_cuda_only_for_plain_eager_cuda_calls():
    from torch._subclasses.fake_tensor import FakeTensorMode

    from sparseops.ops.csr import _eager_cuda

    assert not _eager_cuda(torch.randn(2))  # a CPU tensor
    assert _eager_cuda(torch.empty(2, device="meta")) is False
    with FakeTensorMode() as mode:
        fake = mode.from_tensor(torch.randn(2))
        assert not _eager_cuda(fake)  # a dispatch mode is active: the call goes through the op
    if torch.cuda.is_available():
        assert _eager_cuda(torch.randn(2, device="cuda"))


def test_every_eager_cuda_shortcut_names_a_triton_op_body():
    # the entry points call op.body on eager CUDA calls: each op they name must be a triton_op made by
    # ops.csr.triton_op (a plain custom_op has no body; the CPU-only CI would not reach the line)
    import re
    from pathlib import Path

    import sparseops.ops as ops_pkg

    found = 0
    for path in Path(ops_pkg.__file__).parent.glob("*.py"):
        src = path.read_text()
        module = __import__(f"sparseops.ops.{path.stem}", fromlist=["_"])
        for name in re.findall(r"return (\w+)\.body\(", src):
            op = getattr(module, name)
            assert callable(getattr(op, "body", None)), f"{path.name}: {name} has no body"
            found += 1
    assert found >= 15
