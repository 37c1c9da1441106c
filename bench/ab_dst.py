"""A/B of a mask update's cost between two builds of sparseops, in alternating processes.

The machine moves by ±25% between runs, more than a kernel change moves an update, so the two builds
are timed in turns: each process builds one ``[W, W]`` layer at 90% with Adam (SET and RigL:
unstructured; SRigL: ``FanIn(W/10)``), then 7 times runs a training step (batch 256) and times it,
times RigL's dense gradient ``dyᵀx`` alone (RigL, SRigL), and times one update (drop 30%, grow as
many). It prints the medians and the index work in training steps: (update − ``dyᵀx``) / step, both
from the same process.

    python bench/ab_dst.py --before /path/to/old/checkout --after . --pairs 2

Each path is a checkout whose ``sparseops`` (with its built ``_C``) is imported through PYTHONPATH.
``docs/dst.md`` holds the table this printed for the last round of changes.
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import time


def worker(width: int, method: str) -> None:
    import torch

    import sparseops
    from bench_dst import THREADS, _setup, forget_steps  # the same layer, optimizer and step as bench_dst

    torch.set_num_threads(THREADS)
    model, opt, step = _setup(width, sparseops.FanIn(width // 10) if method == "srigl" else None)
    step()
    cls = {"set": sparseops.SET, "rigl": sparseops.RigL, "srigl": sparseops.SRigL}[method]
    d = cls(model, opt, update_every=1, drop_fraction=0.3)
    step()
    upd, st, gr = [], [], []
    for _ in range(7):
        t = time.perf_counter()
        step()  # the weights move between updates, as in training; RigL's x and dy are fresh
        st.append(time.perf_counter() - t)
        if method != "set":
            t = time.perf_counter()
            d._dense_grad("0")
            gr.append(time.perf_counter() - t)
        t = time.perf_counter()
        d.update(0.3)
        upd.append(time.perf_counter() - t)
        forget_steps(d)  # as step() does: the next update grows from the next step alone

    def med(a):
        return 1e3 * statistics.median(a) if a else 0.0

    index = med(upd) - med(gr)
    print(f"{med(st):.2f} {med(upd):.2f} {med(gr):.2f} {index / med(st):.3f}")


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--before", required=True, help="checkout of the build to compare against")
    ap.add_argument("--after", default=".", help="checkout of the build under test (default: this one)")
    ap.add_argument("--widths", type=int, nargs="+", default=[2048, 4096])
    ap.add_argument("--methods", nargs="+", default=["set", "rigl", "srigl"], choices=["set", "rigl", "srigl"])
    ap.add_argument("--pairs", type=int, default=2, help="alternating before/after processes per case")
    args = ap.parse_args(argv)
    print("| W | method | build | step ms | update ms | dyᵀx ms | index work / step |")
    print("|---|---|---|---|---|---|---|")
    for width in args.widths:
        for method in args.methods:
            for _ in range(args.pairs):
                for name, path in (("before", args.before), ("after", args.after)):
                    env = {**os.environ, "PYTHONPATH": os.path.abspath(path)}
                    out = subprocess.run([sys.executable, __file__, "--worker", str(width), method], env=env,
                                         capture_output=True, text=True, check=True).stdout.split()
                    step, upd, grad, ratio = out[-4:]
                    print(f"| {width} | {method} | {name} | {step} | {upd} | {grad} | {ratio} |", flush=True)


if __name__ == "__main__":
    if len(sys.argv) == 4 and sys.argv[1] == "--worker":
        worker(int(sys.argv[2]), sys.argv[3])
    else:
        main()
