"""Few-bit activations: torch's activation vs sparseops.fewbit at 1-4 bits, forward+backward, CPU.

Run: ``pytest bench/bench_fewbit.py --benchmark-only`` (``python bench/ratio.py --suite fewbit``
prints the ratios). Every case checks its output (against torch) and its gradient (the table's, exactly)
once before timing.
The memory side (saved bytes and the peak of a training step) is ``bench/memory_fewbit.py``.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from sparseops import fewbit

THREADS = 2
N = 4 * 1024 * 1024
# a [32, 4096] activation: where the fixed cost of a call (the autograd Function, the op wrappers)
# shows, measured for three activations
N_SMALL = 32 * 4096
SMALL = ("relu", "gelu", "sigmoid")
# every activation with a table, as torch.nn.functional / torch name it (default parameters)
ACTIVATIONS = {name: fewbit.activation_fn(name) for name in fewbit.ACTIVATIONS}
# bf16 rows for the four most used ones only (the suite is long enough)
BF16 = ("gelu", "silu", "relu", "tanh")
PROVIDERS = ["torch", "fewbit1", "fewbit2", "fewbit3", "fewbit4"]
# the piecewise-linear ones are exact at 1 bit (relu, leaky_relu) or 2 (the three-slope ones)
EXACT_BITS = {"relu": 1, "leaky_relu": 1, "relu6": 2, "hardtanh": 2, "hardsigmoid": 2}
# the fused CPU kernel computes these in float64 and rounds once: the correctly rounded value, which
# torch's float32 forward is not always (csrc/fmath.h)
OWN_FORWARD = ("elu", "selu", "celu")
# and these in float32, within a bound of the exact value (csrc/fmath.h; softplus with torch's beta, 1)
FLOAT32_BOUND = {"sigmoid": 2.41, "silu": 3.35, "tanh": 0.77, "softplus": 0.85, "logsigmoid": 0.85}


def _fn(activation: str, provider: str):
    if provider == "torch":
        return ACTIVATIONS[activation]
    bits = int(provider[-1])
    return lambda x: fewbit.activation(x, activation, bits)


@pytest.mark.parametrize("n", [N, N_SMALL], ids=lambda n: f"n{n}")
@pytest.mark.parametrize("provider", PROVIDERS)
@pytest.mark.parametrize("activation", list(ACTIVATIONS))
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_activation(benchmark, provider, activation, dtype, n):
    torch.set_num_threads(THREADS)
    if dtype == torch.bfloat16 and activation not in BF16:
        pytest.skip("bf16 is measured for gelu, silu, relu and tanh")
    if n == N_SMALL and (activation not in SMALL or dtype != torch.float32):
        pytest.skip(f"n={N_SMALL} is measured for {', '.join(SMALL)} in fp32")
    if provider != "torch" and activation in EXACT_BITS and int(provider[-1]) != EXACT_BITS[activation]:
        pytest.skip(f"{activation} is exact at {EXACT_BITS[activation]} bit(s); other widths are not what a user runs")
    fn = _fn(activation, provider)
    x = torch.randn(n).to(dtype).requires_grad_(True)
    g = torch.randn(n).to(dtype)
    y = fn(x)
    expect = ACTIVATIONS[activation](x.detach())
    if provider != "torch" and activation in OWN_FORWARD:
        expect = ACTIVATIONS[activation](x.detach().double()).to(dtype)  # the CPU kernel's: correctly rounded
    if provider != "torch" and activation in FLOAT32_BOUND:
        # the CPU kernel's float32 ones: within their bound of the exact value (csrc/fmath.h), then rounded
        # to the dtype (within 1 of its ulps)
        exact = ACTIVATIONS[activation](x.detach().double())
        p, bound = (24, FLOAT32_BOUND[activation]) if dtype == torch.float32 else (8, 1.0)
        ulp = torch.ldexp(torch.ones_like(exact), torch.frexp(exact.to(dtype).double())[1] - p)
        assert ((y.double() - exact).abs() / ulp).max() <= bound, "the forward must be within its bound"
        expect = y
    assert torch.equal(y, expect), "the forward must be exact (torch's, or correctly rounded)"
    (dx,) = torch.autograd.grad(y, x, g)
    if provider == "torch":
        assert torch.isfinite(dx).all()
    else:  # the table's piecewise-constant derivative, exactly: g * levels[code(x)], rounded once to the dtype
        t = fewbit.get_table(activation, int(provider[-1]))
        code = torch.bucketize(x.detach().float(), torch.tensor(t.borders, dtype=torch.float32))  # borders < x
        want = (g.float() * torch.tensor(t.levels, dtype=torch.float32)[code]).to(dtype)
        assert torch.equal(dx, want), "the gradient must be the table's"

    def run():
        torch.autograd.grad(fn(x), x, g)

    benchmark.group = f"{activation}-{str(dtype).split('.')[-1]}-n{n}-fwdbwd"
    benchmark.extra_info.update(provider=provider, activation=activation, dtype=str(dtype), n=n, mode="fwdbwd")
    # the small case: more rounds, each short
    benchmark.pedantic(run, rounds=20 if n == N else 200, iterations=1, warmup_rounds=3 if n == N else 20)
