"""The cost of a mask update against a training step, fp32 CPU, 2 threads.

Run: ``pytest bench/bench_dst.py --benchmark-only``. For a ``[W, W]`` SparseLinear at 90% with Adam,
batch 256: ``step`` is one forward+backward+Adam step (unstructured); ``set``, ``rigl`` and ``srigl``
one update (drop 30%, grow as many, re-pack, re-map the moments; RigL's and SRigL's include their dense
``dyᵀx``, SRigL runs on a ``FanIn(W/10)`` layer with neuron ablation on); ``grad`` that ``dyᵀx`` GEMM
alone, the part of a RigL update the issue allows (the rest is index work); ``prune`` one
GradualPruner re-pack that drops 1% of the weights. Each timed update follows an untimed training
step. The issue asks for updates far cheaper than a step: compare the medians within a width.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

import sparseops

THREADS = 2


def _setup(width, pattern=None):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(width, width))
    if pattern is None:
        sparseops.sparsify_(model, 0.9)
    else:
        sparseops.sparsify_(model, pattern=pattern)
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    x = torch.randn(256, width)

    def step():
        loss = model(x).pow(2).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()

    return model, opt, step


def forget_steps(d) -> None:
    """What ``step()`` does after an update, for a bench that calls ``update()`` itself: the recorded steps
    are dropped, so the next update grows from the one step before it. Without this every untimed step
    added its x and dy to the records and each RigL/SRigL update summed ``dyᵀx`` over all the steps so far
    (before 2026-11-24: the ``grad`` and RigL rows grew round by round, a 4096² ``dyᵀx`` read 120-150 ms
    against ~35 for one step's). The lists are emptied in place: the armed hooks append to them."""
    for calls in d._seen.values():
        calls.clear()


@pytest.mark.parametrize("width", [2048, 4096])
@pytest.mark.parametrize("what", ["step", "set", "rigl", "srigl", "grad", "prune"])
def test_dst_update_cost(benchmark, width, what):
    torch.set_num_threads(THREADS)
    fan_in = sparseops.FanIn(width // 10) if what == "srigl" else None
    model, opt, step = _setup(width, fan_in)
    step()
    if what == "step":
        run = step
    elif what in ("set", "rigl", "srigl", "grad"):
        cls = {"set": sparseops.SET, "srigl": sparseops.SRigL}.get(what, sparseops.RigL)
        d = cls(model, opt, update_every=1, drop_fraction=0.3)
        step()  # the recorded step RigL grows from

        def run():
            if what == "grad":
                d._dense_grad("0")
            else:
                d.update(0.3)
            forget_steps(d)
    else:
        sl = model[0]

        def run():
            keep = torch.rand(sl.nnz) > 0.01
            sl.prune_(keep, opt)

    benchmark.group = f"dst-{width}"
    benchmark.extra_info.update(provider=what, width=width)
    # a training step (untimed) before each timed update, as in training: the weights move between
    # updates (back to back, the 30% grown at the last update would all be exact zeros, ties at the cut)
    # and RigL's recorded x and dy are fresh; the caches hold the step's data, not the update's
    setup = None if what == "step" else step
    benchmark.pedantic(run, setup=setup, rounds=7, iterations=1, warmup_rounds=1)
