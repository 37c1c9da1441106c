"""Two Python threads calling the same layer get correct results, and the CPU kernels are deterministic.

The C++ ops release the GIL, so the two threads' kernels (each with its own OpenMP team) really overlap.
Every thread's forward and gradients must be bit-identical to the same call made alone: the kernels
have no shared scratch state, and each output element is summed in a fixed order for a given thread
count. The layers start cold (no index or cache built yet), so a lazy initialisation that races fails
here too.
"""

import copy
import threading

import pytest
import torch
from torch import nn

from sparseops import NM, Block, SparseLinear
from sparseops.nn import ActivationSparseLinear, FewBitGELU

IN, OUT = 96, 80


def _layers():
    torch.manual_seed(0)
    dense = nn.Linear(IN, OUT)
    act = ActivationSparseLinear.from_dense(copy.deepcopy(dense), sparsity=0.5, mode="tensor")
    act.calibrate(torch.randn(64, IN))
    return {
        "csr": SparseLinear.from_dense(copy.deepcopy(dense), sparsity=0.8),
        "2:4": SparseLinear.from_dense(copy.deepcopy(dense), pattern=NM(2, 4)),
        "2:8-transposable": SparseLinear.from_dense(copy.deepcopy(dense), pattern=NM(2, 8, transposable=True)),
        "block16": SparseLinear.from_dense(copy.deepcopy(dense), sparsity=0.5, pattern=Block(16)),
        "fused-gelu-2bit": SparseLinear.from_dense(copy.deepcopy(dense), sparsity=0.8, activation="gelu", act_bits=2),
        "act-sparse": act,
        "fewbit-gelu": nn.Sequential(copy.deepcopy(dense), FewBitGELU(bits=2)),
    }


def _call(layer, x, dy):
    x = x.clone().requires_grad_(True)
    y = layer(x)
    params = [p for p in layer.parameters() if p.requires_grad]
    grads = torch.autograd.grad(y, [x, *params], dy)
    return [y.detach(), *grads]


def _inputs(seed, batch):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(batch, IN, generator=g), torch.randn(batch, OUT, generator=g)


@pytest.mark.parametrize("name", list(_layers()))
@pytest.mark.parametrize("batch", [1, 37])
def test_two_threads_same_layer(name, batch):
    layer = _layers()[name]
    alone = copy.deepcopy(layer)
    n_iter = 6
    inputs = {t: [_inputs(100 * t + i, batch) for i in range(n_iter)] for t in range(2)}
    expected = {t: [_call(alone, x, dy) for x, dy in inputs[t]] for t in range(2)}

    results, errors = {0: [], 1: []}, []
    barrier = threading.Barrier(2)

    def work(t):
        try:
            barrier.wait()
            for x, dy in inputs[t]:
                results[t].append(_call(layer, x, dy))
        except BaseException as exc:  # noqa: BLE001 - reported by the main thread
            errors.append(exc)

    threads = [threading.Thread(target=work, args=(t,)) for t in range(2)]
    for th in threads:
        th.start()
    for th in threads:
        th.join(timeout=120)
    assert not any(th.is_alive() for th in threads), "a thread hung"
    assert not errors, errors
    for t in range(2):
        assert len(results[t]) == n_iter
        for i, (got, exp) in enumerate(zip(results[t], expected[t])):
            for k, (a, b) in enumerate(zip(got, exp)):
                assert torch.equal(a, b), f"thread {t} call {i} tensor {k}: differs from the same call alone"


@pytest.mark.parametrize("name", list(_layers()))
@pytest.mark.parametrize("batch", [1, 37, 300])
def test_deterministic_run_to_run(name, batch):
    layer = _layers()[name]
    x, dy = _inputs(7, batch)
    first = _call(layer, x, dy)
    for _ in range(3):
        again = _call(layer, x, dy)
        for k, (a, b) in enumerate(zip(again, first)):
            assert torch.equal(a, b), f"tensor {k} differs between identical calls"
    # and the same from a fresh copy of the layer (no state carried between calls)
    for k, (a, b) in enumerate(zip(_call(copy.deepcopy(layer), x, dy), first)):
        assert torch.equal(a, b), f"tensor {k} differs on a copy of the layer"
    assert all(torch.isfinite(t).all() for t in first)
