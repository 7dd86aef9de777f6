"""Pipeline parallelism (``pipeline_parallel_size=2``) on the CPU backend: each stage holds half
of the layers and their pages; it scores and prunes its own layers, the last stage reports a
request once both stages' cuts reached it, and the scheduler releases every stage's pages into
that stage's own pool.

The tiny Llama has 4 layers: stage 0 holds layers 0-1 (frozen by default, but the fixed budget
prunes them too), stage 1 layers 2-3. Pruned decoding reads the kept pages of both stages, so
its log-probs match a single-stage engine's only if both stages map every block to the right
pages; the fixed budget's log-probs differ from the unpruned ones, so a wrong page would show.
"""

import pytest

from benchmarks.integration.engine_run import cuts_per_rank
from refreekv_vllm.policy.budget import freeable_block_range
from refreekv_vllm.workloads import passkey_prompt
from tests.e2e.engines import (
    ENGINE_DEFAULTS,
    abort_once_pruned,
    free_blocks,
    in_process_engine,
    parallel_engine,
    plain_logprobs,
    scheduler_of,
    tokens_and_logprobs,
    with_logprobs,
)
from tests.e2e.test_engine_pruning import greedy

pytestmark = pytest.mark.e2e

NUM_LAYERS, SINKS = 4, 4
PROMPTS = [passkey_prompt(40 + 15 * i, 0.3 + 0.1 * i, 52000 + i) for i in range(4)]
FIXED = {"refreekv_policy": "fixed", "refreekv_budget": 0.5}


def _run(llm) -> dict:
    """What the tests compare between engines: log-probs unpruned, with the fixed budget and at
    the default rule, the default rule's cuts, and the pages the fixed budget released."""
    before = scheduler_of(llm).refreekv_stats().blocks_released
    fixed = llm.generate(PROMPTS, with_logprobs(**FIXED))
    released = scheduler_of(llm).refreekv_stats().blocks_released - before
    default = llm.generate(PROMPTS, with_logprobs())
    *_, last_stage = cuts_per_rank(llm, default)
    return {"t0": tokens_and_logprobs(llm.generate(PROMPTS,
                                                   with_logprobs(refreekv_threshold=0.0))),
            "fixed": tokens_and_logprobs(fixed), "fixed_released": released,
            "fixed_cuts": cuts_per_rank(llm, fixed)[-1],
            "default": tokens_and_logprobs(default), "default_cuts": last_stage}


@pytest.fixture(scope="module")
def plain_pp2(tiny_llama_dir):
    return plain_logprobs(tiny_llama_dir, PROMPTS, pipeline_parallel_size=2)


@pytest.fixture(scope="module")
def one_stage(tiny_llama_dir, plain_pp2):
    # One in-process engine at a time: plain PP = 2 is gone, the PP = 2 plugin comes after.
    with in_process_engine(tiny_llama_dir, refreekv={}) as llm:
        return _run(llm)


@pytest.fixture(scope="module")
def refreekv_pp2(tiny_llama_dir, one_stage):
    with parallel_engine(tiny_llama_dir, refreekv={}, debug_accounting=True,
                         pipeline_parallel_size=2) as llm:
        start = free_blocks(llm)
        yield llm, _run(llm), start


def test_every_stage_is_paged_in_the_scheduler(refreekv_pp2):
    llm, _, _ = refreekv_pp2
    pool = scheduler_of(llm).kv_cache_manager.block_pool.page_pool
    assert pool.stage_layers.tolist() == [2, 2]
    assert pool.num_layers == NUM_LAYERS


def test_threshold_zero_matches_plain_vllm_with_the_same_parallelism(refreekv_pp2, plain_pp2):
    _, run, _ = refreekv_pp2
    assert run["t0"] == plain_pp2


def logprob_gap(a: list, b: list) -> float:
    """Largest log-prob difference of two runs that sampled the same tokens."""
    assert [[t for t, _ in seq] for seq in a] == [[t for t, _ in seq] for seq in b]
    return max(abs(x - y) for sa, sb in zip(a, b, strict=True)
               for (_, x), (_, y) in zip(sa, sb, strict=True))


def test_pruned_decoding_matches_one_stage(refreekv_pp2, one_stage):
    _, run, _ = refreekv_pp2
    # Pruning moves the log-probs by ~1e-3; batches differ between the engines (a pipeline
    # schedules around its stages), so float32 sums may differ in their last bits.
    assert logprob_gap(one_stage["fixed"], one_stage["t0"]) > 1e-3
    assert logprob_gap(run["fixed"], one_stage["fixed"]) < 1e-5
    assert logprob_gap(run["default"], one_stage["default"]) < 1e-5
    # Both stages' cuts reach the scheduler: the same cuts, the same pages released.
    assert run["default_cuts"] == one_stage["default_cuts"]
    assert set(run["default_cuts"]) == set(range(len(PROMPTS)))
    assert run["fixed_cuts"] == one_stage["fixed_cuts"]
    assert run["fixed_released"] == one_stage["fixed_released"]
    # The fixed budget cuts every layer alike, the first stage's included.
    expected = sum(NUM_LAYERS * len(freeable_block_range(cuts[0], SINKS,
                                                          ENGINE_DEFAULTS["block_size"]))
                   for cuts in run["fixed_cuts"].values())
    assert run["fixed_released"] == expected > 0


def test_only_the_last_stage_reports(refreekv_pp2):
    llm, _, _ = refreekv_pp2
    first_stage, last_stage = llm.collective_rpc("refreekv_request_records")
    assert not first_stage and last_stage
    assert all(len(record["cuts"]) == NUM_LAYERS for record in last_stage)


def test_mixed_policies_in_one_batch_and_aborts_balance_the_pool(refreekv_pp2):
    llm, _, start = refreekv_pp2
    assert free_blocks(llm) == start
    prompts = [passkey_prompt(60 + 10 * i, 0.5, 43000 + i) for i in range(4)]
    settings = [{"refreekv_enabled": False}, FIXED,
                {"refreekv_window": 1, "refreekv_threshold": 0.01},  # the paper's rule
                {}]
    outputs = llm.generate(prompts, [greedy(max_tokens=4, **xargs) for xargs in settings])
    *_, cuts = cuts_per_rank(llm, outputs)
    assert set(cuts) == {1, 2, 3}  # the opted-out prompt is never scored
    n = len(outputs[1].prompt_token_ids)
    assert set(cuts[1]) == {SINKS + n - round(0.5 * n)}  # the fixed budget, every layer
    assert free_blocks(llm) == start

    abort_once_pruned(llm, [passkey_prompt(50 + 10 * i, 0.4, 7200 + i) for i in range(3)],
                      greedy(max_tokens=64, **FIXED))
    assert free_blocks(llm) == start
    assert scheduler_of(llm)._refreekv_state.num_tracked_requests() == 0
