"""A/B of the fixed cost of small calls (the Python and binding work around a kernel) between two builds.

At decode and small-batch sizes a sparse layer's call is dominated by that work, not by its kernel, and a
change in a checker or a wrapper moves it by microseconds that the suites' large shapes never show. Each
case is timed in one process per build, the builds in turns, beside its dense anchor (``nn.Linear`` of the
same shape, or torch's own activation) in the same process: medians of 5 rounds, in microseconds a call.
Each case's output (and the sparse layers' input gradient) is checked against the anchor's math first.

    python bench/ab_calls.py --before /path/to/old/checkout --after . --pairs 3

Each path is a checkout whose ``sparseops`` (with its built ``_C``) is imported through PYTHONPATH.
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import time

CASES = ["csr64-b1-infer", "csr1024-b32-train", "nm256-b8-train", "fewbit-relu-131k", "fewbit-gelu2-131k"]


def _time(f, n: int, rounds: int = 5) -> float:
    for _ in range(max(3, n // 10)):
        f()
    r = []
    for _ in range(rounds):
        t = time.perf_counter()
        for _ in range(n):
            f()
        r.append((time.perf_counter() - t) / n * 1e6)
    return statistics.median(r)


def worker(case: str, scale: float) -> None:
    import torch
    from torch import nn

    import sparseops
    from sparseops._cpp import _C

    # a build whose _C failed to import would time the pure-torch fallback without a word (its warning goes
    # to the captured stderr): refuse instead
    assert _C is not None, f"{sparseops.__file__}: sparseops._C is not built"
    torch.set_num_threads(2)
    torch.manual_seed(0)
    n = max(1, int(scale * {"csr64-b1-infer": 3000, "csr1024-b32-train": 300, "nm256-b8-train": 500,
                            "fewbit-relu-131k": 500, "fewbit-gelu2-131k": 300}[case]))
    if case.startswith("fewbit"):
        x = torch.randn(131072, requires_grad=True)
        g = torch.randn(131072)
        few, ref = ((sparseops.nn.FewBitReLU(), nn.ReLU()) if "relu" in case
                    else (sparseops.nn.FewBitGELU(bits=2), nn.GELU()))
        torch.testing.assert_close(few(x), ref(x))

        def run(m):
            return lambda: m(x).backward(g)

        op, anchor = _time(run(few), n), _time(run(ref), n)
    else:
        shape, batch, kw = {"csr64-b1-infer": (64, 1, {"sparsity": 0.5}),
                            "csr1024-b32-train": (1024, 32, {"sparsity": 0.9}),
                            "nm256-b8-train": (256, 8, {"pattern": "2:4"})}[case]
        dense = nn.Linear(shape, shape)
        layer = sparseops.SparseLinear.from_dense(dense, **kw)
        dense = layer.to_dense()  # the anchor computes the same function
        x = torch.randn(batch, shape, requires_grad=True)
        xd = x.detach().clone().requires_grad_(True)
        torch.testing.assert_close(layer(x), dense(xd), rtol=1e-4, atol=1e-4)
        gy = torch.ones(batch, shape)
        layer(x).backward(gy)
        dense(xd).backward(gy)
        torch.testing.assert_close(x.grad, xd.grad, rtol=1e-4, atol=1e-4)
        if case.endswith("infer"):
            with torch.no_grad():
                op, anchor = _time(lambda: layer(x), n), _time(lambda: dense(xd), n)
        else:
            op = _time(lambda: layer(x).backward(gy), n)
            anchor = _time(lambda: dense(xd).backward(gy), n)
    print(f"{op:.1f} {anchor:.1f}")


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--before", required=True, help="checkout of the build to compare against")
    ap.add_argument("--after", default=".", help="checkout of the build under test (default: this one)")
    ap.add_argument("--cases", nargs="+", default=CASES, choices=CASES)
    ap.add_argument("--pairs", type=int, default=3, help="alternating before/after processes per case")
    ap.add_argument("--scale", type=float, default=1.0, help="scale the calls a round (tests use less)")
    args = ap.parse_args(argv)
    print("| case | build | sparseops us | anchor us | anchor / sparseops |")
    print("|---|---|---|---|---|")
    for case in args.cases:
        for _ in range(args.pairs):
            for name, path in (("before", args.before), ("after", args.after)):
                env = {**os.environ, "PYTHONPATH": os.pathsep.join(
                    [os.path.abspath(path)] + ([os.environ["PYTHONPATH"]] if os.environ.get("PYTHONPATH") else []))}
                res = subprocess.run([sys.executable, __file__, "--worker", case, str(args.scale)], env=env,
                                     capture_output=True, text=True)
                if res.returncode:
                    sys.exit(f"{case} ({name}, {path}) failed:\n{res.stderr}")
                out = res.stdout.split()
                op, anchor = float(out[-2]), float(out[-1])
                print(f"| {case} | {name} | {op:.1f} | {anchor:.1f} | {anchor / op:.2f} |", flush=True)


if __name__ == "__main__":
    if len(sys.argv) == 4 and sys.argv[1] == "--worker":
        worker(sys.argv[2], float(sys.argv[3]))
    else:
        main()
