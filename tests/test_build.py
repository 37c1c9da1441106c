"""The build switches: SPARSEOPS_NO_CPP falls back to the reference with a warning; SPARSEOPS_ISA forces a path;
the ISA translation units share no code."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

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


def test_the_cpp_extension_is_built_unless_switched_off():
    # every C++ test skips when _C is missing (the ops then run on the reference and pass): a broken build
    # must fail here instead of turning the suite into a reference-only run
    if os.environ.get("SPARSEOPS_NO_CPP") == "1":
        pytest.skip("SPARSEOPS_NO_CPP=1: the reference path is what is asked for")
    from sparseops._cpp import _C

    assert _C is not None and sparseops.cpp_available(), "sparseops._C did not import"
    assert sparseops.isa() in ("avx512", "avx2", "portable")


def _cpu_flags() -> set[str]:
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return set()
    for line in text.splitlines():
        if line.startswith("flags"):
            return set(line.split(":", 1)[1].split())
    return set()


@pytest.mark.skipif(not {"avx2", "fma", "f16c"} <= _cpu_flags(), reason="this CPU (or OS) reports no AVX2/FMA/F16C")
def test_an_avx2_cpu_gets_the_avx2_kernels():
    # the isa fixture skips a path when best_isa() is below it: on a CPU that has it, that would mean the
    # path's objects were dropped from the build, which must fail here, not skip
    from sparseops._cpp import _C

    if os.environ.get("SPARSEOPS_NO_CPP") == "1":
        pytest.skip("SPARSEOPS_NO_CPP=1")
    want = "avx512" if {"avx512f", "avx512vl"} <= _cpu_flags() else "avx2"
    assert _C is not None and _C.best_isa() == want


@pytest.mark.skipif(not sparseops.cpp_available(), reason="needs the C++ extension")
def test_isa_env_avx2_caps_the_path():
    from sparseops._cpp import _C

    res = _run("import sparseops; print(sparseops.isa())", SPARSEOPS_ISA="avx2")
    assert res.returncode == 0, res.stderr
    assert res.stdout.strip() == ("portable" if _C.best_isa() == "portable" else "avx2")


@pytest.mark.skipif(not sparseops.cpp_available(), reason="needs the C++ extension")
def test_set_isa_falls_back_to_what_the_cpu_has():
    from sparseops._cpp import _C

    order = ["portable", "avx2", "avx512"]
    prev = sparseops.isa()
    try:
        for name in order:
            got = sparseops.set_isa(name)
            assert got == order[min(order.index(name), order.index(_C.best_isa()))]
            assert sparseops.isa() == got
    finally:
        sparseops.set_isa(prev)


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


CSRC = Path(__file__).resolve().parents[1] / "csrc"
ISA_FLAGS = {
    "avx512": ["-mavx2", "-mfma", "-mf16c", "-mavx512f", "-mavx512vl", "-DSPARSEOPS_AVX2", "-DSPARSEOPS_AVX512"],
    "avx2": ["-mavx2", "-mfma", "-mf16c", "-DSPARSEOPS_AVX2"],
    "portable": [],
}


def _compiler() -> str | None:
    return os.environ.get("CXX") or shutil.which("c++") or shutil.which("g++")


@pytest.mark.skipif(_compiler() is None or shutil.which("nm") is None, reason="needs a C++ compiler and binutils nm")
def test_isa_objects_share_no_inline_code(tmp_path):
    """No function of the kernels is a weak symbol in an ISA's object file.

    The linker keeps one copy of a weak (inline, external linkage) function; with the same one in
    ``csr_avx2.cpp`` (built with -mavx2 -mfma) and ``csr_portable.cpp`` it may hand the portable path
    the AVX2 copy, which faults on a CPU without AVX2. The kernel headers give everything internal
    linkage instead. At -O0 nothing is inlined away, so every inline function used shows up here.
    """
    units = sorted({p.stem.rsplit("_", 1)[0] for p in CSRC.glob("*_avx2.cpp")})
    assert {"csr", "nm", "fewbit", "bsr", "act"} <= set(units), units
    assert units == sorted(p.stem.rsplit("_", 1)[0] for p in CSRC.glob("*_avx512.cpp")), "an avx512 unit is missing"
    jobs = []
    for unit in units:
        for isa, flags in ISA_FLAGS.items():
            obj = tmp_path / f"{unit}_{isa}.o"
            cmd = [_compiler(), "-std=c++17", "-O0", "-fPIC", "-fopenmp", *flags, f"-I{CSRC}", "-c",
                   str(CSRC / f"{unit}_{isa}.cpp"), "-o", str(obj)]
            jobs.append((obj, isa, subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)))
    weak, exported = {}, {}
    for obj, isa, proc in jobs:
        _, err = proc.communicate()
        assert proc.returncode == 0, err
        syms = subprocess.run(["nm", "-C", str(obj)], capture_output=True, text=True, check=True).stdout
        rows = [line.split(maxsplit=2) for line in syms.splitlines() if len(line.split(maxsplit=2)) == 3]
        weak[obj.name] = sorted({name for _, kind, name in rows if kind in "WVu" and "sparseops::" in name})
        exported[obj.name] = [name for _, kind, name in rows if kind == "T" and name.split("(")[0].endswith(f"_{isa}")]
    assert all(exported.values()), exported  # each object holds its ISA's entry points: the check saw real code
    assert not any(weak.values()), {k: v for k, v in weak.items() if v}


def test_pyproject_lists_every_package_on_disk():
    """A non-editable install (a wheel, ``pip install .``) ships only the packages pyproject lists: every
    folder with an ``__init__.py`` under sparseops/ and kernels/ must be there (sparseops.fewbit was not)."""
    import tomllib

    root = Path(__file__).resolve().parents[1]
    conf = tomllib.loads((root / "pyproject.toml").read_text())["tool"]["setuptools"]
    listed = set(conf["packages"])
    dirs = {name: Path(path) for name, path in conf["package-dir"].items()}
    on_disk = set()
    for name, path in dirs.items():
        for init in (root / path).rglob("__init__.py"):
            rel = init.parent.relative_to(root / path).parts
            on_disk.add(".".join((name, *rel)))
    assert on_disk == listed, f"missing from pyproject: {sorted(on_disk - listed)}; listed but absent: {sorted(listed - on_disk)}"
