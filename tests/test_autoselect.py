"""sparsify_(only_if_faster=True), its decision cache and explain(), with injected timers (no real timing)."""

import json

import pytest
import torch
from torch import nn

import sparseops
from sparseops import SparseLinear, autoselect


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.wide = nn.Linear(64, 96)
        self.narrow = nn.Linear(96, 8)
        self.head = nn.Linear(8, 3, bias=False)

    def forward(self, x):
        return self.head(torch.relu(self.narrow(torch.relu(self.wide(x)))))


def _timer(faster_when, calls=None):
    """A timer: the sparse layer takes 1 ms where ``faster_when(layer)`` holds, else 3 ms; dense 2 ms.
    ``calls`` collects (layer kind, in, out) per call, so tests see what was measured."""

    def timer(layer, step):
        step()  # the step must run: it is what a real timer would time
        kind = "sparse" if isinstance(layer, (SparseLinear, sparseops.MonarchLinear)) else "dense"
        if calls is not None:
            calls.append((kind, layer.in_features, layer.out_features))
        if kind == "dense":
            return 2.0
        return 1.0 if faster_when(layer) else 3.0

    return timer


def test_keeps_dense_where_sparse_is_not_faster(tmp_path):
    model = Net()
    x = torch.randn(5, 64)
    ref = {n: m.weight.detach().clone() for n, m in model.named_modules() if isinstance(m, nn.Linear)}
    timer = _timer(lambda layer: layer.out_features >= 8)  # head (8->3) loses
    sparseops.sparsify_(model, 0.5, only_if_faster=True, batch=4, mode="fwd", timer=timer, cache=tmp_path)
    assert isinstance(model.wide, SparseLinear) and isinstance(model.narrow, SparseLinear)
    assert type(model.head) is nn.Linear
    assert torch.equal(model.head.weight, ref["head"])  # kept dense: untouched, not pruned
    dec = model.head._sparseops_decision
    assert dec.chose == "dense" and dec.dense_ms == 2.0 and dec.sparse_ms == 3.0 and dec.source == "measured"
    assert dec.batch == 4 and dec.mode == "fwd" and dec.pattern == "unstructured" and dec.sparsity == 0.5
    assert model.wide._sparseops_decision.chose == "sparse" and model.wide._sparseops_decision.speedup == 2.0
    # the decision is a plain attribute: the state_dict is what it would be without it
    assert not any("decision" in k for k in model.state_dict())
    model(x)


def test_explain_names_every_layer_and_why(tmp_path, capsys):
    model = Net()
    sparseops.sparsify_(model, 0.5, only_if_faster=True, batch=4, mode="fwdbwd",
                        timer=_timer(lambda layer: layer.in_features == 64), cache=tmp_path)
    text = sparseops.explain(model)
    assert capsys.readouterr().out.strip() == text
    lines = dict(line.split(" ", 1) for line in text.splitlines())
    assert set(lines) == {"wide", "narrow", "head"}
    assert lines["wide"].startswith("[64->96]: sparse") and "1.000 ms against 2.000 ms (2.00x, measured)" in lines["wide"]
    assert lines["narrow"].startswith("[96->8]: dense") and "not faster" in lines["narrow"]
    assert "fwdbwd" in lines["narrow"] and "B=4" in lines["narrow"]
    # without only_if_faster: sparse, not measured; an untouched linear: dense, not swapped
    other = nn.Sequential(nn.Linear(16, 16), nn.Linear(16, 4))
    sparseops.sparsify_(other, 0.5, filter_fn=lambda m, fqn: fqn == "0")
    text = sparseops.explain(other)
    assert "0 [16->16]: sparse (unstructured, 50%)" in text and "not measured" in text
    assert "1 [16->4]: dense — not swapped" in text


def test_cache_measures_once_per_key(tmp_path):
    calls = []
    timer = _timer(lambda layer: True, calls)
    sparseops.sparsify_(Net(), 0.5, only_if_faster=True, batch=4, mode="fwd", timer=timer, cache=tmp_path)
    assert len(calls) == 6  # three layers, dense and sparse
    data = json.loads((tmp_path / "decisions.json").read_text())
    assert len(data) == 3 and all(set(v) == {"dense_ms", "sparse_ms"} for v in data.values())

    def must_not_time(layer, step):
        pytest.fail("a cached decision was measured again")

    model = sparseops.sparsify_(Net(), 0.5, only_if_faster=True, batch=4, mode="fwd", timer=must_not_time,
                                cache=tmp_path)
    assert all(m._sparseops_decision.source == "cache" for m in (model.wide, model.narrow, model.head))
    assert isinstance(model.head, SparseLinear)
    # another batch, mode or sparsity is another key: measured again
    for kw in ({"batch": 8, "mode": "fwd"}, {"batch": 4, "mode": "fwdbwd"}):
        calls.clear()
        sparseops.sparsify_(Net(), 0.5, only_if_faster=True, timer=timer, cache=tmp_path, **kw)
        assert len(calls) == 6
    calls.clear()
    sparseops.sparsify_(Net(), 0.7, only_if_faster=True, batch=4, mode="fwd", timer=timer, cache=tmp_path)
    assert len(calls) == 6


def test_cache_off_and_corrupt_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("SPARSEOPS_CACHE_DIR", str(tmp_path / "env"))
    assert autoselect.default_cache_dir() == tmp_path / "env"
    sparseops.sparsify_(Net(), 0.5, only_if_faster=True, batch=2, mode="fwd", timer=_timer(lambda m: True), cache=False)
    assert not (tmp_path / "env").exists()
    # the default cache directory is the environment's; a corrupt file is measured over and rewritten
    (tmp_path / "env").mkdir()
    (tmp_path / "env" / "decisions.json").write_text("{not json")
    calls = []
    sparseops.sparsify_(Net(), 0.5, only_if_faster=True, batch=2, mode="fwd", timer=_timer(lambda m: True, calls))
    assert len(calls) == 6
    assert len(json.loads((tmp_path / "env" / "decisions.json").read_text())) == 3
    # one corrupt entry (found by review: float(None) raised) is measured over too, the others read
    data = json.loads((tmp_path / "env" / "decisions.json").read_text())
    key = sorted(data)[0]
    data[key]["dense_ms"] = None
    (tmp_path / "env" / "decisions.json").write_text(json.dumps(data))
    calls = []
    sparseops.sparsify_(Net(), 0.5, only_if_faster=True, batch=2, mode="fwd", timer=_timer(lambda m: True, calls))
    assert len(calls) == 2
    assert json.loads((tmp_path / "env" / "decisions.json").read_text())[key]["dense_ms"] is not None


def test_default_mode_follows_training_flag(tmp_path):
    model = Net().eval()
    sparseops.sparsify_(model, 0.5, only_if_faster=True, batch=2, timer=_timer(lambda m: True), cache=tmp_path)
    assert model.wide._sparseops_decision.mode == "fwd"
    model = Net().train()
    sparseops.sparsify_(model, 0.5, only_if_faster=True, batch=2, timer=_timer(lambda m: True), cache=tmp_path)
    assert model.wide._sparseops_decision.mode == "fwdbwd"


def test_default_timer_is_the_profilers_median(tmp_path, monkeypatch):
    # the real timer is profile.median_time_ms with the warm-up and repeats of decide(); replaced by
    # a fake here, so nothing is timed: the sparse layer gets 1 ms, dense 2 ms
    from sparseops import profile

    seen = []

    def fake_median(fn, device, warmup, repeats, timer=None):
        fn()
        seen.append((warmup, repeats))
        return 2.0 if len(seen) % 2 else 1.0  # decide() times dense first, then sparse

    monkeypatch.setattr(profile, "median_time_ms", fake_median)
    model = sparseops.sparsify_(Net(), 0.5, only_if_faster=True, batch=2, mode="fwd", cache=tmp_path)
    assert seen and all(w >= 1 and r >= 5 for w, r in seen)
    assert isinstance(model.wide, SparseLinear) and model.wide._sparseops_decision.speedup == 2.0


def test_patterns_and_monarch(tmp_path):
    for pattern in ["2:4", "block:8", "monarch:2"]:
        model = Net()
        sp = 0.5 if pattern.startswith("block") else None
        sparseops.sparsify_(model, sp, pattern=pattern, only_if_faster=True, batch=3, mode="fwd",
                            timer=_timer(lambda m: m.in_features == 64), cache=tmp_path)
        assert type(model.wide) is not nn.Linear and type(model.narrow) is nn.Linear
        assert model.wide._sparseops_decision.pattern.startswith(pattern.split(":")[0])


@pytest.mark.parametrize(
    "kw, err, match",
    [
        ({}, ValueError, "batch"),
        ({"batch": 0}, ValueError, "batch"),
        ({"batch": True}, ValueError, "batch"),
        ({"batch": 2, "mode": "bwd"}, ValueError, "mode"),
        ({"batch": 2, "timer": 3}, TypeError, "timer"),
        ({"batch": 2, "cache": 3}, TypeError, "cache"),
    ],
)
def test_bad_arguments_leave_the_model_unchanged(kw, err, match):
    model = Net()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(err, match=match):
        sparseops.sparsify_(model, 0.5, only_if_faster=True, **kw)
    assert all(type(m) is nn.Linear for m in (model.wide, model.narrow, model.head))
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in before.items())


def test_bad_timer_value_and_wrong_kernel_leave_the_model_unchanged(tmp_path, monkeypatch):
    model = Net()
    with pytest.raises(ValueError, match="timer"):
        sparseops.sparsify_(model, 0.5, only_if_faster=True, batch=2, mode="fwd",
                            timer=lambda layer, step: float("nan"), cache=tmp_path)
    assert all(type(m) is nn.Linear for m in (model.wide, model.narrow, model.head))
    # a sparse layer whose output disagrees with its own dense weight is never timed
    monkeypatch.setattr(SparseLinear, "forward", lambda self, x: torch.zeros(x.shape[0], self.out_features))
    with pytest.raises(RuntimeError, match="not timed"):
        sparseops.sparsify_(model, 0.5, only_if_faster=True, batch=2, mode="fwd",
                            timer=_timer(lambda m: True), cache=tmp_path)
    assert all(type(m) is nn.Linear for m in (model.wide, model.narrow, model.head))


def test_timing_backward_leaves_no_gradients(tmp_path):
    # fwdbwd timing runs backward: the kept layers' .grad must be what it was, the new ones' None
    model = Net()
    model.head.weight.grad = torch.full_like(model.head.weight, 7.0)
    sparseops.sparsify_(model, 0.5, only_if_faster=True, batch=3, mode="fwdbwd",
                        timer=_timer(lambda layer: layer.in_features == 64), cache=tmp_path)
    assert type(model.head) is nn.Linear and torch.equal(model.head.weight.grad, torch.full_like(model.head.weight, 7.0))
    assert type(model.narrow) is nn.Linear and model.narrow.weight.grad is None and model.narrow.bias.grad is None
    assert isinstance(model.wide, SparseLinear) and all(p.grad is None for p in model.wide.parameters())
