"""Block-sparse, Pixelfly and Monarch layers against dense nn.Linear, fp32 CPU, 2 threads.

Run: ``pytest bench/bench_block.py --benchmark-only`` (``python bench/ratio.py --suite block``
prints the ratios). The issue's cases, forward+backward at in=out=4096, B=256:
- BSR with random blocks at 90% block sparsity, block 32;
- flat block butterfly n=16, k=2, block 32 (density 18.75%), no low-rank term;
- Pixelfly: the same butterfly plus a rank-32 term;
- Monarch with nblocks=4.
Each case is checked against the dense layer holding the same weight before it is timed.
"""

from __future__ import annotations

import pytest
import torch

import sparseops
from providers import check, step_fn
from shapes import BLOCK_CASES, BLOCK_SHAPES

THREADS = 2


def make_block_case(batch, in_f, out_f, case: str, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    lin = torch.nn.Linear(in_f, out_f)
    with torch.no_grad():
        lin.weight.copy_(torch.randn(out_f, in_f, generator=g) / in_f**0.5)
    x = torch.randn(batch, in_f, generator=g)
    if case == "dense":
        return lin, lin, x
    if case == "bsr90":
        b = 32
        nbr, nbc = -(-out_f // b), -(-in_f // b)
        # random blocks, exactly 10% of the grid
        keep = torch.zeros(nbr * nbc, dtype=torch.bool)
        keep[torch.randperm(nbr * nbc, generator=g)[: round(0.1 * nbr * nbc)]] = True
        fmt = sparseops.formats.BSRWeight.from_block_mask(keep.reshape(nbr, nbc), out_f, in_f, b)
        layer = sparseops.SparseLinear.from_dense(lin, mask=fmt.to_mask(), pattern=sparseops.Block(b))
    elif case in ("butterfly", "pixelfly"):
        rank = 32 if case == "pixelfly" else 0
        pat = sparseops.Butterfly(butterfly_size=16, n_factors=2, block=32, rank=rank)
        layer = sparseops.SparseLinear.from_dense(lin, pattern=pat)
    elif case == "monarch4":
        layer = sparseops.nn.MonarchLinear.from_dense(lin, nblocks=4)
    else:
        raise ValueError(f"case: unknown {case!r}")
    # the dense reference holds the very weight the structured layer holds
    ref = torch.nn.Linear(in_f, out_f)
    with torch.no_grad():
        w = layer.dense_weight() if hasattr(layer, "dense_weight") else layer.to_dense()
        ref.weight.copy_(w.detach() if isinstance(w, torch.Tensor) else w.weight)
        ref.bias.copy_(layer.bias)
    return layer, ref, x


CASES = [
    pytest.param(b, i, o, case, mode, id=f"B{b}-in{i}-out{o}-{case}-{mode}")
    for (b, i, o) in BLOCK_SHAPES
    for case in BLOCK_CASES
    for mode in ("fwdbwd", "fwd")
]


@pytest.mark.parametrize("provider", ["dense", "sparseops"])
@pytest.mark.parametrize("batch,in_f,out_f,case,mode", CASES)
def test_block_linear(benchmark, provider, batch, in_f, out_f, case, mode):
    torch.set_num_threads(THREADS)
    layer, ref, x = make_block_case(batch, in_f, out_f, case)
    check(layer, ref, x, mode)  # ref: the nn.Linear holding the layer's own weight
    run = step_fn(ref if provider == "dense" else layer, x, mode)
    benchmark.group = f"B{batch}-in{in_f}-out{out_f}-{case}-{mode}"
    benchmark.extra_info.update(provider=provider, batch=batch, in_f=in_f, out_f=out_f, case=case, mode=mode)
    rounds = 5 if batch * in_f * out_f >= 2**30 else 20
    benchmark.pedantic(run, rounds=rounds, iterations=1, warmup_rounds=2)
