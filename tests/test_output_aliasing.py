"""Every `_C` product that follows a caller's index refuses an output that shares memory with it.

The bindings check an index once, before the kernel runs; a kernel that then wrote its output into that
index (a thread storing y while it, or another thread, still decodes the next rows) would follow what it
wrote, out of bounds. So an output overlapping any argument is a ValueError naming both, raised before
anything is written: each case checks that the index is unchanged after the refusal.
"""

from __future__ import annotations

import numpy as np
import pytest

from sparseops import _C

F32, I32 = np.float32, np.int32


def _shared(nbytes: int = 1024) -> np.ndarray:
    return np.zeros(nbytes, np.uint8)


def _at(buf: np.ndarray, offset: int, dtype, shape) -> np.ndarray:
    """A view of buf's bytes [offset, ...) as dtype, shaped."""
    n = int(np.prod(shape))
    return buf[offset: offset + n * np.dtype(dtype).itemsize].view(dtype).reshape(shape)


def _csr4():
    # a 4x4 weight with one stored entry a row (valid whatever order the rows are walked)
    return np.arange(5, dtype=I32), np.ones(4, F32)


def case_csr_dds():
    buf = _shared()
    col = _at(buf, 0, I32, (4,))
    col[:] = [0, 1, 2, 3]
    crow, vals = _csr4()
    y = _at(buf, 8, F32, (2, 4))  # overlaps col[2:]
    return lambda: _C.csr_dds(np.ones((2, 4), F32), vals, crow, col, None, y, 1), col, "y: shares memory with col"


def case_csr_dsd():
    buf = _shared()
    t_row = _at(buf, 0, I32, (4,))
    t_row[:] = [0, 1, 2, 3]
    t_crow, vals = _csr4()
    dx = _at(buf, 4, F32, (2, 4))
    return (lambda: _C.csr_dsd(np.ones((2, 4), F32), vals, t_crow, t_row, np.arange(4, dtype=I32), dx, 1), t_row,
            "dx: shares memory with t_row")


def case_csr_sdd():
    buf = _shared()
    col = _at(buf, 0, I32, (4,))
    col[:] = [0, 1, 2, 3]
    crow, _ = _csr4()
    dv = _at(buf, 12, F32, (4,))
    return (lambda: _C.csr_sdd(np.ones((2, 4), F32), np.ones((2, 4), F32), crow, col, dv, 1), col,
            "dvalues: shares memory with col")


def case_csr_backward():
    buf = _shared()
    t_perm = _at(buf, 0, I32, (4,))
    t_perm[:] = [0, 1, 2, 3]
    crow, vals = _csr4()
    col = np.arange(4, dtype=I32)
    dx = _at(buf, 0, F32, (2, 4))
    dv = np.empty(4, F32)
    return (lambda: _C.csr_backward(np.ones((2, 4), F32), np.ones((2, 4), F32), vals, crow, col, crow.copy(),
                                    col.copy(), t_perm, dx, dv, 1), t_perm, "dx: shares memory with t_perm")


def case_nm_dds():
    buf = _shared()
    idx = _at(buf, 0, np.uint8, (2, 2))  # 2:4 over 8 inputs: 4 slots a row, two bytes
    idx[:] = 0x10  # positions 0 and 1 in every group
    y = _at(buf, 0, F32, (8, 2))  # 8 rows: the batched walk
    return (lambda: _C.nm_dds(np.ones((8, 8), F32), np.ones((2, 4), F32), idx, 2, 4, None, y, 1), idx,
            "y: shares memory with idx")


def case_nm_dsd():
    buf = _shared()
    t_perm = _at(buf, 0, I32, (8, 1))  # Wᵀ [8, 2] as 1:2: one slot a row
    t_perm[:, 0] = np.arange(8) % 4
    t_idx = np.zeros((8, 1), np.uint8)
    dx = _at(buf, 16, F32, (2, 8))
    return (lambda: _C.nm_dsd(np.ones((2, 2), F32), np.ones((2, 2), F32), t_idx, t_perm, 1, 2, dx, 1), t_perm,
            "dx: shares memory with t_perm")


def case_nm_dsd_csr():
    buf = _shared()
    t_row = _at(buf, 0, I32, (4,))
    t_row[:] = [0, 1, 2, 3]
    t_crow, _ = _csr4()
    dx = _at(buf, 8, F32, (2, 4))
    return (lambda: _C.nm_dsd_csr(np.ones((2, 4), F32), np.ones((2, 2), F32), t_crow, t_row,
                                  np.arange(4, dtype=I32), dx, 1), t_row, "dx: shares memory with t_row")


def case_nm_sdd():
    buf = _shared()
    idx = _at(buf, 0, np.uint8, (2, 2))
    idx[:] = 0x10
    dv = _at(buf, 0, F32, (2, 4))
    return (lambda: _C.nm_sdd(np.ones((8, 2), F32), np.ones((8, 8), F32), idx, 2, 4, dv, 1), idx,
            "dvalues: shares memory with idx")


def case_bsr_dds():
    buf = _shared()
    col = _at(buf, 0, I32, (1,))
    y = _at(buf, 0, F32, (2, 8))
    return (lambda: _C.bsr_dds(np.ones((2, 8), F32), np.ones((1, 8, 8), F32), np.array([0, 1], I32), col, 8, None,
                               y, 1), col, "y: shares memory with col")


def case_bsr_dsd():
    buf = _shared()
    t_perm = _at(buf, 0, I32, (1,))
    dx = _at(buf, 0, F32, (2, 8))
    return (lambda: _C.bsr_dsd(np.ones((2, 8), F32), np.ones((1, 8, 8), F32), np.array([0, 1], I32),
                               np.zeros(1, I32), t_perm, 8, dx, 1), t_perm, "dx: shares memory with t_perm")


def case_bsr_sdd():
    buf = _shared()
    row = _at(buf, 0, I32, (1,))
    dv = _at(buf, 0, F32, (1, 8, 8))
    return (lambda: _C.bsr_sdd(np.ones((2, 8), F32), np.ones((2, 8), F32), row, np.zeros(1, I32), 8, dv, 1), row,
            "dvalues: shares memory with row")


def case_act_csr_gemv():
    buf = _shared()
    t_col = _at(buf, 0, I32, (4,))
    t_col[:] = [0, 1, 2, 3]
    t_crow, vals = _csr4()
    y = _at(buf, 0, F32, (1, 4))
    return (lambda: _C.act_csr_gemv(np.ones((1, 4), F32), np.zeros(1, F32), False, t_crow, t_col, vals, 4, None, y, 1),
            t_col, "y: shares memory with t_col")


CASES = {name[5:]: fn for name, fn in globals().items() if name.startswith("case_")}


@pytest.mark.parametrize("name", sorted(CASES))
def test_output_sharing_an_index_is_refused(name):
    call, index, message = CASES[name]()
    before = index.copy()
    with pytest.raises(ValueError, match=f"^{message}$"):
        call()
    np.testing.assert_array_equal(index, before)


@pytest.mark.parametrize("name", sorted(CASES))
def test_the_same_call_with_its_own_output_runs(name):
    """The refusal is the overlap alone: with the index copied out of the shared buffer, the same call runs
    (and leaves the index as it was)."""
    call, index, _ = CASES[name]()
    before, fresh = index.copy(), index.copy()
    _rebind(call, index, fresh)()
    np.testing.assert_array_equal(fresh, before)


def _rebind(call, old, new):
    """``call`` with the array ``old`` in its closure replaced by ``new``."""
    import types

    cells = []
    for c in call.__closure__ or ():
        v = c.cell_contents
        cells.append(types.CellType(new if v is old else v))
    return types.FunctionType(call.__code__, call.__globals__, call.__name__, call.__defaults__, tuple(cells))



def test_an_output_inside_a_strided_inputs_reach_is_refused():
    # a gapped view's elements reach past [data, data + nbytes): an output placed there would overwrite
    # elements the kernel reads. The check follows the strides (negative ones are refused outright).
    base = np.arange(32, dtype=F32).reshape(2, 16)
    gapped = base[:, ::2]  # [2, 8], elements 0, 2, .., 14 and 16, 18, .., 30
    crow, col = np.array([0, 1], I32), np.array([0], I32)
    y = base.reshape(-1)[17:19].reshape(2, 1)  # between gapped's elements 16 and 18, 20: past its nbytes
    before = base.copy()
    with pytest.raises(ValueError, match="^y: shares memory with x$"):
        _C.csr_dds(gapped, np.ones(1, F32), crow, col, None, y, 1)
    np.testing.assert_array_equal(base, before)
    # outside the reach the same call runs and computes x's first column
    y = np.full((2, 1), np.nan, F32)
    _C.csr_dds(gapped, np.ones(1, F32), crow, col, None, y, 1)
    np.testing.assert_array_equal(y[:, 0], gapped[:, 0])
    with pytest.raises(ValueError, match="non-negative"):
        _C.csr_dds(base[::-1], np.ones(1, F32), crow, col, None, np.zeros((2, 1), F32), 1)


def test_a_broadcast_gradient_is_not_taken_for_an_overlap():
    # loss = layer(x).sum() hands backward a dy of stride 0: one float. Its extent was taken as B * out floats
    # from its pointer, so a fresh dx allocated just after that float was refused at random with
    # "dx: shares memory with dy". The extent follows the strides now.
    import torch
    from sparseops.formats import CSRWeight

    B, out, inp = 8, 6, 5
    fmt = CSRWeight.from_mask(torch.rand(out, inp) < 0.7)
    vals = np.random.default_rng(0).standard_normal(fmt.nnz).astype(F32)
    buf = np.zeros(1 + B * inp, F32)
    buf[0] = 2.0
    dy = np.broadcast_to(buf[:1].reshape(1, 1), (B, out))  # strides (0, 0)
    dx = buf[1:].reshape(B, inp)  # right after dy's one float
    _C.csr_dsd(dy, vals, fmt.t_crow.numpy(), fmt.t_row.numpy(), fmt.t_perm.numpy(), dx, 1)
    w = fmt.to_dense(torch.from_numpy(vals)).numpy()
    np.testing.assert_allclose(dx, np.full((B, out), 2.0, F32) @ w, rtol=1e-6, atol=1e-6)


def test_sum_backward_through_sparse_layers_many_times():
    # the layer-level symptom of the case above (it depended on where the allocator put dx)
    import torch

    import sparseops

    torch.manual_seed(0)
    for layer in (sparseops.SparseLinear.from_dense(torch.nn.Linear(256, 256), pattern="2:4"),
                  sparseops.SparseLinear.from_dense(torch.nn.Linear(64, 64), sparsity=0.5)):
        x = torch.randn(8, layer.in_features, requires_grad=True)
        for _ in range(300):
            layer(x).sum().backward()
        assert torch.isfinite(x.grad).all()
