"""The CUDA extension's sources compile on a machine without a GPU: ``nvcc`` for the kernel
(sm_90, the build's own flags) and the host compiler for the op registration, against the
installed torch's headers. Running them is for the GPU tests (``test_last_row_scores.py``); this
catches a source that no longer builds before a GPU session spends its time on it."""

from __future__ import annotations

import shutil
import subprocess
import sysconfig
from pathlib import Path

import pytest
import torch

from refreekv_vllm.ops import build_cuda
from tests.markers import slow

NVCC = shutil.which("nvcc")
pytestmark = [
    slow,
    pytest.mark.skipif(NVCC is None, reason="nvcc is not on PATH: the CUDA sources cannot be "
                                            "compiled on this machine"),
]


def _flags() -> list[str]:
    from torch.utils.cpp_extension import include_paths

    abi = int(torch._C._GLIBCXX_USE_CXX11_ABI)
    return ([f"-I{path}" for path in include_paths()]
            + [f"-I{sysconfig.get_paths()['include']}", f"-D_GLIBCXX_USE_CXX11_ABI={abi}"])


def _compile(command: list[str]) -> None:
    done = subprocess.run(command, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, f"{' '.join(command)}\n{done.stdout}\n{done.stderr}"


def test_kernel_compiles_for_hopper(tmp_path: Path) -> None:
    (source,) = [p for p in build_cuda.source_paths() if p.endswith(".cu")]
    _compile([NVCC, "-c", source, "-o", str(tmp_path / "kernel.o"), *_flags(),
              *build_cuda.extra_cuda_cflags(), "-gencode", "arch=compute_90,code=sm_90"])
    assert (tmp_path / "kernel.o").stat().st_size > 0


def test_op_registration_compiles(tmp_path: Path) -> None:
    (source,) = [p for p in build_cuda.source_paths() if p.endswith(".cpp")]
    compiler = shutil.which("c++") or shutil.which("g++")
    if compiler is None:
        pytest.skip("no host C++ compiler")
    _compile([compiler, "-c", source, "-o", str(tmp_path / "bindings.o"), "-fPIC", *_flags(),
              *build_cuda.extra_cflags()])
    assert (tmp_path / "bindings.o").stat().st_size > 0


def test_a_broken_kernel_source_is_reported(tmp_path: Path) -> None:
    """The check can fail: a source with a type error does not pass."""
    broken = tmp_path / "broken.cu"
    broken.write_text("__global__ void k(float* x) { x[0] = undefined_name; }\n")
    with pytest.raises(AssertionError, match="undefined_name"):
        _compile([NVCC, "-c", str(broken), "-o", str(tmp_path / "broken.o"), *_flags(),
                  "-gencode", "arch=compute_90,code=sm_90"])
