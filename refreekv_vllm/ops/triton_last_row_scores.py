"""Triton kernels: ReFreeKV cuts of many requests of one layer, keys read from vLLM's paged cache.

Contract: :func:`refreekv_vllm.policy.reference.layer_cut` applied to every request (see
``refreekv_vllm.ops.compute_cuts``). Pipeline, all on device, no host sync:

1. ``_stats_kernel``, grid ``(R, Hkv, num_chunks)``: one program per key chunk of one KV head
   handles every query head of the GQA group and every window row, so each key is read once per
   pass. It writes the chunk's running max and sum of ``exp2`` per row (log2 domain).
   With a window of one row (the paper's rule) it also stores the row's logits and the chunk's
   sum of squared ``exp2`` over non-sink keys, so no second pass over the keys is needed.
2. Window of w > 1 rows only: ``_combine_kernel`` folds chunk stats into one log-sum-exp per row;
   ``_window_probs_kernel`` re-reads the keys, turns logits into probabilities, aggregates them
   over the rows of each head (max or mean), squares them and stores
   ``r[h, pos]`` plus per-chunk sums. When the caller hands in each row's log-sum-exp (the
   prefill FlashAttention computes it anyway), step 1 and the combine are skipped: the keys
   are read once.
3. ``_cut_kernel``, grid ``(R,)``: head-averaged tail norms at chunk boundaries (backward scan)
   find the crossing chunk, tile sums inside it the crossing tile, then the exact cut inside
   that; optionally the whole ratio curve.

Scratch comes from one flat fp32 ``workspace`` laid out as :mod:`refreekv_vllm.ops.workspace`
says (the CUDA kernel's layout too); pass one in to avoid allocating per call (required under
CUDA graphs).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import NamedTuple

import torch

from refreekv_vllm.ops.launch_utils import check_chunk_size, default_chunk_size
from refreekv_vllm.ops.triton_utils import HAS_TRITON, tl, triton
from refreekv_vllm.ops.workspace import WorkspaceLayout, workspace_layout

if not HAS_TRITON:
    raise ImportError(
        "refreekv_vllm.ops.triton_last_row_scores needs Triton; use backend='torch' (CPU) "
        "or backend='cuda'"
    )

# Kernels below are decorated in interpreter mode iff this holds at import time.
_INTERPRETED = os.environ.get("TRITON_INTERPRET", "0") == "1"
LOG2E = 1.4426950408889634


class PassLaunch(NamedTuple):
    """Launch settings of one pass over the keys."""
    block_n: int
    num_warps: int
    num_stages: int


# Per pass, from benchmarks/kernels/tune_last_row_scores.py on an H200 (Llama-3-8B layer,
# 32 x 8K tokens).
ONE_ROW_PASS = PassLaunch(block_n=128, num_warps=4, num_stages=2)  # w = 1: the only pass
STATS_PASS = PassLaunch(block_n=32, num_warps=8, num_stages=2)  # w > 1, normalisers not given
WINDOW_PASS = PassLaunch(block_n=64, num_warps=4, num_stages=3)  # w > 1: aggregates the window
# Largest chunk (keys per program) of the window pass: its per-program setup (query tile,
# normalisers) is worth spreading over more keys than the one-row pass's.
WINDOW_CHUNK = 2048


class CutSearchLaunch(NamedTuple):
    """Launch settings of the cut search."""
    middle_elements: int
    """Elements of r per middle-level step, over all heads."""
    fine_n: int
    """Keys per fine tile."""
    num_warps: int


CUT_SEARCH = CutSearchLaunch(middle_elements=32768, fine_n=32, num_warps=8)
# Integer arguments that change with the batch (window rows, prompt lengths): Triton would
# compile a variant per value class (1, multiple of 16, other); serving must not stall on that.
# The query and normaliser strides (one tuple each) are read once per program: not specialised.
VARYING = ["w_max", "num_chunks", "n_scratch", "q_strides"]
# Finite stand-in for -inf in running maxima: exp2(NEG_BIG - NEG_BIG) = 1, never NaN.
NEG_BIG = tl.constexpr(-1.0e30)


@triton.jit
def _load_query_tile(
    query_ptr,  # [R, W_MAX, Hq, D]
    req,
    kv_head,
    m_tile,
    w_eff,
    w_max,
    q_strides,  # (request, window row, head, dim)
    offs_d,
    d_mask,
    GROUP: tl.constexpr,
    W_PAD: tl.constexpr,
    BLOCK_M: tl.constexpr,
):
    """Rows ``slot * W_PAD + i``: query head ``kv_head * GROUP + slot``, window row ``i``."""
    rows = m_tile * BLOCK_M + tl.arange(0, BLOCK_M)
    slot = rows // W_PAD
    win = rows % W_PAD
    row_valid = (slot < GROUP) & (win < w_eff)
    head = kv_head * GROUP + slot
    q_row = w_max - w_eff + win  # rows are right-aligned in the query tensor
    ptrs = (
        query_ptr
        + req * q_strides[0]
        + q_row.to(tl.int64)[:, None] * q_strides[1]
        + head.to(tl.int64)[:, None] * q_strides[2]
        + offs_d[None, :] * q_strides[3]
    )
    q = tl.load(ptrs, mask=row_valid[:, None] & d_mask[None, :], other=0.0)
    return q, row_valid, head, win


@triton.jit
def _chunk_block_ids(block_table_row_ptr, chunk_start, chunk_end, BLOCK_SIZE: tl.constexpr,
                     CHUNK_BLOCKS: tl.constexpr):  # fmt: skip
    """Physical ids of the blocks holding ``[chunk_start, chunk_end)``, loaded once per chunk.

    Keys addressed through these registers (see :func:`_gather_key_tile`) depend on no load
    inside the key loop, so the pipeliner can keep several key tiles in flight: addresses from
    a block-table load in the loop make it wait for every outstanding copy at each step.
    """
    first = chunk_start // BLOCK_SIZE
    idx = first + tl.arange(0, CHUNK_BLOCKS)
    return tl.load(block_table_row_ptr + idx, mask=idx <= (chunk_end - 1) // BLOCK_SIZE, other=0)


@triton.jit
def _gather_key_tile(
    key_cache_ptr, chunk_blocks, chunk_start, start, chunk_end, kv_head, offs_d, d_mask,
    k_strides, BLOCK_SIZE: tl.constexpr, BLOCK_N: tl.constexpr, BLOCKS_ALIGNED: tl.constexpr,
    MASKED: tl.constexpr,
):  # fmt: skip
    """``[BLOCK_N, D_PAD]`` keys at positions ``start + [0, BLOCK_N)`` of the chunk
    (``MASKED=False``: all of them lie in the prompt)."""
    offs_n = tl.arange(0, BLOCK_N)
    pos = start + offs_n
    if BLOCKS_ALIGNED:
        # Chunks start on a block boundary and tiles on a multiple of BLOCK_N (both powers of
        # two): the per-key parts below are loop invariants, only a scalar changes per tile.
        rel = start - chunk_start
        local = rel // BLOCK_SIZE + offs_n // BLOCK_SIZE
        if BLOCK_SIZE <= BLOCK_N:  # noqa: SIM108 - constexpr branch, compiled out
            slot = offs_n % BLOCK_SIZE
        else:
            slot = rel % BLOCK_SIZE + offs_n
    else:
        local = pos // BLOCK_SIZE - chunk_start // BLOCK_SIZE
        slot = pos % BLOCK_SIZE
    pos_mask = pos < chunk_end
    if MASKED:
        local = tl.where(pos_mask, local, 0)
    blk = tl.gather(chunk_blocks, local, 0)
    off = blk.to(tl.int64) * k_strides[0] + (slot.to(tl.int64) * k_strides[1]
                                             + kv_head * k_strides[2])
    ptrs = key_cache_ptr + off[:, None] + offs_d[None, :] * k_strides[3]
    if MASKED:
        return tl.load(ptrs, mask=pos_mask[:, None] & d_mask[None, :], other=0.0)
    else:
        return tl.load(ptrs, mask=d_mask[None, :], other=0.0)


@triton.jit
def _dot(q, k, DOT_FP32: tl.constexpr):
    """``q @ k.T`` in fp32 (unscaled)."""
    if DOT_FP32:
        return tl.dot(q.to(tl.float32), tl.trans(k.to(tl.float32)), input_precision="ieee")
    else:
        return tl.dot(q, tl.trans(k))


@triton.jit(do_not_specialize=VARYING)
def _stats_kernel(
    query_ptr,  # [R, W_MAX, Hq, D]
    key_cache_ptr,  # [num_blocks, block_size, Hkv, D]
    block_tables_ptr,  # [R, max_blocks] int32
    prompt_lens_ptr,  # [R] int32
    window_lens_ptr,  # [R] int32
    max_ptr,  # row_max [R, NUM_CHUNKS, ROWS], ROWS = Hq * W_MAX (see ops/workspace.py)
    sum_ptr,  # row_sum [R, NUM_CHUNKS, ROWS]
    sum2_ptr,  # row_sum2 [R, NUM_CHUNKS, Hq] (LAST_ROW only)
    logits_ptr,  # vals [R, Hq, N_SCRATCH] (LAST_ROW only)
    qk_scale,
    num_sink_tokens,
    w_max,
    num_rows,
    num_chunks,
    n_scratch,
    q_strides,  # query (request, window row, head, dim)
    k_strides,  # key_cache (block, slot, head, dim): specialised, the keys' loads need it
    stride_bt,
    BLOCK_SIZE: tl.constexpr,
    HEAD_DIM: tl.constexpr,
    D_PAD: tl.constexpr,
    GROUP: tl.constexpr,
    W_PAD: tl.constexpr,
    BLOCK_M: tl.constexpr,
    NUM_M_TILES: tl.constexpr,
    BLOCK_N: tl.constexpr,
    CHUNK: tl.constexpr,
    CHUNK_BLOCKS: tl.constexpr,
    BLOCKS_ALIGNED: tl.constexpr,
    LAST_ROW: tl.constexpr,
    DOT_FP32: tl.constexpr,
):
    tl.static_assert(CHUNK % BLOCK_N == 0)
    req = tl.program_id(0).to(tl.int64)
    kv_head = tl.program_id(1).to(tl.int64)
    chunk = tl.program_id(2)
    n = tl.load(prompt_lens_ptr + req)
    chunk_start = chunk * CHUNK
    if chunk_start < n:
        w_eff = tl.maximum(tl.minimum(tl.minimum(tl.load(window_lens_ptr + req), w_max), n), 1)
        chunk_end = tl.minimum(chunk_start + CHUNK, n)
        offs_d = tl.arange(0, D_PAD).to(tl.int64)
        d_mask = offs_d < HEAD_DIM
        chunk_blocks = _chunk_block_ids(block_tables_ptr + req * stride_bt, chunk_start,
                                        chunk_end, BLOCK_SIZE, CHUNK_BLOCKS)  # fmt: skip
        for m_tile in tl.static_range(NUM_M_TILES):
            q, row_valid, head, win = _load_query_tile(
                query_ptr, req, kv_head, m_tile, w_eff, w_max, q_strides, offs_d, d_mask,
                GROUP, W_PAD, BLOCK_M,
            )  # fmt: skip
            last_pos = n - w_eff + win  # causal limit of each window row
            m_i = tl.full([BLOCK_M], NEG_BIG, tl.float32)
            l_i = tl.zeros([BLOCK_M], tl.float32)
            l2_i = tl.zeros([BLOCK_M], tl.float32)
            for start in range(chunk_start, chunk_end, BLOCK_N):
                pos = start + tl.arange(0, BLOCK_N)
                pos_mask = pos < chunk_end
                k = _gather_key_tile(
                    key_cache_ptr, chunk_blocks, chunk_start, start, chunk_end, kv_head, offs_d,
                    d_mask, k_strides, BLOCK_SIZE, BLOCK_N, BLOCKS_ALIGNED, True,
                )  # fmt: skip
                s = _dot(q, k, DOT_FP32) * qk_scale  # log2 domain
                valid = row_valid[:, None] & pos_mask[None, :] & (pos[None, :] <= last_pos[:, None])
                s = tl.where(valid, s, float("-inf"))
                m_new = tl.maximum(m_i, tl.max(s, axis=1))
                alpha = tl.exp2(m_i - m_new)
                p = tl.exp2(s - m_new[:, None])
                l_i = l_i * alpha + tl.sum(p, axis=1)
                if LAST_ROW:
                    p2 = tl.where(pos[None, :] >= num_sink_tokens, p * p, 0.0)
                    l2_i = l2_i * (alpha * alpha) + tl.sum(p2, axis=1)
                    lg_row = logits_ptr + (req * num_rows + head)[:, None] * n_scratch
                    tl.store(lg_row + pos[None, :], s, mask=row_valid[:, None] & pos_mask[None, :])
                m_i = m_new
            # LAST_ROW: w_max = 1, so row_sum2's [Hq] columns are the rows too.
            stat_off = (req * num_chunks + chunk) * num_rows + head * w_max + win
            tl.store(max_ptr + stat_off, m_i, mask=row_valid)
            tl.store(sum_ptr + stat_off, l_i, mask=row_valid)
            if LAST_ROW:
                tl.store(sum2_ptr + stat_off, l2_i, mask=row_valid)


@triton.jit(do_not_specialize=["num_rows", "num_chunks"])
def _combine_kernel(
    prompt_lens_ptr,  # [R] int32
    max_ptr,  # row_max [R, NUM_CHUNKS, ROWS]
    sum_ptr,  # row_sum [R, NUM_CHUNKS, ROWS]
    lse_ptr,  # lse [R, ROWS], log2 domain
    num_rows,
    num_chunks,
    CHUNK: tl.constexpr,
    BLOCK_R: tl.constexpr,
    C_TILE: tl.constexpr,
):
    req = tl.program_id(0).to(tl.int64)
    rows = tl.program_id(1) * BLOCK_R + tl.arange(0, BLOCK_R)
    row_mask = rows < num_rows
    n = tl.load(prompt_lens_ptr + req)
    nc = tl.cdiv(n, CHUNK)
    m_run = tl.full([BLOCK_R], NEG_BIG, tl.float32)
    l_run = tl.zeros([BLOCK_R], tl.float32)
    for c0 in range(0, nc, C_TILE):
        cs = c0 + tl.arange(0, C_TILE)
        mask = row_mask[:, None] & (cs < nc)[None, :]
        off = (req * num_chunks + cs[None, :]) * num_rows + rows[:, None]
        m_c = tl.load(max_ptr + off, mask=mask, other=NEG_BIG)
        l_c = tl.load(sum_ptr + off, mask=mask, other=0.0)
        m_new = tl.maximum(m_run, tl.max(m_c, axis=1))
        l_run = l_run * tl.exp2(m_run - m_new) + tl.sum(l_c * tl.exp2(m_c - m_new[:, None]), axis=1)
        m_run = m_new
    # Rows beyond a request's window were never written; their lse is never read.
    lse = m_run + tl.log2(tl.maximum(l_run, 1e-30))
    tl.store(lse_ptr + req * num_rows + rows, lse, mask=row_mask)


@triton.jit
def _window_dots(
    q, start, chunk_start, chunk_end, key_cache_ptr, chunk_blocks, kv_head, offs_d, d_mask,
    k_strides, BLOCK_SIZE: tl.constexpr, BLOCK_N: tl.constexpr, BLOCKS_ALIGNED: tl.constexpr,
    MASKED: tl.constexpr, DOT_FP32: tl.constexpr,
):  # fmt: skip
    """``[BLOCK_N, BLOCK_M]`` dot products of one key tile with the window rows.

    Keys go along the dot's M, so the reduction over a head's window rows stays inside a warp.
    """
    k = _gather_key_tile(
        key_cache_ptr, chunk_blocks, chunk_start, start, chunk_end, kv_head, offs_d, d_mask,
        k_strides, BLOCK_SIZE, BLOCK_N, BLOCKS_ALIGNED, MASKED,
    )  # fmt: skip
    return _dot(k, q, DOT_FP32)


@triton.jit
def _window_tile_r(
    dots, qk_scale, lse, last_pos, start, chunk_end, r_ptrs, slot_valid, inv_w, num_sink_tokens,
    BLOCK_N: tl.constexpr, HEADS_PER_TILE: tl.constexpr, W_PAD: tl.constexpr,
    AGG_MAX: tl.constexpr, MASKED: tl.constexpr,
):  # fmt: skip
    """Stores r of one key tile from its dot products and returns it (``[BLOCK_N, HEADS]``).

    Unmasked tiles hold no sink and only keys that every window row sees; padding rows carry
    ``lse = +inf`` and so get probability 0 without a mask.
    """
    pos = start + tl.arange(0, BLOCK_N)
    pos_mask = pos < chunk_end
    log_p = dots * qk_scale - lse[None, :]
    if MASKED:
        seen = pos_mask[:, None] & (pos[:, None] <= last_pos[None, :])
        log_p = tl.where(seen, log_p, float("-inf"))
    log_p3 = tl.reshape(log_p, (BLOCK_N, HEADS_PER_TILE, W_PAD))
    if AGG_MAX:  # noqa: SIM108 - constexpr branch, compiled out
        # The largest probability is the exp of the largest log-probability: one exp per head.
        agg = tl.exp2(tl.max(log_p3, axis=2))
    else:
        agg = tl.sum(tl.exp2(log_p3), axis=2) * inv_w
    r = agg * agg  # [BLOCK_N, HEADS_PER_TILE]
    if MASKED:
        r = tl.where((pos >= num_sink_tokens)[:, None], r, 0.0)
        tl.store(r_ptrs + pos[:, None], r, mask=slot_valid[None, :] & pos_mask[:, None])
    else:
        tl.store(r_ptrs + pos[:, None], r, mask=slot_valid[None, :])
    return r


@triton.jit(do_not_specialize=[*VARYING, "lse_strides"])
def _window_probs_kernel(
    query_ptr,  # [R, W_MAX, Hq, D]
    key_cache_ptr,  # [num_blocks, block_size, Hkv, D]
    block_tables_ptr,  # [R, max_blocks] int32
    prompt_lens_ptr,  # [R] int32
    window_lens_ptr,  # [R] int32
    lse_ptr,  # lse [R, Hq * W_MAX] log2 (from _combine_kernel) or [R, W_MAX, Hq] natural (given)
    r_ptr,  # vals [R, Hq, N_SCRATCH]: squared aggregated probability, 0 at sinks
    chunk_sum_ptr,  # chunk_sum [R, NUM_CHUNKS, Hq]
    qk_scale,
    lse_scale,
    num_sink_tokens,
    w_max,
    num_q_heads,
    num_chunks,
    n_scratch,
    q_strides,  # query (request, window row, head, dim)
    lse_strides,  # lse (request, window row, head)
    k_strides,  # key_cache (block, slot, head, dim)
    stride_bt,
    BLOCK_SIZE: tl.constexpr,
    HEAD_DIM: tl.constexpr,
    D_PAD: tl.constexpr,
    GROUP: tl.constexpr,
    W_PAD: tl.constexpr,
    BLOCK_M: tl.constexpr,
    NUM_M_TILES: tl.constexpr,
    BLOCK_N: tl.constexpr,
    CHUNK: tl.constexpr,
    CHUNK_BLOCKS: tl.constexpr,
    BLOCKS_ALIGNED: tl.constexpr,
    AGG_MAX: tl.constexpr,
    LSE_GIVEN: tl.constexpr,
    DOT_FP32: tl.constexpr,
):
    tl.static_assert(BLOCK_M % W_PAD == 0)
    HEADS_PER_TILE: tl.constexpr = BLOCK_M // W_PAD
    req = tl.program_id(0).to(tl.int64)
    kv_head = tl.program_id(1).to(tl.int64)
    chunk = tl.program_id(2)
    n = tl.load(prompt_lens_ptr + req)
    chunk_start = chunk * CHUNK
    if chunk_start < n:
        w_eff = tl.maximum(tl.minimum(tl.minimum(tl.load(window_lens_ptr + req), w_max), n), 1)
        inv_w = 1.0 / w_eff.to(tl.float32)
        chunk_end = tl.minimum(chunk_start + CHUNK, n)
        # Tiles [chunk_start, head_end) hold sinks and tiles from main_end on reach keys that
        # some window rows must not see (or past the chunk): those two runs are masked.
        head_end = tl.minimum(
            chunk_start + tl.cdiv(tl.maximum(num_sink_tokens - chunk_start, 0), BLOCK_N) * BLOCK_N,
            chunk_end,
        )
        seen_by_all_end = tl.minimum(chunk_end, n - w_eff + 1)
        main_end = head_end + tl.maximum(seen_by_all_end - head_end, 0) // BLOCK_N * BLOCK_N
        num_head_tiles = tl.cdiv(head_end - chunk_start, BLOCK_N)
        num_masked_tiles = num_head_tiles + tl.cdiv(chunk_end - main_end, BLOCK_N)
        offs_d = tl.arange(0, D_PAD).to(tl.int64)
        d_mask = offs_d < HEAD_DIM
        chunk_blocks = _chunk_block_ids(block_tables_ptr + req * stride_bt, chunk_start,
                                        chunk_end, BLOCK_SIZE, CHUNK_BLOCKS)  # fmt: skip
        for m_tile in tl.static_range(NUM_M_TILES):
            q, row_valid, head, win = _load_query_tile(
                query_ptr, req, kv_head, m_tile, w_eff, w_max, q_strides, offs_d, d_mask,
                GROUP, W_PAD, BLOCK_M,
            )  # fmt: skip
            last_pos = n - w_eff + win
            # A given LSE is indexed like the query (right-aligned rows), ours by window row.
            lse_row = (w_max - w_eff + win) if LSE_GIVEN else win
            lse = lse_scale * tl.load(
                lse_ptr + req * lse_strides[0] + lse_row * lse_strides[1]
                + head * lse_strides[2],
                mask=row_valid, other=0.0)  # fmt: skip
            lse = tl.where(row_valid, lse, float("inf"))
            slot = m_tile * HEADS_PER_TILE + tl.arange(0, HEADS_PER_TILE)
            slot_valid = slot < GROUP
            out_head = kv_head * GROUP + slot
            r_ptrs = r_ptr + (req * num_q_heads + out_head)[None, :] * n_scratch
            key_args = (chunk_start, chunk_end, key_cache_ptr, chunk_blocks, kv_head, offs_d,
                        d_mask, k_strides)
            r_args = (r_ptrs, slot_valid, inv_w, num_sink_tokens)
            # (Constexprs are passed one by one: packed into a tuple they stop being constexpr.)
            # Per-thread partial sums, reduced across the CTA once after the loops.
            r_acc = tl.zeros([BLOCK_N, HEADS_PER_TILE], tl.float32)
            for start in range(head_end, main_end, BLOCK_N):
                dots = _window_dots(q, start, *key_args, BLOCK_SIZE, BLOCK_N, BLOCKS_ALIGNED, False,
                                    DOT_FP32)
                r_acc += _window_tile_r(dots, qk_scale, lse, last_pos, start, chunk_end, *r_args,
                                       BLOCK_N, HEADS_PER_TILE, W_PAD, AGG_MAX, False)  # fmt: skip
            for t in range(0, num_masked_tiles):
                start = tl.where(t < num_head_tiles, chunk_start + t * BLOCK_N,
                                 main_end + (t - num_head_tiles) * BLOCK_N)  # fmt: skip
                dots = _window_dots(q, start, *key_args, BLOCK_SIZE, BLOCK_N, BLOCKS_ALIGNED, True,
                                    DOT_FP32)
                r_acc += _window_tile_r(dots, qk_scale, lse, last_pos, start, chunk_end, *r_args,
                                       BLOCK_N, HEADS_PER_TILE, W_PAD, AGG_MAX, True)  # fmt: skip
            csum = tl.sum(r_acc, axis=0)
            tl.store(chunk_sum_ptr + (req * num_chunks + chunk) * num_q_heads + out_head, csum,
                     mask=slot_valid)  # fmt: skip


@triton.jit
def _chunk_sums(
    req, cs, c_mask, heads, h_mask, lse, max_ptr, sum2_ptr, chunk_sum_ptr,
    num_q_heads, num_chunks, LAST_ROW: tl.constexpr,
):  # fmt: skip
    """``[HQ_PAD, C_TILE]`` sums of r over chunks ``cs`` (0 where masked)."""
    mask = h_mask[:, None] & c_mask[None, :]
    off = (req * num_chunks + cs[None, :]) * num_q_heads + heads[:, None]
    if LAST_ROW:
        m_c = tl.load(max_ptr + off, mask=mask, other=0.0)
        l2_c = tl.load(sum2_ptr + off, mask=mask, other=0.0)
        return tl.where(mask, tl.exp2(2.0 * (m_c - lse[:, None])) * l2_c, 0.0)
    else:
        # max(., 0) is a no-op on these sums, but keeps tl.sum(tl.load(..)) out of the loops:
        # Triton 3.6's thread-locality pass asserts on that pattern in some specialisations.
        return tl.maximum(tl.load(chunk_sum_ptr + off, mask=mask, other=0.0), 0.0)


@triton.jit
def _squared_probs(
    req, pos, p_mask, heads, h_mask, lse, vals_ptr, num_sink_tokens, num_q_heads, n_scratch,
    LAST_ROW: tl.constexpr,
):  # fmt: skip
    """``[HQ_PAD, FINE_N]`` r at positions ``pos`` (0 at sinks and where masked)."""
    mask = h_mask[:, None] & p_mask[None, :]
    v = tl.load(vals_ptr + (req * num_q_heads + heads)[:, None] * n_scratch + pos[None, :],
                mask=mask, other=0.0)  # fmt: skip
    if LAST_ROW:
        keep = mask & (pos[None, :] >= num_sink_tokens)
        return tl.where(keep, tl.exp2(2.0 * (v - lse[:, None])), 0.0)
    else:
        return tl.where(mask, v, 0.0)


@triton.jit
def _starts_within_limit(after, r, base, limit, inv_hq):
    """Per column j of ``r`` (``[HQ_PAD, N]``, the last columns of a range whose later mass
    per head is ``after``): whether cutting at j keeps ``ratio <= T``."""
    tail = after[:, None] + tl.cumsum(r, axis=1, reverse=True)
    kept = tl.sum(tl.sqrt(tail), axis=0) * inv_hq
    return base - kept <= limit


@triton.jit
def _backward_step(sums, units, valid, always_ok, acc, after, found, base, limit, inv_hq):
    """One step of a backward scan over ``units`` (the columns of ``sums``, ``[HQ_PAD, U]``,
    whose later mass per head is ``acc``).

    Returns the last unit whose start keeps ``ratio <= T`` (-1 if none; ``always_ok`` units
    count as keeping it), whether this is the scan's first step to find one, the mass after
    that unit (updated on the first find only), the found flag and the mass after the step.
    """
    ok = _starts_within_limit(acc, sums, base, limit, inv_hq) & valid
    best = tl.max(tl.where(ok | always_ok, units, -1))
    first = (found == 0) & (best >= 0)
    after = tl.where(first, acc + tl.sum(tl.where(units[None, :] > best, sums, 0.0), 1), after)
    found = tl.where(best >= 0, 1, found)
    return best, first, after, found, acc + tl.sum(sums, axis=1)


@triton.jit(do_not_specialize=["num_chunks", "n_scratch", "curve_stride"])
def _cut_kernel(
    prompt_lens_ptr,  # [R] int32
    thresholds_ptr,  # [R] fp32
    max_ptr,  # row_max [R, NUM_CHUNKS, Hq] (LAST_ROW)
    sum_ptr,  # row_sum [R, NUM_CHUNKS, Hq] (LAST_ROW)
    sum2_ptr,  # row_sum2 [R, NUM_CHUNKS, Hq] (LAST_ROW)
    chunk_sum_ptr,  # chunk_sum [R, NUM_CHUNKS, Hq] (window)
    vals_ptr,  # vals [R, Hq, N_SCRATCH]: logits (LAST_ROW) or r (window)
    cut_ptr,  # [R] int32
    curve_ptr,  # [R, curve_stride] fp32 (WRITE_CURVE)
    num_sink_tokens,
    num_q_heads,
    num_chunks,
    n_scratch,
    curve_stride,
    HQ_PAD: tl.constexpr,
    CHUNK: tl.constexpr,
    C_TILE: tl.constexpr,
    SUB_N: tl.constexpr,
    FINE_N: tl.constexpr,
    LAST_ROW: tl.constexpr,
    WRITE_CURVE: tl.constexpr,
):
    req = tl.program_id(0).to(tl.int64)
    n = tl.load(prompt_lens_ptr + req)
    thr = tl.load(thresholds_ptr + req)
    heads = tl.arange(0, HQ_PAD)
    h_mask = heads < num_q_heads
    inv_hq = 1.0 / num_q_heads
    cut = num_sink_tokens + 0 * n
    if n > num_sink_tokens:
        nc = tl.cdiv(n, CHUNK)
        lse = tl.zeros([HQ_PAD], tl.float32)
        if LAST_ROW:
            m_run = tl.full([HQ_PAD], NEG_BIG, tl.float32)
            l_run = tl.zeros([HQ_PAD], tl.float32)
            for c0 in range(0, nc, C_TILE):
                cs = c0 + tl.arange(0, C_TILE)
                mask = h_mask[:, None] & (cs < nc)[None, :]
                off = (req * num_chunks + cs[None, :]) * num_q_heads + heads[:, None]
                m_c = tl.load(max_ptr + off, mask=mask, other=NEG_BIG)
                l_c = tl.load(sum_ptr + off, mask=mask, other=0.0)
                m_new = tl.maximum(m_run, tl.max(m_c, axis=1))
                l_run = l_run * tl.exp2(m_run - m_new) + tl.sum(
                    l_c * tl.exp2(m_c - m_new[:, None]), axis=1
                )
                m_run = m_new
            lse = m_run + tl.log2(tl.maximum(l_run, 1e-30))

        # Baseline B = K(0): sinks hold r = 0, so the tail from position 0 equals the tail from m.
        total = tl.zeros([HQ_PAD], tl.float32)
        for c0 in range(0, nc, C_TILE):
            cs = c0 + tl.arange(0, C_TILE)
            total += tl.sum(
                _chunk_sums(req, cs, cs < nc, heads, h_mask, lse, max_ptr, sum2_ptr,
                            chunk_sum_ptr, num_q_heads, num_chunks, LAST_ROW),
                axis=1,
            )  # fmt: skip
        base = tl.sum(tl.sqrt(total)) * inv_hq
        limit = thr * base

        # The ratio never decreases as the cut moves right, so each level scans backward and
        # stops refining at the first step holding a start that keeps ratio <= T; the start of
        # the range being refined always does (position m keeps everything).
        # Coarse: the crossing chunk, and the mass after it.
        acc = tl.zeros([HQ_PAD], tl.float32)
        after = tl.zeros([HQ_PAD], tl.float32)
        best_chunk = 0 * nc
        found = 0 * nc
        num_tiles = tl.cdiv(nc, C_TILE)
        for it in range(0, num_tiles):
            cs = (num_tiles - 1 - it) * C_TILE + tl.arange(0, C_TILE)
            c_mask = cs < nc
            sums = _chunk_sums(req, cs, c_mask, heads, h_mask, lse, max_ptr, sum2_ptr,
                               chunk_sum_ptr, num_q_heads, num_chunks, LAST_ROW)  # fmt: skip
            c_best, first, after, found, acc = _backward_step(
                sums, cs, c_mask, cs == 0, acc, after, found, base, limit, inv_hq)  # fmt: skip
            best_chunk = tl.where(first, c_best, best_chunk)

        # Middle: the crossing tile of FINE_N keys inside that chunk, from per-tile sums.
        chunk_lo = best_chunk * CHUNK
        lo = tl.maximum(chunk_lo, num_sink_tokens)
        hi = tl.minimum(chunk_lo + CHUNK, n)
        acc = after
        best_tile = chunk_lo
        found = 0 * nc
        tiles = tl.arange(0, SUB_N // FINE_N)
        num_sub = tl.cdiv(hi - chunk_lo, SUB_N)
        for it in range(0, num_sub):
            sub_lo = chunk_lo + (num_sub - 1 - it) * SUB_N
            pos = sub_lo + tl.arange(0, SUB_N)
            r = _squared_probs(req, pos, (pos >= lo) & (pos < hi), heads, h_mask, lse, vals_ptr,
                               num_sink_tokens, num_q_heads, n_scratch, LAST_ROW)  # fmt: skip
            sums = tl.sum(tl.reshape(r, (HQ_PAD, SUB_N // FINE_N, FINE_N)), axis=2)
            # (A tile starting below lo holds only sinks there, whose r is 0.)
            tile_lo = sub_lo + tiles * FINE_N
            t_best, first, after, found, acc = _backward_step(
                sums, tiles, tile_lo < hi, tile_lo == chunk_lo, acc, after, found, base, limit,
                inv_hq)  # fmt: skip
            best_tile = tl.where(first, sub_lo + t_best * FINE_N, best_tile)

        # Fine: the exact position inside the crossing tile.
        # (Names differ from the loops' ones: Triton keeps one type per name across a loop.)
        fine_pos = best_tile + tl.arange(0, FINE_N)
        fine_mask = (fine_pos >= lo) & (fine_pos < hi)
        fine_r = _squared_probs(req, fine_pos, fine_mask, heads, h_mask, lse, vals_ptr,
                                num_sink_tokens, num_q_heads, n_scratch, LAST_ROW)  # fmt: skip
        fine_ok = _starts_within_limit(after, fine_r, base, limit, inv_hq) & fine_mask
        best = tl.maximum(lo, tl.max(tl.where(fine_ok, fine_pos, 0)))
        if (n > num_sink_tokens + 1) & (thr > 0):
            cut = best

        if WRITE_CURVE:
            acc = tl.zeros([HQ_PAD], tl.float32)
            num_sub = tl.cdiv(n - num_sink_tokens, SUB_N)
            for it in range(0, num_sub):
                pos = n - (it + 1) * SUB_N + tl.arange(0, SUB_N)
                p_mask = pos >= num_sink_tokens
                r = _squared_probs(req, pos, p_mask, heads, h_mask, lse, vals_ptr,
                                   num_sink_tokens, num_q_heads, n_scratch, LAST_ROW)  # fmt: skip
                tail = acc[:, None] + tl.cumsum(r, axis=1, reverse=True)
                kept = tl.sum(tl.sqrt(tail), axis=0) * inv_hq
                ratio = tl.where(base > 0, (base - kept) / tl.maximum(base, 1e-30), 0.0)
                tl.store(curve_ptr + req * curve_stride + (pos - num_sink_tokens), ratio,
                         mask=p_mask)  # fmt: skip
                acc += tl.sum(r, axis=1)
    tl.store(cut_ptr + req, cut)


@dataclass(frozen=True)
class PassConfig:
    """Launch knobs of the two key passes and of the cut search; ``None`` fields use the
    heuristic."""

    block_n: int | None = None
    num_warps: int | None = None
    num_stages: int | None = None
    cut_sub_n: int | None = None  # keys per step of the cut search's middle level
    cut_fine_n: int | None = None  # keys of the tile its last step resolves


@dataclass(frozen=True)
class LaunchPlan:
    """Tile sizes and scratch geometry of one launch (pure function of shapes, no data)."""

    num_reqs: int
    num_q_heads: int
    num_kv_heads: int
    head_size: int
    w_max: int
    w_pad: int
    chunk: int
    layout: WorkspaceLayout
    block_n: int
    block_m: int
    num_m_tiles: int

    @property
    def last_row(self) -> bool:
        return self.w_pad == 1

    @property
    def num_rows(self) -> int:
        """Query rows of the scratch's per-row sections (``Hq * W_MAX``)."""
        return self.num_q_heads * self.w_max

    def chunk_blocks(self, block_size: int) -> int:
        """Block-table entries a chunk can span (power of two, for the kernels' id vector)."""
        if block_size & (block_size - 1) == 0:  # chunk starts are block-aligned
            return max(1, self.chunk // block_size)
        return triton.next_power_of_2(triton.cdiv(self.chunk, block_size) + 1)

    def blocks_aligned(self, block_size: int) -> bool:
        """Whether every chunk starts on a block boundary (see ``_gather_key_tile``)."""
        return block_size & (block_size - 1) == 0 and self.chunk % block_size == 0

    @property
    def num_chunks(self) -> int:
        return self.layout.num_chunks

    @property
    def n_scratch(self) -> int:
        return self.layout.n_scratch


def make_plan(
    num_reqs: int,
    w_max: int,
    num_q_heads: int,
    num_kv_heads: int,
    head_size: int,
    max_prompt_len: int,
    device: torch.device,
    chunk_size: int | None = None,
    block_n: int | None = None,
) -> LaunchPlan:
    """Heuristic tile choice (no autotuning): ``(head_size, group, window) -> tiles``."""
    group = num_q_heads // num_kv_heads
    w_pad = triton.next_power_of_2(w_max)
    chunk = chunk_size or default_chunk_size(num_reqs, num_kv_heads, max_prompt_len, device,
                                              largest=WINDOW_CHUNK if w_pad > 1 else 1024)
    check_chunk_size(chunk)
    if w_pad > 128:
        raise ValueError(f"window of {w_max} rows: at most 128 supported")
    block_n = min(chunk, block_n or (ONE_ROW_PASS if w_pad == 1 else STATS_PASS).block_n)
    rows = triton.next_power_of_2(group) * w_pad
    block_m = max(16, min(128, rows))
    return LaunchPlan(
        num_reqs=num_reqs,
        num_q_heads=num_q_heads,
        num_kv_heads=num_kv_heads,
        head_size=head_size,
        w_max=w_max,
        w_pad=w_pad,
        chunk=chunk,
        layout=workspace_layout(num_reqs, w_max, num_q_heads, max_prompt_len, chunk),
        block_n=block_n,
        block_m=block_m,
        num_m_tiles=triton.cdiv(rows, block_m),
    )


def triton_compute_cuts(
    query: torch.Tensor,
    key_cache: torch.Tensor,
    block_tables: torch.Tensor,
    prompt_lens: torch.Tensor,
    window_lens: torch.Tensor,
    thresholds: torch.Tensor,
    *,
    num_sink_tokens: int = 4,
    scale: float | None = None,
    agg: str = "max",
    max_prompt_len: int | None = None,
    curve_out: torch.Tensor | None = None,
    out: torch.Tensor | None = None,
    workspace: torch.Tensor | None = None,
    chunk_size: int | None = None,
    window_lse: torch.Tensor | None = None,
    config: PassConfig | None = None,
) -> torch.Tensor:
    """Cuts of ``R`` requests of one layer in one launch sequence (2 kernels for w = 1, else
    4, or 2 when ``window_lse`` is given).

    Args:
        query: ``[R, W_MAX, num_q_heads, head_size]`` bf16/fp16/fp32 post-RoPE queries of the
            last prompt positions, right-aligned: request r uses its last ``window_lens[r]``
            rows (clamped to ``[1, min(W_MAX, n)]``).
        key_cache: ``[num_blocks, block_size, num_kv_heads, head_size]`` bf16/fp16/fp32 view
            with any strides (see ``key_view_from_flash_kv_cache``).
        block_tables: ``[R, max_blocks]`` int32 physical block ids per request.
        prompt_lens: ``[R]`` int32 prompt lengths n.
        window_lens: ``[R]`` int32 window rows per request.
        thresholds: ``[R]`` fp32 threshold T per request (T <= 0 prunes nothing).
        max_prompt_len: host-side bound on ``prompt_lens`` (sizes the grid and scratch);
            default ``max_blocks * block_size``. Lengths above it are a caller bug.
        curve_out: optional ``[R, L]`` fp32, ``L >= max n - m``; row r gets ``ratio(j)`` for
            ``j < n_r - m``, other entries are left untouched.
        out: optional ``[R]`` int32 output.
        workspace: optional flat fp32 CUDA tensor of at least ``plan.layout.total`` elements
            (:mod:`refreekv_vllm.ops.workspace`); allocated per call when omitted.
        chunk_size: keys per program (power of two); default from :func:`make_plan`.
        window_lse: optional ``[R, W_MAX, num_q_heads]`` fp32 natural-log softmax normaliser
            of each query row over its causal keys (what FlashAttention returns as
            ``softmax_lse``), aligned with ``query``. With a window of w > 1 rows it replaces
            the first pass over the keys; ignored for w = 1 (one pass anyway).
        config: tile/warp/stage overrides for the key passes (tuning scripts only).

    Returns:
        ``[R]`` int32 cuts: keep ``[0, m)`` and ``[cut, n)``.
    """
    r, w_max, hq, d = query.shape
    nb, bs, hkv, dk = key_cache.shape
    assert agg in ("max", "mean"), agg
    assert dk == d and hq % hkv == 0, (query.shape, key_cache.shape)
    assert query.dtype in (torch.bfloat16, torch.float16, torch.float32), query.dtype
    assert key_cache.dtype in (torch.bfloat16, torch.float16, torch.float32), key_cache.dtype
    assert block_tables.dtype == torch.int32 and block_tables.dim() == 2
    assert block_tables.shape[0] == r and block_tables.stride(1) == 1
    for t, dt in ((prompt_lens, torch.int32), (window_lens, torch.int32),
                  (thresholds, torch.float32)):  # fmt: skip
        assert t.shape == (r,) and t.dtype == dt and t.is_contiguous(), (t.shape, t.dtype)
    dev = query.device
    for t in (key_cache, block_tables, prompt_lens, window_lens, thresholds):
        assert t.device == dev, f"all inputs must be on {dev}, got {t.device}"
    assert num_sink_tokens >= 0
    if max_prompt_len is None:
        max_prompt_len = block_tables.shape[1] * bs
    config = config or PassConfig()
    plan = make_plan(r, w_max, hq, hkv, d, max_prompt_len, dev, chunk_size, config.block_n)
    if out is None:
        out = torch.empty(r, dtype=torch.int32, device=dev)
    assert out.shape == (r,) and out.dtype == torch.int32 and out.is_contiguous()
    if curve_out is not None:
        assert curve_out.dim() == 2 and curve_out.shape[0] == r
        assert curve_out.dtype == torch.float32 and curve_out.stride(1) == 1
        assert curve_out.shape[1] >= max_prompt_len - num_sink_tokens
        assert curve_out.device == dev
    layout = plan.layout
    if workspace is None:
        workspace = torch.empty(layout.total, dtype=torch.float32, device=dev)
    ws = layout.views(workspace)
    if r == 0:
        return out
    dummy = ws["row_max"]

    scale = d**-0.5 if scale is None else scale
    qk_scale = scale * LOG2E
    # The interpreter (Triton 3.6) returns garbage for bf16 tl.dot; fp32 "ieee" on the upcast
    # tiles is the same math (bf16/fp16 products are exact in fp32).
    dot_fp32 = query.dtype != key_cache.dtype or query.dtype == torch.float32 or _INTERPRETED
    d_pad = max(16, triton.next_power_of_2(d))
    group = hq // hkv
    common = dict(
        qk_scale=qk_scale,
        num_sink_tokens=num_sink_tokens,
        w_max=w_max,
        num_chunks=plan.num_chunks,
        n_scratch=plan.n_scratch,
        q_strides=query.stride(),
        k_strides=key_cache.stride(),
        stride_bt=block_tables.stride(0),
        BLOCK_SIZE=bs,
        HEAD_DIM=d,
        D_PAD=d_pad,
        GROUP=group,
        W_PAD=plan.w_pad,
        BLOCK_M=plan.block_m,
        NUM_M_TILES=plan.num_m_tiles,
        CHUNK=plan.chunk,
        CHUNK_BLOCKS=plan.chunk_blocks(bs),
        BLOCKS_ALIGNED=plan.blocks_aligned(bs),
        DOT_FP32=dot_fp32,
    )
    first_pass = ONE_ROW_PASS if plan.last_row else STATS_PASS
    stats_knobs = dict(BLOCK_N=plan.block_n, num_warps=config.num_warps or first_pass.num_warps,
                       num_stages=config.num_stages or first_pass.num_stages)  # fmt: skip
    # The window pass holds a [BLOCK_M, D] query tile and num_stages [BLOCK_N, D] key tiles in
    # shared memory (tuned at D = 128): wider heads get shorter key tiles and a shallower ring.
    wide = d_pad > 128
    window_knobs = dict(BLOCK_N=min(plan.chunk, config.block_n
                                    or max(32, WINDOW_PASS.block_n * 128 // max(d_pad, 128))),
                        num_warps=config.num_warps or WINDOW_PASS.num_warps,
                        num_stages=config.num_stages or (2 if wide else WINDOW_PASS.num_stages))
    grid = (r, hkv, plan.num_chunks)
    lse_given = window_lse is not None and not plan.last_row
    if lse_given:
        assert window_lse is not None
        assert window_lse.shape == (r, w_max, hq) and window_lse.dtype == torch.float32
        assert window_lse.device == dev
        lse, lse_scale, lse_strides = window_lse, LOG2E, window_lse.stride()
    else:
        _stats_kernel[grid](
            query, key_cache, block_tables, prompt_lens, window_lens,
            ws["row_max"], ws["row_sum"], ws.get("row_sum2", dummy), ws["vals"],
            num_rows=plan.num_rows, LAST_ROW=plan.last_row, **common, **stats_knobs,
        )  # fmt: skip
        # Ours: the layout's lse [R, Hq * W_MAX] by window row, log2 domain.
        lse, lse_scale = ws.get("lse", dummy), 1.0
        lse_strides = (plan.num_rows, 1, w_max)
    if not plan.last_row:
        if not lse_given:
            block_r = min(128, triton.next_power_of_2(plan.num_rows))
            _combine_kernel[(r, triton.cdiv(plan.num_rows, block_r))](
                prompt_lens, ws["row_max"], ws["row_sum"], ws["lse"], plan.num_rows,
                plan.num_chunks,
                CHUNK=plan.chunk, BLOCK_R=block_r, C_TILE=32, num_warps=4,
            )  # fmt: skip
        _window_probs_kernel[grid](
            query, key_cache, block_tables, prompt_lens, window_lens,
            lse, ws["vals"], ws["chunk_sum"], lse_scale=lse_scale,
            lse_strides=lse_strides,
            num_q_heads=hq, AGG_MAX=agg == "max", LSE_GIVEN=lse_given, **common, **window_knobs,
        )  # fmt: skip
    hq_pad = triton.next_power_of_2(hq)
    sub_n = config.cut_sub_n or max(16, min(plan.chunk, CUT_SEARCH.middle_elements // hq_pad))
    fine_n = min(sub_n, config.cut_fine_n or CUT_SEARCH.fine_n)
    _cut_kernel[(r,)](
        prompt_lens, thresholds, ws["row_max"], ws["row_sum"], ws.get("row_sum2", dummy),
        ws.get("chunk_sum", dummy), ws["vals"], out,
        curve_out if curve_out is not None else dummy,
        num_sink_tokens, hq, plan.num_chunks, plan.n_scratch,
        curve_out.stride(0) if curve_out is not None else 0,
        HQ_PAD=hq_pad, CHUNK=plan.chunk, C_TILE=max(16, min(64, 4096 // hq_pad)),
        SUB_N=sub_n, FINE_N=fine_n, LAST_ROW=plan.last_row,
        WRITE_CURVE=curve_out is not None, num_warps=CUT_SEARCH.num_warps,
    )  # fmt: skip
    return out
