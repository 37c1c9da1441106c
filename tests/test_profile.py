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
    # dense plus each quick sparsity, both modes, for every layer
    assert len(rows) == 4 * 2 * (1 + 2)
    for r in rows:
        assert r["time_ms"] > 0
        if r["pattern"] != "dense":
            assert r["rel_error"] < 1e-3
    sparse90 = [r for r in rows if r["sparsity"] == 0.9]
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
