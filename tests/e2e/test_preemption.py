"""A pruned request preempted for lack of KV blocks, inside the real vLLM engine (CPU backend).

vLLM preempts by freeing all of a request's blocks and later recomputing its prompt and the
tokens it generated so far in one prefill. ReFreeKV then keeps that request's KV in full for
the rest of its life (``CutState.on_preempted``): the tokens generated before preemption had
their KV computed by attention that skipped the gaps, and a recompute prefill cannot reproduce
that (it would need a different key set per query inside one prefill). So the output of a
preempted pruned request is exactly: the pruned run's tokens up to the preemption, then what
the model gives with the full cache from there on. This test checks both halves token for
token and the pool's accounting afterwards.
"""

import pytest

from benchmarks.soak.run_soak import SMOLLM2_FP32_TOKEN_BYTES
from refreekv_vllm.workloads import passkey_prompt
from tests.e2e.engines import free_blocks, in_process_engine, scheduler_of

pytestmark = pytest.mark.e2e

BLOCK_SIZE = 32
POOL_BLOCKS = 40
POOL_BYTES = POOL_BLOCKS * BLOCK_SIZE * SMOLLM2_FP32_TOKEN_BYTES
PRUNED_MAX_TOKENS = 300


def greedy(max_tokens: int, **xargs):
    from vllm import SamplingParams

    return SamplingParams(temperature=0.0, max_tokens=max_tokens, ignore_eos=True,
                          extra_args=xargs or None)


@pytest.fixture(scope="module")
def small_pool_llm(smollm2_dir):
    with pytest.MonkeyPatch.context() as env:
        env.setenv("REFREEKV_DEBUG_ACCOUNTING", "1")
        with in_process_engine(smollm2_dir, refreekv={}, max_model_len=1024,
                               kv_cache_memory_bytes=POOL_BYTES,
                               async_scheduling=False) as llm:
            yield llm


def run_until_done(llm, requests: dict[str, tuple[object, object]], watch: str
                   ) -> tuple[dict[str, list[int]], int | None]:
    """Steps the engine over ``requests`` (id -> (prompt, params)), added in order; returns
    every request's tokens and how many tokens ``watch`` had when it was first preempted."""
    from vllm.v1.request import RequestStatus

    engine = llm.llm_engine
    for req_id, (prompt, params) in requests.items():
        engine.add_request(req_id, prompt, params)
    scheduler = scheduler_of(llm)
    tokens: dict[str, list[int]] = {}
    preempted_after = None
    while engine.has_unfinished_requests():
        for output in engine.step():
            if output.finished:
                tokens[output.request_id] = list(output.outputs[0].token_ids)
        watched = [r for rid, r in scheduler.requests.items() if rid.startswith(watch)]
        if (preempted_after is None and watched
                and watched[0].status == RequestStatus.PREEMPTED):
            preempted_after = watched[0].num_output_tokens
    return tokens, preempted_after


def test_preempted_pruned_request_resumes_with_full_kv(small_pool_llm):
    llm = small_pool_llm
    start = free_blocks(llm)
    pruned_prompt = passkey_prompt(12, 0.4, 52817)
    # Alone, the pruned request never runs short of blocks.
    alone, preempted = run_until_done(
        llm, {"alone": (pruned_prompt, greedy(PRUNED_MAX_TOKENS))}, watch="alone")
    assert preempted is None
    assert scheduler_of(llm).refreekv_stats().requests_pruned == 1

    # An opted-out request that arrived first grows until the pool is short: vLLM preempts
    # the request that arrived last, the pruned one.
    both, preempted = run_until_done(llm, {
        "grower": (passkey_prompt(20, 0.5, 40213), greedy(440, refreekv_enabled=False)),
        "pruned": (pruned_prompt, greedy(PRUNED_MAX_TOKENS)),
    }, watch="pruned")
    assert scheduler_of(llm).refreekv_stats().requests_pruned == 2
    assert preempted is not None and 0 < preempted < PRUNED_MAX_TOKENS, preempted
    assert both["pruned"][:preempted] == alone["alone"][:preempted]

    # From the preemption on: what the full cache gives after prompt + the tokens so far.
    prompt_ids = llm.get_tokenizer()(pruned_prompt).input_ids
    resumed, _ = run_until_done(llm, {"full_cache": (
        {"prompt_token_ids": prompt_ids + both["pruned"][:preempted]},
        greedy(PRUNED_MAX_TOKENS - preempted, refreekv_enabled=False))}, watch="full_cache")
    assert both["pruned"][preempted:] == resumed["full_cache"]

    assert free_blocks(llm) == start
    assert scheduler_of(llm).kv_cache_manager.block_pool.check_accounting() is None
    assert scheduler_of(llm)._refreekv_state.num_tracked_requests() == 0
