"""Model-runner mixin: per-layer pages, scoring plans and cut reports.

The cut of a request is computed in the step that runs its last prompt chunk (by the attention
layers, see ``attention/scoring.py``); the cuts stay on the device and are read once that step
has finished (no stall of the host). The first step that starts after that commits them: from
it on, each layer's attention skips the whole blocks of the request's gap in that layer
(``forward/layer_tables.py``), and the cut report rides on that step's ``ModelRunnerOutput`` so
that the scheduler gives the gap's pages back. Slot mappings and RoPE positions stay logical:
new tokens are written after the prompt, never into a gap. Under pipeline parallelism each
stage does this for its own layers and the last stage reports a request once every stage's part
reached it (``worker/cut_parts.py``).
"""

from collections import deque
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from vllm.distributed import get_pp_group
from vllm.sequence import IntermediateTensors
from vllm.v1.kv_cache_interface import FullAttentionSpec, KVCacheSpec

from refreekv_vllm.config import RefreeKVConfig, RequestSettings, pruning_settings
from refreekv_vllm.core.kv_cache_layout import is_paged_layout
from refreekv_vllm.forward.layer_tables import LayerTables
from refreekv_vllm.forward.step_context import (
    ScoringRow,
    StepContext,
    WindowCapture,
    set_layer_tables,
    set_step_context,
    window_store,
)
from refreekv_vllm.metrics.prometheus import WorkerMetrics, engine_index
from refreekv_vllm.ops import HeadReduction
from refreekv_vllm.outputs import (
    PAGE_ROWS_ATTR,
    CutPart,
    CutReport,
    attach_cut_parts,
    attach_cut_reports,
    take_cut_parts,
)
from refreekv_vllm.patches.async_output import model_runner_output
from refreekv_vllm.policy.budget import freeable_block_range, paper_budget, resident_budget
from refreekv_vllm.worker.block_table import GapMirroringBlockTable
from refreekv_vllm.worker.cut_parts import CutAssembly

RECORDS_KEPT = 1024  # per-request records served by GET /v1/refreekv/requests/{id}

# The faster of the two on the H200 (benchmarks/results/kernels_gpu.md).
DEFAULT_GPU_KERNEL = "triton"


@dataclass
class _PendingCuts:
    """A scoring step whose cuts are on their way to the host."""
    step: StepContext
    cuts: torch.Tensor | None  # host copy of the step's cut tensors, concatenated
    ready: torch.cuda.Event | None  # None: already on the host
    age: int = 0


if TYPE_CHECKING:  # the mixin's methods run on vLLM's runner: type them as such
    from vllm.v1.worker.gpu_model_runner import GPUModelRunner as _RunnerBase
else:
    _RunnerBase = object


class RefreeKVModelRunnerMixin(_RunnerBase):
    """Mixed in front of vLLM's ``GPUModelRunner`` or ``CPUModelRunner`` (V1)."""

    refreekv_config: RefreeKVConfig
    _refreekv_tables: LayerTables | None
    _refreekv_no_prune: set[str]
    _refreekv_step: StepContext | None
    _refreekv_kernel: str
    _refreekv_heads: HeadReduction | None
    _refreekv_pending: list[_PendingCuts]
    _refreekv_assembly: CutAssembly

    def init_refreekv(self, config: RefreeKVConfig) -> None:
        self.refreekv_config = config
        self._refreekv_tables = None
        self._refreekv_no_prune = set()
        self._refreekv_step = None
        self._refreekv_heads = tensor_parallel_heads()
        self._refreekv_kernel = resolve_kernel(
            config.kernel, self.device,
            tensor_parallel=self._refreekv_heads is not None)
        self._refreekv_pending = []
        self._refreekv_assembly = CutAssembly(self.model_config.get_total_num_hidden_layers(),
                                              sends_on=not get_pp_group().is_last_rank)
        self._refreekv_metrics = WorkerMetrics(self.model_config.served_model_name,
                                               engine_index(self.vllm_config))
        self.refreekv_records: deque[dict[str, Any]] = deque(maxlen=RECORDS_KEPT)

    def get_kv_cache_spec(self) -> dict[str, KVCacheSpec]:
        specs = super().get_kv_cache_spec()
        check_dense_specs(specs)
        return specs

    def initialize_kv_cache(self, kv_cache_config: Any, is_profiling: bool = False,
                            *args: Any, **kwargs: Any) -> None:
        self._refreekv_tables = None
        set_layer_tables(None)
        super().initialize_kv_cache(kv_cache_config, is_profiling, *args, **kwargs)
        if is_profiling:
            return  # vLLM's own minimal cache for memory profiling: attention passes through
        if not is_paged_layout(kv_cache_config):
            raise RuntimeError(
                "ReFreeKV's worker got a KV cache layout without per-layer pages: start the "
                "engine with a refreekv section in --additional-config (which also sets the "
                "scheduler) instead of naming the worker class alone")
        first = self.input_batch.block_table[0]
        tables = LayerTables(
            self.kv_cache_config, max_reqs=first.block_table.cpu.shape[0],
            max_blocks=first.block_table.cpu.shape[1], max_tokens=first.slot_mapping.cpu.shape[0],
            device=self.device, pin_memory=self.device.type == "cuda")
        GapMirroringBlockTable.adopt(self.input_batch.block_table, tables)
        tables.warm_up(first.block_table.gpu, first.slot_mapping.gpu)
        self._refreekv_tables = tables
        set_layer_tables(tables)
        attention = self.compilation_config.static_forward_context[tables.first_layer_name]
        if hasattr(attention.impl, "refreekv_warm_up"):
            attention.impl.refreekv_warm_up(attention.kv_cache, tables, self.refreekv_config,
                                            self._refreekv_kernel)

    def _update_states(self, scheduler_output: Any) -> Any:
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
        result = super()._update_states(scheduler_output)
        tables = self._refreekv_tables
        if tables is not None:
            tables.restore_gaps(self.input_batch.req_ids)
            tables.apply_page_rows(getattr(scheduler_output, PAGE_ROWS_ATTR, None))
        self._commit_finished_scoring()
        return result

    def _forget(self, req_id: str) -> None:
        if self._refreekv_tables is not None:
            self._refreekv_tables.forget(req_id)
        window_store.drop(req_id)
        for pending in self._refreekv_pending:
            pending.step.scoring = [row for row in pending.step.scoring if row.req_id != req_id]
        self._refreekv_assembly.forget(req_id)

    def execute_model(self, scheduler_output: Any,
                      intermediate_tensors: IntermediateTensors | None = None) -> Any:
        output = super().execute_model(scheduler_output, intermediate_tensors)
        if isinstance(output, IntermediateTensors):  # a pipeline stage before the last
            attach_cut_parts(output.tensors, self._refreekv_assembly.take_outgoing())
        return output

    def sync_and_gather_intermediate_tensors(
            self, num_tokens: int, intermediate_tensors: IntermediateTensors | None,
            sync_self: bool) -> IntermediateTensors:
        # A later pipeline stage: the earlier stages' cut parts ride on what they sent.
        if sync_self and intermediate_tensors is not None:
            for part in take_cut_parts(intermediate_tensors.tensors):
                self._refreekv_assembly.add(part)
        return super().sync_and_gather_intermediate_tensors(num_tokens, intermediate_tensors,
                                                            sync_self)

    def _prepare_inputs(self, scheduler_output: Any, num_scheduled_tokens: np.ndarray):
        result = super()._prepare_inputs(scheduler_output, num_scheduled_tokens)
        self._refreekv_step = self._plan_step(num_scheduled_tokens)
        set_step_context(self._refreekv_step)
        return result

    def _determine_batch_execution_and_padding(self, *args: Any, **kwargs: Any) -> Any:
        # A FULL CUDA graph replays attention without running our Python: steps that score run
        # attention eagerly (PIECEWISE). vLLM rules FULL graphs out when cascade attention is
        # requested. Decode steps, pruned or not, keep vLLM's FULL graphs.
        if self._refreekv_step is not None:
            if "use_cascade_attn" in kwargs:
                kwargs["use_cascade_attn"] = True
            else:
                args = (*args[:4], True, *args[5:])
        return super()._determine_batch_execution_and_padding(*args, **kwargs)

    def _plan_step(self, num_scheduled_tokens: np.ndarray) -> StepContext | None:
        """The step's captures and scoring rows; None when no request prunes in it (every
        decode-only step: this runs on the host before each of them)."""
        config = self.refreekv_config
        batch = self.input_batch
        num_reqs = len(num_scheduled_tokens)
        computed_all = batch.num_computed_tokens_cpu[:num_reqs]
        prompt_all = batch.num_prompt_tokens[:num_reqs]
        prefilling = np.flatnonzero((computed_all < prompt_all)
                                    & (prompt_all >= config.shortest_scored_prompt))
        if not len(prefilling):
            return None
        step = StepContext(config, self._refreekv_kernel,
                           observe_scoring=self._refreekv_metrics.scoring_seconds.observe,
                           head_reduction=self._refreekv_heads)
        token_starts = np.cumsum(num_scheduled_tokens) - num_scheduled_tokens
        for row in prefilling.tolist():
            req_id = batch.req_ids[row]
            if req_id in self._refreekv_no_prune:
                continue
            params = self.requests[req_id].sampling_params
            settings = pruning_settings(config, params.extra_args if params is not None else None)
            if settings is not None:
                self._plan_prefill(step, req_id, row, int(token_starts[row]),
                                   int(computed_all[row]), int(num_scheduled_tokens[row]),
                                   int(prompt_all[row]), settings)
        return step if step.active else None

    def _plan_prefill(self, step: StepContext, req_id: str, row: int, token_start: int,
                      computed: int, scheduled: int, num_prompt: int,
                      settings: RequestSettings) -> None:
        policy = settings.policy
        window = policy.window_rows(num_prompt)
        window_start = num_prompt - window
        first = max(computed, window_start)
        end = min(computed + scheduled, num_prompt)
        if window and first < end:
            step.captures.append(WindowCapture(
                req_id=req_id, num_prompt_tokens=num_prompt, window=window,
                token_indices=range(token_start + first - computed, token_start + end - computed),
                window_slots=range(first - window_start, end - window_start)))
        if computed + scheduled >= num_prompt:  # the last chunk: cut after this step
            step.scoring.append(ScoringRow(
                req_id=req_id, batch_row=row, num_prompt_tokens=num_prompt, window=window,
                policy=policy,
                fixed_cut=policy.fixed_cut(num_prompt, self.refreekv_config.num_sink_tokens)))

    # Seeded requests in chunked prefill on CPUs: vLLM rewinds the generator of a request whose
    # sampled token is discarded (a prompt chunk that is not the last) by moving its Philox
    # offset, which CPU generators do not have (vLLM 0.26 raises "CPU Generator does not use
    # offset" and the engine dies). Here their state is saved before sampling and restored
    # after it, which is that rewind, and vLLM's own rewind skips them.

    def _sample(self, *args: Any, **kwargs: Any) -> Any:
        saved = [(gen, gen.get_state()) for gen in self._discarded_cpu_generators().values()]
        output = super()._sample(*args, **kwargs)
        for gen, state in saved:
            gen.set_state(state)
        return output

    def _bookkeeping_sync(self, *args: Any, **kwargs: Any) -> Any:
        hidden = self._discarded_cpu_generators()
        generators = self.input_batch.generators
        for row in hidden:
            del generators[row]
        try:
            return super()._bookkeeping_sync(*args, **kwargs)
        finally:
            generators.update(hidden)

    def _discarded_cpu_generators(self) -> dict[int, torch.Generator]:
        generators = self.input_batch.generators
        if not generators:
            return {}
        rows = np.flatnonzero(self.discard_request_mask.np[:self.input_batch.num_reqs])
        return {row: generators[row] for row in rows.tolist()
                if row in generators and generators[row].device.type == "cpu"}

    def sample_tokens(self, grammar_output: Any) -> Any:
        output = super().sample_tokens(grammar_output)
        step = self._refreekv_step
        self._refreekv_step = None
        set_step_context(None)
        if step is not None and step.scoring:
            self._refreekv_pending.append(self._cuts_to_host(step))
        reports = self._take_cut_reports()
        if reports:
            # Under async scheduling the ModelRunnerOutput sits inside vLLM's async wrapper.
            attach_cut_reports(model_runner_output(output), reports)
        return output

    def _cuts_to_host(self, step: StepContext) -> _PendingCuts:
        """Start the copy of the step's cuts to the host without waiting for it."""
        if not step.cuts:
            return _PendingCuts(step, None, None)
        cuts = torch.cat([layer_cuts for _, _, layer_cuts in step.cuts])
        if cuts.device.type == "cpu":
            return _PendingCuts(step, cuts, None)
        host = torch.empty(cuts.shape, dtype=cuts.dtype, pin_memory=True)
        host.copy_(cuts, non_blocking=True)
        ready = torch.cuda.Event()
        ready.record()
        return _PendingCuts(step, host, ready)

    def _commit_finished_scoring(self) -> None:
        """Commit the cuts of scoring steps that have finished on the device (or, after two
        steps, wait for them): set the gaps the attention skips from this step on and queue
        the cut reports for this step's output."""
        waiting: list[_PendingCuts] = []
        for pending in self._refreekv_pending:
            # Ranks of a tensor-parallel engine must start skipping in the same step: they wait.
            if pending.ready is not None and self._refreekv_heads is None \
                    and not pending.ready.query() and pending.age < 2:
                pending.age += 1
                waiting.append(pending)
                continue
            if pending.ready is not None:
                pending.ready.synchronize()
            self._commit_cuts(pending)
        self._refreekv_pending = waiting

    def _commit_cuts(self, pending: _PendingCuts) -> None:
        """From this step on, skip the gaps of this worker's layers; file the cuts as parts of
        the requests' reports."""
        step = pending.step
        m = self.refreekv_config.num_sink_tokens
        block_size = self.cache_config.block_size
        cuts_by_request = step.cuts_by_request(
            None if pending.cuts is None else pending.cuts.tolist())
        tables = self._refreekv_tables
        assert tables is not None, "requests are scored only once the paged KV cache exists"
        layers = tables.layers
        for row in step.scoring:
            window_store.drop(row.req_id)
            if row.fixed_cut is not None:
                # A cut known without scoring (the fixed budget) holds for every layer, frozen
                # ones included, so that its budget is the one it is named after.
                cuts = (row.fixed_cut,) * len(layers)
            else:
                layer_cuts = cuts_by_request.get(row.req_id, {})
                cuts = tuple(layer_cuts.get(layer, m) for layer in layers)
            gaps = gap_blocks(cuts, m, block_size)
            if gaps.any():
                tables.set_gaps(row.req_id, self.input_batch.req_id_to_index.get(row.req_id),
                                gaps)
            self._refreekv_assembly.add(CutPart(row.req_id, layers.start, cuts), row)

    def _take_cut_reports(self) -> dict[str, CutReport]:
        """Reports (and endpoint records) of the requests whose every layer's cut is known."""
        m = self.refreekv_config.num_sink_tokens
        block_size = self.cache_config.block_size
        reports: dict[str, CutReport] = {}
        for req_id, (row, cuts) in self._refreekv_assembly.take_complete().items():
            self.refreekv_records.append(request_record(
                row, cuts, gap_blocks(cuts, m, block_size), self.refreekv_config, block_size))
            reports[req_id] = CutReport(req_id=req_id, num_prompt_tokens=row.num_prompt_tokens,
                                        num_sink_tokens=m, cuts=cuts)
        return reports


def resolve_kernel(kernel: str, device: Any, tensor_parallel: bool = False) -> str:
    if getattr(device, "type", str(device)) != "cuda":
        if kernel not in ("auto", "torch"):
            raise ValueError(f"refreekv kernel {kernel!r} needs a CUDA device; use 'torch'")
        return "torch"
    if tensor_parallel:
        # The GPU kernels fuse the sum over heads into the cut search; across ranks the heads'
        # sums must be all-reduced first, which the torch backend does.
        if kernel not in ("auto", "torch"):
            raise ValueError(f"refreekv kernel {kernel!r} scores all heads on one GPU; with "
                             "--tensor-parallel-size > 1 use 'auto' or 'torch'")
        return "torch"
    return DEFAULT_GPU_KERNEL if kernel == "auto" else kernel


def tensor_parallel_heads() -> HeadReduction | None:
    """The tensor-parallel group's collectives, when heads are split over ranks."""
    from vllm.distributed import get_tp_group

    group = get_tp_group()
    if group.world_size == 1:
        return None
    return HeadReduction(world_size=group.world_size, all_reduce=group.all_reduce,
                         broadcast=lambda tensor: group.broadcast(tensor, src=0),
                         all_gather=lambda tensor: group.all_gather(tensor, dim=0))


def check_dense_specs(specs: dict[str, KVCacheSpec]) -> None:
    for name, spec in specs.items():
        if type(spec) is not FullAttentionSpec or spec.sliding_window is not None \
                or spec.attention_chunk_size is not None:
            raise ValueError(f"ReFreeKV supports dense full-attention layers only; layer {name} "
                             f"has {type(spec).__name__}")


def gap_blocks(cuts: tuple[int, ...], num_sink_tokens: int, block_size: int) -> np.ndarray:
    """``[len(cuts), 2]``: the first and end block of each layer's gap (0, 0 without one)."""
    gaps = np.zeros((len(cuts), 2), dtype=np.int32)
    for index, cut in enumerate(cuts):
        blocks = freeable_block_range(cut, num_sink_tokens, block_size)
        if len(blocks):
            gaps[index] = (blocks.start, blocks.stop)
    return gaps


def request_record(row: ScoringRow, cuts: tuple[int, ...], gaps: np.ndarray,
                   config: RefreeKVConfig, block_size: int) -> dict[str, Any]:
    """What one request's pruning did, for the per-request endpoint."""
    m = config.num_sink_tokens
    num_prompt_tokens = row.num_prompt_tokens
    skipped_per_layer = (gaps[:, 1] - gaps[:, 0]).tolist()
    skipped = sum(skipped_per_layer)
    return {
        "request_id": row.req_id,
        "num_prompt_tokens": num_prompt_tokens,
        **row.policy.describe(),
        "cuts": list(cuts),
        # Frozen layers report cut m (nothing pruned); the fixed baseline cuts them too.
        "paper_budget": paper_budget(cuts, num_prompt_tokens, m, frozen_layers=()),
        "block_budget": resident_budget(num_prompt_tokens, skipped_per_layer, block_size),
        "tokens_pruned": sum(c - m for c in cuts),
        "blocks_skipped": skipped,
    }
