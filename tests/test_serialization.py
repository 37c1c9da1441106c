"""Checkpoints of sparse models: state_dict (torch.save, weights_only) and safetensors round trips for
every pattern, loading into a fresh model sparsified the same way, into a dense model through densify_,
and refusals (another pattern or shape) that name the key and leave the model unchanged."""

import io
import json

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from torch import nn

import sparseops
from sparseops import (
    NM,
    ActivationSparseLinear,
    Block,
    Butterfly,
    FanIn,
    MonarchLinear,
    SparseLinear,
    calibrate_,
    densify_,
    load_safetensors,
    save_safetensors,
    sparsify_,
    sparsify_activations_,
)
from sparseops.checkpoint import ALIAS_KEY, EXTRA_KEY

D_IN, HIDDEN, D_OUT = 64, 64, 32


def _mlp(hidden=HIDDEN):
    return nn.Sequential(nn.Linear(D_IN, hidden), nn.GELU(), nn.Linear(hidden, D_OUT))


def _calibrated(model, mode):
    sparsify_activations_(model, 0.5, mode=mode)
    calibrate_(model, [torch.randn(16, D_IN)])
    return model


def _fused(model):
    return nn.Sequential(
        SparseLinear.from_dense(model[0], 0.7, activation="gelu", act_bits=2),
        SparseLinear.from_dense(model[2], 0.7),
    )


# name -> (what turns a dense MLP into the model, does it carry an activation sparsifier)
PATTERNS = {
    "csr": lambda m: sparsify_(m, 0.7),
    "2:4": lambda m: sparsify_(m, pattern="2:4"),
    "nm2:8T": lambda m: sparsify_(m, pattern=NM(2, 8, transposable=True)),
    "1:4": lambda m: sparsify_(m, pattern="1:4"),
    "2:8": lambda m: sparsify_(m, pattern="2:8"),
    "2:4T": lambda m: sparsify_(m, pattern=NM(2, 4, transposable=True)),
    "fanin8": lambda m: sparsify_(m, pattern=FanIn(8)),
    "block16": lambda m: sparsify_(m, 0.5, pattern=Block(16)),
    "block8": lambda m: sparsify_(m, 0.5, pattern=Block(8)),
    "butterfly": lambda m: sparsify_(m, pattern=Butterfly(4, 2, 8, shuffle=True)),
    "pixelfly-r4": lambda m: sparsify_(m, pattern=Butterfly(4, 2, 8, rank=4, shuffle=True)),
    "pixelfly-r8": lambda m: sparsify_(m, pattern=Butterfly(4, 2, 8, rank=8, shuffle=True)),
    "monarch4": lambda m: sparsify_(m, pattern="monarch:4"),
    "act-relu": lambda m: _calibrated(m, "relu"),
    "act-tensor": lambda m: _calibrated(m, "tensor"),
    "act-channel": lambda m: _calibrated(m, "channel"),
    "act-topk": lambda m: _calibrated(m, "topk"),
    "act-over-2:4": lambda m: _calibrated(sparsify_(m, pattern="2:4"), "tensor"),
    "fused-gelu-2bit": _fused,
    "fewbit-gelu": lambda m: sparseops.fewbit.convert_(sparsify_(m, 0.7), bits=2),
}
ROUND_TRIP = [p for p in PATTERNS if p not in ("block8", "pixelfly-r8", "1:4", "2:8", "2:4T")]


def _build(name, seed, hidden=HIDDEN):
    """The model of ``name`` from a dense MLP seeded with ``seed`` (different seeds: other weights and masks)."""
    torch.manual_seed(seed)
    return PATTERNS[name](_mlp(hidden))


def _x():
    return torch.randn(5, D_IN, generator=torch.Generator().manual_seed(123))


def _masks(model):
    return {n: m.mask for n, m in model.named_modules() if isinstance(m, SparseLinear)}


def _everything(model):
    """Every tensor and setting a load could touch: parameters, all buffers (the derived index too),
    extra state, and the identity of each Parameter (an optimizer holds them)."""
    out = {f"param:{n}": p.detach().clone() for n, p in model.named_parameters()}
    out.update({f"buffer:{n}": b.clone() for n, b in model.named_buffers()})
    out.update({f"extra:{n}": (m.mode, m.sparsity) for n, m in model.named_modules()
                if isinstance(m, ActivationSparseLinear)})
    out["ids"] = [id(p) for p in model.parameters()]
    return out


def _assert_same(a, b):
    assert a.keys() == b.keys()
    for k in a:
        if isinstance(a[k], torch.Tensor):
            assert a[k].dtype == b[k].dtype and a[k].shape == b[k].shape and torch.equal(a[k], b[k]), k
        else:
            assert a[k] == b[k], k


def _grads(model, x):
    model.zero_grad()
    model(x).square().sum().backward()
    return {n: p.grad.clone() for n, p in model.named_parameters()}


def _assert_loaded(src, dst):
    """dst now computes what src does: outputs, masks, every state_dict entry, and the gradients (which walk
    the derived transposed index that the load rebuilt)."""
    x = _x()
    assert torch.equal(dst(x), src(x))
    assert _masks(dst).keys() == _masks(src).keys()
    for n, m in _masks(src).items():
        assert torch.equal(_masks(dst)[n], m), n
    sd_src, sd_dst = src.state_dict(), dst.state_dict()
    assert sd_src.keys() == sd_dst.keys()
    for k, v in sd_src.items():
        if isinstance(v, torch.Tensor):
            assert v.dtype == sd_dst[k].dtype and torch.equal(v, sd_dst[k]), k
        else:
            assert v == sd_dst[k], k
    g_src, g_dst = _grads(src, x), _grads(dst, x)
    for n, g in g_src.items():
        assert torch.equal(g_dst[n], g), n


def _fresh_differs(src, dst):
    # the load must change something, or a round trip proves nothing
    x = _x()
    assert not torch.equal(src(x), dst(x))


# ---- round trips ----


@pytest.mark.parametrize("name", ROUND_TRIP)
def test_state_dict_torch_save_weights_only_round_trip(name):
    src = _build(name, 0)
    buf = io.BytesIO()
    torch.save(src.state_dict(), buf)
    buf.seek(0)
    state = torch.load(buf, weights_only=True)
    dst = _build(name, 1)
    _fresh_differs(src, dst)
    if name in ("csr", "2:4", "fanin8", "block16", "pixelfly-r4"):
        assert any(not torch.equal(_masks(dst)[n], m) for n, m in _masks(src).items()), "masks already equal"
    dst.load_state_dict(state)
    _assert_loaded(src, dst)


@pytest.mark.parametrize("name", ROUND_TRIP)
def test_save_load_safetensors_round_trip(name, tmp_path):
    src = _build(name, 0)
    path = tmp_path / "model.safetensors"
    save_safetensors(src, path, metadata={"note": "test"})
    dst = _build(name, 1)
    _fresh_differs(src, dst)
    result = load_safetensors(dst, path)
    assert not result.missing_keys and not result.unexpected_keys
    _assert_loaded(src, dst)
    with safe_open(str(path), framework="pt") as f:
        meta = f.metadata()
        keys = set(f.keys())
    assert meta["note"] == "test"
    # only the activation sparsifier's mode travels as metadata; everything else is a tensor
    extra = json.loads(meta.get(EXTRA_KEY, "{}"))
    n_act = sum(isinstance(m, ActivationSparseLinear) for m in src.modules())
    assert len(extra) == n_act
    assert all(v == {"mode": src.get_submodule(k.rsplit(".", 1)[0]).mode, "sparsity": 0.5} for k, v in extra.items())
    assert keys | set(extra) == set(src.state_dict())


@pytest.mark.parametrize("name", [p for p in ROUND_TRIP if not p.startswith("act-")])
def test_plain_save_file_works_without_activation_sparsity(name, tmp_path):
    # every weight pattern's state_dict is a flat dict of unshared contiguous tensors
    src = _build(name, 0)
    path = str(tmp_path / "plain.safetensors")
    save_file(src.state_dict(), path)
    dst = _build(name, 1)
    dst.load_state_dict(load_file(path))
    _assert_loaded(src, dst)


@pytest.mark.parametrize("mode", ["relu", "tensor", "channel", "topk"])
def test_plain_save_file_refuses_activation_sparse_state(mode, tmp_path):
    # why save_safetensors exists: the mode is non-tensor extra state and the weight is stored transposed
    model = _build(f"act-{mode}", 0)
    with pytest.raises((ValueError, TypeError), match="_extra_state"):
        save_file(model.state_dict(), str(tmp_path / "x.safetensors"))
    state = {k: v for k, v in model.state_dict().items() if isinstance(v, torch.Tensor)}
    with pytest.raises(ValueError, match="non contiguous"):
        save_file(state, str(tmp_path / "x.safetensors"))


def test_activation_mode_travels_with_the_checkpoint(tmp_path):
    src = _build("act-channel", 0)
    dst = _build("act-tensor", 1)
    assert dst[0].threshold.shape == ()
    save_safetensors(src, tmp_path / "m.safetensors")
    load_safetensors(dst, tmp_path / "m.safetensors")
    assert dst[0].mode == "channel" and dst[0].threshold.shape == (D_IN,)
    _assert_loaded(src, dst)


def test_save_safetensors_writes_tied_and_strided_tensors(tmp_path):
    # tied weights (one Parameter under two names) are written once and aliased; a transposed view contiguous
    model = nn.Sequential(nn.Linear(8, 8), nn.Linear(8, 8))
    model[1].weight = model[0].weight
    model[0].register_buffer("wt", torch.randn(8, 4).t())
    model[1].register_buffer("wt", model[0].wt[1:])
    save_safetensors(model, tmp_path / "tied.safetensors")
    with safe_open(str(tmp_path / "tied.safetensors"), framework="pt") as f:
        assert json.loads(f.metadata()[ALIAS_KEY]) == {"1.weight": "0.weight"}
    fresh = nn.Sequential(nn.Linear(8, 8), nn.Linear(8, 8))
    fresh[1].weight = fresh[0].weight
    fresh[0].register_buffer("wt", torch.zeros(4, 8))
    fresh[1].register_buffer("wt", torch.zeros(3, 8))
    load_safetensors(fresh, tmp_path / "tied.safetensors")
    for k, v in model.state_dict().items():
        assert torch.equal(fresh.state_dict()[k], v), k


def test_save_safetensors_refuses_bad_arguments(tmp_path):
    model = _build("csr", 0)
    with pytest.raises(TypeError, match="^model:"):
        save_safetensors(model.state_dict(), tmp_path / "x.safetensors")
    with pytest.raises(TypeError, match="^path:"):
        save_safetensors(model, 3)
    with pytest.raises(ValueError, match="^metadata:.*reserved"):
        save_safetensors(model, tmp_path / "x.safetensors", metadata={EXTRA_KEY: "{}"})
    with pytest.raises(TypeError, match="^metadata:"):
        save_safetensors(model, tmp_path / "x.safetensors", metadata={"a": 1})

    class Odd(nn.Module):
        def get_extra_state(self):
            return {"f": float("nan")}

        def set_extra_state(self, state):
            pass

    with pytest.raises(TypeError, match=r"^_extra_state: .*JSON"):
        save_safetensors(Odd(), tmp_path / "x.safetensors")
    assert not (tmp_path / "x.safetensors").exists()
    with pytest.raises(TypeError, match="^model:"):
        load_safetensors(None, tmp_path / "x.safetensors")


# ---- into a dense model ----


def _pre_activation_sparsity(name, seed):
    """What the model computed before its activation sparsifier (densify_ drops the sparsifier)."""
    torch.manual_seed(seed)
    m = _mlp()
    return sparsify_(m, pattern="2:4") if name == "act-over-2:4" else m


@pytest.mark.parametrize("name", ROUND_TRIP)
def test_sparse_checkpoint_into_dense_model_through_densify(name, tmp_path):
    src = _build(name, 0)
    save_safetensors(src, tmp_path / "sparse.safetensors")
    model = _build(name, 1)
    load_safetensors(model, tmp_path / "sparse.safetensors")
    x = _x()
    with torch.no_grad():
        sparse_out = model(x)
    densify_(model)
    kinds = (SparseLinear, MonarchLinear, ActivationSparseLinear)
    assert not any(isinstance(m, kinds) for m in model.modules())
    assert sum(type(m) is nn.Linear for m in model.modules()) == 2
    with torch.no_grad():
        dense_out = model(x)
        if name.startswith("act-"):
            expect = _pre_activation_sparsity(name, 0)(x)
        else:
            expect = sparse_out
    torch.testing.assert_close(dense_out, expect, rtol=1e-5, atol=1e-5)
    if name.startswith("act-"):
        # densified, the model is the one before activation sparsity: exactly its weights
        ref = _pre_activation_sparsity(name, 0)
        for k, v in densify_(ref).state_dict().items():
            assert torch.equal(model.state_dict()[k], v), k
    # where no activation was fused in, the dense state_dict is a plain MLP's: it loads into nn.Linear layers
    if name != "fused-gelu-2bit":
        plain = _mlp()
        plain.load_state_dict(model.state_dict())
        with torch.no_grad():
            torch.testing.assert_close(plain(x), dense_out, rtol=0, atol=0)


def test_densify_keeps_zeros_off_the_mask_and_the_devices():
    model = _build("2:4", 0).eval()
    masks = _masks(model)
    densify_(model)
    for n, mk in masks.items():
        w = model.get_submodule(n).weight
        assert not w[~mk].any() and w.dtype == torch.float32 and not model.get_submodule(n).training


def test_densify_bare_layer_and_fused_activation():
    layer = SparseLinear(16, 8, sparsity=0.5, activation="silu", act_bits=2)
    x = torch.randn(3, 16)
    dense = densify_(layer)
    assert isinstance(dense, nn.Sequential) and type(dense[1]) is nn.SiLU
    torch.testing.assert_close(dense(x), layer(x), rtol=1e-5, atol=1e-6)
    with pytest.raises(TypeError, match="^model:"):
        densify_(torch.randn(3))


# ---- refusals: another pattern or shape ----

MISMATCH = [
    pytest.param("2:4", "csr", r"0\.: idx, empty: the checkpoint holds an N:M index \(idx/empty\), this layer is unstructured",
                 id="2:4-into-csr"),
    pytest.param("csr", "2:4", r"0\.: crow, col, values: the checkpoint holds a CSR index .*this layer is 2:4", id="csr-into-2:4"),
    pytest.param("block16", "nm2:8T", r"0\.: crow, col, values: the checkpoint holds a block-sparse index with 16x16 blocks.*this layer "
                 r"is 2:8T", id="block-into-nm"),
    pytest.param("block16", "block8", r"16x16 blocks.*this layer is block8", id="block16-into-block8"),
    pytest.param("block16", "csr", r"16x16 blocks.*this layer is unstructured", id="block-into-csr"),
    pytest.param("monarch4", "csr", r"0\.: blkdiag1, blkdiag2: the checkpoint holds Monarch factors \(blkdiag1/blkdiag2\), this layer is "
                 r"unstructured", id="monarch-into-csr"),
    pytest.param("csr", "monarch4", r"0\.: the checkpoint holds a sparse or dense weight \(0\.values, 0\.crow, "
                 r"0\.col\), this layer is Monarch", id="csr-into-monarch"),
    pytest.param("2:4", "nm2:8T", r"0\.: the checkpoint's pattern \(0\.dense_shape\) is 2:4, this layer is 2:8T", id="2:4-into-2:8T"),
    # the checkpoint does not name its N:M pattern: slots of the same shape are told apart by their positions
    pytest.param("2:8", "1:4", r"0\.: the checkpoint's pattern \(0\.dense_shape\) is 2:8, this layer is 1:4", id="2:8-into-1:4"),
    pytest.param("1:4", "2:8", r"0\.: the checkpoint's pattern \(0\.dense_shape\) is 1:4, this layer is 2:8", id="1:4-into-2:8"),
    pytest.param("2:4", "2:4T", r"0\. \(2:4T\): mask: .*not transposable", id="2:4-into-2:4T"),
    pytest.param("2:4T", "2:4", None, id="2:4T-into-2:4-loads"),
    pytest.param("fanin8", "csr", None, id="fanin-into-csr-loads"),
    pytest.param("csr", "fanin8", r"0\. \(fanin8\): crow: the checkpoint's rows hold \[\d+, \d+", id="csr-into-fanin"),
    pytest.param("pixelfly-r4", "butterfly", r"0\.: lr_u/lr_v: the checkpoint has a low-rank term", id="pixelfly-into-butterfly"),
    pytest.param("pixelfly-r4", "pixelfly-r8", r"size mismatch for 0\.lr_u", id="rank4-into-rank8"),
    pytest.param("act-tensor", "act-over-2:4", r"0\.: the checkpoint holds a dense weight \(weight\), this layer wraps "
                 r"a SparseLinear", id="act-dense-into-act-sparse"),
    pytest.param("act-over-2:4", "act-tensor", r"0\.: the checkpoint holds a SparseLinear \(sparse\.\*\), this layer "
                 r"holds a dense weight", id="act-sparse-into-act-dense"),
    pytest.param("act-tensor", "csr", r"0\.: weight: the checkpoint holds a dense weight \(weight\), this layer is "
                 r"unstructured",
                 id="act-into-csr"),
]


def _optimizer_with_state(model):
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    model(_x()).sum().backward()
    opt.step()
    return opt


def _opt_state(opt):
    return {id(p): {k: v.clone() if isinstance(v, torch.Tensor) else v for k, v in s.items()}
            for p, s in opt.state.items()}


def _assert_refused(model, state, match, opt=None, x=None, check=None):
    """``model.load_state_dict(state)`` raises ``match`` and ``check`` (default: the whole model) is untouched:
    every tensor, setting and Parameter object, its output, its gradients and the optimizer's state."""
    check = model if check is None else check
    x = _x() if x is None else x
    before = _everything(check)
    opt_before = None if opt is None else _opt_state(opt)
    with torch.no_grad():
        out = model(x)
    with pytest.raises(RuntimeError, match=match):
        model.load_state_dict(state)
    _assert_same(before, _everything(check))
    if check is model:
        with torch.no_grad():
            assert torch.equal(model(x), out)
    # the layer still trains: its derived index is the one its values were packed on
    _grads(model, x)
    if opt is not None:
        after = _opt_state(opt)
        assert after.keys() == opt_before.keys()
        for pid, s in opt_before.items():
            for k, v in s.items():
                assert torch.equal(torch.as_tensor(after[pid][k]), torch.as_tensor(v)), k


@pytest.mark.parametrize("src,dst,match", MISMATCH)
def test_checkpoint_of_another_pattern_is_refused_and_changes_nothing(src, dst, match):
    state = _build(src, 0).state_dict()
    model = _build(dst, 1)
    if match is None:
        # a constant fan-in mask is an unstructured one, a transposable 2:4 mask a 2:4 one: those directions load
        model.load_state_dict(state)
        assert torch.equal(model(_x()), _build(src, 0)(_x()))
        return
    _assert_refused(model, state, match, _optimizer_with_state(model))


@pytest.mark.parametrize("name,match", [
    pytest.param("csr", r"0\.: the checkpoint's weight \(0\.dense_shape\) is \[out, in\] = \[48, 64\], this layer has "
                 r"out_features=64", id="csr"),
    pytest.param("2:4", r"0\.dense_shape\) is \[out, in\] = \[48, 64\]", id="2:4"),
    pytest.param("nm2:8T", r"0\.dense_shape\) is \[out, in\] = \[48, 64\]", id="nm2:8T"),
    pytest.param("block16", r"0\.dense_shape\) is \[out, in\] = \[48, 64\]", id="block16"),
    pytest.param("pixelfly-r4", r"0\.dense_shape\) is \[out, in\] = \[48, 64\]", id="pixelfly"),
    pytest.param("monarch4", r"0\.: the checkpoint's blkdiag1 is \[4, 12, 16\], this layer .* has \[4, 16, 16\]",
                 id="monarch4"),
    pytest.param("act-tensor", r"size mismatch for 0\.weight", id="act-tensor"),
    pytest.param("act-over-2:4", r"0\.sparse\.: the checkpoint's weight \(0\.sparse\.dense_shape\)", id="act-over-2:4"),
    pytest.param("fused-gelu-2bit", r"0\.dense_shape\) is \[out, in\] = \[48, 64\]", id="fused"),
])
def test_checkpoint_of_another_shape_is_refused_and_changes_nothing(name, match):
    state = _build(name, 0, hidden=48).state_dict()
    model = _build(name, 1)
    _assert_refused(model, state, match, _optimizer_with_state(model))


def test_refused_safetensors_load_changes_nothing(tmp_path):
    save_safetensors(_build("2:4", 0), tmp_path / "nm.safetensors")
    model = _build("block16", 1)
    before = _everything(model)
    with pytest.raises(RuntimeError, match=r"0\.: idx, empty: the checkpoint holds an N:M index"):
        load_safetensors(model, tmp_path / "nm.safetensors")
    _assert_same(before, _everything(model))


# ---- a refused load leaves the layer as it was, wherever it fails ----


def test_failure_after_the_index_was_rebuilt_rolls_back():
    # rank 4 -> 8: crow/col/values fit and are loaded first, then lr_u is refused by torch's size check
    src, model = _build("pixelfly-r4", 0), _build("pixelfly-r8", 1)
    assert src[0].values.shape == model[0].values.shape
    assert not torch.equal(src[0].values, model[0].values)
    _assert_refused(model, src.state_dict(), r"size mismatch for 0\.lr_u")


def test_index_without_its_values_is_refused_even_when_not_strict():
    model = _build("csr", 1)
    state = {k: v for k, v in _build("csr", 0).state_dict().items() if k != "0.values"}
    before = _everything(model[0])
    with pytest.raises(RuntimeError, match=r"0\.: crow, col and values: the checkpoint holds only part"):
        model.load_state_dict(state, strict=False)
    _assert_same(before, _everything(model[0]))
    state = {k: v for k, v in _build("2:4", 0).state_dict().items() if k != "0.empty"}
    model = _build("2:4", 1)
    before = _everything(model[0])
    with pytest.raises(RuntimeError, match=r"0\.: idx, empty and values"):
        model.load_state_dict(state, strict=False)
    _assert_same(before, _everything(model[0]))


def test_monarch_bias_of_another_size_is_refused_before_the_factors_load():
    # out 10 and 9 share the factor shapes at nblocks=4 (q = 3): only the bias tells them apart
    src, layer = MonarchLinear(8, 9, nblocks=4), MonarchLinear(8, 10, nblocks=4)
    assert src.blkdiag2.shape == layer.blkdiag2.shape
    _assert_refused(layer, src.state_dict(), r"the checkpoint's bias is \[9\], this layer .* has \[10\]",
                    x=torch.randn(3, 8))


def test_wrapping_activation_layer_rolls_back_when_its_sparse_layer_refuses():
    # the ActivationSparseLinear loads first (switching its mode to the checkpoint's channel mode), then the
    # SparseLinear it wraps refuses another out_features: both are restored
    torch.manual_seed(0)
    src = ActivationSparseLinear.from_dense(SparseLinear(D_IN, 48, pattern="2:4"), 0.5, mode="channel")
    src.calibrate(torch.randn(16, D_IN))
    layer = ActivationSparseLinear.from_dense(SparseLinear(D_IN, 32, pattern="2:4"), 0.5, mode="tensor")
    layer.calibrate(torch.randn(16, D_IN))
    _assert_refused(layer, src.state_dict(), r"sparse\.: the checkpoint's weight \(sparse\.dense_shape\)")
    assert layer.mode == "tensor" and layer.threshold.shape == ()


@pytest.mark.parametrize("extra", [
    pytest.param({"mode": "bogus", "sparsity": 0.5}, id="unknown-mode"),
    pytest.param("tensor", id="not-a-dict"),
    pytest.param({"mode": "tensor", "sparsity": 1.5}, id="sparsity-1.5"),
])
def test_activation_layer_refuses_bad_extra_state(extra):
    model = _build("act-tensor", 1)
    state = _build("act-channel", 0).state_dict()
    state["0._extra_state"] = extra
    _assert_refused(model, state, r"0\._extra_state: ", check=model[0])


def test_malformed_index_in_checkpoint_is_refused():
    cases = []
    state = _build("2:4", 0).state_dict()
    idx = state["0.idx"].clone()
    idx[0, 0] = 0xF7  # position 7 in a group of 4
    cases.append(("2:4", dict(state, **{"0.idx": idx}), r"0\. \(2:4\): idx: positions must lie in \[0, m=4\)"))
    state = _build("csr", 0).state_dict()
    col = state["0.col"].clone()
    col[[0, 1]] = col[[1, 0]]  # unsorted within row 0
    cases.append(("csr", dict(state, **{"0.col": col}), r"0\. \(unstructured\): col: indices must be sorted and unique"))
    col = state["0.col"].clone()
    col[1] = col[0]  # duplicated
    cases.append(("csr", dict(state, **{"0.col": col}), r"col: indices must be sorted and unique"))
    crow = state["0.crow"].clone()
    crow[-1] += 1
    cases.append(("csr", dict(state, **{"0.crow": crow}), r"crow: must start at 0 and end at nnz"))
    state = _build("block16", 0).state_dict()
    col = state["0.col"].clone()
    col[0] = 4  # a 64-wide weight has 4 block columns
    cases.append(("block16", dict(state, **{"0.col": col}), r"0\. \(block16\): col: indices must lie in \[0, 4\)"))
    for name, bad, match in cases:
        model = _build(name, 1)
        _assert_refused(model, bad, match, check=model[0])


def test_refused_layer_is_unchanged_while_torch_loads_the_others():
    # load_state_dict is not transactional across modules (nn.Linear's is not either): the layers that
    # accept their part are loaded before torch raises; the one that refuses is left exactly as it was
    src, model = _build("csr", 0), _build("csr", 1)
    state = src.state_dict()
    state["0.col"] = state["0.col"].flip(0)
    before = _everything(model[0])
    with pytest.raises(RuntimeError, match=r"0\. \(unstructured\): col: "):
        model.load_state_dict(state)
    _assert_same(before, _everything(model[0]))
    assert torch.equal(model[2].values, src[2].values) and torch.equal(model[2].mask, src[2].mask)



def test_densify_keeps_a_shared_layer_shared():
    # found by review: a SparseLinear registered twice became two independent dense layers
    shared = sparseops.SparseLinear(6, 6, sparsity=0.5)
    model = nn.Sequential(shared, nn.ReLU(), shared)
    x = torch.randn(3, 6)
    y = model(x)
    sparseops.densify_(model)
    assert model[0] is model[2] and isinstance(model[0], nn.Linear)
    assert len(list(model.parameters())) == 2
    torch.testing.assert_close(model(x), y)


def test_nm_checkpoint_of_another_n_m_with_the_same_shapes_is_refused():
    # found by review: 1:4 and 2:8 (or 2:4 and 4:8) indexes have the same shapes, and a checkpoint of one
    # loaded into the other put its weights on other columns, silently
    torch.manual_seed(0)
    x = torch.randn(3, 16)
    for src_p, dst_p in (("1:4", "2:8"), ("2:4", "4:8"), ("2:4t", "4:8")):
        src = sparseops.SparseLinear(16, 8, pattern=src_p)
        dst = sparseops.SparseLinear(16, 8, pattern=dst_p)
        before = dst(x)
        name = sparseops.patterns.as_pattern(src_p).name
        with pytest.raises(RuntimeError, match=rf"checkpoint's pattern \(dense_shape\) is {name}, this layer is"):
            dst.load_state_dict(src.state_dict())
        assert torch.equal(dst(x), before), "a refused checkpoint changed the layer"
    # a checkpoint from before the pattern was stored ([out, in] only) still loads
    src = sparseops.SparseLinear(16, 8, pattern="1:4")
    sd = src.state_dict()
    sd["dense_shape"] = sd["dense_shape"][:2].clone()
    dst = sparseops.SparseLinear(16, 8, pattern="1:4")
    dst.load_state_dict(sd)
    assert torch.equal(dst(x), src(x)) and dst.dense_shape.tolist() == [8, 16, 1, 4, 0]
