"""Few-bit activations: the pack/unpack ops, the autograd layer, the modules, the fused SparseLinear."""

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

import sparseops
from sparseops import fewbit, reference
from sparseops._cpp import _C
from sparseops.fewbit.table import ACTIVATIONS, PWL_ACTIVATIONS, SMOOTH_ACTIVATIONS
from sparseops.ops import fewbit as fewbit_ops

from helpers import assert_close_rms

DTYPES = [torch.float32, torch.bfloat16, torch.float16]
SIZES = [1, 3, 31, 32, 33, 37, 1000, 4099]


def _table(name, bits, **params):
    t = fewbit.get_table(name, bits, **params)
    return torch.tensor(t.borders, dtype=torch.float32), torch.tensor(t.levels, dtype=torch.float32)


def _specials(dtype):
    vals = [0.0, -0.0, float("inf"), -float("inf"), float("nan"), 1e-30, -1e-30, 65504.0, -3.0, 3.0, 6.0]
    return torch.tensor(vals).to(dtype)


def _forward_of(name, x, **params):
    """What the few-bit activation's forward returns: torch's, except the fused kernel's own on CPU (the
    float64 ones: this reference; the float32 ones are checked by their bound, see _assert_forward)."""
    fn = fewbit.activation_fn(name, **params)
    if fn.fused_own and x.device.type == "cpu":
        return reference.fewbit.fewbit_fused_forward(x, *fn.fused)
    return fn(x)


# csrc/fmath.h's bounds for its float32 kinds, found over all 2^32 floats (bench/cpp/fewbit_exhaustive.cpp):
# sigmoid 1.553, silu 1.123, tanh 0.763, softplus (beta 1) and logsigmoid 0.842 ulp (torch's own float32
# sigmoid and silu reach 2.3 and 2.2 ulp, softplus and logsigmoid 1.5, tanh 1). softplus with another beta
# is the float64 one, correctly rounded (see _own32)
FLOAT32_BOUND = {"sigmoid": 2.41, "silu": 3.35, "tanh": 0.77, "softplus": 0.85, "logsigmoid": 0.85}
# tanh has two algorithms: the avx2 path's exp form (0.763 ulp, the bound above) and the interval table
# of the avx-512 and portable paths (csrc/tanh_table.h: 0.568 ulp over all 2^32 floats)
TANH_TABLE_BOUND = 0.57
_FLOAT_FORMAT = {torch.float32: (24, -125), torch.bfloat16: (8, -125), torch.float16: (11, -13)}


def _own32(name, params=None):
    """Whether the fused CPU kernel's forward of this activation is one of its float32 ones (checked by a
    bound) rather than torch's or a correctly rounded float64 one (checked bit for bit)."""
    return name in FLOAT32_BOUND and (name != "softplus" or dict(params or {}).get("beta", 1.0) == 1.0)


def _ulp(v, dtype):
    """The spacing of dtype's floats in the binade of the exact value v (float64), subnormals included."""
    p, emin = _FLOAT_FORMAT[dtype]
    e = torch.frexp(v.abs())[1].clamp(min=emin)
    return torch.ldexp(torch.ones_like(v), e - p)


def _exact(name, x, threshold=20.0, **_):
    """The float64 value of a float32 kind at x (silu(-inf) = -0, its limit; softplus: torch's rule, x where
    x > threshold in float32, else log(1 + e^x) in a form that does not overflow)."""
    d = x.double()
    if name == "sigmoid":
        return torch.sigmoid(d)
    if name == "tanh":
        return torch.tanh(d)
    if name == "logsigmoid":
        return F.logsigmoid(d)
    if name == "softplus":
        return torch.where(x.float() > torch.tensor(threshold, dtype=torch.float32), d,
                           d.clamp(min=0) + torch.log1p(torch.exp(-d.abs())))
    return torch.where(d == float("-inf"), torch.zeros_like(d).neg(), F.silu(d))


def _assert_within_bound(name, y, x, bound=None, **params):
    """y is within the float32 bound of the exact value (fp32; ``bound`` overrides it), or within 1 ulp of
    it (16-bit dtypes: the float32 value rounded a second time); nan exactly where x is nan."""
    exact = _exact(name, x, **params)
    nan = torch.isnan(exact)
    assert torch.equal(torch.isnan(y), nan)
    zero = exact == 0  # the sign of a zero too (silu(-0) = -0, silu(-inf) = -0, tanh(-0) = -0)
    assert torch.equal(torch.signbit(y[zero]), torch.signbit(exact[zero])) and (y[zero] == 0).all()
    inf = torch.isinf(exact)  # silu(±inf) = ±inf (of a 16-bit dtype: also where x rounds past its range)
    assert torch.equal(y.double()[inf], exact[inf])
    fin = ~nan & ~inf
    if y.dtype != torch.float32:
        bound = 1.0
    elif bound is None:
        bound = FLOAT32_BOUND[name]
    err = (y.double() - exact).abs()[fin] / _ulp(exact, y.dtype)[fin]
    assert err.numel() == 0 or err.max().item() <= bound, (x[fin][err.argmax()], err.max())


def _assert_forward(name, y, x, **params):
    """y is the few-bit forward of x: what :func:`_forward_of` says bit for bit, the float32 kinds on CPU
    by their bound."""
    if _own32(name, params) and x.device.type == "cpu":
        _assert_within_bound(name, y, x, **params)
    else:
        assert torch.equal(y, _forward_of(name, x, **params)), "the forward must be exact (torch's, or correctly rounded)"


# ---- the ops against the reference ----


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("bits", [1, 2, 3, 4])
@pytest.mark.parametrize("n", SIZES, ids=lambda n: f"n{n}")
def test_fewbit_pack_unpack_match_reference(isa, dtype, bits, n):
    x = (torch.randn(n) * 3).to(dtype)
    x[: min(n, 11)] = _specials(dtype)[: min(n, 11)]
    borders = torch.sort(torch.randn(2**bits - 1) * 2).values
    levels = torch.randn(2**bits)
    codes = fewbit_ops.fewbit_pack(x, borders, bits)
    assert codes.dtype == torch.int32 and codes.shape == (math.ceil(n / 32) * bits,)
    assert torch.equal(codes, reference.fewbit_pack(x, borders, bits))
    g = torch.randn(n).to(dtype)
    out = fewbit_ops.fewbit_unpack(g, codes, levels, bits)
    expect = (g.float() * levels[reference.fewbit_codes(x, borders)]).to(dtype)
    # bit-exact: one fp32 product rounded once, as torch rounds it
    assert torch.equal(out.view(torch.int16 if dtype != torch.float32 else torch.int32),
                       expect.view(torch.int16 if dtype != torch.float32 else torch.int32))


def test_fewbit_codes_are_the_border_count_and_nan_is_zero():
    borders = torch.tensor([-1.0, 0.0, 0.0, 2.0, 2.0, 2.0, 5.0])
    x = torch.tensor([-2.0, -1.0, -0.5, 0.0, 1.0, 2.0, 3.0, 5.0, 6.0, float("nan"), float("inf"), -float("inf")])
    expect = torch.tensor([0, 0, 1, 1, 3, 3, 6, 6, 7, 0, 7, 0])
    assert torch.equal(reference.fewbit_codes(x, borders), expect)
    codes = fewbit_ops.fewbit_pack(x, borders, 3)
    assert torch.equal(reference.fewbit.fewbit_unpack_codes(codes, x.numel(), 3), expect)


@pytest.mark.parametrize("bits", [1, 2, 3, 4])
def test_fewbit_pack_border_ties_on_both_isas(isa, bits):
    """Repeated borders, inputs exactly on a border, one ulp either side, ±inf and nan: the kernels' codes
    (the AVX2 path finds them by a binary search, the portable one by counting) equal the border count,
    in full 32-element groups and in the tail."""
    g = torch.Generator().manual_seed(bits)
    nb = 2**bits - 1
    borders = torch.sort(torch.randint(-3, 4, (nb,), generator=g).float() * 0.5).values  # ties likely
    on = borders[torch.randint(0, nb, (400,), generator=g)]
    x = torch.cat([on, torch.nextafter(on, torch.tensor(float("inf"))), torch.nextafter(on, torch.tensor(-float("inf"))),
                   torch.randn(300, generator=g) * 2,
                   torch.tensor([float("nan"), float("inf"), -float("inf"), 0.0, -0.0])])
    x = x[torch.randperm(x.numel(), generator=g)]
    codes = fewbit_ops.fewbit_pack(x, borders, bits)
    assert torch.equal(reference.fewbit.fewbit_unpack_codes(codes, x.numel(), bits), reference.fewbit_codes(x, borders))


def test_fewbit_pack_layout_is_bit_planes_of_32_elements():
    # element i of group 0 carries code i % 4 at 2 bits: plane 0 = 0b...1010, plane 1 = 0b...1100
    x = torch.tensor([float(i % 4) for i in range(40)])
    codes = fewbit_ops.fewbit_pack(x, torch.tensor([0.5, 1.5, 2.5]), 2)
    words = [w & 0xFFFFFFFF for w in codes.tolist()]
    assert words == [0xAAAAAAAA, 0xCCCCCCCC, 0b10101010, 0b11001100]


def test_fewbit_pack_reads_non_contiguous_input_in_logical_order(isa):
    base = torch.randn(40, 70)
    x = base.t()[::2]  # [35, 40], strided
    borders = torch.tensor([-0.5, 0.1, 0.7])
    assert torch.equal(fewbit_ops.fewbit_pack(x, borders, 2), reference.fewbit_pack(x.contiguous(), borders, 2))
    g = torch.randn(70, 40).t()
    codes = fewbit_ops.fewbit_pack(g, borders, 2)
    out = fewbit_ops.fewbit_unpack(g, codes, torch.arange(4.0), 2)
    assert torch.equal(out, g * reference.fewbit_codes(g, borders).float())


def test_fewbit_empty_input(isa):
    x = torch.empty(0, 5)
    codes = fewbit_ops.fewbit_pack(x, torch.zeros(1), 1)
    assert codes.shape == (0,)
    assert fewbit_ops.fewbit_unpack(x, codes, torch.zeros(2), 1).shape == (0, 5)


def test_fewbit_float64_runs_on_the_reference_path():
    x = torch.randn(100, dtype=torch.float64)
    b = torch.tensor([0.25])
    assert torch.equal(fewbit_ops.fewbit_pack(x, b, 1), reference.fewbit_pack(x, b, 1))


@pytest.mark.parametrize("op", ["fewbit_pack", "fewbit_unpack", "fewbit_pack_host", "fewbit_unpack_host"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_fewbit_opcheck(op, dtype):
    x = torch.randn(7, 37).to(dtype)
    borders = torch.tensor([-1.0, 0.0, 1.0])
    fn = getattr(torch.ops.sparseops, op)
    if "pack" in op and "unpack" not in op:
        args = (x, borders, 2)
    else:
        args = (x, reference.fewbit_pack(torch.randn(7, 37), borders, 2), torch.arange(4.0), 2)
    torch.library.opcheck(fn, args)


def test_csr_dds_fewbit_opcheck():
    layer = sparseops.SparseLinear(19, 11, sparsity=0.7)
    idx = layer._index()
    b, _ = _table("gelu", 2)
    x = torch.randn(5, 19)
    for op in (torch.ops.sparseops.csr_dds_fewbit, torch.ops.sparseops.csr_dds_fewbit_host):
        torch.library.opcheck(op, (x, layer.values.detach(), idx["crow"], idx["col"], layer.bias.detach(), 11, "gelu", b, 2))


# ---- the autograd layer ----


def _params_for(name):
    return {"leaky_relu": {"negative_slope": 0.2}, "hardtanh": {"min_val": -2.0, "max_val": 0.5},
            "elu": {"alpha": 0.7}, "celu": {"alpha": 2.5}, "softplus": {"beta": 2.0, "threshold": 5.0}}.get(name, {})


@pytest.mark.parametrize("name", ACTIVATIONS)
@pytest.mark.parametrize("bits", [1, 2, 3, 4])
def test_fewbit_activation_forward_exact_and_gradient_is_the_table(isa, name, bits):
    x = torch.randn(37, 29) * 4
    x[0, :11] = torch.tensor([0.0, -0.0, 6.0, -3.0, 3.0, -1.0, 1.0, 0.5, -2.0, 10.0, -10.0])
    x.requires_grad_(True)
    y = fewbit.activation(x, name, bits)
    _assert_forward(name, y, x.detach())
    g = torch.randn_like(y)
    y.backward(g)
    borders, levels = _table(name, bits)
    # exactly q(x) * grad: the code of each element, its level, one fp32 product
    assert torch.equal(x.grad, g * levels[reference.fewbit_codes(x.detach(), borders)])


@pytest.mark.parametrize("name", PWL_ACTIVATIONS)
def test_fewbit_piecewise_linear_gradients_equal_torch_exactly(isa, name):
    params = _params_for(name)
    kinks = [0.0, -0.0, 6.0, -3.0, 3.0, -1.0, 1.0, -2.0, 0.5]
    x = torch.cat([torch.randn(2000) * 5, torch.tensor(kinks)]).requires_grad_(True)
    ref = x.detach().clone().requires_grad_(True)
    g = torch.randn(x.numel())
    fewbit.activation(x, name, None, **params).backward(g)
    fewbit.activation_fn(name, **params)(ref).backward(g)
    assert torch.equal(x.grad, ref.grad)


@pytest.mark.parametrize("name", SMOOTH_ACTIVATIONS)
@pytest.mark.parametrize("bits", [1, 2, 3, 4])
def test_fewbit_gradient_within_the_documented_error_of_the_true_derivative(isa, name, bits):
    t = fewbit.get_table(name, bits)
    x = torch.empty(20000).uniform_(t.lo, t.hi).requires_grad_(True)
    fewbit.activation(x, name, bits).backward(torch.ones(x.numel()))
    true = fewbit.derivative(name, x.detach().double())
    assert (x.grad.double() - true).abs().max().item() <= t.max_error + 1e-5


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
def test_fewbit_half_dtypes_match_reference(isa, dtype):
    x = (torch.randn(33, 65) * 3).to(dtype).requires_grad_(True)
    y = fewbit.gelu(x, bits=3)
    assert y.dtype == dtype and torch.equal(y, F.gelu(x.detach()))
    g = torch.randn_like(y)
    y.backward(g)
    borders, levels = _table("gelu", 3)
    assert torch.equal(x.grad, (g.float() * levels[reference.fewbit_codes(x.detach(), borders)]).to(dtype))


def test_fewbit_never_modifies_its_input(isa):
    x = torch.randn(100, requires_grad=True)
    before = x.detach().clone()
    m = sparseops.nn.FewBitReLU(inplace=True)
    y = m(x)
    y.backward(torch.ones_like(y))
    assert torch.equal(x.detach(), before)
    assert y.data_ptr() != x.data_ptr()


def test_fewbit_no_grad_saves_nothing(isa):
    x = torch.randn(1000)
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        with torch.no_grad():
            fewbit.gelu(x, bits=2)
        fewbit.gelu(x, bits=2)  # x needs no grad either
    assert saved == []


def _saved_bytes(fn, x):
    saved = {}

    def pack(t):
        saved[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        fn(x)
    return sum(saved.values())


@pytest.mark.parametrize("bits", [1, 2, 3, 4])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_fewbit_saved_memory_is_bits_over_8_per_element(dtype, bits):
    n = 1 << 16
    x = torch.randn(n).to(dtype).requires_grad_(True)
    ours = _saved_bytes(lambda t: fewbit.gelu(t, bits=bits), x)
    # the codes plus the 2^b fp32 levels
    assert ours <= n * bits / 8 + 4 * 16
    theirs = _saved_bytes(F.gelu, x)
    assert theirs == n * x.element_size()
    if dtype == torch.float32 and bits == 2:
        assert theirs / ours >= 15.9, "2-bit GELU on fp32 saves 16x less than torch's GELU"


# ---- modules and convert_ ----


_TORCH_MODULES = [
    (nn.GELU(), sparseops.nn.FewBitGELU), (nn.GELU(approximate="tanh"), sparseops.nn.FewBitGELU),
    (nn.SiLU(), sparseops.nn.FewBitSiLU), (nn.Tanh(), sparseops.nn.FewBitTanh),
    (nn.Sigmoid(), sparseops.nn.FewBitSigmoid), (nn.Softplus(beta=2.0, threshold=5.0), sparseops.nn.FewBitSoftplus),
    (nn.ELU(alpha=0.5), sparseops.nn.FewBitELU), (nn.SELU(), sparseops.nn.FewBitSELU),
    (nn.CELU(alpha=1.5), sparseops.nn.FewBitCELU), (nn.Mish(), sparseops.nn.FewBitMish),
    (nn.LogSigmoid(), sparseops.nn.FewBitLogSigmoid), (nn.Hardswish(), sparseops.nn.FewBitHardswish),
    (nn.Softsign(), sparseops.nn.FewBitSoftsign), (nn.ReLU(), sparseops.nn.FewBitReLU),
    (nn.LeakyReLU(0.1), sparseops.nn.FewBitLeakyReLU), (nn.ReLU6(), sparseops.nn.FewBitReLU6),
    (nn.Hardtanh(-0.5, 2.0), sparseops.nn.FewBitHardtanh), (nn.Hardsigmoid(), sparseops.nn.FewBitHardsigmoid),
]


@pytest.mark.parametrize("torch_mod,cls", _TORCH_MODULES, ids=lambda v: repr(v) if isinstance(v, nn.Module) else "")
def test_convert_swaps_each_activation_and_keeps_outputs(torch_mod, cls):
    model = nn.Sequential(nn.Linear(8, 16), torch_mod, nn.Linear(16, 4))
    x = torch.randn(5, 8) * 3
    expect = model(x)
    keys = set(model.state_dict())
    fewbit.convert_(model, bits=3)
    assert type(model[1]) is cls
    if model[1]._fn.fused_own:  # tanh, sigmoid, elu, ...: the kernel's own forward, checked on the activation
        h = model[0](x).detach()
        _assert_forward(cls.name, model[1](h), h, **model[1]._fn.params)
        torch.testing.assert_close(model(x), expect, rtol=1e-6, atol=1e-6)
    else:
        assert torch.equal(model(x), expect)
    assert set(model.state_dict()) == keys, "converting must keep checkpoints loadable"
    if cls.name in ("relu", "leaky_relu"):
        assert model[1].bits == 1
    elif cls.name in ("relu6", "hardtanh", "hardsigmoid"):
        assert model[1].bits == 2
    else:
        assert model[1].bits == 3


def test_convert_respects_filter_fn_and_nesting():
    model = nn.Sequential(nn.GELU(), nn.Sequential(nn.Linear(3, 3), nn.GELU()), nn.ReLU())
    fewbit.convert_(model, bits=2, filter_fn=lambda m, name: name != "0")
    assert type(model[0]) is nn.GELU
    assert type(model[1][1]) is sparseops.nn.FewBitGELU
    assert type(model[2]) is sparseops.nn.FewBitReLU


def test_fewbit_module_to_dtype_keeps_the_table_fp32():
    m = sparseops.nn.FewBitGELU(bits=3)
    borders, levels = m.borders.clone(), m.levels.clone()
    m.to(torch.bfloat16).half().double()
    assert torch.equal(m.borders, borders) and torch.equal(m.levels, levels)
    x = torch.randn(100, dtype=torch.float64, requires_grad=True)
    m(x).sum().backward()
    assert torch.equal(x.grad, levels.double()[reference.fewbit_codes(x.detach(), borders)])


def test_fewbit_module_repr_and_constructor_checks():
    assert repr(sparseops.nn.FewBitGELU(approximate="tanh", bits=3)) == "FewBitGELU(approximate='tanh', bits=3)"
    with pytest.raises(ValueError, match="approximate"):
        sparseops.nn.FewBitGELU(approximate="fast")
    with pytest.raises(ValueError, match="bits"):
        sparseops.nn.FewBitGELU(bits=5)
    with pytest.raises(TypeError, match="bits"):
        sparseops.nn.FewBitSiLU(bits=2.0)
    with pytest.raises(TypeError, match="inplace"):
        sparseops.nn.FewBitReLU(inplace="yes")


@pytest.mark.parametrize("bad", [0, 5, -1])
def test_fewbit_functional_bad_bits(bad):
    with pytest.raises(ValueError, match="bits"):
        fewbit.gelu(torch.randn(3), bits=bad)


def test_fewbit_functional_bad_inputs():
    with pytest.raises(TypeError, match="bits"):
        fewbit.silu(torch.randn(3), bits=True)
    with pytest.raises(TypeError, match="x"):
        fewbit.gelu([1.0, 2.0])
    with pytest.raises(TypeError, match="x"):
        fewbit.gelu(torch.arange(3))
    with pytest.raises(ValueError, match="name"):
        fewbit.activation(torch.randn(3), "swish")
    with pytest.raises(TypeError, match="model"):
        fewbit.convert_("not a model")


# ---- the fused SparseLinear ----


def _dense_reference(layer, x, act, bits):
    """fp64: act(x Wᵀ + b) and the gradients of sum(y * g) with the act's table as its derivative."""
    w = layer.dense_weight().detach().double().requires_grad_(True)
    b = layer.bias.detach().double().requires_grad_(True)
    xd = x.detach().double().requires_grad_(True)
    z = xd @ w.t() + b
    borders, levels = _table(act, bits)
    q = levels.double()[reference.fewbit_codes(z.detach().float(), borders)]
    y = fewbit.activation_fn(act)(z)
    return z, y, q, xd, w, b


@pytest.mark.parametrize("act,bits", [("gelu", 2), ("relu", 1), ("silu", 3), ("tanh", 4), ("sigmoid", 2)])
@pytest.mark.parametrize("B,in_f,out_f,sparsity", [(1, 37, 3, 0.5), (37, 64, 1000, 0.9), (5, 1000, 37, 0.99),
                                                   (8, 16, 16, 0.0)])
def test_sparse_linear_fused_activation_matches_fp64_reference(isa, act, bits, B, in_f, out_f, sparsity):
    layer = sparseops.SparseLinear(in_f, out_f, sparsity=sparsity, activation=act, act_bits=bits)
    x = torch.randn(B, in_f).requires_grad_(True)
    y = layer(x)
    z, y_ref, q, xd, w, b = _dense_reference(layer, x, act, bits)
    assert_close_rms(y, y_ref, torch.float32, name="y")
    g = torch.randn_like(y)
    y.backward(g)
    dz = g.double() * q
    (dz * z).sum().backward()
    assert_close_rms(x.grad, xd.grad, torch.float32, name="dx")
    assert_close_rms(layer.values.grad, w.grad[layer.mask], torch.float32, name="dvalues")
    assert_close_rms(layer.bias.grad, b.grad, torch.float32, name="dbias")


def test_sparse_linear_fused_saves_codes_not_the_preactivation(isa):
    layer = sparseops.SparseLinear(256, 512, sparsity=0.9, activation="gelu", act_bits=2)
    x = torch.randn(64, 256)
    saved = {}

    def pack(t):
        saved[t.untyped_storage().data_ptr()] = (tuple(t.shape), t.dtype)
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        layer(x)
    shapes = list(saved.values())
    assert ((64 * 512 + 31) // 32 * 2,) in [s for s, _ in shapes]
    assert not any(s == (64, 512) for s, _ in shapes), "the pre-activation must not be saved"


def test_sparse_linear_fused_state_dict_and_to(isa):
    layer = sparseops.SparseLinear(20, 30, sparsity=0.8, activation="silu", act_bits=3)
    clone = sparseops.SparseLinear(20, 30, sparsity=0.5, activation="silu", act_bits=3)
    clone.load_state_dict(layer.state_dict())
    x = torch.randn(4, 20)
    assert torch.equal(clone(x), layer(x))
    layer.to(torch.float64)
    assert layer.act_borders_bits.dtype == torch.int32
    assert_close_rms(layer(x.double()), clone(x).double(), torch.float32)
    assert "activation=silu, act_bits=3" in repr(layer)


def test_sparse_linear_fused_relu_default_bits_and_bad_args():
    assert sparseops.SparseLinear(4, 4, sparsity=0.5, activation="relu").act_bits == 1
    with pytest.raises(ValueError, match="activation"):
        sparseops.SparseLinear(4, 4, sparsity=0.5, activation="swish")
    with pytest.raises(ValueError, match="act_bits"):
        sparseops.SparseLinear(4, 4, sparsity=0.5, activation="gelu", act_bits=0)
    with pytest.raises(TypeError, match="act_bits"):
        sparseops.SparseLinear(4, 4, sparsity=0.5, activation="gelu", act_bits="2")
    with pytest.raises(ValueError, match="act_bits"):
        sparseops.SparseLinear(4, 4, sparsity=0.5, act_bits=2)


def test_sparse_linear_from_dense_with_activation(isa):
    lin = nn.Linear(12, 9)
    layer = sparseops.SparseLinear.from_dense(lin, 0.0, activation="gelu")
    x = torch.randn(3, 12)
    assert_close_rms(layer(x), F.gelu(lin(x)).detach(), torch.float32)


# ---- torch.compile ----


def test_fewbit_compile_fullgraph_matches_eager():
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Linear(16, 32), sparseops.nn.FewBitGELU(bits=2),
        sparseops.SparseLinear(32, 24, sparsity=0.8, activation="silu", act_bits=2), nn.Linear(24, 4),
        sparseops.nn.FewBitReLU(),
    )
    compiled = torch.compile(model, fullgraph=True, backend="aot_eager")
    x = torch.randn(9, 16)
    outs = []
    for m in (model, compiled):
        m.zero_grad()
        y = m(x)
        y.square().sum().backward()
        outs.append((y.detach(), [p.grad.clone() for p in m.parameters()]))
    assert torch.equal(outs[0][0], outs[1][0])
    for a, b in zip(outs[0][1], outs[1][1]):
        assert_close_rms(a, b.double(), torch.float32, name="grad compiled vs eager")


def test_fewbit_compile_inductor_forward():
    m = sparseops.nn.FewBitGELU(bits=2)
    x = torch.randn(64, 33)
    with torch.no_grad():
        # inductor generates its own gelu, which may differ from aten's in the last bit
        assert_close_rms(torch.compile(m, fullgraph=True)(x), F.gelu(x.double()), torch.float32)


# ---- training ----


def _train(act_factory, steps=300, seed=0):
    """Final training loss of a 2-hidden-layer MLP fitting a noisy random teacher (fixed seeds).

    8192 samples and noise of std 0.3 keep the model from memorising, so both runs end near the
    same plateau after learning (the loss falls from ~0.2 to ~0.085) and the comparison is of
    the gradients, not of luck in overfitting.
    """
    torch.manual_seed(seed)
    teacher = nn.Sequential(nn.Linear(16, 32), nn.Tanh(), nn.Linear(32, 1))
    x = torch.randn(8192, 16)
    with torch.no_grad():
        y = teacher(x) + 0.3 * torch.randn(8192, 1)
    torch.manual_seed(seed + 1)
    model = nn.Sequential(nn.Linear(16, 32), act_factory(), nn.Linear(32, 32), act_factory(), nn.Linear(32, 1))
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, max(1, steps))
    for _ in range(steps):
        opt.zero_grad()
        F.mse_loss(model(x), y).backward()
        opt.step()
        sched.step()
    with torch.no_grad():
        return F.mse_loss(model(x), y).item()


def test_fewbit_2bit_gelu_trains_within_2_percent_of_full_precision(isa):
    full = _train(nn.GELU)
    few = _train(lambda: sparseops.nn.FewBitGELU(bits=2))
    start = _train(nn.GELU, steps=0)
    assert full < 0.6 * start, "the task must be learnt for the comparison to mean anything"
    assert few <= full * 1.02, f"2-bit GELU final loss {few:.5f} vs full precision {full:.5f}"


# ---- the binding's checks ----


@pytest.mark.skipif(_C is None, reason="sparseops._C is not built")
def test_binding_refuses_malformed_arguments():
    import numpy as np

    x = np.zeros(40, dtype=np.float32)
    codes = np.zeros(4, dtype=np.int32)
    b3 = np.zeros(3, dtype=np.float32)
    with pytest.raises(ValueError, match="bits"):
        _C.fewbit_pack(x, "float32", b3, 5, codes, 1)
    with pytest.raises(ValueError, match="dtype"):
        _C.fewbit_pack(x, "float64", b3, 2, codes, 1)
    with pytest.raises(ValueError, match="borders"):
        _C.fewbit_pack(x, "float32", np.zeros(2, dtype=np.float32), 2, codes, 1)
    with pytest.raises(ValueError, match="borders"):
        _C.fewbit_pack(x, "float32", np.array([1, 0, 2], dtype=np.float32), 2, codes, 1)
    with pytest.raises(ValueError, match="borders"):
        _C.fewbit_pack(x, "float32", np.array([0, np.nan, 2], dtype=np.float32), 2, codes, 1)
    with pytest.raises(ValueError, match="codes"):
        _C.fewbit_pack(x, "float32", b3, 2, np.zeros(3, dtype=np.int32), 1)
    with pytest.raises(TypeError, match="codes"):
        _C.fewbit_pack(x, "float32", b3, 2, np.zeros(4, dtype=np.int64), 1)
    with pytest.raises(TypeError, match="x"):
        _C.fewbit_pack(x.astype(np.float64), "float32", b3, 2, codes, 1)
    with pytest.raises(ValueError, match="x"):
        _C.fewbit_pack(np.zeros((40, 2), dtype=np.float32)[:, 0], "float32", b3, 2, codes, 1)
    g = np.zeros(40, dtype=np.float32)
    with pytest.raises(ValueError, match="levels"):
        _C.fewbit_unpack(g, "float32", codes, np.zeros(3, dtype=np.float32), 2, np.zeros(40, dtype=np.float32), 1)
    with pytest.raises(ValueError, match="codes"):
        _C.fewbit_unpack(g, "float32", codes[:2], np.zeros(4, dtype=np.float32), 2, np.zeros(40, dtype=np.float32), 1)
    with pytest.raises(ValueError, match="out"):
        _C.fewbit_unpack(g, "float32", codes, np.zeros(4, dtype=np.float32), 2, np.zeros(39, dtype=np.float32), 1)
    ro = np.zeros(40, dtype=np.float32)
    ro.setflags(write=False)
    with pytest.raises(ValueError, match="out"):
        _C.fewbit_unpack(g, "float32", codes, np.zeros(4, dtype=np.float32), 2, ro, 1)
    # a sentinel no pack of these inputs writes (random x, codes 0x5A5A5A5A): a write before the refusal shows
    xr = np.random.default_rng(0).standard_normal(40).astype(np.float32) * 3
    sentinel = np.full(4, 0x5A5A5A5A, dtype=np.int32)
    for bad in (np.array([1, 0, 2], dtype=np.float32), np.array([0, np.nan, 2], dtype=np.float32)):
        codes = sentinel.copy()
        with pytest.raises(ValueError, match="borders"):
            _C.fewbit_pack(xr, "float32", bad, 2, codes, 1)
        assert (codes == sentinel).all(), "nothing is written when the arguments are refused"
    out = np.full(40, 7.0, dtype=np.float32)
    with pytest.raises(ValueError, match="levels"):
        _C.fewbit_unpack(xr, "float32", sentinel, np.zeros(3, dtype=np.float32), 2, out, 1)
    assert (out == 7.0).all(), "nothing is written when the arguments are refused"


@pytest.mark.skipif(_C is None, reason="sparseops._C is not built")
def test_unpack_binding_refuses_an_out_that_overlaps_its_inputs():
    # out may be grad itself (element by element, read before written); any other overlap is refused,
    # with nothing written
    rng = np.random.default_rng(0)
    x = rng.standard_normal(40).astype(np.float32)
    codes = np.zeros(4, dtype=np.int32)
    _C.fewbit_pack(x, "float32", np.array([-1, 0, 1], dtype=np.float32), 2, codes, 1)
    levels = np.array([0.5, 1.5, 2.5, 3.5], dtype=np.float32)
    buf = rng.standard_normal(48).astype(np.float32)
    before = buf.copy()
    with pytest.raises(ValueError, match="out: shares memory with grad"):
        _C.fewbit_unpack(buf[:40], "float32", codes, levels, 2, buf[8:48], 1)
    assert (buf == before).all(), "a refused call wrote its output"
    with pytest.raises(ValueError, match="out: shares memory with levels"):
        _C.fewbit_unpack(buf[8:48], "float32", codes, buf[:4], 2, buf[2:42], 1)
    assert (buf == before).all(), "a refused call wrote its output"
    both = np.zeros(44, dtype=np.int32)
    both[:4] = codes
    snapshot = both.copy()
    with pytest.raises(ValueError, match="out: shares memory with codes"):
        _C.fewbit_unpack(buf[:40], "float32", both[:4], levels, 2, both[2:42].view(np.float32), 1)
    assert (both == snapshot).all(), "a refused call wrote its output"
    expect = np.full(40, np.nan, dtype=np.float32)
    _C.fewbit_unpack(buf[:40], "float32", codes, levels, 2, expect, 1)
    assert np.array_equal(expect, buf[:40] * levels[(x[:, None] > np.array([-1, 0, 1])).sum(1)])
    g = buf[:40]
    _C.fewbit_unpack(g, "float32", codes, levels, 2, g, 1)  # in place on grad: allowed
    assert np.array_equal(g, expect)


# ---- the fused forward (one pass writes y and the codes) ----

FUSED = ["relu", "leaky_relu", "relu6", "hardtanh", "hardswish", "hardsigmoid", "tanh", "sigmoid", "silu", "elu", "selu",
         "celu", "softplus", "logsigmoid"]


def _bits_of(t):
    return t.view(torch.int32) if t.dtype == torch.float32 else t.view(torch.int16)


def _fused_input(n, dtype, scale=5.0):
    g = torch.Generator().manual_seed(n)
    x = (torch.randn(n, generator=g) * scale).to(dtype)
    sp = torch.cat([_specials(dtype), torch.tensor([9.0, 9.02, 10.0, -10.0, 1e-40, -1e-45, 0.5493, 2.0 ** -12]).to(dtype)])
    x[: min(n, sp.numel())] = sp[: min(n, sp.numel())]
    return x


@pytest.mark.parametrize("name", FUSED)
@pytest.mark.parametrize("params", ["default", "custom"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("n", SIZES, ids=lambda n: f"n{n}")
def test_fused_forward_is_exact_and_codes_are_pack(isa, monkeypatch, name, params, dtype, n):
    kw = _params_for(name) if params == "custom" else {}
    fn = fewbit.activation_fn(name, **kw)
    assert fn.fused is not None
    bits = {"relu": 1, "leaky_relu": 1, "hardswish": 3, "tanh": 2}.get(name, 2)
    borders, _ = _table(name, bits, **kw)
    x = _fused_input(n, dtype)
    # the fused kernel, not fn + pack, must produce both
    monkeypatch.setattr(fewbit_ops, "pack", lambda *a: pytest.fail("fused fell back to fn + pack"))
    y, codes = fewbit_ops.fused(x, fn, borders, bits)
    y_only, none = fewbit_ops.fused(x, fn, borders, bits, codes=False)
    monkeypatch.undo()
    assert y.shape == x.shape and y.dtype == dtype and none is None
    assert torch.equal(codes, reference.fewbit_pack(x, borders, bits))
    if _own32(name, kw):  # one of its own float32 kinds, within its bound of the exact value
        assert not fn.fused_exact, "the reference is not its bits: the layer must not use it for them"
        assert torch.equal(_bits_of(y), _bits_of(y_only))
        _assert_within_bound(name, y, x, **kw)
        return
    # torch's own forward, or (elu, selu, celu, softplus with beta != 1) float64 torch rounded to the
    # dtype. either way the reference gives these bits (fused_exact: the layer may use it off the CPU kernel)
    assert fn.fused_exact
    ref_y = reference.fewbit.fewbit_fused_forward(x, *fn.fused) if fn.fused_own else fn(x)
    # bit for bit, -0 and rounding included; nan where torch has nan (its payload is torch's own choice)
    nan = torch.isnan(ref_y)
    for got in (y, y_only):
        assert torch.equal(torch.isnan(got), nan)
        bad = (_bits_of(got) != _bits_of(ref_y)) & ~nan
        assert not bad.any(), (x[bad], got[bad], ref_y[bad])
    assert torch.equal(codes, reference.fewbit_pack(x, borders, bits))


def test_fused_tanh_at_the_tables_slot_edges(isa):
    # csrc/tanh_table.h's slots change where a float's exponent or its top two mantissa bits do: four
    # intervals an octave over [0.125, 16), the series below 0.125, the constant 1 from 10 and at the clamp
    # (16, inf). at each edge, the floats on both sides (and 1e-3-wide runs around the first ones), plus
    # subnormals, the largest float, inf and nan: within the path's bound, the sign of x kept
    edges = torch.tensor([2.0 ** e * (1 + j / 4) for e in range(-3, 5) for j in range(4)], dtype=torch.float32)
    one = torch.tensor(1.0)
    around = torch.cat([edges, torch.nextafter(edges, edges * 0), torch.nextafter(edges, edges * 4)])
    runs = torch.cat([torch.linspace(0.1248, 0.1252, 4001), torch.linspace(9.0, 9.03, 3001), torch.linspace(0.0, 1e-6, 1001)])
    special = torch.tensor([0.0, 1e-45, 1e-40, 1.17549435e-38, 3.4028235e38, float("inf"), 15.999999, 16.000002, 1e4])
    x = torch.cat([around, runs.float(), special, torch.nextafter(one, one * 0).reshape(1)])
    x = torch.cat([x, -x])
    fn = fewbit.activation_fn("tanh")
    y, _ = fewbit_ops.fused(x, fn, _table("tanh", 2)[0], 2)
    _assert_within_bound("tanh", y, x, bound=None if isa == "avx2" else TANH_TABLE_BOUND)
    assert torch.equal(torch.signbit(y), torch.signbit(x))
    assert torch.equal(y[x.abs() >= 9.02].abs(), torch.ones(int((x.abs() >= 9.02).sum())))
    nan = fewbit_ops.fused(torch.tensor([float("nan"), -float("nan")] * 20), fn, _table("tanh", 2)[0], 2)[0]
    assert torch.isnan(nan).all()


def test_fused_tanh_table_is_the_same_bits_on_avx512_and_portable_at_its_edges():
    # the slot edges and specials of test_fused_tanh_at_the_tables_slot_edges, every dtype: the two paths of
    # the table agree bit for bit (the 16-bit dtypes run the table on two 8-lane vectors packed into one zmm)
    import sparseops
    from sparseops._cpp import _C as C

    if C is None or C.best_isa() != "avx512":
        pytest.skip("needs the avx512 path: its twin is the portable one")
    edges = torch.tensor([2.0 ** e * (1 + j / 4) for e in range(-3, 5) for j in range(4)], dtype=torch.float32)
    x = torch.cat([edges, torch.nextafter(edges, edges * 0), torch.nextafter(edges, edges * 4),
                   torch.linspace(-10, 10, 20001), torch.tensor([0.0, -0.0, 1e-45, 3e38, float("inf"), float("nan")])])
    x = torch.cat([x, -x])
    fn = fewbit.activation_fn("tanh")
    prev = sparseops.isa()
    try:
        for dtype in DTYPES:
            xd = x.to(dtype)
            out = []
            for which in ("avx512", "portable"):
                assert sparseops.set_isa(which) == which
                out.append(fewbit_ops.fused(xd, fn, _table("tanh", 2)[0], 2)[0])
            assert torch.equal(_bits_of(out[0]), _bits_of(out[1])), dtype
    finally:
        sparseops.set_isa(prev)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_fused_tanh_is_within_its_bound_on_a_sweep(isa, dtype):
    # every exponent from 2^-30 to 2^4, dense near 0 and near where tanh rounds to 1 (9.01), both signs;
    # and a million normal samples: within 0.77 ulp of the exact value on avx2, 0.57 on the table's paths
    # (fp32: faithfully rounded), and where tanh rounds to 1 it is 1
    g = torch.Generator().manual_seed(7)
    mant = 1.0 + torch.rand(40000, generator=g)
    expo = torch.randint(-30, 4, (40000,), generator=g).double()
    x = torch.cat([mant * 2.0 ** expo, torch.linspace(8.5, 9.5, 20001, dtype=torch.float64),
                   torch.linspace(0.0, 0.4, 20001, dtype=torch.float64),
                   torch.randn(1 << 20, generator=g, dtype=torch.float64) * 2])
    x = torch.cat([x, -x]).to(dtype)
    fn = fewbit.activation_fn("tanh")
    assert fn.fused_own and not fn.fused_exact
    borders, _ = _table("tanh", 2)
    y, codes = fewbit_ops.fused(x, fn, borders, 2)
    _assert_within_bound("tanh", y, x, bound=None if isa == "avx2" else TANH_TABLE_BOUND)
    one = torch.tanh(x.double()).to(dtype).abs() == 1
    assert one.sum() > 1000 and torch.equal(y[one].abs(), torch.ones(int(one.sum()), dtype=dtype))
    assert torch.equal(codes, reference.fewbit_pack(x, borders, 2))


@pytest.mark.parametrize("name,params", [("elu", "default"), ("elu", "custom"), ("selu", "default"), ("celu", "default"),
                                         ("celu", "custom"), ("softplus", "custom")])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_fused_float64_family_is_correctly_rounded_on_a_sweep(isa, name, params, dtype):
    # every exponent from 2^-40 to 2^7 (past where each saturates: elu to -alpha, softplus to x or to a
    # subnormal), both signs, and normal samples; against torch's float64 function
    # rounded once to the dtype, bit for bit. torch's own float32 forward is not that value everywhere
    # (checked below, so the comparison can tell the two apart)
    kw = _params_for(name) if params == "custom" else {}
    assert params == "default" or kw, "custom: constants other than torch's defaults"
    g = torch.Generator().manual_seed(11)
    mant = 1.0 + torch.rand(60000, generator=g, dtype=torch.float64)
    expo = torch.randint(-40, 8, (60000,), generator=g).double()
    # (and where e^-|x| leaves the normal doubles, 700 to 760, for softplus)
    x = torch.cat([mant * 2.0 ** expo, torch.randn(1 << 19, generator=g, dtype=torch.float64) * 4,
                   torch.linspace(-110.0, -80.0, 3001, dtype=torch.float64),
                   torch.linspace(690.0, 760.0, 7001, dtype=torch.float64)])
    x = torch.cat([x, -x]).to(dtype)
    fn = fewbit.activation_fn(name, **kw)
    assert fn.fused_own and fn.fused_exact
    borders, _ = _table(name, 2, **kw)
    y, codes = fewbit_ops.fused(x, fn, borders, 2)
    ref = reference.fewbit.fewbit_fused_forward(x, *fn.fused)  # float64 (expm1, log1p), rounded once
    assert torch.equal(_bits_of(y), _bits_of(ref))
    # which is torch's float64 function rounded, where that does not overflow (it has no other form)
    tref = fn(x.double()).to(dtype)
    fin = torch.isfinite(tref) | torch.isnan(x)
    assert torch.equal(_bits_of(tref)[fin], _bits_of(ref)[fin])
    assert torch.equal(codes, reference.fewbit_pack(x, borders, 2))
    if dtype == torch.float32 and name != "elu":  # elu with alpha = 1 is exact in float32 on these too
        assert not torch.equal(_bits_of(fn(x)), _bits_of(ref)), "torch's float32 forward: not correctly rounded"


@pytest.mark.parametrize("beta", [1.0, 1.5])
def test_fused_softplus_above_torchs_overflow_and_constants_it_refuses(isa, beta):
    # a threshold above where torch's own softplus overflows (x * beta > 88.7 in float32, 709.8 in
    # float64): the kernel and the reference give the finite value, x itself up from there. beta 1.5 is the
    # float64 kernel (bit for bit with the reference), beta 1 the float32 one (its bound; x itself alike)
    fn = fewbit.activation_fn("softplus", beta=beta, threshold=2000.0)
    x = torch.tensor([80.0, 100.0, 709.0, 710.0, 800.0, 999.0, 1e30, float("inf"), -1e30, -float("inf"), -800.0])
    y, _ = fewbit_ops.fused(x, fn, _table("softplus", 2, beta=beta, threshold=2000.0)[0], 2)
    if beta == 1.0:
        assert not fn.fused_exact
        _assert_within_bound("softplus", y, x, threshold=2000.0)
    else:
        assert fn.fused_exact
        assert torch.equal(_bits_of(y), _bits_of(reference.fewbit.fewbit_fused_forward(x, *fn.fused)))
    assert torch.equal(y[1:8], x[1:8]) and torch.isinf(fn(x[3:5])).all()  # torch: inf there
    assert torch.equal(y[8:], torch.zeros(3))
    # the threshold test is torch's float32 one: x * float(beta) rounded to float32 (1.0 here, not above
    # the threshold 1, though x * beta in float64 is 1.00000002), so this x takes the log branch, as in
    # torch's float32 softplus
    fn = fewbit.activation_fn("softplus", beta=3.0, threshold=1.0)
    x = torch.tensor([0.33333334, 0.3333334, 0.3333333])
    y, _ = fewbit_ops.fused(x, fn, _table("softplus", 2, beta=3.0, threshold=1.0)[0], 2)
    torch.testing.assert_close(y, fn(x), rtol=2e-7, atol=0)
    assert y[1] == x[1] and y[0] != x[0]
    if beta != 1.0:
        return
    # a beta or a celu alpha whose reciprocal overflows runs torch's forward, and the binding refuses it
    for name, kw in (("softplus", {"beta": 1e-310}), ("celu", {"alpha": 1e-310})):
        assert fewbit.activation_fn(name, **kw).fused is None
    xs = np.ones(64, dtype=np.float32)
    with pytest.raises(ValueError, match="a: expected a finite number >= 2.2250738585072014e-308"):
        _C.fewbit_pack_fused(xs, "float32", np.zeros(3, np.float32), 2, None, "softplus", 1e-310, 20.0,
                             np.empty_like(xs), 1)


@pytest.mark.parametrize("threshold", [1.0, 0.5, -1.0, 3.0])
@pytest.mark.parametrize("n", [37, 1000], ids=lambda n: f"n{n}")
def test_fused_softplus_beta1_threshold(isa, threshold, n):
    # beta 1 runs the float32 kernel: x where x > float(threshold) (torch's rule), else its own log1p
    # form; thresholds where the two differ (below ~16.6 log(1 + e^x) does not round to x), the elements
    # right at and one float either side of it, in the vector body and the scalar tail
    t = torch.tensor(threshold)
    near = torch.stack([t, torch.nextafter(t, torch.tensor(-9.0)), torch.nextafter(t, torch.tensor(9.0))])
    x = torch.cat([near, torch.linspace(-4.0, 4.0, n - 3)])
    fn = fewbit.activation_fn("softplus", beta=1.0, threshold=threshold)
    assert fn.fused == ("softplus", 1.0, threshold) and not fn.fused_exact
    borders = _table("softplus", 2, beta=1.0, threshold=threshold)[0]
    y, codes = fewbit_ops.fused(x, fn, borders, 2)
    _assert_within_bound("softplus", y, x, threshold=threshold)
    above = x > threshold
    assert above.any() and (~above).any() and torch.equal(y[above], x[above])
    assert (y[~above] > x[~above]).all()  # log(1 + e^x) > x: the log branch, not x
    assert torch.equal(codes, reference.fewbit_pack(x, borders, 2))
    torch.testing.assert_close(y, fn(x), rtol=3e-7, atol=0)  # torch's own float32 softplus, to its rounding


def _sweep(dtype):
    # every exponent from 2^-30 to 2^7 (past where sigmoid rounds to 1 and to 0), dense where it rounds
    # to 1 (x near 17), across the subnormal results (x from -87 to -104; silu's to -111) and on to silu's
    # clamp (120), and near 0; normal samples
    g = torch.Generator().manual_seed(11)
    mant = 1.0 + torch.rand(40000, generator=g, dtype=torch.float64)
    expo = torch.randint(-30, 7, (40000,), generator=g).double()
    x = torch.cat([mant * 2.0 ** expo, torch.linspace(15.0, 18.0, 30001, dtype=torch.float64),
                   torch.linspace(82.0, 125.0, 40001, dtype=torch.float64),
                   torch.randn(1 << 20, generator=g, dtype=torch.float64) * 4])
    x = torch.cat([x, -x]).to(dtype)
    specials = [1e-45, -1e-45, 88.7, -88.73, 103.97, -103.97, 110.4, -110.4, 119.99, -119.99, 120.0, -120.0, 1e38]
    return torch.cat([x, _specials(dtype), torch.tensor(specials).to(dtype)])


@pytest.mark.parametrize("name", sorted(FLOAT32_BOUND))
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_fused_float32_kinds_are_within_their_bound_on_a_sweep(isa, name, dtype):
    x = _sweep(dtype)
    borders = _table(name, 2)[0]
    y, codes = fewbit_ops.fused(x, fewbit.activation_fn(name), borders, 2)
    _assert_within_bound(name, y, x)
    assert torch.equal(codes, reference.fewbit_pack(x, borders, 2))
    if dtype == torch.float32 and name != "tanh":
        # the subnormal results are there, to their bound (torch's float32 sigmoid and silu flush them to
        # 0: they overflow e^-x); logsigmoid's are -L for x > 88.8, the others' at x < -88.8
        lo = {"sigmoid": -103.9, "silu": -108.0, "softplus": -103.0, "logsigmoid": -103.0}[name]
        sub = (x > 88.8) & (x < -lo) if name == "logsigmoid" else (x < -88.8) & (x > lo)
        assert sub.sum() > 1000 and (y[sub] != 0).all()
        if name in ("sigmoid", "silu"):
            assert (F.silu(x[sub]) == 0).all() if name == "silu" else (torch.sigmoid(x[sub]) == 0).all()


@pytest.mark.parametrize("name", sorted(FLOAT32_BOUND))
def test_fused_float32_kinds_are_the_same_bits_on_both_isas(name):
    import sparseops
    from sparseops._cpp import _C as C

    if C is None or C.best_isa() == "portable":
        pytest.skip("needs the C++ module and an AVX2/FMA CPU: two paths to compare")
    paths = ("avx512", "avx2", "portable") if C.best_isa() == "avx512" else ("avx2", "portable")
    if name == "tanh" and "avx512" not in paths:
        pytest.skip("tanh's avx2 path has no twin (the exp form; portable takes the table): see its bound tests")
    borders = _table(name, 2)[0]
    prev = sparseops.isa()
    try:
        for dtype in DTYPES:
            x = _sweep(dtype)
            out = {}
            for which in paths:
                assert sparseops.set_isa(which) == which
                out[which] = fewbit_ops.fused(x, fewbit.activation_fn(name), borders, 2)[0]
            # tanh: avx512 and portable share the interval table; avx2 (the exp form) has no twin
            group = [p for p in paths if p != "avx2"] if name == "tanh" else list(paths)
            for other in group[1:]:
                assert torch.equal(_bits_of(out[group[0]]), _bits_of(out[other])), (dtype, other)
    finally:
        sparseops.set_isa(prev)


@pytest.mark.parametrize("name", FUSED)
@pytest.mark.parametrize("bits", [1, 2, 3, 4])
def test_fused_every_kind_is_the_same_bits_on_every_path(name, bits):
    """The values and codes of every fused kind, custom constants too, on a sweep of every exponent, in
    full groups and a tail: avx512 runs its own 16-lane steps (the w* twins of the 8-lane ones) and codes
    (compares into mask registers) for fp32, avx2 and portable theirs; all of them must agree bit for bit
    (the float64 family's reference tests allow nothing else either, but compare one path at a time). tanh
    is the exception: avx512 and portable share the interval table, avx2 keeps the exp form; both have
    their bound tests."""
    import sparseops
    from sparseops._cpp import _C as C

    if C is None or C.best_isa() == "portable":
        pytest.skip("needs the C++ module and an AVX2/FMA CPU: two paths to compare")
    paths = ("avx512", "avx2", "portable") if C.best_isa() == "avx512" else ("avx2", "portable")
    kw = _params_for(name)
    fn = fewbit.activation_fn(name, **kw)
    borders = torch.sort(torch.randn(2**bits - 1, generator=torch.Generator().manual_seed(bits)) * 3).values
    prev = sparseops.isa()
    try:
        for dtype in DTYPES:
            x = _sweep(dtype)
            x = x[torch.randperm(x.numel(), generator=torch.Generator().manual_seed(0))[: (1 << 18) + 7]]  # a tail of 7
            out = []
            for which in paths:
                assert sparseops.set_isa(which) == which
                out.append(fewbit_ops.fused(x, fn, borders, bits))
            for (y, codes), which in zip(out[1:], paths[1:]):
                assert torch.equal(out[0][1], codes), (dtype, which)
                if name == "tanh" and "avx2" in (which, paths[0]):
                    continue  # the avx2 path keeps tanh_g, the others take the table: each has its bound test
                assert torch.equal(_bits_of(out[0][0]), _bits_of(y)), (dtype, which)
    finally:
        sparseops.set_isa(prev)


def test_fused_non_contiguous_input_and_autograd(isa):
    for name, kw in (("leaky_relu", {"negative_slope": 0.1}), ("tanh", {}), ("hardswish", {}), ("sigmoid", {}),
                     ("silu", {}), ("elu", {"alpha": 0.5}), ("softplus", {"beta": 1.5}), ("logsigmoid", {})):
        x = (torch.randn(64, 40) * 3)[:, ::2].t()  # non-contiguous [20, 64]
        x.requires_grad_(True)
        ref = x.detach().clone().requires_grad_(True)
        y = fewbit.activation(x, name, None, **kw)
        _assert_forward(name, y, ref.detach(), **kw)
        gy = torch.randn(y.shape)
        y.backward(gy)
        if name == "leaky_relu":  # exact table: torch's own gradient
            fewbit.activation_fn(name, **kw)(ref).backward(gy)
            assert torch.equal(x.grad, ref.grad)
        else:
            borders, levels = _table(name, 2, **kw)
            assert torch.equal(x.grad, gy * levels[reference.fewbit_codes(ref.detach(), borders)])


def test_fused_is_used_by_modules_and_not_under_no_grad(isa, monkeypatch):
    calls = []
    real = _C.fewbit_pack_fused
    monkeypatch.setattr(_C, "fewbit_pack_fused", lambda *a: calls.append(a[4] is not None) or real(*a))
    x = torch.randn(100, requires_grad=True)
    sparseops.nn.FewBitReLU()(x).sum().backward()
    assert calls == [True]
    with torch.no_grad():
        sparseops.nn.FewBitReLU()(x)
    assert calls == [True], "no gradient: the forward is torch's alone, nothing is packed"
    # tanh's forward is the kernel's own, so it is used without a gradient too, without codes
    with torch.no_grad():
        y = sparseops.nn.FewBitTanh(bits=2)(x)
    assert calls == [True, False]
    _assert_within_bound("tanh", y, x.detach())
    sparseops.nn.FewBitTanh(bits=2)(x).sum().backward()
    assert calls == [True, False, True]
    with torch.no_grad():  # likewise sigmoid's
        y = sparseops.nn.FewBitSigmoid(bits=2)(x)
    assert calls == [True, False, True, False]
    _assert_within_bound("sigmoid", y, x.detach())
    with torch.no_grad():  # and silu's
        y = sparseops.nn.FewBitSiLU(bits=2)(x)
    assert calls == [True, False, True, False, False]
    _assert_within_bound("silu", y, x.detach())


def test_binding_fused_refuses_bad_arguments(isa):
    x = np.random.randn(100).astype(np.float32)
    y = np.empty_like(x)
    b = np.array([-1.0, 0.0, 1.0], dtype=np.float32)
    c = np.zeros(8, dtype=np.int32)
    with pytest.raises(ValueError, match="kind"):
        _C.fewbit_pack_fused(x, "float32", b, 2, c, "gelu", 0.0, 0.0, y, 1)
    # celu divides by alpha and softplus by beta: both must be finite and positive
    for kind, a in (("celu", 0.0), ("celu", -1.0), ("softplus", 0.0), ("softplus", -2.0), ("softplus", float("inf"))):
        with pytest.raises(ValueError, match="a: expected a finite number >= "):
            _C.fewbit_pack_fused(x, "float32", b, 2, c, kind, a, 20.0, y, 1)
    with pytest.raises(ValueError, match="codes"):
        _C.fewbit_pack_fused(x, "float32", b, 2, np.zeros(7, dtype=np.int32), "tanh", 0.0, 0.0, y, 1)
    with pytest.raises(TypeError, match="codes"):
        _C.fewbit_pack_fused(x, "float32", b, 2, [0] * 8, "tanh", 0.0, 0.0, y, 1)
    with pytest.raises(ValueError, match="y"):
        _C.fewbit_pack_fused(x, "float32", b, 2, c, "tanh", 0.0, 0.0, y[:99], 1)
    # outputs may not overlap anything but y == x
    buf = np.zeros(200, dtype=np.float32)
    with pytest.raises(ValueError, match="shares memory"):
        _C.fewbit_pack_fused(buf[:100], "float32", b, 2, c, "tanh", 0.0, 0.0, buf[50:150], 1)
    with pytest.raises(ValueError, match="shares memory"):
        _C.fewbit_pack_fused(x, "float32", b, 2, y[:8].view(np.int32), "tanh", 0.0, 0.0, y, 1)
    before = y.copy()
    with pytest.raises(ValueError):
        _C.fewbit_pack_fused(x, "float32", np.array([1, 0, 2], dtype=np.float32), 2, c, "tanh", 0.0, 0.0, y, 1)
    assert (np.isnan(y) == np.isnan(before)).all() and (y[~np.isnan(y)] == before[~np.isnan(before)]).all()
    # in place (y is x) is allowed: each element is read before it is written
    z = x.copy()
    _C.fewbit_pack_fused(z, "float32", b, 2, c, "tanh", 0.0, 0.0, z, 1)
    _assert_within_bound("tanh", torch.from_numpy(z), torch.from_numpy(x))


def test_fused_op_opcheck_and_compile_match_eager():
    x = torch.randn(7, 37) * 3
    for kind, a, b in (("tanh", 0.0, 0.0), ("hardswish", 0.0, 0.0), ("hardsigmoid", 0.0, 0.0), ("clamp", -1.0, 2.0),
                       ("leaky", 0.1, 0.0), ("sigmoid", 0.0, 0.0), ("elu", 1.2, 1.1), ("celu", 0.8, 0.0),
                       ("softplus", 2.0, 10.0), ("softplus", 1.0, 1.0), ("logsigmoid", 0.0, 0.0), ("silu", 0.0, 0.0)):
        borders = torch.tensor([-1.0, 0.0, 1.0])
        for codes in (True, False):
            torch.library.opcheck(torch.ops.sparseops.fewbit_fused, (x, borders, 2, kind, a, b, codes))
    m = nn.Sequential(nn.Linear(37, 16), sparseops.nn.FewBitTanh(bits=2), nn.Linear(16, 8), sparseops.nn.FewBitHardswish(bits=3),
                      nn.Linear(8, 3), sparseops.nn.FewBitSigmoid(bits=2))
    compiled = torch.compile(m, fullgraph=True, backend="aot_eager")
    outs = []
    for mod in (m, compiled):
        mod.zero_grad()
        y = mod(x)
        y.square().sum().backward()
        outs.append((y.detach(), [p.grad.clone() for p in mod.parameters()]))
    assert torch.equal(outs[0][0], outs[1][0])
    for ga, gb in zip(outs[0][1], outs[1][1]):
        assert_close_rms(ga, gb.double(), torch.float32, name="grad compiled vs eager")
    with torch.no_grad():
        assert torch.equal(torch.compile(m, fullgraph=True)(x), m(x))
    # tanh, sigmoid and silu: the compiled module runs the kernel's own forward too, with and without a
    # gradient (a sample where torch's own forward differs from it, so a fall-back to torch shows)
    big = torch.randn(20000) * 3
    for mod, f in ((sparseops.nn.FewBitTanh(bits=2), torch.tanh), (sparseops.nn.FewBitSigmoid(bits=2), torch.sigmoid),
                   (sparseops.nn.FewBitSiLU(bits=2), F.silu)):
        compiled = torch.compile(mod, fullgraph=True, backend="aot_eager")
        for req in (False, True):
            xb = big.clone().requires_grad_(req)
            y = mod(xb)
            assert not torch.equal(y, f(xb))
            assert torch.equal(compiled(xb), y)


def test_convert_filters_before_it_looks_and_names_the_module_it_refuses():
    model = nn.Sequential(nn.Linear(4, 4), nn.GELU(), nn.Softplus(beta=0))
    fewbit.convert_(model, 2, filter_fn=lambda m, name: isinstance(m, nn.GELU))  # the softplus is left alone
    assert isinstance(model[1], sparseops.nn.FewBitGELU) and isinstance(model[2], nn.Softplus)
    model = nn.Sequential(nn.Linear(4, 4), nn.GELU(), nn.Softplus(beta=0))
    with pytest.raises(ValueError, match=r"^model: module '2' \(Softplus\): beta must be non-zero"):
        fewbit.convert_(model, 2)
    assert isinstance(model[1], nn.GELU)  # nothing swapped


# ---- double backward, meta-device builds, reused instances, parameter errors (review, 2026-11-24) ----


def _penalty_grads(act, first=None, dtype=torch.float64):
    # a gradient penalty (WGAN-GP style): differentiates the input gradient once more
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(3, 8) if first is None else first(), act, nn.Linear(8, 2)).to(dtype)
    x = torch.randn(5, 3, dtype=dtype, requires_grad=True)
    gx, = torch.autograd.grad(net(x).sum(), x, create_graph=True)
    ((gx.norm(dim=1) - 1) ** 2).mean().backward()
    return [p.grad for p in net.parameters()]


@pytest.mark.parametrize("name,torch_mod", [("relu", nn.ReLU()), ("leaky_relu", nn.LeakyReLU(0.25)),
                                            ("relu6", nn.ReLU6()), ("hardtanh", nn.Hardtanh(-0.5, 0.5))])
def test_fewbit_double_backward_equals_torch_for_piecewise_linear(isa, name, torch_mod):
    # the exact tables make the penalty's parameter gradients torch's (the first layer's bias has no
    # path to the input gradient through a piecewise-constant derivative: torch gives 0, we None)
    few = fewbit.convert_(nn.Sequential(torch_mod))[0]
    assert few.name == name
    expect = _penalty_grads(torch_mod)
    got = _penalty_grads(few)
    for e, g in zip(expect, got):
        if g is None:
            assert e is None or not e.any()
        else:
            torch.testing.assert_close(g, e, rtol=1e-6, atol=1e-12)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_fewbit_double_backward_of_a_smooth_activation_uses_the_table(isa, dtype):
    # the first backward is dy * q(x), linear in dy and piecewise constant in x: its own gradient is the
    # same product. A pure-torch twin with that first backward (value f(x), derivative q(x), second 0):
    act = sparseops.nn.FewBitGELU(bits=2)

    class Twin(nn.Module):
        def forward(self, h):
            q = act.levels.to(h.dtype)[reference.fewbit_codes(h.detach(), act.borders)]
            return F.gelu(h).detach() + (h - h.detach()) * q

    got = _penalty_grads(act, dtype=dtype)
    expect = _penalty_grads(Twin(), dtype=dtype)
    assert got[0] is not None and got[2] is not None, "the penalty must reach both weights"
    for e, g in zip(expect, got):
        if g is not None:
            torch.testing.assert_close(g, e, rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("make", [
    lambda: sparseops.SparseLinear(3, 8, sparsity=0.5),
    lambda: sparseops.SparseLinear.from_dense(nn.Linear(4, 8), pattern="2:4"),
    lambda: sparseops.SparseLinear.from_dense(nn.Linear(3, 8), pattern=sparseops.FanIn(k=2)),
    lambda: sparseops.SparseLinear.from_dense(nn.Linear(16, 16), pattern=sparseops.Block(8), sparsity=0.5),
    lambda: sparseops.nn.MonarchLinear.from_dense(nn.Linear(16, 16), nblocks=4),
    lambda: sparseops.ActivationSparseLinear(3, 8, mode="relu"),
    lambda: sparseops.SparseLinear(3, 8, sparsity=0.5, activation="gelu", act_bits=2),
], ids=["csr", "nm", "fanin", "block", "monarch", "act", "fused"])
@pytest.mark.parametrize("last", [False, True], ids=["inner", "last"])
def test_sparse_layers_refuse_double_backward_loudly(make, last):
    # their backward runs kernels with no graph: a second derivative through them would silently miss
    # terms, so it raises instead. "last": the layer's incoming gradient needs none (a critic's last layer
    # under a gradient penalty), where torch's once_differentiable raised nothing and the penalty's
    # gradient silently missed the layer's weights (review, 2026-11-24)
    layer = make()
    inner = nn.Linear(layer.in_features, layer.in_features)
    tail = [] if last else [nn.Tanh(), nn.Linear(layer.out_features, 1)]
    net = nn.Sequential(inner, nn.Tanh(), layer, *tail)
    x = torch.randn(5, layer.in_features, requires_grad=True)
    gx, = torch.autograd.grad(net(x).sum(), x, create_graph=True)
    with pytest.raises(RuntimeError, match="cannot be differentiated again"):
        gx.pow(2).sum().backward()
    # a plain backward is unaffected
    net(x).sum().backward()
    assert all(p.grad is not None for p in layer.parameters())


def test_fewbit_tables_survive_a_meta_build_and_to_empty():
    with torch.device("meta"):
        model = nn.Sequential(nn.Linear(4, 4), nn.GELU(), nn.LeakyReLU(0.2))
    fewbit.convert_(model, bits=3)
    model.to_empty(device="cpu")
    for got, ref in ((model[1], sparseops.nn.FewBitGELU(bits=3)), (model[2], sparseops.nn.FewBitLeakyReLU(0.2))):
        assert torch.equal(got.borders, ref.borders) and torch.equal(got.levels, ref.levels)
    layer = sparseops.SparseLinear(8, 8, sparsity=0.5, activation="gelu", act_bits=2)
    borders, levels = layer.act_borders_bits.clone(), layer.act_levels_bits.clone()
    layer.to("meta").to_empty(device="cpu")
    assert torch.equal(layer.act_borders_bits, borders) and torch.equal(layer.act_levels_bits, levels)


def test_convert_swaps_every_slot_of_a_reused_instance():
    act = nn.ReLU()
    inner = nn.Sequential(nn.Linear(3, 3), act)
    model = nn.Sequential(nn.Linear(3, 3), act, nn.Linear(3, 3), act, inner)
    fewbit.convert_(model)
    assert type(model[1]) is sparseops.nn.FewBitReLU
    assert model[3] is model[1] and inner[1] is model[1], "one instance stays one (shared) module"


@pytest.mark.parametrize("make,arg", [
    (lambda: sparseops.nn.FewBitELU(alpha="1.5"), "alpha"),
    (lambda: sparseops.nn.FewBitSoftplus(beta=None), "beta"),
    (lambda: sparseops.nn.FewBitLeakyReLU(negative_slope=torch.tensor([0.1, 0.2])), "negative_slope"),
    (lambda: sparseops.nn.FewBitHardtanh(min_val=[0]), "min_val"),
    (lambda: fewbit.gelu(torch.randn(3, requires_grad=True), approximate=["tanh"]), "approximate"),
    (lambda: fewbit.elu(torch.randn(3, requires_grad=True), alpha=[1.0]), "alpha"),
])
def test_bad_activation_parameters_name_the_argument(make, arg):
    with pytest.raises((TypeError, ValueError), match=arg):
        make()


def test_approximation_error_over_a_huge_range_stays_small_in_memory():
    from sparseops.fewbit.table import approximation_error

    t = fewbit.get_table("tanh", 2)
    wide = approximation_error("tanh", t.borders, t.levels, lo=-1e8, hi=1e8)
    narrow = approximation_error("tanh", t.borders, t.levels, lo=-10.0, hi=10.0)
    assert wide[1] >= narrow[1] > 0


_LAYOUTS = {  # (values scaled by 3 first: an op on the view would give a fresh dense tensor)
    "channels_last": lambda: (torch.randn(2, 3, 5, 7) * 3).to(memory_format=torch.channels_last),
    "transposed": lambda: (torch.randn(6, 37) * 3).t(),
    "permuted3d": lambda: (torch.randn(4, 5, 6) * 3).permute(2, 0, 1),
    "gapped": lambda: (torch.randn(4, 66) * 3)[:, ::2],  # not dense: a row-major copy, as torch's output is
    "channels_last_slice": lambda: (torch.randn(2, 6, 5, 7) * 3).to(memory_format=torch.channels_last)[:, :3],
    "transposed_slice": lambda: (torch.randn(9, 37) * 3).t()[:, 1:7],
    "expanded": lambda: (torch.randn(1, 7) * 3).expand(5, 7),  # overlapping: row-major, as torch's output
}


@pytest.mark.parametrize("layout", sorted(_LAYOUTS))
@pytest.mark.parametrize("name,bits", [("relu", 1), ("leaky_relu", 1), ("hardswish", 2), ("tanh", 2), ("silu", 3),
                                       ("gelu", 2), ("mish", 4)])
def test_fewbit_keeps_the_input_layout_like_torch(isa, name, bits, layout):
    # a dense input (channels_last, a transpose) gives an output and an input gradient with torch's
    # strides, with the values of the row-major case: no layout conversion for the next conv to pay
    x0 = _LAYOUTS[layout]()
    x = x0.detach().clone(memory_format=torch.preserve_format).requires_grad_(True)
    if "slice" in layout or layout == "expanded":  # keep the view itself (clone would make it dense)
        x = x0.detach().requires_grad_(True)
    assert x.stride() == x0.stride() or layout == "gapped"
    xc = x0.detach().contiguous().requires_grad_(True)
    torch_y = fewbit.activation_fn(name)(x0)
    y = fewbit.activation(x, name, bits)
    yc = fewbit.activation(xc, name, bits)
    with torch.no_grad():
        y_nograd = fewbit.activation(x, name, bits)
    assert y.stride() == torch_y.stride() and y_nograd.stride() == torch_y.stride()
    if name in ("relu", "leaky_relu", "hardswish", "gelu", "mish"):  # torch's forward on x as it is
        assert torch.equal(y, fewbit.activation_fn(name)(x.detach()))
    else:  # the kernel's own value, which does not depend on the layout
        assert torch.equal(y, yc)
    assert torch.equal(y_nograd, y)
    gy = torch.randn(y.shape).to(memory_format=torch.channels_last) if layout == "channels_last" else \
        torch.randn(y.shape)
    y.backward(gy)
    yc.backward(gy.contiguous())
    assert torch.equal(x.grad, xc.grad)
    borders, levels = _table(name, bits)
    assert torch.equal(x.grad, gy * levels[reference.fewbit_codes(x0.detach(), borders)])
    if layout not in ("gapped", "expanded") and "slice" not in layout:
        assert x.grad.stride() == x.stride(), "the gradient keeps the input's layout, as torch's does"


def test_fewbit_channels_last_double_backward_and_compile(isa):
    act = sparseops.nn.FewBitLeakyReLU(0.2)
    x = torch.randn(2, 4, 3, 3).to(memory_format=torch.channels_last).requires_grad_(True)
    ref = x.detach().clone(memory_format=torch.preserve_format).requires_grad_(True)
    g, = torch.autograd.grad((act(x) ** 2).sum(), x, create_graph=True)
    gr, = torch.autograd.grad((F.leaky_relu(ref, 0.2) ** 2).sum(), ref, create_graph=True)
    torch.testing.assert_close(g, gr, rtol=1e-6, atol=0)
    torch.testing.assert_close(torch.autograd.grad(g.sum(), x)[0], torch.autograd.grad(gr.sum(), ref)[0])
    torch._dynamo.reset()  # (a fresh recompile budget for the shared Sequential code object)
    net = nn.Sequential(nn.Conv2d(4, 4, 1), sparseops.nn.FewBitGELU(bits=2)).to(memory_format=torch.channels_last)
    compiled = torch.compile(net, fullgraph=True, backend="aot_eager")
    torch.testing.assert_close(compiled(x.detach()), net(x.detach()))


def test_functional_first_called_under_inference_mode_then_trains():
    # the functional API caches its table tensors: made by a first call under inference_mode they were
    # inference tensors, and every later training call raised "Inference tensors cannot be saved for
    # backward" (a validation loop before training does this; review, 2026-11-24)
    from sparseops.fewbit import functional

    functional._cached.cache_clear()
    with torch.inference_mode():
        fewbit.elu(torch.randn(5), alpha=0.37)
    x = torch.randn(5, dtype=torch.float64, requires_grad=True)
    fewbit.elu(x, alpha=0.37).sum().backward()
    t = fewbit.get_table("elu", 2, alpha=0.37)
    q = torch.tensor(t.levels, dtype=torch.float32).double()[reference.fewbit_codes(x.detach(), torch.tensor(t.borders))]
    torch.testing.assert_close(x.grad, q, rtol=0, atol=0)


@pytest.mark.parametrize("name,params", [("gelu", {}), ("gelu", {"approximate": "tanh"}), ("elu", {"alpha": 0.5}),
                                         ("softplus", {"beta": 2.0, "threshold": 10.0}), ("relu6", {})])
def test_functional_compiles_fullgraph(name, params):
    # the functional API traced: dynamo reads the table through a constant-result call instead of the
    # lru_cache (it failed on the table module's import before, eager warm-up or not; review, 2026-11-24)
    torch._dynamo.reset()
    x = torch.randn(4, 8, requires_grad=True)
    f = torch.compile(lambda t: fewbit.activation(t, name, None, **params), fullgraph=True, backend="aot_eager")
    y = f(x)
    (g,) = torch.autograd.grad(y.sum(), x)
    x2 = x.detach().clone().requires_grad_()
    y2 = fewbit.activation(x2, name, None, **params)
    (g2,) = torch.autograd.grad(y2.sum(), x2)
    assert torch.equal(y, y2) and torch.equal(g, g2)


# ---- convert_ on real models (review, 2026-11-24) ----


@pytest.mark.parametrize("act", ["relu", "gelu"])
@pytest.mark.parametrize("layer", ["encoder", "decoder"])
def test_convert_transformer_layer_activation_function(act, layer):
    # nn.TransformerEncoderLayer(activation="gelu") holds F.gelu, a function: it was silently left
    torch.manual_seed(0)
    cls = nn.TransformerEncoderLayer if layer == "encoder" else nn.TransformerDecoderLayer
    m = cls(16, 2, 32, activation=act, dropout=0.0)
    keys = list(m.state_dict())
    x = torch.randn(3, 5, 16, requires_grad=True)
    args = (x,) if layer == "encoder" else (x, torch.randn(4, 5, 16))
    want = m(*args)
    fewbit.convert_(m, bits=2)
    assert type(m.activation).__name__ == ("FewBitReLU" if act == "relu" else "FewBitGELU")
    assert list(m.state_dict()) == keys  # checkpoints stay loadable both ways
    got = m(*args)
    assert torch.equal(got, want)
    got.sum().backward()
    assert x.grad is not None


def test_convert_transformers_activations():
    transformers = pytest.importorskip("transformers")
    from transformers.activations import ACT2FN

    for key, twin in [("gelu", "FewBitGELU"), ("gelu_pytorch_tanh", "FewBitGELU"), ("silu", "FewBitSiLU")]:
        seq = nn.Sequential(nn.Linear(4, 4), ACT2FN[key])
        x = torch.randn(5, 4)
        want = seq(x)
        fewbit.convert_(seq)
        assert type(seq[1]).__name__ == twin, key
        if key != "silu":  # the few-bit silu's forward is the fused kernel's own (within its bound, FLOAT32_BOUND)
            assert torch.equal(seq(x), want), key
    seq = nn.Sequential(ACT2FN["gelu_new"])  # its own python formula: other bits than torch's tanh GELU
    with pytest.warns(UserWarning, match=r"left 1 activation\(s\) with no few-bit twin as they are \(0 \(NewGELUActivation\)\)"):
        fewbit.convert_(seq)
    assert type(seq[0]).__name__ == "NewGELUActivation"


def test_convert_names_what_it_leaves_and_when_it_converts_nothing():
    model = nn.Sequential(nn.Linear(4, 4), nn.PReLU(), nn.GELU())
    with pytest.warns(UserWarning, match=r"left 1 activation\(s\) with no few-bit twin as they are \(1 \(PReLU\)\)"):
        fewbit.convert_(model)
    assert isinstance(model[2], sparseops.nn.FewBitGELU)
    with pytest.warns(UserWarning, match="found no activation to convert: nothing is swapped"):
        fewbit.convert_(nn.Sequential(nn.Linear(4, 4)))
    # filter_fn is called as sparsify_'s: filter_fn(module, fqn); the other order accepts nothing, and says so
    model = nn.Sequential(nn.GELU())
    with pytest.warns(UserWarning, match=r"filter_fn accepts \(it is called as filter_fn\(module, fqn\)\)"):
        fewbit.convert_(model, filter_fn=lambda fqn, mod: isinstance(mod, nn.GELU))
    fewbit.convert_(model, filter_fn=lambda mod, fqn: isinstance(mod, nn.GELU) and fqn == "0")
    assert isinstance(model[0], sparseops.nn.FewBitGELU)


def test_convert_keeps_the_mode():
    model = nn.Sequential(nn.GELU(), nn.ReLU()).eval()
    fewbit.convert_(model)
    assert not any(m.training for m in model)


def test_set_table_installs_a_calibrated_table_that_survives_moves():
    # docs/fewbit.md builds a table from a histogram of the activations; writing it into the buffers was
    # undone by the next .to() / .float() (review, 2026-11-24): set_table_ keeps it
    from sparseops.fewbit.table import optimal_table

    g = torch.Generator().manual_seed(0)
    acts = (torch.randn(20000, generator=g) * 0.5 + 1.0).numpy()
    hist, _ = np.histogram(acts, bins=4096, range=(-10.0, 10.0))
    borders, levels = optimal_table("gelu", bits=2, weight=hist)
    act = sparseops.nn.FewBitGELU(bits=2).set_table_(borders, levels)
    act.float().to(torch.float64).to("cpu")
    want_b = torch.as_tensor(borders).float()
    assert torch.equal(act.borders, want_b)
    assert not torch.equal(act.borders, sparseops.nn.FewBitGELU(bits=2).borders)
    x = torch.randn(64, dtype=torch.float64, requires_grad=True)
    y = act(x)
    torch.testing.assert_close(y, F.gelu(x), rtol=0, atol=0)
    y.sum().backward()
    q = torch.as_tensor(levels).float().double()[reference.fewbit_codes(x.detach(), want_b)]
    torch.testing.assert_close(x.grad, q, rtol=0, atol=0)
    # a bad table is refused and changes nothing
    for bad, exc in [((borders[:-1], levels), ValueError), ((torch.as_tensor(borders).flip(0), levels), ValueError),
                     ((borders, [float("nan")] * 4), ValueError), (("ab", levels), TypeError)]:
        with pytest.raises(exc):
            act.set_table_(*bad)
        assert torch.equal(act.borders, want_b)
