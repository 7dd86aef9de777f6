"""KV cache bookkeeping for one group per layer without a Python loop over layers when there is
nothing to do.

vLLM's hybrid coordinator asks every group's manager, for every running request and every step,
whether it needs a block, needs caching, or has blocks to skip. With one full-attention group
per layer that is ~100 calls per request per step, mostly answering "nothing": at 64 decoding
requests the scheduler's host time grew from 2.5 to 13.7 ms per step on our 2-core CPU machine.

Once vLLM's own path has allocated for a request, every group holds a block list of the same
length (gap blocks are replaced by the null block in place, ``block_freeing.py``) and the same
number of cached blocks (all groups are cached with the same token count). From then on group 0
answers for all of them: nothing to allocate or cache is decided without a loop, new blocks are
taken from the pool in one call, and the stock per-group path only runs to cache new blocks.
Full attention never skips blocks, so ``remove_skipped_blocks`` has nothing to do.
With ``REFREEKV_DEBUG_ACCOUNTING=1`` every shortcut also runs vLLM's per-group path and asserts
that it agrees (and did nothing).
"""

from __future__ import annotations

from typing import Any

from vllm.utils.math_utils import cdiv
from vllm.v1.core.kv_cache_coordinator import (
    HybridKVCacheCoordinator,
    KVCacheCoordinatorNoPrefixCache,
)
from vllm.v1.core.single_type_kv_cache_manager import FullAttentionManager
from vllm.v1.request import Request

from refreekv_vllm import envs


class PerLayerShortcuts:
    """Per-layer shortcuts in front of one vLLM coordinator's own methods (installed on the
    instance by :func:`adopt`, so vLLM still constructs and owns the coordinator)."""

    def __init__(self, coordinator: Any) -> None:
        self.managers = coordinator.single_type_managers
        self.first = self.managers[0]
        self.block_size = self.first.block_size
        self.stock_num_blocks_to_allocate = coordinator.get_num_blocks_to_allocate
        self.stock_allocate_new_blocks = coordinator.allocate_new_blocks
        self.stock_cache_blocks = coordinator.cache_blocks
        self.stock_free = coordinator.free
        self.stock_pop_blocks_for_free = coordinator.pop_blocks_for_free
        # Requests whose block lists have the same length in every group: true once vLLM's own
        # path allocated for them (prefix hits may differ per group before that, never after:
        # every group is then filled to the same required length) until they are freed.
        self.uniform: set[str] = set()
        self.debug = envs.REFREEKV_DEBUG_ACCOUNTING
        # Read-only, like vLLM's own ``empty_kv_cache_blocks``: the manager only tests it.
        self.no_new_blocks: tuple[list[Any], ...] = tuple([] for _ in self.managers)

    def get_num_blocks_to_allocate(self, request_id: str, num_tokens: int,
                                   new_computed_blocks: Any, *args: Any, **kwargs: Any) -> int:
        if request_id not in self.uniform:
            return self.stock_num_blocks_to_allocate(request_id, num_tokens, new_computed_blocks,
                                                     *args, **kwargs)
        answer = len(self.managers) * max(self._missing_blocks(request_id, num_tokens), 0)
        if self.debug:
            stock = self.stock_num_blocks_to_allocate(request_id, num_tokens,
                                                      new_computed_blocks, *args, **kwargs)
            assert answer == stock, f"{request_id}: {answer} blocks to allocate, vLLM says {stock}"
        return answer

    def allocate_new_blocks(self, request_id: str, num_tokens: int, *args: Any,
                            **kwargs: Any) -> tuple[list[Any], ...]:
        if request_id not in self.uniform or request_id in self.first._partial_hit_reqs:
            new_blocks = self.stock_allocate_new_blocks(request_id, num_tokens, *args, **kwargs)
            self.uniform.add(request_id)
            return new_blocks
        self._check_uniform_lengths(request_id)
        missing = self._missing_blocks(request_id, num_tokens)
        if missing <= 0:
            if self.debug:
                stock = self.stock_allocate_new_blocks(request_id, num_tokens, *args, **kwargs)
                assert not any(stock), f"{request_id}: vLLM allocated {stock}"
            return self.no_new_blocks
        # One pop from the pool for all groups, handed out in group order as vLLM's loop of
        # per-group pops would.
        popped = self.first.block_pool.get_new_blocks(missing * len(self.managers))
        new_blocks = tuple(popped[i * missing:(i + 1) * missing]
                           for i in range(len(self.managers)))
        for manager, group_blocks in zip(self.managers, new_blocks, strict=True):
            manager.req_to_blocks[request_id].extend(group_blocks)
            if manager._record_new_block_ids:
                manager.new_block_ids.extend(b.block_id for b in group_blocks)
        return new_blocks

    def cache_blocks(self, request: Request, num_computed_tokens: int) -> None:
        request_id = request.request_id
        if (request_id not in self.uniform or num_computed_tokens // self.block_size
                > self.first.num_cached_block.get(request_id, 0)):
            self.stock_cache_blocks(request, num_computed_tokens)
            return
        if self.debug:
            before = [m.num_cached_block.get(request_id) for m in self.managers]
            self.stock_cache_blocks(request, num_computed_tokens)
            after = [m.num_cached_block.get(request_id) for m in self.managers]
            assert before == after, f"{request_id}: vLLM cached blocks {before} -> {after}"

    @staticmethod
    def remove_skipped_blocks(*args: Any, **kwargs: Any) -> None:
        return None

    def free(self, request_id: str) -> None:
        self.uniform.discard(request_id)
        self.stock_free(request_id)

    def pop_blocks_for_free(self, request_id: str) -> list[Any]:
        self.uniform.discard(request_id)
        return self.stock_pop_blocks_for_free(request_id)

    def _missing_blocks(self, request_id: str, num_tokens: int) -> int:
        """Blocks each group lacks for ``num_tokens`` (group 0 answers for all: uniform)."""
        return cdiv(num_tokens, self.block_size) - len(self.first.req_to_blocks[request_id])

    def _check_uniform_lengths(self, request_id: str) -> None:
        if self.debug:
            lengths = {len(m.req_to_blocks[request_id]) for m in self.managers}
            assert len(lengths) == 1, f"{request_id}: block lists of lengths {lengths}"


ADOPTABLE = (HybridKVCacheCoordinator, KVCacheCoordinatorNoPrefixCache)


def adopt(coordinator: Any) -> bool:
    """Install the per-layer shortcuts when every group is a plain full-attention group of one
    block size; False (nothing changed) otherwise."""
    managers = getattr(coordinator, "single_type_managers", ())
    if type(coordinator) not in ADOPTABLE or len(managers) < 2:
        return False
    if any(type(m) is not FullAttentionManager or m.block_size != managers[0].block_size
           for m in managers):
        return False
    shortcuts = PerLayerShortcuts(coordinator)
    for name in ("get_num_blocks_to_allocate", "allocate_new_blocks", "cache_blocks",
                 "remove_skipped_blocks", "free", "pop_blocks_for_free"):
        setattr(coordinator, name, getattr(shortcuts, name))
    return True
