"""The worker's per-layer tables on the CPU, with vLLM's own block table: gap rows follow every
row edit of vLLM's persistent batch, and each layer's view skips exactly its gap's blocks."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from vllm.v1.worker.block_table import MultiGroupBlockTable

from refreekv_vllm.forward.layer_tables import LayerTables
from refreekv_vllm.worker.block_table import GapMirroringBlockTable
from tests.core.utils import BLOCK_SIZE, NUM_LAYERS, make_vllm_config, paged_config

MAX_REQS, MAX_BLOCKS, MAX_TOKENS, NUM_BLOCKS = 4, 8, 64, 40


def cpu_tables(model_config_dir) -> tuple[GapMirroringBlockTable, LayerTables]:
    """vLLM's block table for one KV cache group, adopted by ReFreeKV's per-layer tables."""
    kv_cache_config = paged_config(make_vllm_config(model_config_dir), NUM_BLOCKS)
    block_table = MultiGroupBlockTable(
        max_num_reqs=MAX_REQS, max_num_batched_tokens=MAX_TOKENS, pin_memory=False,
        device=torch.device("cpu"), block_sizes=[BLOCK_SIZE], kernel_block_sizes=[BLOCK_SIZE],
        max_num_blocks=[MAX_BLOCKS])
    layer_tables = LayerTables(kv_cache_config, max_reqs=MAX_REQS, max_blocks=MAX_BLOCKS,
                               max_tokens=MAX_TOKENS, device=torch.device("cpu"),
                               pin_memory=False)
    return GapMirroringBlockTable.adopt(block_table, layer_tables), layer_tables


@pytest.fixture
def tables(model_config_dir) -> tuple[GapMirroringBlockTable, LayerTables]:
    return cpu_tables(model_config_dir)


def gaps_of(layer: int, first: int, end: int) -> np.ndarray:
    gaps = np.zeros((NUM_LAYERS, 2), dtype=np.int32)
    gaps[layer] = (first, end)
    return gaps


def test_gap_rows_follow_vllms_row_edits(tables):
    block_table, layer_tables = tables
    for row, first_block in enumerate((1, 11, 21)):
        block_table.add_row((list(range(first_block, first_block + 5)),), row)
    layer_tables.set_gaps("r1", 1, gaps_of(2, 1, 3))
    block_table.swap_row(1, 2)  # vLLM reorders the batch
    assert layer_tables.gaps_np[2, 2].tolist() == [1, 3] and not layer_tables.gaps_np[1].any()
    block_table.move_row(2, 0)  # condensing after request 0 finished
    assert layer_tables.gaps_np[0, 2].tolist() == [1, 3]
    assert block_table.block_tables[0].block_table.np[0, 0] == 11  # the gap moved with its blocks
    block_table.commit_block_table(3)
    assert layer_tables.batch_has_gaps
    block_table.clear_row(0)
    block_table.add_row(([30, 31],), 2)  # a new request in a row that held a gap: none now
    assert not layer_tables.gaps_np[0].any() and not layer_tables.gaps_np[2].any()
    block_table.commit_block_table(3)
    assert not layer_tables.batch_has_gaps
    with pytest.raises(TypeError, match="MultiGroupBlockTable"):
        GapMirroringBlockTable.adopt(block_table, layer_tables)  # adopted once


def test_a_request_added_back_to_the_batch_skips_its_gaps_again(tables):
    """vLLM takes a request that is not scheduled in a step out of its persistent batch and
    adds it back in a fresh row later (under pipeline parallelism every other step): whether
    its gaps were committed before or while it was out, its new row must skip them."""
    block_table, layer_tables = tables
    block_table.add_row(([1, 2, 3, 4],), 0)
    block_table.add_row(([11, 12, 13],), 1)
    layer_tables.restore_gaps(["a", "b"])
    layer_tables.set_gaps("a", 0, gaps_of(2, 1, 3))
    block_table.clear_row(0)  # neither is scheduled in the next step: both leave the batch
    block_table.clear_row(1)
    layer_tables.set_gaps("b", None, gaps_of(3, 1, 2))  # b's cuts commit while it is out
    block_table.add_row(([11, 12, 13],), 0)  # both come back, then vLLM reorders the batch
    block_table.add_row(([1, 2, 3, 4],), 1)
    block_table.swap_row(0, 1)
    layer_tables.restore_gaps(["a", "b"])
    assert layer_tables.gaps_np[0].tolist() == gaps_of(2, 1, 3).tolist()
    assert layer_tables.gaps_np[1].tolist() == gaps_of(3, 1, 2).tolist()
    layer_tables.forget("a")  # finished: a new request in its row starts without gaps
    block_table.clear_row(0)
    block_table.add_row(([5, 6],), 0)
    layer_tables.restore_gaps(["c", "b"])
    assert not layer_tables.gaps_np[0].any()
    assert layer_tables.gaps_np[1].tolist() == gaps_of(3, 1, 2).tolist()


def test_each_layer_skips_its_gap_and_writes_to_its_pages(tables):
    block_table, layer_tables = tables
    rng = np.random.default_rng(0)
    block_ids = [[3, 4, 5, 6, 7], [12, 13]]
    every_block = sorted(b for ids in block_ids for b in ids)
    pages = rng.permutation(np.arange(1, NUM_BLOCKS * NUM_LAYERS))[
        :len(every_block) * NUM_LAYERS].reshape(len(every_block), NUM_LAYERS).astype(np.int32)
    layer_tables.apply_page_rows((np.asarray(every_block), pages))
    page_of = {(b, layer): int(pages[i, layer]) for i, b in enumerate(every_block)
               for layer in range(NUM_LAYERS)}
    for row, ids in enumerate(block_ids):
        block_table.add_row((ids,), row)
    layer_tables.set_gaps("r0", 0, gaps_of(3, 1, 3))  # request 0 pruned blocks 1-2 in layer 3
    block_table.commit_block_table(2)
    # request 0 decodes its 19th token (seq_len 19, 5 blocks); request 1 prefills 6 tokens
    seq_lens = torch.tensor([19, 6], dtype=torch.int32)
    new_positions = [(0, 18)] + [(1, p) for p in range(6)]
    slots = torch.tensor([block_ids[r][p // BLOCK_SIZE] * BLOCK_SIZE + p % BLOCK_SIZE
                          for r, p in new_positions], dtype=torch.int64)
    layer_tables.compute(block_table.block_tables[0].block_table.gpu[:2], seq_lens, slots)
    for layer in range(NUM_LAYERS):
        kept = [b for i, b in enumerate(block_ids[0]) if not (layer == 3 and 1 <= i < 3)]
        table = layer_tables.table(layer, 2)
        assert table[0, :len(kept)].tolist() == [page_of[b, layer] for b in kept]
        assert table[1, :2].tolist() == [page_of[b, layer] for b in block_ids[1]]
        lens = layer_tables.layer_seq_lens(layer, 2).tolist()
        assert lens == [19 - (2 * BLOCK_SIZE if layer == 3 else 0), 6]
        expected = [page_of[block_ids[r][p // BLOCK_SIZE], layer] * BLOCK_SIZE + p % BLOCK_SIZE
                    for r, p in new_positions]
        assert layer_tables.layer_slots(layer, len(slots)).tolist() == expected


def test_views_are_made_once_per_size(tables):
    _, layer_tables = tables
    assert layer_tables.table(2, 3) is layer_tables.table(2, 3)
    assert layer_tables.table(2, 3).data_ptr() == layer_tables.tables[2].data_ptr()
    assert layer_tables.layer_slots(1, 5).shape == (5,)
