"""Slot mapping of every KV cache group in one launch.

vLLM maps each scheduled token to its cache slot with one kernel per KV cache group; with one
group per layer that is one launch per layer per step. Here program ``(r, g)`` maps request
``r``'s tokens through group ``g``'s block-table row, and the extra program ``(num_reqs, g)``
writes ``PAD_SLOT`` from ``num_tokens`` to the end of the group's buffer (CUDA graphs replay on
the padded length, and a padded slot must never write into a live block).
"""

from __future__ import annotations

import torch

from refreekv_vllm.ops.triton_utils import tl, triton

PAD_BLOCK = 1024


@triton.jit(do_not_specialize=["num_tokens", "max_num_tokens"])
def _slot_mapping_kernel(
    query_start_loc_ptr,  # [num_reqs + 1] int32
    positions_ptr,  # [num_tokens] int64
    block_tables_ptr,  # [max_reqs, groups, max_blocks] int32 (last dim contiguous)
    req_stride,
    group_stride,
    slot_mappings_ptr,  # [groups, max_num_tokens] int64 (last dim contiguous)
    slot_group_stride,
    num_tokens,
    max_num_tokens,
    block_size,
    PAD_SLOT: tl.constexpr,
    BLOCK: tl.constexpr,
):
    req = tl.program_id(0)
    group = tl.program_id(1).to(tl.int64)
    slots_ptr = slot_mappings_ptr + group * slot_group_stride
    if req == tl.num_programs(0) - 1:
        for start in range(num_tokens, max_num_tokens, BLOCK):
            offsets = start + tl.arange(0, BLOCK)
            tl.store(slots_ptr + offsets, tl.full([BLOCK], PAD_SLOT, tl.int64),
                     mask=offsets < max_num_tokens)
        return
    first = tl.load(query_start_loc_ptr + req)
    end = tl.load(query_start_loc_ptr + req + 1)
    row_ptr = block_tables_ptr + req.to(tl.int64) * req_stride + group * group_stride
    for start in range(first, end, BLOCK):
        offsets = start + tl.arange(0, BLOCK)
        mask = offsets < end
        positions = tl.load(positions_ptr + offsets, mask=mask, other=0)
        blocks = tl.load(row_ptr + positions // block_size, mask=mask, other=0).to(tl.int64)
        tl.store(slots_ptr + offsets, blocks * block_size + positions % block_size, mask=mask)


def map_slots_all_groups(block_tables: torch.Tensor, slot_mappings: torch.Tensor,
                         query_start_loc: torch.Tensor, positions: torch.Tensor,
                         num_reqs: int, block_size: int, pad_slot: int) -> None:
    """``slot_mappings[g, t]`` = slot of token ``t`` in group ``g``; ``pad_slot`` after the last
    token. ``block_tables`` is ``[max_reqs, groups, max_blocks]``, ``slot_mappings``
    ``[groups, max_num_tokens]``, ``query_start_loc`` ``[num_reqs + 1]``."""
    num_groups = block_tables.shape[1]
    assert block_tables.stride(2) == 1 and slot_mappings.stride(1) == 1
    assert slot_mappings.shape[0] == num_groups
    _slot_mapping_kernel[(num_reqs + 1, num_groups)](
        query_start_loc, positions, block_tables, block_tables.stride(0),
        block_tables.stride(1), slot_mappings, slot_mappings.stride(0), positions.shape[0],
        slot_mappings.shape[1], block_size, PAD_SLOT=pad_slot, BLOCK=PAD_BLOCK)
