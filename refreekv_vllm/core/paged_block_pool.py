"""vLLM's ``BlockPool`` whose blocks hold one page per layer (docs/design.md §1).

The scheduler keeps vLLM's single KV cache group, so all of vLLM's per-step bookkeeping is that of
plain vLLM. Each block id stands for ``num_layers`` pages of a :class:`PagePool`; this class keeps
the pages in step with the blocks' life cycle:

- a block handed out by ``get_new_blocks`` gets a page in every layer (a cached free block keeps
  the pages it has: its KV is a prefix-cache entry until vLLM evicts it);
- a block whose last reference is dropped keeps its pages only while it is a prefix-cache
  entry, otherwise they go back to the pool at once;
- ``release_layer_page`` gives back one layer's page of a live block once every request holding
  the block has pruned that layer; the block stops being a prefix-cache entry then.

There are more block ids than ``pages / num_layers`` so that the memory pruning frees can hold
more blocks; vLLM is told how many blocks it can allocate from the free pages
(``get_num_free_blocks``) and what share of the pages is in use (``get_usage``).
"""

from __future__ import annotations

import itertools
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import numpy as np
from vllm.v1.core.block_pool import BlockPool
from vllm.v1.core.kv_cache_utils import KVCacheBlock

from refreekv_vllm.core.page_pool import NO_PAGE, PagePool

_ABSENT = object()


@dataclass(frozen=True, slots=True)
class ReleasedPages:
    """What one request's pruning released: in layer ``l``, the page of each block in
    ``block_ids[starts[l]:stops[l]]`` (slices of the request's block list, so that a 6K-token
    prompt's thousands of (block, layer) pairs are three arrays, not a list per layer)."""
    block_ids: np.ndarray
    starts: np.ndarray
    stops: np.ndarray

    def layer(self, layer: int) -> np.ndarray:
        return self.block_ids[self.starts[layer]:self.stops[layer]]

    def counts(self) -> np.ndarray:
        """Released blocks per layer."""
        return self.stops - self.starts


class PagedBlockPool(BlockPool):
    page_pool: PagePool
    # Free blocks (ref_cnt 0) that hold all their pages: prefix-cache entries, in the order
    # they were freed (the oldest is evicted first, as vLLM's free queue would).
    _holding: dict[int, None]
    # Blocks shared by several requests: per layer, how many holders pruned it while its page
    # stays for the others.
    _pruned_by: dict[int, np.ndarray]
    _count_blocks_only: bool
    _num_layers: int

    @classmethod
    def adopt(cls, pool: BlockPool, num_pages: int | Sequence[int],
              num_layers: int | Sequence[int]) -> PagedBlockPool:
        """Turn vLLM's freshly built pool (every block free) into a paged one, in place: the
        KV cache manager, its coordinator and managers keep their references. Sequences give
        the pages and layers of each pipeline stage (:class:`PagePool`)."""
        if type(pool) is not BlockPool:
            raise TypeError(f"expected vLLM's BlockPool, got {type(pool).__name__}")
        if pool.free_block_queue.num_free_blocks != pool.num_gpu_blocks - 1:
            raise ValueError("the block pool must be unused")
        pool.__class__ = cls
        assert isinstance(pool, PagedBlockPool)
        pool.page_pool = PagePool(num_pages, num_layers, pool.num_gpu_blocks)
        pool._holding = {}
        pool._pruned_by = {}
        pool._count_blocks_only = False
        pool._num_layers = pool.page_pool.num_layers
        return pool

    @property
    def num_layers(self) -> int:
        return self._num_layers

    # vLLM's block life cycle.

    def get_new_blocks(self, num_blocks: int) -> list[KVCacheBlock]:
        if num_blocks > self.get_num_free_blocks():
            raise ValueError(f"Cannot get {num_blocks} free blocks from the pool")
        # get_num_free_blocks counted the cached free blocks' pages as free. When the free
        # pages cannot cover every new block, the oldest cached free blocks (the ones vLLM's
        # LRU queue would evict first) are handed out themselves, pages and all: no page
        # changes hands, so the workers' page maps need no row for them.
        shortfall = num_blocks - self.page_pool.num_free_whole_blocks
        cached = self._take_cached(shortfall) if shortfall > 0 else []
        if len(cached) == num_blocks:
            return cached
        blocks = super().get_new_blocks(num_blocks - len(cached))
        holding = self._holding
        # A cached free block that vLLM hands out again reuses the pages it holds.
        need = [block.block_id for block in blocks
                if holding.pop(block.block_id, _ABSENT) is _ABSENT]
        self.page_pool.assign(need)
        return cached + blocks if cached else blocks

    def _take_cached(self, count: int) -> list[KVCacheBlock]:
        """The ``count`` oldest cached free blocks, out of the free queue and the prefix cache,
        allocated as vLLM's ``get_new_blocks`` allocates (the caller checked the count)."""
        taken = [self.blocks[block_id] for block_id in itertools.islice(self._holding, count)]
        for block in taken:
            del self._holding[block.block_id]
            self.free_block_queue.remove(block)
            self._maybe_evict_cached_block(block)
            assert block.ref_cnt == 0
            block.ref_cnt += 1
            if self.metrics_collector:
                self.metrics_collector.on_block_allocated(block)
        return taken

    def touch(self, blocks: Sequence[KVCacheBlock]) -> None:
        for block in blocks:
            if block.ref_cnt == 0 and not block.is_null:
                # A prefix-cache hit on a free block: it holds its pages (see free_blocks).
                self._holding.pop(block.block_id, None)
        super().touch(blocks)

    def free_blocks(self, ordered_blocks: Iterable[KVCacheBlock]) -> None:
        blocks = list(ordered_blocks)
        super().free_blocks(blocks)
        unused = [block for block in blocks if block.ref_cnt == 0 and not block.is_null]
        if self._pruned_by:
            for block in blocks:
                if block.ref_cnt == 0:
                    self._pruned_by.pop(block.block_id, None)
                elif block.block_id in self._pruned_by:
                    # A holder let go: a layer the remaining holders all pruned can go now.
                    self._release_settled_pages(block)
        if not unused:
            return
        # A free block keeps its pages only as a whole prefix-cache entry.
        ids = np.fromiter((block.block_id for block in unused), dtype=np.int64,
                          count=len(unused))
        hashed = np.fromiter((block.block_hash is not None for block in unused), dtype=bool,
                             count=len(unused))
        keeps = hashed & self.page_pool.holds_all_of(ids)
        if keeps.any():
            self._holding.update(dict.fromkeys(ids[keeps].tolist()))
        for index in np.flatnonzero(hashed & ~keeps).tolist():
            self._maybe_evict_cached_block(unused[index])
        self.page_pool.release_blocks(ids[~keeps].tolist())

    def get_num_free_blocks(self) -> int:
        # vLLM asks once per scheduled request and step: attribute reads only.
        num_free = self.free_block_queue.num_free_blocks
        if self._count_blocks_only:
            return num_free
        return min(num_free, self.page_pool.num_free_whole_blocks + len(self._holding))

    def get_usage(self) -> float:
        free = self.page_pool.num_free_pages + self.num_layers * len(self._holding)
        return 1.0 - free / self.page_pool.num_usable_pages

    def reset_prefix_cache(self) -> bool:
        # vLLM's check counts blocks in use from get_num_free_blocks: count block ids there.
        self._count_blocks_only = True
        try:
            reset = super().reset_prefix_cache()
        finally:
            self._count_blocks_only = False
        if reset:
            for block_id in self._holding:
                self.page_pool.release(block_id)
            self._holding.clear()
        return reset

    # Pruning.

    def release_layer_page(self, block: KVCacheBlock, layer: int) -> bool:
        """A request holding ``block`` no longer reads its page in ``layer``. The page goes back
        once no holder reads it; returns whether that happened now."""
        if block.is_null or self.page_pool.pages[block.block_id, layer] == NO_PAGE:
            return False
        if block.ref_cnt > 1:
            counts = self._pruned_by.setdefault(
                block.block_id, np.zeros(self.num_layers, dtype=np.int32))
            counts[layer] += 1
            if counts[layer] < block.ref_cnt:
                return False
            counts[layer] = 0
            if not counts.any():
                del self._pruned_by[block.block_id]
        self._release_page(block, layer)
        return True

    def release_gap_pages(self, blocks: Sequence[KVCacheBlock], gaps: Sequence[range]
                          ) -> tuple[ReleasedPages, int]:
        """One request prunes, in each layer ``l``, its blocks ``blocks[gaps[l]]``: what
        :meth:`release_layer_page` does for each (block, layer), with the blocks only this
        request holds (nearly all) handled a layer at a time. Returns what was released and
        how many pages went back to the pool now."""
        ids = np.fromiter((block.block_id for block in blocks), dtype=np.int64,
                          count=len(blocks))
        pruned_by = self._pruned_by
        exclusive = np.fromiter(
            (block.ref_cnt == 1 and not block.is_null and block.block_id not in pruned_by
             for block in blocks), dtype=bool, count=len(blocks))
        starts = np.fromiter((gap.start for gap in gaps), dtype=np.int64, count=len(gaps))
        stops = np.fromiter((gap.stop for gap in gaps), dtype=np.int64, count=len(gaps))
        stops = np.maximum(np.minimum(stops, len(blocks)), starts)
        released = ReleasedPages(ids, starts, stops)
        alone = np.flatnonzero(exclusive)
        in_gap = (alone[:, None] >= starts) & (alone[:, None] < stops)
        freed = self.page_pool.release_where(ids[alone], in_gap)
        num_freed = int(freed.sum())
        lost_pages = np.zeros(len(blocks), dtype=bool)
        lost_pages[alone] = freed.any(axis=1)
        for index in np.flatnonzero(~exclusive).tolist():
            # Shared (or null) blocks: a layer's page goes once every holder pruned it.
            for layer in np.flatnonzero((starts <= index) & (index < stops)).tolist():
                num_freed += self.release_layer_page(blocks[index], layer)
        for index in np.flatnonzero(lost_pages).tolist():
            # A block missing a layer's KV can no longer serve as a prefix-cache hit.
            block = blocks[index]
            if block.block_hash is not None:
                self._maybe_evict_cached_block(block)
        return released, num_freed

    def unprune_released(self, released: ReleasedPages) -> None:
        """Before a request that pruned ``released`` lets go of its blocks:
        :meth:`unprune_layer_page` for each, visiting only the blocks still shared (a pruned
        6K-token prompt releases thousands of (block, layer) pairs, nearly all unshared)."""
        pruned_by = self._pruned_by
        if not pruned_by:
            return
        for layer in range(len(released.starts)):
            for block_id in pruned_by.keys() & set(released.layer(layer).tolist()):
                self.unprune_layer_page(self.blocks[block_id], layer)

    def unprune_layer_page(self, block: KVCacheBlock, layer: int) -> None:
        """Before a request that pruned ``layer`` of a still-shared ``block`` lets go of it."""
        counts = self._pruned_by.get(block.block_id)
        if counts is None or counts[layer] == 0:
            return
        counts[layer] -= 1
        if not counts.any():
            del self._pruned_by[block.block_id]

    def _release_settled_pages(self, block: KVCacheBlock) -> None:
        counts = self._pruned_by[block.block_id]
        for layer in np.flatnonzero(counts >= block.ref_cnt):
            self._release_page(block, int(layer))
            counts[layer] = 0
        if not counts.any():
            del self._pruned_by[block.block_id]

    def _release_page(self, block: KVCacheBlock, layer: int) -> None:
        # A block missing a layer's KV can no longer serve as a prefix-cache hit.
        self._maybe_evict_cached_block(block)
        self.page_pool.release_page(block.block_id, layer)

    # Accounting checks (tests and REFREEKV_DEBUG_ACCOUNTING).

    def check_accounting(self) -> None:
        """Assert that every usable page is either free or held by exactly one block, that free
        blocks hold pages only as prefix-cache entries, and that live blocks hold all pages
        except pruned ones."""
        pool = self.page_pool
        held = pool.pages[1:][pool.pages[1:] != NO_PAGE]
        free = pool.free_pages()
        everything = np.concatenate([held, free])
        assert len(everything) == pool.num_usable_pages, (
            f"{len(held)} held + {len(free)} free pages != {pool.num_usable_pages} pages")
        assert len(np.unique(everything)) == len(everything), "a page is held or free twice"
        for block_id in self._holding:
            block = self.blocks[block_id]
            assert block.ref_cnt == 0 and pool.holds_all(block_id), (
                f"block {block_id} counted as a cached free block: ref_cnt {block.ref_cnt}")
        for block in self.blocks[1:]:
            if block.ref_cnt == 0 and block.block_id not in self._holding:
                assert not pool.holds_any(block.block_id), (
                    f"free block {block.block_id} holds pages outside the prefix cache")
