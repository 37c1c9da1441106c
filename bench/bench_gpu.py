"""GPU: sparseops' Triton kernels against dense cuBLAS and torch's own sparse formats, side by side.

Run on a CUDA machine: ``pytest bench/bench_gpu.py --benchmark-only`` (``python bench/ratio.py
--suite gpu`` prints the ratios). Skipped where there is no GPU.

pytest-benchmark times each call on the host clock with the device synchronised after it, so
the numbers are what a user's eager loop sees, launch overhead included. Each case also
records the median of CUDA-event timings (``triton.testing.do_bench``, which flushes L2 between
calls) under ``extra_info["event_ms"]``: the kernel time without the host.

Cases:
- decode GEMV (the issue's GPU figure): 4096→11008, batch 1/4/16, bf16: dense ``F.linear``,
  sparseops 2:4, torch ``to_sparse_semi_structured`` 2:4 (cuSPARSELt/CUTLASS), sparseops CSR
  at 90% and torch CSR at 90%;
- training step (fwd+bwd) 4096², 4096 tokens, bf16 and fp32: dense, sparseops 2:4, sparseops
  CSR at 90%;
- activation-sparse decode GEMV 4096→11008, batch 1 and 8, bf16: dense against ``ActivationSparseLinear``
  at 40/50/70/90% (tensor threshold), the TEAL comparison.
Every provider's output is checked against the dense fp64 product before it is timed.
"""

from __future__ import annotations

import os

import pytest
import torch

import sparseops

from bench_fewbit import FLOAT32_BOUND  # the CPU kernels' float32 forwards' bounds (this directory)

# SPARSEOPS_BENCH_GPU_DRY=1 runs every case once on the CPU at tiny sizes, untimed: a check of the
# suite's own code (builders, checks, closures) before a device call spends GPU time on it
DRY = os.environ.get("SPARSEOPS_BENCH_GPU_DRY") == "1"
DEV = "cpu" if DRY else "cuda"
pytestmark = pytest.mark.skipif(not (DRY or torch.cuda.is_available()), reason="needs a CUDA GPU")

DEC_SHAPE = (64, 96) if DRY else (4096, 11008)
DEC_BATCHES = [1, 4, 8, 16]
TRAIN_SHAPE = (64, 64, 48) if DRY else (4096, 4096, 4096)  # tokens, in, out
# below 64 (CSR) / 128 (N:M) rows the layer runs the Triton kernels (ops._gpu): nm24 and csr90 are
# them; "*_triton" providers force them at any size
DEC_PROVIDERS = ["dense", "nm24", "torch_semi24", "csr90", "torch_csr90"]
TRAIN_PROVIDERS = ["dense", "nm24", "csr90"]


class _TorchCSR(torch.nn.Module):
    def __init__(self, w):
        super().__init__()
        self.w = w.to_sparse_csr()

    def forward(self, x):
        return (self.w @ x.t()).t()


class _TorchSemi(torch.nn.Module):
    def __init__(self, w):
        super().__init__()
        from torch.sparse import to_sparse_semi_structured

        self.w = to_sparse_semi_structured(w)

    def forward(self, x):
        # semi-structured needs the dense operand's rows padded to a multiple of 8 (fp16/bf16)
        b = x.shape[0]
        pad = (-b) % 8
        xp = torch.nn.functional.pad(x, (0, 0, 0, pad)) if pad else x
        return torch.nn.functional.linear(xp, self.w)[:b]


def _masked_linear(in_f, out_f, dtype, pattern, seed=0):
    # built on the GPU: masking and packing a 45M-weight layer on the host takes seconds per case
    g = torch.Generator(device=DEV).manual_seed(seed)
    lin = torch.nn.Linear(in_f, out_f, bias=False, device=DEV)
    with torch.no_grad():
        lin.weight.copy_(torch.randn(out_f, in_f, generator=g, device=DEV) / in_f**0.5)
        if pattern == "2:4":
            mask = sparseops.masks.nm(lin.weight, 2, 4)
        elif pattern == "dense":
            mask = torch.ones_like(lin.weight, dtype=torch.bool)
        else:
            mask = sparseops.masks.magnitude(lin.weight, pattern)
        lin.weight.mul_(mask)
    return lin.to(DEV, dtype), mask.to(DEV)


_BUILT: dict = {}


def _build(provider, in_f, out_f, dtype):
    """(dense layer, provider's layer), built once per (provider, shape, dtype) and reused across batches."""
    key = (provider, in_f, out_f, dtype)
    if key not in _BUILT:
        _BUILT[key] = _build_new(provider, in_f, out_f, dtype)
    return _BUILT[key]


class _TritonPath(torch.nn.Module):
    """The layer with the ``ops._gpu`` cuBLAS thresholds out of reach: sparseops' Triton products only."""

    def __init__(self, layer):
        super().__init__()
        self.layer = layer

    def forward(self, x):
        from sparseops.ops import _gpu

        prev = _gpu.CSR_DENSE_MIN_ROWS, _gpu.NM_DENSE_MIN_ROWS
        _gpu.CSR_DENSE_MIN_ROWS = _gpu.NM_DENSE_MIN_ROWS = 10**9
        try:
            return self.layer(x)
        finally:
            _gpu.CSR_DENSE_MIN_ROWS, _gpu.NM_DENSE_MIN_ROWS = prev


def _build_new(provider, in_f, out_f, dtype):
    if DRY and provider.startswith("torch_"):
        pytest.skip("dry run: torch's bf16 sparse products are CUDA-only")
    if provider.endswith("_triton"):
        lin, layer = _build_new(provider[: -len("_triton")], in_f, out_f, dtype)
        return lin, _TritonPath(layer)
    pattern = {"dense": "dense", "nm24": "2:4", "torch_semi24": "2:4", "csr90": 0.9, "torch_csr90": 0.9}[provider]
    lin, mask = _masked_linear(in_f, out_f, dtype, pattern)
    if provider == "dense":
        return lin, lin
    if provider == "nm24":
        return lin, sparseops.SparseLinear.from_dense(lin, mask=mask, pattern="2:4")
    if provider == "csr90":
        return lin, sparseops.SparseLinear.from_dense(lin, mask=mask)
    if provider == "torch_csr90":
        return lin, _TorchCSR(lin.weight.detach())
    if provider == "torch_semi24":
        try:
            return lin, _TorchSemi(lin.weight.detach())
        except Exception as e:  # noqa: BLE001 - the anchor is optional on this torch / GPU
            pytest.skip(f"to_sparse_semi_structured unavailable: {type(e).__name__}: {e}")
    raise ValueError(provider)


def _check(layer, lin, x):
    with torch.no_grad():
        ref = torch.nn.functional.linear(x.double(), lin.weight.double())
        got = layer(x).double()
    err = ((got - ref).norm() / ref.norm()).item()
    tol = 1e-4 if x.dtype == torch.float32 else 2e-2
    assert err < tol, f"output off by relative error {err:.2e}"


def _graph_ms(fn):
    """CUDA-event median of a CUDA-graph replay of ``fn``: the kernels' time without the host's
    launch overhead (what a captured decode loop sees); NaN where the capture fails."""
    import triton.testing

    try:
        s = torch.cuda.Stream()
        s.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(s):
            for _ in range(3):
                fn()
        torch.cuda.current_stream().wait_stream(s)
        g = torch.cuda.CUDAGraph()
        with torch.cuda.graph(g):
            fn()
        return triton.testing.do_bench(g.replay, warmup=10, rep=100, return_mode="median")
    except Exception as e:  # noqa: BLE001 - reported, not fatal: eager timing still stands
        print(f"\ngraph capture failed: {type(e).__name__}: {str(e)[:200]}", flush=True)
        torch.cuda.synchronize()
        return float("nan")


def _record(benchmark, host_ms):
    """One JSON record a case, appended as it finishes to ``$SPARSEOPS_GPU_RESULTS`` (if set), which
    ``ratio.py --suite gpu --json`` reads: it survives a run killed by its time limit, the JSON
    of pytest-benchmark does not."""
    path = os.environ.get("SPARSEOPS_GPU_RESULTS")
    if not path:
        return
    import json

    gpu = "dry run (CPU)" if DRY else torch.cuda.get_device_name()
    rec = {**benchmark.extra_info, "host_ms": host_ms, "group": benchmark.group, "gpu": gpu, "torch": torch.__version__}
    with open(path, "a") as f:
        f.write(json.dumps(rec) + "\n")


def _timed(benchmark, fn, rounds, graph=False):
    if DRY:
        fn()
        benchmark.extra_info.update(event_ms=float("nan"), graph_ms=float("nan"))
        benchmark.pedantic(fn, rounds=1, iterations=1)
        _record(benchmark, float("nan"))
        return
    import triton.testing

    fn()
    torch.cuda.synchronize()
    benchmark.extra_info["event_ms"] = triton.testing.do_bench(fn, warmup=25, rep=100, return_mode="median")
    benchmark.extra_info["graph_ms"] = _graph_ms(fn) if graph else float("nan")

    def run():
        fn()
        torch.cuda.synchronize()

    benchmark.pedantic(run, rounds=rounds, iterations=1, warmup_rounds=5)
    # one line per case as it finishes, so that a run cut short by its time limit still reports
    host = benchmark.stats.stats.median * 1e3 if benchmark.stats else float("nan")
    info = benchmark.extra_info
    _record(benchmark, host)
    print(
        f"\nRESULT {benchmark.group} {info.get('provider')} event_ms={info['event_ms']:.4f} "
        f"graph_ms={info['graph_ms']:.4f} host_ms={host:.4f}",
        flush=True,
    )


@pytest.mark.parametrize("provider", DEC_PROVIDERS)
@pytest.mark.parametrize("batch", DEC_BATCHES)
def test_decode(benchmark, provider, batch):
    in_f, out_f = DEC_SHAPE
    dtype = torch.bfloat16
    lin, layer = _build(provider, in_f, out_f, dtype)
    x = torch.randn(batch, in_f, device=DEV, dtype=dtype)
    _check(layer, lin, x)
    benchmark.group = f"decode-B{batch}"
    benchmark.extra_info.update(case="decode", provider=provider, batch=batch, in_f=in_f, out_f=out_f, dtype="bf16")

    def fn():
        with torch.no_grad():
            return layer(x)

    _timed(benchmark, fn, rounds=100, graph=True)


@pytest.mark.parametrize("provider", TRAIN_PROVIDERS)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32], ids=["bf16", "fp32"])
def test_train_step(benchmark, provider, dtype):
    tokens, in_f, out_f = TRAIN_SHAPE
    lin, layer = _build(provider, in_f, out_f, dtype)
    x = torch.randn(tokens, in_f, device=DEV, dtype=dtype, requires_grad=True)
    with torch.no_grad():
        _check(layer, lin, x.detach())
    dy = torch.randn(tokens, out_f, device=DEV, dtype=dtype)
    name = "bf16" if dtype == torch.bfloat16 else "fp32"
    benchmark.group = f"train-{name}"
    benchmark.extra_info.update(case="train", provider=provider, batch=tokens, in_f=in_f, out_f=out_f, dtype=name)

    params = [p for p in layer.parameters() if p.requires_grad]

    def fn():
        # fresh gradients, as after optimizer.zero_grad() (not added into the last call's)
        x.grad = None
        for p in params:
            p.grad = None
        y = layer(x)
        y.backward(dy)

    _timed(benchmark, fn, rounds=20)


ACT_PROVIDERS = ["dense", "act40", "act50", "act70", "act90"]


@pytest.mark.parametrize("provider", ACT_PROVIDERS)
@pytest.mark.parametrize("batch", [1, 8])
def test_act_decode(benchmark, provider, batch):
    """Activation-sparse decode GEMV (Triton split-K over the union of the tokens' active rows), bf16,
    against dense ``F.linear``; TEAL reports 1.53x at 40% and 1.8x at 50% for its batch-1 fp16 kernel."""
    in_f, out_f = DEC_SHAPE
    dtype = torch.bfloat16
    lin, _ = _masked_linear(in_f, out_f, dtype, "dense")
    xs = [torch.randn(batch, in_f, device=DEV, dtype=dtype) for _ in range(16)]
    if provider == "dense":
        layer = lin
    else:
        layer = sparseops.ActivationSparseLinear.from_dense(lin, sparsity=int(provider[3:]) / 100, mode="tensor")
        layer.calibrate(torch.randn(256, in_f, device=DEV, dtype=dtype))
        with torch.no_grad():
            xs_ = sparseops.reference.act_mask(xs[0].double(), layer.threshold.double(), False)[0]
            ref = torch.nn.functional.linear(xs_, lin.weight.double())
            err = ((layer(xs[0]).double() - ref).norm() / ref.norm()).item()
        assert err < 2e-2, f"output off by relative error {err:.2e}"
    benchmark.group = f"act-decode-B{batch}"
    benchmark.extra_info.update(case="act-decode", provider=provider, batch=batch, in_f=in_f, out_f=out_f, dtype="bf16")
    state = {"i": 0}

    def fn():
        state["i"] += 1
        with torch.no_grad():
            return layer(xs[state["i"] % len(xs)])

    _timed(benchmark, fn, rounds=100, graph=True)


# --------------------------------------------------------------------------- every family
# The CPU suites' layers (bench_nm, bench_block, the CSR of providers), built there in fp32 and
# moved with .to(): the same structures and masks, at the CPU suites' 4096² shape, in bf16.
FAMILY_SHAPE = (64, 48) if DRY else (4096, 4096)  # in, out
FAMILY_TOKENS = 64 if DRY else 4096
FAMILIES = ["dense", "csr90", "nm24", "nm14", "nm28", "nm24T", "fanin10", "bsr90", "butterfly", "pixelfly", "monarch4"]
_NM = {"nm24": "2:4", "nm14": "1:4", "nm28": "2:8", "nm24T": "2:4T"}
_BLOCK = {"bsr90", "butterfly", "pixelfly", "monarch4"}


def _family(family, dtype):
    """(layer, ref): the family's layer and a dense nn.Linear holding the very same weight and bias, on DEV in dtype."""
    key = ("family", family, dtype)
    if key in _BUILT:
        return _BUILT[key]
    import bench_block
    import bench_nm
    import providers

    in_f, out_f = FAMILY_SHAPE
    if family in _BLOCK:
        if DRY and family in ("butterfly", "pixelfly"):
            pytest.skip("dry run: the butterfly needs a width of at least 16 blocks")
        layer, ref, _ = bench_block.make_block_case(1, in_f, out_f, family)
    elif family in _NM or family == "fanin10":
        pat = _NM.get(family, f"fanin:{max(1, in_f // 10)}")
        lin, mask, p, _ = bench_nm.make_nm_case(1, in_f, out_f, pat)
        layer, ref = bench_nm.build_nm("sparseops", lin, mask, p), lin
    else:
        lin, mask, _ = providers.make_case(1, in_f, out_f, 0.9 if family == "csr90" else 0.0)
        layer = lin if family == "dense" else sparseops.SparseLinear.from_dense(lin, mask=mask)
        ref = lin
    _BUILT[key] = (layer.to(DEV, dtype), ref.to(DEV, dtype))
    return _BUILT[key]


def _check_ref(layer, ref, x):
    with torch.no_grad():
        want = torch.nn.functional.linear(x.double(), ref.weight.double(), ref.bias.double())
        got = layer(x).double()
    err = ((got - want).norm() / want.norm()).item()
    assert err < 2e-2, f"output off by relative error {err:.2e}"


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("mode", ["fwd", "fwdbwd"])
def test_family_train(benchmark, family, mode):
    """Every family at a training batch, bf16: forward, and forward + backward (x and the weight)."""
    dtype = torch.bfloat16
    layer, ref = _family(family, dtype)
    in_f, out_f = FAMILY_SHAPE
    x = torch.randn(FAMILY_TOKENS, in_f, device=DEV, dtype=dtype)
    _check_ref(layer, ref, x)
    dy = torch.randn(FAMILY_TOKENS, out_f, device=DEV, dtype=dtype)
    benchmark.group = f"family-{mode}"
    benchmark.extra_info.update(case=f"family {mode}", provider=family, batch=FAMILY_TOKENS, in_f=in_f, out_f=out_f,
                                dtype="bf16")
    if mode == "fwd":

        def fn():
            with torch.no_grad():
                return layer(x)

    else:
        xg = x.clone().requires_grad_(True)
        params = [p for p in layer.parameters() if p.requires_grad]

        def fn():
            xg.grad = None  # fresh gradients, as after optimizer.zero_grad()
            for p in params:
                p.grad = None
            layer(xg).backward(dy)

    _timed(benchmark, fn, rounds=20)


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("batch", [1, 16])
def test_family_decode(benchmark, family, batch):
    """Every family's forward at decode batches, bf16, graph-timed."""
    dtype = torch.bfloat16
    layer, ref = _family(family, dtype)
    in_f, out_f = FAMILY_SHAPE
    x = torch.randn(batch, in_f, device=DEV, dtype=dtype)
    _check_ref(layer, ref, x)
    benchmark.group = f"family-decode-B{batch}"
    benchmark.extra_info.update(case="family decode", provider=family, batch=batch, in_f=in_f, out_f=out_f, dtype="bf16")

    def fn():
        with torch.no_grad():
            return layer(x)

    _timed(benchmark, fn, rounds=50, graph=True)


# --------------------------------------------------------------------------- few-bit activations
FEWBIT_N = 4096 if DRY else 32 * 2**20
FEWBIT_PROVIDERS = ["torch", "fewbit1", "fewbit2", "fewbit3", "fewbit4"]


@pytest.mark.parametrize("provider", FEWBIT_PROVIDERS)
@pytest.mark.parametrize("activation", ["gelu", "silu", "relu", "tanh"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32], ids=["bf16", "fp32"])
def test_fewbit(benchmark, provider, activation, dtype):
    """An activation's forward + backward: torch's (saves its input) against the few-bit one (saves a code)."""
    from sparseops import fewbit

    torch_fn = {"gelu": torch.nn.functional.gelu, "silu": torch.nn.functional.silu,
                "relu": torch.relu, "tanh": torch.tanh}[activation]
    if provider != "torch" and activation == "relu" and provider != "fewbit1":
        pytest.skip("relu is exact at 1 bit; more bits only add work")
    fn = torch_fn if provider == "torch" else (lambda v: fewbit.activation(v, activation, int(provider[-1])))
    x = torch.randn(FEWBIT_N, device=DEV, dtype=dtype).requires_grad_(True)
    g = torch.randn(FEWBIT_N, device=DEV, dtype=dtype)
    y = fn(x)
    expect = torch_fn(x.detach())
    if provider != "torch" and activation in ("silu", "tanh") and x.device.type == "cpu":
        # the CPU kernel's silu and tanh are its own float32 ones: within their bounds of the exact value
        # (csrc/fmath.h; bench_fewbit's FLOAT32_BOUND), then rounded to the dtype (within 1 of its ulps)
        exact = torch_fn(x.detach().double())
        p, bound = (24, FLOAT32_BOUND[activation]) if dtype == torch.float32 else (8, 1.0)
        ulp = torch.ldexp(torch.ones_like(exact), torch.frexp(exact.to(dtype).double())[1].clamp(min=-125) - p)
        assert ((y.double() - exact).abs() / ulp).max() <= bound, "the forward must be within its bound"
        expect = y
    assert torch.equal(y, expect), "the forward must be exact"
    (dx,) = torch.autograd.grad(y, x, g)
    assert torch.isfinite(dx).all()
    name = "bf16" if dtype == torch.bfloat16 else "fp32"
    benchmark.group = f"fewbit-{activation}-{name}"
    benchmark.extra_info.update(case=f"fewbit {activation}", provider=provider, batch=FEWBIT_N, in_f=0, out_f=0, dtype=name)

    def step():
        torch.autograd.grad(fn(x), x, g)

    _timed(benchmark, step, rounds=20)
