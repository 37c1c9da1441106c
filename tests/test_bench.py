"""The benchmark harness works end to end: pytest-benchmark's JSON, --benchmark-compare between two
saved runs, and bench/ratio.py turning a JSON into the README's table, for every suite.

Each case runs the smallest benchmark of a suite in a subprocess (as a user would) and checks what
the tools print and write; no time is asserted.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
BENCH = ROOT / "bench"


def _run(args, cwd=ROOT, env=None, timeout=600):
    proc = subprocess.run([sys.executable, *args], cwd=cwd, capture_output=True, text=True, timeout=timeout,
                          env={**os.environ, **(env or {})})
    assert proc.returncode == 0, f"{args} failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    return proc.stdout


def _bench(node_ids, tmp_path, *extra, env=None):
    return _run(["-m", "pytest", *node_ids, "--benchmark-only", "-q", "-p", "no:cacheprovider",
                 f"--benchmark-storage=file://{tmp_path / 'storage'}", *extra], env=env)


CSR = [f"bench/bench_csr.py::test_linear[B128-in512-out256-sp0.9-fwd-{p}]" for p in ("dense", "sparseops")]


def test_benchmark_json_autosave_and_compare(tmp_path):
    first = tmp_path / "first.json"
    _bench(CSR, tmp_path, f"--benchmark-json={first}", "--benchmark-autosave")
    data = json.loads(first.read_text())
    assert {b["extra_info"]["provider"] for b in data["benchmarks"]} == {"dense", "sparseops"}
    assert all(b["stats"]["median"] > 0 for b in data["benchmarks"])
    saved = list((tmp_path / "storage").rglob("0001_*.json"))
    assert len(saved) == 1
    # the second run is compared with the first, saved one: both appear in the table it prints
    out = _bench(CSR, tmp_path, "--benchmark-compare=0001", "--benchmark-columns=median")
    assert "0001" in out and "NOW" in out, out[-2000:]
    table = _run([str(BENCH / "ratio.py"), "--json", str(first)])
    assert "| 128 | 512→256 | 0.9 | fwd |" in table


# suite: (the start of the row the case gives, its node ids, how many of the row's cells are "-")
SUITES = {
    "nm": ("| 2:4 | 64 | 1024→1024 | fwd |",
           [f"bench/bench_nm.py::test_nm_linear[B64-in1024-out1024-2:4-fwd-{p}]"
            for p in ("dense", "sparseops", "sparseops_csr")], 0),
    "block": ("| bsr90 | 64 | 1024→1024 | fwd |",
              [f"bench/bench_block.py::test_block_linear[B64-in1024-out1024-bsr90-fwd-{p}]"
               for p in ("dense", "sparseops")], 0),
    "act": ("| decode | 1 | 4096→11008 | 0.9 |",
            # the weight-only columns are for the both-savings rows: "-" here
            [f"bench/bench_act.py::test_act_decode[B1-in4096-out11008-sp0.9-{p}]" for p in ("dense", "sparseops")], 2),
    "half": ("| act | 1 | 4096→11008 | 0.9 | fwd |",
             [f"bench/bench_half.py::test_half[act-B1-in4096-out11008-sp0.9-fwd-{p}]" for p in ("dense", "sparseops")],
             0),
    "fewbit": ("| relu | float32 | 131072 |",
               # relu runs at 1 bit only: the 2- to 4-bit times and ratios are "-"
               [f"bench/bench_fewbit.py::test_activation[torch.float32-relu-{p}-n131072]" for p in ("torch", "fewbit1")],
               6),
}


@pytest.mark.parametrize("suite", sorted(SUITES))
def test_ratio_table_of_each_suite(suite, tmp_path):
    row, nodes, dashes = SUITES[suite]
    path = tmp_path / f"{suite}.json"
    _bench(nodes, tmp_path, f"--benchmark-json={path}")
    assert len(json.loads(path.read_text())["benchmarks"]) == len(nodes)
    table = _run([str(BENCH / "ratio.py"), "--suite", suite, "--json", str(path)])
    lines = [line for line in table.splitlines() if line.startswith(row)]
    assert len(lines) == 1, table
    # every provider of the case was measured: its time and ratio cells are numbers, not "-"
    cells = [c.strip() for c in lines[0].strip("|").split("|")]
    assert cells.count("-") == dashes, lines[0]


def test_gpu_suite_dry_run_and_its_ratio_table(tmp_path):
    # bench_gpu.py's own code (builders, checks, records) at tiny sizes on the CPU, and ratio.py
    # reading the per-case JSONL records it writes
    records = tmp_path / "gpu.jsonl"
    env = {"SPARSEOPS_BENCH_GPU_DRY": "1", "SPARSEOPS_GPU_RESULTS": str(records)}
    _bench(["bench/bench_gpu.py", "-k", "test_family_train or test_decode or test_fewbit"], tmp_path, env=env)
    recs = [json.loads(line) for line in records.read_text().splitlines()]
    assert {r["case"] for r in recs} >= {"family fwd", "family fwdbwd", "decode", "fewbit gelu"}
    table = _run([str(BENCH / "ratio.py"), "--suite", "gpu", "--json", str(records)])
    assert "| family fwdbwd | bf16 | 64 | 64→48 | monarch4 |" in table


def test_ab_dst_prints_a_row_per_build_and_case():
    """bench/ab_dst.py, this checkout against itself on a small layer: a table row per (case, build) with
    four numbers each (no time is asserted)."""
    out = _run(["bench/ab_dst.py", "--before", ".", "--after", ".", "--widths", "256", "--methods", "set", "rigl",
                "--pairs", "1"])
    rows = [line for line in out.splitlines() if line.startswith("| 256 |")]
    assert [r.split("|")[2:4] for r in rows] == [[" set ", " before "], [" set ", " after "],
                                                 [" rigl ", " before "], [" rigl ", " after "]]
    for r in rows:
        cells = [c.strip() for c in r.strip("|").split("|")]
        step, upd, grad, ratio = (float(c) for c in cells[3:])
        assert step > 0 and upd > 0 and ratio == ratio  # numbers, not nan
        assert (grad > 0) == (cells[1] == "rigl")


def test_ab_calls_prints_a_row_per_build_and_case():
    """bench/ab_calls.py, this checkout against itself with few calls: a row per (case, build) with both
    times and their ratio (no time is asserted; each worker checks its case against the anchor first)."""
    out = _run(["bench/ab_calls.py", "--before", ".", "--after", ".", "--pairs", "1", "--scale", "0.01",
                "--cases", "csr64-b1-infer", "nm256-b8-train", "fewbit-relu-131k"])
    rows = [[c.strip() for c in line.strip("|").split("|")] for line in out.splitlines()
            if line.startswith("| ") and not line.startswith("| case")]
    assert [r[:2] for r in rows] == [["csr64-b1-infer", "before"], ["csr64-b1-infer", "after"],
                                     ["nm256-b8-train", "before"], ["nm256-b8-train", "after"],
                                     ["fewbit-relu-131k", "before"], ["fewbit-relu-131k", "after"]]
    for r in rows:
        op, anchor, ratio = (float(c) for c in r[2:])
        assert op > 0 and anchor > 0 and abs(ratio - anchor / op) < 0.01 + 0.01 * ratio


def test_memory_relu_prints_the_saved_bytes_of_both_blocks():
    """bench/memory_relu.py on a small block: torch keeps 4 bytes per hidden element (the ReLU's output, saved
    once), sparseops its 1-bit mask plus 4 bytes per nonzero, and both compute the same outputs."""
    out = _run(["bench/memory_relu.py", "--width", "64", "--hidden", "256", "--batch", "32", "--zeros", "0.75"])
    zeros = float(out.split("hidden zeros ")[1].split()[0])
    rows = {line.split("|")[1].strip().split()[0]: [c.strip() for c in line.strip("|").split("|")]
            for line in out.splitlines() if line.startswith("| torch") or line.startswith("| sparseops")}
    assert float(rows["torch"][3]) == 4.0
    assert abs(float(rows["sparseops"][3]) - (1 / 8 + 4 * (1 - zeros))) < 0.01
    assert float(out.split("largest output difference: ")[1].split()[0]) < 1e-4


def test_bench_checks_the_gradients_of_a_timed_training_step(monkeypatch):
    # the suites time forward+backward only after check(..., "fwdbwd") has compared both gradients with fp64
    import torch

    monkeypatch.syspath_prepend(str(BENCH))
    from providers import build, check, make_case

    lin, mask, x = make_case(16, 96, 40, 0.9)
    layer = build("sparseops", lin, mask)
    check(layer, lin, x, "fwdbwd")
    # a wrong input gradient, then a wrong weight gradient, are caught
    h = layer.register_full_backward_hook(lambda m, gi, go: (gi[0] * 2,))
    with pytest.raises(AssertionError, match="input gradient"):
        check(layer, lin, x, "fwdbwd")
    h.remove()
    layer.values.register_hook(lambda g: g * 2)
    with pytest.raises(AssertionError, match="weight gradient"):
        check(layer, lin, x, "fwdbwd")
    assert torch.equal(layer.values.detach(), lin.weight.detach()[mask])  # nothing the check did moved the weights


def test_ab_nm_ops_checks_and_times_each_product():
    """bench/ab_nm_ops.py on a small layer: a row for dense and each of the three products, a pattern each
    (the script checks every product against fp64 before it times it, and exits non-zero if one is off)."""
    out = _run(["bench/ab_nm_ops.py", "--features", "128", "--batch", "16", "--rounds", "2", "--calls", "1",
                "--pattern", "2:4", "2:4T"], cwd=ROOT)
    rows = [line for line in out.splitlines() if line.startswith("| 2:4")]
    assert [r.split("|")[2].strip() for r in rows] == ["dense x@Wt", "forward", "input grad", "weight grad"] * 2
