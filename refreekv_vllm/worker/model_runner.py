"""Model-runner mixin: plans each step's scoring and gap skipping, and reports cuts.

The cut of a request is computed in the step that runs its last prompt chunk (by the attention
layers, see ``attention/scoring.py``). From the next step on, attention skips the whole blocks
inside each layer's gap, and the scheduler releases the same blocks to the pool after reading the
cut report attached to this step's ``ModelRunnerOutput``. Slot mappings and RoPE positions stay
logical: new tokens are written after the prompt, never into a gap.
"""

from collections import deque
from dataclasses import fields
from typing import Any

import numpy as np
from vllm.model_executor.models.utils import extract_layer_index
from vllm.v1.kv_cache_interface import FullAttentionSpec, KVCacheSpec

from refreekv_vllm.attention.metadata_sharing import sharing_metadata
from refreekv_vllm.config import RefreeKVConfig, RequestSettings, pruning_settings
from refreekv_vllm.core.kv_cache_spec import LayerFullAttentionSpec
from refreekv_vllm.metrics.prometheus import WorkerMetrics
from refreekv_vllm.outputs import CutReport, attach_cut_reports
from refreekv_vllm.policy.budget import freeable_block_range, paper_budget
from refreekv_vllm.worker.block_tables import StackedBlockTables, stackable
from refreekv_vllm.worker.step_context import (
    ScoringRow,
    StepContext,
    WindowCapture,
    set_step_context,
    window_store,
)

RECORDS_KEPT = 1024  # per-request records served by GET /v1/refreekv/requests/{id}

# The faster of the two on the H200 (benchmarks/results/kernels_gpu.md).
DEFAULT_GPU_KERNEL = "triton"


class RefreeKVModelRunnerMixin:
    """Mixed in front of vLLM's ``GPUModelRunner`` or ``CPUModelRunner`` (V1)."""

    refreekv_config: RefreeKVConfig
    # req_id -> model layer -> (first_block, end_block) skipped by attention.
    _refreekv_gaps: dict[str, dict[int, tuple[int, int]]]
    _refreekv_no_prune: set[str]
    _refreekv_step: StepContext | None
    _refreekv_kernel: str

    def init_refreekv(self, config: RefreeKVConfig) -> None:
        self.refreekv_config = config
        self._refreekv_gaps = {}
        self._refreekv_no_prune = set()
        self._refreekv_step = None
        self._refreekv_kernel = resolve_kernel(config.kernel, self.device)
        self._refreekv_metrics = WorkerMetrics(self.model_config.served_model_name)
        self.refreekv_records: deque[dict[str, Any]] = deque(maxlen=RECORDS_KEPT)

    def get_kv_cache_spec(self) -> dict[str, KVCacheSpec]:
        # One KV cache group per layer: each layer owns its blocks and can release its own gap.
        return per_layer_specs(super().get_kv_cache_spec())

    def initialize_kv_cache(self, kv_cache_config: Any, *args: Any, **kwargs: Any) -> None:
        super().initialize_kv_cache(kv_cache_config, *args, **kwargs)
        tables = self.input_batch.block_table
        # The CPU runner keeps host and "device" buffers as one tensor and maps slots with its
        # own kernel; stacking only pays off (and only runs) on CUDA.
        if self.device.type == "cuda" and stackable(tables) is None:
            self.input_batch.block_table = StackedBlockTables(tables)

    def _get_slot_mappings(self, num_tokens_padded: int, num_reqs_padded: int,
                           num_tokens_unpadded: int, ubatch_slices: Any = None):  # noqa: ANN202
        tables = self.input_batch.block_table
        if not isinstance(tables, StackedBlockTables) or ubatch_slices is not None:
            return super()._get_slot_mappings(num_tokens_padded, num_reqs_padded,
                                              num_tokens_unpadded, ubatch_slices)
        # vLLM pads each group's slot mapping with its own fill; one fill covers all groups.
        tables.pad_slot_mappings(num_tokens_unpadded, num_tokens_padded)
        by_group = {group: tables.slot_mappings.gpu[group, :num_tokens_padded]
                    for group in range(len(self.kv_cache_config.kv_cache_groups))}
        by_layer = {name: by_group[group]
                    for group, kv_cache_group in enumerate(self.kv_cache_config.kv_cache_groups)
                    for name in kv_cache_group.layer_names}
        return by_group, by_layer

    def _build_attention_metadata(self, *args: Any, **kwargs: Any):  # noqa: ANN202
        if kwargs.get("ubatch_slices") is not None:
            return super()._build_attention_metadata(*args, **kwargs)
        with sharing_metadata():
            return super()._build_attention_metadata(*args, **kwargs)

    def _update_states(self, scheduler_output: Any):  # noqa: ANN201
        cached = scheduler_output.scheduled_cached_reqs
        for req_id in scheduler_output.finished_req_ids:
            self._forget(req_id)
            self._refreekv_no_prune.discard(req_id)
        # A preempted request is recomputed with its full KV: never prune it again.
        for req_id in (scheduler_output.preempted_req_ids or ()):
            self._forget(req_id)
            self._refreekv_no_prune.add(req_id)
        for req_id in cached.resumed_req_ids:
            self._forget(req_id)
            self._refreekv_no_prune.add(req_id)
        for new_req in scheduler_output.scheduled_new_reqs:
            self._forget(new_req.req_id)
        return super()._update_states(scheduler_output)

    def _forget(self, req_id: str) -> None:
        self._refreekv_gaps.pop(req_id, None)
        window_store.drop(req_id)

    def _prepare_inputs(self, scheduler_output: Any, num_scheduled_tokens: np.ndarray):
        result = super()._prepare_inputs(scheduler_output, num_scheduled_tokens)
        step = self._plan_step(num_scheduled_tokens)
        self._refreekv_step = step if step.active else None
        set_step_context(self._refreekv_step)
        return result

    def _determine_batch_execution_and_padding(self, *args: Any, **kwargs: Any):  # noqa: ANN202
        # A FULL CUDA graph replays attention with the captured (uncompacted) block tables and
        # without running our Python: steps that score or skip gaps run attention eagerly
        # (PIECEWISE). vLLM rules FULL graphs out when cascade attention is requested.
        if self._refreekv_step is not None:
            if "use_cascade_attn" in kwargs:
                kwargs["use_cascade_attn"] = True
            else:
                args = (*args[:4], True, *args[5:])
        return super()._determine_batch_execution_and_padding(*args, **kwargs)

    def _plan_step(self, num_scheduled_tokens: np.ndarray) -> StepContext:
        config = self.refreekv_config
        batch = self.input_batch
        step = StepContext(config, self._refreekv_kernel,
                           observe_scoring=self._refreekv_metrics.scoring_seconds.observe)
        token_start = 0
        for row, req_id in enumerate(batch.req_ids):
            scheduled = int(num_scheduled_tokens[row])
            computed = int(batch.num_computed_tokens_cpu[row])
            num_prompt = int(batch.num_prompt_tokens[row])
            gaps = self._refreekv_gaps.get(req_id)
            if gaps:
                for layer, (first, end) in gaps.items():
                    step.gaps.setdefault(layer, []).append((row, first, end))
            elif (computed < num_prompt and req_id not in self._refreekv_no_prune
                  and num_prompt > config.num_sink_tokens + 1):
                params = self.requests[req_id].sampling_params
                settings = pruning_settings(
                    config, params.extra_args if params is not None else None)
                if settings is not None:
                    self._plan_prefill(step, req_id, row, token_start, computed, scheduled,
                                       num_prompt, settings)
            token_start += scheduled
        return step

    def _plan_prefill(self, step: StepContext, req_id: str, row: int, token_start: int,
                      computed: int, scheduled: int, num_prompt: int,
                      settings: RequestSettings) -> None:
        last_chunk = computed + scheduled >= num_prompt
        if settings.policy == "fixed":
            if last_chunk:
                step.scoring.append(ScoringRow(
                    req_id=req_id, batch_row=row, num_prompt_tokens=num_prompt, window=0,
                    window_agg=settings.window_agg, threshold=settings.threshold,
                    fixed_cut=settings.fixed_cut(num_prompt,
                                                 self.refreekv_config.num_sink_tokens)))
            return
        window = min(settings.window, num_prompt)
        window_start = num_prompt - window
        first = max(computed, window_start)
        end = min(computed + scheduled, num_prompt)
        if first < end:
            step.captures.append(WindowCapture(
                req_id=req_id, num_prompt_tokens=num_prompt, window=window,
                token_indices=[token_start + p - computed for p in range(first, end)],
                window_slots=[p - window_start for p in range(first, end)]))
        if last_chunk:
            step.scoring.append(ScoringRow(req_id=req_id, batch_row=row,
                                           num_prompt_tokens=num_prompt, window=window,
                                           window_agg=settings.window_agg,
                                           threshold=settings.threshold))

    def sample_tokens(self, grammar_output: Any):  # noqa: ANN201
        output = super().sample_tokens(grammar_output)
        step = self._refreekv_step
        self._refreekv_step = None
        set_step_context(None)
        if step is None or not step.scoring:
            return output
        reports = self._commit_cuts(step)
        # Under async scheduling the ModelRunnerOutput sits inside vLLM's async wrapper.
        attach_cut_reports(getattr(output, "_model_runner_output", output), reports)
        return output

    def _commit_cuts(self, step: StepContext) -> dict[str, CutReport]:
        config = self.refreekv_config
        block_size = self.cache_config.block_size
        num_layers = self.model_config.get_num_layers(self.parallel_config)
        reports: dict[str, CutReport] = {}
        for row in step.scoring:
            window_store.drop(row.req_id)
            if row.fixed_cut is not None:
                # The fixed-budget baseline cuts every layer alike, frozen ones included, so
                # that its budget is the one it is named after.
                cuts = (row.fixed_cut,) * num_layers
            else:
                layer_cuts = step.cuts.get(row.req_id, {})
                cuts = tuple(layer_cuts.get(layer, config.num_sink_tokens)
                             for layer in range(num_layers))
            gaps = {}
            for layer, cut in enumerate(cuts):
                blocks = freeable_block_range(cut, config.num_sink_tokens, block_size)
                if len(blocks):
                    gaps[layer] = (blocks.start, blocks.stop)
            if gaps:
                self._refreekv_gaps[row.req_id] = gaps
            self.refreekv_records.append(request_record(
                row, cuts, gaps, config, block_size))
            reports[row.req_id] = CutReport(
                req_id=row.req_id, num_prompt_tokens=row.num_prompt_tokens,
                num_sink_tokens=config.num_sink_tokens, cuts=cuts)
        return reports


def resolve_kernel(kernel: str, device: Any) -> str:
    if getattr(device, "type", str(device)) != "cuda":
        if kernel not in ("auto", "torch"):
            raise ValueError(f"refreekv kernel {kernel!r} needs a CUDA device; use 'torch'")
        return "torch"
    return DEFAULT_GPU_KERNEL if kernel == "auto" else kernel


def per_layer_specs(specs: dict[str, KVCacheSpec]) -> dict[str, KVCacheSpec]:
    """Bind each full-attention layer's spec to its layer index (one KV cache group each)."""
    bound: dict[str, KVCacheSpec] = {}
    for name, spec in specs.items():
        if type(spec) is not FullAttentionSpec or spec.sliding_window is not None \
                or spec.attention_chunk_size is not None:
            raise ValueError(f"ReFreeKV supports dense full-attention layers only; layer {name} "
                             f"has {type(spec).__name__}")
        init_fields = {f.name: getattr(spec, f.name) for f in fields(spec) if f.init}
        bound[name] = LayerFullAttentionSpec(**init_fields,
                                             refreekv_layer=extract_layer_index(name))
    return bound


def request_record(row: ScoringRow, cuts: tuple[int, ...], gaps: dict[int, tuple[int, int]],
                   config: RefreeKVConfig, block_size: int) -> dict[str, Any]:
    """What one request's pruning did, for the per-request endpoint."""
    m = config.num_sink_tokens
    num_prompt_tokens = row.num_prompt_tokens
    prompt_blocks = -(-num_prompt_tokens // block_size)
    skipped = sum(end - first for first, end in gaps.values())
    fixed = row.fixed_cut is not None
    return {
        "request_id": row.req_id,
        "num_prompt_tokens": num_prompt_tokens,
        "policy": "fixed" if fixed else "threshold",
        "threshold": None if fixed else row.threshold,
        "window": None if fixed else row.window,
        "window_agg": None if fixed else row.window_agg,
        "cuts": list(cuts),
        # Frozen layers report cut m (nothing pruned); the fixed baseline cuts them too.
        "paper_budget": paper_budget(cuts, num_prompt_tokens, m, frozen_layers=()),
        "block_budget": 1 - skipped / (prompt_blocks * len(cuts)),
        "tokens_pruned": sum(c - m for c in cuts),
        "blocks_skipped": skipped,
    }
