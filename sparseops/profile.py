"""The latency profiler: what sparsity buys on this machine, for these shapes.

``python -m sparseops`` (or the ``sparseops`` console script) times dense ``nn.Linear``
against every sparse pattern over a sweep of sparsities, forward and forward+backward,
and prints a table, writes a PNG chart of speedup against sparsity and a JSON file of
every measurement.

Measurement method: every case is first checked against the dense layer with the same
masked weight (a wrong kernel is never timed); then it runs ``--warmup`` untimed calls and
reports the median of ``--repeats`` timed calls. On CUDA each call is bracketed by
``torch.cuda.synchronize()``. CPU threads are pinned with ``torch.set_num_threads``.
"""

from __future__ import annotations

import argparse
import copy
import importlib
import json
import math
import platform
import statistics
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable

import torch
from torch import nn

from .nn import MonarchLinear, SparseLinear
from .patterns import Block, FanIn, Monarch, Unstructured, as_pattern, check_sparsity

DEFAULT_SPARSITIES = (0.5, 0.7, 0.8, 0.9, 0.95)
_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
# every weight structure the package has: the ones that take a sparsity are swept, the others
# (N:M, butterfly, Monarch) are one point each, at the sparsity their structure fixes
DEFAULT_PATTERNS = "unstructured,2:4,1:4,2:8,2:4t,fanin,block:32,butterfly,monarch:4"


class FanInSweep:
    """``--patterns fanin`` (no k): constant fan-in at each swept sparsity, ``k = round(in * (1 - s))``."""

    name = "fanin"

    def __repr__(self) -> str:
        return "FanInSweep()"


def parse_patterns(text: str) -> list:
    """``"unstructured,2:4,fanin"`` -> pattern objects (``fanin`` alone: a :class:`FanInSweep`)."""
    out = []
    for part in text.split(","):
        part = part.strip()
        if part:
            out.append(FanInSweep() if part.lower() == "fanin" else as_pattern(part))
    if not out:
        raise ValueError(f"--patterns: expected at least one pattern, got {text!r}")
    return out
DEFAULT_WIDTH = 1024
QUICK_WIDTH = 128


@dataclass
class Measurement:
    layer: str
    in_features: int
    out_features: int
    batch: int
    pattern: str
    sparsity: float
    mode: str
    time_ms: float
    speedup: float = float("nan")
    weight_bytes: int = 0
    saved_bytes: int = 0
    rel_error: float = 0.0
    # the swept sparsity asked for (None for a pattern that fixes its own); `sparsity` is the layer's
    target_sparsity: float | None = None


@dataclass
class LayerCase:
    """One linear layer to profile: a name, its shape and the batch (rows) it sees."""

    name: str
    in_features: int
    out_features: int
    batch: int
    weight: torch.Tensor | None = field(default=None, repr=False)


def default_cases(width: int, batch: int) -> list[LayerCase]:
    """A transformer block's projections at ``width``: fused qkv, attention out, MLP up and down."""
    return [
        LayerCase("attn.qkv", width, 3 * width, batch),
        LayerCase("attn.out", width, width, batch),
        LayerCase("mlp.up", width, 4 * width, batch),
        LayerCase("mlp.down", 4 * width, width, batch),
    ]


def shape_cases(spec: str, batch: int) -> list[LayerCase]:
    """``"4096x4096,4096x11008"`` (in x out) -> cases."""
    cases = []
    for part in spec.split(","):
        try:
            i, o = (int(v) for v in part.lower().split("x"))
        except ValueError:
            raise ValueError(f"--shapes: expected INxOUT[,INxOUT...], got {part!r}") from None
        cases.append(LayerCase(f"{i}x{o}", i, o, batch))
    return cases


def model_cases(target: str, input_shape: tuple[int, ...], device: torch.device) -> list[LayerCase]:
    """Build ``pkg.module:factory``, run it once on a random input, and record every nn.Linear's input rows."""
    if ":" not in target:
        raise ValueError(f"--model: expected pkg.module:factory, got {target!r}")
    mod_name, fn_name = target.split(":", 1)
    factory = getattr(importlib.import_module(mod_name), fn_name)
    model = factory().to(device).eval()
    seen: dict[str, LayerCase] = {}
    hooks = []
    for name, m in model.named_modules():
        if type(m) is nn.Linear:

            def hook(mod, args, _name=name):
                rows = args[0].numel() // mod.in_features
                seen.setdefault(
                    _name, LayerCase(_name, mod.in_features, mod.out_features, rows, mod.weight.detach().clone())
                )

            hooks.append(m.register_forward_pre_hook(hook))
    with torch.no_grad():
        model(torch.randn(*input_shape, device=device))
    for h in hooks:
        h.remove()
    if not seen:
        raise ValueError(f"--model: {target} has no nn.Linear that ran on an input of shape {input_shape}")
    return list(seen.values())


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def median_time_ms(fn: Callable[[], object], device: torch.device, warmup: int, repeats: int, timer=time.perf_counter) -> float:
    """Median wall time of ``fn`` in ms after ``warmup`` untimed calls (device synchronised)."""
    for _ in range(warmup):
        fn()
    _sync(device)
    times = []
    for _ in range(repeats):
        t0 = timer()
        fn()
        _sync(device)
        times.append((timer() - t0) * 1e3)
    return statistics.median(times)


def weight_bytes(layer: nn.Module) -> int:
    """Bytes of everything the layer keeps: parameters and buffers."""
    return sum(t.numel() * t.element_size() for t in list(layer.parameters()) + list(layer.buffers()))


def saved_activation_bytes(layer: nn.Module, x: torch.Tensor) -> int:
    """Bytes autograd saves for backward in one forward, not counting the layer's own parameters/buffers."""
    own = {t.data_ptr() for t in list(layer.parameters()) + list(layer.buffers()) if t.numel()}
    seen, total = set(), 0

    def pack(t):
        nonlocal total
        key = (t.data_ptr(), t.numel())
        if t.numel() and t.data_ptr() not in own and key not in seen:
            seen.add(key)
            total += t.numel() * t.element_size()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        layer(x.detach().requires_grad_(True))
    return total


def _make_step(layer: nn.Module, x: torch.Tensor, mode: str):
    if mode == "fwd":

        def step():
            with torch.no_grad():
                return layer(x)

        return step
    xg = x.detach().clone().requires_grad_(True)
    params = [p for p in layer.parameters() if p.requires_grad]

    def step():
        # a training step's gradients start from None (optimizer.zero_grad()'s default): without this each
        # timed call would also add into the last call's .grad, a pass over every dense weight that a
        # training step does not make (and that a sparse layer makes over its stored weights only)
        xg.grad = None
        for p in params:
            p.grad = None
        y = layer(xg)
        y.backward(torch.ones_like(y))

    return step


def _build_sparse(pattern, dense: nn.Linear, sparsity: float | None) -> nn.Module:
    if isinstance(pattern, FanInSweep):
        return SparseLinear.from_dense(dense, pattern=FanIn(max(1, round(dense.in_features * (1 - sparsity)))))
    if isinstance(pattern, Monarch):
        return MonarchLinear.from_dense(dense, nblocks=pattern.nblocks)
    return SparseLinear.from_dense(dense, sparsity=sparsity, pattern=pattern)


def _sweep(pattern, sparsities: list[float]) -> list[float | None]:
    # unstructured, fan-in without k and block sparsity take a sparsity: a sweep. n:m, fan-in:k,
    # butterfly and monarch fix their own: one point each
    swept = isinstance(pattern, (Unstructured, FanInSweep)) or (isinstance(pattern, Block) and pattern.sparsity is None)
    return list(sparsities) if swept else [None]


def _layer_sparsity(layer: nn.Module) -> float:
    """The fraction of the dense weight's entries the layer does not store (bias excluded)."""
    s = getattr(layer, "sparsity", None)
    if s is not None:
        return float(s)
    stored = sum(p.numel() for n, p in layer.named_parameters() if n != "bias")
    return 1.0 - stored / (layer.in_features * layer.out_features)


def profile_case(
    case: LayerCase,
    patterns: list,
    sparsities: list[float],
    modes: list[str],
    device: torch.device,
    warmup: int,
    repeats: int,
    on_step: Callable[[], None] = lambda: None,
    on_skip: Callable[[str], None] = lambda msg: print(msg, file=sys.stderr),
    dtype: torch.dtype = torch.float32,
) -> list[Measurement]:
    """Dense and each (pattern, sparsity) for one layer case, every mode; speedups against dense.

    The sparse layers are built from the fp32 dense layer (masks and projections in fp32), then every
    layer and the input are cast to ``dtype``."""
    g = torch.Generator().manual_seed(0)
    dense32 = nn.Linear(case.in_features, case.out_features).to(device)
    if case.weight is not None:
        with torch.no_grad():
            dense32.weight.copy_(case.weight)
    dense = copy.deepcopy(dense32).to(dtype)
    x = torch.randn(case.batch, case.in_features, generator=g).to(device, dtype)
    tol = 1e-3 if dtype == torch.float32 else 2e-2
    out: list[Measurement] = []
    dense_ms = {}
    for mode in modes:
        t = median_time_ms(_make_step(dense, x, mode), device, warmup, repeats)
        dense_ms[mode] = t
        out.append(
            Measurement(case.name, case.in_features, case.out_features, case.batch, "dense", 0.0, mode, t, 1.0,
                        weight_bytes(dense), saved_activation_bytes(dense, x) if mode == "fwdbwd" else 0)
        )
        on_step()
    for pattern in patterns:
        for target in _sweep(pattern, sparsities):
            try:
                layer = _build_sparse(pattern, dense32, target).to(device, dtype)
            except ValueError as e:
                # a structure that does not fit this shape (a butterfly wider than the layer, ...)
                on_skip(f"{case.name} ({case.in_features}→{case.out_features}): {pattern.name} skipped: {e}")
                for _ in modes:
                    on_step()
                continue
            s = _layer_sparsity(layer)
            # checked against dense with the same masked weight before it is timed
            ref_layer = layer.to_dense()
            with torch.no_grad():
                ref = ref_layer(x).double()
                got = layer(x).double()
            rel = ((got - ref).norm() / ref.norm().clamp_min(1e-30)).item()
            if not rel < tol:
                raise RuntimeError(f"{case.name} {pattern.name} sparsity {s}: output differs from dense by {rel:.2e}")
            for mode in modes:
                t = median_time_ms(_make_step(layer, x, mode), device, warmup, repeats)
                out.append(
                    Measurement(case.name, case.in_features, case.out_features, case.batch, pattern.name, s, mode, t,
                                dense_ms[mode] / t, weight_bytes(layer),
                                saved_activation_bytes(layer, x) if mode == "fwdbwd" else 0, rel, target)
                )
                on_step()
    return out


def _mib(n: int) -> str:
    return f"{n / 2**20:.2f}"


def render_table(rows: list[Measurement], title: str) -> None:
    headers = ["layer", "in→out", "B", "pattern", "sparsity", "mode", "ms", "speedup", "weights MiB", "saved MiB"]
    body = [
        [r.layer, f"{r.in_features}→{r.out_features}", str(r.batch), r.pattern,
         "-" if r.pattern == "dense" else f"{r.sparsity:.2f}", r.mode, f"{r.time_ms:.3f}", f"{r.speedup:.2f}x",
         _mib(r.weight_bytes), _mib(r.saved_bytes) if r.mode == "fwdbwd" else "-"]
        for r in rows
    ]
    try:
        from rich.console import Console
        from rich.table import Table

        table = Table(title=title)
        for h in headers:
            table.add_column(h, justify="left" if h in ("layer", "pattern", "mode") else "right")
        for b in body:
            table.add_row(*b)
        Console(width=max(140, Console().width)).print(table)
    except ImportError:
        print(title)
        widths = [max(len(h), *(len(b[i]) for b in body)) for i, h in enumerate(headers)]
        print("  ".join(h.ljust(w) for h, w in zip(headers, widths)))
        for b in body:
            print("  ".join(v.ljust(w) for v, w in zip(b, widths)))


def write_chart(rows: list[Measurement], path: Path) -> bool:
    """Speedup against sparsity: one panel per mode, one line per pattern (geometric mean over
    layers), the ideal 1/(1-s) dashed. False (and nothing written) without matplotlib."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    sparse = [r for r in rows if r.pattern != "dense"]
    modes = [m for m in ("fwd", "fwdbwd") if any(r.mode == m for r in sparse)] or ["fwd"]
    patterns = sorted({r.pattern for r in sparse})
    colors = plt.get_cmap("tab10" if len(patterns) <= 10 else "tab20")
    markers = "osD^v<>pPX*h"
    fig, axes = plt.subplots(1, len(modes), figsize=(6.5 * len(modes), 5), squeeze=False, sharey=True)
    sp_all = sorted({r.sparsity for r in sparse})
    for ax, mode in zip(axes[0], modes):
        for i, pattern in enumerate(patterns):
            # one point per swept sparsity (or one for a pattern that fixes its own): the mean of the
            # layers' actual sparsities against the geometric mean of their speedups
            groups: dict = {}
            for r in sparse:
                if r.pattern == pattern and r.mode == mode:
                    key = r.target_sparsity if r.target_sparsity is not None else -1.0
                    groups.setdefault(key, []).append(r)
            pts = sorted(
                (sum(r.sparsity for r in g) / len(g), math.exp(sum(math.log(r.speedup) for r in g) / len(g)))
                for g in groups.values()
            )
            if pts:
                ax.plot([p[0] for p in pts], [p[1] for p in pts], marker=markers[i % len(markers)],
                        color=colors(i), label=pattern)
        if sp_all:
            lo, hi = min(sp_all), max(sp_all)
            grid = [lo + (hi - lo) * t / 100 for t in range(101)]
            ax.plot(grid, [1 / (1 - s) for s in grid], "k--", label="ideal 1/(1-s)")
        ax.axhline(1.0, color="gray", lw=0.8)
        ax.set_yscale("log")
        ax.set_xlabel("sparsity")
        ax.set_title("forward" if mode == "fwd" else "forward + backward")
        ax.grid(True, which="both", alpha=0.3)
    axes[0][0].set_ylabel("speedup over dense (geometric mean over layers)")
    axes[0][-1].legend(fontsize="small", loc="upper left", bbox_to_anchor=(1.02, 1.0))
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return True


def write_trace(case: LayerCase, pattern, sparsity: float, device: torch.device, path: Path,
                dtype: torch.dtype = torch.float32) -> None:
    """A torch.profiler Chrome trace of one training step of the sparse layer."""
    dense = nn.Linear(case.in_features, case.out_features).to(device)
    layer = _build_sparse(pattern, dense, sparsity).to(device, dtype)
    opt = torch.optim.SGD(layer.parameters(), lr=1e-3)
    x = torch.randn(case.batch, case.in_features, device=device, dtype=dtype)
    acts = [torch.profiler.ProfilerActivity.CPU]
    if device.type == "cuda":
        acts.append(torch.profiler.ProfilerActivity.CUDA)
    for _ in range(2):
        layer(x).square().mean().backward()
    with torch.profiler.profile(activities=acts) as prof:
        opt.zero_grad()
        layer(x).square().mean().backward()
        opt.step()
        _sync(device)
    prof.export_chrome_trace(str(path))


def _parse_list(text: str, name: str, conv):
    try:
        return [conv(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise ValueError(f"{name}: could not parse {text!r}") from None


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m sparseops",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--device", default=None, help="cpu or cuda (default: cuda if available, else cpu)")
    p.add_argument("--threads", type=int, default=None, help="CPU threads (torch.set_num_threads; default: torch's)")
    p.add_argument("--dtype", default="float32", choices=sorted(_DTYPES),
                   help="dtype of the layers and inputs (default float32; on CPU bfloat16 and float16 run the C++ "
                   "kernels on float32 copies, the decodes of up to 7 rows of unstructured, fan-in, N:M and "
                   "activation-sparse layers reading the 16-bit weight as it is)")
    p.add_argument(
        "--patterns",
        default=DEFAULT_PATTERNS,
        help="comma-separated patterns: unstructured, N:M (e.g. 2:4; 2:4t transposable), fanin (at each "
        "--sparsity) or fanin:K, block:B, butterfly, monarch:K (default: all of them, "
        f"{DEFAULT_PATTERNS}); N:M, fanin:K, butterfly and monarch are measured at the sparsity they fix, "
        "a pattern that does not fit a layer's shape is skipped with a note",
    )
    p.add_argument("--sparsity", default=None, help=f"comma-separated sparsities (default: {','.join(map(str, DEFAULT_SPARSITIES))})")
    p.add_argument("--batch", type=int, default=None, help="rows (tokens) per call for the built-in and --shapes cases (default 256)")
    p.add_argument("--shapes", default=None, help="INxOUT[,INxOUT...] instead of the built-in transformer block")
    p.add_argument("--width", type=int, default=None, help=f"model width of the built-in block (default {DEFAULT_WIDTH})")
    p.add_argument("--model", default=None, help="pkg.module:factory; profiles each nn.Linear of that model in place")
    p.add_argument("--input-shape", default=None, help="input shape for --model, e.g. 8,128,1024")
    p.add_argument("--modes", default="fwd,fwdbwd", help="fwd and/or fwdbwd (default both)")
    p.add_argument("--warmup", type=int, default=None, help="untimed calls before timing (default 3; 1 with --quick)")
    p.add_argument("--repeats", type=int, default=None,
                   help="timed calls; the median is reported (default 7; 3 with --quick)")
    p.add_argument("--trace", default=None, help="write a torch.profiler Chrome trace of one sparse training step here")
    p.add_argument("--out", default="sparseops_profile", help="output folder for profile.json and speedup.png")
    p.add_argument("--quick", action="store_true", help="tiny sizes and few repeats (a smoke test)")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda: no CUDA device is available")
    if args.threads is not None:
        if args.threads < 1:
            raise SystemExit("--threads: expected >= 1")
        torch.set_num_threads(args.threads)
    patterns = parse_patterns(args.patterns)
    sparsities = [check_sparsity(s, "--sparsity") for s in _parse_list(args.sparsity, "--sparsity", float)] if args.sparsity else list(DEFAULT_SPARSITIES)
    modes = _parse_list(args.modes, "--modes", str)
    for m in modes:
        if m not in ("fwd", "fwdbwd"):
            raise SystemExit(f"--modes: expected fwd and/or fwdbwd, got {m!r}")
    # --quick picks small defaults; a value given on the command line wins
    warmup = args.warmup if args.warmup is not None else (1 if args.quick else 3)
    repeats = args.repeats if args.repeats is not None else (3 if args.quick else 7)
    batch = args.batch if args.batch is not None else (16 if args.quick else 256)
    for name, v, low in (("--warmup", warmup, 0), ("--repeats", repeats, 1), ("--batch", batch, 1),
                         ("--width", args.width, 1)):
        if v is not None and v < low:
            raise SystemExit(f"{name}: expected >= {low}, got {v}")
    if device.type not in ("cpu", "cuda"):
        raise SystemExit(f"--device: expected cpu or cuda, got {args.device!r}")
    dtype = _DTYPES[args.dtype]
    if args.quick and args.sparsity is None:
        sparsities = [0.5, 0.9]
    if args.model:
        if not args.input_shape:
            raise SystemExit("--model needs --input-shape, e.g. --input-shape 8,128,1024")
        cases = model_cases(args.model, tuple(_parse_list(args.input_shape, "--input-shape", int)), device)
        title = f"sparseops profile of {args.model}"
    elif args.shapes:
        cases = shape_cases(args.shapes, batch)
        title = "sparseops profile"
    else:
        width = args.width or (QUICK_WIDTH if args.quick else DEFAULT_WIDTH)
        cases = default_cases(width, batch)
        title = f"sparseops profile: transformer block projections, width {width}"
    title += f" on {device.type} ({torch.get_num_threads()} threads)" if device.type == "cpu" else f" on {torch.cuda.get_device_name(device)}"
    title += f", {args.dtype}"

    total = len(cases) * len(modes) * (1 + sum(len(_sweep(p, sparsities)) for p in patterns))
    rows: list[Measurement] = []
    try:
        from rich.progress import Progress

        progress = Progress(transient=True)
    except ImportError:
        progress = None
    skipped: list[str] = []
    if progress is not None:
        with progress:
            task = progress.add_task("profiling", total=total)
            for case in cases:
                rows += profile_case(case, patterns, sparsities, modes, device, warmup, repeats,
                                     lambda: progress.advance(task), skipped.append, dtype)
    else:
        for i, case in enumerate(cases):
            print(f"[{i + 1}/{len(cases)}] {case.name} ...", file=sys.stderr)
            rows += profile_case(case, patterns, sparsities, modes, device, warmup, repeats, on_skip=skipped.append,
                                 dtype=dtype)

    render_table(rows, title)
    for note in skipped:
        print(note)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    meta = {
        "device": str(device),
        "device_name": torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or platform.machine(),
        "threads": torch.get_num_threads(),
        "dtype": args.dtype,
        "torch": torch.__version__,
        "warmup": warmup,
        "repeats": repeats,
        "statistic": "median",
        "cpu_isa": __import__("sparseops").isa(),
        "skipped": skipped,
    }
    (out / "profile.json").write_text(json.dumps({"meta": meta, "measurements": [asdict(r) for r in rows]}, indent=1))
    wrote_png = write_chart(rows, out / "speedup.png")
    print(f"wrote {out / 'profile.json'}" + (f" and {out / 'speedup.png'}" if wrote_png else " (matplotlib not installed: no PNG)"))
    if args.trace:
        write_trace(cases[0], patterns[0], _sweep(patterns[0], sparsities)[-1], device, Path(args.trace), dtype)
        print(f"wrote trace {args.trace}")
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
