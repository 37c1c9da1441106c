"""bf16 on CPU: dense bf16 ``F.linear`` against the sparse layers in bf16, 2 threads.

Run: ``pytest bench/bench_half.py --benchmark-only`` (``python bench/ratio.py --suite half`` prints the
ratios). SparseLinear runs the fp32 C++ kernels on fp32 copies of its bf16 operands (``ops.csr.half_via_fp32``);
ActivationSparseLinear's decode reads the bf16 weight rows it needs as they are (``_C.act_gemv16``). Each case
is checked against fp64 once before it is timed.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import sparseops

THREADS = 2
DT = torch.bfloat16
POOL = 16

# (pattern, batch, in, out, sparsity, mode): decode of an MLP up-projection, and a small-batch training step
WEIGHT = [
    ("unstructured", 1, 4096, 11008, 0.9, "fwd"),
    ("2:4", 1, 4096, 11008, 0.5, "fwd"),
    ("unstructured", 64, 4096, 4096, 0.9, "fwdbwd"),
    ("2:4", 64, 4096, 4096, 0.5, "fwdbwd"),
]
ACT = [("act", 1, 4096, 11008, s, "fwd") for s in (0.5, 0.7, 0.9)]


def _lin(in_f, out_f, g):
    lin = torch.nn.Linear(in_f, out_f)
    with torch.no_grad():
        lin.weight.copy_(torch.randn(out_f, in_f, generator=g) / in_f**0.5)
    return lin


def _layer(pattern, lin, sparsity, g):
    if pattern == "act":
        layer = sparseops.ActivationSparseLinear.from_dense(lin, sparsity=sparsity, mode="tensor")
        layer.calibrate(torch.randn(256, lin.in_features, generator=g))
        return layer.to(DT)
    kw = {} if pattern == "2:4" else {"sparsity": sparsity}
    return sparseops.SparseLinear.from_dense(lin, pattern=pattern, **kw).to(DT)


def _check(layer, dense_w, bias, x, pattern):
    with torch.no_grad():
        xd = x.double()
        if pattern == "act":
            xd = torch.where(xd.abs() > layer.threshold.double(), xd, 0.0)
        want = F.linear(xd, dense_w.double(), bias.double())
        got = layer(x).double()
    err = ((got - want).norm() / want.norm()).item()
    assert err < 2e-2, f"output off by relative error {err:.2e}"


@pytest.mark.parametrize("provider", ["dense", "sparseops"])
@pytest.mark.parametrize("pattern,batch,in_f,out_f,sparsity,mode",
                         [pytest.param(*c, id="{}-B{}-in{}-out{}-sp{}-{}".format(*c)) for c in WEIGHT + ACT])
def test_half(benchmark, provider, pattern, batch, in_f, out_f, sparsity, mode):
    torch.set_num_threads(THREADS)
    g = torch.Generator().manual_seed(0)
    layer = _layer(pattern, _lin(in_f, out_f, g), sparsity, g)
    w = (layer.weight if pattern == "act" else layer.to_dense().weight).detach().to(DT)
    b = layer.bias.detach()
    xs = [torch.randn(batch, in_f, generator=g).to(DT) for _ in range(POOL if mode == "fwd" else 1)]
    _check(layer, w, b, xs[0], pattern)
    if provider == "dense":
        dense = torch.nn.Linear(in_f, out_f, dtype=DT)
        with torch.no_grad():
            dense.weight.copy_(w)
            dense.bias.copy_(b)
        fn = dense
    else:
        fn = layer
    state = {"i": 0}
    if mode == "fwd":
        def run():
            x = xs[state["i"] % len(xs)]
            state["i"] += 1
            with torch.no_grad():
                return fn(x)
    else:
        x = xs[0].requires_grad_(True)
        dy = torch.randn(batch, out_f, generator=g).to(DT)

        def run():
            fn.zero_grad(set_to_none=True)
            x.grad = None
            fn(x).backward(dy)

    benchmark.group = f"half-{pattern}-B{batch}-in{in_f}-out{out_f}-sp{sparsity}-{mode}"
    benchmark.extra_info.update(provider=provider, pattern=pattern, batch=batch, in_f=in_f, out_f=out_f,
                                sparsity=sparsity, mode=mode, dtype=str(DT))
    benchmark.pedantic(run, rounds=20 if mode == "fwd" else 5, iterations=1, warmup_rounds=2)
