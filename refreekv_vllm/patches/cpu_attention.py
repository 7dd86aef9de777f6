"""The CPU attention kernel's work plan, a private vLLM function (registered in
``patches/__init__.py`` as a ``call`` hook)."""

from typing import Any

import torch


def cpu_attention_plan(impl: Any, metadata: Any, dtype: torch.dtype) -> torch.Tensor:
    """The CPU attention kernel's work split for ``metadata``'s sequence lengths, planned as
    vLLM's CPU backend plans it (its builder does so once per step, from the logical lengths;
    a layer whose lengths are shortened by its gaps needs its own)."""
    from vllm import _custom_ops as ops
    from vllm import envs

    return ops.cpu_attn_get_scheduler_metadata(
        num_reqs=metadata.seq_lens.shape[0], num_heads=impl.num_heads,
        num_kv_heads=impl.num_kv_heads, head_dim=impl.head_size, seq_lens=metadata.seq_lens,
        dtype=dtype, query_start_loc=metadata.query_start_loc, causal=metadata.causal,
        sliding_window_size=-1, isa=impl.isa, enable_kv_split=envs.VLLM_CPU_ATTN_SPLIT_KV,
        dynamic_causal=metadata.dynamic_causal)
