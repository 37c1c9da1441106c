"""A failed scratch allocation in the C++ kernels reaches Python as MemoryError and changes nothing.

``sparseops._C._fail_scratch(True)`` makes every per-thread scratch allocation (csrc/scratch.h: the
buffers a parallel region's threads use, allocated before the region) fail as it would out of memory.
Before, the activation-sparse, BSR and DST kernels allocated inside their OpenMP regions, where a
``std::bad_alloc`` cannot leave the region: the process was terminated.
"""

import pytest
import torch

import sparseops
from sparseops._cpp import _C

pytestmark = pytest.mark.skipif(_C is None, reason="needs the C++ module")


@pytest.fixture
def failing():
    """Turns the switch on (the test calls it when its setup is done); off again afterwards, whatever happens."""
    try:
        yield lambda on=True: _C._fail_scratch(on)
    finally:
        _C._fail_scratch(False)


def _snapshot(layer):
    return {k: v.clone() for k, v in layer.state_dict().items() if torch.is_tensor(v)}


def _assert_unchanged(layer, before):
    now = _snapshot(layer)
    assert now.keys() == before.keys()
    for k, v in now.items():
        assert torch.equal(v, before[k]), k


def _linear(i, o):
    torch.manual_seed(0)
    return torch.nn.Linear(i, o)


def _relu_input(batch, k=512):
    torch.manual_seed(1)
    return torch.relu(torch.randn(batch, k))


def _act_layer():
    return sparseops.ActivationSparseLinear.from_dense(_linear(512, 96), mode="relu")


def _act_csr_layer():  # activation-sparse over a CSR weight, for inference: the path that skips both
    return sparseops.ActivationSparseLinear.from_dense(sparseops.SparseLinear.from_dense(_linear(512, 96), sparsity=0.9))


def _bsr_layer():
    return sparseops.SparseLinear.from_dense(_linear(512, 96), pattern=sparseops.Block(16), sparsity=0.5)


def _csr_layer():
    return sparseops.SparseLinear.from_dense(_linear(512, 96), sparsity=0.9)


# (layer, batch, where the allocation fails: "fwd" the forward, "bwd" the backward of a forward that ran)
CASES = {
    "act-decode": (_act_layer, 1, "fwd"),  # the gemv's accumulators
    "act-batch": (_act_layer, 64, "fwd"),  # group panels and C blocks
    "act-backward": (_act_layer, 64, "bwd"),  # the fused backward's dy block
    "act-csr": (_act_csr_layer, 1, "fwd"),
    "bsr-fwd": (_bsr_layer, 64, "fwd"),
    "bsr-bwd": (_bsr_layer, 64, "bwd"),
    "csr-fwd": (_csr_layer, 64, "fwd"),  # the csr walks' blocked index (RegionError)
    "csr-bwd": (_csr_layer, 64, "bwd"),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_a_failed_scratch_allocation_is_a_memory_error(case, failing):
    make, batch, where = CASES[case]
    layer = make()
    if case == "act-csr":
        layer.requires_grad_(False)
    x = _relu_input(batch).requires_grad_(case != "act-csr")
    before = _snapshot(layer)
    if where == "fwd":
        failing()
        with pytest.raises(MemoryError):
            layer(x)
    else:
        y = layer(x)
        failing()
        with pytest.raises(MemoryError):
            y.sum().backward()
        assert x.grad is None and all(p.grad is None for p in layer.parameters())
    _assert_unchanged(layer, before)
    # with allocations back, the same call runs and agrees with the dense layer of the same weight
    failing(False)
    y = layer(x)
    dense = layer.to_dense()
    if not isinstance(dense, torch.nn.Linear):  # act-csr: an ActivationSparseLinear over a SparseLinear
        dense = dense.to_dense()
    # (the inputs are relu outputs: s(x) = x in relu mode)
    torch.testing.assert_close(y.detach(), dense(x.detach()), rtol=1e-4, atol=1e-4)
    if where == "bwd":
        y.sum().backward()
        assert x.grad is not None and torch.isfinite(x.grad).all()


def test_a_failed_scratch_allocation_in_a_mask_update_leaves_the_layer(failing):
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(256, 256))
    sparseops.sparsify_(model, sparsity=0.9)
    opt = torch.optim.Adam(model.parameters())
    model(torch.randn(8, 256)).sum().backward()
    opt.step()
    dst = sparseops.SET(model, opt, update_every=1, drop_fraction=0.3)
    layer = model[0]
    before = _snapshot(layer)
    state_before = {k: v.clone() for k, v in opt.state[layer.values].items() if torch.is_tensor(v)}
    failing()
    with pytest.raises(MemoryError):
        dst.update(0.3)
    _assert_unchanged(layer, before)
    assert opt.state[layer.values].keys() >= state_before.keys()
    for k, v in state_before.items():
        assert torch.equal(opt.state[layer.values][k], v), k
    failing(False)
    dst.update(0.3)  # with allocations back the update goes through: the mask changes
    after = _snapshot(layer)
    assert any(not torch.equal(after[k], before[k]) for k in before if k != "bias")
