"""Bad arguments raise ValueError/TypeError naming the argument, and leave everything unmodified."""

import copy
import math

import numpy as np
import pytest
import torch
from torch import nn

import sparseops
from sparseops import SparseLinear, Unstructured, sparsify_
from sparseops.formats import CSRWeight
from sparseops.masks import global_magnitude, magnitude


def _snapshot(module):
    return {k: v.detach().clone() for k, v in module.state_dict(keep_vars=True).items()}


def _assert_unchanged(module, before):
    after = module.state_dict(keep_vars=True)
    assert set(after) == set(before)
    for k, v in before.items():
        assert torch.equal(after[k].detach(), v), f"{k} changed"
    assert all(p.grad is None for p in module.parameters())


# ---- calling a layer ----

BAD_X = [
    pytest.param(lambda: torch.randn(3, 8), ValueError, r"^x: .*in_features=7", id="wrong-in_features"),
    pytest.param(lambda: torch.randn(2, 3, 6), ValueError, r"^x: .*in_features=7", id="wrong-in_features-3d"),
    pytest.param(lambda: torch.tensor(1.0), ValueError, r"^x: .*0-d", id="0-d"),
    pytest.param(lambda: torch.randn(3, 7, dtype=torch.float64), TypeError, r"^x: .*dtype", id="float64-into-float32"),
    pytest.param(lambda: torch.randn(3, 7).bfloat16(), TypeError, r"^x: .*dtype", id="bfloat16-into-float32"),
    pytest.param(lambda: torch.ones(3, 7, dtype=torch.int32), TypeError, r"^x: .*dtype", id="int32"),
    pytest.param(lambda: np.zeros((3, 7), np.float32), TypeError, r"^x: .*Tensor", id="numpy-array"),
    pytest.param(lambda: [[0.0] * 7] * 3, TypeError, r"^x: .*Tensor", id="list"),
    pytest.param(lambda: torch.randn(3, 7, device="meta"), ValueError, r"^x: .*device", id="meta-device"),
]


@pytest.mark.parametrize("make_x,exc,match", BAD_X)
def test_sparse_linear_forward_rejects_bad_x(make_x, exc, match):
    layer = SparseLinear(7, 5, sparsity=0.5)
    before = _snapshot(layer)
    with pytest.raises(exc, match=match):
        layer(make_x())
    _assert_unchanged(layer, before)


def test_sparse_linear_forward_error_leaves_training_state_alone():
    layer = SparseLinear(7, 5, sparsity=0.5)
    opt = torch.optim.AdamW(layer.parameters(), lr=1e-2)
    before = _snapshot(layer)
    with pytest.raises(ValueError, match="^x:"):
        layer(torch.randn(3, 8)).sum().backward()
    opt.step()
    _assert_unchanged(layer, before)


# ---- constructing a layer ----

BAD_SPARSITY = [
    pytest.param(1.0, ValueError, id="1.0"),
    pytest.param(-0.1, ValueError, id="-0.1"),
    pytest.param(1.5, ValueError, id="1.5"),
    pytest.param(math.nan, ValueError, id="nan"),
    pytest.param(math.inf, ValueError, id="inf"),
    pytest.param("0.9", TypeError, id="string"),
    pytest.param(True, TypeError, id="bool"),
    pytest.param(torch.tensor([0.5, 0.5]), TypeError, id="tensor"),
]


@pytest.mark.parametrize("sparsity,exc", BAD_SPARSITY)
def test_sparse_linear_rejects_bad_sparsity(sparsity, exc):
    with pytest.raises(exc, match="^sparsity:"):
        SparseLinear(7, 5, sparsity=sparsity)


@pytest.mark.parametrize("sparsity,exc", BAD_SPARSITY)
def test_sparse_linear_from_dense_rejects_bad_sparsity(sparsity, exc):
    linear = nn.Linear(7, 5)
    before = _snapshot(linear)
    with pytest.raises(exc, match="^sparsity:"):
        SparseLinear.from_dense(linear, sparsity=sparsity)
    _assert_unchanged(linear, before)


@pytest.mark.parametrize("sparsity,exc", BAD_SPARSITY)
def test_sparsify_rejects_bad_sparsity(sparsity, exc):
    model = nn.Sequential(nn.Linear(7, 5), nn.ReLU(), nn.Linear(5, 2))
    before = _snapshot(model)
    with pytest.raises(exc, match="^sparsity:"):
        sparsify_(model, sparsity)
    assert type(model[0]) is nn.Linear and type(model[2]) is nn.Linear
    _assert_unchanged(model, before)


@pytest.mark.parametrize("sparsity,exc", BAD_SPARSITY)
def test_magnitude_and_pattern_reject_bad_sparsity(sparsity, exc):
    with pytest.raises(exc, match="^sparsity:"):
        magnitude(torch.randn(5, 7), sparsity)
    with pytest.raises(exc, match="^sparsity:"):
        global_magnitude([torch.randn(5, 7)], sparsity)
    with pytest.raises(exc, match="^sparsity:"):
        Unstructured(sparsity)


def test_sparse_linear_accepts_numpy_float_sparsity():
    assert SparseLinear(10, 10, sparsity=np.float32(0.5)).nnz == 50


def test_sparse_linear_sparsity_and_mask_are_exclusive():
    mask = torch.rand(5, 7) > 0.5
    with pytest.raises(ValueError, match="^sparsity: give either"):
        SparseLinear(7, 5, sparsity=0.5, mask=mask)
    with pytest.raises(ValueError, match="^sparsity: give either"):
        SparseLinear(7, 5, pattern=Unstructured(0.5), mask=mask)
    with pytest.raises(ValueError, match="^sparsity: give either"):
        SparseLinear.from_dense(nn.Linear(7, 5), sparsity=0.5, mask=mask)


def test_sparse_linear_needs_sparsity_or_mask():
    with pytest.raises(ValueError, match="^sparsity: give sparsity="):
        SparseLinear(7, 5)
    with pytest.raises(ValueError, match="^sparsity: give sparsity="):
        SparseLinear.from_dense(nn.Linear(7, 5))
    with pytest.raises(ValueError, match="^sparsity: give sparsity="):
        sparsify_(nn.Sequential(nn.Linear(7, 5)))


BAD_MASKS = [
    pytest.param(lambda: torch.ones(7, 5, dtype=torch.bool), ValueError, r"^mask: .*shape", id="transposed-shape"),
    pytest.param(lambda: torch.ones(5, 7, 1, dtype=torch.bool), ValueError, r"^mask: .*shape", id="3d"),
    pytest.param(lambda: torch.ones(5, 7), TypeError, r"^mask: .*dtype", id="float-mask"),
    pytest.param(lambda: torch.ones(5, 7, dtype=torch.uint8), TypeError, r"^mask: .*dtype", id="uint8-mask"),
    pytest.param(lambda: [[True] * 7] * 5, TypeError, r"^mask: .*Tensor", id="list"),
]


@pytest.mark.parametrize("make_mask,exc,match", BAD_MASKS)
def test_sparse_linear_rejects_bad_mask(make_mask, exc, match):
    with pytest.raises(exc, match=match):
        SparseLinear(7, 5, mask=make_mask())
    linear = nn.Linear(7, 5)
    before = _snapshot(linear)
    with pytest.raises(exc, match=match):
        SparseLinear.from_dense(linear, mask=make_mask())
    _assert_unchanged(linear, before)


@pytest.mark.parametrize(
    "pattern,exc",
    [
        pytest.param("blocky", ValueError, id="unknown-string"),
        pytest.param("dense", ValueError, id="dense"),
        pytest.param(3, TypeError, id="int"),
        pytest.param(None, TypeError, id="None"),
    ],
)
def test_sparse_linear_rejects_bad_pattern(pattern, exc):
    with pytest.raises(exc, match="^pattern:"):
        SparseLinear(7, 5, sparsity=0.5, pattern=pattern)
    with pytest.raises(exc, match="^pattern:"):
        SparseLinear.from_dense(nn.Linear(7, 5), sparsity=0.5, pattern=pattern)
    model = nn.Sequential(nn.Linear(7, 5))
    with pytest.raises(exc, match="^pattern:"):
        sparsify_(model, 0.5, pattern=pattern)
    assert type(model[0]) is nn.Linear


@pytest.mark.parametrize(
    "in_f,out_f,exc,name",
    [
        pytest.param(-1, 5, ValueError, "in_features", id="in-negative"),
        pytest.param(7, -3, ValueError, "out_features", id="out-negative"),
        pytest.param(7.0, 5, TypeError, "in_features", id="in-float"),
        pytest.param(7, "5", TypeError, "out_features", id="out-string"),
        pytest.param(True, 5, TypeError, "in_features", id="in-bool"),
    ],
)
def test_sparse_linear_rejects_bad_features(in_f, out_f, exc, name):
    with pytest.raises(exc, match=f"^{name}:"):
        SparseLinear(in_f, out_f, sparsity=0.5)


@pytest.mark.parametrize(
    "module",
    [pytest.param(nn.Conv1d(3, 4, 1), id="conv1d"), pytest.param(torch.randn(5, 7), id="tensor"), pytest.param(None, id="None")],
)
def test_sparse_linear_from_dense_rejects_non_linear(module):
    with pytest.raises(TypeError, match="^linear:"):
        SparseLinear.from_dense(module, sparsity=0.5)


# ---- sparsify_ ----


@pytest.mark.parametrize("scope", ["Global", "model", "", None])
def test_sparsify_rejects_bad_scope(scope):
    model = nn.Sequential(nn.Linear(7, 5), nn.ReLU(), nn.Linear(5, 2))
    before = _snapshot(model)
    with pytest.raises(ValueError, match="^scope:"):
        sparsify_(model, 0.5, scope=scope)
    assert type(model[0]) is nn.Linear and type(model[2]) is nn.Linear
    _assert_unchanged(model, before)


def test_sparsify_rejects_non_module():
    with pytest.raises(TypeError, match="^model:"):
        sparsify_(torch.randn(5, 7), 0.5)


# ---- masks and formats ----


def test_magnitude_rejects_bad_weight():
    with pytest.raises(TypeError, match="^weight:"):
        magnitude(torch.ones(5, 7, dtype=torch.int64), 0.5)
    with pytest.raises(ValueError, match="^weight:"):
        magnitude(torch.tensor([1.0, math.nan]), 0.5)
    with pytest.raises(TypeError, match=r"^weights\[1\]:"):
        global_magnitude([torch.randn(3), torch.ones(3, dtype=torch.int64)], 0.5)
    with pytest.raises(ValueError, match="^weights:"):
        global_magnitude([torch.randn(3), torch.tensor([math.nan])], 0.5)


def test_sparse_linear_with_nan_weights_is_refused():
    linear = nn.Linear(7, 5)
    with torch.no_grad():
        linear.weight[0, 0] = math.nan
    with pytest.raises(ValueError, match="^weight:"):
        SparseLinear.from_dense(linear, sparsity=0.5)


@pytest.mark.parametrize(
    "mask,exc",
    [
        pytest.param(torch.ones(5, 7), TypeError, id="float"),
        pytest.param(torch.ones(5, 7, 2, dtype=torch.bool), ValueError, id="3d"),
        pytest.param(np.ones((5, 7), bool), TypeError, id="numpy"),
    ],
)
def test_csr_weight_from_mask_rejects_bad_mask(mask, exc):
    with pytest.raises(exc, match="^mask:"):
        CSRWeight.from_mask(mask)


@pytest.mark.parametrize(
    "crow,col,exc,name",
    [
        pytest.param(torch.tensor([0, 1, 2]), torch.tensor([0, 1], dtype=torch.int32), TypeError, "crow", id="crow-int64"),
        pytest.param(torch.tensor([0, 1, 2], dtype=torch.int32), [0, 1], TypeError, "col", id="col-list"),
        pytest.param(torch.tensor([0, 1], dtype=torch.int32), torch.tensor([0], dtype=torch.int32), ValueError, "crow", id="crow-short"),
        pytest.param(torch.tensor([0, 1, 2], dtype=torch.int32), torch.tensor([0, 7], dtype=torch.int32), ValueError, "col", id="col-past-in"),
        pytest.param(torch.tensor([0, 2, 2], dtype=torch.int32), torch.tensor([1, 0], dtype=torch.int32), ValueError, "col", id="col-unsorted"),
    ],
)
def test_csr_weight_from_crow_col_rejects_bad_index(crow, col, exc, name):
    with pytest.raises(exc, match=f"^{name}:"):
        CSRWeight.from_crow_col(2, 7, crow, col)


def test_sparse_linear_load_state_dict_bad_index_leaves_layer_unchanged():
    layer = SparseLinear(7, 5, sparsity=0.5)
    before = _snapshot(layer)
    index_before = {k: v.clone() for k, v in layer.format.tensors().items()}
    sd = copy.deepcopy(layer.state_dict())
    sd["col"] = sd["col"].long()
    with pytest.raises(RuntimeError, match="crow/col: expected dtype"):
        layer.load_state_dict(sd)
    sd = copy.deepcopy(layer.state_dict())
    sd["col"][0] = 7
    with pytest.raises(RuntimeError, match="col: indices must lie in"):
        layer.load_state_dict(sd)
    sd = copy.deepcopy(layer.state_dict())
    sd["values"] = sd["values"][:-1]
    with pytest.raises(RuntimeError, match="values: checkpoint holds"):
        layer.load_state_dict(sd)
    _assert_unchanged(layer, before)
    for k, v in index_before.items():
        assert torch.equal(getattr(layer, k), v), k


def test_set_isa_rejects_unknown_name():
    if not sparseops.cpp_available():
        pytest.skip("sparseops._C is not built")
    prev = sparseops.isa()
    with pytest.raises(ValueError, match="^isa:"):
        sparseops.set_isa("avx512-or-so")
    assert sparseops.isa() == prev
