"""Constant fan-in layers stored as ELL: values [rows, k], col [rows, k], rows [a]; against fp64 dense."""

import copy
import io

import pytest
import torch
from helpers import assert_close_rms
from torch import nn

import sparseops
from sparseops import FanIn, SparseLinear
from sparseops.formats import CSRWeight, ELLWeight


def _mask_with_empty_rows(out_f, in_f, k, empty, g):
    """A fan-in mask: k random columns a row, none in the rows ``empty`` (SRigL's ablated neurons)."""
    mask = torch.zeros(out_f, in_f, dtype=torch.bool)
    for r in range(out_f):
        if r not in empty:
            mask[r, torch.randperm(in_f, generator=g)[:k]] = True
    return mask


def _layer(in_f, out_f, k, empty=(), bias=True, seed=0):
    """A fan-in SparseLinear (rows ``empty`` emptied through update_mask_) and its fp64 dense twin."""
    g = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    lin = nn.Linear(in_f, out_f, bias=bias)
    layer = SparseLinear.from_dense(lin, pattern=FanIn(k))
    if empty:
        layer.update_mask_(_mask_with_empty_rows(out_f, in_f, k, set(empty), g))
        with torch.no_grad():
            layer.values.copy_(torch.randn(layer.values.shape, generator=g))
    w = layer.dense_weight().detach().double()
    b = layer.bias.detach().double() if bias else None
    return layer, w, b


CASES = [
    pytest.param(37, 3, 5, (), (1,), id="in37-out3-k5-B1"),
    pytest.param(3, 37, 3, (), (5,), id="in3-out37-k=in"),
    pytest.param(1000, 37, 1, (0, 36), (2, 3), id="in1000-out37-k1-empty-rows"),
    pytest.param(37, 1000, 10, tuple(range(0, 1000, 7)), (9,), id="in37-out1000-k10-ablated"),
    pytest.param(1, 1, 1, (), (37,), id="in1-out1-k1"),
    pytest.param(64, 48, 16, (5, 6, 7), (300,), id="in64-out48-k16-B300-blocked"),
]


def test_storage_is_ell():
    layer, _, _ = _layer(37, 11, 5)
    assert layer.values.shape == (11, 5)
    assert layer.col.shape == (11, 5) and layer.col.dtype == torch.int32
    assert torch.equal(layer.rows, torch.arange(11, dtype=torch.int32))
    # sorted, unique columns along each row, and the dense weight has them
    assert bool((layer.col[:, 1:] > layer.col[:, :-1]).all())
    w = layer.dense_weight().detach()
    assert torch.equal(w.gather(1, layer.col.long()), layer.values.detach())
    assert int((w != 0).sum()) <= 55
    # no row pointers and no per-weight row index in the checkpoint
    assert set(layer.state_dict()) == {"rows", "col", "values", "bias", "dense_shape"}
    fmt = layer.format
    assert isinstance(fmt, ELLWeight) and fmt.k == 5 and fmt.values_shape == (11, 5)
    fmt.validate()
    assert torch.equal(fmt.csr.col.view(11, 5), fmt.col)


def test_ablated_rows_are_left_out_of_storage():
    layer, w, _ = _layer(20, 9, 4, empty=(0, 3, 8))
    assert layer.values.shape == (6, 4) and layer.col.shape == (6, 4)
    assert layer.rows.tolist() == [1, 2, 4, 5, 6, 7]
    assert layer.nnz == 24 and layer.mask.sum(1).tolist() == [0, 4, 4, 0, 4, 4, 4, 4, 0]
    assert bool((w[[0, 3, 8]] == 0).all())


@pytest.mark.parametrize("in_f,out_f,k,empty,lead", CASES)
def test_forward_backward_against_fp64_dense(isa, in_f, out_f, k, empty, lead):
    layer, w, b = _layer(in_f, out_f, k, empty)
    # a non-contiguous input: every other column of a wider tensor
    x = torch.randn(*lead, 2 * in_f)[..., ::2].requires_grad_()
    assert not x.is_contiguous()
    y = layer(x)
    wd = w.clone().requires_grad_()
    bd = b.clone().requires_grad_()
    xd = x.detach().double().requires_grad_()
    ref = xd @ wd.t() + bd
    assert_close_rms(y, ref, name="forward")
    # empty rows give the bias alone
    if empty:
        assert torch.equal(y.detach()[..., list(empty)], layer.bias.detach()[list(empty)].expand(*lead, len(empty)))
    g = torch.randn_like(y)
    y.backward(g)
    ref.backward(g.double())
    assert_close_rms(x.grad, xd.grad, name="dx")
    assert_close_rms(layer.bias.grad, bd.grad, name="dbias")
    # dW only on the stored weights: the dense gradient gathered at [rows, k]
    assert layer.values.grad.shape == layer.values.shape
    expect = wd.grad[layer.rows.long()].gather(1, layer.col.long())
    assert_close_rms(layer.values.grad, expect, name="dvalues")


def test_training_keeps_zeros_and_shape():
    layer, _, _ = _layer(30, 12, 6, empty=(2,))
    opt = torch.optim.Adam(layer.parameters(), lr=1e-2)
    mask = layer.mask.clone()
    for _ in range(3):
        loss = layer(torch.randn(8, 30)).pow(2).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert torch.equal(layer.mask, mask)
    assert bool((layer.dense_weight()[~mask] == 0).all())
    assert opt.state[layer.values]["exp_avg"].shape == (11, 6)


def test_state_dict_round_trip_across_k_and_ablation():
    src, _, _ = _layer(25, 10, 7, empty=(4, 9))
    dst = SparseLinear(25, 10, pattern=FanIn(3))
    dst.load_state_dict(src.state_dict())
    assert dst.pattern == FanIn(7) and dst.values.shape == (8, 7)
    assert torch.equal(dst.rows, src.rows) and torch.equal(dst.col, src.col)
    x = torch.randn(4, 25)
    assert torch.equal(dst(x), src(x))
    buf = io.BytesIO()
    torch.save(src.state_dict(), buf)
    buf.seek(0)
    again = SparseLinear(25, 10, pattern=FanIn(1))
    again.load_state_dict(torch.load(buf))
    assert torch.equal(again(x), src(x))


def _legacy_csr_state(layer):
    """The checkpoint an earlier version wrote for a fan-in layer: its CSR index and values [nnz]."""
    fmt = layer.format.csr
    sd = {k: v for k, v in layer.state_dict().items() if k not in ("rows", "col")}
    sd["crow"], sd["col"] = fmt.crow.clone(), fmt.col.clone()
    sd["values"] = layer.values.detach().reshape(-1).clone()
    return sd


def test_loads_the_csr_checkpoint_of_earlier_versions():
    src, _, _ = _layer(25, 10, 7, empty=(1,))
    legacy = _legacy_csr_state(src)
    dst = SparseLinear(25, 10, pattern=FanIn(7))
    dst.load_state_dict(legacy)  # strict: no key left over or missing
    assert dst.values.shape == (9, 7) and torch.equal(dst.rows, src.rows)
    x = torch.randn(3, 25)
    assert torch.equal(dst(x), src(x))
    assert set(legacy) == {"crow", "col", "values", "bias", "dense_shape"}  # the caller's dict is untouched
    assert legacy["values"].shape == (63,)


def test_unstructured_layer_loads_a_fan_in_checkpoint_and_back():
    src, _, _ = _layer(25, 10, 7, empty=(3,))
    un = SparseLinear(25, 10, sparsity=0.5)
    un.load_state_dict(src.state_dict())
    assert un.values.shape == (63,) and "crow" in un.state_dict()
    x = torch.randn(3, 25)
    assert torch.equal(un(x), src(x))
    back = SparseLinear(25, 10, pattern=FanIn(2))
    back.load_state_dict(un.state_dict())
    assert back.pattern == FanIn(7) and torch.equal(back(x), src(x))


def test_a_csr_checkpoint_that_is_not_fan_in_is_refused_and_changes_nothing():
    un = SparseLinear(25, 10, sparsity=0.5)
    layer, _, _ = _layer(25, 10, 4)
    before = {k: v.clone() for k, v in layer.state_dict().items()}
    with pytest.raises(RuntimeError, match=r"rows hold|same number"):
        layer.load_state_dict(un.state_dict())
    after = layer.state_dict()
    assert set(after) == set(before) and all(torch.equal(after[k], before[k]) for k in before)
    assert layer.pattern == FanIn(4)


@pytest.mark.parametrize(
    "what,edit,match",
    [
        ("rows-dtype", lambda sd: sd.__setitem__("rows", sd["rows"].long()), r"rows: expected dtype"),
        ("col-dtype", lambda sd: sd.__setitem__("col", sd["col"].to(torch.int16)), r"col: expected dtype"),
        ("rows-order", lambda sd: sd.__setitem__("rows", sd["rows"].flip(0).contiguous()), r"rows: must be strictly"),
        ("rows-range", lambda sd: sd["rows"].__setitem__(-1, 10), r"rows: entries must lie in \[0, 10\)"),
        ("rows-count", lambda sd: sd.__setitem__("rows", sd["rows"][:-1].clone()), r"rows: expected 10 entries"),
        ("col-range", lambda sd: sd["col"].__setitem__((0, -1), 25), r"col: indices must lie in \[0, 25\)"),
        ("col-order", lambda sd: sd.__setitem__("col", sd["col"].flip(1).contiguous()), r"col: indices must be sorted"),
        ("col-1d", lambda sd: sd.__setitem__("col", sd["col"].reshape(-1).clone()), r"col: expected a 2-D"),
        ("values-shape", lambda sd: sd.__setitem__("values", sd["values"][:, :-1].clone()), r"values: checkpoint holds"),
        ("no-values", lambda sd: sd.pop("values"), r"rows, col and values"),
    ],
    ids=lambda v: v if isinstance(v, str) else "",
)
def test_malformed_ell_checkpoint_is_refused_and_changes_nothing(what, edit, match):
    src, _, _ = _layer(25, 10, 4, seed=1)
    sd = {k: v.clone() for k, v in src.state_dict().items()}
    edit(sd)
    layer, _, _ = _layer(25, 10, 4, seed=2)
    before = {k: v.clone() for k, v in layer.state_dict().items()}
    values = layer.values
    with pytest.raises(RuntimeError, match=match):
        layer.load_state_dict(sd)
    after = layer.state_dict()
    assert set(after) == set(before) and all(torch.equal(after[k], before[k]) for k in before)
    assert layer.values is values and layer.pattern == FanIn(4)


def test_format_validation_names_the_argument():
    layer, _, _ = _layer(12, 6, 3, empty=(2,))
    fmt = layer.format
    bad = ELLWeight(fmt.k + 1, fmt.rows, fmt.csr)
    with pytest.raises(ValueError, match=r"rows, k"):
        bad.validate()
    with pytest.raises(ValueError, match=r"hold \[1, 2\] weights"):
        ELLWeight.from_csr(CSRWeight.from_mask(torch.tensor([[1, 0, 0], [1, 1, 0]], dtype=torch.bool)), "mask")
    with pytest.raises(ValueError, match=r"mask: holds no weight"):
        ELLWeight.from_mask(torch.zeros(3, 4, dtype=torch.bool))
    with pytest.raises(TypeError, match=r"rows: expected a torch.Tensor"):
        ELLWeight.from_rows_col(6, 12, [0, 1], fmt.col)


def test_to_moves_and_casts():
    layer, _, _ = _layer(20, 8, 5, empty=(1,))
    x = torch.randn(3, 20, dtype=torch.float64)
    ref = x @ layer.dense_weight().detach().double().t() + layer.bias.detach().double()
    d = copy.deepcopy(layer).to(torch.float64)
    assert d.values.dtype == torch.float64 and d.col.dtype == torch.int32 and d.values.shape == (7, 5)
    assert_close_rms(d(x), ref, torch.float64)
    if torch.cuda.is_available():
        c = copy.deepcopy(layer).cuda()
        assert c.values.device.type == "cuda" and c.rows.device.type == "cuda" and c.crow.device.type == "cuda"
        assert_close_rms(c(x.float().cuda()).cpu(), ref, torch.float32)


def test_compile_fullgraph_matches_eager():
    torch.manual_seed(3)
    model = nn.Sequential(nn.Linear(24, 16), nn.ReLU(), nn.Linear(16, 8))
    sparseops.sparsify_(model, pattern=FanIn(4))
    assert isinstance(model[0], SparseLinear) and model[0].values.shape == (16, 4)
    compiled = torch.compile(model, fullgraph=True, backend="aot_eager")
    x = torch.randn(5, 24)
    outs = []
    for m in (model, compiled):
        for p in model.parameters():
            p.grad = None
        y = m(x)
        y.pow(2).sum().backward()
        outs.append((y.detach(), model[0].values.grad.clone()))
    assert torch.equal(outs[0][0], outs[1][0])
    assert_close_rms(outs[1][1], outs[0][1].double(), torch.float32, name="compiled dvalues")


def test_fused_activation_over_ell():
    torch.manual_seed(5)
    lin = nn.Linear(30, 14)
    layer = SparseLinear.from_dense(lin, pattern=FanIn(6), activation="gelu", act_bits=2)
    plain = SparseLinear.from_dense(lin, pattern=FanIn(6))
    x = torch.randn(4, 30)
    assert torch.equal(layer(x), torch.nn.functional.gelu(plain(x)))


def test_from_dense_takes_a_fan_in_layers_own_mask_with_ablated_rows():
    # found by review: a FanIn layer with ablated (empty) rows loads and re-packs, but from_dense refused
    # its own mask
    mask = torch.zeros(4, 6, dtype=torch.bool)
    mask[1:, :2] = True  # row 0 ablated, the others hold k = 2
    layer = SparseLinear.from_dense(nn.Linear(6, 4), mask=mask, pattern=FanIn(2))
    assert torch.equal(layer.mask, mask)
    copy_ = SparseLinear.from_dense(layer.to_dense(), mask=layer.mask, pattern=layer.pattern)
    x = torch.randn(3, 6)
    assert torch.equal(copy_(x), layer(x))
    bad = mask.clone()
    bad[2, 3] = True  # 3 in a row
    with pytest.raises(ValueError, match="^mask: does not have exactly k=2 nonzeros in every row"):
        SparseLinear.from_dense(nn.Linear(6, 4), mask=bad, pattern=FanIn(2))
    with pytest.raises(ValueError, match="^mask: does not have exactly k=2"):
        SparseLinear.from_dense(nn.Linear(6, 4), mask=torch.zeros(4, 6, dtype=torch.bool), pattern=FanIn(2))
