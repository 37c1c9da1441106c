"""Bad arguments raise ValueError/TypeError naming the argument, and leave everything unmodified."""

import copy
import dataclasses
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


# ---- catalogue, continued: every argument a user hands the library, and what must not change ----
#
# Each case names the exception type, matches the argument's name at the start of the message, and checks
# that nothing changed: the module's state (parameters, buffers, Parameter objects), the optimizer's state,
# and the tensors the caller passed in.


def _bits(t):
    """A tensor's exact bits (NaN-safe equality; torch.equal says NaN != NaN)."""
    t = t.detach()
    if t.is_floating_point():
        return t.contiguous().view({2: torch.int16, 4: torch.int32, 8: torch.int64}[t.element_size()]).clone()
    return t.clone()


def _full_state(module):
    """Every parameter and buffer (the non-persistent index too), bit for bit, and the Parameter objects."""
    out = {f"p:{n}": _bits(p) for n, p in module.named_parameters()}
    out.update({f"b:{n}": _bits(b) for n, b in module.named_buffers()})
    out.update({f"t:{n}": type(m) for n, m in module.named_modules()})
    out["ids"] = [id(p) for p in module.parameters()]
    out.update({f"mode:{n}": (m.mode, m.sparsity) for n, m in module.named_modules()
                if isinstance(m, sparseops.ActivationSparseLinear)})
    return out


def _assert_same_state(module, before):
    after = _full_state(module)
    assert after.keys() == before.keys()
    for k, v in before.items():
        if isinstance(v, torch.Tensor):
            assert after[k].shape == v.shape and torch.equal(after[k], v), f"{k} changed"
        else:
            assert after[k] == v, f"{k} changed"


def _trained(layer):
    """``layer`` with an Adam that has state (moments, step) for its parameters."""
    opt = torch.optim.Adam(layer.parameters(), lr=1e-2)
    layer(torch.randn(4, layer.in_features)).square().sum().backward()
    opt.step()
    opt.zero_grad(set_to_none=True)
    return opt


def _opt_snapshot(opt):
    return {
        "groups": [[id(p) for p in g["params"]] for g in opt.param_groups],
        "state": {id(p): {k: _bits(torch.as_tensor(v)) for k, v in s.items()} for p, s in opt.state.items()},
    }


def _assert_opt_same(opt, before):
    after = _opt_snapshot(opt)
    assert after["groups"] == before["groups"]
    assert after["state"].keys() == before["state"].keys()
    for pid, s in before["state"].items():
        for k, v in s.items():
            assert torch.equal(after["state"][pid][k], v), f"optimizer state {k} changed"


def _nm_break(out_f, in_f):
    mask = sparseops.masks.nm(torch.randn(out_f, in_f), 2, 4)
    mask[0, :3] = True  # three in the first group of four
    return mask


def _block_partial():
    mask = torch.zeros(16, 16, dtype=torch.bool)
    mask[:8, :8] = True
    mask[0, 8] = True  # one element of the next 8x8 block
    return mask


def _not_transposable():
    mask = torch.zeros(8, 8, dtype=torch.bool)
    mask[:4, :2] = True  # 2:4 along every row, but column 0 holds 4 in its first group of rows
    return mask


def _fan_in_break():
    mask = torch.zeros(4, 8, dtype=torch.bool)
    mask[:, :2] = True
    mask[1, 5] = True  # row 1 has 3, not k=2
    return mask


# ---- bad structured masks: constructor, from_dense, update_mask_ ----

STRUCTURED = [
    pytest.param("2:4", 8, 4, lambda: _nm_break(4, 8), r"^mask: .*2:4", id="nm-3-in-a-group-of-4"),
    pytest.param(sparseops.NM(2, 4, transposable=True), 8, 8, _not_transposable, r"^mask: .*transposable 2:4",
                 id="nm-not-transposable"),
    pytest.param(sparseops.FanIn(2), 8, 4, _fan_in_break, r"^mask: .*k=2", id="fanin-row-of-3"),
    pytest.param(sparseops.Block(8), 16, 16, _block_partial, r"^mask: .*8x8 blocks", id="block-partly-on"),
]


@pytest.mark.parametrize("pattern,in_f,out_f,make_mask,match", STRUCTURED)
def test_mask_that_breaks_the_pattern_is_refused(pattern, in_f, out_f, make_mask, match):
    mask = make_mask()
    mask_before = mask.clone()
    with pytest.raises(ValueError, match=match):
        SparseLinear(in_f, out_f, pattern=pattern, mask=mask)
    linear = nn.Linear(in_f, out_f)
    before = _full_state(linear)
    with pytest.raises(ValueError, match=match):
        SparseLinear.from_dense(linear, pattern=pattern, mask=mask)
    _assert_same_state(linear, before)
    assert torch.equal(mask, mask_before)


UPDATE_MASKS = [
    pytest.param("2:4", lambda: _nm_break(4, 8), ValueError, r"^mask: breaks the layer's pattern 2:4", id="2:4-broken"),
    pytest.param(sparseops.FanIn(2), _fan_in_break, ValueError, r"^mask: its rows hold \[2, 3\] weights.*fanin2",
                 id="fanin-broken"),
    pytest.param("unstructured", lambda: torch.full((4, 8), math.nan), TypeError, r"^mask: expected dtype torch\.bool",
                 id="nan-float-mask"),
    pytest.param("unstructured", lambda: torch.full((4, 8), math.inf), TypeError, r"^mask: expected dtype torch\.bool",
                 id="inf-float-mask"),
    pytest.param("2:4", lambda: torch.ones(4, 8, dtype=torch.bool, device="meta"), ValueError, r"^mask: .*meta",
                 id="meta-mask"),
    pytest.param("unstructured", lambda: torch.ones(8, 4, dtype=torch.bool), ValueError, r"^mask: expected shape \(4, 8\)",
                 id="transposed"),
    pytest.param("unstructured", lambda: torch.ones(32, dtype=torch.bool), ValueError, r"^mask: expected shape",
                 id="1-d"),
    pytest.param("unstructured", lambda: np.ones((4, 8), bool), TypeError, r"^mask: expected a bool torch\.Tensor",
                 id="numpy"),
]


@pytest.mark.parametrize("pattern,make_mask,exc,match", UPDATE_MASKS)
def test_update_mask_refuses_and_leaves_layer_and_optimizer_alone(pattern, make_mask, exc, match):
    kw = {"sparsity": 0.5} if pattern == "unstructured" else {}
    layer = SparseLinear(8, 4, pattern=pattern, **kw)
    opt = _trained(layer)
    before, opt_before = _full_state(layer), _opt_snapshot(opt)
    mask = make_mask()
    with pytest.raises(exc, match=match):
        layer.update_mask_(mask, opt)
    _assert_same_state(layer, before)
    _assert_opt_same(opt, opt_before)


@pytest.mark.parametrize("keep,exc,match", [
    pytest.param(lambda n: torch.ones(n + 1, dtype=torch.bool), ValueError, r"^keep: expected shape", id="too-long"),
    pytest.param(lambda n: torch.ones(n), TypeError, r"^keep: expected a bool", id="float"),
    pytest.param(lambda n: torch.ones(1, n, dtype=torch.bool), ValueError, r"^keep: expected shape", id="2-d"),
])
def test_prune_refuses_bad_keep(keep, exc, match):
    layer = SparseLinear(8, 4, sparsity=0.5)
    opt = _trained(layer)
    before, opt_before = _full_state(layer), _opt_snapshot(opt)
    with pytest.raises(exc, match=match):
        layer.prune_(keep(layer.nnz), opt)
    _assert_same_state(layer, before)
    _assert_opt_same(opt, opt_before)


def test_prune_refuses_structured_layer():
    layer = SparseLinear(8, 4, pattern="2:4")
    before = _full_state(layer)
    with pytest.raises(TypeError, match=r"^prune_: .*2:4"):
        layer.prune_(torch.ones(layer.values.numel(), dtype=torch.bool))
    _assert_same_state(layer, before)


@pytest.mark.parametrize("fn,exc,name", [
    pytest.param(lambda m: sparseops.masks.is_nm(m, 2, 4), TypeError, "mask", id="is_nm"),
    pytest.param(lambda m: CSRWeight.from_mask(m), TypeError, "mask", id="CSRWeight.from_mask"),
    pytest.param(lambda m: sparseops.formats.NMWeight.from_mask(m, 2, 4), TypeError, "mask", id="NMWeight.from_mask"),
    pytest.param(lambda m: sparseops.formats.BSRWeight.from_mask(m, 8), TypeError, "mask", id="BSRWeight.from_mask"),
    pytest.param(lambda m: SparseLinear(8, 4, mask=m), TypeError, "mask", id="SparseLinear"),
])
@pytest.mark.parametrize("fill", [math.nan, math.inf], ids=["nan", "inf"])
def test_nan_or_inf_float_mask_is_refused(fn, exc, name, fill):
    mask = torch.full((4, 8), fill)
    with pytest.raises(exc, match=f"^{name}: "):
        fn(mask)
    assert torch.equal(_bits(mask), _bits(torch.full((4, 8), fill)))


# ---- NaN and Inf weights ----
#
# NaN cannot be ranked: every producer that ranks magnitudes (magnitude, N:M, fan-in, block, Wanda, the global
# ranking of sparsify_) refuses it, as do the SVDs of MonarchLinear.from_dense and a Pixelfly's low-rank term.
# ±Inf ranks as the largest magnitude (tests/test_masks.py keeps it), so magnitude pruning accepts it. With an
# explicit mask nothing is ranked: from_dense copies the weights as they are, as nn.Linear would hold them.


def _poisoned_mlp(value, where=(0, 0)):
    model = nn.Sequential(nn.Linear(32, 32), nn.ReLU(), nn.Linear(32, 16))
    with torch.no_grad():
        model[0].weight[where] = value
    return model


@pytest.mark.parametrize("kw,name", [
    pytest.param(dict(sparsity=0.5), "weight", id="unstructured"),
    pytest.param(dict(pattern="2:4"), "weight", id="2:4"),
    pytest.param(dict(pattern=sparseops.NM(2, 4, transposable=True)), "weight", id="2:4T"),
    pytest.param(dict(pattern=sparseops.FanIn(4)), "weight", id="fanin"),
    pytest.param(dict(sparsity=0.5, pattern=sparseops.Block(8)), "weight", id="block"),
    pytest.param(dict(sparsity=0.5, scope="global"), "weights", id="global"),
    pytest.param(dict(pattern="monarch:4"), "weight", id="monarch"),
])
def test_sparsify_refuses_nan_weights_and_changes_nothing(kw, name):
    model = _poisoned_mlp(math.nan)
    before = _full_state(model)
    with pytest.raises(ValueError, match=f"^{name}: .*NaN"):
        sparsify_(model, **kw)
    _assert_same_state(model, before)


def test_monarch_and_pixelfly_refuse_inf_weights():
    linear = _poisoned_mlp(math.inf)[0]
    before = _full_state(linear)
    with pytest.raises(ValueError, match=r"^weight: contains NaN or Inf"):
        sparseops.MonarchLinear.from_dense(linear, 4)
    # a butterfly mask keeps the diagonal blocks: put the Inf where it drops weights
    with torch.no_grad():
        linear.weight[0, 0] = 0.0
        linear.weight[0, 31] = math.inf
    before = _full_state(linear)
    with pytest.raises(ValueError, match=r"^weight: contains NaN or Inf where the butterfly mask drops it"):
        SparseLinear.from_dense(linear, pattern=sparseops.Butterfly(4, 2, 8, rank=2))
    _assert_same_state(linear, before)


def test_wanda_refuses_nan_activation_norm():
    w, norm = torch.randn(4, 8), torch.full((8,), math.nan)
    before = [_bits(w), _bits(norm)]
    with pytest.raises(ValueError, match=r"^activation_norm: contains NaN"):
        sparseops.masks.wanda(w, norm, 0.5)
    assert torch.equal(_bits(w), before[0]) and torch.equal(_bits(norm), before[1])


def test_inf_weight_ranks_largest_and_explicit_mask_copies_nan():
    # the documented acceptances: Inf is rankable, and a given mask needs no ranking
    layer = SparseLinear.from_dense(_poisoned_mlp(math.inf)[0], sparsity=0.9)
    assert layer.mask[0, 0] and math.isinf(layer.dense_weight()[0, 0].item())
    linear = _poisoned_mlp(math.nan)[0]
    mask = torch.ones(32, 32, dtype=torch.bool)
    layer = SparseLinear.from_dense(linear, mask=mask)
    assert torch.equal(_bits(layer.dense_weight()), _bits(linear.weight))


# ---- constructing layers ----


@pytest.mark.parametrize("make,exc,match", [
    pytest.param(lambda: SparseLinear(7, 5, sparsity=0.5, dtype=torch.int32), TypeError,
                 r"^dtype: expected torch.float32, bfloat16, float16 or float64, got torch.int32",
                 id="SparseLinear-int32"),
    pytest.param(lambda: SparseLinear(7, 5, sparsity=0.5, dtype=torch.bool), TypeError, r"^dtype: ", id="SparseLinear-bool"),
    pytest.param(lambda: SparseLinear(7, 5, sparsity=0.5, device="meta"), ValueError, r"^device: .*meta",
                 id="SparseLinear-meta"),
    pytest.param(lambda: SparseLinear(7, 5, pattern=sparseops.FanIn(8)), ValueError, r"^k: expected k <= in_features=7",
                 id="fanin-k-past-in"),
    pytest.param(lambda: SparseLinear(7, 5, pattern="2:4", sparsity=0.5), ValueError, r"^sparsity: the 2:4 pattern",
                 id="nm-with-sparsity"),
    pytest.param(lambda: SparseLinear(7, 5, sparsity=0.5, act_bits=2), ValueError, r"^act_bits: ",
                 id="act_bits-without-activation"),
    pytest.param(lambda: SparseLinear(7, 5, sparsity=0.5, activation="swish"), ValueError, r"^activation: ",
                 id="unknown-activation"),
    pytest.param(lambda: sparseops.ActivationSparseLinear(7, 5, dtype=torch.int64), TypeError, r"^dtype: ",
                 id="ActivationSparseLinear-int64"),
    pytest.param(lambda: sparseops.ActivationSparseLinear(7, 5, sparsity=1.0), ValueError, r"^sparsity: ",
                 id="ActivationSparseLinear-sparsity-1"),
    pytest.param(lambda: sparseops.ActivationSparseLinear(7, 5, sparsity=-0.1), ValueError, r"^sparsity: ",
                 id="ActivationSparseLinear-sparsity-negative"),
    pytest.param(lambda: sparseops.ActivationSparseLinear(7, 5, mode="bogus"), ValueError, r"^mode: ",
                 id="ActivationSparseLinear-mode"),
    pytest.param(lambda: sparseops.ActivationSparseLinear.from_dense(nn.Conv1d(3, 4, 1)), TypeError, r"^linear: ",
                 id="ActivationSparseLinear-from-conv"),
    pytest.param(lambda: sparseops.MonarchLinear(7, 5, nblocks=6), ValueError, r"^nblocks: expected <= ",
                 id="Monarch-nblocks-past-min"),
    pytest.param(lambda: sparseops.MonarchLinear(7, 5, nblocks=0), ValueError, r"^nblocks: ", id="Monarch-nblocks-0"),
    pytest.param(lambda: sparseops.MonarchLinear(7, 5, nblocks=2.0), TypeError, r"^nblocks: ", id="Monarch-nblocks-float"),
    pytest.param(lambda: sparseops.MonarchLinear(8, 8, dtype=torch.int32), TypeError, r"^dtype: ", id="Monarch-int32"),
])
def test_layer_constructor_refuses(make, exc, match):
    with pytest.raises(exc, match=match):
        make()


@pytest.mark.parametrize("make,exc,name", [
    pytest.param(lambda: sparseops.NM(4, 4), ValueError, "n", id="NM-n-equals-m"),
    pytest.param(lambda: sparseops.NM(2, 17), ValueError, "n", id="NM-m-17"),
    pytest.param(lambda: sparseops.NM(2.0, 4), TypeError, "n", id="NM-float"),
    pytest.param(lambda: sparseops.FanIn(0), ValueError, "k", id="FanIn-0"),
    pytest.param(lambda: sparseops.Block(12), ValueError, "size", id="Block-12"),
    pytest.param(lambda: sparseops.Block(8, sparsity=1.0), ValueError, "sparsity", id="Block-sparsity-1"),
    pytest.param(lambda: sparseops.Butterfly(butterfly_size=6), ValueError, "butterfly_size", id="Butterfly-size-6"),
    pytest.param(lambda: sparseops.Butterfly(rank=-1), ValueError, "rank", id="Butterfly-rank-negative"),
    pytest.param(lambda: sparseops.Monarch(0), ValueError, "nblocks", id="Monarch-0"),
    pytest.param(lambda: sparseops.masks.nm(torch.randn(4, 8), 0, 4), ValueError, "n", id="masks.nm-n-0"),
    pytest.param(lambda: sparseops.masks.nm(torch.tensor(1.0), 2, 4), ValueError, "weight", id="masks.nm-0-d"),
    pytest.param(lambda: sparseops.masks.fan_in(torch.randn(4, 8), 9), ValueError, "k", id="masks.fan_in-k-past-in"),
    pytest.param(lambda: sparseops.masks.block_magnitude(torch.randn(16, 16), 0.5, 12), ValueError, "block",
                 id="masks.block_magnitude-12"),
    pytest.param(lambda: sparseops.GradualPruner(nn.Linear(4, 4), 1.0, 0, 10), ValueError, "final_sparsity",
                 id="GradualPruner-1.0"),
])
def test_pattern_and_mask_producer_arguments(make, exc, name):
    with pytest.raises(exc, match=f"^{name}: "):
        make()


def test_dynamic_sparse_training_refuses_bad_fraction_and_changes_nothing():
    model = sparsify_(nn.Sequential(nn.Linear(8, 8)), 0.5)
    opt = _trained(model[0])
    before, opt_before = _full_state(model), _opt_snapshot(opt)
    for frac in (0.0, 1.5, math.nan):
        with pytest.raises(ValueError, match="^drop_fraction: "):
            sparseops.RigL(model, opt, drop_fraction=frac)
    with pytest.raises(ValueError, match="^update_every: "):
        sparseops.SET(model, opt, update_every=0)
    _assert_same_state(model, before)
    _assert_opt_same(opt, opt_before)


# ---- activation sparsity and calibration ----


def _act_model(mode="tensor"):
    torch.manual_seed(1)
    model = nn.Sequential(nn.Linear(7, 6), nn.ReLU(), nn.Linear(6, 3))
    sparseops.sparsify_activations_(model, 0.5, mode=mode)
    sparseops.calibrate_(model, [torch.randn(8, 7)])
    return model


@pytest.mark.parametrize("batches,kw,exc,match", [
    pytest.param(lambda: [], {}, ValueError, r"^batches: .*at least one batch", id="empty-list"),
    pytest.param(lambda: iter(()), {}, ValueError, r"^batches: .*at least one batch", id="empty-iterator"),
    pytest.param(lambda: [], dict(sparsity=0.3, mode="channel"), ValueError, r"^batches: ",
                 id="empty-list-with-new-mode"),
    pytest.param(lambda: [torch.empty(0, 7)], {}, ValueError, r"^batches: layer '0' saw no input rows",
                 id="empty-tensor"),
    pytest.param(lambda: [torch.empty(0, 7)], dict(sparsity=0.9), ValueError, r"^batches: ",
                 id="empty-tensor-with-new-sparsity"),
    pytest.param(lambda: [torch.randn(4, 7), torch.randn(4, 8)], {}, ValueError, r"^x: ", id="second-batch-too-wide"),
    pytest.param(lambda: [torch.randn(4, 7)], dict(sparsity=1.0), ValueError, r"^sparsity: ", id="sparsity-1.0"),
    pytest.param(lambda: [torch.randn(4, 7)], dict(sparsity=math.nan), ValueError, r"^sparsity: ", id="sparsity-nan"),
    pytest.param(lambda: [torch.randn(4, 7)], dict(mode="teal"), ValueError, r"^mode: ", id="mode"),
])
def test_calibrate_refuses_and_leaves_every_layer_alone(batches, kw, exc, match):
    model = _act_model()
    before = _full_state(model)
    with pytest.raises(exc, match=match):
        sparseops.calibrate_(model, batches(), **kw)
    _assert_same_state(model, before)
    assert not any(hasattr(m, "_seen") or getattr(m, "_calibrating", False) for m in model.modules())


@pytest.mark.parametrize("samples,exc,match", [
    pytest.param(lambda: torch.empty(0, 7), ValueError, r"^samples: .*at least one row", id="empty-tensor"),
    pytest.param(lambda: [], ValueError, r"^samples: .*at least one row", id="empty-list"),
    pytest.param(lambda: torch.randn(4, 6), ValueError, r"^samples: .*in_features=7", id="too-narrow"),
    pytest.param(lambda: torch.tensor(1.0), ValueError, r"^samples: ", id="0-d"),
    pytest.param(lambda: [np.zeros((4, 7), np.float32)], TypeError, r"^samples: ", id="numpy"),
])
@pytest.mark.parametrize("mode", ["tensor", "channel"])
def test_layer_calibrate_refuses_and_keeps_threshold(samples, exc, match, mode):
    layer = _act_model(mode)[0]
    before = _full_state(layer)
    s = samples()
    with pytest.raises(exc, match=match):
        layer.calibrate(s)
    _assert_same_state(layer, before)


@pytest.mark.parametrize("make_x,exc,match", [
    pytest.param(lambda: torch.randn(3, 8), ValueError, r"^x: .*in_features=7", id="too-wide"),
    pytest.param(lambda: torch.ones(3, 7, dtype=torch.int32), TypeError, r"^x: .*dtype", id="int32"),
    pytest.param(lambda: torch.randn(3, 7, dtype=torch.float64), TypeError, r"^x: .*dtype", id="float64"),
    pytest.param(lambda: torch.randn(3, 7, device="meta"), ValueError, r"^x: .*device", id="meta"),
    pytest.param(lambda: torch.tensor(1.0), ValueError, r"^x: ", id="0-d"),
])
@pytest.mark.parametrize("kind", ["act", "monarch", "fused"])
def test_other_layers_forward_rejects_bad_x(make_x, exc, match, kind):
    if kind == "act":
        layer = _act_model()[0]
    elif kind == "monarch":
        layer = sparseops.MonarchLinear(7, 6, nblocks=2)
    else:
        layer = SparseLinear(7, 6, sparsity=0.5, activation="gelu", act_bits=2)
    before = _full_state(layer)
    x = make_x()
    with pytest.raises(exc, match=match):
        layer(x)
    _assert_same_state(layer, before)


def test_sparsify_activations_refuses_and_changes_nothing():
    model = nn.Sequential(nn.Linear(7, 6), nn.ReLU(), nn.Linear(6, 3))
    before = _full_state(model)
    for s in (-0.1, 1.0, 1.5, math.nan):
        with pytest.raises(ValueError, match="^sparsity: "):
            sparseops.sparsify_activations_(model, s)
    with pytest.raises(ValueError, match="^mode: "):
        sparseops.sparsify_activations_(model, 0.5, mode="bogus")
    with pytest.raises(TypeError, match="^model: "):
        sparseops.sparsify_activations_(model.state_dict(), 0.5)
    _assert_same_state(model, before)


# ---- few-bit activations: bits outside 1 to 4 ----


@pytest.mark.parametrize("bits,exc", [
    pytest.param(0, ValueError, id="0"),
    pytest.param(5, ValueError, id="5"),
    pytest.param(-1, ValueError, id="-1"),
    pytest.param(2.0, TypeError, id="float"),
    pytest.param(True, TypeError, id="bool"),
])
def test_fewbit_refuses_bits_outside_1_to_4(bits, exc):
    x = torch.randn(4, 8, requires_grad=True)
    x_before = _bits(x)
    with pytest.raises(exc, match="^bits: "):
        sparseops.nn.FewBitGELU(bits=bits)
    with pytest.raises(exc, match="^bits: "):
        sparseops.fewbit.gelu(x, bits=bits)
    with pytest.raises(exc, match="^bits: "):
        sparseops.fewbit.activation(x, "silu", bits=bits)
    assert torch.equal(_bits(x), x_before) and x.grad is None
    with pytest.raises(exc, match="^act_bits: "):
        SparseLinear(8, 4, sparsity=0.5, activation="gelu", act_bits=bits)
    model = nn.Sequential(nn.Linear(8, 8), nn.GELU(), nn.Linear(8, 2), nn.SiLU())
    before = _full_state(model)
    with pytest.raises(exc, match="^bits: "):
        sparseops.fewbit.convert_(model, bits=bits)
    _assert_same_state(model, before)


def test_fewbit_refuses_bad_x_and_name():
    with pytest.raises(TypeError, match="^x: "):
        sparseops.fewbit.gelu(torch.ones(3, dtype=torch.int32))
    with pytest.raises(TypeError, match="^x: "):
        sparseops.fewbit.gelu(np.ones(3, np.float32))
    with pytest.raises(ValueError, match="^name: "):
        sparseops.fewbit.activation(torch.randn(3), "swish")
    with pytest.raises(ValueError, match="^approximate: "):
        sparseops.nn.FewBitGELU(approximate="fast")


# ---- malformed hand-built formats ----


def _csr():
    torch.manual_seed(3)
    return CSRWeight.from_mask(torch.rand(5, 7) > 0.4)


def _first_row_with(fmt, n):
    counts = fmt.crow.long().diff()
    return int((counts >= n).nonzero()[0, 0])


def _csr_broken(kind):
    f = _csr()
    r = _first_row_with(f, 2)
    s = int(f.crow[r])
    col = f.col.clone()
    if kind == "out-of-range":
        col[s] = 7
    elif kind == "negative":
        col[s] = -1
    elif kind == "unsorted":
        col[s], col[s + 1] = f.col[s + 1], f.col[s]
    elif kind == "duplicated":
        col[s + 1] = col[s]
    return dataclasses.replace(f, col=col)


@pytest.mark.parametrize("make,exc,match", [
    pytest.param(lambda: _csr_broken("out-of-range"), ValueError, r"^col: indices must lie in \[0, 7\)", id="col-past-in"),
    pytest.param(lambda: _csr_broken("negative"), ValueError, r"^col: indices must lie in", id="col-negative"),
    pytest.param(lambda: _csr_broken("unsorted"), ValueError, r"^col: indices must be sorted and unique", id="col-unsorted"),
    pytest.param(lambda: _csr_broken("duplicated"), ValueError, r"^col: indices must be sorted and unique",
                 id="col-duplicated"),
    pytest.param(lambda: dataclasses.replace(_csr(), t_perm=_csr().t_perm.flip(0)), ValueError, r"^t_perm: ",
                 id="t_perm-inconsistent"),
    pytest.param(lambda: dataclasses.replace(_csr(), crow=_csr().crow.long()), TypeError, r"^crow: expected dtype",
                 id="crow-int64"),
    pytest.param(lambda: dataclasses.replace(_csr(), row=_csr().row[:-1]), ValueError, r"^row: expected nnz",
                 id="row-short"),
])
def test_hand_built_csr_weight_validate(make, exc, match):
    fmt = make()
    tensors = {k: v.clone() for k, v in fmt.tensors().items()}
    with pytest.raises(exc, match=match):
        fmt.validate()
    for k, v in tensors.items():
        assert torch.equal(getattr(fmt, k), v)


def _nm():
    torch.manual_seed(4)
    return sparseops.formats.NMWeight.from_mask(sparseops.masks.nm(torch.randn(4, 8), 2, 4), 2, 4)


def _nm_idx(byte0):
    f = _nm()
    idx = f.idx.clone()
    idx[0, 0] = byte0
    return dataclasses.replace(f, idx=idx)


@pytest.mark.parametrize("make,exc,match", [
    pytest.param(lambda: _nm_idx(0x07), ValueError, r"^idx: positions must lie in \[0, m=4\)", id="position-7-of-4"),
    pytest.param(lambda: _nm_idx(0x01), ValueError, r"^idx: positions must be strictly increasing", id="unsorted"),
    pytest.param(lambda: _nm_idx(0x11), ValueError, r"^idx: positions must be strictly increasing", id="duplicated"),
    pytest.param(lambda: dataclasses.replace(_nm(), idx=_nm().idx.long()), TypeError, r"^idx: expected a uint8",
                 id="idx-int64"),
    pytest.param(lambda: dataclasses.replace(_nm(), idx=_nm().idx[:, :1]), ValueError, r"^idx: expected shape",
                 id="idx-short"),
    pytest.param(lambda: dataclasses.replace(_nm(), empty=torch.tensor([99])), ValueError, r"^empty: slot numbers",
                 id="empty-out-of-range"),
    pytest.param(lambda: dataclasses.replace(_nm(), t_perm=_nm().t_perm.flip(0)), ValueError, r"^t_perm: does not match",
                 id="t_perm-inconsistent"),
])
def test_hand_built_nm_weight_validate(make, exc, match):
    fmt = make()
    tensors = {k: v.clone() for k, v in fmt.tensors().items()}
    with pytest.raises(exc, match=match):
        fmt.validate()
    for k, v in tensors.items():
        assert torch.equal(getattr(fmt, k), v), k
    _nm().validate()


def test_hand_built_bsr_weight_validate():
    from sparseops.formats import BSRWeight

    good = BSRWeight.from_block_mask(torch.tensor([[True, False], [True, True]]), 16, 16, 8)
    good.validate()
    col = good.grid.col.clone()
    col[0] = 2
    with pytest.raises(ValueError, match=r"^col: indices must lie in \[0, 2\)"):
        BSRWeight(16, 16, 8, dataclasses.replace(good.grid, col=col)).validate()
    with pytest.raises(ValueError, match=r"^grid: expected a \(4, 2\) block grid"):
        BSRWeight(32, 16, 8, good.grid).validate()
    with pytest.raises(ValueError, match=r"^block: "):
        BSRWeight(16, 16, 12, good.grid).validate()
    with pytest.raises(ValueError, match=r"^col: indices must lie in \[0, 2\)"):
        BSRWeight.from_crow_col(16, 16, 8, good.grid.crow, col)
    with pytest.raises(ValueError, match=r"^block_mask: expected shape"):
        BSRWeight.from_block_mask(torch.ones(3, 2, dtype=torch.bool), 16, 16, 8)


# ---- the ops and the C++ binding, fed hand-built index tensors ----
# the fp32 CPU path: sparseops._C checks every index before a kernel runs (bindings.cpp is the gatekeeper)


def _op_cases():
    f = _csr()
    x, v = torch.randn(3, 7), torch.randn(f.nnz)
    cases = {}
    for kind in ("out-of-range", "negative", "unsorted", "duplicated"):
        b = _csr_broken(kind)
        cases[f"csr_dds-col-{kind}"] = (torch.ops.sparseops.csr_dds, (x, v, b.crow, b.col, None, 5), r"^col: ")
    crow = f.crow.clone()
    crow[2] = crow[3] + 1
    cases["csr_dds-crow-decreasing"] = (torch.ops.sparseops.csr_dds, (x, v, crow, f.col, None, 5), r"^crow: ")
    cases["csr_dds-values-short"] = (torch.ops.sparseops.csr_dds, (x, v[:-1], f.crow, f.col, None, 5), r"^values: ")
    perm = f.t_perm.clone()
    perm[0] = f.nnz
    cases["csr_dsd-t_perm-out-of-range"] = (
        torch.ops.sparseops.csr_dsd, (torch.randn(3, 5), v, f.t_crow, f.t_row, perm, 7), r"^t_perm: ")
    cases["csr_sdd-col-out-of-range"] = (
        torch.ops.sparseops.csr_sdd, (torch.randn(3, 5), x, f.crow, _csr_broken("out-of-range").col, f.row), r"^col: ")
    n = _nm()
    idx = n.idx.clone()
    idx[0, 0] = 0x07
    cases["nm_dds-position-past-m"] = (
        torch.ops.sparseops.nm_dds, (torch.randn(3, 8), torch.randn(4, 4), idx, None, 2, 4), r"^idx: ")
    cases["nm_dds-idx-wrong-shape"] = (
        torch.ops.sparseops.nm_dds, (torch.randn(3, 8), torch.randn(4, 4), n.idx[:, :1].contiguous(), None, 2, 4),
        r"^idx: ")
    from sparseops.formats import BSRWeight

    g = BSRWeight.from_block_mask(torch.tensor([[True, False], [True, True]]), 16, 16, 8).grid
    bcol = g.col.clone()
    bcol[0] = 2
    cases["bsr_dds-col-out-of-range"] = (
        torch.ops.sparseops.bsr_dds, (torch.randn(2, 16), torch.randn(3, 8, 8), g.crow, bcol, None, 16), r"^col: ")
    return cases


OP_CASES = sorted(_op_cases())


@pytest.mark.parametrize("case", OP_CASES)
def test_ops_refuse_malformed_index_on_the_cpp_path(case):
    if not sparseops.cpp_available():
        pytest.skip("sparseops._C is not built: the reference path does not validate indices")
    op, args, match = _op_cases()[case]
    before = [_bits(a) if isinstance(a, torch.Tensor) else a for a in args]
    with pytest.raises(ValueError, match=match):
        op(*args)
    for a, b in zip(args, before):
        if isinstance(a, torch.Tensor):
            assert torch.equal(_bits(a), b)


def _c_cases():
    f = _csr()
    x, v = torch.randn(3, 7).numpy(), torch.randn(f.nnz).numpy()
    y = lambda: np.full((3, 5), 7.0, np.float32)  # noqa: E731
    n = _nm()
    idx = n.idx.clone()
    idx[0, 0] = 0x07
    from sparseops.formats import BSRWeight

    g = BSRWeight.from_block_mask(torch.tensor([[True, False], [True, True]]), 16, 16, 8).grid
    bcol = g.col.clone()
    bcol[0] = 2
    return {
        "csr_dds-col-out-of-range": (lambda o: _C().csr_dds(x, v, f.crow.numpy(), _csr_broken("out-of-range").col.numpy(),
                                                             None, o, 1), y, ValueError, r"^col: index 7"),
        "csr_dds-col-unsorted": (lambda o: _C().csr_dds(x, v, f.crow.numpy(), _csr_broken("unsorted").col.numpy(), None,
                                                         o, 1), y, ValueError, r"^col: indices must be sorted"),
        "csr_dds-col-duplicated": (lambda o: _C().csr_dds(x, v, f.crow.numpy(), _csr_broken("duplicated").col.numpy(),
                                                           None, o, 1), y, ValueError, r"^col: indices must be sorted"),
        "csr_dds-y-float64": (lambda o: _C().csr_dds(x, v, f.crow.numpy(), f.col.numpy(), None, o, 1),
                              lambda: np.full((3, 5), 7.0), TypeError, r"^y: expected dtype float32"),
        "csr_dds-y-wrong-shape": (lambda o: _C().csr_dds(x, v, f.crow.numpy(), f.col.numpy(), None, o, 1),
                                  lambda: np.full((3, 4), 7.0, np.float32), ValueError, r"^y: expected shape \(3, 5\)"),
        "csr_dds-crow-int64": (lambda o: _C().csr_dds(x, v, f.crow.long().numpy(), f.col.numpy(), None, o, 1), y,
                               TypeError, r"^crow: expected dtype int32"),
        "nm_dds-position-past-m": (lambda o: _C().nm_dds(torch.randn(3, 8).numpy(), torch.randn(4, 4).numpy(),
                                                          idx.numpy(), 2, 4, None, o, 1),
                                   lambda: np.full((3, 4), 7.0, np.float32), ValueError, r"^idx: row 0 slot 0"),
        "nm_dds-n-equals-m": (lambda o: _C().nm_dds(torch.randn(3, 8).numpy(), torch.randn(4, 4).numpy(),
                                                     n.idx.numpy(), 4, 4, None, o, 1),
                              lambda: np.full((3, 4), 7.0, np.float32), ValueError, r"^n, m: "),
        "bsr_dds-col-out-of-range": (lambda o: _C().bsr_dds(torch.randn(2, 16).numpy(), torch.randn(3, 8, 8).numpy(),
                                                             g.crow.numpy(), bcol.numpy(), 8, None, o, 1),
                                     lambda: np.full((2, 16), 7.0, np.float32), ValueError, r"^col: index 2"),
        "bsr_dds-block-12": (lambda o: _C().bsr_dds(torch.randn(2, 16).numpy(), torch.randn(3, 8, 8).numpy(),
                                                     g.crow.numpy(), g.col.numpy(), 12, None, o, 1),
                             lambda: np.full((2, 16), 7.0, np.float32), ValueError, r"^block: "),
        "bsr_sdd-col-out-of-range": (lambda o: _C().bsr_sdd(torch.randn(2, 16).numpy(), torch.randn(2, 16).numpy(),
                                                             g.row.numpy(), bcol.numpy(), 8, o, 1),
                                     lambda: np.full((3, 8, 8), 7.0, np.float32), ValueError, r"^col: block columns"),
        "fewbit_pack-bits-5": (lambda o: _C().fewbit_pack(torch.randn(8).numpy(), "float32",
                                                           torch.randn(31).sort().values.numpy(), 5, o, 1),
                               lambda: np.full(8, 7, np.int32), ValueError, r"^bits: expected 1, 2, 3 or 4"),
    }


def _C():
    from sparseops._cpp import _C as ext

    return ext


@pytest.mark.parametrize("case", sorted(_c_cases()))
def test_cpp_binding_raises_and_writes_nothing(case):
    if not sparseops.cpp_available():
        pytest.skip("sparseops._C is not built")
    call, make_out, exc, match = _c_cases()[case]
    out = make_out()
    before = out.copy()
    with pytest.raises(exc, match=match):
        call(out)
    # validation runs before any kernel: the output buffer is untouched
    assert np.array_equal(out, before)


@pytest.mark.parametrize("kw,name", [
    pytest.param(dict(sparsity=0.5), "weight", id="unstructured"),
    pytest.param(dict(sparsity=0.5, scope="global"), r"weights\[0\]", id="global"),
    pytest.param(dict(pattern="2:4"), "weight", id="2:4"),
    pytest.param(dict(pattern=sparseops.FanIn(2)), "weight", id="fanin"),
    pytest.param(dict(sparsity=0.5, pattern=sparseops.Block(8)), "weight", id="block"),
    pytest.param(dict(pattern="monarch:2"), "weight", id="monarch"),
])
def test_sparsify_refuses_meta_weights_and_changes_nothing(kw, name):
    model = nn.Sequential(nn.Linear(8, 4, device="meta"))
    with pytest.raises(ValueError, match=f"^{name}: .*meta device"):
        sparsify_(model, **kw)
    assert type(model[0]) is nn.Linear and model[0].weight.device.type == "meta"
    for kw in (dict(sparsity=0.5), dict(mask=torch.ones(4, 8, dtype=torch.bool))):
        with pytest.raises(ValueError, match="^linear: .*meta device"):
            SparseLinear.from_dense(model[0], **kw)


# ---- hand-built indices on the reference path (fp64) and on the fp32 C++ kernels that bf16 runs on ----


def _csr_case():
    torch.manual_seed(3)
    mask = torch.rand(5, 7) > 0.4
    mask[0, :3] = True  # row 0 holds at least 3 entries, so its columns can be reordered
    return CSRWeight.from_mask(mask)


def _corrupt(t, how):
    t = t.clone()
    if how == "out-of-range":
        t[1] = 1000
    elif how == "negative":
        t[1] = -1
    elif how == "unsorted":
        t[0], t[1] = t[1].item(), t[0].item()
    elif how == "duplicated":
        t[1] = t[0]
    return t


@pytest.mark.parametrize("dtype", [torch.float64, torch.bfloat16], ids=str)
@pytest.mark.parametrize("op", ["csr_dds", "csr_sdd", "csr_backward", "bsr_dds"])
@pytest.mark.parametrize("how", ["out-of-range", "negative", "unsorted", "duplicated"])
def test_reference_path_rejects_malformed_col(dtype, op, how):
    fmt = _csr_case()
    x, dy = torch.randn(3, 7, dtype=dtype), torch.randn(3, 5, dtype=dtype)
    v = torch.randn(fmt.nnz, dtype=dtype)
    col = _corrupt(fmt.col, how)
    inputs = [x, dy, v, col]
    before = [t.clone() for t in inputs]
    with pytest.raises(ValueError, match=r"^col: "):
        if op == "csr_dds":
            torch.ops.sparseops.csr_dds(x, v, fmt.crow, col, None, 5)
        elif op == "csr_sdd":
            torch.ops.sparseops.csr_sdd(dy, x, fmt.crow, col, fmt.row)
        elif op == "csr_backward":
            torch.ops.sparseops.csr_backward(dy, x, v, fmt.crow, col, fmt.row, fmt.t_crow, fmt.t_row, fmt.t_perm)
        else:  # the same index as a 5x7 grid of 8x8 blocks: a [40, 56] weight
            torch.ops.sparseops.bsr_dds(torch.randn(3, 56, dtype=dtype), torch.randn(fmt.nnz, 8, 8, dtype=dtype),
                                        fmt.crow, col, None, 40)
    for t, b in zip(inputs, before):
        assert torch.equal(t, b)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float16], ids=str)
@pytest.mark.parametrize("bad", ["t_row", "t_perm", "t_crow", "values"])
def test_reference_path_rejects_malformed_transposed_index(dtype, bad):
    fmt = _csr_case()
    dy = torch.randn(3, 5, dtype=dtype)
    v = torch.randn(fmt.nnz, dtype=dtype)
    t_crow, t_row, t_perm = fmt.t_crow, fmt.t_row, fmt.t_perm
    if bad == "t_row":
        t_row = _corrupt(t_row, "out-of-range")
    elif bad == "t_perm":
        t_perm = _corrupt(t_perm, "out-of-range")
    elif bad == "t_crow":
        t_crow = t_crow.clone()
        t_crow[-1] += 1
    else:
        v = v[:-1]
    with pytest.raises(ValueError, match=rf"^{bad}: "):
        torch.ops.sparseops.csr_dsd(dy, v, t_crow, t_row, t_perm, 7)
    with pytest.raises(ValueError, match=rf"^{bad}: "):
        torch.ops.sparseops.bsr_dsd(dy.repeat_interleave(8, 1), v[:, None, None].expand(-1, 8, 8).contiguous(),
                                    t_crow, t_row, t_perm, 56)


def test_reference_path_bsr_sdd_rejects_out_of_range_blocks():
    fmt = _csr_case()
    # the case's 5 x 7 index as a grid of 8-wide blocks (dy 40 = 5 x 8 columns, x 56 = 7 x 8)
    dy, x = torch.randn(3, 40, dtype=torch.float64), torch.randn(3, 56, dtype=torch.float64)
    with pytest.raises(ValueError, match=r"^row: "):
        torch.ops.sparseops.bsr_sdd(dy, x, _corrupt(fmt.row, "out-of-range"), fmt.col, 8)
    with pytest.raises(ValueError, match=r"^col: "):
        torch.ops.sparseops.bsr_sdd(dy, x, fmt.row, _corrupt(fmt.col, "negative"), 8)
    with pytest.raises(ValueError, match=r"^block: "):  # a block size no kernel has
        torch.ops.sparseops.bsr_sdd(dy, x, fmt.row, fmt.col, 2)


@pytest.mark.parametrize("dtype", [torch.float64, torch.bfloat16], ids=str)
@pytest.mark.parametrize("how", ["position-past-m", "idx-wrong-shape", "values-wrong-shape", "bad-n-m"])
def test_reference_path_rejects_malformed_nm_index(dtype, how):
    from sparseops.formats import NMWeight
    from sparseops.masks import nm as nm_mask

    torch.manual_seed(0)
    w = torch.randn(6, 12)
    fmt = NMWeight.from_mask(nm_mask(w, 2, 4), 2, 4)
    x, dy = torch.randn(3, 12, dtype=dtype), torch.randn(3, 6, dtype=dtype)
    values = fmt.gather(w).to(dtype)
    idx, n, m = fmt.idx, 2, 4
    name = {"position-past-m": "idx", "idx-wrong-shape": "idx", "values-wrong-shape": "values", "bad-n-m": "n, m"}[how]
    if how == "position-past-m":
        idx = idx.clone()
        idx[2, 1] = (idx[2, 1] & 0x0F) | (7 << 4)  # slot 3 of row 2 at position 7 of a group of 4
    elif how == "idx-wrong-shape":
        idx = idx[:, :-1]
    elif how == "values-wrong-shape":
        values = values[:, :-1]
    else:
        n, m = 4, 4
    before = [t.clone() for t in (x, values, idx)]
    with pytest.raises(ValueError, match=rf"^{name}: "):
        torch.ops.sparseops.nm_dds(x, values, idx, None, n, m)
    if how != "values-wrong-shape":
        with pytest.raises(ValueError, match=rf"^{name}: "):
            torch.ops.sparseops.nm_sdd(dy, x, idx, n, m)
    for t, b in zip((x, values, idx), before):
        assert torch.equal(t, b)


@pytest.mark.parametrize("m", [2, 3, 4, 8])
@pytest.mark.parametrize("where", ["first", "word", "tail", "odd-last"])
def test_nm_binding_finds_every_bad_position(m, where):
    """The binding's position check (a word-wide AND for m = 2, 4, 8, a compare otherwise) finds a position
    >= m wherever it sits: the first slot, inside the 8-byte words, in the bytes after them, or the last slot
    of an odd row; the padding nibble of an odd row is never read."""
    n, in_f, rows = 1, m * 37, 5  # S = 37 slots a row: 18 full bytes (2 words + 2 bytes) and a half byte
    S = in_f // m * n
    Sb = (S + 1) // 2
    rng = np.random.default_rng(m)
    pos = rng.integers(0, m, size=(rows, S))
    packed = np.zeros((rows, Sb), np.uint8)
    for j in range(S):
        packed[:, j // 2] |= (pos[:, j] << (4 * (j % 2))).astype(np.uint8)
    packed[:, -1] |= 0xF0  # the padding nibble of the odd row: garbage the kernel must ignore
    x = torch.randn(3, in_f).numpy()
    vals = torch.randn(rows, S).numpy()
    y = np.full((3, rows), 7.0, np.float32)
    _C().nm_dds(x, vals, packed, n, m, None, y, 1)  # well-formed: runs
    slot = {"first": 0, "word": 11, "tail": 33, "odd-last": S - 1}[where]
    bad = packed.copy()
    shift = 4 * (slot % 2)
    keep = 0xFF ^ (15 << shift)
    bad[3, slot // 2] = (int(bad[3, slot // 2]) & keep) | (m << shift)  # position m: one past the group
    y = np.full((3, rows), 7.0, np.float32)
    with pytest.raises(ValueError, match=rf"^idx: row 3 slot {slot} holds position {m}, outside \[0, m={m}\)"):
        _C().nm_dds(x, vals, bad, n, m, None, y, 1)
    assert (y == 7.0).all()


# ---- found by review: the formats packed the corner of a weight larger than its mask ----


@pytest.mark.parametrize("fmt", ["csr", "ell", "nm", "bsr"])
def test_format_from_dense_refuses_a_weight_that_is_not_the_masks_shape(fmt):
    from sparseops.formats import BSRWeight, CSRWeight, ELLWeight, NMWeight

    mask = torch.zeros(8, 8, dtype=torch.bool)
    mask[:, ::2] = True  # 4 a row: 2:4 along rows, fan-in 4
    if fmt == "bsr":
        mask[:] = True  # one whole 8x8 block
    pack = {
        "csr": lambda w, m: CSRWeight.from_dense(w, m),
        "ell": lambda w, m: ELLWeight.from_dense(w, m),
        "nm": lambda w, m: NMWeight.from_dense(w, m, 2, 4),
        "bsr": lambda w, m: BSRWeight.from_dense(w, m, 8),
    }[fmt]
    pack(torch.randn(8, 8), mask)  # the matching shape packs
    for w in (torch.randn(16, 16), torch.randn(4, 8)):
        with pytest.raises(ValueError, match=r"^weight: expected the mask's shape \(8, 8\)"):
            pack(w, mask)
    with pytest.raises(TypeError, match="^weight: expected a floating-point 2-D"):
        pack(torch.ones(8, 8, dtype=torch.int64), mask)


def test_nm_pattern_refuses_a_transposable_that_is_not_a_bool():
    with pytest.raises(TypeError, match="^transposable: expected a bool, got str"):
        sparseops.NM(2, 4, transposable="False")


def _csr_op_calls(dtype, *, rows_x=3, rows_dy=3, x_dim=2, bias_shape=(4,), dy_dtype=None):
    """The four CSR ops called directly on a 4x5 weight, with one operand possibly malformed."""
    torch.manual_seed(0)
    fmt = CSRWeight.from_mask(torch.rand(4, 5) < 0.6)
    v = torch.randn(fmt.nnz, dtype=dtype)
    x = torch.randn(*((rows_x, 5) if x_dim == 2 else (5,)), dtype=dtype)
    dy = torch.randn(rows_dy, 4, dtype=dy_dtype or dtype)
    bias = torch.randn(bias_shape, dtype=dtype)
    ops = torch.ops.sparseops
    return {
        "csr_dds": lambda: ops.csr_dds(x, v, fmt.crow, fmt.col, bias, 4),
        "csr_dsd": lambda: ops.csr_dsd(dy, v, fmt.t_crow, fmt.t_row, fmt.t_perm, 5),
        "csr_sdd": lambda: ops.csr_sdd(dy, x, fmt.crow, fmt.col, fmt.row),
        "csr_backward": lambda: ops.csr_backward(dy, x, v, fmt.crow, fmt.col, fmt.row, fmt.t_crow, fmt.t_row, fmt.t_perm),
    }


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)  # the C++ path; the pure-torch one
def test_csr_ops_refuse_malformed_dense_operands_on_every_path(dtype):
    # the pure-torch path used to broadcast these (dy's rows against x's, a [1, out] bias) and return a
    # result whose shape the fake impl did not predict; both paths now refuse them alike
    for name in ("csr_sdd", "csr_backward"):
        with pytest.raises(ValueError, match=r"^dy: expected 1 rows to match x, got 3$"):
            _csr_op_calls(dtype, rows_x=1)[name]()
    with pytest.raises(ValueError, match=r"^bias: expected shape \(4,\), got \(1, 4\)$"):
        _csr_op_calls(dtype, bias_shape=(1, 4))["csr_dds"]()
    for name in ("csr_dds", "csr_sdd", "csr_backward"):
        with pytest.raises(ValueError, match=r"^x: expected a 2-D tensor, got shape \(5,\)$"):
            _csr_op_calls(dtype, x_dim=1)[name]()
    for name, fn in _csr_op_calls(dtype).items():  # well-formed: every op runs
        fn()


@pytest.mark.parametrize("name", ["csr_dsd", "csr_sdd", "csr_backward"])
@pytest.mark.parametrize("other", [torch.bfloat16, torch.float64], ids=str)
def test_csr_ops_refuse_mixed_dtypes(name, other):
    # a bf16 dy with an fp32 x came back in bf16 while the fake impl said fp32 (opcheck failed): one dtype
    with pytest.raises(TypeError, match="expected one floating-point dtype, got .*dy " + str(other)):
        _csr_op_calls(torch.float32, dy_dtype=other)[name]()


def test_float8_is_refused_by_name_at_build_and_call():
    # nn.Linear has no float8 matmul either; before, a float8 layer ran silently on the slow reference
    with pytest.raises(TypeError, match=r"^dtype: expected torch.float32, bfloat16, float16 or float64, got "):
        SparseLinear(8, 4, sparsity=0.5, dtype=torch.float8_e4m3fn)
    layer = SparseLinear(8, 4, sparsity=0.5).to(torch.float8_e4m3fn)
    with pytest.raises(TypeError, match=r"^x: expected torch.float32, bfloat16, float16 or float64, got "):
        layer(torch.randn(2, 8).to(torch.float8_e4m3fn))


# ---- the other op families called directly: the same checks on the C++ path (fp32) and the pure-torch
# one (fp64), which used to broadcast these or fail with a bare IndexError ----


def _nm_fmt():
    from sparseops.formats.nm import NMWeight

    torch.manual_seed(0)
    w = torch.randn(5, 8)
    mask = sparseops.masks.nm(w, 2, 4)
    return NMWeight.from_dense(w, mask, 2, 4)


_OPS = torch.ops.sparseops
_THR = torch.tensor(0.0)


def _malformed_op_calls(dt):
    fmt, v = _nm_fmt()
    v = v.to(dt)
    x8, x10, w = torch.randn(3, 8, dtype=dt), torch.randn(3, 10, dtype=dt), torch.randn(10, 6, dtype=dt)
    csr = CSRWeight.from_mask(torch.ones(6, 10, dtype=torch.bool))
    tv = torch.randn(csr.nnz, dtype=dt)
    return [
        (lambda: _OPS.nm_sdd(torch.randn(1, 5, dtype=dt), x8, fmt.idx, 2, 4), r"^dy: expected 3 rows to match x, got 1$"),
        (lambda: _OPS.nm_sdd(torch.randn(3, 5, dtype=dt), torch.randn(8, dtype=dt), fmt.idx, 2, 4),
         r"^x: expected a 2-D tensor, got shape \(8,\)$"),
        (lambda: _OPS.nm_dds(torch.randn(8, dtype=dt), v, fmt.idx, None, 2, 4), r"^x: expected a 2-D tensor"),
        (lambda: _OPS.nm_dds(x8, v, fmt.idx, torch.randn(1, 5, dtype=dt), 2, 4),
         r"^bias: expected shape \(5,\), got \(1, 5\)$"),
        (lambda: _OPS.act_dsd(torch.randn(1, 6, dtype=dt), x10, w, _THR, False), r"^dy: expected 3 rows to match x, got 1$"),
        (lambda: _OPS.act_dsd(torch.randn(3, 6, dtype=dt), x10[:1], w, _THR, False),
         r"^dy: expected 1 rows to match x, got 3$"),
        (lambda: _OPS.act_dsd(torch.randn(6, dtype=dt), x10, w, _THR, False), r"^dy: expected a 2-D tensor"),
        (lambda: _OPS.act_dsd(torch.randn(3, 7, dtype=dt), x10, w, _THR, False), r"^weight_t: expected shape \[10, 7\]"),
        (lambda: _OPS.act_sdd(torch.randn(6, dtype=dt), x10, _THR, False), r"^dy: expected a 2-D tensor"),
        (lambda: _OPS.act_dds(torch.randn(10, dtype=dt), w, None, _THR, False), r"^x: expected a 2-D tensor"),
        (lambda: _OPS.act_dds(x10, w, torch.randn(1, dtype=dt), _THR, False), r"^bias: expected shape \(6,\), got \(1,\)$"),
        (lambda: _OPS.act_dds(x10, w, None, torch.rand(3, 10), False), r"^threshold: expected a scalar or \[10\]"),
        (lambda: _OPS.act_csr_dds(x10, csr.t_crow, csr.t_row, tv, torch.randn(1, 6, dtype=dt), _THR, False, 6),
         r"^bias: expected shape \(6,\), got \(1, 6\)$"),
    ]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
def test_nm_and_act_ops_refuse_malformed_operands_on_every_path(dtype):
    for i, (call, match) in enumerate(_malformed_op_calls(dtype)):
        with pytest.raises(ValueError, match=match):
            call()


@pytest.mark.parametrize("case", ["nm_sdd", "bsr_sdd", "act_dsd", "nm_dsd_csr"])
def test_other_ops_refuse_mixed_dtypes(case):
    # with the C++ build, a bf16 dy and an fp32 x came back in bf16 while the fake impl said fp32 (opcheck
    # failed), and in fp32 without the build: one dtype, refused by name otherwise
    from sparseops.formats.bsr import BSRWeight

    bf16 = torch.bfloat16
    fmt, v = _nm_fmt()
    calls = {
        "nm_sdd": lambda: _OPS.nm_sdd(torch.randn(3, 5, dtype=bf16), torch.randn(3, 8), fmt.idx, 2, 4),
        "bsr_sdd": lambda: (lambda g: _OPS.bsr_sdd(torch.randn(3, 16, dtype=bf16), torch.randn(3, 16), g.row, g.col, 8))(
            BSRWeight.from_mask(torch.ones(16, 16, dtype=torch.bool), 8).grid),
        "act_dsd": lambda: _OPS.act_dsd(torch.randn(3, 6, dtype=bf16), torch.randn(3, 10), torch.randn(10, 6), _THR, False),
        "nm_dsd_csr": lambda: _OPS.nm_dsd_csr(torch.randn(3, 5, dtype=bf16), v, fmt.t_crow, fmt.t_row, fmt.t_perm, 8),
    }
    with pytest.raises(TypeError, match="expected one floating-point dtype"):
        calls[case]()


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
def test_fewbit_ops_check_their_tables_on_every_path(dtype):
    # on the reference path (fp64) 7 borders at 2 bits packed the code 7 into 2 bits, unsorted borders and
    # bits=5 ran, surplus codes were ignored: the binding's checks and messages now hold there too
    x = torch.randn(4, 10, dtype=dtype)
    b3 = torch.tensor([-1.0, 0.0, 1.0])
    codes = _OPS.fewbit_pack(x, b3, 2)
    cases = [
        (lambda: _OPS.fewbit_pack(x, torch.linspace(-2, 2, 7), 2), ValueError, r"^borders: expected 3 entries, got 7$"),
        (lambda: _OPS.fewbit_pack(x, torch.tensor([1.0, 0.0, -1.0]), 2), ValueError, r"^borders: must be sorted"),
        (lambda: _OPS.fewbit_pack(x, torch.tensor([0.0, float("nan"), 1.0]), 2), ValueError, r"^borders: entry 1 is nan$"),
        (lambda: _OPS.fewbit_pack(x, torch.linspace(-1, 1, 31), 5), ValueError, r"^bits: expected 1, 2, 3 or 4, got 5$"),
        (lambda: _OPS.fewbit_unpack(x[:1], codes, torch.arange(4.0), 2), ValueError, r"^codes: expected shape \(2,\)"),
        (lambda: _OPS.fewbit_unpack(x, codes, torch.arange(16.0), 2), ValueError, r"^levels: expected 4 entries, got 16$"),
        (lambda: _OPS.fewbit_unpack(x, codes.long(), torch.arange(4.0), 2), TypeError, r"^codes: expected dtype int32"),
        (lambda: _OPS.fewbit_fused(x, b3, 2, "softplus", 0.0, 20.0, True), ValueError, r"^a: expected a finite number"),
        (lambda: _OPS.fewbit_fused(x, b3, 2, "swish", 0.0, 0.0, True), ValueError, r"^kind: expected"),
    ]
    for call, exc, match in cases:
        with pytest.raises(exc, match=match):
            call()


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
def test_autograd_functions_check_the_bias_and_act_operands(dtype):
    # the exported autograd functions run the kernels without their op-level checks (the layer path), so they
    # check what a caller may get wrong themselves: before, a [1] bias broadcast on the pure-torch path
    from sparseops.autograd import act_linear, sparse_linear

    fmt = CSRWeight.from_mask(torch.rand(8, 16) < 0.5)
    v = torch.randn(fmt.nnz, dtype=dtype)
    x = torch.randn(3, 16, dtype=dtype)
    with pytest.raises(ValueError, match=r"^bias: expected shape \(8,\), got \(1,\)$"):
        sparse_linear(x, v, fmt.tensors(), torch.randn(1, dtype=dtype), 8, 16)
    with pytest.raises(TypeError, match=r"^bias: expected dtype"):
        sparse_linear(x, v, fmt.tensors(), torch.randn(8, dtype=torch.bfloat16), 8, 16)
    w = torch.randn(16, 8, dtype=dtype)
    thr = torch.tensor(0.1)
    with pytest.raises(ValueError, match=r"^bias: expected shape \(8,\), got \(1,\)$"):
        act_linear(x, w, torch.randn(1, dtype=dtype), thr, False)
    with pytest.raises(ValueError, match=r"^threshold: expected a scalar or \[16\]"):
        act_linear(x, w, None, torch.rand(5), False)
    with pytest.raises(TypeError, match="expected one floating-point dtype"):
        act_linear(x.to(torch.bfloat16), w, None, thr, False)
    with pytest.raises(ValueError, match=r"^x: expected last dimension in_features=16"):
        act_linear(torch.randn(3, 15, dtype=dtype), w, None, thr, False)
