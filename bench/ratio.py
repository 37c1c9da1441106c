"""Print the ratio table of a benchmark suite, from one run.

    python bench/ratio.py                  # runs bench_csr.py with pytest-benchmark, then prints
    python bench/ratio.py --json run.json  # prints from an earlier --benchmark-json file
    python bench/ratio.py -k "B256"        # passes -k through to pytest
    python bench/ratio.py --suite fewbit   # bench_fewbit.py: torch's activation / few-bit one
    python bench/ratio.py --suite nm       # bench_nm.py: dense / N:M, and the same mask as CSR
    python bench/ratio.py --suite block    # bench_block.py: dense / BSR, butterfly, Pixelfly, Monarch
    python bench/ratio.py --suite act      # bench_act.py: dense / activation-sparse (decode and ReLU training)
    python bench/ratio.py --suite half     # bench_half.py: dense bf16 / the sparse layers in bf16 (CPU)
    python bench/ratio.py --suite gpu      # bench_gpu.py (CUDA): dense / each provider, host and event times

For csr: dense/sparse and anchor/sparseops. For fewbit: torch time / few-bit time per bit count.

Ratios use the median time of each case. Every provider of a case runs back to back in the
same pytest session, so the ratios compare like with like on a noisy machine.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from collections import defaultdict
from pathlib import Path

HERE = Path(__file__).parent


def run_suite(json_path: Path, keyword: str | None, suite: str = "csr") -> None:
    cmd = [sys.executable, "-m", "pytest", str(HERE / f"bench_{suite}.py"), "--benchmark-only", "-q", "-p", "no:cacheprovider"]
    cmd += [f"--benchmark-json={json_path}", "--benchmark-columns=median,iqr,rounds"]
    if keyword:
        cmd += ["-k", keyword]
    subprocess.run(cmd, check=True, cwd=HERE)


def _load_table(json_path: Path, key, value=lambda b: b["stats"]["median"] * 1e3):
    """``(machine_info, {key(extra_info): {provider: value(benchmark)}})`` of a pytest-benchmark JSON."""
    data = json.loads(json_path.read_text())
    table = defaultdict(dict)
    for b in data["benchmarks"]:
        e = b["extra_info"]
        table[key(e)][e["provider"]] = value(b)
    return data.get("machine_info", {}), table


def _header(machine, what: str, columns) -> list:
    """The first lines of a CPU table: the machine and what the numbers are, a blank line, the column header."""
    cpu = machine.get("cpu", {})
    return [f"machine: {cpu.get('brand_raw', '?')}, {cpu.get('count', '?')} cpus; {what}", "",
            "| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]


def load_fewbit(json_path: Path):
    return _load_table(json_path, lambda e: (e["activation"], e["dtype"], e["n"]))


def render_fewbit(machine, table) -> str:
    bits = ["fewbit1", "fewbit2", "fewbit3", "fewbit4"]
    lines = _header(
        machine, "forward+backward medians (ms); ratio = torch / few-bit, > 1 means the few-bit activation is faster",
        ["activation", "dtype", "n", "torch ms", *(f"{b[-1]}-bit ms" for b in bits),
         *(f"torch/{b[-1]}-bit" for b in bits)],
    )
    for key in sorted(table):
        act, dtype, n = key
        t = table[key]
        ref = t.get("torch")
        times = " | ".join(f"{t[b]:.2f}" if b in t else "-" for b in bits)
        ratios = " | ".join(fmt_ratio(ref, t.get(b)) if b in t else "-" for b in bits)
        lines.append(f"| {act} | {dtype.split('.')[-1]} | {n} | {ref:.2f} | {times} | {ratios} |")
    return "\n".join(lines)


def load_nm(json_path: Path):
    return _load_table(json_path, lambda e: (e["pattern"], e["batch"], e["in_f"], e["out_f"], e["mode"]))


def render_nm(machine, table) -> str:
    lines = _header(machine, "medians (ms); ratios > 1 mean N:M is faster",
                    ["pattern", "B", "in→out", "mode", "dense ms", "N:M ms", "CSR ms", "dense/N:M", "CSR/N:M"])
    for key in sorted(table, key=lambda k: (k[4], -k[1], k[2], k[0])):
        pat, b, i, o, mode = key
        t = table[key]
        d, nm, csr = t.get("dense"), t.get("sparseops"), t.get("sparseops_csr")
        lines.append(
            f"| {pat} | {b} | {i}→{o} | {mode} | {d:.2f} | {nm:.2f} | {csr:.2f} | {fmt_ratio(d, nm)} | {fmt_ratio(csr, nm)} |"
        )
    return "\n".join(lines)


def load_block(json_path: Path):
    return _load_table(json_path, lambda e: (e["case"], e["batch"], e["in_f"], e["out_f"], e["mode"]))


def render_block(machine, table) -> str:
    lines = _header(machine, "medians (ms); ratio > 1 means the layer is faster",
                    ["case", "B", "in→out", "mode", "dense ms", "layer ms", "dense/layer"])
    for key in sorted(table, key=lambda k: (k[4], -k[1], k[0])):
        case, b, i, o, mode = key
        t = table[key]
        d, s = t.get("dense"), t.get("sparseops")
        ds = f"{d:.2f}" if d else "-"
        ss = f"{s:.2f}" if s else "-"
        lines.append(f"| {case} | {b} | {i}→{o} | {mode} | {ds} | {ss} | {fmt_ratio(d, s)} |")
    return "\n".join(lines)


def load_act(json_path: Path):
    return _load_table(
        json_path, lambda e: (e["case"], e["batch"], e["in_f"], e["out_f"], e["sparsity"], e["mode"]),
        lambda b: (b["stats"]["median"] * 1e3, b["extra_info"].get("achieved"), b["extra_info"].get("union_density")),
    )


def render_act(machine, table) -> str:
    lines = _header(
        machine, "medians (ms); ratio > 1 means the activation-sparse layer is faster; achieved = inputs dropped "
        "per row, union = share of W's columns read",
        ["case", "B", "in→out", "target", "achieved", "union", "mode", "dense ms", "sparse ms", "dense/sparse",
         "weight-only ms", "weight-only/sparse"],
    )
    for key in sorted(table, key=lambda k: (k[0], k[1], k[2], k[4], k[5])):
        case, b, i, o, s, mode = key
        t = table[key]
        d = t.get("dense", (None,))[0]
        so, ach, uni = t.get("sparseops", (None, None, None))
        f = lambda v, fmt: fmt.format(v) if v is not None else "-"  # noqa: E731
        wo = t.get("weight_only", (None,))[0]
        lines.append(f"| {case} | {b} | {i}→{o} | {s} | {f(ach, '{:.3f}')} | {f(uni, '{:.3f}')} | {mode} "
                     f"| {f(d, '{:.2f}')} | {f(so, '{:.2f}')} | {fmt_ratio(d, so)} | {f(wo, '{:.2f}')} "
                     f"| {fmt_ratio(wo, so)} |")
    return "\n".join(lines)


def load_gpu(json_path: Path):
    if json_path.suffix == ".jsonl":
        # bench_gpu.py's own per-case records (SPARSEOPS_GPU_RESULTS): there even when the run was cut short
        table, machine = defaultdict(dict), {}
        for line in json_path.read_text().splitlines():
            e = json.loads(line)
            machine["gpu"] = f"{e.get('gpu', 'CUDA GPU')}, torch {e.get('torch', '?')}"
            key = (e["case"], e["dtype"], e["batch"], e["in_f"], e["out_f"])
            table[key][e["provider"]] = (e["host_ms"], e.get("event_ms"), e.get("graph_ms"))
        return machine, table
    return _load_table(
        json_path, lambda e: (e["case"], e["dtype"], e["batch"], e["in_f"], e["out_f"]),
        lambda b: (b["stats"]["median"] * 1e3, b["extra_info"].get("event_ms"), b["extra_info"].get("graph_ms")),
    )


def render_gpu(machine, table) -> str:
    gpu = machine.get("gpu", "CUDA GPU")
    lines = [
        f"machine: {gpu}; host = median wall time of a synchronised eager call, event = CUDA-event median "
        "(L2 flushed), graph = the same over a CUDA-graph replay (no launch overhead); ms. "
        "ratio = dense (torch's activation, for few-bit) / provider, > 1 means faster",
        "",
        "| case | dtype | B | in→out | provider | host ms | event ms | graph ms | dense/provider (event) "
        "| dense/provider (graph) |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    f = lambda v: "-" if v is None or v != v else f"{v:.3f}"  # noqa: E731 - NaN prints as -
    r = lambda a, b: "-" if a is None or b is None or a != a or b != b else fmt_ratio(a, b)  # noqa: E731
    for key in sorted(table):
        case, dtype, b, i, o = key
        t = table[key]
        # the few-bit cases' baseline is torch's own activation
        base = "dense" if "dense" in t else "torch"
        d = t.get(base, (None, None, None))
        for p in [base] + sorted(k for k in t if k != base):
            if p not in t:
                continue
            h, e, g = t[p]
            lines.append(f"| {case} | {dtype} | {b} | {i}→{o} | {p} | {f(h)} | {f(e)} | {f(g)} | {r(d[1], e)} | {r(d[2], g)} |")
    return "\n".join(lines)


def load(json_path: Path):
    return _load_table(json_path, lambda e: (e["batch"], e["in_f"], e["out_f"], e["sparsity"], e["mode"]))


def fmt_ratio(a, b):
    return f"{a / b:.2f}" if a is not None and b else "-"


def render(machine, table) -> str:
    lines = _header(machine, "times are medians (ms); ratios > 1 mean the second provider is faster",
                    ["B", "in→out", "sparsity", "mode", "dense ms", "sparseops ms", "dense/sparseops",
                     "dense/torch_sparse", "dense/sparseprop", "sparseprop/sparseops"])
    for key in sorted(table, key=lambda k: (k[4], k[1], k[0], k[3])):
        b, i, o, s, mode = key
        t = table[key]
        d, so, ts, sp = t.get("dense"), t.get("sparseops"), t.get("torch_sparse"), t.get("sparseprop")
        lines.append(
            f"| {b} | {i}→{o} | {s} | {mode} | {d:.2f} | {so:.2f} | {fmt_ratio(d, so)} | {fmt_ratio(d, ts)} "
            f"| {fmt_ratio(d, sp)} | {fmt_ratio(sp, so)} |"
        )
    return "\n".join(lines)


def load_half(json_path: Path):
    return _load_table(json_path, lambda e: (e["pattern"], e["batch"], e["in_f"], e["out_f"], e["sparsity"], e["mode"]))


def render_half(machine, table) -> str:
    lines = _header(machine, "bf16; medians (ms); ratio > 1 means the sparse layer is faster than dense bf16 F.linear",
                    ["layer", "B", "in→out", "sparsity", "mode", "dense ms", "sparse ms", "dense/sparse"])
    for key in sorted(table, key=lambda k: (k[0] == "act", k[1], k[0], k[4])):
        pat, b, i, o, s, mode = key
        t = table[key]
        d, so = t.get("dense"), t.get("sparseops")
        f = lambda v: f"{v:.2f}" if v is not None else "-"  # noqa: E731
        lines.append(f"| {pat} | {b} | {i}→{o} | {s} | {mode} | {f(d)} | {f(so)} | {fmt_ratio(d, so)} |")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--json", type=Path, help="read this pytest-benchmark JSON instead of running the suite")
    ap.add_argument("-k", dest="keyword", help="pytest -k expression to select cases")
    ap.add_argument("--save", type=Path, help="also write the JSON of the run here")
    ap.add_argument("--suite", choices=["csr", "fewbit", "nm", "block", "act", "half", "gpu"], default="csr", help="which bench_<suite>.py (default csr)")
    args = ap.parse_args()
    if args.json:
        path = args.json
    else:
        path = args.save or Path(tempfile.mkdtemp()) / f"bench_{args.suite}.json"
        run_suite(path.resolve(), args.keyword, args.suite)
    if args.suite == "fewbit":
        print(render_fewbit(*load_fewbit(path)))
    elif args.suite == "block":
        print(render_block(*load_block(path)))
    elif args.suite == "act":
        print(render_act(*load_act(path)))
    elif args.suite == "half":
        print(render_half(*load_half(path)))
    elif args.suite == "gpu":
        print(render_gpu(*load_gpu(path)))
    elif args.suite == "nm":
        print(render_nm(*load_nm(path)))
    else:
        print(render(*load(path)))


if __name__ == "__main__":
    main()
