"""Few-bit backward tables: the exact dp, the shipped data, exact piecewise-linear tables, errors."""

import ast
import dataclasses
import itertools
import math
import pathlib

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from sparseops.fewbit import _tables
from sparseops.fewbit import table as T

SMOOTH = T.SMOOTH_ACTIVATIONS
DOCS = pathlib.Path(__file__).resolve().parents[1] / "docs" / "fewbit.md"


def _is_f32(t):
    t = torch.as_tensor(t, dtype=torch.float64)
    return torch.equal(t.to(torch.float32).to(torch.float64), t)


def _direct_cost(d, w, cuts):
    """Σ over runs of Σ w (d - weighted mean)², straight from the definition (no prefix sums)."""
    bounds = [0, *cuts, len(d)]
    total = 0.0
    for a, b in zip(bounds[:-1], bounds[1:]):
        ws = sum(w[a:b])
        if ws == 0.0:
            continue
        mean = sum(wi * di for wi, di in zip(w[a:b], d[a:b])) / ws
        total += sum(wi * (di - mean) ** 2 for wi, di in zip(w[a:b], d[a:b]))
    return total


def _brute_force(d, w, intervals):
    best = math.inf
    for cuts in itertools.combinations(range(1, len(d)), intervals - 1):
        best = min(best, _direct_cost(d, w, cuts))
    return best


def _random_weight(grid):
    g = torch.Generator().manual_seed(grid)
    w = torch.rand(grid, generator=g, dtype=torch.float64)
    w[grid // 3] = 0.0  # a zero cell: the dp must cope with empty-weight runs
    return w


@pytest.mark.parametrize(
    "fn, weight, grid, bits, lo, hi",
    [
        ("gelu", "uniform", 10, 1, -10.0, 10.0),
        ("gelu", "uniform", 12, 2, -4.0, 4.0),
        ("tanh", "normal", 11, 2, -3.0, 3.0),
        ("silu", "random", 12, 2, -5.0, 5.0),
        ("hardswish", "random", 11, 1, -4.0, 4.0),
        (torch.sin, lambda x: torch.exp(-x.abs()), 12, 2, -3.0, 3.0),
        ("softsign", "uniform", 12, 3, -2.0, 2.0),
    ],
)
def test_dp_matches_brute_force(fn, weight, grid, bits, lo, hi):
    weight = _random_weight(grid) if isinstance(weight, str) and weight == "random" else weight
    edges, d, w = T.discretize(fn, lo, hi, weight, grid)
    dl, wl = d.tolist(), w.tolist()
    best = _brute_force(dl, wl, 1 << bits)

    cuts, cost = T.optimal_partition(d, w, 1 << bits)
    tol = 1e-12 * max(1.0, best)
    assert abs(cost - best) <= tol
    assert abs(_direct_cost(dl, wl, cuts.tolist()) - best) <= tol

    borders, levels = T.optimal_table(fn, bits, lo, hi, weight, grid)
    table_cuts = torch.searchsorted(edges, borders).tolist()
    assert torch.equal(edges[table_cuts], borders)
    assert abs(_direct_cost(dl, wl, table_cuts) - best) <= tol
    # the levels are the weighted means of their runs
    bounds = [0, *table_cuts, grid]
    for level, a, b in zip(levels.tolist(), bounds[:-1], bounds[1:]):
        ws = w[a:b].sum()
        assert level == pytest.approx(float((w[a:b] * d[a:b]).sum() / ws), rel=1e-12, abs=1e-15)


def test_optimal_partition_random_and_zero_weight_runs():
    g = torch.Generator().manual_seed(3)
    for trial in range(6):
        n = 9
        d = torch.randn(n, generator=g, dtype=torch.float64)
        w = torch.rand(n, generator=g, dtype=torch.float64)
        w[torch.randperm(n, generator=g)[: trial % 4]] = 0.0
        for k in range(1, 5):
            cuts, cost = T.optimal_partition(d, w, k)
            assert len(cuts) == k - 1 and bool((cuts[1:] > cuts[:-1]).all())
            assert all(0 < c < n for c in cuts.tolist())
            best = _brute_force(d.tolist(), w.tolist(), k)
            assert abs(cost - best) <= 1e-12 * max(1.0, best)


def test_zero_weight_interval_gets_unweighted_mean():
    # two weighted cells and four intervals: at least two intervals weigh nothing
    grid = 16
    w = torch.zeros(grid, dtype=torch.float64)
    w[10] = w[11] = 1.0
    edges, d, _ = T.discretize("gelu", -4.0, 4.0, w, grid)
    borders, levels = T.optimal_table("gelu", 2, -4.0, 4.0, w, grid)
    bounds = [0, *torch.searchsorted(edges, borders).tolist(), grid]
    empty = 0
    for level, a, b in zip(levels.tolist(), bounds[:-1], bounds[1:]):
        if float(w[a:b].sum()) == 0.0:
            empty += 1
            assert level == pytest.approx(float(d[a:b].mean()), rel=1e-12)
        else:
            assert level == pytest.approx(float((w[a:b] * d[a:b]).sum() / w[a:b].sum()), rel=1e-12)
    assert empty >= 2
    assert _direct_cost(d.tolist(), w.tolist(), bounds[1:-1]) == 0.0


def test_discretize_grid():
    edges, d, w = T.discretize(torch.sin, -1.0 / 3.0, 2.0 / 3.0, "uniform", 64)
    assert edges.numel() == 65 and _is_f32(edges) and bool((edges[1:] > edges[:-1]).all())
    mids = 0.5 * (edges[1:] + edges[:-1])
    assert torch.allclose(d, torch.cos(mids), rtol=0, atol=1e-15)
    assert torch.equal(w, edges[1:] - edges[:-1])
    # the default grid is exact in float32 without rounding
    edges, _, _ = T.discretize("gelu")
    assert torch.equal(edges, -10.0 + torch.arange(4097, dtype=torch.float64) * (20.0 / 4096))


@pytest.mark.parametrize("bits", [1, 2, 3, 4])
@pytest.mark.parametrize("fn", ["gelu", "selu", torch.atan])
def test_table_shape_and_representability(fn, bits):
    borders, levels = T.optimal_table(fn, bits, -6.0, 6.0, "normal", 512)
    assert borders.dtype == levels.dtype == torch.float64
    assert borders.numel() == (1 << bits) - 1 and levels.numel() == 1 << bits
    assert bool((borders[1:] > borders[:-1]).all())
    assert _is_f32(borders)
    assert bool(torch.isfinite(levels).all())


def test_derivative_and_encode():
    x = torch.linspace(-3, 3, 101, dtype=torch.float64)
    assert torch.allclose(T.derivative(torch.sin, x), torch.cos(x), rtol=0, atol=1e-15)
    relu_grad = T.derivative("relu", torch.tensor([-1.0, 0.0, 2.0]))
    assert torch.equal(relu_grad, torch.tensor([0.0, 0.0, 1.0], dtype=torch.float64))
    b = torch.tensor([-1.0, 0.0, 0.0, 2.5], dtype=torch.float64)
    up = float(torch.nextafter(torch.tensor(2.5), torch.tensor(math.inf)))
    x = torch.tensor([-5.0, -1.0, -0.5, 0.0, -0.0, 1e-30, 2.5, up, float("nan")], dtype=torch.float32)
    assert T.encode(x, b).tolist() == [0, 0, 1, 1, 1, 3, 3, 4, 0]


def test_shipped_data_complete():
    for name in T.ACTIVATIONS:
        for bits in range(1, 5):
            entry = _tables.TABLES[(name, bits)]
            assert len(entry["borders"]) == (1 << bits) - 1 and len(entry["levels"]) == 1 << bits
            assert list(entry["borders"]) == sorted(entry["borders"])
            assert _is_f32(entry["borders"])
            assert entry["params"] == tuple(sorted(T._resolve_params(name, {}).items()))
            assert (entry["lo"], entry["hi"], entry["weight"]) == (-10.0, 10.0, "uniform")
            assert entry["exact"] == (name in T.PWL_ACTIVATIONS and bits >= T._EXACT_BITS[name])
    assert sum(1 for name, _ in _tables.TABLES if name in SMOOTH) == 48


@pytest.mark.parametrize(
    "name, bits", [("gelu", 1), ("gelu", 2), ("gelu", 3), ("gelu", 4), ("selu", 2), ("softsign", 4)]
)
def test_shipped_equals_fresh_computation(name, bits):
    shipped = T.get_table(name, bits)
    borders, levels = T.optimal_table(name, bits)
    assert shipped.borders == tuple(borders.tolist())
    assert shipped.levels == pytest.approx(levels.tolist(), rel=1e-12, abs=1e-15)
    rms, mx = T.approximation_error(name, borders, levels)
    assert (shipped.rms_error, shipped.max_error) == pytest.approx((rms, mx), rel=1e-9, abs=1e-12)
    assert not shipped.exact


def test_error_decreases_with_bits():
    tables = T.shipped_tables()
    for name in SMOOTH:
        rms = [tables[(name, b)].rms_error for b in range(1, 5)]
        assert all(b <= a for a, b in zip(rms, rms[1:])), (name, rms)
        # hardswish's f' jumps at ±3, inside a grid cell (edges are -10 + k·20/4096), so at every
        # width some float32 input near ±3 sees an error close to half the jump
        if name != "hardswish":
            mx = [tables[(name, b)].max_error for b in range(1, 5)]
            assert all(b <= a for a, b in zip(mx, mx[1:])), (name, mx)
        else:
            assert all(tables[(name, b)].max_error > 0.4 for b in range(1, 5))


def test_max_error_bounds_dense_float32_sample():
    g = torch.Generator().manual_seed(11)
    x = (torch.rand(200_000, generator=g, dtype=torch.float64) * 20 - 10).to(torch.float32)
    kinks = torch.tensor([-10.0, -3.0, -0.0, 0.0, 3.0, 10.0], dtype=torch.float32)
    for t in T.shipped_tables().values():
        fn = T.activation_fn(t.name, **dict(t.params))
        pts = torch.cat([x, kinks, torch.tensor(t.borders, dtype=torch.float32)])
        pts = torch.cat([pts, torch.nextafter(pts, torch.full_like(pts, math.inf))]).clamp(-10, 10).to(torch.float64)
        # q as the kernels see it: float32 levels
        q = torch.tensor(t.levels, dtype=torch.float32).to(torch.float64)[T.encode(pts, t.borders)]
        sampled = float((T.derivative(fn, pts) - q).abs().max())
        assert sampled <= t.max_error + 1e-6, (t.name, t.bits, sampled, t.max_error)
        # and the bound is tight: the sample nearly reaches it
        assert sampled >= t.max_error - 5e-3, (t.name, t.bits, sampled, t.max_error)
        assert t.rms_error <= t.max_error


def test_max_error_finds_a_peak_between_samples():
    # f' = 1 + 0.3·exp(-((x - c)/s)²): a bump narrower than the sample spacing would lose a few
    # percent of its height to sampling alone; the refinement must find its top
    c = float(torch.tensor(1.2345678, dtype=torch.float32))
    s = 3e-4
    fn = lambda x: x + 0.15 * math.sqrt(math.pi) * s * torch.erf((x - c) / s)  # noqa: E731
    rms, mx = T.approximation_error(fn, [5.0], [1.0, 1.0])
    assert 0.3 - 1e-7 <= mx <= 0.3 + 1e-12
    assert 0 < rms < 1e-2


def _kink_inputs(points):
    pts = torch.tensor(points, dtype=torch.float32)
    up = torch.nextafter(pts, torch.full_like(pts, math.inf))
    down = torch.nextafter(pts, torch.full_like(pts, -math.inf))
    pts = torch.cat([pts, up, down])
    rand = torch.randn(4096) * 5
    return torch.cat([pts, torch.tensor([0.0, -0.0, 6.0, 3.0, -3.0, 1.0, -1.0]), rand, rand.round()])


@pytest.mark.parametrize(
    "name, params, kinks",
    [
        ("relu", {}, [0.0]),
        ("leaky_relu", {}, [0.0]),
        ("leaky_relu", {"negative_slope": 0.2}, [0.0]),
        ("relu6", {}, [0.0, 6.0]),
        ("hardtanh", {}, [-1.0, 1.0]),
        ("hardtanh", {"min_val": -0.3, "max_val": 0.7}, [-0.3, 0.7]),
        ("hardtanh", {"min_val": -2.0, "max_val": 0.5}, [-2.0, 0.5]),
        ("hardsigmoid", {}, [-3.0, 3.0]),
    ],
)
def test_pwl_exact_matches_torch_fp32(name, params, kinks):
    x = _kink_inputs(kinks).requires_grad_(True)
    T.activation_fn(name, **params)(x).sum().backward()
    expected = x.grad
    for bits in range(T._EXACT_BITS[name], 5):
        borders, levels = T.exact_table(name, bits, **params)
        assert borders.numel() == (1 << bits) - 1 and levels.numel() == 1 << bits
        assert _is_f32(borders) and list(borders.tolist()) == sorted(borders.tolist())
        got = levels.to(torch.float32)[T.encode(x.detach(), borders)]
        assert torch.equal(got, expected), (name, params, bits)
        t = T.get_table(name, bits, **params)
        assert t.exact and t.borders == tuple(borders.tolist()) and t.levels == tuple(levels.tolist())


def test_pwl_defaults_have_zero_error_and_fallback():
    for name in T.PWL_ACTIVATIONS:
        for bits in range(T._EXACT_BITS[name], 5):
            t = T.get_table(name, bits)
            assert t.exact and t.rms_error == 0.0 and t.max_error == 0.0
    for name in ("relu6", "hardtanh", "hardsigmoid"):
        borders, levels = T.exact_table(name, 1)
        ref_b, ref_l = T.optimal_table(T.activation_fn(name), 1)
        assert torch.equal(borders, ref_b) and torch.equal(levels, ref_l)
        assert not T.get_table(name, 1).exact and T.get_table(name, 1).max_error > 0.1
    # padding repeats the last border: the top code is the last real interval
    borders, levels = T.exact_table("relu", 3)
    assert borders.tolist() == [0.0] * 7 and levels.tolist() == [0.0] + [1.0] * 7
    assert T.encode(torch.tensor([-1.0, 0.0, 1.0]), borders).tolist() == [0, 0, 7]


def test_get_table_caching_and_params():
    t = T.get_table("gelu", 2)
    assert T.get_table("gelu", 2, approximate="none") is t
    assert T.get_table("celu", 3, alpha=1) is T.get_table("celu", 3)
    assert dict(t.params) == {"approximate": "none"}
    assert t == T.Table(name="gelu", bits=2, **_tables.TABLES[("gelu", 2)])
    custom = T.get_table("elu", 2, alpha=0.5)
    assert T.get_table("elu", 2, alpha=0.5) is custom
    assert dict(custom.params) == {"alpha": 0.5} and not custom.exact
    borders, levels = T.optimal_table(T.activation_fn("elu", alpha=0.5), 2)
    assert custom.borders == tuple(borders.tolist()) and custom.levels == tuple(levels.tolist())
    assert custom.levels != T.get_table("elu", 2).levels
    with pytest.raises(dataclasses.FrozenInstanceError):
        t.bits = 3


def test_activation_fn_matches_torch():
    x = torch.randn(257, dtype=torch.float64)
    assert torch.equal(T.activation_fn("gelu", approximate="tanh")(x), F.gelu(x, approximate="tanh"))
    assert torch.equal(T.activation_fn("softplus", beta=2.0)(x), F.softplus(x, beta=2.0, threshold=20.0))
    assert torch.equal(T.activation_fn("hardtanh", min_val=-2)(x.float()), F.hardtanh(x.float(), -2.0, 1.0))
    assert torch.equal(T.activation_fn("tanh")(x), torch.tanh(x))
    assert set(T.ACTIVATIONS) == set(SMOOTH) | set(T.PWL_ACTIVATIONS) and len(T.ACTIVATIONS) == 17


def test_callable_fn_and_weights():
    fn = lambda x: x * torch.sigmoid(1.702 * x)  # noqa: E731 - the sigmoid approximation of gelu
    normal = lambda x: torch.exp(-0.5 * x * x) / math.sqrt(2 * math.pi)  # noqa: E731
    b1, l1 = T.optimal_table(fn, 3, weight="normal", grid=1024)
    b2, l2 = T.optimal_table(fn, 3, weight=normal, grid=1024)
    assert torch.equal(b1, b2) and torch.allclose(l1, l2, rtol=1e-12, atol=0)
    # an empirical histogram as the weight, as numpy and as torch
    samples = np.random.default_rng(0).standard_normal(100_000) * 1.5
    hist, _ = np.histogram(samples, bins=1024, range=(-10.0, 10.0))
    b3, l3 = T.optimal_table(fn, 3, weight=hist, grid=1024)
    b4, l4 = T.optimal_table(fn, 3, weight=torch.from_numpy(hist), grid=1024)
    assert torch.equal(b3, b4) and torch.equal(l3, l4)
    assert float(b3.max()) < 6.0  # the borders follow the data
    rms, mx = T.approximation_error(fn, b3, l3, weight=hist)
    rms_u, _ = T.approximation_error(fn, b3, l3)
    assert 0 < rms < mx and rms != rms_u


BAD = [
    (lambda: T.optimal_table("gelu", 0), ValueError, "bits"),
    (lambda: T.optimal_table("gelu", 5), ValueError, "bits"),
    (lambda: T.optimal_table("gelu", True), TypeError, "bits"),
    (lambda: T.optimal_table("gelu", 2.0), TypeError, "bits"),
    (lambda: T.get_table("gelu", "2"), TypeError, "bits"),
    (lambda: T.optimal_table("gelu", 2, lo=1.0, hi=1.0), ValueError, "lo"),
    (lambda: T.optimal_table("gelu", 2, lo=float("nan")), ValueError, "lo"),
    (lambda: T.optimal_table("gelu", 2, hi=float("inf")), ValueError, "hi"),
    (lambda: T.optimal_table("gelu", 2, lo="a"), TypeError, "lo"),
    (lambda: T.optimal_table("gelu", 3, grid=7), ValueError, "grid"),
    (lambda: T.optimal_table("gelu", 2, grid=64.0), TypeError, "grid"),
    (lambda: T.optimal_table("gelu", 2, lo=1e6, hi=1e6 + 1, grid=64), ValueError, "grid"),
    (lambda: T.optimal_table("gelu", 2, weight="triangle"), ValueError, "weight"),
    (lambda: T.optimal_table("gelu", 2, weight=np.ones(100), grid=64), ValueError, "weight"),
    (lambda: T.optimal_table("gelu", 2, weight=-np.ones(64), grid=64), ValueError, "weight"),
    (lambda: T.optimal_table("gelu", 2, weight=np.zeros(64), grid=64), ValueError, "weight"),
    (lambda: T.optimal_table("gelu", 2, weight=np.ones((8, 8)), grid=64), ValueError, "weight"),
    (lambda: T.optimal_table("gelu", 2, weight=lambda x: x[:3], grid=64), ValueError, "weight"),
    (lambda: T.optimal_table("gelu", 2, weight=object()), TypeError, "weight"),
    (lambda: T.optimal_table(123, 2), TypeError, "fn"),
    (lambda: T.optimal_table("swishy", 2), ValueError, "gelu"),
    (lambda: T.optimal_table(lambda x: x.detach() ** 2, 2), TypeError, "fn"),
    (lambda: T.activation_fn("gelu", approximate="erf"), ValueError, "approximate"),
    (lambda: T.activation_fn("gelu", alpha=1.0), TypeError, "alpha"),
    (lambda: T.get_table("elu", 2, alpha="x"), TypeError, "alpha"),
    (lambda: T.get_table("relu", 1, inplace=True), TypeError, "inplace"),
    (lambda: T.get_table("hardtanh", 2, min_val=1.0, max_val=0.0), ValueError, "min_val"),
    (lambda: T.exact_table("gelu", 2), ValueError, "piecewise-linear"),
    (lambda: T.approximation_error("gelu", [0.0], [1.0]), ValueError, "levels"),
    (lambda: T.optimal_partition([1.0, 2.0], [1.0, 1.0], 3), ValueError, "intervals"),
]


@pytest.mark.parametrize("call, exc, word", BAD, ids=[f"{i}-{w}" for i, (_, _, w) in enumerate(BAD)])
def test_bad_arguments(call, exc, word):
    with pytest.raises(exc, match=word):
        call()


def test_tables_file_is_a_plain_literal_written_by_the_generator():
    path = pathlib.Path(_tables.__file__)
    tree = ast.parse(path.read_text())
    (assign,) = [node for node in tree.body if isinstance(node, ast.Assign)]
    assert ast.literal_eval(assign.value) == _tables.TABLES
    # regenerating the source from the loaded tables reproduces the file: floats round-trip
    assert T._source(T.shipped_tables()) == path.read_text()


def test_docs_error_table_is_current():
    assert T.error_markdown(T.shipped_tables()) in DOCS.read_text()
