"""Diagnostics for the device machine (``python3 bench/gpu/diag.py [fewbit] [act]``): where the few-bit
activation's GPU time goes, and the activation-sparse decode GEMV at several sparsities. Not a
benchmark: the speed claims come from bench_gpu.py. Times are CUDA-event medians; "graph" replays a
captured CUDA graph (no host launch overhead)."""

import sys

import torch
import triton
import triton.testing

sys.path.insert(0, "bench")
import bench_gpu as G  # noqa: E402
import sparseops  # noqa: E402
from sparseops import fewbit  # noqa: E402

what = sys.argv[1:] or ["fewbit", "act"]


def ev(fn, rep=100):
    return triton.testing.do_bench(fn, warmup=10, rep=rep, return_mode="median")


def decode_calls(xs):
    """run(layer) -> a no-grad call of layer on the next of the inputs xs each time (none stays in L2)."""
    st = {"i": 0}

    def run(layer):
        def fn():
            st["i"] += 1
            with torch.no_grad():
                return layer(xs[st["i"] % len(xs)])
        return fn
    return run


if "fewbit" in what:
    n = 32 * 2**20
    for dtype in (torch.bfloat16, torch.float32):
        x = torch.randn(n, device="cuda", dtype=dtype, requires_grad=True)
        g = torch.randn(n, device="cuda", dtype=dtype)
        for name, fn in [("torch-gelu", torch.nn.functional.gelu),
                         ("fewbit2-gelu", lambda v: fewbit.activation(v, "gelu", 2)),
                         ("fewbit1-relu", lambda v: fewbit.activation(v, "relu", 1))]:
            def step():
                torch.autograd.grad(fn(x), x, g)

            def fwd():
                with torch.no_grad():
                    fn(x)
            step()
            torch.cuda.synchronize()
            import time
            t0 = time.perf_counter()
            for _ in range(20):
                step()
            host = (time.perf_counter() - t0) / 20 * 1e3
            torch.cuda.synchronize()
            print(f"FEWBIT {name} {dtype}: step event={ev(step):.3f} graph={G._graph_ms(step):.3f} "
                  f"fwd(no_grad) event={ev(fwd):.3f} host-launch={host:.3f} ms", flush=True)
            if name.startswith("fewbit2"):
                with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA,
                                                        torch.profiler.ProfilerActivity.CPU]) as prof:
                    step()
                    torch.cuda.synchronize()
                print(prof.key_averages().table(sort_by="self_cuda_time_total", row_limit=10,
                                                max_name_column_width=60), flush=True)
                print(prof.key_averages().table(sort_by="cpu_time_total", row_limit=14,
                                                max_name_column_width=60), flush=True)

if "act" in what:
    in_f, out_f = G.DEC_SHAPE
    dtype = torch.bfloat16
    lin, _ = G._masked_linear(in_f, out_f, dtype, "dense")
    for batch in (1, 8):
        xs = [torch.randn(batch, in_f, device="cuda", dtype=dtype) for _ in range(16)]
        run = decode_calls(xs)
        d = G._graph_ms(run(lin))
        row = [f"dense={d:.4f}"]
        for sp in (0.0, 0.4, 0.5, 0.7, 0.9, 0.99):
            layer = sparseops.ActivationSparseLinear.from_dense(lin, sparsity=max(sp, 0.01), mode="tensor")
            layer.calibrate(torch.randn(256, in_f, device="cuda", dtype=dtype))
            with torch.no_grad():
                xs_ = sparseops.reference.act_mask(xs[0].double(), layer.threshold.double(), False)[0]
                ref = torch.nn.functional.linear(xs_, lin.weight.double())
                err = ((layer(xs[0]).double() - ref).norm() / ref.norm()).item()
            t = G._graph_ms(run(layer))
            row.append(f"{sp:.2f}:{t:.4f}({d / t:.2f}x,err={err:.1e})")
        print(f"ACT B={batch} graph ms: " + " ".join(row), flush=True)

if "fewbit-host" in what:
    # where the host time of an eager few-bit step goes (the GPU waits on it at these sizes)
    import cProfile
    import pstats

    x = torch.randn(32 * 2**20, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    g = torch.randn_like(x)

    def steps(k):
        for _ in range(k):
            torch.autograd.grad(fewbit.activation(x, "gelu", 2), x, g)

    steps(5)
    torch.cuda.synchronize()
    pr = cProfile.Profile()
    pr.enable()
    steps(200)
    pr.disable()
    torch.cuda.synchronize()
    pstats.Stats(pr).sort_stats("tottime").print_stats(25)
    pstats.Stats(pr).sort_stats("cumulative").print_stats(30)

if "act-sweep" in what:
    # the split count of the activation-sparse GEMV: (target programs, min inputs a split, max split,
    # partials fraction); eager = event time of the eager call (host overhead included)
    from sparseops.kernels import act as K

    in_f, out_f = G.DEC_SHAPE
    dtype = torch.bfloat16
    lin, _ = G._masked_linear(in_f, out_f, dtype, "dense")
    layers = {}
    for sp in (0.5, 0.7, 0.9, 0.99):
        layer = sparseops.ActivationSparseLinear.from_dense(lin, sparsity=sp, mode="tensor")
        layer.calibrate(torch.randn(256, in_f, device="cuda", dtype=dtype))
        layers[sp] = layer
    for batch in (1, 8):
        xs = [torch.randn(batch, in_f, device="cuda", dtype=dtype) for _ in range(16)]
        run = decode_calls(xs)
        d = G._graph_ms(run(lin))
        de = ev(run(lin))
        with torch.no_grad():  # the union's density at this batch
            u = sparseops.reference.act_mask(xs[0].double(), layers[0.5].threshold.double(), False)[0]
            print(f"ACTSWEEP B={batch} union density at 50%: {(u != 0).any(0).double().mean().item():.3f}")
        variants = [(2048, 128, 64, 10), (2048, 256, 64, 10), (2048, 512, 64, 10)] if batch == 1 else [(2048, 128, 64, 10)]
        for variant in variants:
            K._TARGET_PROGRAMS, K._MIN_SPLIT_K, K._MAX_SPLIT, K._PARTIALS_FRACTION = variant
            K._act_gemv_tuned.cache.clear()
            row = []
            for sp, layer in layers.items():
                t = G._graph_ms(run(layer))
                te = ev(run(layer))
                row.append(f"{sp}:{t:.4f}({d / t:.2f}x) eager {te:.4f}({de / te:.2f}x)")
            split = K._split(batch, in_f, out_f, triton.next_power_of_2(batch), 2)
            print(f"ACTSWEEP B={batch} {variant} split={split} best={K._act_gemv_tuned.best_config} "
                  f"dense graph {d:.4f} eager {de:.4f} | " + " | ".join(row), flush=True)
