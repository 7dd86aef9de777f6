"""All KV cache groups' block tables in one tensor, uploaded in one copy per step.

With one KV cache group per layer, vLLM's ``MultiGroupBlockTable`` issues, every step, one
host-to-device copy and one slot-mapping kernel per layer (and the runner one padding fill per
layer). On an H200 decoding 64 requests of 8K tokens that was 0.4 ms of a 21 ms step
(``benchmarks/integration/profile_decode.py``). Here the groups' tables are views of one
``[max_reqs, groups, max_blocks]`` tensor and their slot mappings rows of one
``[groups, max_num_tokens]`` tensor, so each of those is one operation per step. vLLM's
``BlockTable`` objects stay in place (everything that edits rows keeps working): only their
buffers are rebound to the views.
"""

from __future__ import annotations

import torch
from vllm.v1.attention.backends.utils import PAD_SLOT_ID
from vllm.v1.utils import CpuGpuBuffer
from vllm.v1.worker.block_table import BlockTable, MultiGroupBlockTable, SlotMappingMode

from refreekv_vllm.ops.triton_slot_mapping import map_slots_all_groups


def _view_buffer(cpu: torch.Tensor, gpu: torch.Tensor) -> CpuGpuBuffer:
    """A ``CpuGpuBuffer`` over existing tensors (its constructor always allocates)."""
    buffer = object.__new__(CpuGpuBuffer)
    buffer.cpu, buffer.gpu = cpu, gpu
    if cpu.dtype != torch.bfloat16:
        buffer.np = cpu.numpy()
    return buffer


def stackable(tables: MultiGroupBlockTable) -> str | None:
    """Why these tables cannot be stacked, or None when they can."""
    groups = tables.block_tables
    if len(groups) < 2:
        return "a single KV cache group"
    first = groups[0]
    for table in groups:
        if table.slot_mapping_mode != SlotMappingMode.TOKEN_TO_KV_SLOT:
            return "a group without token slot mapping"
        if table.use_hybrid_blocks or table.dcp_world_size != 1:
            return "kernel blocks that differ from allocation blocks, or context parallelism"
        if (table.block_table.cpu.shape != first.block_table.cpu.shape
                or table.block_size != first.block_size
                or table.slot_mapping.gpu.shape != first.slot_mapping.gpu.shape):
            return "groups of different shapes"
    return None


class StackedBlockTables(MultiGroupBlockTable):
    """vLLM's per-group ``BlockTable`` objects over shared storage (see module docstring)."""

    def __init__(self, tables: MultiGroupBlockTable) -> None:  # noqa: D107 - adopts tables
        reason = stackable(tables)
        if reason is not None:
            raise ValueError(f"cannot stack these block tables: {reason}")
        self.block_tables: list[BlockTable] = tables.block_tables
        first = self.block_tables[0]
        num_groups = len(self.block_tables)
        max_reqs, max_blocks = first.block_table.cpu.shape
        max_tokens = first.slot_mapping.gpu.shape[0]
        device = first.block_table.gpu.device
        self.block_size = first.block_size
        pin = first.pin_memory
        self.tables = CpuGpuBuffer(max_reqs, num_groups, max_blocks, dtype=torch.int32,
                                   device=device, pin_memory=pin)
        self.slot_mappings = CpuGpuBuffer(num_groups, max_tokens, dtype=torch.int64,
                                          device=device, pin_memory=pin)
        for group, table in enumerate(self.block_tables):
            self.tables.cpu[:, group].copy_(table.block_table.cpu)
            self.tables.gpu[:, group].copy_(table.block_table.gpu)
            self.slot_mappings.gpu[group].copy_(table.slot_mapping.gpu)
            self.slot_mappings.cpu[group].copy_(table.slot_mapping.cpu)
            table.block_table = _view_buffer(self.tables.cpu[:, group],
                                             self.tables.gpu[:, group])
            table.slot_mapping = _view_buffer(self.slot_mappings.cpu[group],
                                              self.slot_mappings.gpu[group])

    def commit_block_table(self, num_reqs: int) -> None:
        self.tables.copy_to_gpu(num_reqs)

    def compute_slot_mapping(self, num_reqs: int, query_start_loc: torch.Tensor,
                             positions: torch.Tensor) -> None:
        map_slots_all_groups(self.tables.gpu, self.slot_mappings.gpu, query_start_loc,
                             positions, num_reqs, self.block_size, PAD_SLOT_ID)

    def pad_slot_mappings(self, start: int, end: int) -> None:
        """``PAD_SLOT_ID`` in ``[start, end)`` of every group's slot mapping (one fill)."""
        self.slot_mappings.gpu[:, start:end].fill_(PAD_SLOT_ID)

