"""The attention wrapper's routing, on the CPU with a stand-in for the wrapped impl: the first
layer's KV write computes every layer's views, each layer writes to its own slots and attends
with metadata that shares everything but its block table and lengths (the same code wraps
FlashAttention on GPUs, ``attention/backend.py::_wrap``)."""

from __future__ import annotations

import dataclasses
from types import SimpleNamespace
from typing import Any

import numpy as np
import pytest
import torch

from refreekv_vllm.attention import backend as wrapper
from refreekv_vllm.forward.step_context import set_layer_tables, set_step_context
from tests.core.utils import BLOCK_SIZE, NUM_LAYERS, layer_name
from tests.worker.test_layer_tables import cpu_tables


@dataclasses.dataclass
class Metadata:
    seq_lens: torch.Tensor
    block_table: torch.Tensor
    slot_mapping: torch.Tensor
    query_start_loc: torch.Tensor
    scheduler_metadata: Any = None


class RecordingImpl:
    """What the wrapped backend's impl received."""

    def __init__(self) -> None:
        self.writes: dict[str, torch.Tensor] = {}
        self.attended: dict[str, Metadata] = {}

    def do_kv_cache_update(self, layer: Any, key: Any, value: Any, kv_cache: Any,
                           slot_mapping: torch.Tensor) -> None:
        self.writes[layer.layer_name] = slot_mapping.clone()

    def forward(self, layer: Any, query: Any, key: Any, value: Any, kv_cache: Any,
                attn_metadata: Metadata, output: torch.Tensor, *args: Any, **kwargs: Any
                ) -> torch.Tensor:
        self.attended[layer.layer_name] = attn_metadata
        return output


class RecordingBackend:
    @staticmethod
    def get_impl_cls() -> type:
        return RecordingImpl


Impl = wrapper._wrap(
    RecordingBackend, RecordingImpl, lambda impl, kv_cache: kv_cache, lambda step: "torch",
    lambda impl, tables, layer, metadata, dtype: wrapper._layer_metadata(tables, layer, metadata),
).get_impl_cls()


@pytest.fixture
def step(model_config_dir, monkeypatch):
    """Two requests; request 0 has a gap of blocks 1-2 in layer 3; the forward context holds
    vLLM's logical metadata."""
    block_table, tables = cpu_tables(model_config_dir)
    block_ids = [[3, 4, 5, 6, 7], [12, 13]]
    every_block = sorted(b for ids in block_ids for b in ids)
    pages = (np.arange(len(every_block) * NUM_LAYERS, dtype=np.int32) + 1).reshape(
        len(every_block), NUM_LAYERS)
    tables.apply_page_rows((np.asarray(every_block), pages))
    for row, ids in enumerate(block_ids):
        block_table.add_row((ids,), row)
    gaps = np.zeros((NUM_LAYERS, 2), dtype=np.int32)
    gaps[3] = (1, 3)
    tables.set_gaps("r0", 0, gaps)
    block_table.commit_block_table(2)
    metadata = Metadata(
        seq_lens=torch.tensor([19, 6], dtype=torch.int32),
        block_table=block_table.block_tables[0].block_table.gpu[:2],
        slot_mapping=torch.tensor([7 * BLOCK_SIZE + 2, 12 * BLOCK_SIZE, 12 * BLOCK_SIZE + 1]),
        query_start_loc=torch.tensor([0, 1, 3], dtype=torch.int32), scheduler_metadata=object())
    context = SimpleNamespace(attn_metadata={layer_name(i): metadata for i in range(NUM_LAYERS)})
    monkeypatch.setattr(wrapper, "get_forward_context", lambda: context)
    set_layer_tables(tables)
    set_step_context(None)
    yield tables, metadata, context
    set_layer_tables(None)


def run_layers(impl: RecordingImpl, metadata: Metadata) -> None:
    for layer in range(NUM_LAYERS):
        attention = SimpleNamespace(layer_name=layer_name(layer))
        impl.do_kv_cache_update(attention, None, None, None, metadata.slot_mapping)
        impl.forward(attention, torch.zeros(3, 4, 8), None, None, None, metadata,
                     torch.zeros(3, 32))


def test_each_layer_writes_its_slots_and_attends_over_its_view(step):
    tables, metadata, _ = step
    before = dataclasses.replace(metadata)
    impl = Impl()
    run_layers(impl, metadata)
    for layer in range(NUM_LAYERS):
        name = layer_name(layer)
        assert impl.writes[name].tolist() == tables.layer_slots(layer, 3).tolist()
        seen = impl.attended[name]
        assert seen is not metadata
        assert seen.block_table is tables.table(layer, 2)
        assert seen.seq_lens.tolist() == [19 - (8 if layer == 3 else 0), 6]
        # shared, not rebuilt: the query layout and FlashAttention's scheduler metadata
        assert seen.query_start_loc is metadata.query_start_loc
        assert seen.scheduler_metadata is metadata.scheduler_metadata
    # layers write to different pages, and vLLM's own metadata is left as it was
    assert len({tuple(w.tolist()) for w in impl.writes.values()}) == NUM_LAYERS
    assert all(getattr(metadata, f.name) is getattr(before, f.name)
               for f in dataclasses.fields(Metadata))


def test_without_tables_or_metadata_the_wrapper_passes_through(step):
    _, metadata, context = step
    impl = Impl()
    attention = SimpleNamespace(layer_name=layer_name(2))
    context.attn_metadata = None  # a dummy run: vLLM's slots are block ids, nothing to write
    impl.do_kv_cache_update(attention, None, None, None, metadata.slot_mapping)
    assert not impl.writes
    set_layer_tables(None)  # memory profiling, before the KV cache exists
    run_layers(impl, metadata)
    assert all(seen is metadata for seen in impl.attended.values())
    assert all(w is not None and w.tolist() == metadata.slot_mapping.tolist()
               for w in impl.writes.values())
