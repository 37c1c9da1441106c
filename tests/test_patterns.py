"""Patterns through SparseLinear and sparsify_: N:M (plain and transposable) and constant fan-in."""

import pytest
import torch
from helpers import assert_close_rms

import sparseops
from sparseops import NM, FanIn, SparseLinear
from sparseops.masks import is_fan_in, is_nm, is_transposable_nm
from sparseops.patterns import as_pattern

PATTERNS = [
    pytest.param("2:4", id="2:4"),
    pytest.param(NM(1, 4), id="1:4"),
    pytest.param(NM(2, 8), id="2:8"),
    pytest.param(NM(3, 4), id="3:4"),
    pytest.param(NM(2, 4, transposable=True), id="2:4T"),
    pytest.param(FanIn(5), id="fanin5"),
    pytest.param(FanIn(1), id="fanin1"),
]


def _holds(pattern, mask):
    p = as_pattern(pattern)
    if isinstance(p, NM):
        return is_transposable_nm(mask, p.n, p.m) if p.transposable else is_nm(mask, p.n, p.m)
    return is_fan_in(mask, p.k)


@pytest.mark.parametrize("in_f,out_f", [pytest.param(37, 11, id="in37-out11"), pytest.param(64, 32, id="in64-out32")])
@pytest.mark.parametrize("pattern", PATTERNS)
def test_sparse_linear_from_dense_pattern(pattern, in_f, out_f):
    lin = torch.nn.Linear(in_f, out_f).double()
    layer = SparseLinear.from_dense(lin, pattern=pattern)
    assert _holds(pattern, layer.mask)
    x = torch.randn(2, 3, in_f, dtype=torch.float64, requires_grad=True)
    y = layer(x)
    w = (lin.weight.detach() * layer.mask).requires_grad_(True)
    xr = x.detach().clone().requires_grad_(True)
    yr = torch.nn.functional.linear(xr, w, lin.bias.detach())
    assert_close_rms(y, yr, name="y")
    g = torch.randn_like(y)
    y.backward(g)
    yr.backward(g)
    assert_close_rms(x.grad, xr.grad, name="dx")
    assert_close_rms(layer.values.grad, layer.format.gather(w.grad), name="dW on mask")


@pytest.mark.parametrize("pattern", PATTERNS)
def test_sparse_linear_pattern_survives_training(pattern):
    torch.manual_seed(1)
    layer = SparseLinear(40, 24, pattern=pattern)
    mask = layer.mask.clone()
    opt = torch.optim.AdamW(layer.parameters(), lr=1e-2, weight_decay=0.1)
    for _ in range(5):
        opt.zero_grad()
        layer(torch.randn(16, 40)).square().mean().backward()
        opt.step()
    assert torch.equal(layer.mask, mask)
    assert _holds(pattern, layer.mask)
    assert (layer.to_dense().weight.detach()[~mask] == 0).all()


def test_sparsify_nm_swaps_every_linear():
    model = torch.nn.Sequential(torch.nn.Linear(16, 32), torch.nn.ReLU(), torch.nn.Linear(32, 8))
    sparseops.sparsify_(model, pattern="1:4")
    for m in (model[0], model[2]):
        assert isinstance(m, SparseLinear) and is_nm(m.mask, 1, 4)
        assert m.sparsity == pytest.approx(0.75)


def test_pattern_shorthand_and_names():
    assert as_pattern("2:4") == NM(2, 4)
    assert as_pattern("2:8t") == as_pattern("2:8T") == NM(2, 8, transposable=True)
    assert as_pattern("butterfly") == sparseops.Butterfly()
    for bad in ("2:t", "t:4", "2:4tt", "2:4x"):
        with pytest.raises(ValueError, match="unknown pattern"):
            as_pattern(bad)
    assert NM(2, 8, transposable=True).name == "2:8T"
    assert "pattern=2:4" in repr(SparseLinear(8, 4, pattern="2:4"))
    # the names the profiler, explain and profile.json print parse back (butterfly's aside)
    from sparseops.patterns import Block, Monarch

    for p in (NM(2, 4), NM(1, 8, transposable=True), FanIn(16), Block(32), Monarch(4)):
        assert as_pattern(p.name) == p, p.name
    assert as_pattern("fanin:16") == FanIn(16) and as_pattern("block:32") == Block(32)
    for bad in ("fanin", "block:", "monarch:x", "blocks32", "fanin-16"):
        with pytest.raises(ValueError, match="unknown pattern"):
            as_pattern(bad)


@pytest.mark.parametrize(
    "kwargs,exc,match",
    [
        pytest.param(dict(pattern="2:4", sparsity=0.5), ValueError, "sparsity", id="nm-with-sparsity"),
        pytest.param(dict(pattern=FanIn(100)), ValueError, "k", id="fanin-k-too-large"),
        pytest.param(dict(pattern="4:4"), ValueError, "n", id="n-equals-m"),
        pytest.param(dict(pattern="2:17"), ValueError, "n", id="m-too-large"),
        pytest.param(lambda: dict(pattern=FanIn(0)), ValueError, "k", id="fanin-zero"),
        pytest.param(dict(pattern=NM(2, 4), mask=torch.ones(4, 64, dtype=torch.bool)), ValueError, "mask", id="mask-breaks-nm"),
        pytest.param(dict(pattern=FanIn(3), mask=torch.ones(4, 64, dtype=torch.bool)), ValueError, "mask", id="mask-breaks-fanin"),
    ],
)
def test_sparse_linear_rejects_bad_pattern_arguments(kwargs, exc, match):
    with pytest.raises(exc, match=match):
        SparseLinear(64, 4, **(kwargs() if callable(kwargs) else kwargs))


def test_sparsify_global_scope_needs_unstructured():
    model = torch.nn.Sequential(torch.nn.Linear(16, 32))
    with pytest.raises(ValueError, match="scope"):
        sparseops.sparsify_(model, pattern="2:4", scope="global")
    assert type(model[0]) is torch.nn.Linear
