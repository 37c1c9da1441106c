"""The one assert helper: RMS error relative to an fp64 reference, with a tolerance per dtype."""

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
