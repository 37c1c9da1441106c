"""The Triton few-bit kernels against the reference (the interpreter on CPU, the GPU when there is one)."""

import math

import pytest
import torch

from sparseops import reference

kernels = pytest.importorskip("sparseops.kernels.fewbit", reason="triton is not installed")

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("bits", [1, 2, 3, 4])
@pytest.mark.parametrize("shape", [(1,), (3,), (37,), (1000,), (33, 65)], ids=lambda s: "x".join(map(str, s)))
def test_triton_fewbit_pack_unpack_match_reference(dtype, bits, shape):
    x = (torch.randn(shape) * 3).to(dtype)
    x.view(-1)[: min(x.numel(), 5)] = torch.tensor([float("nan"), float("inf"), -float("inf"), 0.0, -0.0])[
        : min(x.numel(), 5)
    ].to(dtype)
    borders = torch.sort(torch.randn(2**bits - 1) * 2).values
    levels = torch.randn(2**bits)
    xd = x.to(DEVICE)
    codes = kernels.fewbit_pack(xd, borders.to(DEVICE), bits)
    assert codes.shape == (math.ceil(x.numel() / 32) * bits,)
    assert torch.equal(codes.cpu(), reference.fewbit_pack(x, borders, bits))
    g = torch.randn(shape).to(dtype)
    out = kernels.fewbit_unpack(g.to(DEVICE), codes, levels.to(DEVICE), bits)
    assert torch.equal(out.cpu(), reference.fewbit_unpack(g, codes.cpu(), levels, bits))


def test_triton_fewbit_non_contiguous_and_out_buffers():
    x = torch.randn(70, 40).t().to(DEVICE)  # [40, 70], strided
    borders = torch.tensor([-0.3, 0.2, 0.9], device=DEVICE)
    out = torch.full((math.ceil(x.numel() / 32) * 2,), 0x5A5A5A5A, dtype=torch.int32, device=DEVICE)
    codes = kernels.fewbit_pack(x, borders, 2, out=out)
    assert codes is out
    assert torch.equal(codes.cpu(), reference.fewbit_pack(x.cpu().contiguous(), borders.cpu(), 2))
    res = torch.full(x.shape, float("nan"), device=DEVICE)
    got = kernels.fewbit_unpack(x, codes, torch.arange(4.0, device=DEVICE), 2, out=res)
    assert got is res and torch.equal(res.cpu(), x.cpu() * reference.fewbit_codes(x.cpu(), borders.cpu()).float())


def test_triton_fewbit_bad_arguments():
    x = torch.randn(40, device=DEVICE)
    with pytest.raises(ValueError, match="bits"):
        kernels.fewbit_pack(x, torch.zeros(3, device=DEVICE), 5)
    with pytest.raises(ValueError, match="borders"):
        kernels.fewbit_pack(x, torch.zeros(2, device=DEVICE), 2)
    with pytest.raises(TypeError, match="x"):
        kernels.fewbit_pack(x.double(), torch.zeros(3, device=DEVICE), 2)
    with pytest.raises(ValueError, match="codes"):
        kernels.fewbit_unpack(x, torch.zeros(3, dtype=torch.int32, device=DEVICE), torch.zeros(4, device=DEVICE), 2)
    with pytest.raises(ValueError, match="levels"):
        kernels.fewbit_unpack(x, torch.zeros(4, dtype=torch.int32, device=DEVICE), torch.zeros(3, device=DEVICE), 2)
    with pytest.raises(ValueError, match="out"):
        kernels.fewbit_unpack(
            x, torch.zeros(4, dtype=torch.int32, device=DEVICE), torch.zeros(4, device=DEVICE), 2,
            out=torch.empty(39, device=DEVICE),
        )
