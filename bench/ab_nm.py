"""N:M layers against dense nn.Linear, timed in alternation in one process (paired ratios).

``bench_nm.py`` (pytest-benchmark) times each provider's rounds one after the other, and on this
machine the dense GEMM alone moves by up to 40% between groups of one run (its B=256 forward+backward
took 198 to 354 ms across runs), so a dense/N:M ratio there compares two stretches of the machine.
Here the providers take turns: each pair times ``--calls`` calls of the dense layer and as many of
the N:M one (and of the same mask as an unstructured layer), with bench_nm's cases and bench's
``step_fn`` (the same closure the suite times), and keeps the pair's ratio. It prints the median of
the ``--pairs`` paired ratios dense/N:M with their range, and the median time of each side.

    python bench/ab_nm.py                                  # 1:4, 2:4, 2:8, 2:4T at 4096², B=256, fwdbwd
    python bench/ab_nm.py --pattern 2:4 --batch 1 --out 11008 --mode fwd --calls 20

Each case is checked against dense before it is timed (bench's ``check``).
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from bench_nm import THREADS, build_nm, make_nm_case  # the suite's cases (this directory)
from providers import check, step_fn


def paired(batch: int, in_f: int, out_f: int, pattern: str, mode: str, pairs: int, calls: int) -> dict:
    lin, mask, p, x = make_nm_case(batch, in_f, out_f, pattern)
    names = ("dense", "sparseops", "sparseops_csr")
    layers = {k: build_nm(k, lin, mask, p) for k in names}
    for k in names[1:]:
        check(layers[k], lin, x, mode)
    runs = {k: step_fn(layers[k], x, mode) for k in names}

    def block(k):
        t = time.perf_counter()
        for _ in range(calls):
            runs[k]()
        return (time.perf_counter() - t) / calls

    for k in names:
        block(k)
    times = {k: [] for k in names}
    for i in range(pairs):
        order = names if i % 2 == 0 else names[::-1]  # alternate who goes first
        for k in order:
            times[k].append(block(k))
    return times


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--pattern", nargs="*", default=["1:4", "2:4", "2:8", "2:4T"])
    ap.add_argument("--batch", type=int, default=256)
    ap.add_argument("--features", type=int, default=4096, help="in features (default 4096)")
    ap.add_argument("--out", type=int, default=None, help="out features (default: --features)")
    ap.add_argument("--mode", choices=["fwd", "fwdbwd"], default="fwdbwd")
    ap.add_argument("--pairs", type=int, default=10)
    ap.add_argument("--calls", type=int, default=2, help="calls per provider per pair")
    args = ap.parse_args(argv)
    torch.set_num_threads(THREADS)
    out = args.out or args.features
    print(f"# B={args.batch}, {args.features}->{out}, {args.mode}, {THREADS} threads, "
          f"{args.pairs} rounds of {args.calls} calls a provider")
    print("| pattern | dense ms | N:M ms | CSR ms | dense/N:M (median of pairs) | range | CSR/N:M |")
    print("|---|---|---|---|---|---|---|")
    for pat in args.pattern:
        t = paired(args.batch, args.features, out, pat, args.mode, args.pairs, args.calls)
        r = [a / b for a, b in zip(t["dense"], t["sparseops"])]
        rc = [a / b for a, b in zip(t["sparseops_csr"], t["sparseops"])]
        med = {k: 1e3 * statistics.median(v) for k, v in t.items()}
        print(f"| {pat} | {med['dense']:.2f} | {med['sparseops']:.2f} | {med['sparseops_csr']:.2f} | "
              f"{statistics.median(r):.2f} | {min(r):.2f}–{max(r):.2f} | {statistics.median(rc):.2f} |", flush=True)


if __name__ == "__main__":
    main()
