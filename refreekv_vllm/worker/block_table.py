"""vLLM's block table for one KV cache group, class-swapped so that the per-layer gap rows
(``forward/layer_tables.py``) follow every row edit of vLLM's persistent batch."""

from __future__ import annotations

from vllm.v1.worker.block_table import MultiGroupBlockTable

from refreekv_vllm.forward.layer_tables import LayerTables


class GapMirroringBlockTable(MultiGroupBlockTable):
    """vLLM's block table (one KV cache group) that repeats its row edits on the gap rows."""

    layer_tables: LayerTables

    @classmethod
    def adopt(cls, tables: MultiGroupBlockTable, layer_tables: LayerTables
              ) -> GapMirroringBlockTable:
        if type(tables) is not MultiGroupBlockTable or len(tables.block_tables) != 1:
            raise TypeError("expected vLLM's MultiGroupBlockTable with one KV cache group")
        tables.__class__ = cls
        assert isinstance(tables, GapMirroringBlockTable)
        tables.layer_tables = layer_tables
        return tables

    def add_row(self, block_ids: tuple[list[int], ...], row_idx: int) -> None:
        super().add_row(block_ids, row_idx)
        self.layer_tables.add_row(row_idx)

    def clear_row(self, row_idx: int) -> None:
        super().clear_row(row_idx)
        self.layer_tables.clear_row(row_idx)

    def move_row(self, src: int, tgt: int) -> None:
        super().move_row(src, tgt)
        self.layer_tables.move_row(src, tgt)

    def swap_row(self, src: int, tgt: int) -> None:
        super().swap_row(src, tgt)
        self.layer_tables.swap_row(src, tgt)

    def commit_block_table(self, num_reqs: int) -> None:
        super().commit_block_table(num_reqs)
        self.layer_tables.upload_gaps(num_reqs)
