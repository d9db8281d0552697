"""Builds the native extension engine._C with CMake against the installed torch.

ENGINE_SKIP_NATIVE=1 skips it (tests that need it then skip, saying so; CI never sets it).
The CUDA sources are built too when torch has CUDA and nvcc is on PATH, or when
ENGINE_BUILD_CUDA=1 forces it.
"""
import os
import shutil
import subprocess
import sys
from pathlib import Path

from setuptools import Extension, setup
from setuptools.command.build_ext import build_ext

ROOT = Path(__file__).resolve().parent


class CMakeExtension(Extension):
    def __init__(self, name: str):
        super().__init__(name, sources=[])


def _want_cuda(torch) -> bool:
    forced = os.environ.get("ENGINE_BUILD_CUDA")
    if forced is not None:
        return forced == "1"
    return torch.version.cuda is not None and shutil.which("nvcc") is not None


class CMakeBuild(build_ext):
    def build_extension(self, ext: Extension) -> None:
        if os.environ.get("ENGINE_SKIP_NATIVE") == "1":
            print("ENGINE_SKIP_NATIVE=1: skipping engine._C; native backends will be unavailable")
            return
        try:
            import torch
        except ImportError:
            sys.exit("engine._C builds against the installed torch: install it first "
                     "(pip install torch==2.13.0), then pip install --no-build-isolation -e .")
        out_dir = Path(self.get_ext_fullpath(ext.name)).resolve().parent
        build_dir = Path(self.build_temp).resolve() / "cmake"
        build_dir.mkdir(parents=True, exist_ok=True)
        args = [
            f"-DCMAKE_PREFIX_PATH={torch.utils.cmake_prefix_path}",
            f"-DPython3_EXECUTABLE={sys.executable}",
            f"-DENGINE_OUTPUT_DIR={out_dir}",
            "-DCMAKE_BUILD_TYPE=Release",
            f"-DENGINE_BUILD_CUDA={'ON' if _want_cuda(torch) else 'OFF'}",
        ]
        if shutil.which("ninja"):
            args.append("-GNinja")
        subprocess.run(["cmake", "-S", str(ROOT), "-B", str(build_dir), *args], check=True)
        jobs = str(os.cpu_count() or 2)
        subprocess.run(["cmake", "--build", str(build_dir), "-j", jobs], check=True)


setup(ext_modules=[CMakeExtension("engine._C")], cmdclass={"build_ext": CMakeBuild})
