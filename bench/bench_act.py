"""Activation-sparse linear layers against dense F.linear / nn.Linear, fp32 CPU, 2 threads.

Run: ``pytest bench/bench_act.py --benchmark-only`` (``python bench/ratio.py --suite act`` prints the
ratios). The issue's cases:
- decode: batch 1, 4096→11008 and 11008→4096, at 50%, 70% and 90% activation sparsity, a TEAL-style
  tensor threshold calibrated on held-out inputs; against ``F.linear`` with the same weight;
- 8 tokens at 50% per token: the union of their active inputs is what the kernel reads (its density is
  recorded as ``union_density``);
- both savings: a 90%-sparse unstructured weight (SparseLinear) behind the same activation sparsity,
  batch 1, 4096→11008: ``ActivationSparseLinear.from_dense(sparse_linear)`` against the SparseLinear on
  the sparsified input and against dense;
- training: the second layer of a ReLU MLP (16384→4096, B=256, the pre-activation shifted so that about
  90% of the ReLU's outputs are 0; also 50% there, and 4096² at B=1024 with 90/70/50%: where the dense
  fallback takes over), forward+backward of ReLU + Linear against ``mode="relu"``, which fuses the ReLU;
  both produce the gradient of the pre-activation, of W and of b.

Inputs: every call takes the next of 16 distinct inputs (each provider the same sequence). With one
fixed input the active rows of W at 90% (18 MB) would stay in the L3 cache from call to call, a saving
real decoding (a new token each step) does not get. Each case is checked against the dense reference
before it is timed.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import sparseops
from shapes import ACT_DECODE_SHAPES, ACT_DECODE_SPARSITIES, ACT_TRAIN_CASES, ACT_UNION_SHAPES

THREADS = 2
POOL = 16


def _weights(in_f, out_f, g):
    lin = torch.nn.Linear(in_f, out_f)
    with torch.no_grad():
        lin.weight.copy_(torch.randn(out_f, in_f, generator=g) / in_f**0.5)
    return lin


def make_decode(batch, in_f, out_f, sparsity, seed=0):
    g = torch.Generator().manual_seed(seed)
    lin = _weights(in_f, out_f, g)
    layer = sparseops.ActivationSparseLinear.from_dense(lin, sparsity=sparsity, mode="tensor")
    # calibrated on held-out inputs of the same distribution as the timed ones
    layer.calibrate(torch.randn(256, in_f, generator=g))
    xs = [torch.randn(batch, in_f, generator=g) for _ in range(POOL)]
    return lin, layer, xs


def _check_decode(lin, layer, x):
    with torch.no_grad():
        xs, _ = sparseops.reference.act_mask(x.double(), layer.threshold.double(), False)
        want = F.linear(xs, lin.weight.double(), lin.bias.double())
        got = layer(x).double()
    err = ((got - want).norm() / want.norm()).item()
    assert err < 1e-5, f"output off by relative error {err:.2e}"


def _cycle(fn, xs):
    state = {"i": 0}

    def run():
        x = xs[state["i"] % len(xs)]
        state["i"] += 1
        with torch.no_grad():
            return fn(x)

    return run


DECODE = [
    pytest.param(b, i, o, s, id=f"B{b}-in{i}-out{o}-sp{s}")
    for (b, i, o) in ACT_DECODE_SHAPES for s in ACT_DECODE_SPARSITIES
] + [pytest.param(b, i, o, 0.5, id=f"B{b}-in{i}-out{o}-sp0.5-union") for (b, i, o) in ACT_UNION_SHAPES]


@pytest.mark.parametrize("provider", ["dense", "sparseops"])
@pytest.mark.parametrize("batch,in_f,out_f,sparsity", DECODE)
def test_act_decode(benchmark, provider, batch, in_f, out_f, sparsity):
    torch.set_num_threads(THREADS)
    lin, layer, xs = make_decode(batch, in_f, out_f, sparsity)
    _check_decode(lin, layer, xs[0])
    w, b = lin.weight.detach(), lin.bias.detach()
    run = _cycle((lambda x: F.linear(x, w, b)) if provider == "dense" else layer, xs)
    benchmark.group = f"decode-B{batch}-in{in_f}-out{out_f}-sp{sparsity}"
    benchmark.extra_info.update(
        provider=provider, case="decode", batch=batch, in_f=in_f, out_f=out_f, sparsity=sparsity, mode="fwd",
        achieved=sum(layer.measure(x) for x in xs) / len(xs),
        union_density=sum(layer.union_density(x) for x in xs) / len(xs),
    )
    benchmark.pedantic(run, rounds=60, iterations=1, warmup_rounds=POOL)


# ---- both savings: an unstructured 90%-sparse weight behind an activation-sparse input (decode) ----
BOTH = [pytest.param(1, 4096, 11008, s, id=f"B1-in4096-out11008-w0.9-sp{s}") for s in ACT_DECODE_SPARSITIES]


@pytest.mark.parametrize("provider", ["dense", "weight_only", "sparseops"])
@pytest.mark.parametrize("batch,in_f,out_f,sparsity", BOTH)
def test_act_both(benchmark, provider, batch, in_f, out_f, sparsity):
    """``ActivationSparseLinear`` over a 90%-sparse ``SparseLinear`` (``sparseops``: both sparsities skipped)
    against the SparseLinear on the sparsified input (``weight_only``: the weight's zeros skipped, every
    input read) and dense ``F.linear`` with the same masked weight."""
    torch.set_num_threads(THREADS)
    g = torch.Generator().manual_seed(0)
    lin = _weights(in_f, out_f, g)
    sp = sparseops.SparseLinear.from_dense(lin, sparsity=0.9)
    with torch.no_grad():
        lin.weight.copy_(sp.to_dense().weight)
    layer = sparseops.ActivationSparseLinear.from_dense(sp, sparsity=sparsity, mode="tensor")
    layer.calibrate(torch.randn(256, in_f, generator=g))
    xs = [torch.randn(batch, in_f, generator=g) for _ in range(POOL)]
    _check_decode(lin, layer, xs[0])
    thr = layer.threshold
    w, b = lin.weight.detach(), lin.bias.detach()
    fn = {
        "dense": lambda x: F.linear(x, w, b),
        "weight_only": lambda x: sp(sparseops.reference.act_mask(x, thr, False)[0]),
        "sparseops": layer,
    }[provider]
    run = _cycle(fn, xs)
    benchmark.group = f"both-B{batch}-in{in_f}-out{out_f}-sp{sparsity}"
    benchmark.extra_info.update(
        provider=provider, case="both (w 90%)", batch=batch, in_f=in_f, out_f=out_f, sparsity=sparsity, mode="fwd",
        achieved=sum(layer.measure(x) for x in xs) / len(xs),
        union_density=sum(layer.union_density(x) for x in xs) / len(xs),
    )
    benchmark.pedantic(run, rounds=60, iterations=1, warmup_rounds=POOL)


def make_train(batch, in_f, out_f, seed=0, sparsity=0.9):
    g = torch.Generator().manual_seed(seed)
    lin = _weights(in_f, out_f, g)
    layer = sparseops.ActivationSparseLinear.from_dense(lin, mode="relu")
    # shifted down by the standard normal's `sparsity` quantile (1.2816 for 0.9): that share of relu(h) is 0
    h = torch.randn(batch, in_f, generator=g) - torch.distributions.Normal(0.0, 1.0).icdf(torch.tensor(sparsity)).item()
    return lin, layer, h


@pytest.mark.parametrize("provider", ["dense", "sparseops"])
@pytest.mark.parametrize("mode", ["fwdbwd", "fwd"])
@pytest.mark.parametrize("batch,in_f,out_f,sp", [pytest.param(*s, id="B{}-in{}-out{}-sp{}".format(*s)) for s in ACT_TRAIN_CASES])
def test_act_train(benchmark, provider, batch, in_f, out_f, sp, mode):
    torch.set_num_threads(THREADS)
    lin, layer, h = make_train(batch, in_f, out_f, sparsity=sp)
    model = (lambda t: lin(torch.relu(t))) if provider == "dense" else layer
    with torch.no_grad():
        want = lin(torch.relu(h)).double()
        err = ((layer(h).double() - want).norm() / want.norm()).item()
    assert err < 1e-5, f"output off by relative error {err:.2e}"
    if mode == "fwd":
        def run():
            with torch.no_grad():
                return model(h)
    else:
        hg = h.clone().requires_grad_(True)
        params = [p for p in (lin if provider == "dense" else layer).parameters() if p.requires_grad]

        def run():
            # fresh gradients, as after optimizer.zero_grad() (not added into the last call's)
            hg.grad = None
            for p in params:
                p.grad = None
            y = model(hg)
            y.backward(torch.ones_like(y))
            return y

    benchmark.group = f"train-B{batch}-in{in_f}-out{out_f}-sp{sp}-{mode}"
    benchmark.extra_info.update(
        provider=provider, case="relu-train", batch=batch, in_f=in_f, out_f=out_f, sparsity=round(layer.measure(h), 3),
        mode=mode, achieved=layer.measure(h), union_density=layer.union_density(h),
    )
    benchmark.pedantic(run, rounds=5, iterations=1, warmup_rounds=1)
