"""GradualPruner, cubic_sparsity, replace_parameter and SparseLinear.update_mask_ (pruning during training).

The optimizer-state checks run the same Adam training on a dense twin whose masks the test keeps
itself; sparse state is compared with the twin's state gathered at the mask (row-major, ``t[mask]``).
"""

import copy
import io

import pytest
import torch
import torch.nn.functional as F
from helpers import assert_close_rms
from torch import nn

from sparseops import SparseLinear
from sparseops.nn._optim import replace_parameter
from sparseops.patterns import NM, Block, FanIn
from sparseops.pruning import GradualPruner, cubic_sparsity

# ---- shared set-up ----

IN, HID, OUT = 24, 40, 12
NAMES = ["0", "2"]
NUMEL = {"0": HID * IN, "2": OUT * HID}
# prune steps 2, 5, 8, 11, 14; s = 0, 0.52, 0.7875, 0.886, 0.9: the swap happens at t = 8
T0, T1, EVERY, SF, CONV = 2, 14, 3, 0.9, 0.7
N_STEPS = 20


def _mlp():
    return nn.Sequential(nn.Linear(IN, HID), nn.ReLU(), nn.Linear(HID, OUT))


def _data():
    g = torch.Generator().manual_seed(1)
    return torch.randn(16, IN, generator=g), torch.randn(16, OUT, generator=g)


def _ref_sparsity(t, sf, t0, t1, si=0.0):
    """s(t) = s_f + (s_i - s_f)(1 - (t - t0)/(t1 - t0))^3, s_i before t0 and s_f after t1."""
    if t < t0:
        return si
    if t > t1:
        return sf
    return sf + (si - sf) * (1.0 - (t - t0) / (t1 - t0)) ** 3


def _is_prune_step(t, t0=T0, t1=T1, every=EVERY):
    return t0 <= t <= t1 and ((t - t0) % every == 0 or t == t1)


def _dense_w(mod):
    return mod.dense_weight().detach() if isinstance(mod, SparseLinear) else mod.weight.detach()


def _zeros(mod):
    return int((_dense_w(mod) == 0).sum())


def _opt_params(opt):
    return [p for g in opt.param_groups for p in g["params"]]


def _assert_optimizer_holds_exactly(opt, model, where=""):
    """The optimizer's params are the model's params (by identity), and its state has no stale key."""
    held = _opt_params(opt)
    params = list(model.parameters())
    assert len(held) == len(params)
    stale = [tuple(p.shape) for p in held if not any(p is q for q in params)]
    assert not stale, f"{where}: the optimizer holds {len(stale)} stale Parameter(s) of shapes {stale}"
    for p in opt.state:
        assert any(p is q for q in params), "optimizer state holds a Parameter that is no longer in the model"


# ---- cubic_sparsity ----

CUBIC_T = [0, 9, 10, 11, 15, 20, 25, 29, 30, 31, 100]


@pytest.mark.parametrize("si", [0.0, 0.2], ids=["si0", "si0.2"])
@pytest.mark.parametrize("t", CUBIC_T, ids=[f"t{t}" for t in CUBIC_T])
def test_cubic_sparsity_matches_formula(t, si):
    t0, t1, sf = 10, 30, 0.9
    got = cubic_sparsity(t, sf, t0, t1, initial_sparsity=si)
    assert got == pytest.approx(_ref_sparsity(t, sf, t0, t1, si), abs=1e-12)
    if t <= t0:
        assert got == si
    if t >= t1:
        assert got == sf


def test_cubic_sparsity_is_monotone_and_matches_pruner():
    model = _mlp()
    pruner = GradualPruner(model, 0.8, 3, 13, 2, initial_sparsity=0.1)
    prev = -1.0
    for t in range(0, 20):
        s = cubic_sparsity(t, 0.8, 3, 13, 0.1)
        assert s >= prev
        prev = s
        assert pruner.sparsity_at(t) == s


# ---- GradualPruner, layer scope, training ----


@pytest.mark.parametrize("si", [0.0, 0.2], ids=["si0", "si0.2"])
def test_gradual_pruner_layer_scope_training_with_adam(si):
    model = _mlp()
    x, y = _data()
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    pruner = GradualPruner(model, SF, T0, T1, EVERY, optimizer=opt, convert_at=CONV, initial_sparsity=si)
    assert pruner.names == NAMES
    last_s = 0.0
    seen, expected_seq = [], []
    prev_masks = {n: torch.ones(NUMEL[n], dtype=torch.bool).view_as(_dense_w(model.get_submodule(n))) for n in NAMES}
    swap_steps = []
    moved_pruned = False
    loss = None
    for t in range(1, N_STEPS + 1):
        out = model(x)  # the previous step's loss (and graph) is still alive here
        loss = F.mse_loss(out, y)
        assert torch.isfinite(loss)
        opt.zero_grad()
        loss.backward()
        opt.step()
        for n in NAMES:  # Adam moves pruned dense weights; the pruner must set them back
            mod = model.get_submodule(n)
            if n in pruner.masks and bool((mod.weight.detach()[~pruner.masks[n]] != 0).any()):
                moved_pruned = True
        old_values = {n: model.get_submodule(n).values for n in NAMES if isinstance(model.get_submodule(n), SparseLinear)}
        swapped = pruner.step()
        assert pruner.step_count == t
        prune = _is_prune_step(t)
        if prune:
            last_s = _ref_sparsity(t, SF, T0, T1, si)
            seen.append(pruner.sparsity)
            expected_seq.append(last_s)
        assert pruner.sparsity == pytest.approx(last_s, abs=1e-12)
        for n in NAMES:
            mod = model.get_submodule(n)
            assert _zeros(mod) == round(last_s * NUMEL[n]), f"step {t}, layer {n}"
            if last_s >= CONV:
                assert isinstance(mod, SparseLinear)
                assert n not in pruner.masks
                mask = mod.mask
                assert mod.nnz == NUMEL[n] - round(last_s * NUMEL[n])
                if prune and n in old_values:
                    assert mod.values is not old_values[n], "a re-pack must make a new values Parameter"
            else:
                assert type(mod) is nn.Linear
                mask = pruner.masks[n] if n in pruner.masks else torch.ones_like(prev_masks[n])
                w = mod.weight.detach()
                assert bool((w[~mask] == 0).all()), f"step {t}: a pruned weight of {n} is not 0"
            if prune:
                assert not bool((mask & ~prev_masks[n]).any()), "pruning must only drop weights"
            else:
                assert torch.equal(mask, prev_masks[n]), f"step {t}: mask of {n} changed between prune steps"
            prev_masks[n] = mask.clone()
        # step() names the layers whose Parameters it replaced: the swap, and every later re-pack
        assert swapped == (NAMES if prune and last_s >= CONV else [])
        if swapped:
            if not old_values:
                swap_steps.append(t)
            for n in NAMES:
                mod = model.get_submodule(n)
                assert any(p is mod.values for p in _opt_params(opt))
                assert any(p is mod.bias for p in _opt_params(opt))
        _assert_optimizer_holds_exactly(opt, model)
    assert moved_pruned, "the test never saw Adam move a pruned weight (so never tested the re-apply)"
    assert seen == pytest.approx(expected_seq, abs=1e-12)
    assert swap_steps == [8]
    assert torch.isfinite(F.mse_loss(model(x), y))


# ---- optimizer state against a dense-masked twin ----


def _twin_prune(w, cur, s):
    """The largest-magnitude ``numel - round(s*numel)`` weights among ``cur``: an independent top-k."""
    numel = w.numel()
    keep = numel - round(s * numel)
    score = torch.where(cur, w.abs().double(), torch.full_like(w, -1.0, dtype=torch.float64)).flatten()
    idx = torch.topk(score, keep).indices
    new = torch.zeros(numel, dtype=torch.bool)
    new[idx] = True
    return new.view_as(w)


def test_gradual_pruner_adam_state_matches_dense_masked_twin():
    model = _mlp()
    twin = copy.deepcopy(model)
    x, y = _data()
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    topt = torch.optim.Adam(twin.parameters(), lr=1e-2)
    pruner = GradualPruner(model, SF, T0, T1, EVERY, optimizer=opt, convert_at=CONV)
    tmasks = {n: torch.ones_like(twin.get_submodule(n).weight, dtype=torch.bool) for n in NAMES}
    compared_swap = compared_repack = 0
    for t in range(1, N_STEPS + 1):
        out, tout = model(x), twin(x)
        if t <= 8:  # both dense until the swap: bit-identical
            assert torch.equal(out, tout)
        else:
            assert_close_rms(out, tout, name=f"step {t} output")
        for m, o in ((opt, out), (topt, tout)):
            loss = F.mse_loss(o, y)
            m.zero_grad()
            loss.backward()
            m.step()
        swapped = pruner.step()
        with torch.no_grad():
            if _is_prune_step(t):
                s = _ref_sparsity(t, SF, T0, T1)
                for n in NAMES:
                    tmasks[n] = _twin_prune(twin.get_submodule(n).weight.detach(), tmasks[n], s)
            for n in NAMES:
                twin.get_submodule(n).weight.mul_(tmasks[n])
        for n in NAMES:
            mod, tlin = model.get_submodule(n), twin.get_submodule(n)
            if not isinstance(mod, SparseLinear):
                if n in pruner.masks:
                    assert torch.equal(pruner.masks[n], tmasks[n])
                    assert torch.equal(mod.weight, tlin.weight)
                continue
            mask = tmasks[n]
            assert torch.equal(mod.mask, mask), f"step {t}: {n}'s mask differs from the twin's top-k"
            st, tst = opt.state[mod.values], topt.state[tlin.weight]
            bst, tbst = opt.state[mod.bias], topt.state[tlin.bias]
            assert set(st) == set(tst)
            assert torch.equal(st["step"], tst["step"])
            assert torch.equal(bst["step"], tbst["step"])
            exact = t == 8  # the swap step: the twin and the model have not diverged by a bit yet
            for key in ("exp_avg", "exp_avg_sq"):
                assert st[key].shape == mod.values.shape
                if exact:
                    assert torch.equal(st[key], tst[key][mask]), f"{n}.{key} at the swap"
                    assert torch.equal(bst[key], tbst[key]), f"{n}.bias {key} at the swap"
                else:
                    assert_close_rms(st[key], tst[key][mask], name=f"step {t} {n}.{key}")
                    assert_close_rms(bst[key], tbst[key], name=f"step {t} {n}.bias {key}")
            if exact:
                assert torch.equal(mod.values.detach(), tlin.weight.detach()[mask])
            else:
                assert_close_rms(mod.values, tlin.weight[mask], name=f"step {t} {n}.values")
            if t == 8:
                compared_swap += 1
            elif _is_prune_step(t):
                compared_repack += 1
        if t == 8:
            assert swapped == NAMES
    assert compared_swap == 2 and compared_repack == 4  # two layers, at the swap and at t = 11 and 14
    assert_close_rms(model(x), twin(x), name="final output")


# ---- update_mask_ ----

R_OUT, R_IN = 8, 16  # CSR, FanIn, N:M layers: weight [8, 16]
B_OUT, B_IN, B = 16, 32, 8  # Block(8): weight [16, 32], a 2 x 4 grid of blocks


def _rand_rows(g, rows, cols, k):
    m = torch.zeros(rows, cols, dtype=torch.bool)
    for r in range(rows):
        m[r, torch.randperm(cols, generator=g)[:k]] = True
    return m


def _masks(kind):
    """(pattern, old mask, {change: new mask}, pattern-breaking mask) for a layer kind."""
    g = torch.Generator().manual_seed(7)
    if kind == "csr":
        old = torch.rand(R_OUT, R_IN, generator=g) < 0.5
        shrink = old & (torch.rand(R_OUT, R_IN, generator=g) < 0.6)
        move = (old & (torch.rand(R_OUT, R_IN, generator=g) < 0.5)) | (~old & (torch.rand(R_OUT, R_IN, generator=g) < 0.3))
        return "unstructured", old, {"shrink": shrink, "shrink_grow": move}, None
    if kind == "fanin":
        k = 4
        old = _rand_rows(g, R_OUT, R_IN, k)
        move = old.clone()
        for r in range(R_OUT):  # drop two, grow two
            on, off = old[r].nonzero().flatten(), (~old[r]).nonzero().flatten()
            move[r, on[torch.randperm(k, generator=g)[:2]]] = False
            move[r, off[torch.randperm(off.numel(), generator=g)[:2]]] = True
        bad = old.clone()
        bad[0, (~old[0]).nonzero()[0]] = True  # 5 in row 0
        # a strict subset has fewer than k in a row: it breaks a fan-in pattern
        return FanIn(k), old, {"shrink_grow": move}, bad
    if kind == "nm24":
        G = R_IN // 4
        old = torch.zeros(R_OUT, G, 4, dtype=torch.bool)
        move = torch.zeros_like(old)
        for r in range(R_OUT):
            for gi in range(G):
                p = torch.randperm(4, generator=g)
                old[r, gi, p[:2]] = True
                move[r, gi, p[1:3]] = True  # keeps p[1], drops p[0], grows p[2]
        old, move = old.view(R_OUT, R_IN), move.view(R_OUT, R_IN)
        shrink = old & (torch.rand(R_OUT, R_IN, generator=g) < 0.6)
        bad = old.clone()
        bad[0, :4] = torch.tensor([True, True, True, False])  # 3 of 4
        return NM(2, 4), old, {"shrink": shrink, "shrink_grow": move}, bad
    assert kind == "block8"

    def blocks(bm):
        return bm.repeat_interleave(B, 0).repeat_interleave(B, 1)

    old_b = torch.tensor([[1, 1, 0, 1], [0, 1, 1, 0]], dtype=torch.bool)
    shrink_b = torch.tensor([[1, 0, 0, 1], [0, 1, 0, 0]], dtype=torch.bool)
    move_b = torch.tensor([[0, 1, 1, 1], [1, 1, 0, 0]], dtype=torch.bool)
    bad = blocks(old_b).clone()
    bad[0, 0] = False  # block (0, 0) partly on
    return Block(B), blocks(old_b), {"shrink": blocks(shrink_b), "shrink_grow": blocks(move_b)}, bad


def _nm_slots(mask, n, m):
    """Independent N:M slot layout: per group, the kept positions then the lowest unused, first n, ascending."""
    rows, K = mask.shape
    G = K // m
    cols = torch.zeros(rows, G * n, dtype=torch.long)
    valid = torch.zeros(rows, G * n, dtype=torch.bool)
    for r in range(rows):
        for g in range(G):
            kept = [j for j in range(m) if mask[r, g * m + j]]
            unused = [j for j in range(m) if not mask[r, g * m + j]]
            for s, j in enumerate(sorted((kept + unused)[:n])):
                cols[r, g * n + s] = g * m + j
                valid[r, g * n + s] = bool(mask[r, g * m + j])
    return cols, valid


def _gather(kind, dense, mask):
    """The ``values`` layout of ``dense`` on ``mask``, computed without the package."""
    if kind == "csr":
        return dense[mask]
    if kind == "fanin":  # ELL: [rows that hold weights, k], row-major
        held = mask.sum(1)
        return dense[mask].view(int((held > 0).sum()), int(held.max()))
    if kind == "nm24":
        cols, valid = _nm_slots(mask, 2, 4)
        return torch.where(valid, dense.gather(1, cols), torch.zeros((), dtype=dense.dtype))
    nbr, nbc = dense.shape[0] // B, dense.shape[1] // B
    bm = mask[::B, ::B]
    return dense.view(nbr, B, nbc, B).permute(0, 2, 1, 3)[bm]


def _scatter(kind, values, mask):
    """Inverse of :func:`_gather`: a dense tensor, zeros off ``mask``."""
    dense = torch.zeros(mask.shape, dtype=values.dtype)
    if kind in ("csr", "fanin"):
        dense[mask] = values.reshape(-1)
        return dense
    if kind == "nm24":
        cols, valid = _nm_slots(mask, 2, 4)
        return dense.scatter(1, cols, torch.where(valid, values, torch.zeros((), dtype=values.dtype)))
    nbr, nbc = mask.shape[0] // B, mask.shape[1] // B
    bm = mask[::B, ::B]
    view = dense.view(nbr, B, nbc, B).permute(0, 2, 1, 3)
    view[bm] = values
    return dense


def _make_opt(name, params):
    if name == "sgd_momentum":
        return torch.optim.SGD(params, lr=0.05, momentum=0.9)
    return torch.optim.Adam(params, lr=1e-2)


def _layer(kind, old):
    pattern = _masks(kind)[0]
    out_f, in_f = old.shape
    return SparseLinear(in_f, out_f, mask=old, pattern=pattern)


def _train(layer, opt, x, steps=2):
    for _ in range(steps):
        loss = layer(x).pow(2).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()


UPDATE_CASES = [
    pytest.param(kind, change, o, id=f"{kind}-{change}-{o}")
    for kind, changes in (("csr", ("shrink", "shrink_grow")), ("fanin", ("shrink_grow",)),
                          ("nm24", ("shrink", "shrink_grow")), ("block8", ("shrink", "shrink_grow")))
    for change in changes
    for o in ("sgd_momentum", "adam")
]


@pytest.mark.parametrize("kind,change,opt_name", UPDATE_CASES)
def test_update_mask_repacks_values_and_optimizer_state(kind, change, opt_name):
    _, old, changes, _ = _masks(kind)
    new = changes[change]
    if change == "shrink":
        assert not bool((new & ~old).any())
    else:
        assert bool((new & ~old).any()) and bool((old & ~new).any()) and bool((old & new).any())
    layer = _layer(kind, old)
    assert torch.equal(layer.mask, old)
    opt = _make_opt(opt_name, layer.parameters())
    x = torch.randn(5, old.shape[1])
    _train(layer, opt, x)
    old_param = layer.values
    w_old = layer.dense_weight().detach().clone()
    assert torch.equal(w_old, _scatter(kind, old_param.detach(), old))
    old_state = {k: v.clone() if torch.is_tensor(v) else v for k, v in opt.state[old_param].items()}
    keys = ["momentum_buffer"] if opt_name == "sgd_momentum" else ["exp_avg", "exp_avg_sq"]
    for k in keys:
        assert old_state[k].shape == old_param.shape and bool((old_state[k] != 0).any())
    bias_state = opt.state[layer.bias]

    layer.update_mask_(new, opt)

    assert layer.values is not old_param
    assert isinstance(layer.values, nn.Parameter) and layer.values.requires_grad
    assert torch.equal(layer.mask, new)
    w_new = layer.dense_weight().detach()
    assert torch.equal(w_new, w_old * new), "kept weights keep their values, grown ones are 0"
    assert torch.equal(layer.values.detach(), _gather(kind, w_old * new, new))
    grown = new & ~old
    assert bool((w_new[grown] == 0).all())
    # the optimizer: the new Parameter in the old one's place, the state re-mapped
    held = _opt_params(opt)
    assert any(p is layer.values for p in held)
    assert not any(p is old_param for p in held)
    assert old_param not in opt.state
    assert opt.state[layer.bias] is bias_state
    st = opt.state[layer.values]
    assert set(st) == set(old_state)
    for k in keys:
        expected = _gather(kind, _scatter(kind, old_state[k], old) * new, new)
        assert st[k].shape == layer.values.shape
        assert torch.equal(st[k], expected), f"{k} not re-mapped onto the new mask"
    if opt_name == "adam":
        assert torch.equal(st["step"], old_state["step"])
    # forward against F.linear on the new dense weight (fp64 reference)
    ref = F.linear(x.double(), (w_old * new).double(), layer.bias.detach().double())
    assert_close_rms(layer(x), ref, name="forward after update_mask_")
    # and it still trains: the new values get a gradient and move, and stay on the new mask
    before = layer.values.detach().clone()
    _train(layer, opt, x, steps=1)
    assert layer.values.grad is not None and layer.values.grad.shape == layer.values.shape
    assert not torch.equal(layer.values.detach(), before)
    assert torch.equal(layer.mask, new)
    assert bool((layer.dense_weight().detach()[~new] == 0).all())


BAD_KINDS = ["fanin", "nm24", "block8"]


def _snapshot(layer, opt):
    return {
        "values": layer.values,
        "data": layer.values.detach().clone(),
        "mask": layer.mask.clone(),
        "buffers": {k: v.clone() for k, v in layer.named_buffers()},
        "params": list(_opt_params(opt)),
        "state_obj": opt.state[layer.values],
        "state": {k: v.clone() for k, v in opt.state[layer.values].items()},
    }


def _assert_unchanged(layer, opt, snap, x, y_before):
    assert layer.values is snap["values"]
    assert torch.equal(layer.values.detach(), snap["data"])
    assert torch.equal(layer.mask, snap["mask"])
    buffers = dict(layer.named_buffers())
    assert set(buffers) == set(snap["buffers"])
    for k, v in snap["buffers"].items():
        assert torch.equal(buffers[k], v), f"buffer {k} changed"
    held = _opt_params(opt)
    assert len(held) == len(snap["params"]) and all(a is b for a, b in zip(held, snap["params"]))
    assert opt.state[layer.values] is snap["state_obj"]
    for k, v in snap["state"].items():
        assert torch.equal(opt.state[layer.values][k], v)
    assert torch.equal(layer(x), y_before)


@pytest.mark.parametrize("kind", BAD_KINDS)
def test_update_mask_pattern_break_raises_and_leaves_layer(kind):
    _, old, _, bad = _masks(kind)
    layer = _layer(kind, old)
    opt = torch.optim.Adam(layer.parameters(), lr=1e-2)
    x = torch.randn(3, old.shape[1])
    _train(layer, opt, x, steps=1)
    y_before = layer(x).detach()
    snap = _snapshot(layer, opt)
    with pytest.raises(ValueError, match="mask"):
        layer.update_mask_(bad, opt)
    _assert_unchanged(layer, opt, snap, x, y_before)


def test_update_mask_fanin_subset_breaks_pattern():
    _, old, _, _ = _masks("fanin")
    layer = _layer("fanin", old)
    opt = torch.optim.SGD(layer.parameters(), lr=0.1, momentum=0.9)
    x = torch.randn(3, R_IN)
    _train(layer, opt, x, steps=1)
    y_before = layer(x).detach()
    snap = _snapshot(layer, opt)
    sub = old.clone()
    sub[2, old[2].nonzero()[0]] = False  # row 2 has k - 1
    with pytest.raises(ValueError, match="mask"):
        layer.update_mask_(sub, opt)
    _assert_unchanged(layer, opt, snap, x, y_before)


@pytest.mark.parametrize("kind", ["csr", "fanin", "nm24", "block8"])
@pytest.mark.parametrize(
    "bad,exc", [("shape", ValueError), ("dtype", TypeError)], ids=["wrong-shape", "not-bool"]
)
def test_update_mask_bad_mask_raises_and_leaves_layer(kind, bad, exc):
    _, old, _, _ = _masks(kind)
    layer = _layer(kind, old)
    opt = torch.optim.Adam(layer.parameters(), lr=1e-2)
    x = torch.randn(3, old.shape[1])
    _train(layer, opt, x, steps=1)
    y_before = layer(x).detach()
    snap = _snapshot(layer, opt)
    m = old.t().contiguous() if bad == "shape" else old.float()
    with pytest.raises(exc, match="mask"):
        layer.update_mask_(m, opt)
    _assert_unchanged(layer, opt, snap, x, y_before)


@pytest.mark.parametrize("kind", ["csr", "fanin", "nm24", "block8"])
def test_update_mask_with_previous_graph_alive(kind):
    _, old, changes, _ = _masks(kind)
    new = changes["shrink_grow"]
    layer = _layer(kind, old)
    opt = torch.optim.Adam(layer.parameters(), lr=1e-2)
    x = torch.randn(4, old.shape[1])
    kept = []  # every step's loss, graph and saved tensors alive
    loss = None
    for i in range(5):
        if i == 2:
            layer.update_mask_(new, opt)
        y = layer(x)  # the previous `loss` and its graph are alive while this forward runs
        loss = y.pow(2).mean()
        opt.zero_grad()
        loss.backward(retain_graph=True)
        opt.step()
        kept.append(loss)
        assert torch.isfinite(loss)
        assert layer.values.grad is not None and layer.values.grad.shape == layer.values.shape
    assert torch.equal(layer.mask, new)
    assert bool((layer.dense_weight().detach()[~new] == 0).all())


def test_update_mask_without_optimizer_and_unknown_param():
    _, old, changes, _ = _masks("csr")
    layer = _layer("csr", old)
    w_old = layer.dense_weight().detach().clone()
    layer.update_mask_(changes["shrink_grow"])
    assert torch.equal(layer.dense_weight().detach(), w_old * changes["shrink_grow"])
    # replace_parameter on an optimizer that does not hold the Parameter: found is False, nothing moves
    other = nn.Parameter(torch.randn(3))
    opt = torch.optim.SGD([other], lr=0.1)
    assert replace_parameter(opt, layer.values, nn.Parameter(torch.zeros(2))) is False
    assert opt.param_groups[0]["params"][0] is other


def test_replace_parameter_remaps_only_tensors_of_the_old_shape():
    old = nn.Parameter(torch.randn(3, 4))
    keep = nn.Parameter(torch.randn(2))
    opt = torch.optim.Adam([{"params": [keep]}, {"params": [old], "lr": 0.5}])
    (old.sum() + keep.sum()).backward()
    opt.step()
    st = {k: v.clone() for k, v in opt.state[old].items()}
    mask = torch.rand(3, 4) < 0.5
    new = nn.Parameter(old.detach()[mask].clone())
    assert replace_parameter(opt, old, new, lambda t: t[mask]) is True
    assert opt.param_groups[1]["params"][0] is new and opt.param_groups[1]["lr"] == 0.5
    assert opt.param_groups[0]["params"][0] is keep
    assert old not in opt.state
    assert torch.equal(opt.state[new]["exp_avg"], st["exp_avg"][mask])
    assert torch.equal(opt.state[new]["exp_avg_sq"], st["exp_avg_sq"][mask])
    assert torch.equal(opt.state[new]["step"], st["step"])


# ---- global scope ----


@pytest.mark.parametrize("convert_at", [None, CONV], ids=["dense", f"convert{CONV}"])
def test_gradual_pruner_global_scope(convert_at):
    model = _mlp()
    x, y = _data()
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    pruner = GradualPruner(model, SF, T0, T1, EVERY, optimizer=opt, scope="global", convert_at=convert_at)
    total = sum(NUMEL.values())
    last_s = 0.0
    for t in range(1, N_STEPS + 1):
        loss = F.mse_loss(model(x), y)
        assert torch.isfinite(loss)
        opt.zero_grad()
        loss.backward()
        opt.step()
        pruner.step()
        if _is_prune_step(t):
            last_s = _ref_sparsity(t, SF, T0, T1)
        zeros = sum(_zeros(model.get_submodule(n)) for n in NAMES)
        assert zeros == round(last_s * total), f"step {t}"
        for n in NAMES:
            mod = model.get_submodule(n)
            assert NUMEL[n] - _zeros(mod) >= 1
            assert isinstance(mod, SparseLinear) == (convert_at is not None and last_s >= convert_at)
        _assert_optimizer_holds_exactly(opt, model)
    # one threshold across layers: the layers do not each sit at s
    fr = [_zeros(model.get_submodule(n)) / NUMEL[n] for n in NAMES]
    assert fr[0] != pytest.approx(fr[1], abs=1e-3)


def test_gradual_pruner_global_scope_keeps_a_weight_in_every_layer():
    model = _mlp()
    with torch.no_grad():
        model[2].weight.mul_(1e-4)  # every weight of layer "2" is below every weight of layer "0"
    pruner = GradualPruner(model, 0.9, 0, 1, 1, scope="global", convert_at=None)
    pruner.step()  # t = 1 = end_step: s = 0.9
    total = sum(NUMEL.values())
    z0, z2 = _zeros(model[0]), _zeros(model[2])
    assert NUMEL["2"] - z2 == 1, "the small layer keeps exactly its largest weight"
    assert NUMEL["0"] - z0 >= 1
    assert z0 + z2 == round(0.9 * total) - 1
    kept = model[2].weight.detach() != 0
    assert bool(kept.view(-1)[model[2].weight.detach().abs().argmax()])


# ---- filter_fn, convert_at=None, no optimizer ----


def _run(model, pruner, opt, x, y, steps=N_STEPS):
    returned = {}
    for t in range(1, steps + 1):
        loss = F.mse_loss(model(x), y)
        assert torch.isfinite(loss)
        if opt is not None:
            opt.zero_grad()
            loss.backward()
            opt.step()
        returned[t] = pruner.step()
    return returned


def test_gradual_pruner_filter_fn_excludes_layers():
    model = _mlp()
    x, y = _data()
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    calls = []

    def only_first(mod, fqn):
        calls.append((type(mod).__name__, fqn))
        return fqn == "0"

    pruner = GradualPruner(model, SF, T0, T1, EVERY, optimizer=opt, filter_fn=only_first, convert_at=CONV)
    assert pruner.names == ["0"]
    assert ("Linear", "2") in calls
    returned = _run(model, pruner, opt, x, y)
    # the swap at 8, then the re-packs at the prune steps 11 and 14
    assert {t: v for t, v in returned.items() if v} == {8: ["0"], 11: ["0"], 14: ["0"]}
    assert isinstance(model[0], SparseLinear) and model[0].nnz == NUMEL["0"] - round(SF * NUMEL["0"])
    assert type(model[2]) is nn.Linear and _zeros(model[2]) == 0
    assert "2" not in pruner.masks
    _assert_optimizer_holds_exactly(opt, model)


def test_gradual_pruner_convert_at_none_never_swaps():
    model = _mlp()
    x, y = _data()
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    params = list(model.parameters())
    pruner = GradualPruner(model, SF, T0, T1, EVERY, optimizer=opt, convert_at=None)
    returned = _run(model, pruner, opt, x, y)
    assert all(v == [] for v in returned.values())
    for n in NAMES:
        mod = model.get_submodule(n)
        assert type(mod) is nn.Linear
        assert _zeros(mod) == round(SF * NUMEL[n])
        assert bool((mod.weight.detach()[~pruner.masks[n]] == 0).all())
    assert all(a is b for a, b in zip(model.parameters(), params))
    assert all(a is b for a, b in zip(_opt_params(opt), params))


def test_gradual_pruner_without_optimizer_still_swaps():
    model = _mlp()
    x, y = _data()
    pruner = GradualPruner(model, SF, T0, T1, EVERY, convert_at=CONV)
    returned = {}
    for t in range(1, N_STEPS + 1):
        returned[t] = pruner.step()
        if t == 8:
            break
    assert returned[8] == NAMES
    assert all(v == [] for t, v in returned.items() if t != 8)
    for n in NAMES:
        assert isinstance(model.get_submodule(n), SparseLinear)
    # the caller builds a new optimizer after a step that reports layers, and training goes on
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    for t in range(9, N_STEPS + 1):
        loss = F.mse_loss(model(x), y)
        assert torch.isfinite(loss)
        opt.zero_grad()
        loss.backward()
        opt.step()
        reported = pruner.step()
        assert reported == (NAMES if t in (11, 14) else [])
        if reported:
            opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    for n in NAMES:
        assert model.get_submodule(n).nnz == NUMEL[n] - round(SF * NUMEL[n])


def test_gradual_pruner_without_optimizer_repacks_keep_a_rebuilt_optimizer_valid():
    """The documented protocol without an optimizer: rebuild it after a step that reports a swap.

    Later re-packs (t = 11, 14) replace each SparseLinear's ``values`` by a new Parameter too, so an
    optimizer rebuilt at the swap must still be training the model's parameters afterwards.
    """
    model = _mlp()
    x, y = _data()
    pruner = GradualPruner(model, SF, T0, T1, EVERY, convert_at=CONV)
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    for t in range(1, N_STEPS + 1):
        before = {n: _dense_w(model.get_submodule(n)).clone() for n in NAMES}
        loss = F.mse_loss(model(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
        for n in NAMES:
            assert not torch.equal(_dense_w(model.get_submodule(n)), before[n]), (
                f"step {t}: opt.step() no longer updates layer {n} (its optimizer holds a stale Parameter)"
            )
        if pruner.step():
            opt = torch.optim.Adam(model.parameters(), lr=1e-2)
        _assert_optimizer_holds_exactly(opt, model, f"step {t}")


def test_gradual_pruner_targets_only_unstructured_sparse_layers():
    g = torch.Generator().manual_seed(3)
    model = nn.Sequential(
        SparseLinear(IN, HID, sparsity=0.5),
        nn.ReLU(),
        SparseLinear(HID, HID, pattern=NM(2, 4)),
        nn.ReLU(),
        SparseLinear(HID, OUT, mask=_rand_rows(g, OUT, HID, 8), pattern=FanIn(8)),
    )
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    pruner = GradualPruner(model, 0.75, 0, 4, 2, optimizer=opt)
    assert pruner.names == ["0"]
    nm_values, fan_values = model[2].values, model[4].values
    x = torch.randn(6, IN)
    for t in range(1, 5):
        loss = model(x).pow(2).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        # the unstructured layer is re-packed at the prune steps 2 and 4; the others are never touched
        assert pruner.step() == (["0"] if t in (2, 4) else [])
    assert model[0].nnz == HID * IN - round(0.75 * HID * IN)
    assert model[2].values is nm_values and model[4].values is fan_values
    _assert_optimizer_holds_exactly(opt, model)


# ---- bad arguments ----

BAD_ARGS = [
    pytest.param({"final_sparsity": 1.0}, ValueError, "final_sparsity", id="final_sparsity-1.0"),
    pytest.param({"final_sparsity": -0.1}, ValueError, "final_sparsity", id="final_sparsity-neg"),
    pytest.param({"final_sparsity": "0.5"}, TypeError, "final_sparsity", id="final_sparsity-str"),
    pytest.param({"initial_sparsity": 1.0}, ValueError, "initial_sparsity", id="initial_sparsity-1.0"),
    pytest.param({"initial_sparsity": 0.6}, ValueError, "initial_sparsity", id="initial-above-final"),
    pytest.param({"convert_at": 1.5}, ValueError, "convert_at", id="convert_at-1.5"),
    pytest.param({"start_step": 10, "end_step": 10}, ValueError, "end_step", id="end_step-eq-start"),
    pytest.param({"start_step": 10, "end_step": 5}, ValueError, "end_step", id="end_step-lt-start"),
    pytest.param({"start_step": -1}, ValueError, "start_step", id="start_step-neg"),
    pytest.param({"every": 0}, ValueError, "every", id="every-0"),
    pytest.param({"every": -3}, ValueError, "every", id="every-neg"),
    pytest.param({"start_step": 1.0}, TypeError, "start_step", id="start_step-float"),
    pytest.param({"end_step": "20"}, TypeError, "end_step", id="end_step-str"),
    pytest.param({"every": 2.5}, TypeError, "every", id="every-float"),
    pytest.param({"every": True}, TypeError, "every", id="every-bool"),
    pytest.param({"scope": "model"}, ValueError, "scope", id="scope-model"),
    pytest.param({"scope": None}, ValueError, "scope", id="scope-none"),
    pytest.param({"optimizer": "adam"}, TypeError, "optimizer", id="optimizer-str"),
    pytest.param({"optimizer": [nn.Parameter(torch.zeros(1))]}, TypeError, "optimizer", id="optimizer-list"),
]


@pytest.mark.parametrize("kwargs,exc,name", BAD_ARGS)
def test_gradual_pruner_bad_arguments(kwargs, exc, name):
    args = {"final_sparsity": 0.5, "start_step": 0, "end_step": 20, "every": 2}
    args.update(kwargs)
    with pytest.raises(exc, match=rf"\b{name}\b"):
        GradualPruner(_mlp(), **args)


@pytest.mark.parametrize(
    "model,exc",
    [
        pytest.param(nn.Sequential(nn.Conv1d(2, 3, 3), nn.ReLU()), ValueError, id="no-linear"),
        pytest.param(nn.Sequential(SparseLinear(8, 8, pattern=NM(2, 4))), ValueError, id="only-nm-sparse"),
        pytest.param(nn.Linear(4, 4).weight, TypeError, id="not-a-module"),
    ],
)
def test_gradual_pruner_bad_model(model, exc):
    with pytest.raises(exc, match=r"\bmodel\b"):
        GradualPruner(model, 0.5, 0, 10)


def test_gradual_pruner_filter_excluding_everything_raises():
    with pytest.raises(ValueError, match=r"\bmodel\b"):
        GradualPruner(_mlp(), 0.5, 0, 10, filter_fn=lambda mod, fqn: False)


# ---- state_dict ----


def test_gradual_pruner_state_dict_round_trip():
    model = _mlp()
    pruner = GradualPruner(model, SF, T0, T1, EVERY, convert_at=None)
    for _ in range(6):  # prunes at 2 and 5
        pruner.step()
    sd = pruner.state_dict()
    assert sd["step_count"] == 6 and sd["sparsity"] == pytest.approx(_ref_sparsity(5, SF, T0, T1))
    assert set(sd["masks"]) == set(NAMES)
    buf = io.BytesIO()
    torch.save(sd, buf)
    buf.seek(0)
    loaded_sd = torch.load(buf)

    model2 = copy.deepcopy(model)
    pruner2 = GradualPruner(model2, SF, T0, T1, EVERY, convert_at=None)
    pruner2.load_state_dict(loaded_sd)
    assert pruner2.step_count == pruner.step_count
    assert pruner2.sparsity == pruner.sparsity
    assert set(pruner2.masks) == set(pruner.masks)
    for n in NAMES:
        assert torch.equal(pruner2.masks[n], pruner.masks[n])
        assert pruner2.masks[n] is not pruner.masks[n]
    # the state_dict is a copy: editing it does not touch the pruner
    sd["masks"]["0"].fill_(False)
    assert bool(pruner.masks["0"].any())
    # both go on identically
    for _ in range(10):
        assert pruner.step() == pruner2.step()
        assert pruner.sparsity == pruner2.sparsity
        for n in NAMES:
            assert torch.equal(pruner.masks[n], pruner2.masks[n])
            assert torch.equal(model.get_submodule(n).weight, model2.get_submodule(n).weight)
    assert pruner2.step_count == 16
    assert _zeros(model2[0]) == round(SF * NUMEL["0"])


# ---- iterative magnitude pruning with rewinding ----


def _imp_model():
    torch.manual_seed(5)
    return nn.Sequential(nn.Linear(IN, HID), nn.ReLU(), nn.Linear(HID, OUT), nn.LayerNorm(OUT))


def _imp_train(model, x, y, steps=5):
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    for _ in range(steps):
        loss = F.mse_loss(model(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()


def test_imp_schedule_removes_the_same_share_each_round():
    from sparseops.pruning import IterativeMagnitudePruning as IMP

    s = IMP.schedule(0.9, 3)
    assert s[-1] == pytest.approx(0.9)
    keep = [1.0] + [1.0 - v for v in s]
    ratios = [keep[i + 1] / keep[i] for i in range(3)]
    assert ratios == pytest.approx([0.1 ** (1 / 3)] * 3)
    with pytest.raises(ValueError, match="rounds"):
        IMP.schedule(0.9, 0)
    with pytest.raises(ValueError, match="final_sparsity"):
        IMP.schedule(1.0, 2)


@pytest.mark.parametrize("scope", ["global", "layer"])
def test_imp_prune_and_rewind(scope):
    from sparseops.pruning import IterativeMagnitudePruning as IMP

    model = _imp_model()
    x, y = _data()
    imp = IMP(model, scope=scope)
    w0 = {n: model.get_submodule(n).weight.detach().clone() for n in NAMES}
    b0 = {n: model.get_submodule(n).bias.detach().clone() for n in NAMES}
    ln0 = model[3].weight.detach().clone()
    prev = None
    for s in IMP.schedule(0.8, 3):
        _imp_train(model, x, y)
        trained = {n: _dense_w(model.get_submodule(n)).clone() for n in NAMES}
        assert not torch.equal(model[3].weight.detach(), ln0)
        model = imp.prune_and_rewind(s)
        total = sum(NUMEL.values())
        zeros = sum(NUMEL[n] - model.get_submodule(n).nnz for n in NAMES)
        if scope == "global":
            assert zeros == round(s * total)
        else:
            for n in NAMES:
                assert NUMEL[n] - model.get_submodule(n).nnz == round(s * NUMEL[n])
        for n in NAMES:
            mod = model.get_submodule(n)
            assert isinstance(mod, SparseLinear)
            mask = mod.mask
            # rewound: the snapshot's weights on the mask, zeros off it, the snapshot's bias
            assert torch.equal(mod.dense_weight().detach(), torch.where(mask, w0[n], torch.zeros(())))
            assert torch.equal(mod.bias.detach(), b0[n])
            if prev is not None:
                assert not bool((mask & ~prev[n]).any()), "a later round must only drop weights"
            # the kept weights are the largest trained magnitudes on the previous mask
            dropped = (prev[n] if prev is not None else torch.ones_like(mask)) & ~mask
            if scope == "layer" and dropped.any() and mask.any():
                assert trained[n].abs()[dropped].max() <= trained[n].abs()[mask].min()
        # every other parameter is rewound too
        assert torch.equal(model[3].weight.detach(), ln0)
        prev = {n: model.get_submodule(n).mask for n in NAMES}


def test_imp_snapshot_later_rewinds_there():
    from sparseops.pruning import IterativeMagnitudePruning as IMP

    model = _imp_model()
    x, y = _data()
    imp = IMP(model)
    _imp_train(model, x, y, 3)
    w3 = model[0].weight.detach().clone()
    imp.snapshot()
    _imp_train(model, x, y, 3)
    model = imp.prune_and_rewind(0.5)
    assert torch.equal(model[0].dense_weight().detach(), torch.where(model[0].mask, w3, torch.zeros(())))


def test_imp_bad_arguments():
    from sparseops.pruning import IterativeMagnitudePruning as IMP

    with pytest.raises(TypeError, match="model"):
        IMP("not a model")
    with pytest.raises(ValueError, match="scope"):
        IMP(_imp_model(), scope="row")
    with pytest.raises(ValueError, match="model"):
        IMP(nn.Sequential(nn.ReLU()))
    imp = IMP(_imp_model())
    with pytest.raises(ValueError, match="sparsity"):
        imp.prune_and_rewind(1.0)


# ---- drop-only re-packs: CSRWeight.select and SparseLinear.prune_ ----


@pytest.mark.parametrize("out_f,in_f,density", [
    pytest.param(7, 9, 0.4, id="7x9-d0.4"), pytest.param(1, 1, 1.0, id="1x1-full"),
    pytest.param(5, 3, 0.0, id="5x3-empty"), pytest.param(37, 50, 0.1, id="37x50-d0.1"),
    pytest.param(0, 3, 0.5, id="0x3"), pytest.param(3, 0, 0.5, id="3x0"),
])
@pytest.mark.parametrize("p", [0.0, 0.3, 1.0], ids=lambda p: f"keep{p}")
def test_csr_select_equals_a_rebuilt_index(out_f, in_f, density, p):
    from sparseops.formats import CSRWeight

    g = torch.Generator().manual_seed(1)
    m = torch.rand(out_f, in_f, generator=g) < density
    if out_f:
        m[0] = False  # an empty first row
    if in_f > 1:
        m[:, 0] = False  # and an empty first column
    f = CSRWeight.from_mask(m)
    keep = torch.rand(f.nnz, generator=g) < p
    got = f.select(keep)
    sub = torch.zeros(out_f * in_f, dtype=torch.bool)
    sub[(f.row.long() * in_f + f.col.long())[keep]] = True
    want = CSRWeight.from_mask(sub.view(out_f, in_f))
    for name in ("crow", "col", "row", "t_crow", "t_row", "t_perm"):
        a, b = getattr(got, name), getattr(want, name)
        assert a.dtype == b.dtype and torch.equal(a, b), name


def test_csr_select_bad_keep():
    from sparseops.formats import CSRWeight

    f = CSRWeight.from_mask(torch.rand(4, 5) < 0.5)
    with pytest.raises(TypeError, match="keep"):
        f.select(torch.ones(f.nnz))
    with pytest.raises(ValueError, match="keep"):
        f.select(torch.ones(f.nnz + 1, dtype=torch.bool))


def test_prune_drops_values_and_optimizer_state():
    torch.manual_seed(2)
    layer = SparseLinear(16, 8, sparsity=0.5)
    opt = torch.optim.Adam(layer.parameters(), lr=1e-2)
    x = torch.randn(5, 16)
    layer(x).pow(2).mean().backward()
    opt.step()
    old = layer.values
    st = {k: v.clone() for k, v in opt.state[old].items()}
    dense_before = layer.dense_weight().detach().clone()
    keep = torch.rand(layer.nnz) < 0.6
    layer.prune_(keep, opt)
    assert layer.values is not old and any(p is layer.values for p in _opt_params(opt))
    assert torch.equal(layer.values.detach(), old.detach()[keep])
    assert torch.equal(opt.state[layer.values]["exp_avg"], st["exp_avg"][keep])
    assert torch.equal(opt.state[layer.values]["exp_avg_sq"], st["exp_avg_sq"][keep])
    assert torch.equal(opt.state[layer.values]["step"], st["step"])
    mask = layer.mask
    assert torch.equal(layer.dense_weight().detach(), torch.where(mask, dense_before, torch.zeros(())))
    torch.testing.assert_close(layer(x), F.linear(x, layer.dense_weight(), layer.bias))


def test_prune_refuses_structured_layers():
    layer = SparseLinear(8, 16, pattern=NM(2, 4))
    with pytest.raises(TypeError, match="prune_"):
        layer.prune_(torch.ones(layer.values.numel(), dtype=torch.bool))


# ---- refusals change nothing ----


def test_gradual_pruner_optimizer_must_hold_the_pruned_parameters():
    model = _mlp()
    opt = torch.optim.SGD(model[0].parameters(), lr=0.1)  # the first layer's only
    with pytest.raises(ValueError, match=r"^optimizer: does not hold 2\.weight"):
        GradualPruner(model, SF, T0, T1, EVERY, optimizer=opt)


def test_gradual_pruner_keeps_a_layer_already_sparser_than_the_schedule():
    # a SparseLinear built at 95% under a schedule that is at 52% at its first prune: it keeps all it holds
    model = nn.Sequential(nn.Linear(IN, HID), nn.ReLU(), SparseLinear(HID, OUT, sparsity=0.95))
    nnz = model[2].nnz
    pruner = GradualPruner(model, SF, T0, T1, EVERY, convert_at=None)
    for _ in range(5):  # through the prune at t = 5 (s = 0.52)
        pruner.step()
    assert model[2].nnz == nnz
    assert int((model[0].weight != 0).sum()) == NUMEL["0"] - round(0.52 * NUMEL["0"])


@pytest.mark.parametrize("state,match", [
    pytest.param({"step_count": 5, "sparsity": 0.3}, r"^state: expected a dict from state_dict\(\)", id="no-masks"),
    pytest.param({"step_count": 5, "sparsity": 0.3, "masks": {"0": torch.ones(1, IN)}},
                 r"^state\['masks'\]\['0'\]: expected a bool tensor of shape", id="float-mask-wrong-shape"),
    pytest.param({"step_count": 5, "sparsity": 0.3, "masks": {"1": torch.ones(HID, IN, dtype=torch.bool)}},
                 r"^state\['masks'\]: '1' is not a dense nn.Linear", id="not-a-target"),
    pytest.param({"step_count": 5, "sparsity": 1.5, "masks": {}}, r"state\['sparsity'\]", id="sparsity-1.5"),
    pytest.param({"step_count": -2, "sparsity": 0.3, "masks": {}}, r"^state\['step_count'\]", id="negative-step"),
])
def test_gradual_pruner_load_state_dict_refused_changes_nothing(state, match):
    pruner = GradualPruner(_mlp(), SF, T0, T1, EVERY)
    for _ in range(5):
        pruner.step()
    before = pruner.state_dict()
    with pytest.raises(ValueError, match=match):
        pruner.load_state_dict(state)
    after = pruner.state_dict()
    assert (after["step_count"], after["sparsity"]) == (before["step_count"], before["sparsity"])
    assert after["masks"].keys() == before["masks"].keys()
    assert all(torch.equal(after["masks"][k], before["masks"][k]) for k in before["masks"])


def test_imp_never_grows_keeps_the_activation_and_frozen_layers():
    # found by review: a round below a layer's current sparsity grew stored zeros; a fused activation
    # was dropped; a frozen layer came back trainable
    from sparseops.pruning import IterativeMagnitudePruning as IMP

    torch.manual_seed(0)
    model = nn.Sequential(SparseLinear(IN, HID, sparsity=0.9, activation="relu"), nn.Linear(HID, OUT))
    model[1].weight.requires_grad_(False)
    model.eval()
    imp = IMP(model, scope="layer")
    nnz0 = model[0].nnz
    model = imp.prune_and_rewind(0.5)  # below layer 0's 0.9: it keeps its mask, grows nothing
    assert model[0].nnz == nnz0
    assert model[0].activation == "relu" and model[0].act_bits == 1
    assert (model[0](torch.randn(6, IN)) >= 0).all()
    assert not model[1].values.requires_grad and model[1].bias.requires_grad
    assert not model[0].training and not model[1].training


def test_gradual_pruner_never_swaps_a_tied_layer():
    # found by review: the swap of a layer whose weight the embedding shares left the embedding's
    # parameter out of the optimizer, untrained; a module at two places was swapped at one of them
    torch.manual_seed(0)
    emb = nn.Embedding(10, 8)
    head = nn.Linear(8, 10, bias=False)
    head.weight = emb.weight
    shared = nn.Linear(8, 8)
    model = nn.ModuleDict({"emb": emb, "a": shared, "b": shared, "head": head, "other": nn.Linear(8, 8)})
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    pruner = GradualPruner(model, 0.9, start_step=0, end_step=2, every=1, optimizer=opt, convert_at=0.5)
    for _ in range(3):
        x = model["emb"](torch.arange(4))
        loss = model["head"](model["b"](model["a"](x))).square().mean() + model["other"](x).square().mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        pruner.step()
    assert isinstance(model["other"], SparseLinear)
    assert type(model["head"]) is nn.Linear and model["head"].weight is model["emb"].weight
    assert model["a"] is model["b"] and type(model["a"]) is nn.Linear
    held = {id(p) for g in opt.param_groups for p in g["params"]}
    assert id(model["emb"].weight) in held and id(model["a"].weight) in held
    assert (model["head"].weight == 0).float().mean().item() == pytest.approx(0.9, abs=0.02)


def test_imp_leaves_a_tied_layer_out():
    from sparseops.pruning import IterativeMagnitudePruning as IMP

    torch.manual_seed(0)
    emb = nn.Embedding(10, 8)
    head = nn.Linear(8, 10, bias=False)
    head.weight = emb.weight
    model = nn.ModuleDict({"emb": emb, "head": head, "other": nn.Linear(8, 8)})
    with pytest.warns(UserWarning, match="IterativeMagnitudePruning: left head out: the weight is shared"):
        imp = IMP(model, scope="layer")
    assert imp.names == ["other"]
    model = imp.prune_and_rewind(0.5)
    assert model["head"].weight is model["emb"].weight and isinstance(model["other"], SparseLinear)


def test_gradual_pruner_resumes_after_the_swap_from_a_fresh_sparsified_model():
    # after the swap the optimizer holds (values, bias) per layer, where nn.Linear's weight was; a fresh
    # sparsify_'d model must list its parameters in that order too, or the optimizer's state loads onto the
    # wrong tensors (it raised a size mismatch at the next step, or, had nnz equalled out_features, would
    # have trained silently wrong; review, 2026-11-24)
    import sparseops

    x, y = _data()
    torch.manual_seed(0)
    model = _mlp()
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    pruner = GradualPruner(model, SF, T0, T1, EVERY, optimizer=opt, convert_at=CONV)

    def train(m, o, p, steps):
        for _ in range(steps):
            o.zero_grad()
            F.mse_loss(m(x), y).backward()
            o.step()
            p.step()

    train(model, opt, pruner, 10)  # swapped at t = 8
    assert all(isinstance(model[int(n)], SparseLinear) for n in NAMES)
    buf = io.BytesIO()
    torch.save({"model": model.state_dict(), "opt": opt.state_dict(), "pruner": pruner.state_dict()}, buf)
    buf.seek(0)
    ck = torch.load(buf)

    fresh = sparseops.sparsify_(_mlp(), sparsity=0.5)  # any mask: the checkpoint's index replaces it
    fresh.load_state_dict(ck["model"])
    opt2 = torch.optim.Adam(fresh.parameters(), lr=1e-2)
    opt2.load_state_dict(ck["opt"])
    pruner2 = GradualPruner(fresh, SF, T0, T1, EVERY, optimizer=opt2, convert_at=CONV)
    pruner2.load_state_dict(ck["pruner"])
    train(model, opt, pruner, 6)
    train(fresh, opt2, pruner2, 6)
    for n in NAMES:
        torch.testing.assert_close(_dense_w(fresh[int(n)]), _dense_w(model[int(n)]), rtol=0, atol=0)
        torch.testing.assert_close(fresh[int(n)].bias, model[int(n)].bias, rtol=0, atol=0)


def test_imp_resumes_from_a_checkpoint():
    # a run of rounds interrupted mid-round: the model's state_dict restores the layers, the pruner's
    # state_dict the rewind point. A pruner built over the restored model alone would snapshot the
    # mid-round weights and rewind there
    import copy
    import io

    from sparseops.pruning import IterativeMagnitudePruning as IMP

    x, y = _data()
    model = _imp_model()
    imp = IMP(model)
    _imp_train(model, x, y)
    model = imp.prune_and_rewind(0.5)
    _imp_train(model, x, y, steps=3)  # mid-round: the checkpoint
    buf = io.BytesIO()
    torch.save({"model": model.state_dict(), "imp": imp.state_dict()}, buf)

    restored = copy.deepcopy(model)  # the same structure, then the checkpoint's state
    with torch.no_grad():
        for p in restored.parameters():
            p.add_(1.0)
    buf.seek(0)
    ck = torch.load(buf)
    restored.load_state_dict(ck["model"])
    fresh = IMP(restored)  # snapshots the mid-round weights
    naive = copy.deepcopy(restored)
    fresh_naive = IMP(naive)
    fresh.load_state_dict(ck["imp"])

    for m in (model, restored, naive):
        _imp_train(m, x, y, steps=2)
    a, b, c = imp.prune_and_rewind(0.75), fresh.prune_and_rewind(0.75), fresh_naive.prune_and_rewind(0.75)
    for n in NAMES:
        assert torch.equal(a.get_submodule(n).mask, b.get_submodule(n).mask)
        assert torch.equal(a.get_submodule(n).dense_weight(), b.get_submodule(n).dense_weight())
    assert torch.equal(a[3].weight, b[3].weight)
    # without the pruner's state, the rewind lands elsewhere
    assert not all(torch.equal(a.get_submodule(n).dense_weight(), c.get_submodule(n).dense_weight()) for n in NAMES)


def test_imp_load_state_dict_refuses_a_foreign_state():
    from sparseops.pruning import IterativeMagnitudePruning as IMP

    imp = IMP(_imp_model())
    good = imp.state_dict()
    before = {k: v.clone() for k, v in imp._weights.items()}
    bad_shape = {**good, "weights": {**good["weights"], "0": torch.zeros(3, 3)}}
    with pytest.raises(ValueError, match=r"state\['weights'\]\['0'\]"):
        imp.load_state_dict(bad_shape)
    with pytest.raises(ValueError, match=r"state\['weights'\]\['2'\]: expected a torch.float32"):
        imp.load_state_dict({**good, "weights": {**good["weights"], "2": good["weights"]["2"].double()}})
    with pytest.raises(ValueError, match=r"state\['names'\]"):
        imp.load_state_dict({**good, "names": ["0"]})
    with pytest.raises(ValueError, match=r"state\['others'\]"):
        imp.load_state_dict({**good, "others": {}})
    with pytest.raises(ValueError, match=r"state\['biases'\]\['2'\]"):
        imp.load_state_dict({**good, "biases": {**good["biases"], "2": None}})
    with pytest.raises(ValueError, match="state"):
        imp.load_state_dict([])
    # nothing changed
    assert all(torch.equal(imp._weights[k], before[k]) for k in before)
