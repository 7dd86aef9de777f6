"""Stacked block tables: vLLM's per-group tables over one tensor, one upload and one slot-mapping
launch for all groups (Triton's interpreter on CPU, the real kernel on a GPU)."""

import numpy as np
import pytest
import torch
from vllm.v1.worker.block_table import MultiGroupBlockTable

from refreekv_vllm.worker.block_tables import PAD_SLOT_ID, StackedBlockTables, stackable

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")


def make_tables(num_groups: int, block_size: int = 16, max_reqs: int = 8,
                max_tokens: int = 64, max_blocks: int = 24) -> MultiGroupBlockTable:
    return MultiGroupBlockTable(
        max_num_reqs=max_reqs, max_num_batched_tokens=max_tokens, pin_memory=False,
        device=DEVICE, block_sizes=[block_size] * num_groups,
        kernel_block_sizes=[block_size] * num_groups, max_num_blocks=[max_blocks] * num_groups)


def expected_slots(block_rows: np.ndarray, query_start_loc: np.ndarray, positions: np.ndarray,
                   block_size: int, max_tokens: int) -> np.ndarray:
    """float64-free reference: slot of every token per group, PAD_SLOT_ID after the last."""
    num_groups = block_rows.shape[1]
    slots = np.full((num_groups, max_tokens), PAD_SLOT_ID, dtype=np.int64)
    for req in range(len(query_start_loc) - 1):
        for t in range(query_start_loc[req], query_start_loc[req + 1]):
            pos = positions[t]
            slots[:, t] = block_rows[req, :, pos // block_size] * block_size + pos % block_size
    return slots


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_stacked_tables_map_slots_like_the_reference(seed: int) -> None:
    rng = np.random.default_rng(seed)
    num_groups, block_size, max_tokens = 5, 16, 64
    stacked = StackedBlockTables(make_tables(num_groups, block_size, max_tokens=max_tokens))
    num_reqs = int(rng.integers(1, 6))
    for req in range(num_reqs):
        ids = [list(rng.choice(10_000, size=int(rng.integers(1, 20)), replace=False))
               for _ in range(num_groups)]
        stacked.add_row(tuple(ids), req)
        extra = [list(rng.choice(10_000, size=2, replace=False)) for _ in range(num_groups)]
        stacked.append_row(tuple(extra), req)
    # Rows edited through vLLM's per-group objects land in the stacked tensor.
    for group, table in enumerate(stacked.block_tables):
        assert np.array_equal(table.block_table.np, stacked.tables.np[:, group])
    stacked.commit_block_table(num_reqs)
    rows = stacked.tables.cpu.numpy()[:num_reqs]
    assert torch.equal(stacked.tables.gpu[:num_reqs].cpu(), stacked.tables.cpu[:num_reqs])

    counts = [int(rng.integers(1, 9)) for _ in range(num_reqs)]
    query_start_loc = np.concatenate([[0], np.cumsum(counts)]).astype(np.int32)
    positions = np.concatenate([
        rng.integers(0, block_size * int(stacked.block_tables[0].num_blocks_per_row[r]),
                     size=c) for r, c in enumerate(counts)]).astype(np.int64)
    stacked.slot_mappings.gpu.fill_(12345)  # stale values must be overwritten or padded
    stacked.compute_slot_mapping(num_reqs, torch.from_numpy(query_start_loc).to(DEVICE),
                                 torch.from_numpy(positions).to(DEVICE))
    want = expected_slots(rows, query_start_loc, positions, block_size, max_tokens)
    assert np.array_equal(stacked.slot_mappings.gpu.cpu().numpy(), want)
    for group, table in enumerate(stacked.block_tables):
        assert table.slot_mapping.gpu.data_ptr() == stacked.slot_mappings.gpu[group].data_ptr()


def test_clear_and_move_rows_act_on_every_group() -> None:
    stacked = StackedBlockTables(make_tables(3))
    stacked.add_row(([1, 2], [3, 4], [5, 6]), 0)
    stacked.add_row(([7], [8], [9]), 1)
    stacked.move_row(1, 0)
    assert stacked.tables.np[0, :, 0].tolist() == [7, 8, 9]
    stacked.clear_row(0)  # vLLM clears the row's used entries, per group
    assert not stacked.tables.np[0, :, 0].any()


def test_pad_fills_every_group_in_the_range() -> None:
    stacked = StackedBlockTables(make_tables(4))
    stacked.slot_mappings.gpu.zero_()
    stacked.pad_slot_mappings(10, 20)
    slots = stacked.slot_mappings.gpu.cpu()
    assert (slots[:, 10:20] == PAD_SLOT_ID).all() and (slots[:, :10] == 0).all()
    assert (slots[:, 20:] == 0).all()


def test_a_single_group_is_left_to_vllm() -> None:
    assert stackable(make_tables(1)) == "a single KV cache group"
    with pytest.raises(ValueError, match="single KV cache group"):
        StackedBlockTables(make_tables(1))
