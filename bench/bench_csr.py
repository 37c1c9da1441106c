"""Unstructured sparse linear: dense vs torch CSR vs sparseops vs SparseProp, fp32 CPU.

Run: ``pytest bench/bench_csr.py --benchmark-only`` (``python bench/ratio.py`` prints the ratios).
Each case is checked against dense once before it is timed.
"""

from __future__ import annotations

import pytest
import torch

from providers import build, check, make_case, providers, step_fn
from shapes import ANCHOR_SHAPES, DECODE_SHAPES, DECODE_SPARSITIES, SPARSITIES, shape_id

THREADS = 2

CASES = [
    pytest.param(b, i, o, s, mode, id=f"{shape_id(b, i, o, s)}-{mode}")
    for (b, i, o) in ANCHOR_SHAPES
    for s in SPARSITIES
    for mode in ("fwdbwd", "fwd")
] + [
    pytest.param(b, i, o, s, "fwd", id=f"{shape_id(b, i, o, s)}-fwd")
    for (b, i, o) in DECODE_SHAPES
    for s in DECODE_SPARSITIES
]


@pytest.mark.parametrize("provider", providers())
@pytest.mark.parametrize("batch,in_f,out_f,sparsity,mode", CASES)
def test_linear(benchmark, provider, batch, in_f, out_f, sparsity, mode):
    torch.set_num_threads(THREADS)
    lin, mask, x = make_case(batch, in_f, out_f, sparsity)
    layer = build(provider, lin, mask)
    check(layer, lin, x, mode)
    run = step_fn(layer, x, mode)
    benchmark.group = f"{shape_id(batch, in_f, out_f, sparsity)}-{mode}"
    benchmark.extra_info.update(provider=provider, batch=batch, in_f=in_f, out_f=out_f, sparsity=sparsity, mode=mode)
    # large cases take ~0.2 s a call: a fixed number of rounds keeps the suite to minutes
    rounds = 5 if batch * in_f * out_f >= 2**30 else 20
    benchmark.pedantic(run, rounds=rounds, iterations=1, warmup_rounds=2)
