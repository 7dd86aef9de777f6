"""Release the gap blocks of one request in one KV cache group (VLLM.md §6).

Same mechanics as vLLM's ``SingleTypeKVCacheManager._remove_blocks_in_range``: the entries become
``null_block`` (the row keeps its length, so logical block ``i`` still covers tokens
``[i * block_size, (i + 1) * block_size)`` and length-based allocation stays exact) and the
request's references are dropped with one ``BlockPool.free_blocks`` call, tail block first.
A block whose ``ref_cnt`` reaches 0 is free; a hashed one stays a prefix-cache hit (its KV was
computed over the full prompt), a block shared with another request only loses one reference.
"""

from __future__ import annotations

from vllm.v1.core.kv_cache_manager import KVCacheManager
from vllm.v1.core.kv_cache_utils import KVCacheBlock

from refreekv_vllm import envs


def release_gap_blocks(
    kv_cache_manager: KVCacheManager,
    request_id: str,
    group_id: int,
    block_range: range,
) -> list[int]:
    """Release the request's blocks at logical indices ``block_range`` in group ``group_id``.

    Entries that are already ``null_block`` (released before) are skipped, so releasing twice
    is a no-op. Indices past the end of the request's row are ignored.

    Returns:
        The released block ids, tail first (the order they were passed to ``free_blocks``).
    """
    if block_range.step != 1 or block_range.start < 0:
        raise ValueError(f"block_range must be a contiguous non-negative range, got {block_range}")
    manager = kv_cache_manager.coordinator.single_type_managers[group_id]
    blocks = manager.req_to_blocks.get(request_id)
    if not blocks:
        return []
    null_block = kv_cache_manager.block_pool.null_block

    released: list[KVCacheBlock] = []
    # Tail first, as _remove_blocks_in_range does: free_blocks queues blocks in the order given,
    # so the newest prompt blocks become the first eviction candidates.
    for i in reversed(range(block_range.start, min(block_range.stop, len(blocks)))):
        block = blocks[i]
        if block.is_null:
            continue
        released.append(block)
        blocks[i] = null_block
    if not released:
        return []

    debug = envs.REFREEKV_DEBUG_ACCOUNTING
    if debug:
        _check_before_free(released, blocks)
    kv_cache_manager.block_pool.free_blocks(released)
    if debug:
        negative = [b.block_id for b in released if b.ref_cnt < 0]
        assert not negative, f"request {request_id}: blocks {negative} have ref_cnt < 0"
    return [b.block_id for b in released]


def _check_before_free(released: list[KVCacheBlock], row: list[KVCacheBlock]) -> None:
    ids = [b.block_id for b in released]
    assert not any(b.is_null for b in released), f"null_block among released blocks {ids}"
    assert len(set(ids)) == len(ids), f"block released twice in one call: {ids}"
    assert all(b.ref_cnt >= 1 for b in released), (
        f"releasing blocks without a reference: {[(b.block_id, b.ref_cnt) for b in released]}")
    # A block still referenced elsewhere in the row would be released again at finish.
    still_held = set(ids).intersection(b.block_id for b in row if not b.is_null)
    assert not still_held, f"released blocks {sorted(still_held)} are still in the row"
