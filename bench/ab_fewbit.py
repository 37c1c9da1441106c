"""Few-bit activations against torch's, timed in alternation in one process (paired ratios).

``bench_fewbit.py`` (pytest-benchmark) times each provider's 20 rounds one after the other, so a
ratio there compares two stretches of this machine, which drifts by ±25% within a minute. Here the
two sides take turns: each pair times ``--calls`` forward+backward calls of torch's activation, then
as many of the few-bit one, on the same input and upstream gradient (the same closure as
bench_fewbit's ``run``), and the ratio of that pair is kept. The result is the median of the
``--pairs`` paired ratios (torch time / few-bit time, above 1 the few-bit one is faster) with their
range, and the median time of each side.

    python bench/ab_fewbit.py                           # every activation, fp32, 4M elements
    python bench/ab_fewbit.py --act gelu relu --dtype bf16 --n 131072

Each case checks its forward against bench_fewbit's expectation before it is timed.

glibc's malloc is made steady first (``mallopt``: 16 MB buffers from the heap, which is never trimmed),
for both sides alike; ``--glibc-default`` leaves it as it is. By default glibc raises its mmap and trim
thresholds as buffers come and go, and a forward+backward's 16 MB buffers then went back to the kernel
on some calls and not others: that side's next call took a page fault every 4 KB (1000 calls of torch's
silu took 10.5 ms each in one process, 2.1-2.6 in another; ours 220-280 faults a call in one run, 0 in
the next), and single pairs ranged from 0.16 to 7.9 around medians of 0.9-1.1. Steady, the ranges of
9 pairs were within ±15% of their medians.
"""

from __future__ import annotations

import argparse
import ctypes
import statistics
import time

import torch

from bench_fewbit import ACTIVATIONS, BF16, EXACT_BITS, FLOAT32_BOUND, N, OWN_FORWARD, THREADS, _fn  # the suite's cases


def _expected(activation: str, x: torch.Tensor, dtype) -> torch.Tensor:
    if activation in OWN_FORWARD:
        return ACTIVATIONS[activation](x.double()).to(dtype)  # the CPU kernel's: correctly rounded
    return ACTIVATIONS[activation](x)


def pair_ratios(activation: str, bits: int, dtype, n: int, pairs: int, calls: int) -> tuple[list, list]:
    """Per-pair mean times (s) of torch's and the few-bit activation's forward+backward."""
    g0 = torch.Generator().manual_seed(0)
    x = torch.randn(n, generator=g0).to(dtype).requires_grad_(True)
    g = torch.randn(n, generator=g0).to(dtype)
    ours, ref = _fn(activation, f"fewbit{bits}"), _fn(activation, "torch")
    y = ours(x)
    if activation in FLOAT32_BOUND:  # the fused float32 ones are their own (within their bound: bench_fewbit
        # checks it)
        assert torch.allclose(y, ACTIVATIONS[activation](x.detach()), rtol=1e-6, atol=1e-30)
    else:
        assert torch.equal(y, _expected(activation, x.detach(), dtype)), f"{activation}: the forward must be exact"

    def block(fn):
        t = time.perf_counter()
        for _ in range(calls):
            torch.autograd.grad(fn(x), x, g)
        return (time.perf_counter() - t) / calls

    for _ in range(3):
        block(ref), block(ours)
    a, b = [], []
    for i in range(pairs):
        if i % 2:  # alternate which side goes first, so neither always runs right after the other
            b.append(block(ours)), a.append(block(ref))
        else:
            a.append(block(ref)), b.append(block(ours))
    return a, b


def steady_malloc() -> bool:
    """glibc: allocations up to 32 MB from the heap (the largest mmap threshold it accepts), and no trim
    of the heap's top; False where that cannot be set (not glibc)."""
    try:
        libc = ctypes.CDLL("libc.so.6")
    except OSError:
        return False
    M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3
    return bool(libc.mallopt(M_MMAP_THRESHOLD, 32 << 20)) and bool(libc.mallopt(M_TRIM_THRESHOLD, 2**31 - 1))


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--act", nargs="*", default=list(ACTIVATIONS), help="activations (default: all)")
    ap.add_argument("--bits", nargs="*", type=int, default=[1, 2, 3, 4])
    ap.add_argument("--dtype", choices=["fp32", "bf16"], default="fp32")
    ap.add_argument("--n", type=int, default=N, help=f"elements (default {N})")
    ap.add_argument("--pairs", type=int, default=15)
    ap.add_argument("--calls", type=int, default=5, help="forward+backward calls per side per pair")
    ap.add_argument("--glibc-default", action="store_true", help="leave glibc's malloc thresholds as they are")
    args = ap.parse_args(argv)
    steady = False if args.glibc_default else steady_malloc()
    torch.set_num_threads(THREADS)
    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16}[args.dtype]
    print(f"# {args.dtype}, n={args.n}, {THREADS} threads, {args.pairs} pairs of {args.calls} calls a side, "
          f"malloc {'steady' if steady else 'as glibc sets it'}")
    print("| activation | bits | torch ms | few-bit ms | torch / few-bit (median of pairs) | range |")
    print("|---|---|---|---|---|---|")
    for act in args.act:
        if act not in ACTIVATIONS:
            raise ValueError(f"--act: unknown activation {act!r}; expected one of {sorted(ACTIVATIONS)}")
        if dtype == torch.bfloat16 and act not in BF16:
            continue
        for bits in args.bits:
            if act in EXACT_BITS and bits != EXACT_BITS[act]:
                continue
            a, b = pair_ratios(act, bits, dtype, args.n, args.pairs, args.calls)
            r = [x / y for x, y in zip(a, b)]
            print(f"| {act} | {bits} | {1e3 * statistics.median(a):.3f} | {1e3 * statistics.median(b):.3f} | "
                  f"{statistics.median(r):.2f} | {min(r):.2f}–{max(r):.2f} |", flush=True)


if __name__ == "__main__":
    main()
