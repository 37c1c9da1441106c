"""Assert helpers: RMS error relative to an fp64 reference (a tolerance per dtype), and a top-k set check."""

import math

import pytest
import torch

TOL = {torch.float64: 1e-10, torch.float32: 1e-5, torch.bfloat16: 1e-2, torch.float16: 2e-3}


def assert_close_rms(actual: torch.Tensor, expected: torch.Tensor, dtype=None, tol=None, name="output"):
    """Assert ``rms(actual - expected) / rms(expected) <= tol`` over finite entries; NaN and ±Inf positions must match.

    Reports the worst index and any NaN mismatch.
    """
    dtype = dtype or actual.dtype
    tol = TOL[dtype] if tol is None else tol
    assert actual.shape == expected.shape, f"{name}: shape {tuple(actual.shape)} != {tuple(expected.shape)}"
    a = actual.detach().to("cpu", torch.float64)
    e = expected.detach().to("cpu", torch.float64)
    nan_a, nan_e = torch.isnan(a), torch.isnan(e)
    if not torch.equal(nan_a, nan_e):
        idx = (nan_a != nan_e).nonzero()[0].tolist()
        raise AssertionError(
            f"{name}: NaN mismatch at {idx} (actual {a[tuple(idx)].item()}, expected {e[tuple(idx)].item()}); "
            f"{int((nan_a & ~nan_e).sum())} unexpected NaN, {int((~nan_a & nan_e).sum())} missing NaN"
        )
    inf_e = torch.isinf(e)
    if not torch.equal(torch.isinf(a), inf_e) or not torch.equal(a[inf_e], e[inf_e]):
        idx = ((torch.isinf(a) != inf_e) | ((a != e) & inf_e)).nonzero()[0].tolist()
        raise AssertionError(
            f"{name}: Inf mismatch at {idx} (actual {a[tuple(idx)].item()}, expected {e[tuple(idx)].item()})"
        )
    fin = ~nan_e & ~inf_e
    if not fin.any():
        return
    diff = (a - e)[fin]
    ref = e[fin]
    denom = ref.pow(2).mean().sqrt().item()
    err = diff.pow(2).mean().sqrt().item()
    rel = err / denom if denom > 0 else err
    if not rel <= tol:
        full = torch.where(fin, (a - e).abs(), torch.zeros_like(a))
        worst = full.flatten().argmax().item()
        widx = list(torch.unravel_index(torch.tensor(worst), a.shape))
        widx = [int(i) for i in widx]
        raise AssertionError(
            f"{name}: relative RMS error {rel:.3e} > {tol:.1e} ({str(dtype)}); worst at {widx}: "
            f"actual {a[tuple(widx)].item():.6g}, expected {e[tuple(widx)].item():.6g}"
        )


def shape_param(batch, in_f, out_f, sparsity):
    """A ``pytest.param`` of a product's shape with a readable id, e.g. ``B37-in1000-out3-sp0.9``."""
    return pytest.param(batch, in_f, out_f, sparsity, id=f"B{batch}-in{in_f}-out{out_f}-sp{sparsity}")


def assert_top_set(chosen, score, among, k, name, atol=0.0):
    """``chosen`` is the k largest ``score`` among ``among`` (1-D bool/float tensors), compared with an
    independent ``torch.topk``; a position may differ only if its score ties the k-th within ``atol``."""
    assert not (chosen & ~among).any(), f"{name}: chose {int((chosen & ~among).sum())} position(s) outside the candidates"
    assert int(chosen.sum()) == k, f"{name}: chose {int(chosen.sum())}, expected {k}"
    if k == 0:
        return
    s = torch.where(among, score.double(), torch.full_like(score, -math.inf, dtype=torch.float64))
    ref = torch.zeros_like(chosen)
    ref[torch.topk(s, k).indices] = True
    if torch.equal(ref, chosen):
        return
    kth = torch.topk(s, k).values.min()
    diff = ref ^ chosen
    far = diff & ((s - kth).abs() > atol)
    assert not far.any(), (
        f"{name}: {int(diff.sum())} position(s) differ from the reference top-{k}, "
        f"e.g. index {int(far.nonzero()[0])} with score {float(s[far][0]):.6g} vs the k-th {float(kth):.6g}"
    )


def guard_dtype_route(monkeypatch, ops_module, reference_names, dtype):
    """The CPU dtype routing of an ops module: fp64 must take the reference and never reach ``_C``; bf16 and fp16
    must reach ``_C`` (on fp32 copies, or natively) and never the reference. Returns the list of ``_C`` names
    called, filled as the test runs."""
    import pytest
    import torch

    import sparseops.reference as reference

    real = ops_module._C
    calls = []

    class _Spy:
        def __getattr__(self, name):
            if dtype == torch.float64:
                raise AssertionError(f"{dtype} must not reach sparseops._C.{name}")
            calls.append(name)
            return getattr(real, name)

    monkeypatch.setattr(ops_module, "_C", _Spy())
    if dtype != torch.float64:
        for name in reference_names:
            monkeypatch.setattr(reference, name, lambda *a, n=name: pytest.fail(f"{dtype} took reference.{n}"))
    return calls


def weight_sparse_layers():
    """Builders of one small layer ([64 -> 24]) of each weight-sparse pattern, by name (a fresh layer a call)."""
    import sparseops
    from torch import nn

    def make(**kw):
        return lambda: sparseops.SparseLinear.from_dense(nn.Linear(64, 24), **kw)

    return {
        "csr": make(sparsity=0.8),
        "2:4": make(pattern="2:4"),
        "2:4t": make(pattern=sparseops.NM(2, 4, transposable=True)),
        "fanin": make(pattern=sparseops.FanIn(8)),
        "block": make(pattern=sparseops.Block(8), sparsity=0.5),
    }
