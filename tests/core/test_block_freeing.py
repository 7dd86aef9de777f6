"""Gap-block release on vLLM's real KVCacheManager and BlockPool (one KV cache group per layer)."""

import pytest
from vllm.config import VllmConfig
from vllm.v1.core.kv_cache_manager import KVCacheManager
from vllm.v1.request import Request

from refreekv_vllm.core.block_freeing import release_gap_blocks
from tests.core.utils import BLOCK_SIZE, NUM_LAYERS, make_request, per_layer_kv_cache_config

NUM_BLOCKS = 80
PROMPT = list(range(100, 130))  # 30 tokens: 7 full blocks + 1 partial per group
BLOCKS_PER_GROUP = 8
GAP = range(1, 5)


@pytest.fixture(scope="module")
def vllm_config() -> VllmConfig:
    return VllmConfig()


def make_manager(vllm_config: VllmConfig, enable_caching: bool = True) -> KVCacheManager:
    return KVCacheManager(
        per_layer_kv_cache_config(vllm_config, NUM_BLOCKS), max_model_len=128,
        scheduler_block_size=BLOCK_SIZE, hash_block_size=BLOCK_SIZE,
        enable_caching=enable_caching)


def prefill(manager: KVCacheManager, request: Request) -> int:
    """Allocate (and, with caching, publish) the whole prompt as the scheduler would."""
    computed, num_hit, _ = manager.get_computed_blocks(request)
    assert manager.allocate_slots(request, request.num_tokens - num_hit, num_hit, computed)
    request.num_computed_tokens = request.num_tokens
    return num_hit


def row(manager: KVCacheManager, request: Request, group_id: int) -> list:
    return manager.coordinator.single_type_managers[group_id].req_to_blocks[request.request_id]


def assert_pool_idle(manager: KVCacheManager) -> None:
    pool = manager.block_pool
    assert pool.get_num_free_blocks() == NUM_BLOCKS - 1  # all but null_block
    assert all(b.ref_cnt == 0 for b in pool.blocks if not b.is_null)
    assert not any(b.is_null for b in pool.free_block_queue.get_all_free_blocks())


@pytest.fixture
def manager(vllm_config) -> KVCacheManager:
    return make_manager(vllm_config)


def test_release_frees_exactly_the_gap(manager):
    request = make_request(PROMPT)
    prefill(manager, request)
    pool = manager.block_pool
    free_before = pool.get_num_free_blocks()
    rows_before = [list(row(manager, request, g)) for g in range(NUM_LAYERS)]

    released = release_gap_blocks(manager, request.request_id, 2, GAP)

    assert released == [rows_before[2][i].block_id for i in reversed(GAP)]
    assert pool.get_num_free_blocks() == free_before + len(GAP)
    assert all(pool.blocks[i].ref_cnt == 0 for i in released)
    new_row = row(manager, request, 2)
    assert len(new_row) == BLOCKS_PER_GROUP
    assert [b.is_null for b in new_row] == [i in GAP for i in range(BLOCKS_PER_GROUP)]
    assert new_row[0] is rows_before[2][0] and new_row[5:] == rows_before[2][5:]
    for g in (0, 1, 3):
        assert row(manager, request, g) == rows_before[g]


def test_shared_blocks_lose_one_reference(manager):
    first, second = make_request(PROMPT), make_request(PROMPT)
    prefill(manager, first)
    assert prefill(manager, second) == 28  # every full prompt block is a prefix hit
    pool = manager.block_pool
    shared = [row(manager, second, 1)[i] for i in GAP]
    assert all(b.ref_cnt == 2 for b in shared)
    free_before = pool.get_num_free_blocks()

    release_gap_blocks(manager, second.request_id, 1, GAP)

    assert pool.get_num_free_blocks() == free_before
    assert all(b.ref_cnt == 1 for b in shared)
    assert [row(manager, first, 1)[i] for i in GAP] == shared
    manager.free(first)
    assert all(b.ref_cnt == 0 for b in shared)
    manager.free(second)
    assert_pool_idle(manager)


def test_releasing_twice_is_a_no_op(manager):
    request = make_request(PROMPT)
    prefill(manager, request)
    assert len(release_gap_blocks(manager, request.request_id, 0, GAP)) == len(GAP)
    free_after_first = manager.block_pool.get_num_free_blocks()
    assert release_gap_blocks(manager, request.request_id, 0, GAP) == []
    assert manager.block_pool.get_num_free_blocks() == free_after_first

    # A wider range releases only the entries that are still held.
    expected = [row(manager, request, 0)[i].block_id for i in (5, 0)]
    assert release_gap_blocks(manager, request.request_id, 0, range(0, 6)) == expected
    assert manager.block_pool.get_num_free_blocks() == free_after_first + 2


def test_finishing_a_pruned_request_balances_the_pool(manager):
    request = make_request(PROMPT)
    prefill(manager, request)
    for group_id, gap in enumerate([range(0), range(1, 2), range(1, 5), range(1, 7)]):
        release_gap_blocks(manager, request.request_id, group_id, gap)

    manager.free(request)

    assert_pool_idle(manager)


def test_released_prompt_blocks_stay_prefix_hits(manager):
    request = make_request(PROMPT)
    prefill(manager, request)
    released = [release_gap_blocks(manager, request.request_id, g, GAP) for g in range(4)]
    manager.free(request)

    again = make_request(PROMPT)
    assert prefill(manager, again) == 28
    for group_id in range(NUM_LAYERS):
        ids = [row(manager, again, group_id)[i].block_id for i in reversed(GAP)]
        assert ids == released[group_id]


def test_without_caching_released_blocks_are_reused_first(vllm_config):
    manager = make_manager(vllm_config, enable_caching=False)
    request = make_request(PROMPT)
    prefill(manager, request)
    released = release_gap_blocks(manager, request.request_id, 3, GAP)

    reused = manager.block_pool.get_new_blocks(len(GAP))

    assert [b.block_id for b in reused] == released
    manager.block_pool.free_blocks(reused)
    manager.free(request)
    assert_pool_idle(manager)


def test_range_past_the_row_and_unknown_requests(manager):
    request = make_request(PROMPT)
    prefill(manager, request)
    expected = [row(manager, request, 0)[i].block_id for i in (7, 6)]
    assert release_gap_blocks(manager, request.request_id, 0, range(6, 40)) == expected
    assert release_gap_blocks(manager, "no-such-request", 0, GAP) == []
    with pytest.raises(ValueError, match="contiguous"):
        release_gap_blocks(manager, request.request_id, 0, range(1, 5, 2))


@pytest.mark.parametrize(("duplicate_at", "match"), [
    (2, "released twice in one call"),  # the same block twice inside the range
    (6, "still in the row"),  # the block is also held outside the range
])
def test_debug_accounting_catches_a_block_held_twice(manager, monkeypatch, duplicate_at, match):
    request = make_request(PROMPT)
    prefill(manager, request)
    blocks = row(manager, request, 0)
    blocks[duplicate_at] = blocks[1]  # corrupt the row: one block at two indices
    blocks[1].ref_cnt += 1

    monkeypatch.setenv("REFREEKV_DEBUG_ACCOUNTING", "1")
    with pytest.raises(AssertionError, match=match):
        release_gap_blocks(manager, request.request_id, 0, range(1, 3))
