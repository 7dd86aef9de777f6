"""Build the ``_refreekv_C`` CUDA extension (csrc/), ahead of time or just in time.

Standalone on purpose: it imports nothing from ``refreekv_vllm`` so ``setup.py`` can load it by
path before the package is importable::

    spec = importlib.util.spec_from_file_location("build_cuda", "refreekv_vllm/ops/build_cuda.py")
    ...; ext_modules = [build_cuda.cuda_extension()]; cmdclass = {"build_ext": BuildExtension}

``python -m refreekv_vllm.ops.build_cuda`` JIT-builds into the cache (compiles without a GPU;
set ``TORCH_CUDA_ARCH_LIST``, default ``9.0``).
"""

from __future__ import annotations

import os
import shutil
import sys
from pathlib import Path

EXTENSION_NAME = "_refreekv_C"
# An installed wheel carries the sources inside the package (setup.py copies them); a source
# checkout has them in csrc/ next to the package.
_PACKAGE_CSRC = Path(__file__).resolve().parents[1] / "csrc"
CSRC = _PACKAGE_CSRC if _PACKAGE_CSRC.is_dir() else Path(__file__).resolve().parents[2] / "csrc"
SOURCES = ("torch_bindings.cpp", "last_row_scores.cu")
DEFAULT_ARCH_LIST = "9.0"


def source_paths(csrc: Path = CSRC) -> list[str]:
    paths = [csrc / name for name in SOURCES]
    missing = [str(p) for p in paths if not p.is_file()]
    if missing:
        raise FileNotFoundError(
            f"CUDA sources not found: {missing} (they ship in the wheel and in a source "
            "checkout's csrc/)"
        )
    return [str(p) for p in paths]


def extra_cuda_cflags() -> list[str]:
    return ["-O3", "--use_fast_math", "-std=c++17", "-lineinfo"]


def extra_cflags() -> list[str]:
    return ["-O3", "-std=c++17"]


def cache_dir() -> str:
    """``$TORCH_EXTENSIONS_DIR/refreekv_vllm`` or ``~/.cache/refreekv_vllm/torch_extensions``."""
    root = os.environ.get("TORCH_EXTENSIONS_DIR")
    path = (
        Path(root) / "refreekv_vllm"
        if root
        else Path.home() / ".cache" / "refreekv_vllm" / "torch_extensions"
    )
    path.mkdir(parents=True, exist_ok=True)
    return str(path)


def _ensure_cuda_home() -> None:
    """Point ``CUDA_HOME`` at a toolkit that has ``libcudart`` when the guess would miss it.

    ``torch.utils.cpp_extension`` takes ``CUDA_HOME`` from ``dirname(dirname(which nvcc))`` at
    import time; an ``nvcc`` wrapper script in ``/usr/local/bin`` makes that ``/usr/local``,
    which has no CUDA libraries. Must run before ``torch.utils.cpp_extension`` is imported.
    """
    if os.environ.get("CUDA_HOME") or os.environ.get("CUDA_PATH"):
        return
    nvcc = shutil.which("nvcc")
    candidates = [Path(nvcc).resolve().parents[1]] if nvcc else []
    candidates.append(Path("/usr/local/cuda"))
    for home in candidates:
        if any((home / lib / "libcudart.so").exists() for lib in ("lib64", "lib")):
            if "torch.utils.cpp_extension" in sys.modules:
                return  # too late to matter; keep torch's own choice
            os.environ["CUDA_HOME"] = str(home)
            return


def cuda_extension(name: str = f"refreekv_vllm.{EXTENSION_NAME}"):
    """A ``torch.utils.cpp_extension.CUDAExtension`` for ``setup.py``'s ``ext_modules``.

    Pair it with ``cmdclass={"build_ext": torch.utils.cpp_extension.BuildExtension}``.
    ``TORCH_CUDA_ARCH_LIST`` picks the targets (default ``9.0`` when unset).
    """
    _ensure_cuda_home()
    from torch.utils.cpp_extension import CUDAExtension

    os.environ.setdefault("TORCH_CUDA_ARCH_LIST", DEFAULT_ARCH_LIST)
    root = CSRC.parent
    return CUDAExtension(
        name=name,
        sources=[os.path.relpath(p, root) for p in source_paths()],
        extra_compile_args={"cxx": extra_cflags(), "nvcc": extra_cuda_cflags()},
    )


def jit_load(verbose: bool = False) -> str:
    """Compile (once, cached) and load the extension; returns the shared library path.

    Loading registers ``torch.ops._refreekv_C``. Compiling needs ``nvcc`` and ninja, not a GPU.
    """
    import torch

    _ensure_cuda_home()
    from torch.utils import cpp_extension

    if not os.environ.get("TORCH_CUDA_ARCH_LIST") and not torch.cuda.is_available():
        os.environ["TORCH_CUDA_ARCH_LIST"] = DEFAULT_ARCH_LIST
    build_dir = cache_dir()
    cpp_extension.load(
        name=EXTENSION_NAME,
        sources=source_paths(),
        extra_cflags=extra_cflags(),
        extra_cuda_cflags=extra_cuda_cflags(),
        build_directory=build_dir,
        is_python_module=False,
        verbose=verbose,
    )
    return str(Path(build_dir) / f"{EXTENSION_NAME}.so")


def main() -> None:
    print(jit_load(verbose=True))


if __name__ == "__main__":
    main()
