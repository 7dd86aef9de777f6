"""Prefix-cache hits that leave a pruned request's observation window to be computed.

The cut is scored from the queries of the last ``window`` prompt tokens, and queries exist only
for tokens the model runs. A prefix-cache hit that covered part of the window would leave the
request unscored (or scored from a different window than without the hit), so for requests that
will be pruned the hit is shortened, in whole blocks, to end before the window.
"""

from vllm.v1.core.kv_cache_manager import KVCacheBlocks


def capped_hit_tokens(num_hit_tokens: int, num_prompt_tokens: int, window: int,
                      block_size: int) -> int:
    """Largest block-aligned hit length that ends at or before the window's first token."""
    limit = max(0, num_prompt_tokens - window) // block_size * block_size
    return min(num_hit_tokens, limit)


def trim_hit(blocks: KVCacheBlocks, num_tokens: int, block_size: int) -> KVCacheBlocks:
    """Keep the hit's first ``num_tokens // block_size`` blocks in every KV cache group."""
    keep = num_tokens // block_size
    return KVCacheBlocks(tuple(list(group[:keep]) for group in blocks.blocks))
