"""Property tests: every sparseops op against its fp64 reference, on inputs that Hypothesis draws.

Each example draws the shapes (1 and now and then 0 or a wide one), the sparsity (0 up to 0.995) and
the pattern (unstructured with empty rows and columns, N:M with any n < m <= 16, transposable or not,
blocks of 8 to 64, activation thresholds that tie with inputs), the dtype, the layout of every
activation (transposed, a slice of a NaN-filled buffer, a step-2 view, stride-0 broadcast rows), now
and then NaN and ±inf in the activations, the entry point (the public op, its host op, the eager
function the autograd layer calls), the C++ ISA path (avx2, portable) and the thread count, and a seed
for the values themselves, so that a failing example replays exactly. Outputs are compared with
``helpers.assert_close_rms`` against the pure-torch reference run in fp64 on the same (rounded)
inputs, with the dtype's tolerance scaled by how much the sums cancel; codes are compared bit for bit;
the fake implementation must give each output's shape and dtype. One more test checks that a kernel
one element off fails them.

The Triton launchers run under the interpreter without a GPU (conftest sets ``TRITON_INTERPRET``), which
is slow: 24 or fewer rows and features, and few examples.

Budget: the default profile is derandomized (every run draws the same examples) and takes ~1 minute on
two cores: 30 examples per C++ op, 8 per Triton family. ``HYPOTHESIS_PROFILE=thorough`` runs 500 and 60,
randomized (a failure prints its ``@reproduce_failure`` blob).
"""

from __future__ import annotations

import contextlib
import math
import os

import pytest
import torch
from helpers import TOL, assert_close_rms
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

import sparseops

# importing sparseops.ops registers torch.ops.sparseops
import sparseops.ops  # noqa: F401
from sparseops import fewbit
from sparseops import reference as R
from sparseops._cpp import _C
from sparseops.fewbit.table import ACTIVATIONS, activation_fn
from sparseops.formats import BSRWeight, CSRWeight, NMWeight
from sparseops.nn.monarch import monarch_linear
from sparseops.ops import act as ops_act
from sparseops.ops import bsr as ops_bsr
from sparseops.ops import csr as ops_csr
from sparseops.ops import fewbit as ops_fewbit
from sparseops.ops import nm as ops_nm
from sparseops.reference.fewbit import fewbit_unpack_codes

OPS = torch.ops.sparseops

# ---------------------------------------------------------------------------------------- budget

# the autouse fixtures of conftest (seed, NaN poisoning) are function scoped: they wrap the whole
# test, every example included, which is what is wanted here (each example seeds its own generator)
settings.register_profile(
    "sparseops-ci",
    derandomize=True,
    deadline=None,
    database=None,
    print_blob=True,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large, HealthCheck.function_scoped_fixture],
)
settings.register_profile("sparseops-thorough", parent=settings.get_profile("sparseops-ci"), derandomize=False)
THOROUGH = os.environ.get("HYPOTHESIS_PROFILE", "").lower() in ("thorough", "sparseops-thorough")
_PROFILE = settings.get_profile("sparseops-thorough" if THOROUGH else "sparseops-ci")


def budget(ci: int, thorough: int):
    """Settings of one test: ``ci`` examples by default, ``thorough`` under HYPOTHESIS_PROFILE=thorough."""
    return settings(parent=_PROFILE, max_examples=thorough if THOROUGH else ci)


# C++ ops: ~10-30 ms an example; Triton under the interpreter: ~0.1-2 s an example
CPP = budget(30, 500)
CPP_FEW = budget(20, 300)
TRITON = budget(8, 60)

# ---------------------------------------------------------------------------------------- strategies

CPU_DTYPES = (torch.float32, torch.bfloat16, torch.float16, torch.float64)
TRITON_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
_ISA_ORDER = ("portable", "avx2", "avx512")
ISAS = list(_ISA_ORDER[: _ISA_ORDER.index(_C.best_isa()) + 1]) if _C is not None else ["portable"]
LAYOUTS = ("contiguous", "transposed", "nan-slice", "step2", "broadcast-rows")
VIAS = ("op", "host", "eager")
DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")


def dim(hi: int = 40, zero: bool = True):
    """A size: 0 (when ``zero``) and 1 each one time in ~8, else 2..hi."""
    return st.one_of(*([st.just(0)] if zero else []), st.just(1), *[st.integers(2, hi)] * 6)


@st.composite
def sizes(draw, hi=40, wide=300, allow_zero=True):
    """``{"B", "in_f", "out_f"}`` in 1..hi; in ~3/8 of the examples one of them wide (B up to 2 hi, features up to
    ``wide``: past the kernels' column chunks), and in ~1/5 one of them 0. One dim at a time: zeros in all three
    dims at once left most examples empty, and two wide ones cost 10x on the reference paths."""
    d = {"B": draw(dim(hi, zero=False)), "in_f": draw(dim(hi, zero=False)), "out_f": draw(dim(hi, zero=False))}
    names = ("B", "in_f", "out_f")
    if wide > hi:
        which = draw(st.sampled_from((None,) * 5 + names))
        if which is not None:
            d[which] = draw(st.integers(hi + 1, 2 * hi if which == "B" else wide))
    if allow_zero:
        which = draw(st.sampled_from((None,) * 12 + names))
        if which is not None:
            d[which] = 0
    return d


SPARSITY = st.one_of(st.sampled_from([0.0, 0.5, 0.9, 0.99]), st.floats(0.0, 0.995))
SEED = st.integers(0, 2**31 - 1)


def dtype_of(dtypes):
    # fp32 (the C++ path) twice as often as any other
    return st.sampled_from((dtypes[0],) + tuple(dtypes))


@st.composite
def path(draw, triton: bool):
    """What every example draws besides its shapes: seed and dtype, and on CPU the ISA, threads and entry point."""
    if triton:
        return {"seed": draw(SEED), "dtype": draw(dtype_of(TRITON_DTYPES))}
    return {
        "seed": draw(SEED),
        "dtype": draw(dtype_of(CPU_DTYPES)),
        "isa": draw(st.sampled_from(ISAS)),
        "threads": draw(st.sampled_from([1, 2, 3])),
        "via": draw(st.sampled_from(VIAS)),
    }


# ---------------------------------------------------------------------------------------- helpers


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _randn(g, *shape, dtype=torch.float32):
    # drawn in fp32 and rounded, so the fp64 reference sees exactly the op's inputs
    return torch.randn(*shape, generator=g).to(dtype)


SPECIALS = st.sampled_from([False] * 5 + [True])


def with_specials(g, t: torch.Tensor, on: bool, frac: float = 0.05) -> torch.Tensor:
    """``t`` with NaN, +inf or -inf at ~``frac`` of its positions when ``on`` (they propagate as in the fp64 sums)."""
    if not on or not t.numel():
        return t
    t = t.clone()
    flat = t.view(-1)
    pick = (torch.rand(flat.numel(), generator=g) < frac).nonzero().flatten()
    vals = torch.tensor([float("nan"), float("inf"), -float("inf")])
    flat[pick] = vals[torch.randint(3, (pick.numel(),), generator=g)].to(t.dtype)
    return t


def activations(g, p, device="cpu"):
    """``x [B, in]`` and ``dy [B, out]`` in p's dtype, specials and layouts."""
    x = with_specials(g, _randn(g, p["B"], p["in_f"], dtype=p["dtype"]), p["specials"])
    dy = with_specials(g, _randn(g, p["B"], p["out_f"], dtype=p["dtype"]), p["specials"])
    return as_layout(x.to(device), p["x_layout"]), as_layout(dy.to(device), p["dy_layout"])


def as_layout(t: torch.Tensor, layout: str) -> torch.Tensor:
    """A view laid out as ``layout`` holding ``t``'s values (``broadcast-rows``: its first row, stride 0)."""
    if t.dim() != 2 or layout == "contiguous":
        return t.contiguous()
    rows, cols = t.shape
    if layout == "transposed":
        return t.t().contiguous().t()
    if layout == "nan-slice":
        # a read past either end of a row meets NaN
        wide = torch.full((rows, cols + 7), float("nan"), dtype=t.dtype, device=t.device)
        wide[:, 3 : 3 + cols] = t
        return wide[:, 3 : 3 + cols]
    if layout == "step2":
        wide = torch.full((rows, 2 * cols + 1), float("nan"), dtype=t.dtype, device=t.device)
        wide[:, 1 : 2 * cols + 1 : 2] = t
        return wide[:, 1 : 2 * cols + 1 : 2]
    if layout == "broadcast-rows":
        return t[:1].expand(rows, cols)
    raise AssertionError(layout)


def as_strided_1d(t: torch.Tensor, strided: bool) -> torch.Tensor:
    """``t`` itself, or a step-2 view of a NaN-filled buffer holding its values."""
    if not strided or t.dim() == 0:
        return t
    flat = t.reshape(-1)
    wide = torch.full((2 * flat.numel() + 1,), float("nan"), dtype=t.dtype, device=t.device)
    wide[1::2] = flat
    return wide[1::2].view(t.shape) if t.dim() == 1 else wide[1::2].reshape(t.shape)


def f64(t):
    return None if t is None else t.detach().to("cpu", torch.float64)


def absf64(t):
    return None if t is None else f64(t).abs()


def _rms(t: torch.Tensor) -> float:
    return t.pow(2).mean().sqrt().item() if t.numel() else 0.0


def check(actual, expected, magnitude, dtype, name):
    """``assert_close_rms`` with the dtype's tolerance scaled by the cancellation in the sums.

    A sum of products rounds relative to the sum of the terms' magnitudes (``magnitude``: the same
    product on the absolute values), not to the sum itself; the scale is that ratio in RMS, >= 1.
    """
    assert actual.dtype == dtype, f"{name}: dtype {actual.dtype} != {dtype}"
    e, m = f64(expected), f64(magnitude)
    fin = torch.isfinite(e) & torch.isfinite(m)
    ref, mag = _rms(e[fin]), _rms(m[fin])
    scale = max(1.0, mag / ref) if ref > 0 else max(1.0, mag)
    assert_close_rms(actual, expected, dtype, tol=TOL[dtype] * scale, name=name)


def same(actual: torch.Tensor, expected: torch.Tensor, name: str):
    """Bit-for-bit equality (NaN where NaN), shape and dtype included."""
    assert actual.shape == expected.shape, f"{name}: shape {tuple(actual.shape)} != {tuple(expected.shape)}"
    assert actual.dtype == expected.dtype, f"{name}: dtype {actual.dtype} != {expected.dtype}"
    a, e = actual.cpu(), expected.cpu()
    eq = (a == e) | (torch.isnan(a) & torch.isnan(e)) if a.is_floating_point() else a == e
    if not bool(eq.all()):
        idx = (~eq).nonzero()[0].tolist()
        raise AssertionError(
            f"{name}: {int((~eq).sum())} of {eq.numel()} differ; first at {idx}: "
            f"{a[tuple(idx)].item()} != {e[tuple(idx)].item()}"
        )


EAGER = {
    "csr_dds": ops_csr.dds, "csr_dsd": ops_csr.dsd, "csr_sdd": ops_csr.sdd, "csr_backward": ops_csr.backward,
    "nm_dds": ops_nm.dds, "nm_sdd": ops_nm.sdd, "nm_dsd": ops_nm.dsd, "nm_dsd_csr": ops_nm.dsd_csr,
    "bsr_dds": ops_bsr.dds, "bsr_dsd": ops_bsr.dsd, "bsr_sdd": ops_bsr.sdd,
    "act_dds": ops_act.dds, "act_dsd": ops_act.dsd, "act_sdd": ops_act.sdd,
    "fewbit_pack": ops_fewbit.pack, "fewbit_unpack": ops_fewbit.unpack, "csr_dds_fewbit": ops_fewbit.dds_fewbit,
}


def call(name: str, via: str, *args):
    """Run op ``name`` through one entry point, and check its fake implementation on the same arguments."""
    if via == "op":
        out = getattr(OPS, name)(*args)
    elif via == "host":
        out = getattr(OPS, name + "_host")(*args)
    else:
        out = EAGER[name](*args)
    _check_fake(name, args, out)
    return out


def _check_fake(name, args, out):
    from torch._subclasses.fake_tensor import FakeTensorMode

    with FakeTensorMode() as mode:
        fake_args = [mode.from_tensor(a) if isinstance(a, torch.Tensor) else a for a in args]
        fake = getattr(OPS, name)(*fake_args)
    outs, fakes = (out, fake) if isinstance(out, tuple) else ((out,), (fake,))
    for i, (o, f) in enumerate(zip(outs, fakes)):
        assert tuple(f.shape) == tuple(o.shape) and f.dtype == o.dtype, (
            f"{name}: fake output {i} is {tuple(f.shape)} {f.dtype}, the op gave {tuple(o.shape)} {o.dtype}"
        )


@contextlib.contextmanager
def cpu_kernels(isa: str, threads: int):
    """Run on one ISA path with ``threads`` OpenMP threads, even for tiny products (the work-per-thread floors off)."""
    prev_isa = sparseops.isa() if _C is not None else None
    prev_threads = torch.get_num_threads()
    floors = (ops_csr._MIN_WORK_PER_THREAD, ops_fewbit._MIN_ELEMS_PER_THREAD)
    try:
        if _C is not None:
            assert sparseops.set_isa(isa) == isa
        torch.set_num_threads(threads)
        ops_csr._MIN_WORK_PER_THREAD = 1
        ops_fewbit._MIN_ELEMS_PER_THREAD = 1
        yield
    finally:
        ops_csr._MIN_WORK_PER_THREAD, ops_fewbit._MIN_ELEMS_PER_THREAD = floors
        torch.set_num_threads(prev_threads)
        if prev_isa is not None:
            sparseops.set_isa(prev_isa)


# ---------------------------------------------------------------------------------------- patterns


def unstructured_mask(g, out_f, in_f, sparsity, structure):
    """A bool ``[out, in]`` mask: i.i.d. at ``sparsity``, then shaped by ``structure``."""
    if structure == "empty":
        return torch.zeros(out_f, in_f, dtype=torch.bool)
    mask = torch.rand(out_f, in_f, generator=g) >= sparsity
    if structure == "holed":
        # empty rows and columns, and a full first row apart from them
        rows = torch.rand(out_f, generator=g) < 0.3
        cols = torch.rand(in_f, generator=g) < 0.3
        mask[:1] = True
        mask[rows] = False
        mask[:, cols] = False
    elif structure == "one-dense-row" and out_f:
        mask[:] = False
        mask[int(torch.randint(out_f, (1,), generator=g))] = True
    return mask


STRUCTURES = st.sampled_from(["iid", "holed", "empty", "one-dense-row"])


def nm_mask(g, out_f, in_f, n, m, drop, holed):
    """``n`` random positions in every group of ``m``, then each kept one dropped with probability ``drop``."""
    groups = -(-in_f // m)
    keep = torch.rand(out_f, groups, m, generator=g).argsort(-1).argsort(-1) < n
    keep = keep.reshape(out_f, groups * m)[:, :in_f] & (torch.rand(out_f, in_f, generator=g) >= drop)
    if holed:
        keep[torch.rand(out_f, generator=g) < 0.3] = False
    return keep.contiguous()


def transposable_mask(g, out_f, in_f, n, m, drop, holed):
    """N:M along rows and columns: in each aligned m x m block, rows and columns of the circulant
    ``(c - r) % m < n`` permuted at random (exactly n a row and a column), then drops."""
    nbr, nbc = -(-out_f // m), -(-in_f // m)
    rperm = torch.rand(nbr, nbc, m, generator=g).argsort(-1)  # [nbr, nbc, m]
    cperm = torch.rand(nbr, nbc, m, generator=g).argsort(-1)
    c = torch.arange(m)
    base = (c.view(1, 1, 1, m) - rperm.unsqueeze(-1)) % m < n  # [nbr, nbc, m(r), m(c)]
    blocks = torch.zeros_like(base).scatter_(-1, cperm.unsqueeze(2).expand_as(base), base)
    keep = blocks.permute(0, 2, 1, 3).reshape(nbr * m, nbc * m)[:out_f, :in_f]
    keep = keep & (torch.rand(out_f, in_f, generator=g) >= drop)
    if holed:
        keep[torch.rand(out_f, generator=g) < 0.3] = False
    return keep.contiguous()


@st.composite
def nm_pattern(draw):
    m = draw(st.one_of(st.sampled_from([2, 4, 8, 16]), st.integers(2, 16)))
    n = draw(st.integers(1, m - 1))
    return {"n": n, "m": m, "drop": draw(SPARSITY), "holed": draw(st.booleans())}


# ======================================================================================== CSR


@st.composite
def csr_params(draw, triton=False, hi=40, wide=300, allow_zero=True, fp32=False, specials=True):
    p = draw(path(triton))
    if fp32:
        p["dtype"] = torch.float32
    p.update(draw(sizes(hi, wide, allow_zero)))
    p.update(
        sparsity=draw(SPARSITY), structure=draw(STRUCTURES), bias=draw(st.booleans()),
        x_layout=draw(st.sampled_from(LAYOUTS)), dy_layout=draw(st.sampled_from(LAYOUTS)),
        strided_params=draw(st.booleans()), specials=draw(SPECIALS) if specials else False,
    )
    return p


def csr_case(p):
    g = _gen(p["seed"])
    dt = p["dtype"]
    mask = unstructured_mask(g, p["out_f"], p["in_f"], p["sparsity"], p["structure"])
    fmt = CSRWeight.from_mask(mask)
    values = as_strided_1d(_randn(g, fmt.nnz, dtype=dt), p["strided_params"])
    bias = as_strided_1d(_randn(g, p["out_f"], dtype=dt), p["strided_params"]) if p["bias"] else None
    x, dy = activations(g, p)
    return {"fmt": fmt, "values": values, "bias": bias, "x": x, "dy": dy}


def _csr_dds_ref(c, fn=f64):
    f = c["fmt"].to("cpu")
    return R.csr_dds(fn(c["x"]), fn(c["values"]), f.crow, f.col, fn(c["bias"]), f.out_features)


def _csr_dsd_ref(c, fn=f64):
    f = c["fmt"].to("cpu")
    return R.csr_dsd(fn(c["dy"]), fn(c["values"]), f.t_crow, f.t_row, f.t_perm, f.in_features)


def _csr_sdd_ref(c, fn=f64):
    f = c["fmt"].to("cpu")
    return R.csr_sdd(fn(c["dy"]), fn(c["x"]), f.row, f.col)


def prop_csr_dds(p):
    c = csr_case(p)
    f = c["fmt"]
    with cpu_kernels(p["isa"], p["threads"]):
        y = call("csr_dds", p["via"], c["x"], c["values"], f.crow, f.col, c["bias"], f.out_features)
    check(y, _csr_dds_ref(c), _csr_dds_ref(c, absf64), p["dtype"], "csr_dds")
    if f.nnz == 0:
        expected = c["bias"].expand(p["B"], p["out_f"]) if p["bias"] else torch.zeros_like(y)
        same(y, expected.contiguous(), "csr_dds without nonzeros is the bias")


@CPP
@given(p=csr_params())
def test_csr_dds(p):
    prop_csr_dds(p)


@CPP
@given(p=csr_params())
def test_csr_dsd(p):
    c = csr_case(p)
    f = c["fmt"]
    with cpu_kernels(p["isa"], p["threads"]):
        dx = call("csr_dsd", p["via"], c["dy"], c["values"], f.t_crow, f.t_row, f.t_perm, f.in_features)
    check(dx, _csr_dsd_ref(c), _csr_dsd_ref(c, absf64), p["dtype"], "csr_dsd")


@CPP
@given(p=csr_params())
def test_csr_sdd(p):
    c = csr_case(p)
    f = c["fmt"]
    with cpu_kernels(p["isa"], p["threads"]):
        dv = call("csr_sdd", p["via"], c["dy"], c["x"], f.crow, f.col, f.row)
    check(dv, _csr_sdd_ref(c), _csr_sdd_ref(c, absf64), p["dtype"], "csr_sdd")
    if p["B"] == 0:
        assert bool((dv == 0).all()), "csr_sdd of an empty batch is exactly 0"


@CPP
@given(p=csr_params())
def test_csr_backward(p):
    c = csr_case(p)
    f = c["fmt"]
    with cpu_kernels(p["isa"], p["threads"]):
        dx, dv = call(
            "csr_backward", p["via"], c["dy"], c["x"], c["values"], f.crow, f.col, f.row, f.t_crow, f.t_row, f.t_perm
        )
    check(dx, _csr_dsd_ref(c), _csr_dsd_ref(c, absf64), p["dtype"], "csr_backward dx")
    check(dv, _csr_sdd_ref(c), _csr_sdd_ref(c, absf64), p["dtype"], "csr_backward dvalues")


# ---- the property tests themselves are checked: a kernel one element off fails them ----


class _OneElementOff:
    """``sparseops._C`` with csr_dds writing its last output element 1 too high."""

    def __getattr__(self, name):
        return getattr(_C, name)

    def csr_dds(self, x, values, crow, col, bias, y, threads):
        _C.csr_dds(x, values, crow, col, bias, y, threads)
        y[-1, -1] += 1.0


@pytest.mark.skipif(_C is None, reason="sparseops._C is not built")
@CPP_FEW
@given(p=csr_params(allow_zero=False, fp32=True, specials=False))
def test_property_catches_a_kernel_one_element_off(p):
    real = ops_csr._C
    ops_csr._C = _OneElementOff()
    try:
        with pytest.raises(AssertionError, match="csr_dds"):
            prop_csr_dds(p)
    finally:
        ops_csr._C = real


# ======================================================================================== N:M


@st.composite
def nm_params(draw, triton=False, hi=40, wide=300, transposable=None, specials=True):
    p = draw(path(triton))
    p.update(draw(nm_pattern()))
    p.update(draw(sizes(hi, wide)))
    p.update(
        transposable=draw(st.booleans()) if transposable is None else transposable, bias=draw(st.booleans()),
        x_layout=draw(st.sampled_from(LAYOUTS)), dy_layout=draw(st.sampled_from(LAYOUTS)),
        strided_params=draw(st.booleans()), specials=draw(SPECIALS) if specials else False,
    )
    return p


def nm_case(p, device="cpu"):
    g = _gen(p["seed"])
    dt, n, m = p["dtype"], p["n"], p["m"]
    make = transposable_mask if p["transposable"] else nm_mask
    mask = make(g, p["out_f"], p["in_f"], n, m, p["drop"], p["holed"])
    w = torch.randn(p["out_f"], p["in_f"], generator=g) * mask
    fmt, values = NMWeight.from_dense(w, mask, n, m, p["transposable"])
    values = values.to(dt)
    if p["strided_params"] and values.numel():
        # column major
        values = values.t().contiguous().t()  # [out, S]
    bias = as_strided_1d(_randn(g, p["out_f"], dtype=dt), p["strided_params"]).to(device) if p["bias"] else None
    x, dy = activations(g, p, device)
    return {"fmt": fmt.to(device), "values": values.to(device), "bias": bias, "x": x, "dy": dy}


def _nm_dds_ref(c, n, m, fn=f64):
    return R.nm_dds(fn(c["x"]), fn(c["values"]), c["fmt"].idx.cpu(), fn(c["bias"]), n, m)


def _nm_sdd_ref(c, n, m, fn=f64):
    return R.nm_sdd(fn(c["dy"]), fn(c["x"]), c["fmt"].idx.cpu(), n, m)


def _nm_dsd_t_ref(c, p, fn=f64):
    f = c["fmt"]
    return R.nm_dsd(fn(c["dy"]), fn(c["values"]), f.t_idx.cpu(), f.t_slot.cpu(), p["n"], p["m"])


def _nm_dsd_ref(c, fn=f64):
    f = c["fmt"]
    return R.nm_dsd_csr(fn(c["dy"]), fn(c["values"]), f.t_crow.cpu(), f.t_row.cpu(), f.t_perm.cpu(), f.in_features)


@CPP
@given(p=nm_params())
def test_nm_dds(p):
    c = nm_case(p)
    n, m = p["n"], p["m"]
    with cpu_kernels(p["isa"], p["threads"]):
        y = call("nm_dds", p["via"], c["x"], c["values"], c["fmt"].idx, c["bias"], n, m)
    check(y, _nm_dds_ref(c, n, m), _nm_dds_ref(c, n, m, absf64), p["dtype"], "nm_dds")


@CPP
@given(p=nm_params())
def test_nm_sdd(p):
    c = nm_case(p)
    n, m = p["n"], p["m"]
    with cpu_kernels(p["isa"], p["threads"]):
        dv = call("nm_sdd", p["via"], c["dy"], c["x"], c["fmt"].idx, n, m)
    check(dv, _nm_sdd_ref(c, n, m), _nm_sdd_ref(c, n, m, absf64), p["dtype"], "nm_sdd")


@CPP
@given(p=nm_params(transposable=True))
def test_nm_dsd(p):
    c = nm_case(p)
    f = c["fmt"]
    with cpu_kernels(p["isa"], p["threads"]):
        dx = call("nm_dsd", p["via"], c["dy"], c["values"], f.t_idx, f.t_slot, p["n"], p["m"])
    check(dx, _nm_dsd_t_ref(c, p), _nm_dsd_t_ref(c, p, absf64), p["dtype"], "nm_dsd")
    if not p["specials"]:
        # and the CSR of Wᵀ, an index built apart from the N:M one of Wᵀ the op reads (with ±inf in dy the two
        # part: the N:M kernel and reference walk the empty slots too, 0 * inf, as dense math would)
        check(dx, _nm_dsd_ref(c), _nm_dsd_ref(c, absf64), p["dtype"], "nm_dsd against the CSR of Wᵀ")


@CPP
@given(p=nm_params())
def test_nm_dsd_csr(p):
    c = nm_case(p)
    f = c["fmt"]
    with cpu_kernels(p["isa"], p["threads"]):
        dx = call("nm_dsd_csr", p["via"], c["dy"], c["values"], f.t_crow, f.t_row, f.t_perm, f.in_features)
    check(dx, _nm_dsd_ref(c), _nm_dsd_ref(c, absf64), p["dtype"], "nm_dsd_csr")


# ======================================================================================== BSR


@st.composite
def bsr_params(draw, triton=False, hi=40, wide=300):
    p = draw(path(triton))
    p.update(draw(sizes(hi, wide)))
    p.update(
        block=draw(st.sampled_from([8, 16, 32, 64])), sparsity=draw(SPARSITY), structure=draw(STRUCTURES),
        dirty_padding=draw(st.booleans()), bias=draw(st.booleans()),
        x_layout=draw(st.sampled_from(LAYOUTS)), dy_layout=draw(st.sampled_from(LAYOUTS)),
        strided_params=draw(st.booleans()), specials=draw(SPECIALS),
    )
    return p


def bsr_case(p, device="cpu"):
    g = _gen(p["seed"])
    dt, b = p["dtype"], p["block"]
    nbr, nbc = -(-p["out_f"] // b), -(-p["in_f"] // b)
    bmask = unstructured_mask(g, nbr, nbc, p["sparsity"], p["structure"])
    fmt = BSRWeight.from_block_mask(bmask, p["out_f"], p["in_f"], b)
    # True inside [out, in]
    pad = fmt.padding_mask()  # [nblk, b, b]
    # dirty padding: random finite values where the format holds 0, which must change no output (the kernels
    # read x and dy as 0 past in and out)
    values = torch.randn(fmt.nblocks, b, b, generator=g)
    if not p["dirty_padding"]:
        values = values * pad
    values = values.to(dt)
    if p["strided_params"] and values.numel():
        values = values.transpose(1, 2).contiguous().transpose(1, 2)
    bias = as_strided_1d(_randn(g, p["out_f"], dtype=dt), p["strided_params"]).to(device) if p["bias"] else None
    x, dy = activations(g, p, device)
    return {"fmt": fmt.to(device), "pad": pad, "values": values.to(device), "bias": bias, "x": x, "dy": dy}


def _bsr_dds_ref(c, fn=f64):
    gr = c["fmt"].grid
    return R.bsr_dds(fn(c["x"]), fn(c["values"]), gr.crow.cpu(), gr.col.cpu(), fn(c["bias"]), c["fmt"].out_features)


def _bsr_dsd_ref(c, fn=f64):
    gr = c["fmt"].grid.to("cpu")
    return R.bsr_dsd(fn(c["dy"]), fn(c["values"]), gr.t_crow, gr.t_row, gr.t_perm, c["fmt"].in_features)


def _bsr_sdd_ref(c, fn=f64):
    gr = c["fmt"].grid
    return R.bsr_sdd(fn(c["dy"]), fn(c["x"]), gr.row.cpu(), gr.col.cpu(), c["fmt"].block)


@CPP
@given(p=bsr_params())
def test_bsr_dds(p):
    c = bsr_case(p)
    gr = c["fmt"].grid
    with cpu_kernels(p["isa"], p["threads"]):
        y = call("bsr_dds", p["via"], c["x"], c["values"], gr.crow, gr.col, c["bias"], p["out_f"])
    check(y, _bsr_dds_ref(c), _bsr_dds_ref(c, absf64), p["dtype"], "bsr_dds")


@CPP
@given(p=bsr_params())
def test_bsr_dsd(p):
    c = bsr_case(p)
    gr = c["fmt"].grid
    with cpu_kernels(p["isa"], p["threads"]):
        dx = call("bsr_dsd", p["via"], c["dy"], c["values"], gr.t_crow, gr.t_row, gr.t_perm, p["in_f"])
    check(dx, _bsr_dsd_ref(c), _bsr_dsd_ref(c, absf64), p["dtype"], "bsr_dsd")


@CPP
@given(p=bsr_params())
def test_bsr_sdd(p):
    c = bsr_case(p)
    gr = c["fmt"].grid
    with cpu_kernels(p["isa"], p["threads"]):
        dv = call("bsr_sdd", p["via"], c["dy"], c["x"], gr.row, gr.col, p["block"])
    check(dv, _bsr_sdd_ref(c), _bsr_sdd_ref(c, absf64), p["dtype"], "bsr_sdd")
    if not p["specials"]:
        # (an inf of x or dy makes the padding 0 * inf = NaN, in the reference too)
        assert bool((dv[~c["pad"]] == 0).all()), "bsr_sdd: the padding of the blocks gets exactly 0"


# ======================================================================================== activation sparsity


@st.composite
def act_params(draw, triton=False, hi=40, wide=300):
    p = draw(path(triton))
    # up to GEMV_MAX_ROWS (32) rows the forward reads the union of the rows' active inputs, above it per row
    p.update(draw(sizes(hi, wide)))
    p.update(
        relu=draw(st.booleans()), chan=draw(st.booleans()), sparsity=draw(SPARSITY),
        threshold=draw(st.sampled_from(["tie", "tie", "tie", "negative", "huge"])),
        zeros=draw(st.booleans()), specials=draw(SPECIALS), bias=draw(st.booleans()),
        x_layout=draw(st.sampled_from(LAYOUTS)), dy_layout=draw(st.sampled_from(LAYOUTS)),
        # the op copies any weight_t; the Triton launcher takes rows with unit stride only
        w_layout=draw(st.sampled_from(["contiguous", "nan-slice"] + ([] if triton else ["transposed"]))),
    )
    return p


def act_case(p, device="cpu"):
    g = _gen(p["seed"])
    dt = p["dtype"]
    B, in_f, out_f = p["B"], p["in_f"], p["out_f"]
    x = torch.randn(B, in_f, generator=g)
    if p["zeros"]:
        # exact zeros: active only under a negative threshold, and never with relu
        x[torch.rand(B, in_f, generator=g) < 0.3] = 0.0
    x = x.to(dt)
    v = (torch.relu(x) if p["relu"] else x).abs().float()
    if p["threshold"] == "negative":
        thr = torch.full((in_f,) if p["chan"] else (), -0.5)
    elif p["threshold"] == "huge":
        thr = torch.full((in_f,) if p["chan"] else (), 1e30)
    elif p["chan"]:
        # the value of an element of each column: ties with the strict |v| > threshold
        k = min(B - 1, int(p["sparsity"] * B)) if B else 0
        thr = v.sort(0).values[k] if B else torch.zeros(in_f)
    else:
        flat = v.reshape(-1).sort().values
        thr = flat[min(flat.numel() - 1, int(p["sparsity"] * flat.numel()))] if flat.numel() else torch.tensor(0.0)
    # NaN is never active (|NaN| > threshold is false), ±inf always (a finite threshold)
    x = with_specials(g, x, p["specials"])
    w = _randn(g, in_f, out_f, dtype=dt)
    return {
        "x": as_layout(x.to(device), p["x_layout"]),
        # no specials in dy: the reference multiplies by the mask (NaN * 0 is NaN) where the kernels skip the
        # inactive inputs (0), so a NaN of dy meeting an inactive input is where the two part
        "dy": as_layout(_randn(g, B, out_f, dtype=dt).to(device), p["dy_layout"]),
        "w": as_layout(w.to(device), p["w_layout"]),
        "bias": _randn(g, out_f, dtype=dt).to(device) if p["bias"] else None,
        "thr": thr.float().to(device),
    }


def _act_refs(c, p):
    """fp64 ``(s(x), mask)``, the threshold rounded to x's dtype first, as the op compares them."""
    thr = c["thr"].cpu().to(p["dtype"]).double()
    return R.act_mask(f64(c["x"]), thr, relu=p["relu"])


def _act_example(**kw):
    p = dict(seed=1, dtype=torch.float32, isa="portable", threads=1, via="op", B=3, in_f=3, out_f=2, relu=False,
             chan=False, sparsity=0.5, threshold="tie", zeros=False, specials=False, bias=True,
             x_layout="contiguous", dy_layout="contiguous", w_layout="contiguous")
    return example(p=dict(p, **kw))


# regressions: ops.act._rows passed a single row with column stride 2, and a [B, 1] column with row stride 0
# (out_features=1 under y.sum().backward()), to a binding that refuses both
@_act_example(B=1, x_layout="step2")
@_act_example(in_f=1, x_layout="broadcast-rows")
@CPP
@given(p=act_params())
def test_act_dds(p):
    c = act_case(p)
    with cpu_kernels(p["isa"], p["threads"]):
        y = call("act_dds", p["via"], c["x"], c["w"], c["bias"], c["thr"], p["relu"])
    xs, mask = _act_refs(c, p)
    w, b = f64(c["w"]), f64(c["bias"])
    ref = xs @ w + (0 if b is None else b)
    mag = xs.abs() @ w.abs() + (0 if b is None else b.abs())
    check(y, ref, mag, p["dtype"], "act_dds")
    if not mask.any():
        expected = c["bias"].expand(p["B"], p["out_f"]) if p["bias"] else torch.zeros_like(y)
        same(y, expected.contiguous(), "act_dds with no active input is the bias")


@_act_example(B=1, dy_layout="step2")
@_act_example(out_f=1, dy_layout="broadcast-rows")
@CPP
@given(p=act_params())
def test_act_dsd(p):
    c = act_case(p)
    with cpu_kernels(p["isa"], p["threads"]):
        dx = call("act_dsd", p["via"], c["dy"], c["x"], c["w"], c["thr"], p["relu"])
    _, mask = _act_refs(c, p)
    dy, w = f64(c["dy"]), f64(c["w"])
    check(dx, (dy @ w.t()) * mask, (dy.abs() @ w.abs().t()) * mask, p["dtype"], "act_dsd")
    assert bool((dx[~mask] == 0).all()), "act_dsd: inactive inputs get exactly 0"


@_act_example(B=1, dy_layout="step2")
@_act_example(out_f=1, dy_layout="broadcast-rows")
@CPP
@given(p=act_params())
def test_act_sdd(p):
    c = act_case(p)
    with cpu_kernels(p["isa"], p["threads"]):
        dw = call("act_sdd", p["via"], c["dy"], c["x"], c["thr"], p["relu"])
    xs, mask = _act_refs(c, p)
    dy = f64(c["dy"])
    check(dw, xs.t() @ dy, xs.abs().t() @ dy.abs(), p["dtype"], "act_sdd")
    dead = ~mask.any(0)
    assert bool((dw[dead] == 0).all()), "act_sdd: rows of inputs no row activates are exactly 0"


# ======================================================================================== few-bit codes


@st.composite
def fewbit_params(draw, triton=False, hi=40, max_dims=3):
    p = draw(path(triton))
    p.update(
        shape=tuple(draw(st.lists(dim(hi), min_size=0, max_size=max_dims))),
        bits=draw(st.integers(1, 4)), specials=draw(st.booleans()),
        borders=draw(st.sampled_from(["random", "duplicates", "table"])),
        layout=draw(st.sampled_from(["contiguous", "transposed", "step2"])),
    )
    return p


def _borders(g, p):
    k = (1 << p["bits"]) - 1
    if p["borders"] == "table":
        name = ACTIVATIONS[int(torch.randint(len(ACTIVATIONS), (1,), generator=g))]
        return torch.tensor(fewbit.get_table(name, p["bits"]).borders, dtype=torch.float32)
    b = torch.randn(k, generator=g) * 2
    if p["borders"] == "duplicates":
        b = b[torch.randint(k, (k,), generator=g)]
    return b.sort().values


def _elements(g, p, borders, scale=3.0):
    """Values of ``p["shape"]`` in p's dtype (and layout); with specials: NaN, ±inf, ±0, tiny, and the borders."""
    dt = p["dtype"]
    t = torch.randn(p["shape"], generator=g) * scale
    flat = t.view(-1)
    if p["specials"] and flat.numel():
        specials = torch.cat([torch.tensor([float("nan"), float("inf"), -float("inf"), 0.0, -0.0, 1e-40, -1e-30]),
                              borders.float()])
        pick = torch.rand(flat.numel(), generator=g) < 0.3
        flat[pick] = specials[torch.randint(specials.numel(), (int(pick.sum()),), generator=g)]
    t = t.to(dt)
    if t.dim() >= 2 and p["layout"] == "transposed":
        t = t.transpose(-1, -2).contiguous().transpose(-1, -2)
    elif t.dim() >= 1 and p["layout"] == "step2":
        wide = torch.full((*t.shape[:-1], 2 * t.shape[-1]), float("nan"), dtype=dt)
        wide[..., ::2] = t
        t = wide[..., ::2]
    return t


@CPP
@given(p=fewbit_params())
def test_fewbit_pack(p):
    g = _gen(p["seed"])
    borders = _borders(g, p)
    x = _elements(g, p, borders)
    with cpu_kernels(p["isa"], p["threads"]):
        codes = call("fewbit_pack", p["via"], x, borders, p["bits"])
    same(codes, R.fewbit_pack(x.contiguous(), borders, p["bits"]), "fewbit_pack")
    # and the codes mean what the docs say: #{k : x > borders[k]}, NaN exceeding none
    n = x.numel()
    xc = x.to(torch.promote_types(x.dtype, torch.float32)).reshape(-1, 1)
    counts = (xc > borders.to(xc.dtype).view(1, -1)).sum(1)
    same(fewbit_unpack_codes(codes, n, p["bits"]), counts, "fewbit_pack decoded")


@CPP
@given(p=fewbit_params())
def test_fewbit_unpack(p):
    g = _gen(p["seed"])
    bits = p["bits"]
    n = math.prod(p["shape"])
    # any words are codes; the bits past the last element must be ignored
    codes = torch.randint(-(2**31), 2**31, ((n + 31) // 32 * bits,), generator=g, dtype=torch.int64).to(torch.int32)
    levels = torch.randn(1 << bits, generator=g)
    if p["specials"]:
        levels[torch.rand(1 << bits, generator=g) < 0.3] = 0.0
    grad = _elements(g, p, levels)
    with cpu_kernels(p["isa"], p["threads"]):
        out = call("fewbit_unpack", p["via"], grad, codes, levels, bits)
    same(out, R.fewbit_unpack(grad, codes, levels, bits), "fewbit_unpack")
    assert out.is_contiguous()


@CPP_FEW
@given(p=csr_params(), activation=st.sampled_from(ACTIVATIONS), bits=st.integers(1, 4))
def test_csr_dds_fewbit(p, activation, bits):
    c = csr_case(p)
    f = c["fmt"]
    t = fewbit.get_table(activation, bits)
    borders = torch.tensor(t.borders, dtype=torch.float32)
    with cpu_kernels(p["isa"], p["threads"]):
        y, codes = call(
            "csr_dds_fewbit", p["via"], c["x"], c["values"], f.crow, f.col, c["bias"], f.out_features, activation,
            borders, bits,
        )
        z = ops_csr.dds(c["x"], c["values"], f.crow, f.col, c["bias"], f.out_features)
        act = activation_fn(activation)
        # the activation as the few-bit layers compute it on this path: torch's, or the fused kernel's own
        # (tanh, sigmoid, silu, ...: not torch's bits, which also differ between torch's AVX2 and AVX-512
        # kernels; comparing with torch's failed on an AVX-512 machine for silu, 2026-11-24)
        az, _ = ops_fewbit.fused(z, act, borders, bits, codes=False)
    # exactly the composition of the op's own pieces: the forward product, the activation, the codes
    same(y, az, "csr_dds_fewbit y = act(csr_dds)")
    same(codes, R.fewbit_pack(z, borders, bits), "csr_dds_fewbit codes = pack(csr_dds)")
    # and against fp64: y within tolerance (activations' slopes are <= ~1.8), codes equal off the borders
    z64, mag = _csr_dds_ref(c), _csr_dds_ref(c, absf64)
    check(y, act(z64), 2 * mag, p["dtype"], "csr_dds_fewbit y")
    eps = torch.finfo(p["dtype"]).eps
    slack = 4 * eps * (mag + z64.abs())
    near = ((z64.unsqueeze(-1) - borders.double()).abs() <= slack.unsqueeze(-1)).any(-1)
    got = fewbit_unpack_codes(codes, z64.numel(), bits).view(z64.shape)
    ok = (got == R.fewbit_codes(z64, borders)) | near
    assert bool(ok.all()), f"csr_dds_fewbit: {int((~ok).sum())} codes off by more than rounding"


# ======================================================================================== Monarch


@st.composite
def monarch_params(draw):
    p = {"seed": draw(SEED), "dtype": draw(dtype_of((torch.float32, torch.float64, torch.bfloat16, torch.float16))),
         "bias": draw(st.booleans()), "x_layout": draw(st.sampled_from(LAYOUTS[:-1]))}
    p.update(draw(sizes(40, 0)))
    # nblocks <= min(in, out) mostly, and one time in 8 one more (refused)
    k = draw(st.integers(1, max(1, min(8, p["in_f"], p["out_f"]))))
    p["nblocks"] = k + 1 if draw(st.integers(0, 7)) == 0 else k
    return p


@CPP
@given(p=monarch_params())
def test_monarch_linear(p):
    """Monarch has no torch.library op: its product is ``monarch_linear`` (four bmm's and a hand-written backward)."""
    in_f, out_f, k, dt = p["in_f"], p["out_f"], p["nblocks"], p["dtype"]
    if min(in_f, out_f) < max(k, 1):
        # documented: sizes >= 1 and nblocks <= min(in, out)
        with pytest.raises(ValueError, match="in_features|out_features|nblocks"):
            sparseops.MonarchLinear(in_f, out_f, k)
        return
    g = _gen(p["seed"])
    layer = sparseops.MonarchLinear(in_f, out_f, k, bias=p["bias"], dtype=dt)
    with torch.no_grad():
        for prm in layer.parameters():
            prm.copy_(torch.randn(prm.shape, generator=g))
    x = as_layout(_randn(g, p["B"], in_f, dtype=dt), p["x_layout"]).requires_grad_()
    gy = _randn(g, p["B"], out_f, dtype=dt)
    y = monarch_linear(x, layer.blkdiag1, layer.blkdiag2, layer.bias, out_f)
    (y * gy).sum().backward()
    # the oracle: the definition, step by step in fp64, differentiated by autograd
    l64, r64 = (f64(t).requires_grad_() for t in (layer.blkdiag1, layer.blkdiag2))
    b64 = f64(layer.bias).requires_grad_() if p["bias"] else None
    x64 = f64(x).requires_grad_()
    y64 = R.monarch_forward(x64, l64, r64, b64, out_f)
    (y64 * f64(gy)).sum().backward()
    # magnitudes: the same products and their gradients on absolute values, where no term cancels
    a64 = [f64(t).abs().requires_grad_() for t in (x, layer.blkdiag1, layer.blkdiag2)]
    ab64 = absf64(layer.bias).requires_grad_() if p["bias"] else None
    mag = R.monarch_forward(*a64, ab64, out_f)
    (mag * absf64(gy)).sum().backward()
    check(y, y64, mag, dt, "monarch y")
    grads = [(x.grad, x64.grad, a64[0].grad, "dx"), (layer.blkdiag1.grad, l64.grad, a64[1].grad, "dblkdiag1"),
             (layer.blkdiag2.grad, r64.grad, a64[2].grad, "dblkdiag2")]
    if p["bias"]:
        grads.append((layer.bias.grad, b64.grad, ab64.grad, "dbias"))
    for got, ref, gmag, name in grads:
        assert got is not None, f"monarch {name}: no gradient"
        check(got, ref, gmag, dt, f"monarch {name}")


# ======================================================================================== Triton (interpreter on CPU)


def _kernels(name):
    return pytest.importorskip(f"sparseops.kernels.{name}", reason="triton is not installed")


TRITON_OUT = st.sampled_from(["none", "nan-buffer", "transposed-nan-buffer"])
# the interpreter's numpy warns on the NaN and inf that the specials put through tl.dot
TRITON_NUMPY_WARNINGS = pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning")


def _out_buffer(kind, shape, dtype):
    if kind == "none":
        return None
    if kind == "nan-buffer" or len(shape) != 2:
        return torch.full(shape, float("nan"), dtype=dtype, device=DEVICE)
    return torch.full(shape[::-1], float("nan"), dtype=dtype, device=DEVICE).t()


def _written(out, result, name):
    if out is not None:
        assert result is out, f"{name}: out= was not returned"


@TRITON_NUMPY_WARNINGS
@TRITON
@given(p=csr_params(triton=True, hi=24, wide=0), out=TRITON_OUT)
def test_triton_csr(p, out):
    K = _kernels("csr")
    c = csr_case(p)
    c = {k: (v.to(DEVICE) if isinstance(v, torch.Tensor) else v) for k, v in c.items()}
    f, dt = c["fmt"].to(DEVICE), p["dtype"]
    B, in_f, out_f = p["B"], p["in_f"], p["out_f"]
    o = _out_buffer(out, (B, out_f), dt)
    y = K.csr_dds(c["x"], c["values"], f.crow, f.col, c["bias"], out_f, out=o)
    _written(o, y, "csr_dds")
    check(y, _csr_dds_ref(c), _csr_dds_ref(c, absf64), dt, "triton csr_dds")
    o = _out_buffer(out, (B, in_f), dt)
    dx = K.csr_dsd(c["dy"], c["values"], f.t_crow, f.t_row, f.t_perm, in_f, out=o)
    _written(o, dx, "csr_dsd")
    check(dx, _csr_dsd_ref(c), _csr_dsd_ref(c, absf64), dt, "triton csr_dsd")
    o = _out_buffer(out, (f.nnz,), dt)
    dv = K.csr_sdd(c["dy"], c["x"], f.row, f.col, out=o)
    _written(o, dv, "csr_sdd")
    check(dv, _csr_sdd_ref(c), _csr_sdd_ref(c, absf64), dt, "triton csr_sdd")


@TRITON_NUMPY_WARNINGS
@TRITON
# finite inputs only: see test_triton_nm_dds_inf_off_the_slots
@given(p=nm_params(triton=True, hi=24, wide=0, specials=False), out=TRITON_OUT)
def test_triton_nm(p, out):
    K = _kernels("nm")
    c = nm_case(p, DEVICE)
    f, dt, n, m = c["fmt"], p["dtype"], p["n"], p["m"]
    B, in_f, out_f = p["B"], p["in_f"], p["out_f"]
    o = _out_buffer(out, (B, out_f), dt)
    y = K.nm_dds(c["x"], c["values"], f.idx, c["bias"], out_f, in_f, n, m, out=o)
    _written(o, y, "nm_dds")
    check(y, _nm_dds_ref(c, n, m), _nm_dds_ref(c, n, m, absf64), dt, "triton nm_dds")
    o = _out_buffer(out, tuple(c["values"].shape), dt)
    dv = K.nm_sdd(c["dy"], c["x"], f.idx, n, m, in_f, out=o)
    _written(o, dv, "nm_sdd")
    check(dv, _nm_sdd_ref(c, n, m), _nm_sdd_ref(c, n, m, absf64), dt, "triton nm_sdd")
    if p["transposable"]:
        # the input gradient as the CUDA op runs it: the N:M kernel over Wᵀ, values read through t_slot
        tv = ops_nm._gather_t(c["values"], f.t_slot)
        dx = K.nm_dds(c["dy"], tv, f.t_idx, None, in_f, out_f, n, m)
        check(dx, _nm_dsd_t_ref(c, p), _nm_dsd_t_ref(c, p, absf64), dt, "triton nm_dds over Wᵀ")


_DOT_ROWS_INF = pytest.mark.xfail(
    strict=True,
    reason="above the decode kernel's rows the Triton N:M kernel multiplies a dense decompressed tile of Wᵀ "
    "(tl.dot), so an inf of x at a position no slot holds meets a 0 weight (NaN); the decode (gemv) kernel, "
    "the C++ kernel and the reference read only the slots (finite)",
)


@TRITON_NUMPY_WARNINGS
@pytest.mark.parametrize("rows", ["gemv", pytest.param("dot", marks=_DOT_ROWS_INF)])
def test_triton_nm_dds_inf_off_the_slots(rows):
    K = _kernels("nm")
    B = 1 if rows == "gemv" else K._MAX_GEMV_B + 1
    # 1:2, the slot holds column 1; x is inf at column 0, which no slot holds
    fmt, values = NMWeight.from_dense(torch.tensor([[0.0, 2.0]]), torch.tensor([[False, True]]), 1, 2)
    x = torch.tensor([[float("inf"), 1.0]]).repeat(B, 1)
    expected = R.nm_dds(x.double(), values.double(), fmt.idx, None, 1, 2)
    assert torch.equal(expected, torch.full((B, 1), 2.0, dtype=torch.float64))
    assert torch.equal(OPS.nm_dds(x, values, fmt.idx, None, 1, 2), torch.full((B, 1), 2.0))
    y = K.nm_dds(x.to(DEVICE), values.to(DEVICE), fmt.idx.to(DEVICE), None, 1, 2, 1, 2)
    assert torch.equal(y.cpu(), torch.full((B, 1), 2.0)), f"triton nm_dds gave {y.tolist()}"


@TRITON_NUMPY_WARNINGS
@TRITON
@given(p=bsr_params(triton=True, hi=24, wide=0), out=TRITON_OUT)
def test_triton_bsr(p, out):
    K = _kernels("bsr")
    c = bsr_case(p, DEVICE)
    gr, dt, b = c["fmt"].grid, p["dtype"], p["block"]
    B, in_f, out_f = p["B"], p["in_f"], p["out_f"]
    o = _out_buffer(out, (B, out_f), dt)
    y = K.bsr_dds(c["x"], c["values"], gr.crow, gr.col, c["bias"], out_f, out=o)
    _written(o, y, "bsr_dds")
    check(y, _bsr_dds_ref(c), _bsr_dds_ref(c, absf64), dt, "triton bsr_dds")
    o = _out_buffer(out, (B, in_f), dt)
    dx = K.bsr_dsd(c["dy"], c["values"], gr.t_crow, gr.t_row, gr.t_perm, in_f, out=o)
    _written(o, dx, "bsr_dsd")
    check(dx, _bsr_dsd_ref(c), _bsr_dsd_ref(c, absf64), dt, "triton bsr_dsd")
    dv = K.bsr_sdd(c["dy"], c["x"], gr.row, gr.col, b)
    check(dv, _bsr_sdd_ref(c), _bsr_sdd_ref(c, absf64), dt, "triton bsr_sdd")
    if not p["specials"]:
        assert bool((dv.cpu()[~c["pad"]] == 0).all()), "triton bsr_sdd: the padding gets exactly 0"


# a threshold of 1e30 overflows to inf in fp16 (thr_same), on purpose
@pytest.mark.filterwarnings("ignore:overflow encountered in cast:RuntimeWarning")
@TRITON_NUMPY_WARNINGS
@TRITON
@given(
    p=act_params(triton=True, hi=24, wide=0), out=TRITON_OUT, thr_same=st.booleans(),
)
def test_triton_act(p, out, thr_same):
    K = _kernels("act")
    c = act_case(p, DEVICE)
    dt = p["dtype"]
    thr = c["thr"].to(dt) if thr_same else c["thr"]
    o = _out_buffer(out, (p["B"], p["out_f"]), dt)
    y = K.act_dds(c["x"], c["w"], c["bias"], thr, p["relu"], out=o)
    _written(o, y, "act_dds")
    xs, _ = _act_refs(dict(c, thr=thr), p)
    w, b = f64(c["w"]), f64(c["bias"])
    ref = xs @ w + (0 if b is None else b)
    mag = xs.abs() @ w.abs() + (0 if b is None else b.abs())
    check(y, ref, mag, dt, "triton act_dds")


# at most 24 x 24 elements: one program of the pack kernel, which the interpreter runs in ~0.3-1.7 s
@TRITON_NUMPY_WARNINGS
@TRITON
@given(p=fewbit_params(triton=True, hi=24, max_dims=2))
def test_triton_fewbit(p):
    K = _kernels("fewbit")
    g = _gen(p["seed"])
    bits = p["bits"]
    borders = _borders(g, p)
    x = _elements(g, p, borders).to(DEVICE)
    codes = K.fewbit_pack(x, borders.to(DEVICE), bits)
    same(codes.cpu(), R.fewbit_pack(x.cpu().contiguous(), borders, bits), "triton fewbit_pack")
    levels = torch.randn(1 << bits, generator=g)
    grad = _elements(g, p, levels).to(DEVICE)
    got = K.fewbit_unpack(grad, codes, levels.to(DEVICE), bits)
    same(got.cpu(), R.fewbit_unpack(grad.cpu(), codes.cpu(), levels, bits), "triton fewbit_unpack")
