"""Keep a layer dense where sparsity does not pay on this machine.

``sparsify_(model, ..., only_if_faster=True, batch=B)`` times each layer both ways at its own
shape and ``B`` rows and keeps the faster one. The measurement is the profiler's
(:func:`sparseops.profile.median_time_ms`): the sparse layer is first checked against its own
dense weight, then each side runs ``warmup`` untimed calls and the median of ``repeats`` timed
calls decides (SparseProp decides by one ``time.time()`` sample). Decisions are cached per
machine, shape, dtype, pattern, sparsity, batch and mode in ``decisions.json`` under the user
cache directory (``$SPARSEOPS_CACHE_DIR``, else ``$XDG_CACHE_HOME/sparseops``, else
``~/.cache/sparseops``), so each is measured once. :func:`explain` prints what was chosen and why.
"""

from __future__ import annotations

import json
import math
import os
import platform
import tempfile
import warnings
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable, Optional

import torch
from torch import nn

# the attribute a decided layer carries (a plain attribute: not in state_dict)
ATTR = "_sparseops_decision"

Timer = Callable[[nn.Module, Callable[[], object]], float]


@dataclass(frozen=True)
class Decision:
    """One layer's measurement and choice."""

    fqn: str
    in_features: int
    out_features: int
    pattern: str
    sparsity: float
    batch: int
    mode: str
    device: str
    dtype: str
    dense_ms: float
    sparse_ms: float
    chose: str  # "sparse" or "dense"
    source: str  # "measured" or "cache"

    @property
    def speedup(self) -> float:
        """dense time / sparse time (> 1: the sparse layer is faster)."""
        return self.dense_ms / self.sparse_ms if self.sparse_ms > 0 else float("inf")

    def reason(self) -> str:
        verb = "faster" if self.chose == "sparse" else "not faster"
        return (f"{self.pattern} at {self.sparsity:.0%} is {verb} than dense at B={self.batch} {self.mode}: "
                f"{self.sparse_ms:.3f} ms against {self.dense_ms:.3f} ms ({self.speedup:.2f}x, {self.source})")


def default_cache_dir() -> Path:
    if os.environ.get("SPARSEOPS_CACHE_DIR"):
        return Path(os.environ["SPARSEOPS_CACHE_DIR"])
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "sparseops"


def machine_key(device: torch.device) -> str:
    """What makes a timing from this machine comparable: the processor (or GPU), threads, ISA, versions."""
    from . import __version__, isa

    if device.type == "cuda":
        where = f"cuda:{torch.cuda.get_device_name(device)}"
    else:
        where = f"cpu:{_cpu_name()}:threads={torch.get_num_threads()}:isa={isa()}"
    return f"{where}:torch={torch.__version__}:sparseops={__version__}"


def _cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _load(path: Path) -> dict:
    try:
        data = json.loads(path.read_text())
        return data if isinstance(data, dict) else {}
    except (OSError, ValueError):
        return {}  # missing or corrupt: measure again and rewrite


def _store(path: Path, data: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".decisions-")
    try:
        with os.fdopen(fd, "w") as f:
            json.dump(data, f, indent=1, sort_keys=True)
        os.replace(tmp, path)  # atomic: a concurrent reader sees the old file or the new one
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def _default_timer(warmup: int, repeats: int) -> Timer:
    from .profile import median_time_ms

    def timer(layer: nn.Module, step: Callable[[], object]) -> float:
        return median_time_ms(step, _device(layer), warmup, repeats)

    return timer


def _device(layer: nn.Module) -> torch.device:
    for t in list(layer.parameters()) + list(layer.buffers()):
        return t.device
    return torch.device("cpu")


def _check(sparse: nn.Module, x: torch.Tensor) -> None:
    """The sparse layer against F.linear on its own dense weight: a wrong kernel is never chosen."""
    with torch.no_grad():
        got = sparse(x).double()
        ref = torch.nn.functional.linear(
            x.double(), sparse.dense_weight().double(), None if sparse.bias is None else sparse.bias.double()
        )
    err = ((got - ref).norm() / ref.norm().clamp_min(1e-30)).item()
    tol = 1e-4 if x.dtype in (torch.float32, torch.float64) else 3e-2
    if not err <= tol:
        raise RuntimeError(f"only_if_faster: the sparse layer's output is off by relative error {err:.2e}; not timed")


def describe(sparse: nn.Module) -> tuple[str, float]:
    """``(pattern name, sparsity)`` of a SparseLinear or MonarchLinear."""
    if hasattr(sparse, "pattern"):
        return getattr(sparse.pattern, "name", str(sparse.pattern)), round(float(sparse.sparsity), 4)
    total = sparse.in_features * sparse.out_features
    return f"monarch:{sparse.nblocks}", round(1.0 - sparse.num_weights / total, 4) if total else 0.0


def decide(
    fqn: str,
    dense: nn.Linear,
    sparse: nn.Module,
    *,
    batch: int,
    mode: str,
    timer: Optional[Timer],
    cache: Optional[Path],
    warmup: int = 5,
    repeats: int = 15,
) -> Decision:
    """Time ``dense`` and ``sparse`` (same shape, device, dtype) at ``batch`` rows; the faster wins."""
    from .profile import _make_step

    device, dtype = dense.weight.device, dense.weight.dtype
    pattern, sparsity = describe(sparse)
    # "step=fresh-grad": how a forward+backward is timed (gradients from None, see profile._make_step); a
    # decision cached before, when each timed call also added into the last one's .grad, is measured again
    key = json.dumps([machine_key(device), dense.in_features, dense.out_features, dense.bias is not None,
                      str(dtype), device.type, pattern, sparsity, batch, mode, "step=fresh-grad"])
    common = dict(fqn=fqn, in_features=dense.in_features, out_features=dense.out_features, pattern=pattern,
                  sparsity=sparsity, batch=batch, mode=mode, device=device.type, dtype=str(dtype).replace("torch.", ""))
    path = None if cache is None else cache / "decisions.json"
    x = torch.randn(batch, dense.in_features, device=device, dtype=dtype)
    _check(sparse, x)  # a cached choice too: a layer that computes the wrong thing is never chosen
    if path is not None:
        hit = _load(path).get(key)
        if isinstance(hit, dict) and {"dense_ms", "sparse_ms"} <= hit.keys():
            try:
                d, s = float(hit["dense_ms"]), float(hit["sparse_ms"])
            except (TypeError, ValueError):
                d = s = float("nan")  # a corrupt entry: measured again below, and rewritten
            if d > 0 and s > 0 and math.isfinite(d) and math.isfinite(s):
                return Decision(**common, dense_ms=d, sparse_ms=s, chose="sparse" if s < d else "dense",
                                source="cache")
    timer = timer or _default_timer(warmup, repeats)
    # a timed step sets .grad to None and backward makes new ones: the user's layer gets its gradients
    # back as they were
    saved = [(p, p.grad) for p in dense.parameters()]
    try:
        d = float(timer(dense, _make_step(dense, x, mode)))
        s = float(timer(sparse, _make_step(sparse, x, mode)))
    finally:
        for p, g in saved:
            p.grad = g
        for p in sparse.parameters():
            p.grad = None
    for name, v in (("dense", d), ("sparse", s)):
        if not v > 0 or v != v:
            raise ValueError(f"timer: expected a positive time in ms for the {name} layer, got {v}")
    if path is not None:
        data = _load(path)
        data[key] = {"dense_ms": d, "sparse_ms": s}
        try:
            _store(path, data)
        except OSError as e:  # an unwritable cache costs a re-measurement next time, nothing more
            warnings.warn(f"only_if_faster: could not write the decision cache {path}: {e}", stacklevel=3)
    return Decision(**common, dense_ms=d, sparse_ms=s, chose="sparse" if s < d else "dense", source="measured")


def explain(model: nn.Module, file=None) -> str:
    """Print (and return) what ``sparsify_`` chose for each linear layer of ``model``, and why."""
    from .nn import MonarchLinear, SparseLinear

    lines = []
    for fqn, m in model.named_modules():
        dec = getattr(m, ATTR, None)
        name = fqn or "(model)"
        if isinstance(dec, Decision):
            lines.append(f"{name} [{dec.in_features}->{dec.out_features}]: {dec.chose} — {dec.reason()}")
        elif isinstance(m, (SparseLinear, MonarchLinear)):
            pat, sp = describe(m)
            lines.append(f"{name} [{m.in_features}->{m.out_features}]: sparse ({pat}, {sp:.0%}) — "
                         "not measured (sparsify_ ran without only_if_faster)")
        elif type(m) is nn.Linear:
            lines.append(f"{name} [{m.in_features}->{m.out_features}]: dense — not swapped")
    text = "\n".join(lines) if lines else "no linear layers"
    print(text, file=file)
    return text


def as_dict(dec: Decision) -> dict:
    return {**asdict(dec), "speedup": dec.speedup}
