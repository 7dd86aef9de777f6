"""Typed wrapper over ``torch.ops._refreekv_C`` (csrc/), built ahead of time or JIT on first use.

Lookup order: an already registered op; the ahead-of-time build ``refreekv_vllm._refreekv_C``
(``setup.py`` with :func:`refreekv_vllm.ops.build_cuda.cuda_extension`); otherwise a JIT build
with ``torch.utils.cpp_extension.load`` into ``$TORCH_EXTENSIONS_DIR/refreekv_vllm`` or
``~/.cache/refreekv_vllm/torch_extensions`` (first call compiles for a minute or more).
"""

from __future__ import annotations

import contextlib
import importlib
import threading

import torch

from refreekv_vllm.ops.launch_utils import check_chunk_size, default_chunk_size
from refreekv_vllm.ops.workspace import workspace_layout

_LOCK = threading.Lock()
_LOADED = False


def _op_registered() -> bool:
    return hasattr(torch.ops, "_refreekv_C") and hasattr(torch.ops._refreekv_C, "compute_cuts")


def load_extension(verbose: bool = False) -> None:
    """Make ``torch.ops._refreekv_C.compute_cuts`` available (idempotent, thread-safe)."""
    global _LOADED
    if _LOADED:
        return
    with _LOCK:
        if _LOADED:
            return
        if not torch.cuda.is_available():
            raise RuntimeError(
                "the 'cuda' scoring backend needs a CUDA device (torch.cuda.is_available() is "
                "False); use backend='torch' on CPU or backend='triton' under TRITON_INTERPRET=1"
            )
        if not _op_registered():
            try:
                importlib.import_module("refreekv_vllm._refreekv_C")
            except ImportError:
                from refreekv_vllm.ops.build_cuda import jit_load

                jit_load(verbose=verbose)
        if not _op_registered():
            raise RuntimeError("loading the _refreekv_C extension did not register compute_cuts")
        _register_fake()
        _LOADED = True


def _register_fake() -> None:
    # Mutates only its outputs; shapes are unchanged, so the fake kernel does nothing.
    with contextlib.suppress(RuntimeError):  # already registered
        torch.library.register_fake("_refreekv_C::compute_cuts")(lambda *args, **kwargs: None)


def cuda_compute_cuts(
    query: torch.Tensor,
    key_cache: torch.Tensor,
    block_tables: torch.Tensor,
    prompt_lens: torch.Tensor,
    window_lens: torch.Tensor,
    thresholds: torch.Tensor,
    *,
    num_sink_tokens: int = 4,
    scale: float | None = None,
    agg: str = "max",
    max_prompt_len: int | None = None,
    curve_out: torch.Tensor | None = None,
    out: torch.Tensor | None = None,
    workspace: torch.Tensor | None = None,
    chunk_size: int | None = None,
    window_lse: torch.Tensor | None = None,
) -> torch.Tensor:
    """CUDA twin of ``triton_compute_cuts`` (same arguments and result).

    A ``query`` whose dtype is neither ``key_cache``'s nor fp32 is upcast (one copy). At most
    64 window rows, 256 query heads and head size 256. ``workspace``: flat fp32 of at least
    ``workspace_layout(...).total`` elements (:mod:`refreekv_vllm.ops.workspace`, the layout
    the Triton kernels use too). ``window_lse``: as in ``triton_compute_cuts``, the
    window rows' normalisers, so that the keys are read once.
    """
    load_extension()
    r, w_max, hq, d = query.shape
    bs = key_cache.shape[1]
    if agg not in ("max", "mean"):
        raise ValueError(f"agg must be 'max' or 'mean', got {agg!r}")
    if max_prompt_len is None:
        max_prompt_len = block_tables.shape[1] * bs
    if query.dtype not in (key_cache.dtype, torch.float32):
        query = query.float()  # the kernel reads queries in the cache dtype or fp32
    chunk = chunk_size or default_chunk_size(r, key_cache.shape[2], max_prompt_len, query.device)
    check_chunk_size(chunk)
    if out is None:
        out = torch.empty(r, dtype=torch.int32, device=query.device)
    layout = workspace_layout(r, w_max, hq, max_prompt_len, chunk)
    if workspace is None:
        workspace = torch.empty(layout.total, dtype=torch.float32, device=query.device)
    torch.ops._refreekv_C.compute_cuts(
        query, key_cache, block_tables, prompt_lens, window_lens, thresholds, out, workspace,
        curve_out, window_lse, num_sink_tokens, d**-0.5 if scale is None else scale,
        agg == "max", chunk, max_prompt_len, layout.offsets(),
    )  # fmt: skip
    return out
