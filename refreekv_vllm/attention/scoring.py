"""Scoring inside a layer's attention call: after the last prompt chunk's keys are in the paged
cache, compute this layer's cut for every request whose prefill ends in this step."""

import time
from collections import Counter

import torch

from refreekv_vllm.ops import compute_cuts
from refreekv_vllm.worker.step_context import ScoringRow, StepContext, window_store

# Layer scorings of windows (w > 1) by where their softmax normalisers came from: "attention"
# (the prefill's, one pass over the keys) or "own" (the kernel's first pass). Per process.
window_normalisers: Counter[str] = Counter()


def wants_prefill_lse(step: StepContext, layer: int) -> bool:
    """Whether this layer's forward should keep the attention's softmax normaliser: only the
    Triton kernel uses it, and only for windows of more than one row."""
    return (step.kernel == "triton" and layer not in step.config.frozen_layers
            and any(capture.window > 1 for capture in step.captures))


def capture_and_score(step: StepContext, layer: int, query: torch.Tensor,
                      key_cache: torch.Tensor, block_table: torch.Tensor, scale: float,
                      backend: str, prefill_lse: torch.Tensor | None = None) -> None:
    """``query``: ``[num_tokens, num_heads, head_size]`` of this step; ``key_cache``: the layer's
    ``[num_blocks, block_size, num_kv_heads, head_size]`` key view; ``block_table``: this
    layer's ``[num_reqs, max_blocks]`` rows (logical: a request being scored has no gap yet);
    ``prefill_lse``: the attention's ``[num_heads, >= num_tokens]`` softmax normaliser of this
    step's rows, if it gave one."""
    config = step.config
    if layer in config.frozen_layers:
        return
    for capture in step.captures:
        tokens = slice(capture.token_indices.start, capture.token_indices.stop)
        lse_rows = None if prefill_lse is None else prefill_lse[:, tokens].T
        window_store.put(capture, layer, query[tokens], lse_rows)
    windows = {row.req_id: window_store.get(row.req_id, layer)
               for row in step.scoring if row.fixed_cut is None}
    rows = [row for row in step.scoring if windows.get(row.req_id) is not None]
    if not rows:
        return
    started = time.perf_counter()
    for agg in sorted({row.window_agg for row in rows}):
        _score_rows(step, layer, [row for row in rows if row.window_agg == agg], windows,
                    key_cache, block_table, scale, agg, backend)
    if step.observe_scoring is not None:
        # Host time of the launches (the cuts stay on the device until the step ends).
        step.observe_scoring(time.perf_counter() - started)


def _score_rows(step: StepContext, layer: int, rows: list[ScoringRow],
                windows: dict[str, torch.Tensor], key_cache: torch.Tensor,
                block_table: torch.Tensor, scale: float, agg: str, backend: str) -> None:
    max_window = max(row.window for row in rows)
    queries = _right_aligned(rows, [windows[row.req_id] for row in rows], max_window)
    lses = [window_store.get_lse(row.req_id, layer) for row in rows]
    have_lse = all(lse is not None for lse in lses)
    window_lse = _right_aligned(rows, lses, max_window) if have_lse else None
    if max_window > 1:
        window_normalisers["attention" if have_lse else "own"] += 1
    batch_rows, prompt_lens, window_lens, thresholds = _row_inputs(step, rows,
                                                                   block_table.device)
    cuts = compute_cuts(
        queries,
        key_cache,
        block_table[batch_rows],
        prompt_lens,
        window_lens,
        thresholds,
        num_sink_tokens=step.config.num_sink_tokens,
        scale=scale,
        agg=agg,
        backend=backend,
        # Bounds the kernels' scratch by this step's prompts, not the block table's width.
        max_prompt_len=max(row.num_prompt_tokens for row in rows),
        window_lse=window_lse,
    )
    step.cuts.append((layer, [row.req_id for row in rows], cuts))


def _row_inputs(step: StepContext, rows: list[ScoringRow], device: torch.device
                ) -> tuple[torch.Tensor, ...]:
    """Batch rows, prompt lengths, windows and thresholds of ``rows`` on the device: built once
    per step (every layer scores the same rows), without a blocking host-to-device copy."""
    key = tuple(row.req_id for row in rows)
    if key not in step.row_inputs:
        host = (torch.tensor([row.batch_row for row in rows], dtype=torch.int64),
                torch.tensor([row.num_prompt_tokens for row in rows], dtype=torch.int32),
                torch.tensor([row.window for row in rows], dtype=torch.int32),
                torch.tensor([row.threshold for row in rows], dtype=torch.float32))
        if device.type != "cpu":
            host = tuple(t.pin_memory().to(device, non_blocking=True) for t in host)
        step.row_inputs[key] = host
    return step.row_inputs[key]


def _right_aligned(rows: list[ScoringRow], windows: list[torch.Tensor], max_window: int
                   ) -> torch.Tensor:
    """``[len(rows), max_window, ...]`` with each row's ``[window, ...]`` tensor at the end."""
    first = windows[0]
    stacked = first.new_zeros((len(rows), max_window, *first.shape[1:]))
    for i, (row, window) in enumerate(zip(rows, windows, strict=True)):
        stacked[i, max_window - row.window:] = window
    return stacked
