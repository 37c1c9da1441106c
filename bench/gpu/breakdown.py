"""Where a GPU training step's time goes: each provider's forward, forward+backward, and its top CUDA kernels.

A diagnostic for the device machine (``python3 bench/gpu/breakdown.py``), not a benchmark: the
speed claims come from bench_gpu.py. Times are CUDA-event medians (triton.testing.do_bench).
"""

import sys

import torch
import triton.testing

sys.path.insert(0, "bench")
import bench_gpu as G  # noqa: E402

tokens, in_f, out_f = G.TRAIN_SHAPE
dtype = torch.bfloat16
x = torch.randn(tokens, in_f, device="cuda", dtype=dtype, requires_grad=True)
dy = torch.randn(tokens, out_f, device="cuda", dtype=dtype)
for provider in ["dense", "nm24", "csr90"]:
    lin, layer = G._build_new(provider, in_f, out_f, dtype)

    def fwd():
        with torch.no_grad():
            layer(x)

    def step():
        layer(x).backward(dy)

    f = triton.testing.do_bench(fwd, warmup=10, rep=100, return_mode="median")
    s = triton.testing.do_bench(step, warmup=3, rep=100, return_mode="median")
    dense_w = ""
    if provider != "dense":
        d = triton.testing.do_bench(lambda: layer.dense_weight(), warmup=3, rep=50, return_mode="median")
        dense_w = f" dense_weight={d:.3f}ms"
    print(f"BREAKDOWN {provider} bf16 {tokens}x{in_f}->{out_f}: fwd={f:.3f}ms fwd+bwd={s:.3f}ms{dense_w}", flush=True)
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
        step()
        torch.cuda.synchronize()
    print(prof.key_averages().table(sort_by="self_cuda_time_total", row_limit=8, max_name_column_width=70), flush=True)
