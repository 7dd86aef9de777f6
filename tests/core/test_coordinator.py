"""The per-layer coordinator shortcuts change how fast the scheduler answers, never what: the
same workload (prefix hits, chunked prefill, pruning reports, preemption, an abort) produces the
same schedules, block ids and pool counts with and without them."""

import random

import pytest
from vllm.v1.request import RequestStatus

from refreekv_vllm.core.coordinator import PerLayerShortcuts, adopt
from refreekv_vllm.core.scheduler import make_scheduler
from refreekv_vllm.outputs import CutReport
from tests.core.test_scheduler import engine_core_kwargs, num_free, schedule, update
from tests.core.utils import (
    BLOCK_SIZE,
    NUM_LAYERS,
    NUM_SINK_TOKENS,
    make_request,
    make_vllm_config,
    per_layer_kv_cache_config,
)


def build(tiny_llama_dir, async_scheduling: bool, enable_prefix_caching: bool = True,
          num_blocks: int = 110):
    vllm_config = make_vllm_config(tiny_llama_dir, max_num_batched_tokens=64,
                                   enable_prefix_caching=enable_prefix_caching)
    vllm_config.scheduler_config.async_scheduling = async_scheduling
    kv_cache_config = per_layer_kv_cache_config(vllm_config, num_blocks=num_blocks)
    return make_scheduler(**engine_core_kwargs(vllm_config, kv_cache_config))


def run_workload(scheduler) -> list:
    """Steps a fixed mixed workload; returns what every step did, with request ids replaced by
    their submission index so that two runs compare."""
    rng = random.Random(0)
    shared = [rng.randrange(100, 5000) for _ in range(48)]
    prompts = [shared + [rng.randrange(100, 5000) for _ in range(rng.randrange(5, 40))]
               for _ in range(5)] + [[rng.randrange(100, 5000) for _ in range(70)]]
    requests = [make_request(p, max_tokens=rng.randrange(8, 30)) for p in prompts]
    index = {r.request_id: i for i, r in enumerate(requests)}
    reported: set[str] = set()
    trace = []
    for step in range(400):
        if step < len(requests):
            scheduler.add_request(requests[step])
        if step == 12:
            scheduler.finish_requests(requests[2].request_id, RequestStatus.FINISHED_ABORTED)
        if not scheduler.has_requests():
            break
        scheduler_output, output = schedule(scheduler)
        reports = []
        for req_id in scheduler_output.num_scheduled_tokens:
            request = scheduler.requests[req_id]
            if (req_id not in reported and request.num_preemptions == 0
                    and request.num_computed_tokens >= request.num_prompt_tokens):
                m = request.num_prompt_tokens
                reported.add(req_id)
                reports.append(CutReport(req_id, m, NUM_SINK_TOKENS,
                                         (4, 4, m // 2, (3 * m) // 4)))
        new_ids = {index[r.req_id]: r.block_ids for r in scheduler_output.scheduled_new_reqs}
        cached = scheduler_output.scheduled_cached_reqs
        grown = {index[r]: ids for r, ids in zip(cached.req_ids, cached.new_block_ids,
                                                 strict=True) if ids is not None}
        update(scheduler, (scheduler_output, output), reports)
        trace.append((
            sorted((index[r], n) for r, n in scheduler_output.num_scheduled_tokens.items()),
            new_ids, grown, sorted(index[r] for r in scheduler_output.preempted_req_ids or ()),
            num_free(scheduler)))
    assert not scheduler.has_requests(), "workload did not finish"
    assert any(t[3] for t in trace), "the workload should preempt at least once"
    return trace


# Pool sizes at which the workload preempts (without prefix caching nothing is shared).
@pytest.mark.parametrize(("async_scheduling", "enable_prefix_caching", "num_blocks"),
                         [(False, True, 110), (True, True, 110), (False, False, 130)])
def test_shortcuts_schedule_exactly_like_the_per_group_path(
        tiny_llama_dir, monkeypatch, async_scheduling, enable_prefix_caching, num_blocks):
    monkeypatch.setenv("REFREEKV_DEBUG_ACCOUNTING", "1")  # check groups agree on every shortcut
    with_shortcuts = build(tiny_llama_dir, async_scheduling, enable_prefix_caching, num_blocks)
    coordinator = with_shortcuts.kv_cache_manager.coordinator
    assert isinstance(coordinator.allocate_new_blocks.__self__, PerLayerShortcuts)
    fast = run_workload(with_shortcuts)

    monkeypatch.setattr("refreekv_vllm.core.scheduler.adopt_coordinator", lambda c: False)
    stock = build(tiny_llama_dir, async_scheduling, enable_prefix_caching, num_blocks)
    assert "allocate_new_blocks" not in vars(stock.kv_cache_manager.coordinator)
    assert run_workload(stock) == fast
    pool = with_shortcuts.kv_cache_manager.block_pool
    assert pool.get_num_free_blocks() == pool.num_gpu_blocks - 1


def test_shortcuts_stay_off_when_groups_differ(tiny_llama_dir, monkeypatch):
    monkeypatch.setattr("refreekv_vllm.core.scheduler.adopt_coordinator", lambda c: False)
    coordinator = build(tiny_llama_dir, async_scheduling=False).kv_cache_manager.coordinator
    managers = coordinator.single_type_managers
    assert len(managers) == NUM_LAYERS
    managers[1].block_size = 2 * BLOCK_SIZE
    assert not adopt(coordinator)
    assert "allocate_new_blocks" not in vars(coordinator)
    managers[1].block_size = BLOCK_SIZE
    assert adopt(coordinator)  # the block size alone made the difference
