"""Per-layer pages behind vLLM's blocks: the pure pool, and vLLM's real BlockPool turned paged."""

import numpy as np
import pytest
from vllm.utils.hashing import sha256
from vllm.v1.core.block_pool import BlockPool
from vllm.v1.core.kv_cache_utils import make_block_hash_with_group_id

from refreekv_vllm.core.page_pool import NO_PAGE, RESERVED_PAGE, PagePool
from refreekv_vllm.core.paged_block_pool import PagedBlockPool, ReleasedPages

LAYERS = 3


def test_assign_release_and_updates():
    pool = PagePool(num_pages=10, num_layers=LAYERS, num_blocks=8)
    assert pool.num_free_pages == 9 and (pool.pages[0] == RESERVED_PAGE).all()
    pool.assign([3, 5])
    assert pool.num_free_pages == 3
    # Each layer from its own region (pages 1-3, 4-6, 7-9), consecutive blocks side by side.
    assert pool.pages[[3, 5]].T.tolist() == [[1, 2], [4, 5], [7, 8]]
    ids, rows = pool.take_updates()
    assert ids.tolist() == [3, 5] and (rows == pool.pages[[3, 5]]).all()
    assert pool.take_updates() is None

    assert pool.release_page(3, 1) and not pool.release_page(3, 1)
    assert pool.pages[3, 1] == NO_PAGE and pool.num_free_pages == 4
    assert pool.release(3) == LAYERS - 1 and pool.num_free_pages == 6
    assert not pool.holds_any(3) and pool.holds_all(5)


# Newer numpy raises on the deprecated array-to-scalar conversion (it once killed
# the engine core here): fail on the warning with older numpy too.
@pytest.mark.filterwarnings("error::DeprecationWarning")
def test_a_layer_whose_region_is_used_up_takes_pages_from_the_others():
    pool = PagePool(num_pages=13, num_layers=LAYERS, num_blocks=8)  # regions of 4 pages
    pool.assign([1, 2, 3])
    for block in (1, 2, 3):
        pool.release_page(block, 2)  # pruning frees layer 2's pages only
    # Layers 0-1 have one page of their own left: layer 2 takes its two from its own region,
    # then layers 0-1 the rest of it.
    pool.assign([4, 5])
    assert pool.pages[[4, 5]].T.tolist() == [[4, 9], [8, 12], [11, 10]]
    assert pool.num_free_pages == 0
    pool.release(5)
    pool.assign([5])  # one block at a time (vLLM's usual request) takes the same path
    assert sorted(pool.pages[5].tolist()) == [9, 10, 12] and pool.num_free_pages == 0
    pool.release(4)
    pool.release(5)
    pool.assign([6])  # freed pages went back to their home regions
    assert pool.pages[6, :2].tolist() == [4, 8] and 9 <= pool.pages[6, 2] <= 12


def test_exhaustion_and_rows_released_before_the_workers_heard():
    pool = PagePool(num_pages=7, num_layers=LAYERS, num_blocks=8)
    pool.assign([1, 2])
    with pytest.raises(RuntimeError, match="exhausted"):
        pool.assign([4])
    pool.release(2)
    ids, rows = pool.take_updates()
    # A worker must never see NO_PAGE: a released row points at the reserved page.
    assert rows[ids.tolist().index(2)].tolist() == [RESERVED_PAGE] * LAYERS
    with pytest.raises(AssertionError, match="already hold"):
        pool.assign([1])


def test_pipeline_stages_keep_their_own_pages():
    """Stage 0 holds layers 0-1 and pages 0-6 (0 reserved), stage 1 layer 2 and pages 7-11
    (7 reserved): a page only ever serves a layer of its own stage, and the scarcer stage
    decides how many blocks fit."""
    pool = PagePool(num_pages=[7, 5], num_layers=[2, 1], num_blocks=8)
    assert pool.num_layers == LAYERS and pool.num_usable_pages == 10
    assert pool.pages[0].tolist() == [0, 0, 7]  # the null block: each stage's reserved page
    assert pool.num_free_whole_blocks == 3  # stage 0: 6 pages for 2 layers
    pool.assign([1, 2])
    assert pool.pages[[1, 2]].T.tolist() == [[1, 2], [4, 5], [8, 9]]
    assert pool.num_free_whole_blocks == 1  # stage 0: 2 pages left for 2 layers
    pool.release_page(1, 0)
    pool.release_page(2, 0)
    assert pool.num_free_whole_blocks == 2
    # Layer 1 has one page of its own left: it borrows from layer 0's region, never from
    # layer 2's (stage 1), which has two free pages too.
    pool.assign([3, 4])
    assert pool.pages[[3, 4]].T.tolist() == [[2, 1], [6, 3], [10, 11]]
    assert pool.num_free_whole_blocks == 0 and pool.num_free_pages == 0
    ids, rows = pool.take_updates()
    assert ids.tolist() == [1, 2, 3, 4]
    # Each stage's workers count their pages from 0; released pages read as the reserved one.
    assert rows.T.tolist() == [[0, 0, 2, 1], [4, 5, 6, 3], [1, 2, 3, 4]]
    with pytest.raises(RuntimeError, match="exhausted"):
        pool.assign([5])
    for block in (1, 2, 3, 4):
        pool.release(block)
    assert pool.num_free_pages == pool.num_usable_pages == len(pool.free_pages())
    assert sorted(pool.free_pages().tolist()) == [1, 2, 3, 4, 5, 6, 8, 9, 10, 11]


def paged_pool(num_blocks: int = 9, num_pages: int = 3 * LAYERS + 1,
               caching: bool = True) -> PagedBlockPool:
    return PagedBlockPool.adopt(BlockPool(num_blocks, caching, hash_block_size=4),
                                num_pages=num_pages, num_layers=LAYERS)


def cache(pool: PagedBlockPool, block, seed: int) -> None:
    block_hash = make_block_hash_with_group_id(sha256(seed), 0)
    pool._insert_block_hash(block_hash, block, num_tokens=None)


def test_blocks_get_and_return_pages():
    pool = paged_pool()
    assert pool.get_num_free_blocks() == 3  # 9 usable pages / 3 layers, not 8 block ids
    blocks = pool.get_new_blocks(2)
    assert all(pool.page_pool.holds_all(b.block_id) for b in blocks)
    assert pool.get_num_free_blocks() == 1
    assert pool.get_usage() == pytest.approx(6 / 9)
    pool.free_blocks(blocks)  # no hash: the pages go back at once
    assert pool.page_pool.num_free_pages == 9
    assert not any(pool.page_pool.holds_any(b.block_id) for b in blocks)
    pool.check_accounting()
    with pytest.raises(ValueError, match="Cannot get 4 free blocks"):
        pool.get_new_blocks(4)


def test_cached_free_blocks_keep_pages_until_vllm_reuses_them():
    pool = paged_pool()
    blocks = pool.get_new_blocks(3)
    cache(pool, blocks[0], 1)
    pool.free_blocks(blocks)
    assert list(pool._holding) == [blocks[0].block_id]
    assert pool.get_num_free_blocks() == 3  # cached pages count as free, as in vLLM
    pool.check_accounting()

    pool.touch([blocks[0]])  # a prefix hit takes the cached block back with its pages
    assert not pool._holding and blocks[0].ref_cnt == 1
    pool.free_blocks([blocks[0]])

    # Three new blocks need all 9 pages: the cached block's pages are taken and its hash goes.
    new = pool.get_new_blocks(3)
    assert not pool._holding and blocks[0].block_hash is None
    assert all(pool.page_pool.holds_all(b.block_id) for b in new)
    assert pool.page_pool.num_free_pages == 0
    pool.check_accounting()


def test_cached_blocks_short_of_pages_are_evicted_oldest_first():
    pool = paged_pool()
    newer, older = pool.get_new_blocks(2)  # the older entry gets the higher block id
    cache(pool, older, 1)
    cache(pool, newer, 2)
    pool.free_blocks([older])
    pool.free_blocks([newer])
    # Two page-less block ids come first from vLLM's queue; their 6 pages need one cached
    # block's: the least recently freed one goes, as vLLM's LRU order would have it.
    pool.get_new_blocks(2)
    assert older.block_hash is None and newer.block_hash is not None
    assert list(pool._holding) == [newer.block_id]
    pool.check_accounting()


def test_cached_blocks_short_of_pages_are_handed_out_with_their_pages():
    """With no free page, a new block is the oldest cached free block itself: it keeps its
    pages, so the workers get no page row for it, and the page-less block ids stay free."""
    pool = paged_pool()
    older, newer, third = pool.get_new_blocks(3)  # all 9 pages
    cache(pool, older, 1)
    cache(pool, newer, 2)
    pool.free_blocks([older])
    pool.free_blocks([newer])
    pool.page_pool.take_updates()
    pages = pool.page_pool.pages[older.block_id].copy()
    queued = pool.free_block_queue.num_free_blocks

    (block,) = pool.get_new_blocks(1)

    assert block is older and block.ref_cnt == 1 and block.block_hash is None
    assert (pool.page_pool.pages[older.block_id] == pages).all()
    assert pool.page_pool.take_updates() is None
    assert list(pool._holding) == [newer.block_id]
    assert pool.free_block_queue.num_free_blocks == queued - 1
    assert pool.get_num_free_blocks() == 1  # the newer cached block
    pool.check_accounting()
    pool.free_blocks([block, third])
    pool.check_accounting()


def test_releasing_a_layer_page_uncaches_the_block():
    pool = paged_pool()
    (block,) = pool.get_new_blocks(1)
    cache(pool, block, 7)
    assert pool.release_layer_page(block, 2)
    assert block.block_hash is None and pool.page_pool.pages[block.block_id, 2] == NO_PAGE
    assert not pool.release_layer_page(block, 2)  # twice: nothing more to release
    pool.free_blocks([block])
    assert pool.page_pool.num_free_pages == 9
    pool.check_accounting()


def test_a_shared_page_goes_back_once_every_holder_pruned_it():
    pool = paged_pool()
    (block,) = pool.get_new_blocks(1)
    pool.touch([block])  # two holders
    assert not pool.release_layer_page(block, 1)  # the other holder still reads layer 1
    assert pool.page_pool.pages[block.block_id, 1] != NO_PAGE
    assert pool.release_layer_page(block, 1)  # both pruned it
    assert not pool._pruned_by

    assert not pool.release_layer_page(block, 0)  # one holder prunes layer 0
    pool.free_blocks([block])  # the holder that did not prune layer 0 lets go
    assert pool.page_pool.pages[block.block_id, 0] == NO_PAGE and not pool._pruned_by

    pool.touch([block])
    assert not pool.release_layer_page(block, 2)
    other = pool.get_new_blocks(1)[0].block_id  # not shared: nothing to withdraw
    # The pruning holder leaves: it released ``other`` in layer 0, both blocks in layer 2.
    pool.unprune_released(ReleasedPages(np.array([block.block_id, other]), np.array([1, 0, 0]),
                                        np.array([2, 0, 2])))
    pool.free_blocks([pool.blocks[other]])
    pool.free_blocks([block])
    assert pool.page_pool.pages[block.block_id, 2] != NO_PAGE  # the other one still reads it
    pool.free_blocks([block])
    assert pool.page_pool.num_free_pages == 9
    pool.check_accounting()


def test_reset_prefix_cache_frees_cached_pages():
    pool = paged_pool()
    blocks = pool.get_new_blocks(2)
    cache(pool, blocks[0], 3)
    assert not pool.reset_prefix_cache()  # blocks in use
    pool.free_blocks(blocks)
    assert pool.reset_prefix_cache()
    assert not pool._holding and pool.page_pool.num_free_pages == 9
    pool.check_accounting()


def test_accounting_check_catches_a_page_held_twice():
    pool = paged_pool()
    a, b = pool.get_new_blocks(2)
    pool.page_pool.pages[b.block_id, 0] = pool.page_pool.pages[a.block_id, 0]
    with pytest.raises(AssertionError):
        pool.check_accounting()


def test_only_a_fresh_vllm_pool_is_adopted():
    pool = BlockPool(9, True, hash_block_size=4)
    pool.get_new_blocks(1)
    with pytest.raises(ValueError, match="unused"):
        PagedBlockPool.adopt(pool, num_pages=10, num_layers=LAYERS)
    with pytest.raises(TypeError):
        PagedBlockPool.adopt(paged_pool(), num_pages=10, num_layers=LAYERS)


def test_updates_cover_blocks_reassigned_after_reuse():
    pool = paged_pool()
    blocks = pool.get_new_blocks(2)
    pool.page_pool.take_updates()
    pool.free_blocks(blocks)
    again = pool.get_new_blocks(2)
    ids, rows = pool.page_pool.take_updates()
    assert sorted(ids.tolist()) == sorted(b.block_id for b in again)
    assert np.array_equal(rows, pool.page_pool.pages[ids])


def test_releasing_a_requests_gaps_in_every_layer():
    pool = paged_pool(num_blocks=12, num_pages=4 * LAYERS + 1)
    blocks = pool.get_new_blocks(4)
    cache(pool, blocks[1], 5)
    pool.touch([blocks[2]])  # another request holds block 2 too
    released, freed = pool.release_gap_pages(blocks, [range(0), range(1, 3), range(1, 4)])
    assert [released.layer(layer).tolist() for layer in range(LAYERS)] == [
        [], [b.block_id for b in blocks[1:3]], [b.block_id for b in blocks[1:]]]
    assert released.counts().tolist() == [0, 2, 3]
    assert freed == 3  # blocks 1 (layers 1, 2) and 3 (layer 2): block 2 is still read elsewhere
    pages = pool.page_pool.pages
    assert pages[blocks[1].block_id, 1] == NO_PAGE and pages[blocks[3].block_id, 2] == NO_PAGE
    assert (pages[blocks[2].block_id] != NO_PAGE).all()
    assert (pages[blocks[0].block_id] != NO_PAGE).all()
    assert blocks[1].block_hash is None  # lost a page: no longer a prefix-cache entry
    pool.free_blocks([blocks[2]])  # the other holder lets go: both pruned layers go back
    assert pages[blocks[2].block_id, 1] == NO_PAGE and pages[blocks[2].block_id, 2] == NO_PAGE
    pool.check_accounting()


def test_release_where_keeps_the_accounting():
    pool = PagePool(num_pages=13, num_layers=LAYERS, num_blocks=8)  # regions of 4 pages
    pool.assign([1, 2, 3])
    held = pool.release_where(np.array([1, 3]), np.array([[True, True, False],
                                                           [False, False, True]]))
    assert held.tolist() == [[True, True, False], [False, False, True]]
    assert (pool.pages[1] == [NO_PAGE, NO_PAGE, 9]).all() and pool.pages[3, 2] == NO_PAGE
    assert pool.num_free_pages == 12 - 9 + 3
    # Marking a page that is already gone frees nothing.
    assert not pool.release_where(np.array([1]), np.array([[False, True, False]])).any()
    free = pool.free_pages()
    held_pages = pool.pages[1:][pool.pages[1:] != NO_PAGE]
    assert len(np.unique(np.concatenate([free, held_pages]))) == 12


@pytest.mark.filterwarnings("error::DeprecationWarning")
@pytest.mark.parametrize("stages", [(4,), (2, 3)])
def test_random_assign_and_release_keep_every_page_once(stages):
    """Random single- and multi-block assignments (the one-block fast path included),
    releases of one or several whole blocks and of single layers: every usable page stays held by
    one block or free, the free counts agree with the free lists, and a layer takes its own
    region's pages while it has some."""
    rng = np.random.default_rng(sum(stages))
    layers = sum(stages)
    pool = PagePool([6 * n + 1 for n in stages], list(stages), num_blocks=40)
    regions = [(int(start), int(end)) for start, end in
               zip(pool._region_start, pool._region_end, strict=True)]
    holding: set[int] = set()
    for _ in range(1000):
        empty = [b for b in range(1, 40) if b not in holding]
        op = rng.choice(3, p=[0.55, 0.1, 0.35])
        if op == 0 and empty and pool.num_free_whole_blocks:
            blocks = rng.choice(empty, size=min(len(empty), pool.num_free_whole_blocks,
                                                1 + int(rng.random() < 0.2)), replace=False)
            had_own = [pool._top[layer] >= len(blocks) for layer in range(layers)]
            pool.assign(blocks.tolist())
            holding.update(blocks.tolist())
            for layer, own in enumerate(had_own):
                start, end = regions[layer]
                if own:
                    assert ((start <= pool.pages[blocks, layer])
                            & (pool.pages[blocks, layer] < end)).all()
        elif op == 1 and holding:
            # One block, or several at once (whole home rows go back in one push per layer,
            # rows with a borrowed or released page through the general path).
            released = rng.choice(sorted(holding), size=min(len(holding), int(rng.integers(1, 4))),
                                  replace=False).tolist()
            pool.release_blocks(released)
            holding.difference_update(released)
        elif op == 2 and holding:
            pool.release_page(int(rng.choice(sorted(holding))), int(rng.integers(layers)))
        held = pool.pages[1:][pool.pages[1:] != NO_PAGE]
        free = pool.free_pages()
        everything = np.concatenate([held, free])
        assert len(everything) == pool.num_usable_pages == len(np.unique(everything))
        assert pool.num_free_pages == len(free)
        per_stage = [len(free[(free >= lo) & (free < lo + 6 * n + 1)]) // n for lo, n in
                     zip(np.cumsum([0, *[6 * n + 1 for n in stages]])[:-1], stages,
                         strict=False)]
        assert pool.num_free_whole_blocks == min(per_stage)
        assert not any(pool.holds_any(b) for b in range(1, 40) if b not in holding)
