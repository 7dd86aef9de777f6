"""refreekv-vllm: ReFreeKV threshold-free KV-cache pruning as a vLLM plugin (build hooks)."""

import importlib.util
import os
import shutil
from pathlib import Path

from setuptools import find_packages, setup
from setuptools.command.build_py import build_py

KERNEL_SOURCES = Path("csrc")


class BuildPyWithKernelSources(build_py):
    """Ship csrc/ inside the package so that an installed wheel can build the CUDA kernel
    (``kernel: cuda``) just in time when it was not built ahead of time."""

    def run(self) -> None:
        super().run()
        target = Path(self.build_lib) / "refreekv_vllm" / "csrc"
        target.mkdir(parents=True, exist_ok=True)
        for source in KERNEL_SOURCES.iterdir():
            shutil.copy2(source, target / source.name)


def ahead_of_time_kernels() -> dict:
    """With REFREEKV_BUILD_CUDA=1 (the Docker image), compile ``_refreekv_C`` into the wheel;
    needs torch and nvcc at build time, not a GPU."""
    if os.environ.get("REFREEKV_BUILD_CUDA") != "1":
        return {}
    spec = importlib.util.spec_from_file_location("build_cuda",
                                                  "refreekv_vllm/ops/build_cuda.py")
    build_cuda = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(build_cuda)
    from torch.utils.cpp_extension import BuildExtension

    return {"ext_modules": [build_cuda.cuda_extension()],
            "cmdclass": {"build_ext": BuildExtension}}


kernels = ahead_of_time_kernels()
# Metadata, dependencies and entry points are in pyproject.toml; this file adds what a
# declarative config cannot: csrc/ shipped with the package and the optional ahead-of-time kernel.
setup(
    packages=find_packages(include=["refreekv_vllm", "refreekv_vllm.*"]),
    ext_modules=kernels.get("ext_modules", []),
    cmdclass={"build_py": BuildPyWithKernelSources, **kernels.get("cmdclass", {})},
)
