"""The build switches: SPARSEOPS_NO_CPP falls back to the reference with a warning; SPARSEOPS_ISA forces a path."""

import os
import subprocess
import sys

import pytest

import sparseops


def _run(code: str, **env) -> subprocess.CompletedProcess:
    full_env = {**os.environ, **env}
    return subprocess.run([sys.executable, "-W", "always", "-c", code], capture_output=True, text=True, env=full_env)


def test_no_cpp_warns_and_runs_reference():
    code = (
        "import torch, sparseops\n"
        "assert sparseops.isa() == 'reference', sparseops.isa()\n"
        "assert not sparseops.cpp_available()\n"
        "torch.manual_seed(0)\n"
        "lin = torch.nn.Linear(13, 7)\n"
        "layer = sparseops.SparseLinear.from_dense(lin, sparsity=0.5)\n"
        "x = torch.randn(5, 13, requires_grad=True)\n"
        "y = layer(x); y.sum().backward()\n"
        "ref = layer.to_dense()(x.detach())\n"
        "assert (y - ref).abs().max() < 1e-5, (y - ref).abs().max()\n"
        "assert layer.values.grad is not None and x.grad is not None\n"
        "print('ok')\n"
    )
    res = _run(code, SPARSEOPS_NO_CPP="1")
    assert res.returncode == 0, res.stderr
    assert "ok" in res.stdout
    assert "C++ kernels unavailable" in res.stderr and "SPARSEOPS_NO_CPP=1" in res.stderr


@pytest.mark.skipif(not sparseops.cpp_available(), reason="needs the C++ extension")
def test_isa_env_forces_portable():
    res = _run("import sparseops; print(sparseops.isa())", SPARSEOPS_ISA="portable")
    assert res.returncode == 0, res.stderr
    assert res.stdout.strip() == "portable"


@pytest.mark.skipif(not sparseops.cpp_available(), reason="needs the C++ extension")
def test_set_isa_rejects_unknown_name():
    before = sparseops.isa()
    with pytest.raises(ValueError, match="isa"):
        sparseops.set_isa("avx512-please")
    assert sparseops.isa() == before
