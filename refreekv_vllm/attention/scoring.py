"""Scoring inside the attention calls: every layer keeps the queries of the window rows that
ran in its forward; after the last layer's keys are in the page pool, one kernel call computes
the cut of every (request, layer) pair whose prefill ends in this step."""

import time
from collections import Counter
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np
import torch

from refreekv_vllm.config import RefreeKVConfig
from refreekv_vllm.forward.step_context import ScoringRow, StepContext, window_store
from refreekv_vllm.ops import compute_cuts
from refreekv_vllm.ops.launch_utils import align_16_bytes
from refreekv_vllm.policy.policies import ThresholdPolicy
from refreekv_vllm.policy.reference import AGGREGATIONS

if TYPE_CHECKING:
    from refreekv_vllm.forward.layer_tables import LayerTables

# Layer scorings of windows (w > 1) by where their softmax normalisers came from: "attention"
# (the prefill's, one pass over the keys) or "own" (the kernel's first pass). Per process.
window_normalisers: Counter[str] = Counter()

# Keys per program of the GPU kernels. Fixed, so that they compile once (a compile takes
# seconds and would stall serving); with every layer's rows in one call there are enough
# programs to fill the GPU at this size.
SCORING_CHUNK = 1024


def wants_prefill_lse(step: StepContext, layer: int) -> bool:
    """Whether this layer's forward should keep the attention's softmax normaliser: only when
    the config asks for it, only the GPU kernels use it, and only for windows of more than one
    row."""
    return (step.config.reuse_attention_lse and step.kernel in ("triton", "cuda")
            and layer not in step.config.frozen_layers
            and any(capture.window > 1 for capture in step.captures))


def capture(step: StepContext, layer: int, layers: range, query: torch.Tensor,
            prefill_lse: torch.Tensor | None = None) -> None:
    """Keep this layer's queries of the window rows that ran in this step, every capture's at
    once, in the step's buffer (one launch per layer: this runs in every layer's attention
    call of the step). ``layers``: this worker's model layers; ``query``: ``[num_tokens,
    num_heads, head_size]``; ``prefill_lse``: the
    attention's ``[num_heads, >= num_tokens]`` softmax normaliser of this step's rows, if it
    gave one."""
    if layer in step.config.frozen_layers or not step.captures:
        return
    index = step.capture_index(query.device)
    torch.index_select(query, 0, index, out=step.query_rows(layer, layers, query))
    if prefill_lse is not None:
        step.captured_lse[layer] = prefill_lse.index_select(1, index).T


def end_of_forward(step: StepContext, key_cache: torch.Tensor, layer_tables: torch.Tensor,
                   layers: range, scale: float, backend: str) -> None:
    """After the last layer: file the step's captured rows under their requests' windows, then
    score the requests whose prompt ends in this step."""
    _store_captures(step)
    if step.scoring:
        score(step, key_cache, layer_tables, layers, scale, backend)


def _store_captures(step: StepContext) -> None:
    if step.captured_queries is None:
        return
    layers, queries = step.scored_layers, step.captured_queries
    lses = [step.captured_lse.get(layer) for layer in layers]
    lse = None if any(x is None for x in lses) else torch.stack(lses)  # type: ignore[arg-type]
    scored_now = {row.req_id for row in step.scoring}
    start = 0
    for window in step.captures:
        rows = slice(start, start + len(window.token_indices))
        start = rows.stop
        whole = len(window.window_slots) == window.window
        if lse is None and whole and window.req_id in scored_now:
            # The whole window ran in this step and is scored now: no need to file it.
            step.whole_windows[window.req_id] = queries[:, rows]
        else:
            window_store.put(window, layers, queries[:, rows],
                             None if lse is None else lse[:, rows])
    step.captured_queries = None
    step.captured_lse.clear()


def score(step: StepContext, key_cache: torch.Tensor, layer_tables: torch.Tensor,
          layers: range, scale: float, backend: str) -> None:
    """Cut of every layer of every request whose prompt ends in this step, in one kernel call
    per aggregation: (request, layer) pairs are the kernel's rows, since every layer's keys
    live in the same page pool. Runs once the last layer's keys are written.

    ``key_cache``: ``[num_pages, block_size, num_kv_heads, head_size]`` key view of the pool;
    ``layer_tables``: ``[len(layers), max_reqs, max_blocks]`` pages of this worker's model
    layers ``layers`` per batch row (a request being scored has no gap yet)."""
    scored = list(step.config.scored_layers(layers))
    windows = {row.req_id: _window(step, row.req_id) for row in step.scoring}
    rules = {row.req_id: row.policy for row in step.scoring
             if isinstance(row.policy, ThresholdPolicy)}
    rows = [row for row in step.scoring
            if row.req_id in rules and _scored_layers(windows[row.req_id]) == tuple(scored)]
    if not rows or not scored:
        return
    started = time.perf_counter()
    for aggs in sorted({(rules[row.req_id].window_agg, rules[row.req_id].head_agg)
                        for row in rows}):
        group = [row for row in rows
                 if (rules[row.req_id].window_agg, rules[row.req_id].head_agg) == aggs]
        _score_rows(step, scored, group, [rules[row.req_id].threshold for row in group],
                    key_cache, layer_tables, [layer - layers.start for layer in scored], scale,
                    *aggs, backend if aggs[1] == "mean" else "torch")
    if step.observe_scoring is not None:
        # Host time of the launches (the cuts stay on the device until the step ends).
        step.observe_scoring(time.perf_counter() - started)


def _scored_layers(window: tuple[tuple[int, ...], torch.Tensor] | None) -> tuple[int, ...] | None:
    return None if window is None else window[0]


def _window(step: StepContext, req_id: str) -> tuple[tuple[int, ...], torch.Tensor] | None:
    """Scored layers and ``[len(layers), window, Hq, D]`` queries of a request's whole window,
    or None if some of it never ran."""
    whole = step.whole_windows.get(req_id)
    return (step.scored_layers, whole) if whole is not None else window_store.get(req_id)


def _queries(step: StepContext, req_id: str) -> torch.Tensor:
    window = _window(step, req_id)
    assert window is not None, f"request {req_id} is scored without its whole window"
    return window[1]


def _score_rows(step: StepContext, layers: list[int], rows: list[ScoringRow],
                thresholds: list[float], key_cache: torch.Tensor, layer_tables: torch.Tensor,
                table_rows: list[int], scale: float, agg: str, head_agg: str,
                backend: str) -> None:
    """``layers``: the model layers scored; ``table_rows``: their rows of ``layer_tables``."""
    max_window = max(row.window for row in rows)
    queries = _right_aligned(rows, [_queries(step, row.req_id) for row in rows], max_window)
    lses = [window_store.get_lse(row.req_id) for row in rows]
    known_lses = [lse for lse in lses if lse is not None]
    have_lse = len(known_lses) == len(lses)
    window_lse = _right_aligned(rows, known_lses, max_window) if have_lse else None
    if max_window > 1:
        window_normalisers["attention" if have_lse else "own"] += len(rows) * len(layers)
    inputs = _pair_inputs(rows, thresholds, table_rows, layer_tables.device)
    cuts = compute_cuts(
        queries,
        key_cache,
        layer_tables[inputs.layers, inputs.batch_rows],
        inputs.prompt_lens,
        inputs.window_lens,
        inputs.thresholds,
        num_sink_tokens=step.config.num_sink_tokens,
        scale=scale,
        agg=agg,
        head_agg=head_agg,
        backend=backend,
        # Bounds the kernels' scratch by this step's prompts, not the block table's width.
        max_prompt_len=max(row.num_prompt_tokens for row in rows),
        # One chunk size for every call: the kernels compile once, not per batch shape.
        chunk_size=SCORING_CHUNK,
        window_lse=window_lse,
        head_reduction=step.head_reduction,
    )
    step.cuts.append((layers, [row.req_id for row in rows], cuts))


@dataclass(frozen=True)
class _PairInputs:
    """Per (request, layer) pair, request-major: what the kernel reads besides queries."""
    layers: torch.Tensor  # rows of the worker's per-layer tables
    batch_rows: torch.Tensor
    prompt_lens: torch.Tensor
    window_lens: torch.Tensor
    thresholds: torch.Tensor


def _pair_inputs(rows: list[ScoringRow], thresholds: list[float], layers: list[int],
                 device: torch.device) -> _PairInputs:
    """All five vectors packed in one int32 array (thresholds as their fp32 bits), so that a
    step pays one pinned buffer and one non-blocking copy (a blocking host-to-device copy
    would wait for the step's forward). Each vector starts on 16 bytes, whatever the pair
    count (``align_16_bytes``)."""
    per_row = len(layers)
    num_pairs = len(rows) * per_row
    packed = np.zeros((5, align_16_bytes(num_pairs)), dtype=np.int32)
    packed[0, :num_pairs] = np.tile(np.asarray(layers, dtype=np.int32), len(rows))
    for index, values in enumerate(
            ([row.batch_row for row in rows], [row.num_prompt_tokens for row in rows],
             [row.window for row in rows]), start=1):
        packed[index, :num_pairs] = np.repeat(np.asarray(values, dtype=np.int32), per_row)
    packed[4, :num_pairs] = np.repeat(np.asarray(thresholds, dtype=np.float32),
                                      per_row).view(np.int32)
    tensor = torch.from_numpy(packed)
    if device.type != "cpu":
        tensor = tensor.pin_memory().to(device, non_blocking=True)
    tensor = tensor[:, :num_pairs]
    return _PairInputs(layers=tensor[0], batch_rows=tensor[1], prompt_lens=tensor[2],
                       window_lens=tensor[3], thresholds=tensor[4].view(torch.float32))


def _right_aligned(rows: list[ScoringRow], windows: list[torch.Tensor], max_window: int
                   ) -> torch.Tensor:
    """``[len(rows) * L, max_window, ...]`` from each row's ``[L, window, ...]`` tensor, its
    rows at the right end."""
    if all(row.window == max_window for row in rows):
        return torch.cat(windows)
    first = windows[0]
    stacked = first.new_zeros((len(rows), first.shape[0], max_window, *first.shape[2:]))
    for i, (row, window) in enumerate(zip(rows, windows, strict=True)):
        stacked[i, :, max_window - row.window:] = window
    return stacked.flatten(0, 1)


def warm_up_scoring(key_cache: torch.Tensor, layer_tables: "LayerTables", config: RefreeKVConfig,
                    backend: str, num_heads: int, head_size: int, dtype: torch.dtype,
                    scale: float, with_lse: bool) -> None:
    """One scoring call per aggregation with the server's window, on placeholder queries over
    the real key pool, so that the kernels are compiled before the first request."""
    layers = list(config.scored_layers(layer_tables.layers))
    window, device = config.window, key_cache.device
    num_prompt_tokens = window + config.num_sink_tokens + 1
    queries = torch.zeros(len(layers), window, num_heads, head_size, dtype=dtype, device=device)
    lse = (torch.zeros(len(layers), window, num_heads, dtype=torch.float32, device=device)
           if with_lse and window > 1 else None)
    for agg in AGGREGATIONS:
        compute_cuts(
            queries, key_cache, layer_tables.tables[layer_tables.layer_rows(layers), 0],
            torch.full((len(layers),), num_prompt_tokens, dtype=torch.int32, device=device),
            torch.full((len(layers),), window, dtype=torch.int32, device=device),
            torch.full((len(layers),), 0.01, dtype=torch.float32, device=device),
            num_sink_tokens=config.num_sink_tokens, scale=scale, agg=agg, backend=backend,
            max_prompt_len=num_prompt_tokens, chunk_size=SCORING_CHUNK, window_lse=lse)
