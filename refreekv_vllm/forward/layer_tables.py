"""Per-layer pages in the forward: what each layer's attention reads and writes.

The scheduler sends the pages of every block it (re)assigns (``page_rows`` on the
``SchedulerOutput``, mirrored into ``page_map``); the worker itself knows each pruned request's
gap per layer, because it computed the cuts. Per step, ``ops.layer_views`` turns vLLM's block
table, sequence lengths and slot mapping into per-layer ones, in persistent buffers that CUDA
graphs capture. The attention backend (``attention/backend.py``) triggers that computation at
the first layer's KV write and hands every layer its own view.

Gap rows follow vLLM's persistent batch: the worker's block table
(``worker/block_table.py``) repeats every row edit vLLM makes (add, clear, move, swap) on them
and uploads them with the block table when they changed. A request's gaps are also kept by
request id for its life: vLLM takes a request that is not scheduled in a step out of the
persistent batch and adds it back, in a fresh row, when it is scheduled again (under pipeline
parallelism every other step), and that row must skip the same gaps.
"""

from __future__ import annotations

import numpy as np
import torch
from vllm.model_executor.models.utils import extract_layer_index
from vllm.v1.kv_cache_interface import KVCacheConfig

from refreekv_vllm.ops.layer_views import compute_layer_views

MAX_CACHED_VIEW_SIZES = 512


class LayerTables:
    """Per-layer block tables, sequence lengths and slot mappings of the current step."""

    def __init__(self, kv_cache_config: KVCacheConfig, *, max_reqs: int, max_blocks: int,
                 max_tokens: int, device: torch.device, pin_memory: bool) -> None:
        (group,) = kv_cache_config.kv_cache_groups
        # Model layer index of each attention layer of this worker (a pipeline stage holds
        # consecutive layers; buffers are indexed from its first).
        self.layer_of = {name: extract_layer_index(name) for name in group.layer_names}
        num_layers = len(self.layer_of)
        first = min(self.layer_of.values())
        self.layers = range(first, first + num_layers)
        if sorted(self.layer_of.values()) != list(self.layers):
            raise ValueError(f"layers {sorted(self.layer_of.values())} are not consecutive")
        # The first layer's KV write of a step computes every layer's view.
        self.first_layer_name = min(self.layer_of, key=self.layer_of.__getitem__)
        self.num_layers = num_layers
        self.block_size = group.kv_cache_spec.block_size
        self.device = device
        self.pin_memory = pin_memory
        self.page_map = torch.zeros((kv_cache_config.num_blocks, num_layers), dtype=torch.int32,
                                    device=device)
        self._gaps_cpu = torch.zeros((max_reqs, num_layers, 2), dtype=torch.int32,
                                     pin_memory=pin_memory)
        self.gaps_np = self._gaps_cpu.numpy()
        self.gaps = (self._gaps_cpu if device.type == "cpu"
                     else torch.zeros_like(self._gaps_cpu, device=device))
        self._gaps_changed = True
        self._request_gaps: dict[str, np.ndarray] = {}
        self._rows_added: set[int] = set()
        self.tables = torch.zeros((num_layers, max_reqs, max_blocks), dtype=torch.int32,
                                  device=device)
        self.seq_lens = torch.zeros((num_layers, max_reqs), dtype=torch.int32, device=device)
        self.slots = torch.full((num_layers, max_tokens), -1, dtype=torch.int64, device=device)
        self._view_cache: dict[tuple[int, int], list[torch.Tensor]] = {}
        self._grow_staging(1)
        # Whether a request of the current batch skips a gap: the CPU backend plans its work
        # from host-side lengths (kept up to date on CPU devices only).
        self.batch_has_gaps = False

    # Pages (scheduler -> worker).

    def apply_page_rows(self, page_rows: tuple[np.ndarray, np.ndarray] | None) -> None:
        """``page_rows``: block ids and their pages in every layer of the model (a pipeline
        stage takes its own layers' columns)."""
        if page_rows is None:
            return
        block_ids, pages = page_rows
        if pages.shape[1] != self.num_layers:
            pages = pages[:, self.layers.start:self.layers.stop]
        n = len(block_ids)
        if self.device.type == "cpu":
            ids = torch.from_numpy(np.ascontiguousarray(block_ids, dtype=np.int64))
            self.page_map.index_copy_(0, ids, torch.from_numpy(
                np.ascontiguousarray(pages, dtype=np.int32)))
            return
        if n > len(self._staged_ids):
            self._grow_staging(n)
        # vLLM waits for the previous step's input copies before it updates the batch, so the
        # pinned staging rows are free again here.
        self._staged_ids_np[:n] = block_ids
        self._staged_pages_np[:n] = pages
        ids = self._device_ids[:n]
        ids.copy_(self._staged_ids[:n], non_blocking=True)
        rows = self._device_pages[:n]
        rows.copy_(self._staged_pages[:n], non_blocking=True)
        self.page_map.index_copy_(0, ids, rows)

    def _grow_staging(self, n: int) -> None:
        size = max(256, 1 << (n - 1).bit_length())
        self._staged_ids = torch.zeros(size, dtype=torch.int64, pin_memory=self.pin_memory)
        self._staged_pages = torch.zeros((size, self.num_layers), dtype=torch.int32,
                                         pin_memory=self.pin_memory)
        self._staged_ids_np = self._staged_ids.numpy()
        self._staged_pages_np = self._staged_pages.numpy()
        self._device_ids = torch.zeros(size, dtype=torch.int64, device=self.device)
        self._device_pages = torch.zeros((size, self.num_layers), dtype=torch.int32,
                                         device=self.device)

    # Gap rows, in step with vLLM's persistent batch.

    def set_gaps(self, req_id: str, row: int | None, gaps: np.ndarray) -> None:
        """From now on request ``req_id`` skips ``gaps`` (``[num_layers, 2]``: first and end
        block of each layer's gap), in batch row ``row`` (None: not in the batch now)."""
        self._request_gaps[req_id] = gaps
        if row is not None:
            self.gaps_np[row] = gaps
            self._gaps_changed = True

    def forget(self, req_id: str) -> None:
        """The request finished or its KV is gone (preempted)."""
        self._request_gaps.pop(req_id, None)

    def restore_gaps(self, req_ids: list[str | None]) -> None:
        """After vLLM updated its persistent batch (``req_ids``: the request of each row):
        requests added back get their gaps again."""
        if not self._rows_added:
            return
        for row in self._rows_added:
            req_id = req_ids[row] if row < len(req_ids) else None
            gaps = None if req_id is None else self._request_gaps.get(req_id)
            if gaps is not None:
                self.gaps_np[row] = gaps
                self._gaps_changed = True
        self._rows_added.clear()

    def add_row(self, row: int) -> None:
        self.clear_row(row)
        self._rows_added.add(row)

    def clear_row(self, row: int) -> None:
        if self.gaps_np[row].any():
            self.gaps_np[row] = 0
            self._gaps_changed = True

    def move_row(self, src: int, tgt: int) -> None:
        self.gaps_np[tgt] = self.gaps_np[src]
        self._gaps_changed = True
        if self._rows_added and src in self._rows_added:
            self._rows_added.discard(src)
            self._rows_added.add(tgt)

    def swap_row(self, a: int, b: int) -> None:
        self.gaps_np[[a, b]] = self.gaps_np[[b, a]]
        self._gaps_changed = True
        if self._rows_added and (a in self._rows_added) != (b in self._rows_added):
            self._rows_added.symmetric_difference_update((a, b))

    def upload_gaps(self, num_reqs: int) -> None:
        if self.gaps is self._gaps_cpu:
            self.batch_has_gaps = bool(self.gaps_np[:num_reqs, :, 1].any())
        elif self._gaps_changed:
            self.gaps.copy_(self._gaps_cpu, non_blocking=True)
        self._gaps_changed = False

    # Per step.

    def compute(self, block_table: torch.Tensor, seq_lens: torch.Tensor,
                slots: torch.Tensor) -> None:
        """Views of this step's ``len(seq_lens)`` requests and ``len(slots)`` tokens."""
        compute_layer_views(block_table, seq_lens, self.gaps, self.page_map, slots,
                            self.block_size, self.tables, self.seq_lens, self.slots)

    def warm_up(self, block_table: torch.Tensor, slots: torch.Tensor) -> None:
        """Compile the CUDA kernel before vLLM captures CUDA graphs (same buffers, so the same
        specialisation as every later step)."""
        if self.device.type == "cuda":
            seq_lens = torch.zeros(1, dtype=torch.int32, device=self.device)
            self.compute(block_table[:1], seq_lens, slots[:1])

    # Every layer's attention asks for its views in every eager or piecewise step: slicing a
    # tensor costs microseconds of host time, so the views of each size are made once.

    def table(self, layer: int, num_reqs: int) -> torch.Tensor:
        return self._views(self.tables, num_reqs)[layer - self.layers.start]

    def layer_seq_lens(self, layer: int, num_reqs: int) -> torch.Tensor:
        return self._views(self.seq_lens, num_reqs)[layer - self.layers.start]

    def layer_slots(self, layer: int, num_tokens: int) -> torch.Tensor:
        return self._views(self.slots, num_tokens)[layer - self.layers.start]

    def layer_rows(self, layers: list[int]) -> list[int]:
        """Rows of ``tables`` (and the other per-layer buffers) of model layers ``layers``."""
        return [layer - self.layers.start for layer in layers]

    def _views(self, buffer: torch.Tensor, n: int) -> list[torch.Tensor]:
        key = (id(buffer), n)
        views = self._view_cache.get(key)
        if views is None:
            if len(self._view_cache) >= MAX_CACHED_VIEW_SIZES:
                self._view_cache.clear()
            views = self._view_cache[key] = list(buffer[:, :n].unbind(0))
        return views
