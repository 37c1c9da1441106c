"""The profiler CLI end to end at tiny sizes: table, JSON and PNG written and parseable."""

import json
from pathlib import Path

import pytest

from sparseops import profile


def _load(out: Path) -> dict:
    data = json.loads((out / "profile.json").read_text())
    assert data["meta"]["statistic"] == "median"
    return data


def test_profile_quick_default(tmp_path, capsys):
    out = tmp_path / "prof"
    assert profile.main(["--quick", "--threads", "1", "--out", str(out), "--trace", str(tmp_path / "trace.json")]) == 0
    data = _load(out)
    rows = data["measurements"]
    layers = {r["layer"] for r in rows}
    assert layers == {"attn.qkv", "attn.out", "mlp.up", "mlp.down"}
    # every pattern the package has, by default: the swept ones at each quick sparsity (0.5, 0.9),
    # the others once; dense too; both modes, every layer
    swept = {"unstructured": 2, "fanin": 2, "block32": 2}
    fixed = {"2:4": 1, "1:4": 1, "2:8": 1, "2:4T": 1, "butterfly16x2b32": 1, "monarch4": 1}
    assert data["meta"]["skipped"] == []
    count = {}
    for r in rows:
        count[(r["layer"], r["mode"], r["pattern"])] = count.get((r["layer"], r["mode"], r["pattern"]), 0) + 1
    want = {(layer, mode, p): n for layer in layers for mode in ("fwd", "fwdbwd")
            for p, n in {"dense": 1, **swept, **fixed}.items()}
    assert count == want
    for r in rows:
        assert r["time_ms"] > 0
        if r["pattern"] != "dense":
            assert r["rel_error"] < 1e-3
        if r["pattern"] in swept:
            # block sparsity comes in whole blocks: 16 of them in a 128x128 layer of 32-wide blocks
            tol = 1 / 16 if r["pattern"] == "block32" else 0.02
            assert r["target_sparsity"] in (0.5, 0.9) and r["sparsity"] == pytest.approx(r["target_sparsity"], abs=tol)
        else:
            assert r["target_sparsity"] is None
    by = {(r["layer"], r["mode"], r["pattern"], r["target_sparsity"]): r for r in rows}
    for layer in layers:
        # the sparsity each fixed pattern stores: n:m exactly, Monarch's two factors, the butterfly's blocks
        assert by[(layer, "fwd", "2:4", None)]["sparsity"] == pytest.approx(0.5)
        assert by[(layer, "fwd", "1:4", None)]["sparsity"] == pytest.approx(0.75)
        assert 0 < by[(layer, "fwd", "monarch4", None)]["sparsity"] < 1
    sparse90 = [r for r in rows if r["target_sparsity"] == 0.9]
    dense = {(r["layer"], r["mode"]): r for r in rows if r["pattern"] == "dense"}
    # at 90% the stored values + index take less memory than the dense weight
    for r in sparse90:
        assert r["weight_bytes"] < dense[(r["layer"], r["mode"])]["weight_bytes"]
    png = out / "speedup.png"
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    trace = json.loads((tmp_path / "trace.json").read_text())
    assert "traceEvents" in trace
    printed = capsys.readouterr().out
    assert "mlp.down" in printed and "speedup" in printed


def test_profile_user_model(tmp_path, monkeypatch):
    monkeypatch.syspath_prepend(str(Path(__file__).parent))
    out = tmp_path / "prof"
    code = profile.main(
        ["--model", "profile_user_model:make", "--input-shape", "2,5,32", "--sparsity", "0.8", "--modes", "fwd",
         "--threads", "1", "--warmup", "0", "--repeats", "1", "--out", str(out)]
    )
    assert code == 0
    rows = _load(out)["measurements"]
    assert {r["layer"] for r in rows} == {"0.up", "0.down", "1.up", "1.down"}
    # the model's own weights are profiled, with its real row count (2 * 5 tokens)
    assert all(r["batch"] == 10 for r in rows)


def test_profile_rejects_bad_options(tmp_path):
    with pytest.raises(SystemExit):
        profile.main(["--modes", "backward", "--out", str(tmp_path)])
    with pytest.raises(ValueError, match="--shapes"):
        profile.main(["--shapes", "12by3", "--out", str(tmp_path)])
    with pytest.raises(ValueError, match="--sparsity"):
        profile.main(["--shapes", "8x8", "--sparsity", "1.5", "--out", str(tmp_path)])
    # a zero that used to fall back to the default (--batch) or fail deep inside (--repeats: no median)
    for opt, val in (("--batch", "0"), ("--repeats", "0"), ("--warmup", "-1"), ("--width", "0")):
        with pytest.raises(SystemExit, match=opt):
            profile.main(["--shapes", "8x8", opt, val, "--out", str(tmp_path)])
    with pytest.raises(SystemExit, match="--device"):
        profile.main(["--device", "meta", "--out", str(tmp_path)])


def test_profile_quick_keeps_the_repeats_and_warmup_given(tmp_path):
    out = tmp_path / "prof"
    assert profile.main(["--quick", "--shapes", "32x16", "--patterns", "unstructured", "--modes", "fwd",
                         "--threads", "1", "--warmup", "2", "--repeats", "5", "--out", str(out)]) == 0
    data = _load(out)
    assert (data["meta"]["warmup"], data["meta"]["repeats"]) == (2, 5)


def test_profile_fixed_sparsity_patterns(tmp_path):
    out = tmp_path / "prof"
    code = profile.main(
        ["--shapes", "64x32", "--batch", "8", "--patterns", "unstructured,2:4,fanin:8", "--sparsity", "0.5,0.9",
         "--modes", "fwdbwd", "--threads", "1", "--warmup", "0", "--repeats", "1", "--out", str(out)]
    )
    assert code == 0
    rows = _load(out)["measurements"]
    by_pattern = {}
    for r in rows:
        by_pattern.setdefault(r["pattern"], []).append(r["sparsity"])
    # unstructured sweeps; n:m and fan-in are one point each, at the sparsity they fix
    assert sorted(by_pattern["unstructured"]) == pytest.approx([0.5, 0.9], abs=0.01)
    assert by_pattern["2:4"] == [pytest.approx(0.5)]
    assert by_pattern["fanin8"] == [pytest.approx(1 - 8 / 64)]


def test_profile_skips_a_pattern_that_does_not_fit(tmp_path, capsys):
    # a fan-in of 100 does not fit a layer of 64 inputs: noted, not fatal
    out = tmp_path / "prof"
    code = profile.main(
        ["--shapes", "64x64", "--batch", "4", "--patterns", "unstructured,fanin:100", "--sparsity", "0.5",
         "--modes", "fwd", "--threads", "1", "--warmup", "0", "--repeats", "1", "--out", str(out)]
    )
    assert code == 0
    data = _load(out)
    assert {r["pattern"] for r in data["measurements"]} == {"dense", "unstructured"}
    assert len(data["meta"]["skipped"]) == 1 and "fanin100" in data["meta"]["skipped"][0]
    assert "fanin100 skipped" in capsys.readouterr().out


def test_parse_patterns():
    ps = profile.parse_patterns(profile.DEFAULT_PATTERNS)
    assert [p.name for p in ps] == ["unstructured", "2:4", "1:4", "2:8", "2:4T", "fanin", "block32",
                                    "butterfly16x2b32", "monarch4"]
    with pytest.raises(ValueError, match="--patterns"):
        profile.parse_patterns(" , ")
    with pytest.raises(ValueError, match="unknown pattern"):
        profile.parse_patterns("unstructured,3:3x")


def test_profile_dtype(tmp_path):
    # bfloat16 layers and inputs: every pattern checked against dense at a bf16 tolerance, the dtype recorded
    out = tmp_path / "prof"
    code = profile.main(
        ["--shapes", "64x32", "--batch", "4", "--patterns", "unstructured,2:4,block:16,monarch:2", "--sparsity", "0.5",
         "--modes", "fwd,fwdbwd", "--dtype", "bfloat16", "--threads", "1", "--warmup", "0", "--repeats", "1",
         "--out", str(out), "--trace", str(tmp_path / "trace.json")]
    )
    assert code == 0
    data = _load(out)
    assert data["meta"]["dtype"] == "bfloat16"
    rows = data["measurements"]
    assert {r["pattern"] for r in rows} == {"dense", "unstructured", "2:4", "block16", "monarch2"}
    assert all(r["rel_error"] < 2e-2 for r in rows if r["pattern"] != "dense")
    # bf16 weights: half the bytes of the fp32 dense layer's 64*32*4 + 32*4
    dense = [r for r in rows if r["pattern"] == "dense"][0]
    assert dense["weight_bytes"] == (64 * 32 + 32) * 2
    with pytest.raises(SystemExit):
        profile.main(["--dtype", "float64", "--out", str(tmp_path)])


def test_fwdbwd_step_starts_every_call_from_fresh_gradients():
    """A timed forward+backward is a training step after optimizer.zero_grad(): its gradients start from
    None. Before, each call also added into the last call's .grad, a pass over every dense weight that
    inflated the dense time (and flipped only_if_faster's choice at small batch)."""
    import torch
    from torch import nn

    import sparseops

    torch.manual_seed(0)
    for layer in (nn.Linear(16, 8), sparseops.SparseLinear(16, 8, sparsity=0.5)):
        step = profile._make_step(layer, torch.randn(3, 16), "fwdbwd")
        step()
        first = [p.grad.clone() for p in layer.parameters()]
        step()
        for p, g in zip(layer.parameters(), first):
            assert torch.equal(p.grad, g), "the second call's gradient must equal the first, not twice it"


def test_bench_step_fn_starts_every_call_from_fresh_gradients():
    import sys

    import torch
    from torch import nn

    sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "bench"))
    try:
        from providers import step_fn
    finally:
        sys.path.pop(0)
    layer = nn.Linear(16, 8)
    run = step_fn(layer, torch.randn(3, 16), "fwdbwd")
    run()
    first = layer.weight.grad.clone()
    run()
    assert torch.equal(layer.weight.grad, first)
