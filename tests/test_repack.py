"""Mask-update index work (sparseops.ops.repack, csrc/dst.cpp) and what is built on it: SparseLinear.rewire_
and SRigL's neuron ablation.

Every expected value comes from a reference written here, independent of the code under test: a numpy
``lexsort`` for the magnitude rankings (nan above +inf above every finite float, -0 == 0, ties to the
lower position), sets and ``CSRWeight.from_mask`` of a dense mask for the re-pack, fp64 autograd on a
dense copy of the model for SRigL's gradients. Each public function is run on both of its paths: the
C++ binding (CPU tensors with ``sparseops._C`` loaded) and the pure-torch fallback (``_C`` patched to
None), through the ``impl`` fixture.
"""

import math
import zlib

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from helpers import assert_close_rms, assert_top_set
from torch import nn

import sparseops
import sparseops.ops.repack as R
from sparseops import SparseLinear, SRigL
from sparseops._cpp import _C
from sparseops.formats import CSRWeight, ELLWeight
from sparseops.patterns import Block, FanIn

needs_cpp = pytest.mark.skipif(_C is None, reason="sparseops._C is not built")

INDEX_NAMES = ("crow", "col", "row", "t_crow", "t_row", "t_perm")


@pytest.fixture(params=["cpp", "torch"])
def impl(request, monkeypatch):
    """Run the test on the C++ binding ("cpp") or on the pure-torch fallback ("torch")."""
    if request.param == "cpp":
        if R._C is None:
            pytest.skip("sparseops._C is not built")
    else:
        monkeypatch.setattr(R, "_C", None)
    return request.param


# ---- independent references ----


def _rank_key(a) -> np.ndarray:
    """|a| as float64 with +-inf -> 1e300 and nan -> +inf: nan above inf above every finite float32."""
    m = np.abs(np.asarray(a, dtype=np.float64))
    m = np.where(np.isinf(m), 1e300, m)
    return np.where(np.isnan(m), np.inf, m)


def _top(key: np.ndarray, pos: np.ndarray, n: int) -> np.ndarray:
    """The n best of ``pos`` by ``key`` descending, ties to the lower position; ascending."""
    order = np.lexsort((pos, -key))
    return np.sort(pos[order[:n]])


def ref_top_abs(scores: torch.Tensor, n: int, exclude_mask: torch.Tensor | None = None) -> torch.Tensor:
    key = _rank_key(scores.numpy()).ravel()
    pos = np.arange(key.size, dtype=np.int64)
    if exclude_mask is not None:
        ok = ~exclude_mask.numpy().ravel()
        key, pos = key[ok], pos[ok]
    return torch.from_numpy(_top(key, pos, n).astype(np.int64))


def ref_top_abs_rows(scores, mask, kept_mask, need) -> torch.Tensor:
    """Row r: need[r] positions, the best |s| off ``mask`` first, then the best stored-but-not-kept."""
    rows, cols = scores.shape
    key = _rank_key(scores.numpy())
    m, k = mask.numpy(), kept_mask.numpy()
    out = []
    for r in range(rows):
        want = int(need[r])
        c = np.arange(cols, dtype=np.int64)
        free, dropped = c[~m[r]], c[m[r] & ~k[r]]
        got = list(_top(key[r][free], free, want))
        if len(got) < want:
            got += list(_top(key[r][dropped], dropped, want - len(got)))
        out += sorted(r * cols + x for x in got)
    return torch.tensor(out, dtype=torch.int64)


def _seed(*parts) -> int:
    return zlib.crc32(repr(parts).encode())


def _keys(fmt: CSRWeight) -> torch.Tensor:
    return fmt.row.long() * fmt.in_features + fmt.col.long()


def _random_mask(rows, cols, density, g, empty_rows=()):
    mask = torch.rand(rows, cols, generator=g) < density
    for r in empty_rows:
        if r < rows:
            mask[r] = False
    return mask


def _scores(shape, kind, g):
    rows, cols = shape
    s = torch.randn(rows, cols, generator=g) * 3.0
    if kind == "ties":
        s = torch.randint(-3, 4, (rows, cols), generator=g).float() * 0.5
    elif kind == "special":
        s = torch.randint(-2, 3, (rows, cols), generator=g).float()  # ties too
        pick = torch.randint(0, 9, (rows, cols), generator=g)
        s[pick == 0] = float("nan")
        s[pick == 1] = float("inf")
        s[pick == 2] = -float("inf")
        s[pick == 3] = 1e-45  # denormal
        s[pick == 4] = -torch.finfo(torch.float32).max
    flip = torch.rand(rows, cols, generator=g) < 0.5
    return torch.where(flip, -s, s)  # -0.0 where s is 0


def _same_index(a: CSRWeight, b: CSRWeight, where=""):
    assert a.shape == b.shape, f"{where}: shape {a.shape} != {b.shape}"
    for name in INDEX_NAMES:
        x, y = getattr(a, name), getattr(b, name)
        assert x.dtype == torch.int32, f"{where}: {name} is {x.dtype}, expected int32"
        assert torch.equal(x, y), f"{where}: {name} {x.tolist()[:20]} != expected {y.tolist()[:20]}"


# ---- the C++ path is the one CPU calls take ----


@needs_cpp
def test_cpu_calls_go_through_the_binding(monkeypatch):
    called = []

    class Spy:
        def __getattr__(self, name):
            fn = getattr(_C, name)

            def wrapped(*a, **k):
                called.append(name)
                return fn(*a, **k)

            return wrapped

    monkeypatch.setattr(R, "_C", Spy())
    fmt = CSRWeight.from_mask(torch.eye(4, dtype=torch.bool))
    s = torch.randn(4, 4)
    R.top_abs(s, 3, fmt)
    R.top_abs_rows(s, fmt, torch.ones(4, dtype=torch.bool), torch.ones(4, dtype=torch.int64))
    R.sample_off(fmt, 2)
    R.repack(fmt, torch.arange(2), torch.tensor([1], dtype=torch.int64))
    assert called == ["dst_top_abs", "dst_top_abs_rows", "dst_sample_off", "dst_csr_repack"]


# ---- 1. top_abs ----

SHAPES = [(1, 1), (1, 1000), (37, 3), (3, 37), (64, 100), (1000, 37)]


@pytest.mark.parametrize("kind", ["randn", "ties", "special"])
@pytest.mark.parametrize("shape", SHAPES, ids=[f"{r}x{c}" for r, c in SHAPES])
def test_top_abs_matches_reference(impl, shape, kind):
    g = torch.Generator().manual_seed(_seed(shape, kind))
    s = _scores(shape, kind, g)
    rows, cols = shape
    for excl in (None, _random_mask(rows, cols, 0.3, g, empty_rows=(0,))):
        fmt = None if excl is None else CSRWeight.from_mask(excl)
        eligible = rows * cols - (0 if fmt is None else fmt.nnz)
        for n in sorted({0, 1, eligible // 3, eligible // 2, eligible - 1, eligible} & set(range(eligible + 1))):
            got = R.top_abs(s, n, fmt)
            exp = ref_top_abs(s, n, excl)
            where = f"{impl} {shape} {kind} exclude={excl is not None} n={n}"
            assert got.dtype == torch.int64, where
            assert torch.equal(got, exp), f"{where}: got {got.tolist()[:12]}, expected {exp.tolist()[:12]}"


def test_top_abs_nan_above_inf_and_signed_zero(impl):
    # nan beats +inf (and -inf), whatever the positions; -0.0 ties with 0.0 (lower position wins)
    s = torch.tensor([[float("inf"), float("nan"), -float("inf"), 1.0]])
    assert R.top_abs(s, 1).tolist() == [1], "nan must rank above +inf"
    assert R.top_abs(s, 2).tolist() == [0, 1]
    assert R.top_abs(s, 3).tolist() == [0, 1, 2]
    z = torch.tensor([[1.0, -0.0, 0.0, -0.0]])
    assert R.top_abs(z, 2).tolist() == [0, 1]
    assert R.top_abs(torch.tensor([[0.0, -0.0]]), 1).tolist() == [0]
    assert R.top_abs(torch.tensor([[-0.0, 0.0]]), 1).tolist() == [0]


def test_top_abs_nans_rank_above_inf_ordered_by_their_bits(impl):
    """Every nan ranks above inf; among nans the order is their bits without the sign (the documented
    float32 key), the same on both paths."""
    bits = np.array([0x7F800000, 0x7FC00000, 0x7FFFFFFF, 0xFFC00001, 0x7F800001], dtype=np.uint32)
    s = torch.from_numpy(bits.view(np.float32).copy()).reshape(1, 5)
    assert torch.isinf(s[0, 0]) and torch.isnan(s[0, 1:]).all()
    assert R.top_abs(s, 1).tolist() == [2]  # payload 0x7FFFFF is the largest key
    assert R.top_abs(s, 2).tolist() == [2, 3]  # 0xFFC00001 -> 0x7FC00001 beats 0x7FC00000
    assert R.top_abs(s, 4).tolist() == [1, 2, 3, 4]  # inf last


def test_top_abs_non_contiguous_scores(impl):
    g = torch.Generator().manual_seed(3)
    base = _scores((40, 30), "ties", g)
    s = base.t()  # [30, 40], not contiguous
    excl = _random_mask(30, 40, 0.25, g)
    fmt = CSRWeight.from_mask(excl)
    assert torch.equal(R.top_abs(s, 200, fmt), ref_top_abs(s.contiguous(), 200, excl))


def test_top_abs_several_chunks(impl):
    """600 x 600 = 360000 > 65536 entries: several chunks, heavy ties spread across chunk boundaries."""
    g = torch.Generator().manual_seed(11)
    s = torch.randint(-6, 7, (600, 600), generator=g).float() * 0.25
    s[torch.rand(600, 600, generator=g) < 0.001] = float("nan")
    excl = _random_mask(600, 600, 0.3, g, empty_rows=(5, 599))
    fmt = CSRWeight.from_mask(excl)
    eligible = 360000 - fmt.nnz
    prev = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        for n in (1, 70001, eligible - 3):
            assert torch.equal(R.top_abs(s, n, fmt), ref_top_abs(s, n, excl)), f"{impl} n={n} with exclusion"
        assert torch.equal(R.top_abs(s, 99999), ref_top_abs(s, 99999)), f"{impl} n=99999"
    finally:
        torch.set_num_threads(prev)


@needs_cpp
def test_top_abs_binding_many_threads():
    """The raw kernel with 8 requested threads (6 chunks of 360000 entries) agrees with the reference."""
    g = torch.Generator().manual_seed(12)
    s = torch.randint(-4, 5, (600, 600), generator=g).float()
    excl = _random_mask(600, 600, 0.5, g)
    fmt = CSRWeight.from_mask(excl)
    for n in (5, 123457):
        got = _C.dst_top_abs(s.numpy(), fmt.crow.numpy(), fmt.col.numpy(), n, 8)
        assert np.array_equal(got, ref_top_abs(s, n, excl).numpy()), f"n={n} excluded"
        got = _C.dst_top_abs(s.numpy(), None, None, n, 8)
        assert np.array_equal(got, ref_top_abs(s, n).numpy()), f"n={n}"


@needs_cpp
@pytest.mark.parametrize("data", ["normal", "ties", "dead_rows"])
def test_top_abs_sampled_pass_its_fallback_and_the_exact_passes_agree(data, isa):
    """From 65536 entries the kernel selects in one pass, bounded by a sample (z > 0). A negative z makes
    that bound miss, so the exact passes run after it; z = 0 runs them alone. All three equal the
    reference on both sides of the cut (n below half the eligible entries selects the largest, above
    half it leaves out the smallest), with heavy ties at the cut, with exclusion and eligibility, and for
    2 and 8 threads. 701 columns: the excluded bitmap's words straddle rows and threads, and the
    210300 entries end 12 past a multiple of 16 (the candidate filter's tail after its last vector). On
    every C++ path: the filter has one per ISA."""
    rows, cols = 300, 701
    g = torch.Generator().manual_seed(_seed("sampled", data))
    if data == "ties":
        s = torch.randint(-3, 4, (rows, cols), generator=g).float() * 0.5
    else:
        s = torch.randn(rows, cols, generator=g)
    if data == "dead_rows":
        s[::5] = 0.0
        s[torch.rand(rows, cols, generator=g) < 0.1] = -0.0
    s[torch.rand(rows, cols, generator=g) < 0.001] = float("nan")
    stored = _random_mask(rows, cols, 0.1, g, empty_rows=(0, 17, rows - 1))
    fmt = CSRWeight.from_mask(stored)
    eligible = torch.rand(rows, cols, generator=g) < 0.8
    for exclude, elig in ((None, None), (fmt, None), (fmt, eligible)):
        out_mask = torch.zeros(rows, cols, dtype=torch.bool) if exclude is None else stored.clone()
        if elig is not None:
            out_mask |= ~elig
        count = int((~out_mask).sum())
        crow, col = (None, None) if exclude is None else (fmt.crow.numpy(), fmt.col.numpy())
        el = None if elig is None else elig.numpy()
        for n in (1, 97, count // 10, count // 2, count // 2 + 1, count - count // 10, count - 1, count):
            exp = ref_top_abs(s, n, out_mask).numpy()
            for z in (4.0, -4.0, 0.0):
                for threads in (2, 8):
                    got = _C.dst_top_abs(s.numpy(), crow, col, n, threads, el, None, z)
                    assert np.array_equal(got, exp), (data, exclude is None, elig is None, n, z, threads)


def test_top_abs_bad_n(impl):
    s = torch.randn(4, 5)
    fmt = CSRWeight.from_mask(torch.rand(4, 5) < 0.5)
    for n, ex in ((21, None), (-1, None), (20 - fmt.nnz + 1, fmt)):
        with pytest.raises(ValueError, match=r"^n: "):
            R.top_abs(s, n, ex)


# ---- 2. top_abs_rows ----

ROW_SHAPES = [(1, 1), (1, 50), (37, 3), (3, 37), (64, 100), (50, 1)]


def _rows_case(shape, g):
    rows, cols = shape
    mask = _random_mask(rows, cols, 0.5, g, empty_rows=(1, 4))
    fmt = CSRWeight.from_mask(mask)
    keep = torch.rand(fmt.nnz, generator=g) < 0.5
    kept_mask = torch.zeros(rows, cols, dtype=torch.bool)
    kept_mask[fmt.row.long()[keep], fmt.col.long()[keep]] = True
    avail = cols - kept_mask.sum(1)
    pick = torch.randint(0, 3, (rows,), generator=g)
    need = torch.where(pick == 0, torch.zeros_like(avail), torch.where(
        pick == 1, avail, (torch.rand(rows, generator=g) * (avail + 1)).long().clamp_max(avail)))
    need[0] = avail[0]  # everything the row can give
    if rows > 2:
        need[2] = 0
    return mask, fmt, keep, kept_mask, need


@pytest.mark.parametrize("kind", ["randn", "ties"])
@pytest.mark.parametrize("shape", ROW_SHAPES, ids=[f"{r}x{c}" for r, c in ROW_SHAPES])
def test_top_abs_rows_matches_reference(impl, shape, kind):
    g = torch.Generator().manual_seed(_seed(shape, kind, "rows"))
    s = _scores(shape, kind, g)
    for trial in range(3):
        mask, fmt, keep, kept_mask, need = _rows_case(shape, g)
        got = R.top_abs_rows(s, fmt, keep, need)
        exp = ref_top_abs_rows(s, mask, kept_mask, need)
        where = f"{impl} {shape} {kind} trial {trial} need={need.tolist()[:10]}"
        assert got.dtype == torch.int64, where
        assert torch.equal(got, exp), f"{where}: got {got.tolist()[:16]}, expected {exp.tolist()[:16]}"


def _wide_rows_case(kind):
    """SRigL's shape of a case over rows of 1500 columns (12 past a multiple of 16, 4 past one of 8: the
    candidate filter's tails): 10% stored, about 70% of it kept, most rows needing under a quarter of
    their free positions (the sampled pass), some at or past it. ``spiky``: each row a few huge values on
    a tiny floor, so the sample rarely holds one. Returns (scores, fmt, keep, need, expected)."""
    rows, cols = 40, 1500
    g = torch.Generator().manual_seed(_seed("wide rows", kind))
    if kind == "spiky":
        s = torch.rand(rows, cols, generator=g) * 1e-3
        s[torch.rand(rows, cols, generator=g) < 0.01] = 100.0
    else:
        s = _scores((rows, cols), kind, g)
    mask = _random_mask(rows, cols, 0.1, g, empty_rows=(3,))
    fmt = CSRWeight.from_mask(mask)
    keep = torch.rand(fmt.nnz, generator=g) < 0.7
    kept_mask = torch.zeros(rows, cols, dtype=torch.bool)
    kept_mask[fmt.row.long()[keep], fmt.col.long()[keep]] = True
    avail = cols - kept_mask.sum(1)
    nfree = cols - mask.sum(1)
    frac = torch.tensor([0.0, 0.0007, 0.01, 0.03, 0.1, 0.2, 0.249, 0.26, 0.6, 1.0])[torch.arange(rows) % 10]
    need = torch.minimum((frac * nfree).long().clamp_min(1), avail)
    need[0] = 1
    return s, fmt, keep, need, ref_top_abs_rows(s, mask, kept_mask, need)


@pytest.mark.parametrize("kind", ["randn", "ties", "special", "spiky"])
def test_top_abs_rows_wide_rows_take_the_sampled_pass(impl, kind):
    """Rows of 1024 columns or more that need under a quarter of their free positions are selected in
    one pass bounded by a sample of the row; the other rows (and a row whose bound lets too few
    through) take the histogram. Both against the reference (see _wide_rows_case)."""
    s, fmt, keep, need, exp = _wide_rows_case(kind)
    got = R.top_abs_rows(s, fmt, keep, need)
    assert torch.equal(got, exp), f"{impl} {kind}: first difference at {int((got != exp).nonzero()[0, 0]) if got.numel() == exp.numel() else 'size'}"


@needs_cpp
@pytest.mark.parametrize("kind", ["randn", "ties", "special", "spiky"])
def test_top_abs_rows_sampled_pass_on_every_isa(kind, isa):
    """The same cases through the C++ binding on each path (the sampled pass's candidate filter has one
    per ISA), with 2 and 8 threads."""
    s, fmt, keep, need, exp = _wide_rows_case(kind)
    ptr = torch.zeros(need.numel() + 1, dtype=torch.int64)
    ptr[1:] = need.cumsum(0)
    for threads in (2, 8):
        got = _C.dst_top_abs_rows(s.numpy(), fmt.crow.numpy(), fmt.col.numpy(), keep.numpy(), ptr.numpy(), threads)
        assert np.array_equal(got, exp.numpy()), f"{isa} {kind}: {threads} threads"


def test_top_abs_rows_free_positions_come_first_whatever_their_magnitude(impl):
    """A dropped (stored, not kept) entry is taken only once the row's free positions run out, even when
    its |score| is far above theirs."""
    s = torch.tensor([[5.0, 0.1, 0.2, 0.3]])
    fmt = CSRWeight.from_mask(torch.tensor([[True, False, False, True]]))
    keep = torch.tensor([False, True])  # col 0 dropped, col 3 kept
    assert R.top_abs_rows(s, fmt, keep, torch.tensor([1])).tolist() == [2]
    assert R.top_abs_rows(s, fmt, keep, torch.tensor([2])).tolist() == [1, 2]
    assert R.top_abs_rows(s, fmt, keep, torch.tensor([3])).tolist() == [0, 1, 2]


def test_top_abs_rows_ties_to_lower_column(impl):
    s = torch.tensor([[1.0, -1.0, 1.0, 0.0, -0.0, 1.0]])
    fmt = CSRWeight.from_mask(torch.tensor([[False, True, False, False, False, False]]))
    keep = torch.tensor([False])
    assert R.top_abs_rows(s, fmt, keep, torch.tensor([2])).tolist() == [0, 2]
    assert R.top_abs_rows(s, fmt, keep, torch.tensor([4])).tolist() == [0, 2, 3, 5]
    assert R.top_abs_rows(s, fmt, keep, torch.tensor([5])).tolist() == [0, 2, 3, 4, 5]
    assert R.top_abs_rows(s, fmt, keep, torch.tensor([6])).tolist() == [0, 1, 2, 3, 4, 5]


def test_top_abs_rows_all_need_zero_and_empty_layer(impl):
    s = torch.randn(3, 4)
    fmt = CSRWeight.from_mask(torch.zeros(3, 4, dtype=torch.bool))
    out = R.top_abs_rows(s, fmt, torch.zeros(0, dtype=torch.bool), torch.zeros(3, dtype=torch.int64))
    assert out.dtype == torch.int64 and out.numel() == 0
    out = R.top_abs_rows(s, fmt, torch.zeros(0, dtype=torch.bool), torch.tensor([4, 0, 4]))
    assert out.tolist() == [0, 1, 2, 3, 8, 9, 10, 11]


# ---- 3. sample_off ----


def _check_sample(fmt, out, n):
    mask = fmt.to_mask().flatten()
    assert out.dtype == torch.int64 and out.shape == (n,)
    if n:
        assert bool((out[1:] > out[:-1]).all()), "positions must be strictly ascending (distinct)"
        assert int(out.min()) >= 0 and int(out.max()) < mask.numel()
        assert not bool(mask[out].any()), "a sampled position is stored"


@pytest.mark.parametrize("shape", [(1, 1), (1, 70), (70, 1), (13, 17), (64, 100)], ids=str)
def test_sample_off_basic(impl, shape):
    g = torch.Generator().manual_seed(5)
    rows, cols = shape
    mask = _random_mask(rows, cols, 0.4, g, empty_rows=(0,))
    fmt = CSRWeight.from_mask(mask)
    free = rows * cols - fmt.nnz
    for n in sorted({0, 1, free // 3, free // 2 + 1, free - 1, free} & set(range(free + 1))):
        out = R.sample_off(fmt, n, torch.Generator().manual_seed(n))
        _check_sample(fmt, out, n)
    everything = R.sample_off(fmt, free, torch.Generator().manual_seed(0))
    assert torch.equal(everything, (~mask).flatten().nonzero().flatten())
    with pytest.raises(ValueError, match=r"^n: "):
        R.sample_off(fmt, free + 1)
    with pytest.raises(ValueError, match=r"^n: "):
        R.sample_off(fmt, -1)


def test_sample_off_full_layer(impl):
    fmt = CSRWeight.from_mask(torch.ones(3, 5, dtype=torch.bool))
    assert R.sample_off(fmt, 0).numel() == 0
    with pytest.raises(ValueError, match=r"^n: "):
        R.sample_off(fmt, 1)


def test_sample_off_same_seed_same_positions(impl):
    fmt = CSRWeight.from_mask(_random_mask(30, 40, 0.3, torch.Generator().manual_seed(1)))
    free = 1200 - fmt.nnz
    for n in (50, free - 50):  # both sides of free / 2
        a = R.sample_off(fmt, n, torch.Generator().manual_seed(42))
        b = R.sample_off(fmt, n, torch.Generator().manual_seed(42))
        c = R.sample_off(fmt, n, torch.Generator().manual_seed(43))
        assert torch.equal(a, b), f"n={n}: the same seed gave different positions"
        assert not torch.equal(a, c), f"n={n}: the seed has no effect"
        _check_sample(fmt, a, n)


@pytest.mark.parametrize("n", [3, 20], ids=["n3", "n20-complement"])
def test_sample_off_is_uniform(impl, n):
    mask = torch.zeros(4, 8, dtype=torch.bool)
    mask[0, 1] = mask[1, 7] = mask[2, 0] = mask[2, 3] = mask[3, 5] = True
    fmt = CSRWeight.from_mask(mask)
    free = 32 - 5
    draws = 3000
    g = torch.Generator().manual_seed(123)
    counts = torch.zeros(32, dtype=torch.int64)
    for _ in range(draws):
        out = R.sample_off(fmt, n, g)
        assert out.numel() == n and out.unique().numel() == n
        counts[out] += 1
    flat = mask.flatten()
    assert int(counts[flat].sum()) == 0, "a stored position was sampled"
    p = n / free
    sigma = math.sqrt(draws * p * (1 - p))
    dev = (counts[~flat].double() - draws * p).abs()
    assert float(dev.max()) <= 5 * sigma, (
        f"frequencies {counts[~flat].tolist()} stray more than 5 sigma ({5 * sigma:.1f}) from {draws * p:.1f}")


# ---- 4. repack ----


def _expected_repack(fmt, kept, grown):
    rows, cols = fmt.shape
    old = _keys(fmt)
    exp = torch.zeros(rows * cols, dtype=torch.bool)
    exp[old[kept]] = True
    exp[grown] = True
    ref = CSRWeight.from_mask(exp.view(rows, cols))
    old_kept, new = old[kept], _keys(ref)  # both ascending
    if old_kept.numel() == 0:
        return ref, torch.full_like(new, -1)
    at = torch.searchsorted(old_kept, new).clamp_max(old_kept.numel() - 1)
    return ref, torch.where(old_kept[at] == new, kept[at], torch.full_like(new, -1))


def _check_repack(fmt, kept, grown, where):
    new, src = R.repack(fmt, kept, grown)
    ref, esrc = _expected_repack(fmt, kept, grown)
    _same_index(new, ref, where)
    assert src.dtype == torch.int32, where
    assert torch.equal(src, esrc), f"{where}: src {src.tolist()[:20]} != {esrc.tolist()[:20]}"
    new.validate()


def _repack_case(fmt, g, kept_frac=0.6, grow=0.3, empty_rows=()):
    rows, cols = fmt.shape
    old = _keys(fmt)
    sel = torch.rand(fmt.nnz, generator=g) < kept_frac
    for r in empty_rows:
        sel &= fmt.row.long() != r
    kept = sel.nonzero().flatten()
    taken = torch.zeros(rows * cols, dtype=torch.bool)
    taken[old[kept]] = True
    cand = (~taken).nonzero().flatten()  # includes stored positions that were dropped
    for r in empty_rows:
        cand = cand[cand // cols != r]
    grown = cand[torch.rand(cand.numel(), generator=g) < grow]
    return kept, grown


REPACK_SHAPES = [(1, 1), (1, 40), (40, 1), (13, 17), (64, 100)]


@pytest.mark.parametrize("shape", REPACK_SHAPES, ids=[f"{r}x{c}" for r, c in REPACK_SHAPES])
def test_repack_matches_from_mask(impl, shape):
    g = torch.Generator().manual_seed(_seed(shape, "repack"))
    rows, cols = shape
    fmt = CSRWeight.from_mask(_random_mask(rows, cols, 0.4, g, empty_rows=(2,)))
    for trial in range(4):
        kept, grown = _repack_case(fmt, g, empty_rows=(0, 3) if trial % 2 else ())
        _check_repack(fmt, kept, grown, f"{impl} {shape} trial {trial}")
    empty = torch.zeros(0, dtype=torch.int64)
    kept, grown = _repack_case(fmt, g)
    _check_repack(fmt, empty, grown, f"{impl} {shape} kept empty")
    _check_repack(fmt, kept, empty, f"{impl} {shape} grown empty")
    _check_repack(fmt, empty, empty, f"{impl} {shape} both empty")
    _check_repack(fmt, torch.arange(fmt.nnz), empty, f"{impl} {shape} identity")
    every = (~fmt.to_mask()).flatten().nonzero().flatten()
    _check_repack(fmt, torch.arange(fmt.nnz), every, f"{impl} {shape} to full")


def test_repack_regrows_a_dropped_position_as_new(impl):
    fmt = CSRWeight.from_mask(torch.tensor([[True, True, False], [False, True, True]]))
    # drop old entry 1 (0, 1) and grow it back, drop (1, 1): the re-grown one is new (src -1)
    new, src = R.repack(fmt, torch.tensor([0, 3]), torch.tensor([1, 3]))
    assert new.to_mask().tolist() == [[True, True, False], [True, False, True]]
    assert src.tolist() == [0, -1, -1, 3]


@needs_cpp
def test_repack_binding_many_threads():
    """A re-pack of 600 x 600 (about 216000 entries: 4 chunks at 8 threads) equals from_mask."""
    g = torch.Generator().manual_seed(21)
    fmt = CSRWeight.from_mask(_random_mask(600, 600, 0.6, g, empty_rows=(7,)))
    kept, grown = _repack_case(fmt, g, 0.7, 0.2, empty_rows=(100,))
    out = _C.dst_csr_repack(600, 600, fmt.crow.numpy(), fmt.col.numpy(), kept.numpy(), grown.numpy(), 8)
    ref, esrc = _expected_repack(fmt, kept, grown)
    for name, arr in zip(INDEX_NAMES, out[:6]):
        assert arr.dtype == np.int32
        assert np.array_equal(arr, getattr(ref, name).numpy()), name
    assert np.array_equal(out[6], esrc.numpy())
    prev = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        _check_repack(fmt, kept, grown, "wrapper 600x600")
    finally:
        torch.set_num_threads(prev)


def _repack_fmt():
    return CSRWeight.from_mask(torch.tensor([[True, False, True, False], [False, True, True, True]]))  # nnz 5


BAD_REPACK = [
    pytest.param([0, 1], [2], ValueError, r"grown", id="grown-equals-kept"),
    pytest.param([1, 3], [4 + 2], ValueError, r"grown", id="grown-equals-kept-row1"),
    pytest.param([2, 1], [], ValueError, r"\bkept\b", id="kept-decreasing"),
    pytest.param([1, 1], [], ValueError, r"\bkept\b", id="kept-duplicate"),
    pytest.param([0, 5], [], ValueError, r"\bkept\b", id="kept-past-nnz"),
    pytest.param([-1], [], ValueError, r"\bkept\b", id="kept-negative"),
    pytest.param([0], [8], ValueError, r"\bgrown\b", id="grown-past-end"),
    pytest.param([0], [-1], ValueError, r"\bgrown\b", id="grown-negative"),
    pytest.param([0], [3, 1], ValueError, r"\bgrown\b", id="grown-decreasing"),
    pytest.param([0], [3, 3], ValueError, r"\bgrown\b", id="grown-duplicate"),
]


@pytest.mark.parametrize("kept,grown,exc,match", BAD_REPACK)
def test_repack_bad_positions(impl, kept, grown, exc, match):
    fmt = _repack_fmt()
    with pytest.raises(exc, match=match):
        R.repack(fmt, torch.tensor(kept, dtype=torch.int64), torch.tensor(grown, dtype=torch.int64))


def test_repack_bad_dtypes(impl):
    fmt = _repack_fmt()
    with pytest.raises(TypeError, match=r"\bkept\b"):
        R.repack(fmt, torch.tensor([0, 1], dtype=torch.int32), torch.tensor([1]))
    with pytest.raises(TypeError, match=r"\bgrown\b"):
        R.repack(fmt, torch.tensor([0, 1]), torch.tensor([1], dtype=torch.int32))


# ---- 5. the raw bindings refuse malformed input ----

_S = np.arange(12, dtype=np.float32).reshape(3, 4)
_CROW = np.array([0, 2, 3, 5], dtype=np.int32)
_COL = np.array([0, 2, 1, 0, 3], dtype=np.int32)  # rows: {0, 2}, {1}, {0, 3}
_KEEP = np.array([True, False, False, True, False])
_NEED = np.array([0, 1, 3, 4], dtype=np.int64)  # row 0: 1 (of 3), row 1: 2 (of 4), row 2: 1 (of 3)

# (crow, col) variants and the argument the error must name
BAD_CSR = [
    pytest.param(np.array([1, 2, 3, 5], np.int32), _COL, ValueError, "crow", id="crow-not-from-0"),
    pytest.param(np.array([0, 3, 2, 5], np.int32), _COL, ValueError, "crow", id="crow-decreasing"),
    pytest.param(np.array([0, 2, 5], np.int32), _COL, ValueError, "crow", id="crow-too-short"),
    pytest.param(np.array([0, 2, 3, 5, 5], np.int32), _COL, ValueError, "crow", id="crow-too-long"),
    pytest.param(np.array([0, 2, 3, 4], np.int32), _COL, ValueError, "crow", id="crow-end-not-nnz"),
    pytest.param(np.array([0, 2, 3, 6], np.int32), _COL, ValueError, "crow", id="crow-end-past-nnz"),
    pytest.param(np.array([0, -2, 3, 5], np.int32), _COL, ValueError, "crow", id="crow-negative"),
    pytest.param(np.array([[0, 2, 3, 5]], np.int32), _COL, ValueError, "crow", id="crow-2d"),
    pytest.param(np.array([0, 2, 3, 5, 0, 0, 0, 0], np.int32)[::2], _COL, ValueError, "crow", id="crow-strided"),
    pytest.param(_CROW.astype(np.int64), _COL, TypeError, "crow", id="crow-int64"),
    pytest.param(_CROW, np.array([0, 4, 1, 0, 3], np.int32), ValueError, "col", id="col-past-cols"),
    pytest.param(_CROW, np.array([0, 2, 1, -1, 3], np.int32), ValueError, "col", id="col-negative"),
    pytest.param(_CROW, np.array([2, 0, 1, 0, 3], np.int32), ValueError, "col", id="col-unsorted"),
    pytest.param(_CROW, np.array([2, 2, 1, 0, 3], np.int32), ValueError, "col", id="col-duplicate"),
    pytest.param(_CROW, np.array([0, 2, 1, 3, 3], np.int32), ValueError, "col", id="col-duplicate-last-row"),
    pytest.param(_CROW, _COL.astype(np.int64), TypeError, "col", id="col-int64"),
    pytest.param(_CROW, _COL.astype(np.float32), TypeError, "col", id="col-float"),
]


@needs_cpp
@pytest.mark.parametrize("crow,col,exc,name", BAD_CSR)
def test_bindings_refuse_a_malformed_csr(crow, col, exc, name):
    nnz = 5
    kept, grown = np.array([0, 1], np.int64), np.array([3], np.int64)
    calls = [
        lambda: _C.dst_top_abs(_S, crow, col, 1, 2),
        lambda: _C.dst_top_abs_rows(_S, crow, col, _KEEP, _NEED, 2),
        lambda: _C.dst_sample_off(3, 4, crow, col, 1, 7),
        lambda: _C.dst_csr_repack(3, 4, crow, col, kept, grown, 2),
    ]
    assert nnz == len(_COL)
    for call in calls:
        with pytest.raises(exc, match=rf"\b{name}\b"):
            call()


@needs_cpp
def test_bindings_accept_the_well_formed_base_case():
    """The base inputs of the malformed cases are valid: each refusal above is about its one change."""
    assert _C.dst_top_abs(_S, _CROW, _COL, 7, 2).tolist() == [1, 3, 4, 6, 7, 9, 10]
    assert _C.dst_top_abs(_S, _CROW, _COL, 3, 2).tolist() == [7, 9, 10]
    assert _C.dst_top_abs_rows(_S, _CROW, _COL, _KEEP, _NEED, 2).tolist() == [3, 6, 7, 10]
    out = _C.dst_sample_off(3, 4, _CROW, _COL, 7, 7)
    assert out.tolist() == [1, 3, 4, 6, 7, 9, 10]
    r = _C.dst_csr_repack(3, 4, _CROW, _COL, np.array([0, 1], np.int64), np.array([3], np.int64), 2)
    assert r[0].tolist() == [0, 3, 3, 3] and r[1].tolist() == [0, 2, 3] and r[6].tolist() == [0, 1, -1]


@needs_cpp
def test_binding_top_abs_refuses_bad_scores_and_n():
    with pytest.raises(TypeError, match=r"\bscores\b"):
        _C.dst_top_abs(_S.astype(np.float64), None, None, 1, 2)
    with pytest.raises(ValueError, match=r"\bscores\b"):
        _C.dst_top_abs(np.asfortranarray(_S), None, None, 1, 2)
    with pytest.raises(ValueError, match=r"\bscores\b"):
        _C.dst_top_abs(np.ascontiguousarray(np.arange(24, dtype=np.float32).reshape(3, 8))[:, ::2], None, None, 1, 2)
    with pytest.raises(ValueError, match=r"\bscores\b"):
        _C.dst_top_abs(_S.ravel(), None, None, 1, 2)
    buf = np.zeros(4 * 12 + 1, np.uint8)
    misaligned = np.frombuffer(buf.data, dtype=np.float32, count=12, offset=1).reshape(3, 4)
    with pytest.raises(ValueError, match=r"\bscores\b"):
        _C.dst_top_abs(misaligned, None, None, 1, 2)
    with pytest.raises(ValueError, match=r"\bcrow\b"):
        _C.dst_top_abs(_S, _CROW, None, 1, 2)
    for n in (-1, 13):
        with pytest.raises(ValueError, match=r"^n: "):
            _C.dst_top_abs(_S, None, None, n, 2)
    for n in (-1, 8):  # 7 eligible
        with pytest.raises(ValueError, match=r"^n: "):
            _C.dst_top_abs(_S, _CROW, _COL, n, 2)


BAD_ROWS = [
    pytest.param(_KEEP, np.array([1, 2, 4, 5], np.int64), ValueError, "need", id="need-not-from-0"),
    pytest.param(_KEEP, np.array([0, 4, 5, 6], np.int64), ValueError, "need", id="need-more-than-row-0-gives"),
    pytest.param(_KEEP, np.array([0, 1, 6, 7], np.int64), ValueError, "need", id="need-more-than-row-1-gives"),
    pytest.param(_KEEP, np.array([0, 1, 3, 7], np.int64), ValueError, "need", id="need-more-than-row-2-gives"),
    pytest.param(_KEEP, np.array([0, 2, 1, 2], np.int64), ValueError, "need", id="need-decreasing"),
    pytest.param(_KEEP, np.array([0, 1, 3], np.int64), ValueError, "need", id="need-too-short"),
    pytest.param(_KEEP, np.array([0, 1, 3, 4, 4], np.int64), ValueError, "need", id="need-too-long"),
    pytest.param(_KEEP, _NEED.astype(np.int32), TypeError, "need", id="need-int32"),
    pytest.param(np.array([True, False, False, True]), _NEED, ValueError, "keep", id="keep-too-short"),
    pytest.param(np.append(_KEEP, True), _NEED, ValueError, "keep", id="keep-too-long"),
    pytest.param(_KEEP.astype(np.uint8), _NEED, TypeError, "keep", id="keep-uint8"),
]


@needs_cpp
@pytest.mark.parametrize("keep,need,exc,name", BAD_ROWS)
def test_binding_top_abs_rows_refuses_bad_keep_and_need(keep, need, exc, name):
    with pytest.raises(exc, match=rf"\b{name}\b"):
        _C.dst_top_abs_rows(_S, _CROW, _COL, keep, need, 2)


@needs_cpp
def test_binding_sample_off_refuses_bad_shape_and_n():
    for n in (-1, 8):  # 7 free
        with pytest.raises(ValueError, match=r"^n: "):
            _C.dst_sample_off(3, 4, _CROW, _COL, n, 1)
    with pytest.raises(ValueError, match=r"\brows\b"):
        _C.dst_sample_off(-3, 4, _CROW, _COL, 1, 1)
    with pytest.raises(ValueError, match=r"\bcols\b"):
        _C.dst_sample_off(3, -4, _CROW, _COL, 1, 1)
    with pytest.raises(ValueError, match=r"\bcrow\b"):  # a crow of 4 entries for 2 rows
        _C.dst_sample_off(2, 4, _CROW, _COL, 1, 1)
    with pytest.raises(ValueError, match=r"\bcol\b"):  # col 3 is past 3 columns
        _C.dst_sample_off(3, 3, _CROW, _COL, 1, 1)


@needs_cpp
def test_binding_repack_refuses_bad_positions():
    def call(kept, grown, rows=3, cols=4):
        return _C.dst_csr_repack(rows, cols, _CROW, _COL, kept, grown, 2)

    i64 = lambda v: np.array(v, np.int64)  # noqa: E731
    with pytest.raises(TypeError, match=r"\bkept\b"):
        call(np.array([0, 1], np.int32), i64([3]))
    with pytest.raises(TypeError, match=r"\bgrown\b"):
        call(i64([0, 1]), np.array([3], np.int32))
    with pytest.raises(ValueError, match=r"\bkept\b"):
        call(i64([[0, 1]]), i64([3]))
    for kept in ([0, 5], [-1], [3, 2], [2, 2]):
        with pytest.raises(ValueError, match=r"\bkept\b"):
            call(i64(kept), i64([3]))
    for grown in ([12], [-1], [5, 3], [3, 3]):
        with pytest.raises(ValueError, match=r"\bgrown\b"):
            call(i64([0]), i64(grown))
    with pytest.raises(ValueError, match=r"\bgrown\b"):  # (0, 2) is old entry 1, kept
        call(i64([0, 1]), i64([2]))
    with pytest.raises(ValueError, match=r"\bcrow\b"):
        call(i64([0]), i64([3]), rows=4)
    with pytest.raises(ValueError, match=r"\bcol\b"):
        call(i64([0]), i64([3]), cols=3)


# ---- 6. SparseLinear.rewire_ ----


def _csr_of(layer) -> CSRWeight:
    """The layer's index as CSR: a fan-in layer's is the CSR view of its ELL index (values flatten to it)."""
    fmt = layer.format
    return fmt.csr if isinstance(fmt, ELLWeight) else fmt


def _layer_keys(layer):
    return _keys(_csr_of(layer))


def _expected_after_rewire(layer, kept, grown):
    out_f, in_f = layer.out_features, layer.in_features
    w_old = layer.dense_weight().detach().clone().flatten()
    old = _layer_keys(layer)
    w = torch.zeros(out_f * in_f)
    w[old[kept]] = w_old[old[kept]]
    mask = torch.zeros(out_f * in_f, dtype=torch.bool)
    mask[old[kept]] = True
    mask[grown] = True
    return w.view(out_f, in_f), mask.view(out_f, in_f), {int(old[p]): int(p) for p in kept}


def _adam_steps(layer, steps=2):
    opt = torch.optim.Adam(layer.parameters(), lr=1e-2)
    g = torch.Generator().manual_seed(9)
    for _ in range(steps):
        x = torch.randn(6, layer.in_features, generator=g)
        loss = layer(x).pow(2).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
    return opt


def _check_rewired(layer, opt, pre_state, old_values, w_exp, mask_exp, where_kept, where):
    _same_index(_csr_of(layer), CSRWeight.from_mask(mask_exp), where)
    if isinstance(layer.format, ELLWeight):  # fan-in: values [rows, k] over the rows that hold weights
        held = mask_exp.sum(1)
        assert layer.values.shape == (int((held > 0).sum()), int(held.max()))
        assert torch.equal(layer.rows.long(), (held > 0).nonzero().flatten())
    assert torch.equal(layer.mask, mask_exp)
    assert torch.equal(layer.dense_weight().detach(), w_exp), f"{where}: kept weights changed or grown not 0"
    x = torch.randn(5, layer.in_features)
    assert_close_rms(layer(x), F.linear(x, w_exp, layer.bias), name=f"{where} forward")
    if opt is None:
        return
    held = [p for gr in opt.param_groups for p in gr["params"]]
    assert any(p is layer.values for p in held), f"{where}: the new values are not in the optimizer"
    assert not any(p is old_values for p in held), f"{where}: the old values are still in the optimizer"
    assert old_values not in opt.state
    st = opt.state[layer.values]
    src = torch.tensor([where_kept.get(int(k), -1) for k in _layer_keys(layer)])
    for key in ("exp_avg", "exp_avg_sq"):
        assert st[key].shape == layer.values.shape
        got, pre = st[key].reshape(-1), pre_state[key].reshape(-1)
        assert torch.equal(got[src >= 0], pre[src[src >= 0]]), f"{where}: {key} of kept weights"
        assert (got[src < 0] == 0).all(), f"{where}: {key} of grown weights not 0"
    assert torch.equal(st["step"], pre_state["step"]), f"{where}: Adam's step changed"


@pytest.mark.parametrize("with_opt", [False, True], ids=["no-opt", "adam"])
def test_rewire_unstructured(impl, with_opt):
    torch.manual_seed(1)
    layer = SparseLinear.from_dense(nn.Linear(20, 12), 0.7)
    opt = _adam_steps(layer) if with_opt else None
    g = torch.Generator().manual_seed(2)
    fmt = layer.format
    kept, grown = _repack_case(fmt, g, 0.6, 0.2, empty_rows=(0, 7))
    w_exp, mask_exp, where_kept = _expected_after_rewire(layer, kept, grown)
    assert not mask_exp[0].any() and not mask_exp[7].any()
    old_values = layer.values
    pre = {k: (v.clone() if torch.is_tensor(v) else v) for k, v in opt.state[old_values].items()} if opt else None
    layer.rewire_(kept, grown, opt)
    assert layer.values is not old_values and isinstance(layer.values, nn.Parameter)
    assert layer.values.requires_grad
    _check_rewired(layer, opt, pre, old_values, w_exp, mask_exp, where_kept, f"{impl} unstructured")
    if opt is not None:  # training goes on with the new parameter
        loss = layer(torch.randn(4, 20)).pow(2).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        assert layer.values.grad is not None and torch.isfinite(layer.values).all()


def _fanin_layer(k=4, out_f=10, in_f=16):
    torch.manual_seed(4)
    return SparseLinear.from_dense(nn.Linear(in_f, out_f), pattern=FanIn(k))


def _fanin_plan(layer, counts, g):
    """kept/grown that leave row r with counts[r] weights, keeping a random part of each row."""
    fmt = layer.format.csr
    out_f, in_f = layer.out_features, layer.in_features
    rows = fmt.row.long()
    kept, grown = [], []
    for r in range(out_f):
        mine = (rows == r).nonzero().flatten()
        nk = min(int(counts[r]), int(torch.randint(0, mine.numel() + 1, (1,), generator=g)))
        take = mine[torch.randperm(mine.numel(), generator=g)[:nk]]
        kept += take.tolist()
        stored_kept = set(int(fmt.col[p]) for p in take)
        free = [c for c in range(in_f) if c not in stored_kept]
        pick = torch.randperm(len(free), generator=g)[: int(counts[r]) - nk]
        grown += [r * in_f + free[i] for i in pick.tolist()]
    return torch.tensor(sorted(kept), dtype=torch.int64), torch.tensor(sorted(grown), dtype=torch.int64)


@pytest.mark.parametrize("target", [6, 4, 2], ids=["k6", "k4-same", "k2"])
def test_rewire_fanin_rows_of_k_or_none(impl, target):
    layer = _fanin_layer()
    opt = _adam_steps(layer)
    counts = [0 if r in (0, 5) else target for r in range(10)]
    kept, grown = _fanin_plan(layer, counts, torch.Generator().manual_seed(target))
    w_exp, mask_exp, where_kept = _expected_after_rewire(layer, kept, grown)
    old_values = layer.values
    pre = {k: v.clone() for k, v in opt.state[old_values].items()}
    layer.rewire_(kept, grown, opt)
    assert layer.pattern == FanIn(target)
    assert layer.mask.sum(1).tolist() == counts
    _check_rewired(layer, opt, pre, old_values, w_exp, mask_exp, where_kept, f"{impl} fanin->{target}")


def _layer_state(layer, opt):
    return ({n: getattr(layer, n).clone() for n in INDEX_NAMES}, layer.values, layer.values.detach().clone(),
            layer.pattern, [p for gr in opt.param_groups for p in gr["params"]],
            {k: v.clone() for k, v in opt.state[layer.values].items()})


def _assert_layer_unchanged(layer, opt, before):
    idx, vobj, vdata, pattern, params, state = before
    for n in INDEX_NAMES:
        assert torch.equal(getattr(layer, n), idx[n]), f"{n} changed"
    assert layer.values is vobj and torch.equal(layer.values.detach(), vdata)
    assert layer.pattern == pattern
    now = [p for gr in opt.param_groups for p in gr["params"]]
    assert len(now) == len(params) and all(a is b for a, b in zip(now, params))
    assert set(opt.state[layer.values]) == set(state)
    for k, v in state.items():
        assert torch.equal(opt.state[layer.values][k], v), f"optimizer {k} changed"


def test_rewire_fanin_mixed_counts_changes_nothing(impl):
    layer = _fanin_layer()
    opt = _adam_steps(layer)
    before = _layer_state(layer, opt)
    g = torch.Generator().manual_seed(1)
    counts = [5] * 10
    counts[3] = 6
    kept, grown = _fanin_plan(layer, counts, g)
    with pytest.raises(ValueError, match=r"kept, grown"):
        layer.rewire_(kept, grown, opt)
    _assert_layer_unchanged(layer, opt, before)
    empty = torch.zeros(0, dtype=torch.int64)
    with pytest.raises(ValueError, match=r"kept, grown"):  # every row emptied
        layer.rewire_(empty, empty, opt)
    _assert_layer_unchanged(layer, opt, before)
    # out-of-range positions name their argument and change nothing either
    with pytest.raises(ValueError, match=r"\bkept\b"):
        layer.rewire_(torch.tensor([0, layer.nnz]), empty, opt)
    with pytest.raises(ValueError, match=r"\bgrown\b"):
        layer.rewire_(torch.arange(layer.nnz), torch.tensor([160]), opt)
    with pytest.raises(ValueError, match=r"\bgrown\b"):  # each row re-grows its first kept weight: 5 a row
        layer.rewire_(torch.arange(layer.nnz), _layer_keys(layer)[layer.crow[:-1].long()], opt)
    _assert_layer_unchanged(layer, opt, before)


def test_rewire_bad_arguments_unstructured(impl):
    torch.manual_seed(2)
    layer = SparseLinear.from_dense(nn.Linear(8, 6), 0.5)
    opt = _adam_steps(layer)
    before = _layer_state(layer, opt)
    nnz = layer.nnz
    cases = [
        (torch.arange(nnz, dtype=torch.int32), torch.zeros(0, dtype=torch.int64), TypeError, r"\bkept\b"),
        (torch.arange(nnz), torch.zeros(0, dtype=torch.int32), TypeError, r"\bgrown\b"),
        (torch.arange(nnz).view(1, -1), torch.zeros(0, dtype=torch.int64), TypeError, r"\bkept\b"),
        ([0, 1], torch.zeros(0, dtype=torch.int64), TypeError, r"\bkept\b"),
        (torch.tensor([1, 0]), torch.zeros(0, dtype=torch.int64), ValueError, r"\bkept\b"),
        (torch.tensor([0, nnz]), torch.zeros(0, dtype=torch.int64), ValueError, r"\bkept\b"),
        (torch.tensor([0]), torch.tensor([48]), ValueError, r"\bgrown\b"),
        (torch.tensor([0]), torch.tensor([int(_layer_keys(layer)[0])]), ValueError, r"\bgrown\b"),
    ]
    for kept, grown, exc, match in cases:
        with pytest.raises(exc, match=match):
            layer.rewire_(kept, grown, opt)
        _assert_layer_unchanged(layer, opt, before)


@pytest.mark.parametrize("pattern", ["2:4", Block(8)], ids=["2:4", "block8"])
def test_rewire_refuses_nm_and_block_layers(pattern):
    layer = SparseLinear.from_dense(nn.Linear(16, 16), None if pattern == "2:4" else 0.5, pattern=pattern)
    with pytest.raises(TypeError, match=r"rewire_"):
        layer.rewire_(torch.zeros(0, dtype=torch.int64), torch.zeros(0, dtype=torch.int64))


def test_rewired_fanin_layer_round_trips_into_another_k(impl):
    layer = _fanin_layer()
    counts = [0 if r in (2, 9) else 6 for r in range(10)]
    kept, grown = _fanin_plan(layer, counts, torch.Generator().manual_seed(6))
    layer.rewire_(kept, grown)
    with torch.no_grad():
        layer.values.add_(torch.randn(layer.values.shape))  # grown weights nonzero too
    fresh = SparseLinear(16, 10, pattern=FanIn(3))
    fresh.load_state_dict(layer.state_dict())
    assert fresh.pattern == FanIn(6)
    _same_index(_csr_of(fresh), _csr_of(layer), "loaded")
    assert torch.equal(fresh.values, layer.values)
    x = torch.randn(7, 16)
    assert torch.equal(fresh(x), layer(x))
    assert torch.equal(fresh(x)[:, 2], layer.bias.detach()[2].expand(7)), "an ablated row outputs its bias"


def test_load_refuses_mixed_fanin_checkpoint():
    layer = SparseLinear.from_dense(nn.Linear(16, 10), 0.6)  # unstructured: rows of mixed counts
    assert len(set(layer.mask.sum(1).tolist()) - {0}) > 1
    fresh = SparseLinear(16, 10, pattern=FanIn(3))
    before = {k: v.clone() for k, v in fresh.state_dict().items()}
    with pytest.raises(RuntimeError, match=r"crow"):
        fresh.load_state_dict(layer.state_dict())
    assert fresh.pattern == FanIn(3)
    for k, v in fresh.state_dict().items():
        assert torch.equal(v, before[k]), f"{k} changed by a refused load"


def test_prune_and_update_mask_on_fanin(impl):
    layer = _fanin_layer()
    with pytest.raises(TypeError, match=r"prune_"):
        layer.prune_(torch.ones(layer.nnz, dtype=torch.bool))
    mask = layer.mask.clone()
    mask[4] = False
    mask[6] = False
    w = layer.dense_weight().detach() * mask
    layer.update_mask_(mask)
    assert layer.pattern == FanIn(4) and torch.equal(layer.dense_weight().detach(), w)
    full = torch.zeros_like(mask)
    full[:, :7] = True
    full[4] = False
    layer.update_mask_(full)
    assert layer.pattern == FanIn(7)
    with pytest.raises(ValueError, match=r"\bmask\b"):
        layer.update_mask_(torch.zeros_like(mask))
    bad = full.clone()
    bad[0, 10] = True
    with pytest.raises(ValueError, match=r"\bmask\b"):
        layer.update_mask_(bad)
    assert layer.pattern == FanIn(7) and torch.equal(layer.mask, full)


def test_prune_unstructured_matches_rewire(impl):
    torch.manual_seed(3)
    layer = SparseLinear.from_dense(nn.Linear(12, 9), 0.5)
    opt = _adam_steps(layer)
    keep = torch.rand(layer.nnz) < 0.5
    kept = keep.nonzero().flatten()
    w_exp, mask_exp, where_kept = _expected_after_rewire(layer, kept, torch.zeros(0, dtype=torch.int64))
    old = layer.values
    pre = {k: v.clone() for k, v in opt.state[old].items()}
    layer.prune_(keep, opt)
    _check_rewired(layer, opt, pre, old, w_exp, mask_exp, where_kept, f"{impl} prune_")


# ---- 7. SRigL neuron ablation ----

IN, HID, OUT, K0 = 16, 32, 8, 8
DEAD = [3, 7, 11, 20, 29]  # hidden units made non-salient


def _srigl_model(dead, dense_head=False):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(IN, HID), nn.ReLU(), nn.Linear(HID, OUT))
    filt = (lambda m, fqn: fqn == "0") if dense_head else None
    sparseops.sparsify_(model, pattern=FanIn(K0), filter_fn=filt)
    with torch.no_grad():
        l0 = model[0]
        rows = l0.row.long()
        for i, r in enumerate(dead):  # tiny, distinct magnitudes: dropped first
            sel = rows == r
            l0.values.view(-1)[sel] = 1e-7 * (1 + i) * torch.arange(1, int(sel.sum()) + 1, dtype=torch.float32)
            l0.bias[r] = 1.0  # the unit stays on (relu' = 1), so a restored head makes its gradient large
        head = model[2]
        if isinstance(head, SparseLinear):
            dead_col = torch.isin(head.col.reshape(-1).long(), torch.tensor(dead))
            head.values.view(-1)[dead_col] = 0.0
        else:
            head.weight[:, dead] = 0.0
    return model


def _batch(t):
    g = torch.Generator().manual_seed(500 + t)
    return torch.randn(8, IN, generator=g), torch.randn(8, OUT, generator=g)


def _grads64(model, x, y):
    """dL/dW of every SparseLinear, dense [out, in]: fp64 autograd through a dense copy of the model."""
    h, leaves = x.double(), {}
    for name, mod in model.named_children():
        if isinstance(mod, SparseLinear):
            w = mod.dense_weight().detach().double().requires_grad_(True)
            leaves[name] = w
            h = F.linear(h, w, mod.bias.detach().double())
        elif isinstance(mod, nn.Linear):
            h = F.linear(h, mod.weight.detach().double(), mod.bias.detach().double())
        else:
            h = mod(h)
    loss = F.mse_loss(h, y.double())
    return dict(zip(leaves, torch.autograd.grad(loss, list(leaves.values()))))


def _train(model, opt, t):
    x, y = _batch(t)
    ref = _grads64(model, x, y)
    loss = F.mse_loss(model(x), y)
    opt.zero_grad()
    loss.backward()
    opt.step()
    return ref


def _srigl_reference(mask, w, g, budget, f, ablation, ablate=True, k0=None):
    """SRigL's update per its docstring, on dense tensors: (sure-active rows, active count, k', kept mask).

    ``kept`` is the surviving stored weights after the layer-wise drop (before re-balancing)."""
    out_f, in_f = mask.shape
    nnz = int(mask.sum())
    n = int(round(f * nnz))
    flat_mask = mask.flatten()
    stored = flat_mask.nonzero().flatten().numpy()
    kept_pos = _top(_rank_key(w.flatten().numpy()[stored]), stored, nnz - n)
    kept = torch.zeros(out_f * in_f, dtype=torch.bool)
    kept[torch.from_numpy(kept_pos)] = True
    kept = kept.view(out_f, in_f)
    cand = torch.zeros(out_f * in_f, dtype=torch.bool)
    cand[torch.from_numpy(_top(_rank_key(g.flatten().numpy()), np.arange(out_f * in_f), n))] = True
    salient = (kept | cand.view(out_f, in_f)).sum(1)
    if ablate and ablation > 0:
        k0 = max(1, budget // out_f) if k0 is None else k0  # the fan-in of the layer's rows at build
        active = salient >= max(1, int(ablation * k0))
    else:
        active = torch.ones(out_f, dtype=torch.bool)
    least = -(-budget // in_f)
    count = max(int(active.sum()), least)
    k = min(in_f, budget // count)
    return active, count, k, kept, salient


def _check_srigl_layer(name, old_mask, w_old, g, new_mask, w_new, budget, f, ablation, ablate=True, k0=None):
    active, count, k, kept, salient = _srigl_reference(old_mask, w_old, g, budget, f, ablation, ablate, k0)
    rows_held = new_mask.sum(1)
    now_active = rows_held > 0
    assert int(now_active.sum()) == count, f"{name}: {int(now_active.sum())} active rows, expected {count}"
    assert bool((now_active | ~active).all()), f"{name}: a salient row was ablated: {(active & ~now_active).nonzero()}"
    assert bool((rows_held[now_active] == k).all()), f"{name}: active rows hold {rows_held.tolist()}, expected {k}"
    assert int(new_mask.sum()) == count * k <= budget
    assert (w_new[~new_mask] == 0).all()
    atol = 1e-5 * float(g.abs().max())
    for r in range(old_mask.shape[0]):
        if not now_active[r]:
            continue
        surv = kept[r]
        if int(surv.sum()) > k:  # the k largest of the row's survivors
            top = torch.zeros_like(surv)
            pos = surv.nonzero().flatten().numpy()
            top[torch.from_numpy(_top(_rank_key(w_old[r].numpy()[pos]), pos, k))] = True
            surv = top
        assert bool((new_mask[r] | ~surv).all()), (
            f"{name} row {r}: survivors {surv.nonzero().flatten().tolist()} not all in the new row "
            f"{new_mask[r].nonzero().flatten().tolist()}")
        assert torch.equal(w_new[r][surv], w_old[r][surv]), f"{name} row {r}: a surviving weight changed"
        grown = new_mask[r] & ~surv
        need = k - int(surv.sum())
        free, dropped = ~old_mask[r], old_mask[r] & ~surv
        assert (w_new[r][grown & free] == 0).all(), f"{name} row {r}: grown weights not 0"
        # a dropped position taken back is on both masks: it keeps its value
        assert torch.equal(w_new[r][grown & dropped], w_old[r][grown & dropped]), f"{name} row {r}: re-grown value"
        nf = int(free.sum())
        if need <= nf:
            assert_top_set(grown, g[r].abs(), free, need, f"{name} row {r} grown", atol)
        else:
            assert torch.equal(grown & free, free), f"{name} row {r}: free positions left while re-growing dropped ones"
            assert_top_set(grown & dropped, g[r].abs(), dropped, need - nf, f"{name} row {r} re-grown", atol)
    return now_active, k, salient


def _snap(model, names):
    return ({n: model.get_submodule(n).mask.clone() for n in names},
            {n: model.get_submodule(n).dense_weight().detach().clone() for n in names})


def test_srigl_ablates_non_salient_rows_and_rebalances(impl):
    model = _srigl_model(DEAD)
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    dst = SRigL(model, opt, update_every=1, drop_fraction=0.5, ablation=0.3)
    names = ["0", "2"]
    assert dst.budgets == {"0": HID * K0, "2": OUT * K0}
    ref = _train(model, opt, 1)
    masks, ws = _snap(model, names)
    pre = {n: {k: v.clone() for k, v in opt.state[model.get_submodule(n).values].items()} for n in names}
    old_keys = {n: _layer_keys(model.get_submodule(n)) for n in names}
    assert (ref["0"][DEAD] == 0).all(), "set-up: the dead rows must have an exactly zero gradient"
    assert dst.step() is True
    for n in names:
        mod = model.get_submodule(n)
        act, k, salient = _check_srigl_layer(f"layer {n}", masks[n], ws[n], ref[n], mod.mask,
                                             mod.dense_weight().detach(), dst.budgets[n], 0.5, 0.3)
        assert mod.pattern == FanIn(k)
        assert torch.equal(dst.ablated(n), (~act).nonzero().flatten())
        # optimizer state: survivors' moments exactly, grown ones 0, step kept
        st = opt.state[mod.values]
        where = {int(key): i for i, key in enumerate(old_keys[n])}
        src = torch.tensor([where.get(int(key), -1) for key in _layer_keys(mod)])
        kept_new = (masks[n] & mod.mask).flatten()[_layer_keys(mod)]
        assert torch.equal(src >= 0, kept_new)
        for key in ("exp_avg", "exp_avg_sq"):
            got, old = st[key].reshape(-1), pre[n][key].reshape(-1)
            assert torch.equal(got[src >= 0], old[src[src >= 0]]), f"layer {n}: {key} of survivors"
            assert (got[src < 0] == 0).all(), f"layer {n}: {key} of grown weights"
        assert torch.equal(st["step"], pre[n]["step"])
    # the set-up worked as designed: layer 0 lost exactly the dead rows, fan-in 256 // 27 = 9
    assert dst.ablated("0").tolist() == DEAD
    assert model[0].pattern == FanIn(9) and model[0].nnz == 27 * 9
    assert dst.state_dict()["budgets"] == {"0": 256, "2": 64}
    # the budgets survive a state_dict round trip into an SRigL built on the shrunk model
    dst2 = SRigL(model, opt, update_every=1, drop_fraction=0.5)
    assert dst2.budgets["0"] == 243
    dst2.load_state_dict(dst.state_dict())
    assert dst2.budgets == {"0": 256, "2": 64}
    # training goes on
    x, y = _batch(2)
    F.mse_loss(model(x), y).backward()
    assert all(torch.isfinite(p.grad).all() for p in model.parameters())
    h = model[0](x)
    assert torch.equal(h[:, DEAD], model[0].bias.detach()[DEAD].expand(8, -1)), "ablated rows output their bias"


def test_srigl_keeps_at_least_budget_over_in_rows(impl):
    dead = list(range(0, 32, 2)) + [1, 3]  # 18 dead rows, 14 salient: fewer than ceil(256 / 16) = 16
    model = _srigl_model(dead)
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    dst = SRigL(model, opt, update_every=1, drop_fraction=0.6, ablation=0.3, filter_fn=lambda m, f: f == "0")
    ref = _train(model, opt, 1)
    masks, ws = _snap(model, ["0"])
    dst.step()
    mod = model[0]
    act, k, salient = _check_srigl_layer("layer 0", masks["0"], ws["0"], ref["0"], mod.mask,
                                         mod.dense_weight().detach(), 256, 0.6, 0.3)
    assert k == 16 and mod.pattern == FanIn(16) and mod.nnz == 256
    alive = sorted(set(range(32)) - set(dead))
    assert bool(act[alive].all())
    assert set(dst.ablated("0").tolist()) <= set(dead) and dst.ablated("0").numel() == 16


def test_srigl_no_ablation_and_ablation_zero_keep_every_row(impl):
    for kw in ({"no_ablation": ["0"]}, {"ablation": 0}, {"ablation": 0.0, "no_ablation": ("0", "2")}):
        model = _srigl_model(DEAD)
        opt = torch.optim.Adam(model.parameters(), lr=1e-2)
        dst = SRigL(model, opt, update_every=1, drop_fraction=0.5, **kw)
        ref = _train(model, opt, 1)
        masks, ws = _snap(model, ["0"])
        dst.step()
        mod = model[0]
        _check_srigl_layer(f"layer 0 {kw}", masks["0"], ws["0"], ref["0"], mod.mask, mod.dense_weight().detach(),
                           256, 0.5, dst.ablation, ablate=False)
        assert mod.mask.sum(1).tolist() == [K0] * HID, f"{kw}: rows hold {mod.mask.sum(1).tolist()}"
        assert mod.pattern == FanIn(K0) and dst.ablated("0").numel() == 0


def test_srigl_revives_a_row_whose_gradient_returns(impl):
    model = _srigl_model(DEAD, dense_head=True)
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    dst = SRigL(model, opt, update_every=1, drop_fraction=0.5, ablation=0.3)
    assert dst.names == ["0"]
    _train(model, opt, 1)
    dst.step()
    assert dst.ablated("0").tolist() == DEAD and model[0].pattern == FanIn(9)
    with torch.no_grad():
        model[2].weight[:, DEAD] = 2.0  # the head reads the dead units again: their gradient is large
    ref = _train(model, opt, 2)
    assert (ref["0"][DEAD].abs().amin(1) > 0).all()
    masks, ws = _snap(model, ["0"])
    assert dst.step() is True
    mod = model[0]
    act, k, _ = _check_srigl_layer("layer 0 update 2", masks["0"], ws["0"], ref["0"], mod.mask,
                                   mod.dense_weight().detach(), 256, 0.5, 0.3)
    assert bool(act[DEAD].all()), f"dead rows not revived: ablated {dst.ablated('0').tolist()}"
    assert not set(dst.ablated("0").tolist()) & set(DEAD)
    a = HID - dst.ablated("0").numel()
    assert a > 27, "more rows must be active than after the first update"
    assert k == min(IN, 256 // a) and mod.pattern == FanIn(k) and mod.nnz == a * k
    # a revived row starts from 0 weights; rows that held 9 kept their 8 largest survivors (checked above)
    assert (mod.dense_weight().detach()[DEAD] == 0).all()


def test_srigl_fan_in_falls_and_rows_keep_their_k_largest(impl, monkeypatch):
    # revived rows lower k (9 -> 8) while a small drop leaves most rows with all 9 of their weights:
    # those rows keep their 8 largest (the branch of SRigL._plan that only a falling fan-in reaches)
    import sparseops.dst as dst_mod

    calls = []
    real = dst_mod._largest_per_row
    monkeypatch.setattr(dst_mod, "_largest_per_row", lambda *a: calls.append(a[3]) or real(*a))
    model = _srigl_model(DEAD, dense_head=True)
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    dst = SRigL(model, opt, update_every=1, drop_fraction=0.5, ablation=0.3)
    _train(model, opt, 1)
    dst.step()
    assert model[0].pattern == FanIn(9) and not calls
    with torch.no_grad():
        model[2].weight[:, DEAD] = 2.0
    dst.drop_fraction = 0.1
    ref = _train(model, opt, 2)
    masks, ws = _snap(model, ["0"])
    assert dst.step() is True
    mod = model[0]
    act, k, _ = _check_srigl_layer("layer 0 update 2", masks["0"], ws["0"], ref["0"], mod.mask,
                                   mod.dense_weight().detach(), 256, 0.1, 0.3)
    assert calls == [k] and k == 8, (calls, k)
    # the case is what it claims: some rows kept more than k survivors after the layer-wise drop
    _, _, _, kept, _ = _srigl_reference(masks["0"], ws["0"], ref["0"], 256, 0.1, 0.3)
    assert int((kept.sum(1) > k).sum()) > 0


def test_srigl_k0_is_the_fan_in_of_a_layer_built_with_ablated_rows(impl):
    """SRigL built on a FanIn(16) layer whose rows hold 16 weights or none (16 of 32 rows ablated, e.g. a
    resumed run): per the docstring k0 is the fan-in the layer had, 16, so a row needs
    max(1, int(0.3 * 16)) = 4 salient weights. Row 20 has exactly 3 (three large weights survive the drop,
    its gradient is zero), so it must be ablated."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(IN, HID), nn.ReLU(), nn.Linear(HID, OUT))
    sparseops.sparsify_(model, pattern=FanIn(K0), filter_fn=lambda m, fqn: fqn == "0")
    l0, row = model[0], 20
    half = torch.zeros(HID, IN, dtype=torch.bool)
    half[16:] = True
    l0.update_mask_(half)
    assert l0.pattern == FanIn(16) and l0.nnz == 256
    with torch.no_grad():
        w = torch.randn(l0.nnz) * 0.3
        v = torch.full((IN,), 1e-6)
        v[[2, 7, 11]] = 10.0
        w[l0.row.long() == row] = v
        l0.values.view(-1).copy_(w)
        model[2].weight[:, row] = 0.0
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    dst = SRigL(model, opt, update_every=1, drop_fraction=0.5, ablation=0.3)
    ref = _train(model, opt, 1)
    assert (ref["0"][row] == 0).all()
    masks, ws = _snap(model, ["0"])
    dst.step()
    assert row in dst.ablated("0").tolist(), (
        f"row {row} has 3 salient weights < int(0.3 * k0=16) = 4 but stayed active with "
        f"{int(l0.mask[row].sum())} weights (threshold taken from budget // out = {256 // HID})")
    _check_srigl_layer("layer 0", masks["0"], ws["0"], ref["0"], l0.mask, l0.dense_weight().detach(), 256, 0.5,
                       0.3, k0=16)


SRIGL_BAD = [
    pytest.param({"ablation": -0.1}, ValueError, "ablation", id="ablation-neg"),
    pytest.param({"ablation": 1.5}, ValueError, "ablation", id="ablation-1.5"),
    pytest.param({"ablation": True}, ValueError, "ablation", id="ablation-bool"),
    pytest.param({"ablation": "x"}, ValueError, "ablation", id="ablation-str"),
    pytest.param({"ablation": float("nan")}, ValueError, "ablation", id="ablation-nan"),
    pytest.param({"no_ablation": "0"}, TypeError, "no_ablation", id="no_ablation-str"),
    pytest.param({"no_ablation": ["nope"]}, ValueError, "no_ablation", id="no_ablation-unknown"),
    pytest.param({"no_ablation": ["0", "1"]}, ValueError, "no_ablation", id="no_ablation-relu"),
]


@pytest.mark.parametrize("kwargs,exc,name", SRIGL_BAD)
def test_srigl_bad_ablation_arguments(kwargs, exc, name):
    model = _srigl_model(DEAD)
    opt = torch.optim.Adam(model.parameters())
    with pytest.raises(exc, match=rf"\b{name}\b"):
        SRigL(model, opt, **kwargs)


# ---- gather (the re-map of values and optimizer state) and count_off_kept ----


@pytest.mark.parametrize("n_tensors", [1, 3])
def test_gather_remaps_every_tensor_in_one_call(impl, n_tensors):
    g = torch.Generator().manual_seed(21)
    m, n = 37, 50
    src = torch.randint(-1, m, (n,), generator=g).to(torch.int32)
    src[:3] = -1
    src[3] = m - 1
    xs = [torch.randn(m, generator=g) for _ in range(n_tensors)]
    outs = R.gather(src, xs)
    assert len(outs) == n_tensors
    for x, o in zip(xs, outs):
        ref = torch.tensor([0.0 if int(j) < 0 else float(x[int(j)]) for j in src])
        assert o.dtype == torch.float32 and o.shape == (n,)
        assert torch.equal(o, ref)
        assert o.data_ptr() != x.data_ptr()


def test_gather_other_dtypes_take_the_torch_path():
    src = torch.tensor([2, -1, 0], dtype=torch.int32)
    x64 = torch.tensor([1.5, 2.5, 3.5], dtype=torch.float64)
    xb = x64.to(torch.bfloat16)
    o64, ob = R.gather(src, [x64, xb])
    assert torch.equal(o64, torch.tensor([3.5, 0.0, 1.5], dtype=torch.float64))
    assert ob.dtype == torch.bfloat16 and torch.equal(ob, torch.tensor([3.5, 0.0, 1.5], dtype=torch.bfloat16))


def test_binding_gather_refuses_bad_input():
    x = np.arange(5, dtype=np.float32)
    with pytest.raises(ValueError, match=r"^src: index 5 at position 1 is outside \[-1, 5\)"):
        _C.dst_gather(np.array([0, 5], np.int32), [x], 1)
    with pytest.raises(ValueError, match=r"^src: index -2 at position 0"):
        _C.dst_gather(np.array([-2], np.int32), [x], 1)
    with pytest.raises(TypeError, match=r"^src: expected dtype int32"):
        _C.dst_gather(np.array([0], np.int64), [x], 1)
    with pytest.raises(TypeError, match=r"^xs: expected dtype float32"):
        _C.dst_gather(np.array([0], np.int32), [x.astype(np.float64)], 1)
    with pytest.raises(ValueError, match=r"^xs: expected 5 entries, got 4"):
        _C.dst_gather(np.array([0], np.int32), [x, x[:4]], 1)
    with pytest.raises(ValueError, match=r"^xs: must be contiguous"):
        _C.dst_gather(np.array([0], np.int32), [np.arange(10, dtype=np.float32)[::2]], 1)
    assert _C.dst_gather(np.array([0], np.int32), [], 1) == []


def _ref_count_off_kept(mask, keep_dense, pos, cols):
    counts = torch.zeros(mask.shape[0], dtype=torch.int64)
    for p in pos.tolist():
        r, c = divmod(p, cols)
        if not (mask[r, c] and keep_dense[r, c]):
            counts[r] += 1
    return counts


@pytest.mark.parametrize("shape", [(1, 1), (1, 40), (40, 1), (13, 17), (64, 100)], ids=lambda s: f"{s[0]}x{s[1]}")
def test_count_off_kept_matches_reference(impl, shape):
    rows, cols = shape
    g = torch.Generator().manual_seed(rows * 100 + cols)
    mask = torch.rand(rows, cols, generator=g) < 0.4
    fmt = CSRWeight.from_mask(mask)
    keep = torch.rand(fmt.nnz, generator=g) < 0.5
    keep_dense = torch.zeros(rows, cols, dtype=torch.bool)
    keep_dense[fmt.row.long(), fmt.col.long()] = keep
    for frac in (0.0, 0.3, 1.0):
        pos = (torch.rand(rows * cols, generator=g) < frac).nonzero().flatten()
        got = R.count_off_kept(fmt, keep, pos)
        assert torch.equal(got.long(), _ref_count_off_kept(mask, keep_dense, pos, cols)), (shape, frac)


@needs_cpp
def test_count_off_kept_many_rows_and_threads():
    """Rows spread over 8 threads (1000 rows, dynamic chunks of 64), each thread with its own bitmap of a
    row's kept columns: a row's bits must not leak into the next row a thread takes, nor into another
    thread's; rows without positions and rows without stored entries among them."""
    rows, cols = 1000, 1000
    g = torch.Generator().manual_seed(4242)
    mask = torch.rand(rows, cols, generator=g) < 0.1
    mask[::7] = False
    fmt = CSRWeight.from_mask(mask)
    keep = torch.rand(fmt.nnz, generator=g) < 0.7
    keep_dense = torch.zeros(rows, cols, dtype=torch.bool)
    keep_dense[fmt.row.long(), fmt.col.long()] = keep
    pick = torch.rand(rows, cols, generator=g) < 0.05
    pick[5::11] = False
    pick |= mask & (torch.rand(rows, cols, generator=g) < 0.5)  # kept and dropped stored positions too
    pos = pick.flatten().nonzero().flatten()
    exp = (pick & ~(mask & keep_dense)).sum(1)
    for threads in (1, 2, 8):
        got = _C.dst_count_off_kept(rows, cols, fmt.crow.numpy(), fmt.col.numpy(), keep.numpy(), pos.numpy(), threads)
        assert np.array_equal(got, exp.numpy()), threads


def test_binding_count_off_kept_refuses_bad_input():
    fmt = CSRWeight.from_mask(torch.eye(4, dtype=torch.bool))
    crow, col = fmt.crow.numpy(), fmt.col.numpy()
    keep = np.ones(4, dtype=bool)
    with pytest.raises(ValueError, match=r"^pos: positions must be strictly increasing"):
        _C.dst_count_off_kept(4, 4, crow, col, keep, np.array([3, 3], np.int64), 1)
    with pytest.raises(ValueError, match=r"^pos: position 16 at 0 is outside \[0, 16\)"):
        _C.dst_count_off_kept(4, 4, crow, col, keep, np.array([16], np.int64), 1)
    with pytest.raises(ValueError, match=r"^keep: expected 4 entries, got 3"):
        _C.dst_count_off_kept(4, 4, crow, col, keep[:3], np.array([0], np.int64), 1)
    with pytest.raises(ValueError, match=r"^col: index 9"):
        _C.dst_count_off_kept(4, 4, crow, np.array([0, 1, 2, 9], np.int32), keep, np.array([0], np.int64), 1)


@pytest.mark.parametrize("shape", [(1, 1), (1, 1000), (37, 3), (64, 100), (600, 600)], ids=lambda s: f"{s[0]}x{s[1]}")
def test_top_abs_with_an_eligibility_mask(impl, shape):
    """``eligible`` (GradualPruner's dense phase) leaves out the positions it flags False, on top of
    ``exclude``; ties, nan and every count up to all eligible."""
    rows, cols = shape
    g = torch.Generator().manual_seed(_seed("elig", shape))
    s = torch.randint(-4, 5, (rows, cols), generator=g).float() * 0.5
    s[torch.rand(rows, cols, generator=g) < 0.01] = float("nan")
    eligible = torch.rand(rows, cols, generator=g) < 0.6
    stored = torch.rand(rows, cols, generator=g) < 0.2
    for exclude in (None, stored):
        out_mask = ~eligible if exclude is None else (~eligible | exclude)
        count = int((~out_mask).sum())
        fmt = None if exclude is None else CSRWeight.from_mask(exclude)
        for n in sorted({0, min(1, count), count // 2, count}):
            got = R.top_abs(s, n, exclude=fmt, eligible=eligible)
            assert torch.equal(got, ref_top_abs(s, n, out_mask)), (shape, n, exclude is None)
        with pytest.raises(ValueError, match=r"^n: expected 0 <= n <= %d" % count):
            R.top_abs(s, count + 1, exclude=fmt, eligible=eligible)


def test_binding_top_abs_refuses_a_bad_eligibility_mask():
    s = np.zeros((3, 4), np.float32)
    with pytest.raises(TypeError, match=r"^eligible: expected dtype bool"):
        _C.dst_top_abs(s, None, None, 1, 1, np.ones((3, 4), np.uint8))
    with pytest.raises(ValueError, match=r"^eligible: expected shape \(3, 4\)"):
        _C.dst_top_abs(s, None, None, 1, 1, np.ones((4, 3), bool))
    with pytest.raises(ValueError, match=r"^eligible: must be C-contiguous"):
        _C.dst_top_abs(s, None, None, 1, 1, np.ones((4, 3), bool).T)


# ---- caller-given outputs: checked, and never sharing memory with another argument ----


def _csr_np(mask):
    fmt = CSRWeight.from_mask(mask)
    return fmt, fmt.crow.numpy(), fmt.col.numpy()


def test_binding_outputs_are_checked():
    mask = torch.eye(4, dtype=torch.bool)
    fmt, crow, col = _csr_np(mask)
    s = np.arange(16, dtype=np.float32).reshape(4, 4)
    with pytest.raises(ValueError, match=r"^out: expected shape \(2,\)"):
        _C.dst_top_abs(s, crow, col, 2, 1, None, np.zeros(3, np.int64))
    with pytest.raises(TypeError, match=r"^out: expected dtype int64"):
        _C.dst_top_abs(s, crow, col, 2, 1, None, np.zeros(2, np.int32))
    ro = np.zeros(2, np.int64)
    ro.flags.writeable = False
    with pytest.raises(ValueError, match=r"^out: must be writeable"):
        _C.dst_top_abs(s, crow, col, 2, 1, None, ro)
    with pytest.raises(ValueError, match=r"^out: must be C-contiguous"):
        _C.dst_top_abs(s, crow, col, 2, 1, None, np.zeros(4, np.int64)[::2])
    with pytest.raises(TypeError, match=r"^out: expected a numpy array or None"):
        _C.dst_top_abs(s, crow, col, 2, 1, None, [0, 0])
    with pytest.raises(ValueError, match=r"^out: expected shape \(3,\)"):
        _C.dst_sample_off(4, 4, crow, col, 3, 1, np.zeros(2, np.int64))
    with pytest.raises(ValueError, match=r"^out: expected shape \(4,\)"):
        _C.dst_count_off_kept(4, 4, crow, col, np.ones(4, bool), np.array([1], np.int64), 1, np.zeros(3, np.int64))
    with pytest.raises(ValueError, match=r"^outs: expected None or a list of 1 arrays"):
        _C.dst_gather(np.array([0], np.int32), [np.ones(2, np.float32)], 1, [])
    with pytest.raises(ValueError, match=r"^out: expected None or 7 arrays"):
        _C.dst_csr_repack(4, 4, crow, col, np.arange(4, dtype=np.int64), np.zeros(0, np.int64), 1, [])
    sizes = (5, 4, 4, 5, 4, 4, 4)
    bad = [np.zeros(k, np.int32) for k in sizes]
    bad[4] = np.zeros(5, np.int32)
    with pytest.raises(ValueError, match=r"^out\[4\] \(t_row\): expected shape \(4,\)"):
        _C.dst_csr_repack(4, 4, crow, col, np.arange(4, dtype=np.int64), np.zeros(0, np.int64), 1, bad)


@needs_cpp
def test_repack_remaps_tensors_in_its_merge():
    """``xs``/``outs`` of the binding: each out equals ``x[src]`` with 0 for a grown entry (the reference:
    numpy indexing through the ``src`` it returns), NaN-poisoned outputs fully written, 1 and 8 threads;
    the wrapper's ``remap`` returns the same for float32 and takes the gather path for other dtypes."""
    g = torch.Generator().manual_seed(31)
    fmt = CSRWeight.from_mask(_random_mask(300, 701, 0.2, g, empty_rows=(5,)))
    kept, grown = _repack_case(fmt, g, 0.7, 0.1, empty_rows=(9,))
    xs5 = [np.random.default_rng(j).standard_normal(fmt.nnz).astype(np.float32) for j in range(5)]
    # 1, 2, 3 tensors (the merge's unrolled cases: values, momentum, Adam's two moments), 5 (its generic
    # loop); kept as planned, and nothing kept (every entry grown: the outs all 0)
    for kp in (kept, torch.zeros(0, dtype=torch.int64)):
        nn = kp.numel() + grown.numel()
        for nx, threads, scratch in ((3, 1, False), (3, 8, True), (1, 2, True), (2, 2, False), (5, 2, True)):
            xs = xs5[:nx]
            outs = [np.full(nn, np.nan, np.float32) for _ in xs]
            res = _C.dst_csr_repack(300, 701, fmt.crow.numpy(), fmt.col.numpy(), kp.numpy(), grown.numpy(), threads,
                                    None, xs, outs, scratch=scratch)
            src = res[6]
            assert (src >= 0).sum() == kp.numel()
            for x, o in zip(xs, outs):
                exp = np.where(src >= 0, x[np.maximum(src, 0)], np.float32(0))
                assert np.array_equal(o, exp), (nx, threads)
    ref, esrc = _expected_repack(fmt, kept, grown)
    v64 = torch.randn(fmt.nnz, generator=g, dtype=torch.float64)
    v32 = torch.from_numpy(xs[0])
    new, src, (a, b) = R.repack(fmt, kept, grown, [v32, v64])
    assert torch.equal(src, esrc)
    assert torch.equal(a, torch.where(esrc >= 0, v32[esrc.long().clamp(min=0)], torch.zeros(())))
    assert b.dtype == torch.float64
    assert torch.equal(b, torch.where(esrc >= 0, v64[esrc.long().clamp(min=0)], torch.zeros((), dtype=torch.float64)))


@needs_cpp
def test_binding_repack_refuses_bad_remap_arguments():
    mask = torch.eye(4, dtype=torch.bool)
    fmt, crow, col = _csr_np(mask)
    kept, grown = np.arange(4, dtype=np.int64), np.array([1], dtype=np.int64)
    x, o = np.ones(4, np.float32), np.zeros(5, np.float32)
    call = lambda xs, outs: _C.dst_csr_repack(4, 4, crow, col, kept, grown, 1, None, xs, outs)  # noqa: E731
    with pytest.raises(ValueError, match=r"^xs, outs: give both or neither"):
        call([x], None)
    with pytest.raises(ValueError, match=r"^xs, outs: expected two lists of the same length"):
        call([x], [o, o])
    with pytest.raises(ValueError, match=r"^xs: expected 4 entries, got 3"):
        call([np.ones(3, np.float32)], [o])
    with pytest.raises(TypeError, match=r"^xs: expected dtype float32"):
        call([np.ones(4, np.float64)], [o])
    with pytest.raises(ValueError, match=r"^outs: expected shape \(5,\)"):
        call([x], [np.zeros(4, np.float32)])
    big = np.zeros(9, np.float32)
    with pytest.raises(ValueError, match=r"^outs\[0\]: shares memory with xs\[0\]"):
        call([big[:4]], [big[3:8]])
    with pytest.raises(ValueError, match=r"^outs\[0\]: shares memory with outs\[1\]"):
        call([x, x], [o, o])
    ok = np.full(5, np.nan, np.float32)
    call([np.arange(4, dtype=np.float32)], [ok])
    assert ok.tolist() == [0.0, 0.0, 1.0, 2.0, 3.0]  # row 0 keeps col 0 and grows col 1


def test_binding_outputs_may_not_alias_an_argument():
    """A kernel writing an output that shares memory with an index it follows could be sent out of bounds:
    every such pair is refused, naming the output."""
    mask = torch.eye(4, dtype=torch.bool)
    fmt, crow, col = _csr_np(mask)
    kept = np.arange(4, dtype=np.int64)
    grown = np.array([1, 2], dtype=np.int64)

    def outs(nn):
        return [np.zeros(k, np.int32) for k in (5, nn, nn, 5, nn, nn, nn)]

    over_input = outs(4)
    over_input[1] = col  # the new col written over the old one while the merge reads it
    with pytest.raises(ValueError, match=r"^out\[1\] \(col\): shares memory with col"):
        _C.dst_csr_repack(4, 4, crow, col, kept, np.zeros(0, np.int64), 1, over_input)
    big = np.zeros(12, np.int32)
    over_each_other = outs(6)
    over_each_other[4], over_each_other[5] = big[:6], big[3:9]  # t_row and t_perm overlap
    with pytest.raises(ValueError, match=r"^out\[4\] \(t_row\): shares memory with out\[5\] \(t_perm\)"):
        _C.dst_csr_repack(4, 4, crow, col, kept, grown, 1, over_each_other)
    s = np.arange(16, dtype=np.float32).reshape(4, 4)
    with pytest.raises(ValueError, match=r"^out: shares memory with scores"):
        _C.dst_top_abs(s, None, None, 2, 1, None, s.reshape(-1)[:4].view(np.int64))
    x = np.ones(4, np.float32)
    with pytest.raises(ValueError, match=r"^outs\[0\]: shares memory with xs\[0\]"):
        _C.dst_gather(np.array([0, 1, 2, 3], np.int32), [x], 1, [x])
    a, y = np.zeros(4, np.float32), np.ones(4, np.float32)
    with pytest.raises(ValueError, match=r"^outs\[0\]: shares memory with outs\[1\]"):  # the same output twice
        _C.dst_gather(np.array([0, 1, 2, 3], np.int32), [x, y], 1, [a, a])
    # outputs that do not overlap are written as given: the two largest off the diagonal, ascending
    o = np.full(2, -7, np.int64)
    r = _C.dst_top_abs(s, crow, col, 2, 1, None, o)
    assert np.shares_memory(r, o)
    assert o.tolist() == [13, 14]
    good = outs(6)
    res = _C.dst_csr_repack(4, 4, crow, col, kept, grown, 1, good)
    assert all(np.shares_memory(a, b) for a, b in zip(res, good))
    assert good[1].tolist() == [0, 1, 2, 1, 2, 3] and good[6].tolist() == [0, -1, -1, 1, 2, 3]


def test_eligible_and_keep_bytes_other_than_0_1_count_as_true():
    # a uint8 mask viewed as bool (torch's .view(torch.bool) keeps the bytes): the binding counts what the
    # kernel selects, so a count of 2 is refused rather than half-written out of 1 eligible entry
    s = np.array([[4.0, 3.0, 2.0, 1.0]], np.float32)
    elig = np.array([[2, 0, 0, 0]], np.uint8).view(np.bool_)
    with pytest.raises(ValueError, match=r"^n: expected 0 <= n <= 1 "):
        _C.dst_top_abs(s, None, None, 2, 1, elig, None)
    assert _C.dst_top_abs(s, None, None, 1, 1, elig, None).tolist() == [0]
    # keep: the row holds 2 of 4 columns, keep flags one of them with a byte of 3: 3 positions are free
    crow, col = np.array([0, 2], np.int32), np.array([1, 3], np.int32)
    keep = np.array([3, 0], np.uint8).view(np.bool_)
    with pytest.raises(ValueError, match=r"^need: row 0 asks for 4 positions, expected 0..3"):
        _C.dst_top_abs_rows(s, crow, col, keep, np.array([0, 4], np.int64), 1, None)
    assert _C.dst_top_abs_rows(s, crow, col, keep, np.array([0, 3], np.int64), 1, None).tolist() == [0, 2, 3]


@pytest.mark.parametrize("threads", [1, 2])
def test_repack_scratch_outputs_skip_the_pre_pass_but_a_clash_still_raises(threads):
    # scratch=True (what ops.repack passes for the tensors it made): no pass before the merge, so the
    # kernel's own check must catch a clash, in any row, with the re-map on or off
    fmt = CSRWeight.from_mask(torch.rand(300, 701, generator=torch.Generator().manual_seed(3)) < 0.1)
    keys = (fmt.row.long() * 701 + fmt.col.long()).numpy()
    kept = np.arange(0, fmt.nnz, 2, dtype=np.int64)
    for victim in (0, fmt.nnz // 2 - 1, (fmt.nnz - 1) // 2):
        grown = np.array(sorted({int(keys[kept[victim]]), 5, 700 * 299}), np.int64)
        grown = grown[~np.isin(grown, keys[np.setdiff1d(np.arange(fmt.nnz), kept)])]
        x = np.ones(fmt.nnz, np.float32)
        for remap in (False, True):
            xs, outs = ([x], [np.empty(kept.size + grown.size, np.float32)]) if remap else (None, None)
            with pytest.raises(ValueError, match=r"^grown: a grown position is also a kept one"):
                _C.dst_csr_repack(300, 701, fmt.crow.numpy(), fmt.col.numpy(), kept, grown, threads, None, xs, outs,
                                  scratch=True)
    grown = np.array([5], np.int64) if 5 not in keys else np.zeros(0, np.int64)
    res = _C.dst_csr_repack(300, 701, fmt.crow.numpy(), fmt.col.numpy(), kept, grown, threads, scratch=True)
    assert res[1].size == kept.size + grown.size


def test_repack_clash_leaves_outputs_given_unchanged():
    # a grown position that is also kept: refused before the merge writes the caller's arrays
    crow, col = np.array([0, 1], np.int32), np.array([2], np.int32)
    kept, grown = np.array([0], np.int64), np.array([2], np.int64)
    outs = [np.full(n, -7, np.int32) for n in (2, 2, 2, 5, 2, 2, 2)]
    x, xo = np.ones(1, np.float32), np.full(2, -7.0, np.float32)
    with pytest.raises(ValueError, match=r"^grown: a grown position is also a kept one"):
        _C.dst_csr_repack(1, 4, crow, col, kept, grown, 1, outs, [x], [xo])
    assert all((o == -7).all() for o in outs) and (xo == -7).all()
