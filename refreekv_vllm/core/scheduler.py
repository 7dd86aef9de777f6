"""RefreeKV schedulers: give back the gap pages that the worker's cut reports name.

vLLM's scheduler, KV cache manager and coordinator run unchanged over one KV cache group; its
block pool is a :class:`PagedBlockPool`, whose blocks hold one page per layer. A cut report
releases, for every layer, that layer's pages of the blocks inside the request's gap.

``--scheduler-cls refreekv_vllm.core.scheduler.make_scheduler`` (set by the plugin for a
``refreekv`` section in ``--additional-config``); the factory picks the sync or async variant
the way vLLM's ``SchedulerConfig.get_scheduler_cls`` would.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

import numpy as np
from vllm.config import VllmConfig
from vllm.v1.core.sched.async_scheduler import AsyncScheduler
from vllm.v1.core.sched.output import SchedulerOutput
from vllm.v1.core.sched.scheduler import Scheduler
from vllm.v1.engine import EngineCoreOutputs
from vllm.v1.kv_cache_interface import KVCacheConfig
from vllm.v1.outputs import ModelRunnerOutput
from vllm.v1.request import Request, RequestStatus

from refreekv_vllm import envs
from refreekv_vllm.config import RefreeKVConfig, RequestSettings, pruning_settings
from refreekv_vllm.core.cut_state import CutState, CutStats, SkipReason
from refreekv_vllm.core.kv_cache_layout import stage_layers, stage_pages
from refreekv_vllm.core.paged_block_pool import PagedBlockPool
from refreekv_vllm.core.prefix_hits import capped_hit_tokens, trim_hit
from refreekv_vllm.core.support import check_supported
from refreekv_vllm.metrics.prometheus import SchedulerMetrics, engine_index
from refreekv_vllm.outputs import PAGE_ROWS_ATTR, CutReport, get_cut_reports
from refreekv_vllm.policy.budget import freeable_block_range, paper_budget

logger = logging.getLogger(__name__)

if TYPE_CHECKING:  # the mixin's methods run on vLLM's scheduler: type them as such
    from vllm.v1.core.sched.scheduler import Scheduler as _SchedulerBase
else:
    _SchedulerBase = object


class RefreeKVSchedulerMixin(_SchedulerBase):
    """Scheduler-side ReFreeKV; mixed in before vLLM's ``Scheduler`` or ``AsyncScheduler``."""

    # Provided by vLLM's Scheduler.
    requests: dict[str, Request]
    kv_cache_manager: Any

    def __init__(
        self, vllm_config: VllmConfig, kv_cache_config: KVCacheConfig, *args: Any, **kwargs: Any
    ) -> None:
        self._refreekv_config = RefreeKVConfig.from_additional_config(
            vllm_config.additional_config)
        enabled = self._refreekv_config.enabled
        # Disabled server-wide, the engine is plain vLLM: vLLM's own layout, every request
        # opted out.
        check_supported(vllm_config, kv_cache_config if enabled else None)
        super().__init__(vllm_config, kv_cache_config, *args, **kwargs)
        (group,) = kv_cache_config.kv_cache_groups
        spec = group.kv_cache_spec
        self._refreekv_block_size: int = spec.block_size
        self._refreekv_num_layers = len(group.layer_names)
        self._refreekv_state = CutState(self._refreekv_block_size, spec.page_size_bytes)
        self._refreekv_pool: PagedBlockPool | None = None
        if enabled:
            self._refreekv_pool = PagedBlockPool.adopt(
                self.kv_cache_manager.block_pool, stage_pages(kv_cache_config),
                stage_layers(kv_cache_config))
            self._cap_cache_blocks()
            self._cap_prefix_hits()
            self._unprune_before_free()
        model_config = vllm_config.model_config
        shortest = self._refreekv_config.min_prompt_tokens
        if enabled and model_config is not None and shortest >= model_config.max_model_len:
            logger.warning("refreekv: min_prompt_tokens %d is not below the model length %d: "
                           "no prompt will be scored or pruned", shortest,
                           model_config.max_model_len)
        self._refreekv_metrics = SchedulerMetrics(
            model_config.served_model_name if model_config is not None else "",
            engine_index(vllm_config), self._refreekv_config.threshold,
            self._refreekv_config.window,
            num_layers=self._refreekv_num_layers,
            skip_reasons=[reason.value for reason in SkipReason])

    def schedule(self, *args: Any, **kwargs: Any) -> SchedulerOutput:
        output = super().schedule(*args, **kwargs)
        if self._refreekv_pool is not None:
            # Workers mirror the pages of every block handed out in this schedule().
            setattr(output, PAGE_ROWS_ATTR, self._refreekv_pool.page_pool.take_updates())
        return output

    def refreekv_stats(self) -> CutStats:
        return self._refreekv_state.stats()

    def refreekv_recent_reports(self) -> list[CutReport]:
        return self._refreekv_state.recent_reports()

    def update_from_output(
        self, scheduler_output: SchedulerOutput, model_runner_output: ModelRunnerOutput
    ) -> dict[int, EngineCoreOutputs]:
        # A report rides on the output of the first step whose attention skipped the gaps;
        # under async scheduling the next step may already be scheduled, but the released
        # pages can be handed out again by the next schedule() at the earliest. Release before
        # super(): the request's state is still the one it was scheduled with, and the cache
        # cap is in place before super() appends the sampled token (the async scheduler calls
        # cache_blocks right there). A request finishing in this step is then freed by super().
        reports = get_cut_reports(model_runner_output)
        if reports:
            before = self._refreekv_state.stats()
            self._apply_cut_reports(reports)
            self._route_cache_blocks()
            self._publish_metrics(before, reports)
        return super().update_from_output(
            scheduler_output, model_runner_output)

    def add_request(self, request: Request) -> None:
        is_new = request.request_id not in self.requests  # else a streaming-input update
        super().add_request(request)
        if not is_new:
            return
        if self._refreekv_opts_out(request):
            self._refreekv_state.mark_no_prune(request.request_id, SkipReason.OPTED_OUT)
            self._refreekv_skipped(SkipReason.OPTED_OUT)

    def _preempt_request(self, request: Request, timestamp: float) -> None:
        super()._preempt_request(request, timestamp)
        self._refreekv_state.on_preempted(request.request_id)
        self._route_cache_blocks()

    def _free_request(
        self, request: Request, delay_free_blocks: bool = False
    ) -> tuple[dict[str, Any] | None, dict[str, Any] | None]:
        if (request.num_prompt_tokens < self._refreekv_config.shortest_scored_prompt
                and self._refreekv_state.no_prune_reason(request.request_id)
                != SkipReason.OPTED_OUT):
            # Counted when the request ends: the worker decides on the prompt it prefills, and
            # a streaming-input update may lengthen a short prompt into one that is scored
            # (prompts only grow, so a prompt short at the end was never scored).
            self._refreekv_skipped(SkipReason.SHORT_PROMPT)
        result = super()._free_request(
            request, delay_free_blocks=delay_free_blocks)
        self._refreekv_state.on_finished(request.request_id)
        self._route_cache_blocks()
        return result

    def _refreekv_skipped(self, reason: SkipReason) -> None:
        """A request that is never scored, counted in the state and the metrics at once."""
        self._refreekv_state.record_skip(reason)
        self._refreekv_metrics.skipped(reason.value)

    def _refreekv_opts_out(self, request: Request) -> bool:
        """Whether the request is not to be pruned; the same rule as the worker's."""
        return self._refreekv_settings(request) is None

    def _refreekv_settings(self, request: Request) -> RequestSettings | None:
        """The request's pruning settings, or None if it is not to be pruned."""
        params = request.sampling_params
        return pruning_settings(self._refreekv_config,
                                params.extra_args if params is not None else None)

    def _apply_cut_reports(self, reports: Mapping[str, CutReport]) -> None:
        state = self._refreekv_state
        for report in reports.values():
            req_id = report.req_id
            request = self.requests.get(req_id)
            if request is None or request.status != RequestStatus.RUNNING:
                # Freed wholesale (finished, aborted, preempted) since it was scheduled.
                state.record_skip(SkipReason.NOT_RUNNING)
                continue
            if len(report.cuts) != self._refreekv_num_layers:
                raise ValueError(
                    f"cut report for {req_id} has {len(report.cuts)} layers, the KV cache has "
                    f"{self._refreekv_num_layers}")
            if report.prunes:
                # From the next step on the worker attends without the gaps: KV written from
                # then on must never be published, whatever this scheduler releases.
                bs = self._refreekv_block_size
                state.cap_cache(req_id, report.num_prompt_tokens // bs * bs)
            reason = state.no_prune_reason(req_id)
            if reason is None and state.was_reported(req_id):
                reason = SkipReason.ALREADY_REPORTED
            if reason is not None:
                if reason != SkipReason.OPTED_OUT:  # counted once, when it was added
                    state.record_skip(reason)
                continue
            self._release_gaps(report)

    def _release_gaps(self, report: CutReport) -> None:
        pool = self._refreekv_pool
        assert pool is not None, "reports are accepted only when pruning is enabled"
        manager = self.kv_cache_manager.coordinator.single_type_managers[0]
        blocks = manager.req_to_blocks.get(report.req_id, [])
        gaps = [freeable_block_range(cut, report.num_sink_tokens, self._refreekv_block_size)
                for cut in report.cuts]
        released, num_freed = pool.release_gap_pages(blocks, gaps)
        if envs.REFREEKV_DEBUG_ACCOUNTING:
            pool.check_accounting()
        self._refreekv_state.record_report(report, released, num_freed)

    def _publish_metrics(self, before: CutStats, reports: Mapping[str, CutReport]) -> None:
        metrics, state = self._refreekv_metrics, self._refreekv_state
        after = state.stats()
        metrics.requests_pruned.inc(after.requests_pruned - before.requests_pruned)
        metrics.blocks_released.inc(after.blocks_released - before.blocks_released)
        metrics.blocks_freed.inc(after.blocks_freed - before.blocks_freed)
        metrics.tokens_pruned.inc(after.tokens_pruned - before.tokens_pruned)
        metrics.bytes_freed.inc(after.bytes_freed - before.bytes_freed)
        for reason, count in after.requests_skipped.items():
            if count > before.requests_skipped.get(reason, 0):
                metrics.skipped(reason, count - before.requests_skipped.get(reason, 0))
        prompt_tokens = 0
        kept_tokens = np.zeros(self._refreekv_num_layers, dtype=np.int64)
        for report in reports.values():
            pruned = state.pruned(report.req_id)
            if pruned is None or pruned.report is not report:
                continue
            n, m = report.num_prompt_tokens, report.num_sink_tokens
            metrics.block_budget.observe(state.block_budget_of(report.req_id))
            # Frozen layers report cut m (nothing pruned); the fixed baseline cuts them too.
            metrics.paper_budget.observe(paper_budget(report.cuts, n, m, frozen_layers=()))
            prompt_tokens += n
            kept_tokens += n - (np.asarray(report.cuts, dtype=np.int64) - m)
        if prompt_tokens:
            metrics.layer_tokens(prompt_tokens, kept_tokens.tolist())

    def _cap_cache_blocks(self) -> None:
        """Never publish blocks written after a request was pruned.

        ``KVCacheCoordinator.cache_blocks`` is the single funnel of prefix-cache publication
        (``allocate_slots``, the async scheduler, connectors). A capped request publishes at
        most its full prompt blocks, whose KV was computed over the whole prompt.
        """
        coordinator = self.kv_cache_manager.coordinator
        cache_blocks = coordinator.cache_blocks
        caps = self._refreekv_state.cache_caps

        def capped_cache_blocks(request: Request, num_computed_tokens: int) -> None:
            cap = caps.get(request.request_id)
            if cap is not None and num_computed_tokens > cap:
                num_computed_tokens = cap
            cache_blocks(request, num_computed_tokens)

        # Called per request and step: the wrapper is in place only while a request is capped
        # (_route_cache_blocks), so that unpruned serving pays nothing for it.
        self._refreekv_cache_blocks = (cache_blocks, capped_cache_blocks)

    def _route_cache_blocks(self) -> None:
        if self._refreekv_pool is None:
            return
        plain, capped = self._refreekv_cache_blocks
        self.kv_cache_manager.coordinator.cache_blocks = (
            capped if self._refreekv_state.cache_caps else plain)


    def _unprune_before_free(self) -> None:
        """A request that lets go of a block it shares must first withdraw its pruned layers
        from the block's count (``PagedBlockPool.unprune_released``); every path that frees a
        request's blocks (finish, abort, preemption) goes through ``KVCacheManager.free``."""
        manager = self.kv_cache_manager
        free = manager.free
        pool = self._refreekv_pool
        assert pool is not None
        state = self._refreekv_state

        def unpruned_free(request: Request) -> None:
            pruned = state.pruned(request.request_id)
            if pruned is not None:
                pool.unprune_released(pruned.released)
            free(request)
            if envs.REFREEKV_DEBUG_ACCOUNTING:
                pool.check_accounting()

        manager.free = unpruned_free

    def _cap_prefix_hits(self) -> None:
        """Shorten prefix-cache hits of requests that will be scored so that their observation
        window is computed (``core/prefix_hits.py``); other requests (short prompts included)
        keep vLLM's hits."""
        manager = self.kv_cache_manager
        get_computed_blocks = manager.get_computed_blocks
        block_size = self._refreekv_block_size

        def capped_get_computed_blocks(request: Request) -> Any:
            blocks, num_tokens, boundary = get_computed_blocks(request)
            settings = self._refreekv_settings(request)
            window = 0
            if (settings is not None and num_tokens > 0
                    and request.num_prompt_tokens >= self._refreekv_config.shortest_scored_prompt):
                window = settings.policy.window_rows(request.num_prompt_tokens)
            if not window or self._refreekv_state.no_prune_reason(request.request_id) is not None:
                return blocks, num_tokens, boundary
            capped = capped_hit_tokens(num_tokens, request.num_prompt_tokens, window, block_size)
            if capped == num_tokens:
                return blocks, num_tokens, boundary
            return trim_hit(blocks, capped, block_size), capped, min(boundary, capped)

        manager.get_computed_blocks = capped_get_computed_blocks


class RefreeKVScheduler(RefreeKVSchedulerMixin, Scheduler):
    pass


class RefreeKVAsyncScheduler(RefreeKVSchedulerMixin, AsyncScheduler):
    pass


def make_scheduler(*args: Any, **kwargs: Any) -> Scheduler:
    """``--scheduler-cls`` target. vLLM resolves the qualname and calls the result with the
    scheduler's constructor arguments (``EngineCore.__init__``), so a factory works where a
    class is expected."""
    vllm_config: VllmConfig = kwargs["vllm_config"] if "vllm_config" in kwargs else args[0]
    if vllm_config.scheduler_config.async_scheduling:
        return RefreeKVAsyncScheduler(*args, **kwargs)
    return RefreeKVScheduler(*args, **kwargs)
