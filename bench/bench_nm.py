"""N:M sparse linear: dense nn.Linear vs sparseops N:M vs the same mask as unstructured CSR, fp32 CPU.

Run: ``pytest bench/bench_nm.py --benchmark-only`` (``python bench/ratio.py --suite nm`` prints the ratios).
"2:4T" is a transposable 2:4 mask, whose input gradient runs on the N:M kernel. "fanin:K" is
constant fan-in (exactly K nonzeros a row; K = in/10 is the issue's 90%-equivalent case), whose
"sparseops_csr" twin is the same mask as an unstructured layer. Each case is checked against dense
once before it is timed.
"""

from __future__ import annotations

import pytest
import torch

import sparseops
from providers import check, step_fn
from shapes import NM_DECODE_SHAPES, NM_PATTERNS, NM_SHAPES

THREADS = 2
PROVIDERS = ["dense", "sparseops", "sparseops_csr"]


def _pattern(name: str):
    if name.startswith("fanin:"):
        return sparseops.FanIn(int(name.split(":")[1]))
    n, m = (int(v) for v in name.rstrip("T").split(":"))
    return sparseops.NM(n, m, transposable=name.endswith("T"))


def make_nm_case(batch, in_f, out_f, pattern: str, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    lin = torch.nn.Linear(in_f, out_f)
    p = _pattern(pattern)
    with torch.no_grad():
        lin.weight.copy_(torch.randn(out_f, in_f, generator=g) / in_f**0.5)
        mask = sparseops.masks.for_pattern(p, lin.weight, None, None)
        lin.weight.mul_(mask)
    return lin, mask, p, torch.randn(batch, in_f, generator=g)


def build_nm(provider, lin, mask, p):
    if provider == "dense":
        return lin
    if provider == "sparseops":
        return sparseops.SparseLinear.from_dense(lin, mask=mask, pattern=p)
    if provider == "sparseops_csr":
        return sparseops.SparseLinear.from_dense(lin, mask=mask)
    raise ValueError(f"provider: unknown {provider!r}")


CASES = [
    pytest.param(b, i, o, pat, mode, id=f"B{b}-in{i}-out{o}-{pat}-{mode}")
    for (b, i, o) in NM_SHAPES
    for pat in NM_PATTERNS
    for mode in ("fwdbwd", "fwd")
] + [
    pytest.param(b, i, o, "2:4", "fwd", id=f"B{b}-in{i}-out{o}-2:4-fwd")
    for (b, i, o) in NM_DECODE_SHAPES
] + [
    pytest.param(b, i, o, f"fanin:{i // 10}", mode, id=f"B{b}-in{i}-out{o}-fanin{i // 10}-{mode}")
    for (b, i, o) in NM_SHAPES
    for mode in ("fwdbwd", "fwd")
] + [
    # decode: SRigL reports its condensed layout 3.4-3.6x faster than dense at batch 1 and 90% on CPU
    pytest.param(b, i, o, f"fanin:{i // 10}", "fwd", id=f"B{b}-in{i}-out{o}-fanin{i // 10}-fwd")
    for (b, i, o) in NM_DECODE_SHAPES
]


@pytest.mark.parametrize("provider", PROVIDERS)
@pytest.mark.parametrize("batch,in_f,out_f,pattern,mode", CASES)
def test_nm_linear(benchmark, provider, batch, in_f, out_f, pattern, mode):
    torch.set_num_threads(THREADS)
    lin, mask, p, x = make_nm_case(batch, in_f, out_f, pattern)
    layer = build_nm(provider, lin, mask, p)
    check(layer, lin, x, mode)
    run = step_fn(layer, x, mode)
    benchmark.group = f"B{batch}-in{in_f}-out{out_f}-{pattern}-{mode}"
    benchmark.extra_info.update(provider=provider, batch=batch, in_f=in_f, out_f=out_f, pattern=pattern, mode=mode)
    rounds = 5 if batch * in_f * out_f >= 2**30 else 20
    benchmark.pedantic(run, rounds=rounds, iterations=1, warmup_rounds=2)
