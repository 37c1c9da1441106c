"""Test set-up: the Triton interpreter when there is no GPU, seeded RNG, and NaN-poisoned allocations."""

import os

import pytest

try:
    import torch

    _HAS_CUDA = torch.cuda.is_available()
except ImportError:  # pragma: no cover - torch is a hard requirement of the suite
    _HAS_CUDA = False

# must happen before any triton kernel module is imported
if not _HAS_CUDA:
    os.environ.setdefault("TRITON_INTERPRET", "1")

import torch  # noqa: E402

_POISONED = ("empty", "empty_like", "empty_strided")


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
    yield


@pytest.fixture(autouse=True)
def _no_dense_fallback(monkeypatch):
    """The activation-sparse ops' dense fallback (``ops.act.DENSE_FALLBACK``) is off, so that a test of a large,
    dense-ish batch on an AVX-512 CPU runs the C++ kernels it means to test; its own tests turn it back on."""
    import sparseops.ops.act as act

    monkeypatch.setattr(act, "DENSE_FALLBACK", False)
    yield


@pytest.fixture(autouse=True)
def _poison_empty(monkeypatch):
    """Allocations made through torch.empty* inside sparseops come back filled with NaN.

    An output element that no kernel writes then fails every comparison. Integer buffers
    (index arrays, few-bit codes) are filled with 0x5A5A5A5A-style garbage for the same reason.
    """
    import sys

    def wrap(fn):
        def poisoned(*args, **kwargs):
            t = fn(*args, **kwargs)
            if t.is_floating_point() and t.numel():
                t.fill_(float("nan"))
            elif t.dtype in (torch.int32, torch.int64) and t.numel():
                t.fill_(0x5A5A5A5A)
            return t

        return poisoned

    patched = {name: wrap(getattr(torch, name)) for name in _POISONED}

    class _TorchProxy:
        def __getattr__(self, name):
            return patched.get(name) or getattr(torch, name)

    proxy = _TorchProxy()
    for modname, mod in list(sys.modules.items()):
        if (modname.startswith("sparseops") or modname.startswith("kernels")) and getattr(mod, "torch", None) is torch:
            monkeypatch.setattr(mod, "torch", proxy)
    yield


# the C++ kernel paths, each needing the ones before it on the CPU (set_isa falls back down this list)
ISA_ORDER = ("portable", "avx2", "avx512")


@pytest.fixture(params=["avx512", "avx2", "portable"])
def isa(request):
    """Run the test on one C++ kernel path (every path the CPU has is tested), restoring the previous one afterwards."""
    import sparseops
    from sparseops._cpp import _C

    if _C is None:
        pytest.skip("sparseops._C is not built: fp32 ops run on the reference path")
    if ISA_ORDER.index(request.param) > ISA_ORDER.index(_C.best_isa()):
        pytest.skip(f"this CPU lacks {request.param} (sparseops._C.best_isa() == {_C.best_isa()!r})")
    prev = sparseops.isa()
    assert sparseops.set_isa(request.param) == request.param
    others = [name for name in ISA_ORDER if name != request.param]
    before = {name: _C.isa_calls()[name] for name in others}
    yield request.param
    sparseops.set_isa(prev)
    # every kernel entry point counts its calls by the object it lives in: a dispatcher that sent a call to
    # another path (a dropped ISA check) would make two runs of a test one
    after = {name: _C.isa_calls()[name] for name in others}
    assert after == before, f"a test on the {request.param} path ran other paths' kernels: {before} -> {after}"
