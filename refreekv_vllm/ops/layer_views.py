"""Every layer's physical block table, sequence lengths and slot mapping for one step.

vLLM's worker holds one block table of block ids (one KV cache group). Attention in layer ``l``
needs instead, per request, the *pages* of layer ``l`` (``page_map[block, l]``) without the
request's pruned gap in that layer, and a sequence length shortened by the gap; new tokens are
written to ``page_map[block, l] * block_size + offset``. :func:`compute_layer_views` derives all
of it from vLLM's own step inputs in one pass over the blocks the step's requests use.

Inputs and outputs are persistent buffers, so the CUDA launch can be captured in a CUDA graph
and replays correctly for any step padded to the same batch.

Gaps are whole blocks ``[first, end)`` of logical block indices. A gap is applied only while
it lies inside the request's sequence (``end * block_size < seq_len``): rows that hold stale
gaps (CUDA-graph padding, sequence length 0) are left alone.
"""

from __future__ import annotations

import torch

from refreekv_vllm.ops.triton_utils import tl, triton

TILE = 256  # table entries per loop step of a (request, layer) program
TOKEN_TILE = 256  # tokens per slot-mapping program


@triton.jit(do_not_specialize=["num_reqs", "num_tokens"])
def _layer_views_kernel(
    block_table_ptr,  # [>= num_reqs, max_blocks] int32, vLLM's block ids
    block_table_stride,
    seq_lens_ptr,  # [>= num_reqs] int32, logical
    gaps_ptr,  # [>= num_reqs, num_layers, 2] int32, contiguous
    page_map_ptr,  # [num_block_ids, num_layers] int32, contiguous
    tables_ptr,  # [num_layers, max_reqs, max_blocks] int32 out
    tables_layer_stride,
    tables_req_stride,
    layer_seq_lens_ptr,  # [num_layers, max_reqs] int32 out
    layer_seq_lens_stride,
    slots_ptr,  # [>= num_tokens] int64, vLLM's slots (block id * block_size + offset, or < 0)
    layer_slots_ptr,  # [num_layers, max_tokens] int64 out
    layer_slots_stride,
    num_reqs,
    num_tokens,
    num_layers: tl.constexpr,
    block_size: tl.constexpr,
    TILE: tl.constexpr,
    TOKEN_TILE: tl.constexpr,
):
    pid = tl.program_id(0)
    layer = tl.program_id(1).to(tl.int64)
    if pid < num_reqs:
        req = pid.to(tl.int64)
        seq_len = tl.load(seq_lens_ptr + req)
        first = tl.load(gaps_ptr + (req * num_layers + layer) * 2)
        end = tl.load(gaps_ptr + (req * num_layers + layer) * 2 + 1)
        skipped = tl.where(end * block_size < seq_len, end - first, 0)
        tl.store(layer_seq_lens_ptr + layer * layer_seq_lens_stride + req,
                 seq_len - skipped * block_size)
        kept = (seq_len + block_size - 1) // block_size - skipped
        row_in = block_table_ptr + req * block_table_stride
        row_out = tables_ptr + layer * tables_layer_stride + req * tables_req_stride
        for start in range(0, kept, TILE):
            j = start + tl.arange(0, TILE)
            mask = j < kept
            source = j + tl.where(j >= first, skipped, 0)
            block = tl.load(row_in + source, mask=mask, other=0).to(tl.int64)
            page = tl.load(page_map_ptr + block * num_layers + layer, mask=mask, other=0)
            tl.store(row_out + j, page, mask=mask)
    else:
        t = (pid - num_reqs) * TOKEN_TILE + tl.arange(0, TOKEN_TILE)
        mask = t < num_tokens
        slot = tl.load(slots_ptr + t, mask=mask, other=-1)
        live = slot >= 0
        block = tl.where(live, slot // block_size, 0)
        page = tl.load(page_map_ptr + block * num_layers + layer, mask=mask & live, other=0)
        out = tl.where(live, page.to(tl.int64) * block_size + slot % block_size, slot)
        tl.store(layer_slots_ptr + layer * layer_slots_stride + t, out, mask=mask)


def triton_layer_views(block_table: torch.Tensor, seq_lens: torch.Tensor, gaps: torch.Tensor,
                       page_map: torch.Tensor, slots: torch.Tensor, block_size: int,
                       tables: torch.Tensor, layer_seq_lens: torch.Tensor,
                       layer_slots: torch.Tensor) -> None:
    num_reqs, num_tokens = seq_lens.shape[0], slots.shape[0]
    num_layers = page_map.shape[1]
    assert gaps.is_contiguous() and page_map.is_contiguous()
    assert block_table.stride(1) == 1 and tables.stride(2) == 1
    assert layer_seq_lens.stride(1) == 1 and layer_slots.stride(1) == 1
    grid = (num_reqs + triton.cdiv(num_tokens, TOKEN_TILE), num_layers)
    _layer_views_kernel[grid](
        block_table, block_table.stride(0), seq_lens, gaps, page_map,
        tables, tables.stride(0), tables.stride(1), layer_seq_lens, layer_seq_lens.stride(0),
        slots, layer_slots, layer_slots.stride(0), num_reqs, num_tokens,
        num_layers=num_layers, block_size=block_size, TILE=TILE, TOKEN_TILE=TOKEN_TILE)


def torch_layer_views(block_table: torch.Tensor, seq_lens: torch.Tensor, gaps: torch.Tensor,
                      page_map: torch.Tensor, slots: torch.Tensor, block_size: int,
                      tables: torch.Tensor, layer_seq_lens: torch.Tensor,
                      layer_slots: torch.Tensor) -> None:
    """The same in PyTorch (CPU backend, and the reference of the kernel's tests). Table
    entries past each layer's kept blocks are unspecified, as in the kernel."""
    num_reqs, num_tokens = seq_lens.shape[0], slots.shape[0]
    num_layers = page_map.shape[1]
    layers = torch.arange(num_layers, device=page_map.device)
    if num_reqs:
        seq = seq_lens[:num_reqs].long()
        first, end = gaps[:num_reqs, :, 0].long(), gaps[:num_reqs, :, 1].long()
        skipped = torch.where(end * block_size < seq[:, None], end - first, 0)  # [R, L]
        layer_seq_lens[:, :num_reqs] = (seq[:, None] - skipped * block_size).T
        kept = -(-seq // block_size)[:, None] - skipped
        width = max(int(kept.max()), 0)
        j = torch.arange(width, device=seq.device)
        source = j + torch.where(j >= first[..., None], skipped[..., None], 0)  # [R, L, width]
        source = source.clamp(max=block_table.shape[1] - 1)
        blocks = block_table[:num_reqs].long().gather(
            1, source.reshape(num_reqs, -1)).reshape(num_reqs, num_layers, width)
        pages = page_map[blocks, layers[None, :, None]]
        current = tables[:, :num_reqs, :width].permute(1, 0, 2)
        tables[:, :num_reqs, :width] = torch.where(
            j < kept[..., None], pages, current).permute(1, 0, 2)
    if num_tokens:
        slot = slots[:num_tokens].long()
        live = slot >= 0
        pages = page_map[torch.where(live, slot // block_size, 0)].long()  # [T, L]
        layer_slots[:, :num_tokens] = torch.where(
            live[:, None], pages * block_size + (slot % block_size)[:, None], slot[:, None]).T


def compute_layer_views(block_table: torch.Tensor, seq_lens: torch.Tensor, gaps: torch.Tensor,
                        page_map: torch.Tensor, slots: torch.Tensor, block_size: int,
                        tables: torch.Tensor, layer_seq_lens: torch.Tensor,
                        layer_slots: torch.Tensor) -> None:
    """Fill ``tables[l, r]`` (layer ``l``'s pages of request ``r``, gap removed),
    ``layer_seq_lens[l, r]`` and ``layer_slots[l, t]`` for the step's ``len(seq_lens)`` requests
    and ``len(slots)`` tokens. Shapes as in ``_layer_views_kernel``."""
    fn = triton_layer_views if page_map.is_cuda else torch_layer_views
    fn(block_table, seq_lens, gaps, page_map, slots, block_size, tables, layer_seq_lens,
       layer_slots)
