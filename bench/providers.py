"""Benchmark providers: each builds a layer from one masked nn.Linear and runs fwd / fwd+bwd.

- dense: the nn.Linear itself (its weight already zero off the mask);
- torch_sparse: a torch CSR weight under autograd (``torch.sparse.addmm``);
- sparseops: sparseops.SparseLinear;
- sparseprop: the SparseProp package (if installed), the published CPU anchor.
"""

from __future__ import annotations

import torch

import sparseops

try:
    from sparseprop.modules import SparseLinear as _SPLinear

    HAS_SPARSEPROP = True
except Exception:  # not installed (a benchmark-only optional dependency)
    HAS_SPARSEPROP = False


class TorchCSRLinear(torch.nn.Module):
    def __init__(self, linear: torch.nn.Linear):
        super().__init__()
        w = linear.weight.detach()
        self.weight = torch.nn.Parameter(w.to_sparse_csr())
        self.bias = torch.nn.Parameter(linear.bias.detach().clone())

    def forward(self, x):
        # [out, in] @ [in, B] -> [out, B]
        return torch.sparse.addmm(self.bias.unsqueeze(1), self.weight, x.t()).t()


def providers() -> list[str]:
    names = ["dense", "torch_sparse", "sparseops"]
    if HAS_SPARSEPROP:
        names.append("sparseprop")
    return names


def make_case(batch: int, in_f: int, out_f: int, sparsity: float, seed: int = 0):
    """A masked nn.Linear and its input; the same for every provider."""
    g = torch.Generator().manual_seed(seed)
    lin = torch.nn.Linear(in_f, out_f)
    with torch.no_grad():
        lin.weight.copy_(torch.randn(out_f, in_f, generator=g) / in_f**0.5)
        mask = sparseops.masks.magnitude(lin.weight, sparsity)
        lin.weight.mul_(mask)
    x = torch.randn(batch, in_f, generator=g)
    return lin, mask, x


def build(provider: str, lin: torch.nn.Linear, mask: torch.Tensor) -> torch.nn.Module:
    if provider == "dense":
        return lin
    if provider == "torch_sparse":
        return TorchCSRLinear(lin)
    if provider == "sparseops":
        return sparseops.SparseLinear.from_dense(lin, mask=mask)
    if provider == "sparseprop":
        return _SPLinear.from_dense(lin)
    raise ValueError(f"provider: unknown {provider!r}")


def step_fn(layer: torch.nn.Module, x: torch.Tensor, mode: str):
    """A closure that runs one forward (``fwd``) or forward+backward (``fwdbwd``)."""
    if mode == "fwd":

        def run():
            with torch.no_grad():
                return layer(x)

        return run
    xg = x.clone().requires_grad_(True)
    params = [p for p in layer.parameters() if p.requires_grad]

    def run():
        # as a training step after optimizer.zero_grad(): fresh gradients, not added into the last call's
        xg.grad = None
        for p in params:
            p.grad = None
        y = layer(xg)
        y.backward(torch.ones_like(y))
        return y

    return run


def _rel(got: torch.Tensor, ref: torch.Tensor) -> float:
    return ((got.double() - ref).norm() / ref.norm().clamp_min(1e-30)).item()


def check(layer: torch.nn.Module, lin: torch.nn.Linear, x: torch.Tensor, mode: str = "fwd") -> None:
    """Assert the provider computes the dense layer's output (fp32 tolerance) before it is timed; with
    ``mode="fwdbwd"`` also the input gradient of the timed step (``dy`` all ones) and, for a sparseops
    layer, its weight gradient on the mask, against fp64."""
    with torch.no_grad():
        ref = torch.nn.functional.linear(x.double(), lin.weight.double(), lin.bias.double())
        got = layer(x).double()
    err = _rel(got, ref)
    assert err < 1e-4, f"provider output off by relative error {err:.2e}"
    if mode == "fwdbwd":
        check_backward(layer, lin.weight, x)


def check_backward(layer: torch.nn.Module, weight: torch.Tensor, x: torch.Tensor) -> None:
    """The gradients of the timed step (``y.backward(ones)``) against fp64: ``dx = 1 W`` and, where the layer
    stores ``values`` in a sparseops format, ``dW = 1ᵀ x`` on its mask."""
    xg = x.clone().requires_grad_(True)
    for p in layer.parameters():
        p.grad = None
    y = layer(xg)
    y.backward(torch.ones_like(y))
    ones = torch.ones(x.shape[0], weight.shape[0], dtype=torch.float64)
    err = _rel(xg.grad, ones @ weight.double())
    assert err < 1e-4, f"provider input gradient off by relative error {err:.2e}"
    fmt, values = getattr(layer, "format", None), getattr(layer, "values", None)
    if fmt is not None and isinstance(values, torch.Tensor) and values.grad is not None:
        want = (ones.t() @ x.double()) * layer.mask
        err = _rel(fmt.to_dense(values.grad.double()), want)
        assert err < 1e-4, f"provider weight gradient off by relative error {err:.2e}"
    for p in layer.parameters():
        p.grad = None
