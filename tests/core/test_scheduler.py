"""The RefreeKV schedulers, stepped by hand: vLLM's real Scheduler/AsyncScheduler, KVCacheManager
and BlockPool over per-layer pages; the worker is replaced by hand-built ModelRunnerOutputs
carrying cut reports."""

import pickle
from collections import deque
from collections.abc import Callable, Sequence

import pytest
from vllm.config import KVTransferConfig, ModelConfig, SpeculativeConfig, VllmConfig
from vllm.v1.core.sched.async_scheduler import AsyncScheduler
from vllm.v1.core.sched.output import SchedulerOutput
from vllm.v1.kv_cache_interface import (
    KVCacheConfig,
    KVCacheGroupSpec,
    KVCacheTensor,
    SlidingWindowSpec,
)
from vllm.v1.outputs import EMPTY_MODEL_RUNNER_OUTPUT, ModelRunnerOutput
from vllm.v1.request import Request, RequestStatus
from vllm.v1.structured_output import StructuredOutputManager

from refreekv_vllm.core.page_pool import NO_PAGE
from refreekv_vllm.core.scheduler import (
    RefreeKVAsyncScheduler,
    RefreeKVScheduler,
    make_scheduler,
)
from refreekv_vllm.outputs import PAGE_ROWS_ATTR, CutReport, attach_cut_reports, get_cut_reports
from tests.core.utils import (
    BLOCK_SIZE,
    MAX_MODEL_LEN,
    NUM_LAYERS,
    NUM_SINK_TOKENS,
    layer_name,
    layer_spec,
    make_request,
    make_vllm_config,
    paged_config,
    vllm_kv_cache_config,
)

NUM_BLOCKS = 50  # full blocks: 200 pages of 4 layers, page 0 reserved
NUM_PAGES = NUM_BLOCKS * NUM_LAYERS - 1
SAMPLED_TOKEN = 7
PROMPT = list(range(1000, 1040))  # 40 tokens: 10 blocks, 40 pages
# Layers 0-1 frozen; layer 2 frees blocks 1-4 ([4, 20)); layer 3 frees blocks 1-7 ([4, 32)).
CUTS = (4, 4, 21, 33)
GAPS = {2: range(1, 5), 3: range(1, 8)}
NUM_GAP_PAGES = 4 + 7


def engine_core_kwargs(vllm_config: VllmConfig, kv_cache_config: KVCacheConfig) -> dict:
    """The keyword arguments EngineCore.__init__ passes to the scheduler class."""
    vllm_config.cache_config.num_gpu_blocks = kv_cache_config.num_blocks
    return dict(
        vllm_config=vllm_config, kv_cache_config=kv_cache_config,
        structured_output_manager=StructuredOutputManager(vllm_config),
        include_finished_set=False, log_stats=True, block_size=BLOCK_SIZE,
        hash_block_size=BLOCK_SIZE)


@pytest.fixture
def new_scheduler(model_config_dir) -> Callable[..., RefreeKVScheduler]:
    def new(*, async_scheduling: bool = False, enable_prefix_caching: bool = True,
            num_blocks: int = NUM_BLOCKS, min_prompt_tokens: int = 0) -> RefreeKVScheduler:
        """``min_prompt_tokens`` 0: these prompts (at most MAX_MODEL_LEN tokens) all count as
        scored; the default's gate has its own test."""
        vllm_config = make_vllm_config(model_config_dir,
                                       enable_prefix_caching=enable_prefix_caching)
        vllm_config.additional_config = {"refreekv": {"min_prompt_tokens": min_prompt_tokens}}
        vllm_config.scheduler_config.async_scheduling = async_scheduling
        kv_cache_config = paged_config(vllm_config, num_blocks)
        return make_scheduler(**engine_core_kwargs(vllm_config, kv_cache_config))

    return new


def report(request: Request, cuts: Sequence[int] = CUTS) -> CutReport:
    return CutReport(request.request_id, request.num_prompt_tokens, NUM_SINK_TOKENS, tuple(cuts))


def schedule(scheduler: RefreeKVScheduler) -> tuple[SchedulerOutput, ModelRunnerOutput]:
    """schedule() plus what the worker would return for it (one token per finished prefill)."""
    scheduler_output = scheduler.schedule()
    req_ids = list(scheduler_output.num_scheduled_tokens)
    sampled = [[] if scheduler.requests[r].is_prefill_chunk else [SAMPLED_TOKEN] for r in req_ids]
    output = ModelRunnerOutput(
        req_ids=req_ids, req_id_to_index={r: i for i, r in enumerate(req_ids)},
        sampled_token_ids=sampled)
    return scheduler_output, output


def update(scheduler: RefreeKVScheduler, step: tuple[SchedulerOutput, ModelRunnerOutput],
           reports: Sequence[CutReport] = ()) -> None:
    scheduler_output, output = step
    attach_cut_reports(output, {r.req_id: r for r in reports})
    scheduler.update_from_output(scheduler_output, output)


def run_step(scheduler: RefreeKVScheduler, reports: Sequence[CutReport] = ()) -> None:
    update(scheduler, schedule(scheduler), reports)


def run_until_done(scheduler: RefreeKVScheduler) -> None:
    for _ in range(100):
        if not scheduler.has_requests():
            return
        run_step(scheduler)
    raise AssertionError("requests did not finish")


def free_pages(scheduler: RefreeKVScheduler) -> int:
    """Pages that are free or held only as prefix-cache entries (what vLLM may allocate)."""
    pool = scheduler.kv_cache_manager.block_pool
    return pool.page_pool.num_free_pages + NUM_LAYERS * len(pool._holding)


def assert_pool_idle(scheduler: RefreeKVScheduler) -> None:
    pool = scheduler.kv_cache_manager.block_pool
    usable = pool.page_pool.num_usable_pages
    assert free_pages(scheduler) == usable
    assert pool.get_num_free_blocks() == usable // NUM_LAYERS
    assert all(b.ref_cnt == 0 for b in pool.blocks if not b.is_null)
    pool.check_accounting()
    assert not pool._pruned_by
    assert scheduler._refreekv_state.num_tracked_requests() == 0


def row(scheduler: RefreeKVScheduler, request: Request) -> list:
    manager = scheduler.kv_cache_manager.coordinator.single_type_managers[0]
    return manager.req_to_blocks.get(request.request_id, [])


def pages(scheduler: RefreeKVScheduler, request: Request, layer: int) -> list[int]:
    pool = scheduler.kv_cache_manager.block_pool.page_pool
    return [int(pool.pages[b.block_id, layer]) for b in row(scheduler, request)]


# The worker -> scheduler payload.


def test_cut_reports_survive_the_multiprocessing_executor():
    output = ModelRunnerOutput(req_ids=["a"], req_id_to_index={"a": 0})
    reports = {"a": CutReport("a", 40, NUM_SINK_TOKENS, CUTS)}
    attach_cut_reports(output, reports)
    assert get_cut_reports(pickle.loads(pickle.dumps(output))) == reports
    assert get_cut_reports(ModelRunnerOutput(req_ids=[], req_id_to_index={})) == {}


def test_attaching_to_the_shared_empty_output_is_refused():
    with pytest.raises(ValueError, match="EMPTY_MODEL_RUNNER_OUTPUT"):
        attach_cut_reports(EMPTY_MODEL_RUNNER_OUTPUT, {"a": CutReport("a", 40, 4, CUTS)})
    assert get_cut_reports(EMPTY_MODEL_RUNNER_OUTPUT) == {}


@pytest.mark.parametrize(("num_prompt_tokens", "cuts", "ok"), [
    (40, (4, 39), True),
    (40, (3, 20), False),  # inside the sinks
    (40, (4, 40), False),  # drops the last prompt token
    (3, (4, 4), True),  # too short to prune: every layer reports num_sink_tokens
    (40, (), False),
])
def test_cut_report_validation(num_prompt_tokens, cuts, ok):
    if ok:
        CutReport("a", num_prompt_tokens, NUM_SINK_TOKENS, cuts)
    else:
        with pytest.raises(ValueError, match="CutReport"):
            CutReport("a", num_prompt_tokens, NUM_SINK_TOKENS, cuts)


# Construction.


def test_factory_works_where_vllm_expects_a_class(model_config_dir):
    for async_scheduling, expected in [(False, RefreeKVScheduler), (True, RefreeKVAsyncScheduler)]:
        vllm_config = make_vllm_config(model_config_dir)
        vllm_config.scheduler_config.async_scheduling = async_scheduling
        vllm_config.scheduler_config.scheduler_cls = "refreekv_vllm.core.scheduler.make_scheduler"

        scheduler_cls = vllm_config.scheduler_config.get_scheduler_cls()  # as EngineCore does
        scheduler = scheduler_cls(**engine_core_kwargs(
            vllm_config, paged_config(vllm_config, NUM_BLOCKS)))

        assert type(scheduler) is expected
        assert isinstance(scheduler, AsyncScheduler) == async_scheduling


def _speculative(c: VllmConfig) -> None:
    c.speculative_config = SpeculativeConfig(
        method="ngram", num_speculative_tokens=2, prompt_lookup_max=2, prompt_lookup_min=1,
        target_model_config=c.model_config, target_parallel_config=c.parallel_config)


def _kv_connector(c: VllmConfig) -> None:
    c.kv_transfer_config = KVTransferConfig(kv_connector="ExampleConnector", kv_role="kv_both")


@pytest.mark.parametrize(("mutate", "match"), [
    (_speculative, "--speculative-config"),
    (lambda c: setattr(c.parallel_config, "decode_context_parallel_size", 2),
     "--decode-context-parallel-size"),
    (_kv_connector, "--kv-transfer-config"),
    (lambda c: setattr(c.cache_config, "cache_dtype", "fp8"), "--kv-cache-dtype"),
    (lambda c: setattr(c.model_config, "disable_cascade_attn", False), "--disable-cascade-attn"),
], ids=["spec-decode", "dcp", "kv-connector", "fp8", "cascade"])
def test_unsupported_configs_are_refused(model_config_dir, mutate, match):
    vllm_config = make_vllm_config(model_config_dir)
    kv_cache_config = paged_config(vllm_config, NUM_BLOCKS)
    mutate(vllm_config)
    with pytest.raises(ValueError, match=match):
        make_scheduler(**engine_core_kwargs(vllm_config, kv_cache_config))


def test_mla_is_refused(model_config_dir, monkeypatch):
    vllm_config = make_vllm_config(model_config_dir)
    kv_cache_config = paged_config(vllm_config, NUM_BLOCKS)
    monkeypatch.setattr(ModelConfig, "use_mla", property(lambda self: True))
    with pytest.raises(ValueError, match="MLA"):
        make_scheduler(**engine_core_kwargs(vllm_config, kv_cache_config))


def _one_group(spec, num_layers: int = NUM_LAYERS) -> list[KVCacheGroupSpec]:
    return [KVCacheGroupSpec([layer_name(i) for i in range(num_layers)], spec)]


@pytest.mark.parametrize(("layout", "match"), [
    (lambda c: vllm_kv_cache_config(c, NUM_BLOCKS), "not laid out in per-layer pages"),
    (lambda c: KVCacheConfig(NUM_BLOCKS, [], _one_group(layer_spec()) * 2),
     "2 KV cache groups"),
    (lambda c: KVCacheConfig(NUM_BLOCKS, [], _one_group(SlidingWindowSpec(
        block_size=BLOCK_SIZE, num_kv_heads=2, head_size=8, dtype=layer_spec().dtype,
        sliding_window=8)) + _one_group(layer_spec())), "sliding-window or hybrid"),
    (lambda c: KVCacheConfig(NUM_BLOCKS, [KVCacheTensor(1024, [layer_name(0)])],
                             _one_group(layer_spec(), num_layers=1)), "per-layer pages"),
], ids=["vllm-layout", "two-groups", "sliding-window-model", "one-layer"])
def test_unsupported_kv_cache_layouts_are_refused(model_config_dir, layout, match):
    vllm_config = make_vllm_config(model_config_dir)
    with pytest.raises(ValueError, match=match):
        make_scheduler(**engine_core_kwargs(vllm_config, layout(vllm_config)))


# Releasing gap pages.


@pytest.mark.parametrize("enable_prefix_caching", [True, False])
def test_report_releases_gap_pages_and_finishing_balances_the_pool(
        new_scheduler, enable_prefix_caching):
    scheduler = new_scheduler(enable_prefix_caching=enable_prefix_caching)
    request = make_request(PROMPT, max_tokens=6)
    scheduler.add_request(request)
    step = schedule(scheduler)
    assert free_pages(scheduler) == NUM_PAGES - NUM_LAYERS * 10
    block_ids, rows = getattr(step[0], PAGE_ROWS_ATTR)  # what the workers mirror
    assert sorted(block_ids.tolist()) == sorted(b.block_id for b in row(scheduler, request))
    assert (rows > 0).all() and len(set(rows.ravel().tolist())) == rows.size

    update(scheduler, step, [report(request)])

    assert free_pages(scheduler) == NUM_PAGES - NUM_LAYERS * 10 + NUM_GAP_PAGES
    for layer in range(NUM_LAYERS):
        gap = GAPS.get(layer, range(0))
        assert [p == NO_PAGE for p in pages(scheduler, request, layer)] == [
            i in gap for i in range(10)]
    # The blocks themselves stay the request's: the other layers still use them.
    assert all(b.ref_cnt == 1 and not b.is_null for b in row(scheduler, request))
    stats = scheduler.refreekv_stats()
    page_size = scheduler.kv_cache_config.kv_cache_groups[0].kv_cache_spec.page_size_bytes
    assert (stats.requests_pruned, stats.blocks_released, stats.blocks_freed) == (
        1, NUM_GAP_PAGES, NUM_GAP_PAGES)
    assert stats.tokens_pruned == (21 - 4) + (33 - 4)
    assert stats.bytes_freed == NUM_GAP_PAGES * page_size
    assert stats.recent_block_budgets == pytest.approx(((40 + 40 + 24 + 12) / 160,))
    scheduler.kv_cache_manager.block_pool.check_accounting()

    run_until_done(scheduler)
    assert request.status == RequestStatus.FINISHED_LENGTH_CAPPED
    assert_pool_idle(scheduler)


@pytest.mark.parametrize("prunes", [True, False])
def test_freed_pages_admit_more_requests(new_scheduler, prunes):
    # 20 full blocks (79 pages): a second 10-block prompt fits beside the first one only once
    # the first gave back pages (layers 2-3 free blocks 1-8: 16 pages).
    scheduler = new_scheduler(num_blocks=20)
    first, second = make_request(PROMPT, max_tokens=4), make_request(PROMPT[::-1], max_tokens=4)
    scheduler.add_request(first)
    step = schedule(scheduler)
    scheduler.add_request(second)
    update(scheduler, step, [report(first, (4, 4, 37, 37) if prunes else (4,) * NUM_LAYERS)])
    scheduler_output, _ = schedule(scheduler)
    assert (second.request_id in scheduler_output.num_scheduled_tokens) == prunes
    if prunes:
        assert scheduler.kv_cache_manager.block_pool.get_usage() == pytest.approx(
            (40 - 16 + 4 + 40) / 79)


def test_request_finishing_in_its_reporting_step(new_scheduler):
    scheduler = new_scheduler()
    request = make_request(PROMPT, max_tokens=1)
    scheduler.add_request(request)

    run_step(scheduler, [report(request)])

    assert request.is_finished()
    assert scheduler.refreekv_stats().blocks_released == NUM_GAP_PAGES
    assert_pool_idle(scheduler)


def test_pruned_blocks_stop_being_prefix_hits(new_scheduler):
    scheduler = new_scheduler()
    first = make_request(PROMPT)
    second = make_request(PROMPT, extra_args={"refreekv_enabled": False})
    scheduler.add_request(first)
    run_step(scheduler, [report(first)])

    scheduler.add_request(second)
    scheduler_output, _ = schedule(scheduler)

    # Block 0 (sinks) is whole in every layer; block 1 lost pages, so the hit ends there.
    assert scheduler_output.num_scheduled_tokens[second.request_id] == 40 - 4
    assert all(NO_PAGE not in pages(scheduler, second, layer) for layer in range(NUM_LAYERS))


def test_shared_blocks_keep_their_pages_until_every_holder_pruned(new_scheduler):
    scheduler = new_scheduler()
    first = make_request(PROMPT, max_tokens=4)
    second = make_request(PROMPT, max_tokens=4, extra_args={"refreekv_window": 4})
    scheduler.add_request(first)
    run_step(scheduler)  # first's prompt is cached; second hits 36 of its 40 tokens
    scheduler.add_request(second)
    run_step(scheduler, [report(first)])
    shared = row(scheduler, first)[1:8]
    assert all(b.ref_cnt == 2 for b in shared) and row(scheduler, second)[1:8] == shared
    assert scheduler.refreekv_stats().blocks_freed == 0  # second still reads every layer

    run_step(scheduler, [report(second, (4, 4, 21, 4))])  # second prunes layer 2 only
    pool = scheduler.kv_cache_manager.block_pool.page_pool
    assert all(pool.pages[b.block_id, 2] == NO_PAGE for b in shared[:4])
    assert all(pool.pages[b.block_id, 3] != NO_PAGE for b in shared)

    scheduler.finish_requests(second.request_id, RequestStatus.FINISHED_ABORTED)
    # Only first holds them now, and it pruned layer 3 of blocks 1-7.
    assert all(pool.pages[b.block_id, 3] == NO_PAGE for b in shared)
    run_until_done(scheduler)
    assert_pool_idle(scheduler)


@pytest.mark.parametrize("min_prompt_tokens, scheduled", [
    (0, 40 - 28),  # the window is prompt positions [30, 40): the hit ends at block boundary 28
    (len(PROMPT) + 1, 4),  # never scored: vLLM's hit, every full block but the last token's
], ids=["scored", "short-prompt"])
def test_prefix_hits_stop_before_the_observation_window(new_scheduler, min_prompt_tokens,
                                                        scheduled):
    scheduler = new_scheduler(min_prompt_tokens=min_prompt_tokens)
    first = make_request(PROMPT, extra_args={"refreekv_enabled": False})
    second = make_request(PROMPT, extra_args={"refreekv_window": 10})
    scheduler.add_request(first)
    run_step(scheduler)

    scheduler.add_request(second)
    scheduler_output, _ = schedule(scheduler)

    assert scheduler_output.num_scheduled_tokens[second.request_id] == scheduled


def test_reports_for_gone_or_reported_requests_are_skipped(new_scheduler):
    scheduler = new_scheduler()
    aborted, pruned = make_request(PROMPT), make_request(PROMPT[::-1])
    scheduler.add_request(aborted)
    scheduler.add_request(pruned)
    step = schedule(scheduler)
    scheduler.finish_requests(aborted.request_id, RequestStatus.FINISHED_ABORTED)
    update(scheduler, step, [report(aborted), report(pruned)])
    free_after_first_report = free_pages(scheduler)

    run_step(scheduler, [report(pruned)])  # a second report for the same life

    stats = scheduler.refreekv_stats()
    assert stats.requests_pruned == 1
    assert stats.requests_skipped == {"not_running": 1, "already_reported": 1}
    assert free_pages(scheduler) == free_after_first_report - NUM_LAYERS  # one decode block
    run_until_done(scheduler)
    assert_pool_idle(scheduler)


def test_report_without_a_whole_gap_block(new_scheduler):
    scheduler = new_scheduler()
    request = make_request(PROMPT)
    scheduler.add_request(request)
    step = schedule(scheduler)
    free_before = free_pages(scheduler)

    update(scheduler, step, [report(request, cuts=(4, 4, 7, 4))])  # gap [4, 7) < one block

    assert free_pages(scheduler) == free_before
    assert scheduler.refreekv_stats().requests_skipped == {"no_gap": 1}
    assert scheduler.refreekv_stats().recent_block_budgets == (1.0,)


def test_report_with_the_wrong_number_of_layers(new_scheduler):
    scheduler = new_scheduler()
    request = make_request(PROMPT)
    scheduler.add_request(request)
    step = schedule(scheduler)
    with pytest.raises(ValueError, match="has 3 layers"):
        update(scheduler, step, [report(request, cuts=CUTS[:3])])


@pytest.mark.parametrize("extra_args", [
    {"refreekv_enabled": False}, {"refreekv_threshold": 0.0}, {"refreekv_enabled": "maybe"},
], ids=["disabled", "threshold-0", "invalid"])
def test_opted_out_requests_are_not_pruned(new_scheduler, extra_args):
    scheduler = new_scheduler()
    request = make_request(PROMPT, extra_args=extra_args)
    scheduler.add_request(request)
    step = schedule(scheduler)
    free_before = free_pages(scheduler)

    update(scheduler, step, [report(request)])

    assert free_pages(scheduler) == free_before
    assert scheduler.refreekv_stats().requests_skipped == {"opted_out": 1}
    run_until_done(scheduler)
    assert_pool_idle(scheduler)


def test_prompts_under_the_minimum_are_counted_as_short(new_scheduler):
    """A prompt shorter than min_prompt_tokens is counted once as skipped ``short_prompt``
    when its request ends (the worker never scores it); one at the minimum is not."""
    scheduler = new_scheduler(min_prompt_tokens=len(PROMPT) + 1)
    scheduler.add_request(make_request(PROMPT))
    scheduler.add_request(make_request(PROMPT + [7]))
    assert scheduler.refreekv_stats().requests_skipped == {}
    run_until_done(scheduler)
    assert scheduler.refreekv_stats().requests_skipped == {"short_prompt": 1}
    assert scheduler.refreekv_stats().requests_pruned == 0
    assert_pool_idle(scheduler)


def test_a_streaming_session_is_short_only_if_its_final_prompt_is(new_scheduler):
    """A streaming-input session whose first chunk is short but whose update makes the prompt
    long enough is not counted as ``short_prompt`` (the worker may score its longer prefill);
    one whose chunks stay short is counted once, when it ends."""
    scheduler = new_scheduler(min_prompt_tokens=len(PROMPT))

    def chunk(req_id: str, tokens: list[int], resumable: bool = True) -> Request:
        request = make_request(tokens, max_tokens=2)
        request.request_id, request.resumable = req_id, resumable
        return request

    half = len(PROMPT) // 2
    for req_id, update in (("grows", PROMPT[half:]), ("stays-short", PROMPT[:2])):
        scheduler.add_request(chunk(req_id, PROMPT[:half]))
        scheduler.add_request(chunk(req_id, list(update)))
        scheduler.add_request(chunk(req_id, [1], resumable=False))  # the session's end
        run_until_done(scheduler)
        assert req_id not in scheduler.requests
    assert scheduler.refreekv_stats().requests_skipped == {"short_prompt": 1}
    assert_pool_idle(scheduler)


def test_prompts_of_sinks_and_one_token_are_short_even_without_a_minimum(new_scheduler):
    """With min_prompt_tokens 0 the floor is the sinks plus two tokens, as in the worker's
    step plan: m + 1 tokens leave nothing to cut."""
    scheduler = new_scheduler(min_prompt_tokens=0)
    sinks = scheduler._refreekv_config.num_sink_tokens
    scheduler.add_request(make_request(PROMPT[:sinks + 1]))
    scheduler.add_request(make_request(PROMPT[:sinks + 2]))
    run_until_done(scheduler)
    assert scheduler.refreekv_stats().requests_skipped == {"short_prompt": 1}
    assert_pool_idle(scheduler)


def test_a_minimum_no_prompt_can_reach_is_warned_about(new_scheduler, caplog):
    def ours() -> list[str]:
        return [r.getMessage() for r in caplog.records if r.name == "refreekv_vllm.core.scheduler"]

    with caplog.at_level("WARNING", logger="refreekv_vllm.core.scheduler"):
        new_scheduler(min_prompt_tokens=MAX_MODEL_LEN - 1)
        assert not ours()
        new_scheduler(min_prompt_tokens=MAX_MODEL_LEN)
    (message,) = ours()
    assert "no prompt will be scored or pruned" in message


def test_server_wide_disable_is_plain_vllm(model_config_dir):
    vllm_config = make_vllm_config(model_config_dir)
    vllm_config.additional_config = {"refreekv": {"enabled": False}}
    # vLLM's own layout: the engine core pages only engines that prune.
    scheduler = make_scheduler(**engine_core_kwargs(
        vllm_config, vllm_kv_cache_config(vllm_config, NUM_BLOCKS)))
    assert type(scheduler.kv_cache_manager.block_pool).__name__ == "BlockPool"
    request = make_request(PROMPT)
    scheduler.add_request(request)
    step = schedule(scheduler)
    assert not hasattr(step[0], PAGE_ROWS_ATTR)
    update(scheduler, step, [report(request)])
    assert scheduler.refreekv_stats().requests_skipped == {"opted_out": 1}


# Preemption.


def test_preempted_pruned_request_is_not_pruned_again(new_scheduler):
    scheduler = new_scheduler()
    request = make_request(PROMPT, max_tokens=8)
    scheduler.add_request(request)
    run_step(scheduler, [report(request)])
    run_step(scheduler)

    # Preempts every running request through Scheduler._preempt_request.
    assert scheduler.reset_prefix_cache(reset_running_requests=True)
    assert request.status == RequestStatus.PREEMPTED
    assert free_pages(scheduler) == NUM_PAGES

    step = schedule(scheduler)  # resumed: prompt and outputs recomputed with full KV
    assert all(NO_PAGE not in pages(scheduler, request, layer) for layer in range(NUM_LAYERS))
    free_before = free_pages(scheduler)
    update(scheduler, step, [report(request)])

    assert free_pages(scheduler) == free_before
    stats = scheduler.refreekv_stats()
    assert (stats.requests_pruned, stats.requests_skipped) == (1, {"preempted": 1})
    run_until_done(scheduler)
    assert_pool_idle(scheduler)


def test_pruned_request_preempted_for_lack_of_blocks(new_scheduler):
    # Room for both prompts (19 blocks) but not for both first decode blocks.
    scheduler = new_scheduler(num_blocks=20)
    other, pruned = make_request(PROMPT[4:], max_tokens=8), make_request(PROMPT, max_tokens=8)
    scheduler.add_request(other)
    scheduler.add_request(pruned)
    one_block_gap = (4, 4, 4, 8)
    run_step(scheduler, [report(pruned, one_block_gap)])
    assert scheduler.refreekv_stats().blocks_released == 1

    run_step(scheduler)  # `other` takes the last free blocks, `pruned` (newest) is preempted

    assert pruned.status == RequestStatus.PREEMPTED and pruned.num_preemptions == 1
    for _ in range(100):
        if not scheduler.has_requests():
            break
        was_waiting = pruned.status == RequestStatus.PREEMPTED
        step = schedule(scheduler)
        if was_waiting and pruned.status == RequestStatus.RUNNING:  # resumed in this step
            assert all(NO_PAGE not in pages(scheduler, pruned, layer)
                       for layer in range(NUM_LAYERS))
            update(scheduler, step, [report(pruned, one_block_gap)])
        else:
            update(scheduler, step)
    stats = scheduler.refreekv_stats()
    assert (stats.requests_pruned, stats.requests_skipped) == (1, {"preempted": 1})
    assert_pool_idle(scheduler)


# Prefix-cache publication.

PROMPT_22 = list(range(2000, 2022))  # 5 full prompt blocks; block 5 is completed by decode
CUTS_22 = (4, 4, 12, 16)


def hashed_indices(scheduler: RefreeKVScheduler, request: Request) -> list[int]:
    return [i for i, b in enumerate(row(scheduler, request)) if b.block_hash is not None]


@pytest.mark.parametrize("prunes", [True, False], ids=["pruned", "kept-all"])
def test_decode_blocks_of_a_pruned_request_are_never_published(new_scheduler, prunes):
    scheduler = new_scheduler()
    request = make_request(PROMPT_22, max_tokens=13)  # blocks 5-7 get full of decode tokens
    scheduler.add_request(request)
    run_step(scheduler, [report(request, CUTS_22 if prunes else (4,) * NUM_LAYERS)])
    for _ in range(11):
        run_step(scheduler)
    assert request.num_computed_tokens == 33 and not request.is_finished()

    if prunes:  # blocks 1-3 lost pages (layers 2-3), blocks 5-7 hold pruned-context KV
        assert hashed_indices(scheduler, request) == [0, 4]
    else:
        assert hashed_indices(scheduler, request) == list(range(8))


def test_async_scheduler_never_publishes_decode_blocks_of_a_pruned_request(new_scheduler):
    scheduler = new_scheduler(async_scheduling=True)
    request = make_request(PROMPT_22, max_tokens=13)
    scheduler.add_request(request)

    # EngineCore.step_with_batch_queue order: schedule(t+1) runs before update_from_output(t).
    in_flight = deque([schedule(scheduler)])
    reports = [report(request, CUTS_22)]
    while in_flight:
        if scheduler.get_num_unfinished_requests():
            in_flight.append(schedule(scheduler))
        update(scheduler, in_flight.popleft(), reports)
        reports = []
        assert all(i < 5 for i in hashed_indices(scheduler, request))
        if request.num_computed_tokens == 33:
            assert hashed_indices(scheduler, request) == [0, 4]

    assert request.is_finished()
    assert scheduler.refreekv_stats().requests_pruned == 1
    assert_pool_idle(scheduler)
