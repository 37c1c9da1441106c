"""Mask producers: shapes, exact counts, pattern validators, optimality against brute force, bad input."""

import itertools
import math

import pytest
import torch

from sparseops import masks as M

FLOATS = [torch.float32, torch.float64, torch.float16, torch.bfloat16]


def _ids(dtype):
    return str(dtype).replace("torch.", "")


# ---- nm ----

NM_CASES = [
    pytest.param(2, 4, (8, 16), id="2:4-8x16"),
    pytest.param(1, 4, (5, 3), id="1:4-5x3-partial"),
    pytest.param(3, 4, (4, 37), id="3:4-4x37-partial"),
    pytest.param(2, 4, (3, 1), id="2:4-3x1-short"),
    pytest.param(4, 8, (2, 1000), id="4:8-2x1000"),
    pytest.param(1, 16, (6, 37), id="1:16-6x37"),
    pytest.param(15, 16, (3, 40), id="15:16-3x40"),
    pytest.param(2, 4, (2, 3, 12), id="2:4-3d"),
]


def _brute_nm(w, n, m):
    """Top-n per group by python loops: sort each group's (|w|, index) with ties to the lower index."""
    flat = w.abs().double().reshape(-1, w.shape[-1])
    out = torch.zeros(flat.shape, dtype=torch.bool)
    for r in range(flat.shape[0]):
        for g in range(0, flat.shape[1], m):
            group = list(range(g, min(g + m, flat.shape[1])))
            best = sorted(group, key=lambda j: (-float(flat[r, j]), j))[:n]
            for j in best:
                out[r, j] = True
    return out.view(w.shape)


@pytest.mark.parametrize("n, m, shape", NM_CASES)
def test_nm_counts_and_brute_force(n, m, shape):
    w = torch.randn(shape)
    before = w.clone()
    mask = M.nm(w, n, m)
    assert mask.dtype == torch.bool and mask.shape == w.shape
    assert torch.equal(w, before)
    assert M.is_nm(mask, n, m)
    cols = shape[-1]
    flat = mask.reshape(-1, cols)
    for g in range(0, cols, m):
        width = min(m, cols - g)
        assert (flat[:, g : g + width].sum(1) == min(n, width)).all()
    assert torch.equal(mask, _brute_nm(w, n, m))


@pytest.mark.parametrize("dtype", FLOATS, ids=_ids)
def test_nm_dtypes_match_fp64_ranking(dtype):
    w = torch.randn(16, 64).to(dtype)
    assert torch.equal(M.nm(w, 2, 4), _brute_nm(w, 2, 4))


def test_nm_ties_go_to_lower_index():
    mask = M.nm(torch.ones(2, 8), 2, 4)
    assert mask[0].tolist() == [True, True, False, False] * 2


def test_nm_keeps_inf_and_empty():
    w = torch.tensor([[1.0, float("-inf"), 2.0, 0.5]])
    assert M.nm(w, 1, 4).tolist() == [[False, True, False, False]]
    assert M.nm(torch.zeros(0, 8), 2, 4).shape == (0, 8)


def test_is_nm_detects_violation():
    mask = torch.zeros(2, 10, dtype=torch.bool)
    mask[0, 8:10] = True
    assert M.is_nm(mask, 2, 4)
    mask[1, :3] = True
    assert not M.is_nm(mask, 2, 4)
    assert M.is_nm(mask, 3, 4)


# ---- transposable nm ----


def _feasible_masks(r, c, n):
    """All r x c 0/1 masks with at most n ones per row and column, built independently of sparseops."""
    rows = [s for k in range(n + 1) for s in itertools.combinations(range(c), k)]
    out = []
    for choice in itertools.product(rows, repeat=r):
        cols = [sum(j in row for row in choice) for j in range(c)]
        if max(cols, default=0) <= n:
            mask = torch.zeros(r, c, dtype=torch.bool)
            for i, row in enumerate(choice):
                mask[i, list(row)] = True
            out.append(mask)
    return torch.stack(out)


def _brute_transposable(w, n, m):
    """Best mask per m x m block (edges partial), maximising the kept |w| by enumeration."""
    a = w.abs().double()
    out = torch.zeros(w.shape, dtype=torch.bool)
    cache = {}
    for i in range(0, w.shape[0], m):
        for j in range(0, w.shape[1], m):
            blk = a[i : i + m, j : j + m]
            key = tuple(blk.shape)
            if key not in cache:
                cache[key] = _feasible_masks(*key, n)
            cands = cache[key]
            vals = (cands.double() * blk).sum((1, 2))
            out[i : i + m, j : j + m] = cands[vals.argmax()]
    return out


TRANS_CASES = [
    pytest.param((8, 12), id="8x12-full"),
    pytest.param((5, 7), id="5x7-partial"),
    pytest.param((3, 3), id="3x3-single-partial"),
    pytest.param((4, 1), id="4x1"),
]


@pytest.mark.parametrize("shape", TRANS_CASES)
def test_transposable_2_4_is_brute_force_optimum(shape):
    w = torch.randn(shape, dtype=torch.float64)
    before = w.clone()
    mask = M.transposable_nm(w, 2, 4)
    assert torch.equal(w, before)
    assert mask.dtype == torch.bool and mask.shape == w.shape
    ref = _brute_transposable(w, 2, 4)
    kept, best = float((w.abs() * mask).sum()), float((w.abs() * ref).sum())
    assert kept == pytest.approx(best, rel=1e-12)
    # a continuous weight has a unique optimum
    assert torch.equal(mask, ref)


@pytest.mark.parametrize(
    "n, m, shape, method",
    [
        pytest.param(2, 4, (64, 64), "auto", id="2:4-exhaustive"),
        pytest.param(1, 4, (37, 41), "auto", id="1:4-exhaustive-odd"),
        pytest.param(3, 4, (20, 37), "auto", id="3:4-exhaustive-odd"),
        pytest.param(1, 2, (9, 9), "auto", id="1:2-exhaustive"),
        pytest.param(2, 4, (64, 64), "greedy", id="2:4-greedy"),
        pytest.param(4, 8, (64, 64), "auto", id="4:8-greedy"),
        pytest.param(2, 8, (37, 1000), "auto", id="2:8-greedy-odd"),
        pytest.param(7, 8, (40, 37), "auto", id="7:8-greedy"),
        pytest.param(1, 16, (48, 48), "auto", id="1:16-greedy"),
    ],
)
def test_transposable_nm_both_orientations(n, m, shape, method):
    w = torch.randn(shape)
    mask = M.transposable_nm(w, n, m, method=method)
    assert mask.shape == w.shape and mask.dtype == torch.bool
    assert M.is_transposable_nm(mask, n, m)
    assert M.is_nm(mask, n, m) and M.is_nm(mask.t(), n, m)
    plain = M.kept_magnitude(w, M.nm(w, n, m))
    kept = M.kept_magnitude(w, mask)
    assert kept <= plain + 1e-12
    assert kept >= 0.85 * plain


def test_transposable_greedy_close_to_exhaustive():
    w = torch.randn(128, 128, dtype=torch.float64)
    best = M.kept_magnitude(w, M.transposable_nm(w, 2, 4))
    plain_greedy = M.kept_magnitude(w, M.transposable_nm(w, 2, 4, method="greedy", swaps=0))
    greedy = M.kept_magnitude(w, M.transposable_nm(w, 2, 4, method="greedy"))
    assert plain_greedy <= greedy <= best + 1e-12
    assert greedy >= 0.98 * best


def test_transposable_batched_and_dtypes():
    w = torch.randn(3, 8, 8)
    mask = M.transposable_nm(w, 2, 4)
    for b in range(3):
        assert torch.equal(mask[b], M.transposable_nm(w[b], 2, 4))
    for dtype in (torch.float16, torch.bfloat16):
        assert M.is_transposable_nm(M.transposable_nm(w.to(dtype), 2, 4), 2, 4)


def test_transposable_ties_are_deterministic():
    w = torch.ones(8, 8)
    a, b = M.transposable_nm(w, 2, 4), M.transposable_nm(w.clone(), 2, 4)
    assert torch.equal(a, b)
    assert (a.view(2, 4, 2, 4).sum(3) == 2).all() and (a.view(2, 4, 2, 4).sum(1) == 2).all()


def test_is_transposable_nm_detects_column_violation():
    col = torch.zeros(8, 8, dtype=torch.bool)
    col[:3, 0] = True
    assert M.is_nm(col, 2, 4) and not M.is_nm(col.t(), 2, 4)
    assert not M.is_transposable_nm(col, 2, 4)
    assert M.is_transposable_nm(col, 3, 4)


def test_nm_quality_orders():
    q = M.nm_quality(torch.randn(64, 64), 2, 4)
    assert set(q) == {"transposable", "plain"}
    assert 0.5 < q["transposable"] <= q["plain"] < 1.0


# ---- fan-in ----


@pytest.mark.parametrize(
    "shape, k",
    [
        pytest.param((8, 37), 1, id="k1"),
        pytest.param((8, 37), 37, id="k-in"),
        pytest.param((5, 1000), 100, id="in1000-k100"),
        pytest.param((4, 3, 3, 3), 5, id="conv-k5"),
    ],
)
def test_fan_in(shape, k):
    w = torch.randn(shape)
    mask = M.fan_in(w, k)
    assert mask.dtype == torch.bool and mask.shape == w.shape
    assert M.is_fan_in(mask, k)
    assert (mask.reshape(shape[0], -1).sum(1) == k).all()
    rows = w.reshape(shape[0], -1).abs()
    for r in range(shape[0]):
        top = sorted(range(rows.shape[1]), key=lambda j: (-float(rows[r, j]), j))[:k]
        assert mask.reshape(shape[0], -1)[r].nonzero().flatten().tolist() == sorted(top)
    assert not M.is_fan_in(mask, k + 1)


# ---- random and ERK ----


@pytest.mark.parametrize(
    "shape, sparsity",
    [pytest.param((10, 10), 0.9, id="10x10-sp0.9"), pytest.param((7, 13), 0.5, id="7x13-sp0.5"), pytest.param(5, 0.0, id="5-dense")],
)
def test_random_exact_count_and_seed(shape, sparsity):
    numel = math.prod(shape) if isinstance(shape, tuple) else shape
    a = M.random(shape, sparsity, generator=torch.Generator().manual_seed(3))
    b = M.random(shape, sparsity, generator=torch.Generator().manual_seed(3))
    assert a.dtype == torch.bool and int(a.sum()) == numel - round(sparsity * numel)
    assert torch.equal(a, b)


def test_random_seeds_differ():
    a = M.random((64, 64), 0.5, generator=torch.Generator().manual_seed(0))
    b = M.random((64, 64), 0.5, generator=torch.Generator().manual_seed(1))
    assert not torch.equal(a, b)


SHAPES = [(64, 32), (256, 256), (10, 784), (512, 1024), (16, 3, 3, 3)]


@pytest.mark.parametrize("sparsity", [0.5, 0.8, 0.9, 0.99], ids=lambda s: f"sp{s}")
def test_erk_densities(sparsity):
    dens = M.erk_densities(SHAPES, sparsity)
    numels = [math.prod(s) for s in SHAPES]
    total = sum(d * n for d, n in zip(dens, numels)) / sum(numels)
    assert total == pytest.approx(1 - sparsity, abs=1e-6)
    assert all(0 < d <= 1 for d in dens)
    # more parameters (with a smaller sum of dims per parameter) -> lower density
    assert dens[3] < dens[1] <= dens[0]


def test_erk_clamps_to_dense_and_resolves():
    shapes = [(4, 4), (2048, 2048)]
    dens = M.erk_densities(shapes, 0.5)
    assert dens[0] == 1.0
    total = (dens[0] * 16 + dens[1] * 2048**2) / (16 + 2048**2)
    assert total == pytest.approx(0.5, abs=1e-6)


def test_erk_masks_min_per_layer():
    ws = [torch.zeros(4, 4), torch.zeros(4, 4), torch.zeros(8, 8)]
    masks = M.erk(ws, 0.99, generator=torch.Generator().manual_seed(0))
    assert all(int(m.sum()) >= 1 for m in masks)
    dens = M.erk_densities([w.shape for w in ws], 0.99)
    assert round(dens[0] * 16) == 0  # without the guard this layer would be empty


def test_erk_densities_pin_small_layers_and_re_solve_the_rest():
    # a layer under min_per_layer entries is pinned to min_per_layer / numel, and eps is solved again so
    # that the total still meets the target (the floors alone stay under it here)
    shapes = [(4, 4), (4, 4), (64, 64)]
    numels = [16, 16, 4096]
    sparsity, floor = 0.99, 8
    plain = M.erk_densities(shapes, sparsity)
    assert plain[0] * 16 < floor, "the case must need the floor"
    dens = M.erk_densities(shapes, sparsity, min_per_layer=floor)
    assert dens[0] == dens[1] == floor / 16
    target = (1 - sparsity) * sum(numels)
    assert sum(d * n for d, n in zip(dens, numels)) == pytest.approx(target, rel=1e-12)
    # the free layer keeps its ER density up to the common scale: below the plain solution, since the
    # pinned layers took more than their share
    assert dens[2] < plain[2]


def test_erk_masks_counts_and_seed():
    ws = [torch.randn(s) for s in SHAPES]
    a = M.erk(ws, 0.9, generator=torch.Generator().manual_seed(5))
    b = M.erk(ws, 0.9, generator=torch.Generator().manual_seed(5))
    dens = M.erk_densities(SHAPES, 0.9)
    for m, w, d, m2 in zip(a, ws, dens, b):
        assert m.shape == w.shape and m.dtype == torch.bool
        assert int(m.sum()) == round(d * w.numel())
        assert torch.equal(m, m2)


# ---- wanda ----


def test_wanda_with_unit_norms_is_per_row_magnitude():
    w = torch.randn(16, 50)
    mask = M.wanda(w, torch.ones(50), 0.6)
    assert torch.equal(mask, M.fan_in(w, 50 - 30))
    assert (mask.sum(1) == 20).all()


def test_wanda_skewed_norm_changes_the_mask():
    w = torch.randn(16, 50)
    norm = torch.ones(50)
    norm[:10] = 100.0
    mask = M.wanda(w, norm, 0.6)
    assert not torch.equal(mask, M.wanda(w, torch.ones(50), 0.6))
    assert mask[:, :10].sum() > M.wanda(w, torch.ones(50), 0.6)[:, :10].sum()
    score = w.abs() * norm
    for r in range(16):
        top = sorted(range(50), key=lambda j: (-float(score[r, j]), j))[:20]
        assert mask[r].nonzero().flatten().tolist() == sorted(top)


def test_activation_norms():
    x = torch.randn(4, 6, 10)
    ref = x.double().reshape(-1, 10).pow(2).sum(0).sqrt()
    torch.testing.assert_close(M.activation_norms(x).double(), ref, rtol=1e-5, atol=1e-6)
    half = M.activation_norms(torch.full((70000, 2), 1.0, dtype=torch.float16))
    assert half.dtype == torch.float32 and torch.isfinite(half).all()


# ---- bad input ----

W = torch.randn(4, 8)
BAD = [
    pytest.param(lambda: M.nm(W, 4, 4), ValueError, "n:", id="nm-n-eq-m"),
    pytest.param(lambda: M.nm(W, 0, 4), ValueError, "n:", id="nm-n0"),
    pytest.param(lambda: M.nm(W, 2, 32), ValueError, "m:", id="nm-m32"),
    pytest.param(lambda: M.nm(W, 2.0, 4), TypeError, "n:", id="nm-n-float"),
    pytest.param(lambda: M.nm(W.long(), 2, 4), TypeError, "weight:", id="nm-int-weight"),
    pytest.param(lambda: M.nm(torch.tensor([float("nan"), 1.0]), 1, 2), ValueError, "weight:", id="nm-nan"),
    pytest.param(lambda: M.is_nm(W, 2, 4), TypeError, "mask:", id="is_nm-float-mask"),
    pytest.param(lambda: M.transposable_nm(W, 2, 2), ValueError, "n:", id="trans-n-eq-m"),
    pytest.param(lambda: M.transposable_nm(W, 2, 17), ValueError, "m:", id="trans-m17"),
    pytest.param(lambda: M.transposable_nm(torch.randn(8), 2, 4), ValueError, "weight:", id="trans-1d"),
    pytest.param(lambda: M.transposable_nm(W, 2, 8, method="exhaustive"), ValueError, "method:", id="trans-exh-m8"),
    pytest.param(lambda: M.transposable_nm(W, 2, 4, method="lp"), ValueError, "method:", id="trans-method"),
    pytest.param(lambda: M.transposable_nm(W.int(), 2, 4), TypeError, "weight:", id="trans-int"),
    pytest.param(lambda: M.fan_in(W, 9), ValueError, "k:", id="fan_in-k-gt-in"),
    pytest.param(lambda: M.fan_in(W, 0), ValueError, "k:", id="fan_in-k0"),
    pytest.param(lambda: M.fan_in(W.bool(), 1), TypeError, "weight:", id="fan_in-bool"),
    pytest.param(lambda: M.random((4, 4), 1.0), ValueError, "sparsity:", id="random-sp1"),
    pytest.param(lambda: M.random((4, -1), 0.5), ValueError, "shape:", id="random-neg-dim"),
    pytest.param(lambda: M.erk_densities([(4, 4)], 1.0), ValueError, "sparsity:", id="erk-sp1"),
    pytest.param(lambda: M.erk_densities([(4, 4)], 0.5, power_scale=-1.0), ValueError, "power_scale:", id="erk-power"),
    pytest.param(lambda: M.erk([W, W.long()], 0.5), TypeError, "weights[1]:", id="erk-int-weight"),
    pytest.param(lambda: M.wanda(W, torch.ones(7), 0.5), ValueError, "activation_norm:", id="wanda-norm-len"),
    pytest.param(lambda: M.wanda(W, -torch.ones(8), 0.5), ValueError, "activation_norm:", id="wanda-norm-neg"),
    pytest.param(lambda: M.wanda(W, torch.ones(8), 1.0), ValueError, "sparsity:", id="wanda-sp1"),
    pytest.param(lambda: M.wanda(W.long(), torch.ones(8), 0.5), TypeError, "weight:", id="wanda-int"),
    pytest.param(lambda: M.activation_norms(torch.ones(3, 4, dtype=torch.int32)), TypeError, "samples:", id="norms-int"),
]


@pytest.mark.parametrize("call, exc, prefix", BAD)
def test_bad_input_names_the_argument(call, exc, prefix):
    with pytest.raises(exc) as info:
        call()
    assert str(info.value).startswith(prefix)


def test_random_refuses_a_generator_that_is_not_one():
    with pytest.raises(TypeError, match="^generator: expected a torch.Generator or None, got int"):
        M.random((3, 4), 0.5, generator=0)
    with pytest.raises(TypeError, match="^generator: expected a torch.Generator or None, got int"):
        M.erk([torch.randn(3, 4)], 0.5, generator=0)


@pytest.mark.parametrize("shapes,kw,exc,match", [
    pytest.param([()], {}, ValueError, r"^shapes\[0\]: expected at least one dimension", id="0-d"),
    pytest.param((3, 4), {}, TypeError, "^shapes: expected a list of layer shapes", id="one-shape"),
    pytest.param([(1000, 1000)], {"power_scale": 300}, ValueError, "^power_scale: 300", id="underflow"),
    pytest.param([(1, 1), (4, 4)], {"power_scale": 2000}, ValueError, "^power_scale: 2000", id="overflow"),
])
def test_erk_densities_refuses_what_it_cannot_solve(shapes, kw, exc, match):
    with pytest.raises(exc, match=match):
        M.erk_densities(shapes, 0.5, **kw)


def test_global_magnitude_refuses_a_single_tensor():
    with pytest.raises(TypeError, match="^weights: expected a list of tensors"):
        M.global_magnitude(torch.randn(3, 4), 0.5)


@pytest.mark.parametrize("weight,mask,exc,match", [
    pytest.param(torch.tensor(1.0), None, TypeError, r"^weight: expected a 2-D tensor \[out, in\], got shape \(\)",
                 id="0-d-weight"),
    pytest.param([[1.0]], None, TypeError, r"^weight: expected a 2-D tensor \[out, in\], got list", id="list-weight"),
    pytest.param(torch.randn(8, 16), torch.zeros(2, 4, dtype=torch.bool), ValueError,
                 r"^mask: expected a bool tensor of the weight's shape \(8, 16\), got torch.bool \(2, 4\)", id="mask-shape"),
    pytest.param(torch.randn(8, 16), 5, ValueError, r"^mask: expected a bool tensor of the weight's shape", id="mask-int"),
])
def test_for_pattern_checks_weight_and_mask(weight, mask, exc, match):
    with pytest.raises(exc, match=match):
        M.for_pattern("2:4", weight, mask=mask)


def test_activation_norms_of_no_features_and_wanda_refuses_inf():
    assert M.activation_norms(torch.zeros(4, 0)).shape == (0,)
    w = torch.randn(2, 4)
    w[0, 1] = float("inf")
    with pytest.raises(ValueError, match="^weight, activation_norm: expected finite values"):
        M.wanda(w, torch.tensor([1.0, 0.0, 1.0, 1.0]), 0.5)


def test_small_validation_gaps_found_by_review():
    from sparseops.formats import ELLWeight
    from sparseops.masks import global_magnitude, kept_magnitude

    # global_magnitude takes any iterable of tensors (model.parameters() is a generator)
    ws = [torch.randn(4, 4), torch.randn(3, 5)]
    assert [m.sum().item() for m in global_magnitude(iter(ws), 0.5)] == [m.sum().item() for m in global_magnitude(ws, 0.5)]
    with pytest.raises(TypeError, match="^weights: expected a list of tensors"):
        global_magnitude(5, 0.5)
    # an infinite magnitude has no kept fraction (it read nan)
    with pytest.raises(ValueError, match="^weight: holds inf"):
        kept_magnitude(torch.tensor([float("inf"), 1.0]), torch.tensor([True, False]))
    # ELL rows out of order are refused by validate(), as from_rows_col refuses them
    ell = ELLWeight.from_rows_col(3, 4, torch.tensor([0, 1, 2], dtype=torch.int32),
                                  torch.tensor([[0], [1], [2]], dtype=torch.int32))
    ell.validate()
    bad = ELLWeight(ell.k, torch.tensor([2, 1, 0], dtype=torch.int32), ell.csr)
    with pytest.raises(ValueError, match="^rows: expected strictly ascending"):
        bad.validate()
