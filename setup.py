"""Build script: setuptools drives CMake for the ``sparseops._C`` extension.

``SPARSEOPS_NO_CPP=1`` skips the C++ build; the package then runs on its pure-torch
reference path on CPU and warns once at import.
"""

import os
import subprocess
import sys
from pathlib import Path

from setuptools import Extension, setup
from setuptools.command.build_ext import build_ext

ROOT = Path(__file__).parent.resolve()


class CMakeExtension(Extension):
    def __init__(self, name: str):
        super().__init__(name, sources=[])


class CMakeBuild(build_ext):
    def build_extension(self, ext: Extension) -> None:
        import pybind11

        out_dir = Path(self.get_ext_fullpath(ext.name)).parent.resolve()
        build_temp = Path(self.build_temp) / ext.name
        build_temp.mkdir(parents=True, exist_ok=True)
        cfg = "Debug" if self.debug else "Release"
        args = [
            f"-DCMAKE_LIBRARY_OUTPUT_DIRECTORY={out_dir}",
            f"-DPython_EXECUTABLE={sys.executable}",
            f"-Dpybind11_DIR={pybind11.get_cmake_dir()}",
            f"-DCMAKE_BUILD_TYPE={cfg}",
        ]
        try:
            import ninja  # noqa: F401

            args.append("-GNinja")
        except ImportError:
            pass
        args += os.environ.get("SPARSEOPS_CMAKE_ARGS", "").split()
        subprocess.run(["cmake", str(ROOT), *args], cwd=build_temp, check=True)
        jobs = os.environ.get("CMAKE_BUILD_PARALLEL_LEVEL", str(os.cpu_count() or 2))
        subprocess.run(["cmake", "--build", ".", "--config", cfg, "-j", jobs], cwd=build_temp, check=True)


ext_modules = [] if os.environ.get("SPARSEOPS_NO_CPP") == "1" else [CMakeExtension("sparseops._C")]

setup(
    ext_modules=ext_modules,
    cmdclass={"build_ext": CMakeBuild},
    package_dir={"sparseops": "sparseops", "sparseops.kernels": "kernels"},
)
