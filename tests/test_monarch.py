"""MonarchLinear, its hand-written backward and the Monarch projection, against fp64 dense references."""

import copy
import math

import pytest
import torch
from helpers import assert_close_rms
from torch import nn

import sparseops
from sparseops import MonarchLinear
from sparseops.nn.monarch import MonarchFunction, monarch_linear, monarch_project, monarch_sizes
from sparseops.reference import monarch_dense, monarch_forward


def _case(lead, in_f, out_f, nblocks, bias=True):
    tag = "x".join(map(str, lead))
    return pytest.param(
        lead, in_f, out_f, nblocks, bias, id=f"lead{tag}-in{in_f}-out{out_f}-k{nblocks}" + ("" if bias else "-nobias")
    )


LAYER_CASES = [
    _case((5,), 37, 100, 4),
    _case((5,), 100, 37, 4),
    _case((1,), 37, 100, 4),
    _case((3,), 64, 64, 1),
    _case((3,), 64, 64, 2),
    _case((3,), 64, 64, 4),
    _case((3,), 64, 64, 8),
    _case((2, 3), 64, 64, 4),
    # m = 10 is not a multiple of k = 3: the general middle permutation
    _case((7,), 30, 50, 3),
    # m = 4 < k = 16: block pairs without a path
    _case((4,), 64, 64, 16),
    _case((9,), 37, 37, 4, bias=False),
    _case((2, 3), 5, 5, 5),
    _case((1, 1, 1), 3, 7, 1),
]


def _oracle(layer, x, g):
    """fp64 ``y`` and the gradients of ``(y * g).sum()`` through ``x @ monarch_dense(L, R)ᵀ + b``."""
    l64 = layer.blkdiag1.detach().double().requires_grad_()
    r64 = layer.blkdiag2.detach().double().requires_grad_()
    b64 = layer.bias.detach().double().requires_grad_() if layer.bias is not None else None
    x64 = x.detach().double().requires_grad_()
    w = monarch_dense(l64, r64, layer.in_features, layer.out_features)  # [out, in]
    y = x64 @ w.T
    if b64 is not None:
        y = y + b64
    (y * g.double()).sum().backward()
    return y, x64.grad, l64.grad, r64.grad, None if b64 is None else b64.grad


def _check_layer(layer, x, g, dtype=torch.float32):
    y = layer(x)
    (y * g).sum().backward()
    y64, dx, dl, dr, db = _oracle(layer, x, g)
    assert_close_rms(y, y64, dtype, name="y")
    assert_close_rms(x.grad, dx, dtype, name="dx")
    assert_close_rms(layer.blkdiag1.grad, dl, dtype, name="dblkdiag1")
    assert_close_rms(layer.blkdiag2.grad, dr, dtype, name="dblkdiag2")
    if layer.bias is not None:
        assert_close_rms(layer.bias.grad, db, dtype, name="dbias")


# ---- forward and backward ----


@pytest.mark.parametrize("lead,in_f,out_f,nblocks,bias", LAYER_CASES)
def test_monarch_linear_matches_fp64_dense(lead, in_f, out_f, nblocks, bias):
    layer = MonarchLinear(in_f, out_f, nblocks, bias=bias)
    x = torch.randn(*lead, in_f, requires_grad=True)
    g = torch.randn(*lead, out_f)  # upstream gradient
    _check_layer(layer, x, g)


@pytest.mark.parametrize("in_f,out_f,nblocks", [(37, 100, 4), (30, 50, 3)], ids=["in37-out100-k4", "in30-out50-k3"])
def test_monarch_linear_float64(in_f, out_f, nblocks):
    layer = MonarchLinear(in_f, out_f, nblocks, dtype=torch.float64)
    x = torch.randn(2, 3, in_f, dtype=torch.float64, requires_grad=True)
    _check_layer(layer, x, torch.randn(2, 3, out_f, dtype=torch.float64), torch.float64)


@pytest.mark.parametrize(
    "make_x",
    [
        pytest.param(lambda: torch.randn(6, 2 * 37)[:, ::2], id="strided-last-dim"),
        pytest.param(lambda: torch.randn(37, 6).T, id="transposed"),
        pytest.param(lambda: torch.randn(3, 4, 37).transpose(0, 1), id="transposed-lead"),
        pytest.param(lambda: torch.randn(1, 37).expand(5, 37), id="expanded"),
    ],
)
def test_monarch_linear_non_contiguous_x(make_x):
    layer = MonarchLinear(37, 100, 4)
    x = make_x()
    assert not x.is_contiguous()
    x.requires_grad_()
    _check_layer(layer, x, torch.randn(*x.shape[:-1], 100))


def test_monarch_linear_backward_of_sum():
    """``y.sum()`` hands the backward a broadcast dy (stride 0)."""
    layer = MonarchLinear(37, 100, 4)
    x = torch.randn(17, 37, requires_grad=True)
    _check_layer(layer, x, torch.ones(17, 100))
    layer.zero_grad()
    x2 = x.detach().clone().requires_grad_()
    layer(x2).sum().backward()
    assert_close_rms(x2.grad, x.grad, torch.float32, name="dx of sum")


@pytest.mark.parametrize(
    "in_f,out_f,nblocks", [(7, 10, 2), (10, 7, 3), (9, 9, 3)], ids=["in7-out10-k2", "in10-out7-k3", "in9-out9-k3"]
)
def test_monarch_function_gradcheck(in_f, out_f, nblocks):
    layer = MonarchLinear(in_f, out_f, nblocks, dtype=torch.float64)
    x = torch.randn(2, 3, in_f, dtype=torch.float64, requires_grad=True)
    params = [t.detach().clone().requires_grad_() for t in (layer.blkdiag1, layer.blkdiag2, layer.bias)]
    assert torch.autograd.gradcheck(lambda x, l, r, b: monarch_linear(x, l, r, b, out_f), (x, *params))


def test_monarch_linear_only_needed_grads():
    layer = MonarchLinear(37, 100, 4)
    layer.blkdiag1.requires_grad_(False)
    x = torch.randn(3, 37, requires_grad=True)
    layer(x).sum().backward()
    assert layer.blkdiag1.grad is None
    assert x.grad is not None and layer.blkdiag2.grad is not None and layer.bias.grad is not None
    layer.blkdiag2.grad = None
    x = torch.randn(3, 37)
    layer.blkdiag2.requires_grad_(False)
    layer(x).sum().backward()
    assert layer.blkdiag2.grad is None and layer.bias.grad is not None


def test_monarch_function_saves_no_dense_weight():
    layer = MonarchLinear(64, 48, 4)
    x = torch.randn(5, 64, requires_grad=True)
    node = layer(x).grad_fn
    while type(node).__name__ != "MonarchFunctionBackward":
        node = node.next_functions[0][0]
    saved = [t.shape for t in node.saved_tensors]
    # the input, the permuted middle activation [k, B, m] and the two factors
    assert saved == [(5, 64), (4, 5, 12), (4, 12, 16), (4, 12, 12)], saved


def test_monarch_linear_empty_batch():
    layer = MonarchLinear(37, 100, 4)
    x = torch.randn(0, 37, requires_grad=True)
    y = layer(x)
    assert y.shape == (0, 100)
    y.sum().backward()
    assert x.grad.shape == (0, 37) and torch.equal(layer.blkdiag1.grad, torch.zeros_like(layer.blkdiag1))


# ---- the reference and the dense weight ----


@pytest.mark.parametrize("in_f,out_f,nblocks", [(37, 100, 4), (64, 64, 8), (30, 50, 3), (64, 64, 16)])
def test_monarch_forward_reference_matches_dense(in_f, out_f, nblocks):
    """The two references: reshapes and einsums, against explicit block diagonals and permutations."""
    layer = MonarchLinear(in_f, out_f, nblocks, dtype=torch.float64)
    x = torch.randn(2, 5, in_f, dtype=torch.float64)
    w = monarch_dense(layer.blkdiag1, layer.blkdiag2, in_f, out_f)
    y = monarch_forward(x, layer.blkdiag1, layer.blkdiag2, layer.bias, out_f)
    assert_close_rms(y, x @ w.T + layer.bias, torch.float64, name="monarch_forward")


def test_monarch_dense_weight_and_to_dense():
    layer = MonarchLinear(37, 100, 4)
    expected = monarch_dense(layer.blkdiag1.double(), layer.blkdiag2.double(), 37, 100)
    assert layer.weight.shape == (100, 37)
    assert_close_rms(layer.weight, expected, torch.float32, name="weight")
    assert_close_rms(layer.dense_weight(), expected, torch.float32, name="dense_weight")
    # differentiable in the factors
    layer.weight.sum().backward()
    assert layer.blkdiag1.grad is not None and layer.blkdiag2.grad is not None
    dense = layer.to_dense()
    assert isinstance(dense, nn.Linear) and (dense.in_features, dense.out_features) == (37, 100)
    assert torch.equal(dense.bias.detach(), layer.bias.detach())
    x = torch.randn(4, 37)
    assert_close_rms(dense(x), layer(x).double(), torch.float32, name="to_dense()(x)")
    assert MonarchLinear(8, 4, 2, bias=False).to_dense().bias is None


def test_monarch_sizes_and_cost():
    # the target: 4096 x 4096 with 4 blocks costs half of dense
    p, q, m = monarch_sizes(4096, 4096, 4)
    assert (p, q, m) == (1024, 1024, 1024)
    assert 4 * m * (p + q) * 2 == 4096 * 4096
    assert monarch_sizes(37, 100, 4) == (10, 25, 10)
    layer = MonarchLinear(37, 100, 4)
    assert layer.blkdiag1.shape == (4, 10, 10) and layer.blkdiag2.shape == (4, 25, 10)
    assert layer.num_weights == 4 * 10 * (10 + 25)


def test_monarch_linear_init_matches_nn_linear_scale():
    layer = MonarchLinear(256, 256, 4)
    var = layer.weight.detach().double().var().item()
    # nn.Linear: U(±1/sqrt(in)), variance 1/(3*in)
    assert 0.8 < var * 3 * 256 < 1.25, var * 3 * 256
    bound = 1 / math.sqrt(256)
    assert layer.bias.abs().max() <= bound


# ---- projection ----


SHAPES = [(37, 100, 4), (100, 37, 4), (64, 64, 1), (64, 64, 2), (64, 64, 4), (64, 64, 8), (30, 50, 3), (64, 64, 16)]
SHAPE_IDS = [f"in{i}-out{o}-k{k}" for i, o, k in SHAPES]


@pytest.mark.parametrize("in_f,out_f,nblocks", SHAPES, ids=SHAPE_IDS)
def test_monarch_from_dense_is_exact_on_monarch_weights(in_f, out_f, nblocks):
    layer = MonarchLinear(in_f, out_f, nblocks)
    linear = layer.to_dense()
    projected = MonarchLinear.from_dense(linear, nblocks)
    assert projected.blkdiag1.shape == layer.blkdiag1.shape and projected.blkdiag2.shape == layer.blkdiag2.shape
    expected = monarch_dense(layer.blkdiag1.double(), layer.blkdiag2.double(), in_f, out_f)
    assert_close_rms(projected.weight, expected, torch.float32, name="projected weight")
    assert torch.equal(projected.bias.detach(), layer.bias.detach())


def _slice_oracle(w, nblocks):
    """Per (input block i, output block l): the zero-padded slice's truncated SVD, rank by brute count."""
    out_f, in_f = w.shape
    k = nblocks
    p, q, m = -(-in_f // k), -(-out_f // k), min(-(-in_f // k), -(-out_f // k))
    wp = torch.zeros(k * q, k * p, dtype=torch.float64)
    wp[:out_f, :in_f] = w.double()
    result = torch.zeros_like(wp)
    for i in range(k):
        for l in range(k):
            c = sum(1 for f in range(k * m) if f // m == i and f % k == l)
            rows = torch.arange(q) * k + l
            block = wp[rows, i * p:(i + 1) * p]
            u, s, vh = torch.linalg.svd(block, full_matrices=False)
            result[rows, i * p:(i + 1) * p] = (u[:, :c] * s[:c]) @ vh[:c]
    return result[:out_f, :in_f]


@pytest.mark.parametrize("in_f,out_f,nblocks", SHAPES, ids=SHAPE_IDS)
def test_monarch_project_is_the_truncated_svd_per_block_pair(in_f, out_f, nblocks):
    w = torch.randn(out_f, in_f, dtype=torch.float64)
    l, r = monarch_project(w, nblocks)
    assert_close_rms(monarch_dense(l, r, in_f, out_f), _slice_oracle(w, nblocks), torch.float64, name="projection")


def test_monarch_project_square_case_is_rank_one_per_block_pair():
    """n = k²: the paper's setting, one middle entry per block pair."""
    w = torch.randn(64, 64, dtype=torch.float64)
    proj = monarch_dense(*monarch_project(w, 8), 64, 64)
    for i in range(8):
        for l in range(8):
            block = proj[l::8, i * 8:(i + 1) * 8]
            assert torch.linalg.matrix_rank(block) == 1


@pytest.mark.parametrize("in_f,out_f,nblocks", SHAPES, ids=SHAPE_IDS)
def test_monarch_from_dense_of_random_weight_is_a_fixed_point(in_f, out_f, nblocks):
    linear = nn.Linear(in_f, out_f)
    once = MonarchLinear.from_dense(linear, nblocks)
    twice = MonarchLinear.from_dense(once.to_dense(), nblocks)
    assert_close_rms(twice.weight, once.weight.double(), torch.float32, name="re-projected weight")


@pytest.mark.parametrize("in_f,out_f,nblocks", [(64, 64, 4), (37, 100, 4)], ids=["in64-out64-k4", "in37-out100-k4"])
def test_monarch_project_is_stationary(in_f, out_f, nblocks):
    """At the nearest Monarch point the gradient of ||W - M(L, R)||² in both factors vanishes."""
    w = torch.randn(out_f, in_f, dtype=torch.float64)
    l, r = (t.requires_grad_() for t in monarch_project(w, nblocks))
    (w - monarch_dense(l, r, in_f, out_f)).pow(2).sum().backward()
    scale = w.norm().item()
    assert l.grad.norm().item() < 1e-9 * scale and r.grad.norm().item() < 1e-9 * scale
    # and it beats nearby Monarch points
    best = (w - monarch_dense(l.detach(), r.detach(), in_f, out_f)).norm()
    for _ in range(5):
        dl, dr = 1e-3 * torch.randn_like(l), 1e-3 * torch.randn_like(r)
        near = monarch_dense(l.detach() + dl, r.detach() + dr, in_f, out_f)
        assert (w - near).norm() > best


def test_monarch_from_dense_device_dtype_and_no_bias():
    linear = nn.Linear(37, 100, bias=False, dtype=torch.float64)
    layer = MonarchLinear.from_dense(linear, nblocks=4)
    assert layer.bias is None
    assert layer.blkdiag1.dtype == layer.blkdiag2.dtype == torch.float64
    assert layer.nblocks == 4 and (layer.in_features, layer.out_features) == (37, 100)
    bf = MonarchLinear.from_dense(nn.Linear(16, 16, dtype=torch.bfloat16), nblocks=4)
    assert bf.blkdiag1.dtype == torch.bfloat16


# ---- training ----


def test_monarch_linear_learns_a_monarch_teacher():
    torch.manual_seed(0)
    teacher = MonarchLinear(32, 48, 4)
    student = MonarchLinear(32, 48, 4)
    opt = torch.optim.Adam(student.parameters(), lr=1e-2)
    x = torch.randn(256, 32)
    with torch.no_grad():
        target = teacher(x)
    losses = []
    for _ in range(150):
        opt.zero_grad()
        loss = (student(x) - target).pow(2).mean()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.02 * losses[0], (losses[0], losses[-1])


# ---- state_dict, moving, copying ----


def test_monarch_linear_state_dict_round_trip():
    a = MonarchLinear(37, 100, 4)
    sd = a.state_dict()
    assert set(sd) == {"blkdiag1", "blkdiag2", "bias"}
    b = MonarchLinear(37, 100, 4)
    b.load_state_dict(sd)
    x = torch.randn(5, 37, requires_grad=True)
    ya, yb = a(x), b(x)
    assert torch.equal(ya, yb)
    ga = torch.autograd.grad(ya.sum(), (x, a.blkdiag1, a.blkdiag2))
    gb = torch.autograd.grad(yb.sum(), (x, b.blkdiag1, b.blkdiag2))
    assert all(torch.equal(u, v) for u, v in zip(ga, gb))


def test_monarch_linear_load_state_dict_other_nblocks_fails():
    a = MonarchLinear(64, 64, 2)
    b = MonarchLinear(64, 64, 4)
    before = copy.deepcopy(b.state_dict())
    with pytest.raises(RuntimeError, match="nblocks=4"):
        b.load_state_dict(a.state_dict())
    for k, v in b.state_dict().items():
        assert torch.equal(v, before[k]), k


def test_monarch_linear_to_float64():
    layer = MonarchLinear(37, 100, 4)
    for moved in (copy.deepcopy(layer).to(dtype=torch.float64), copy.deepcopy(layer).double()):
        assert moved.blkdiag1.dtype == moved.blkdiag2.dtype == moved.bias.dtype == torch.float64
        x = torch.randn(2, 3, 37, dtype=torch.float64, requires_grad=True)
        _check_layer(moved, x, torch.randn(2, 3, 100, dtype=torch.float64), torch.float64)
    assert layer.to("cpu").blkdiag1.device.type == "cpu"


def test_monarch_linear_deepcopy():
    layer = MonarchLinear(37, 100, 4)
    twin = copy.deepcopy(layer)
    x = torch.randn(4, 37)
    assert torch.equal(twin(x), layer(x))
    with torch.no_grad():
        twin.blkdiag2.add_(1.0)
    assert not torch.equal(twin(x), layer(x))


def test_monarch_linear_extra_repr():
    text = repr(MonarchLinear(64, 64, 4))
    assert "in_features=64, out_features=64, nblocks=4, bias=True" in text
    assert "weights=2048 (0.5000 of dense)" in text


def test_monarch_linear_exports():
    assert sparseops.MonarchLinear is MonarchLinear is sparseops.nn.MonarchLinear
    assert "MonarchLinear" in sparseops.__all__ and "MonarchLinear" in sparseops.nn.__all__
    assert sparseops.reference.monarch_forward is monarch_forward
    assert issubclass(MonarchFunction, torch.autograd.Function)


# ---- torch.compile ----


def test_monarch_linear_compile_forward_backward_aot_eager():
    torch._dynamo.reset()
    model = nn.Sequential(MonarchLinear(37, 100, 4), nn.ReLU(), MonarchLinear(100, 24, 3))
    compiled = torch.compile(model, fullgraph=True, backend="aot_eager")
    x = torch.randn(2, 5, 37)
    results = []
    for m in (model, compiled):
        xr = x.clone().requires_grad_()
        y = m(xr)
        y.pow(2).sum().backward()
        results.append((y.detach(), xr.grad, *(p.grad.clone() for p in model.parameters())))
        model.zero_grad()
    for e, c in zip(*results):
        assert_close_rms(c, e.double(), torch.float32, name="compiled vs eager")
    torch._dynamo.reset()


def test_monarch_linear_compile_forward_inductor():
    # NOTE: inductor forward+backward of a two-layer model took 30 s on the 2-core CI machine;
    # forward of one layer keeps the inductor path covered at a fraction of that
    torch._dynamo.reset()
    layer = MonarchLinear(37, 100, 4)
    compiled = torch.compile(layer, fullgraph=True)
    x = torch.randn(2, 3, 37)
    with torch.no_grad():
        y = compiled(x)
    y64, *_ = _oracle(layer, x, torch.zeros(2, 3, 100))
    assert_close_rms(y, y64, torch.float32, name="y")
    torch._dynamo.reset()


# ---- bad input ----


@pytest.mark.parametrize(
    "args,kwargs,exc,name",
    [
        pytest.param((64, 64), {"nblocks": 0}, ValueError, "nblocks", id="nblocks0"),
        pytest.param((64, 8), {"nblocks": 9}, ValueError, "nblocks", id="nblocks-above-out"),
        pytest.param((3, 64), {"nblocks": 4}, ValueError, "nblocks", id="nblocks-above-in"),
        pytest.param((64, 64), {"nblocks": 4.0}, TypeError, "nblocks", id="nblocks-float"),
        pytest.param((64, 64), {"nblocks": True}, TypeError, "nblocks", id="nblocks-bool"),
        pytest.param(("64", 64), {}, TypeError, "in_features", id="in-str"),
        pytest.param((64, 64.0), {}, TypeError, "out_features", id="out-float"),
        pytest.param((0, 64), {}, ValueError, "in_features", id="in0"),
        pytest.param((64, -1), {}, ValueError, "out_features", id="out-negative"),
    ],
)
def test_monarch_linear_bad_constructor_arguments(args, kwargs, exc, name):
    with pytest.raises(exc, match=name):
        MonarchLinear(*args, **kwargs)


def test_monarch_linear_bad_x():
    layer = MonarchLinear(37, 100, 4)
    with pytest.raises(ValueError, match=r"x: .*in_features=37"):
        layer(torch.randn(5, 40))
    with pytest.raises(ValueError, match="x"):
        layer(torch.tensor(1.0))
    with pytest.raises(TypeError, match="x"):
        layer(torch.randn(5, 37, dtype=torch.float64))
    with pytest.raises(TypeError, match="x"):
        layer([[0.0] * 37])


def test_monarch_from_dense_bad_arguments():
    with pytest.raises(TypeError, match="linear"):
        MonarchLinear.from_dense(torch.randn(8, 8), 2)
    with pytest.raises(ValueError, match="nblocks"):
        MonarchLinear.from_dense(nn.Linear(8, 8), 9)
    with pytest.raises(TypeError, match="weight"):
        monarch_project(torch.ones(8, 8, dtype=torch.int64), 2)
    with pytest.raises(ValueError, match="weight"):
        monarch_project(torch.randn(8), 2)


def test_monarch_linear_functional_bad_arguments():
    layer = MonarchLinear(37, 100, 4)
    l, r, b = layer.blkdiag1, layer.blkdiag2, layer.bias
    x = torch.randn(3, 37)
    with pytest.raises(ValueError, match="blkdiag2"):
        monarch_linear(x, l, r[:, :, :5], b, 100)
    with pytest.raises(ValueError, match="blkdiag1"):
        monarch_linear(x, l[0], r, b, 100)
    with pytest.raises(TypeError, match="blkdiag2"):
        monarch_linear(x, l, r.double(), b, 100)
    with pytest.raises(ValueError, match="out_features"):
        monarch_linear(x, l, r, None, 101)
    with pytest.raises(ValueError, match="bias"):
        monarch_linear(x, l, r, b[:-1], 100)
    with pytest.raises(ValueError, match="x"):
        monarch_linear(torch.randn(3, 41), l, r, b, 100)
    # in <= k*p is padded: the functional takes 40 columns, out defaults to k*q
    assert monarch_linear(torch.randn(3, 40), l, r).shape == (3, 100)


@pytest.mark.parametrize("frozen", [False, True], ids=["trainable", "frozen"])
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
def test_monarch_from_dense_and_to_dense_keep_requires_grad_and_mode(frozen, training):
    """As SparseLinear: a frozen weight or bias stays frozen both ways, and train/eval carries over."""
    lin = nn.Linear(37, 45)
    lin.weight.requires_grad_(not frozen)
    lin.bias.requires_grad_(False)  # the bias on its own
    lin.train(training)
    m = MonarchLinear.from_dense(lin, 4)
    assert m.blkdiag1.requires_grad == m.blkdiag2.requires_grad == (not frozen)
    assert m.bias.requires_grad is False
    assert m.training == training
    d = m.to_dense()
    assert d.weight.requires_grad == (not frozen) and d.bias.requires_grad is False
    assert d.training == training
    m.blkdiag2.requires_grad_(True)  # one trainable factor: the dense weight still learns
    assert m.to_dense().weight.requires_grad
