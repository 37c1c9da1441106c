"""The three products of an N:M layer's training step, each alone, against the dense GEMM of the same shape.

``ab_nm.py`` times whole forward+backward steps; this splits one into the forward (``nm_dds``), the input
gradient (``nm_dsd_csr`` over the CSR of ``Wᵀ``, or ``nm_dsd`` on the N:M kernel over ``Wᵀ`` for a
transposable mask) and the weight gradient on the slots (``nm_sdd``), timed in turns with ``x @ Wᵀ``
(the dense forward; its input and weight gradients are GEMMs of the same size) in one process, and prints
the median of each op and dense/op. Each op is checked against fp64 dense before it is timed.

    python bench/ab_nm_ops.py                        # 2:4, 1:4, 2:4T at 4096², B=256
    python bench/ab_nm_ops.py --pattern 2:8 --rounds 12
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

import sparseops
from sparseops.ops import nm as nm_ops

from bench_nm import THREADS  # the suite's thread count (this directory)


def _pattern(name: str):
    if name.upper().endswith("T"):
        n, m = map(int, name[:-1].split(":"))
        return sparseops.NM(n, m, transposable=True)
    return name


def cases(pattern: str, batch: int, features: int, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    lin = torch.nn.Linear(features, features)
    with torch.no_grad():
        lin.weight.copy_(torch.randn(features, features, generator=g) / features**0.5)
    layer = sparseops.SparseLinear.from_dense(lin, pattern=_pattern(pattern))
    p, ix, v = layer.pattern, layer._index(), layer.values.detach()
    n, m, in_f = p.n, p.m, features
    x = torch.randn(batch, features, generator=g)
    dy = torch.randn(batch, features, generator=g)
    w = layer.dense_weight().detach()
    wd, xd, dyd = w.double(), x.double(), dy.double()
    if p.transposable:
        dx = lambda: nm_ops.dsd(dy, v, ix["t_idx"], ix["t_slot"], n, m)  # noqa: E731
    else:
        dx = lambda: nm_ops.dsd_csr(dy, v, ix["t_crow"], ix["t_row"], ix["t_perm"], in_f)  # noqa: E731
    ops = {
        "dense x@Wt": (lambda: x @ w.t(), xd @ wd.t()),
        "forward": (lambda: nm_ops.dds(x, v, ix["idx"], None, n, m), xd @ wd.t()),
        "input grad": (dx, dyd @ wd),
        "weight grad": (lambda: layer.format.to_dense(nm_ops.sdd(dy, x, ix["idx"], n, m)),
                        (dyd.t() @ xd) * layer.mask),
    }
    for name, (f, ref) in ops.items():
        err = ((f().double() - ref).norm() / ref.norm()).item()
        assert err < 1e-4, f"{pattern} {name}: relative error {err:.2e}"
    # the weight gradient is timed without the check's to_dense
    ops["weight grad"] = (lambda: nm_ops.sdd(dy, x, ix["idx"], n, m), None)
    return {k: f for k, (f, _) in ops.items()}


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--pattern", nargs="*", default=["2:4", "1:4", "2:4T"])
    ap.add_argument("--batch", type=int, default=256)
    ap.add_argument("--features", type=int, default=4096)
    ap.add_argument("--rounds", type=int, default=8)
    ap.add_argument("--calls", type=int, default=2, help="calls per op per round")
    args = ap.parse_args(argv)
    torch.set_num_threads(THREADS)
    print(f"# B={args.batch}, {args.features}², {THREADS} threads, {args.rounds} rounds of {args.calls} calls an op")
    print("| pattern | op | ms | dense/op |")
    print("|---|---|---|---|")
    for pat in args.pattern:
        fns = cases(pat, args.batch, args.features)
        for f in fns.values():
            f()
        t = {k: [] for k in fns}
        for r in range(args.rounds):
            for k in (list(fns) if r % 2 == 0 else list(fns)[::-1]):
                s = time.perf_counter()
                for _ in range(args.calls):
                    fns[k]()
                t[k].append((time.perf_counter() - s) / args.calls)
        med = {k: statistics.median(v) for k, v in t.items()}
        for k in fns:
            print(f"| {pat} | {k} | {1e3 * med[k]:.1f} | {med['dense x@Wt'] / med[k]:.2f} |", flush=True)


if __name__ == "__main__":
    main()
