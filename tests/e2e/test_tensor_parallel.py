"""Tensor parallelism (``tensor_parallel_size=2``) on the CPU backend: each rank holds half of the
heads; the ranks sum their heads' part of the rule and apply the same cuts, the cuts that one
rank with all heads computes.

The tiny Llama (4 query heads, 2 KV heads) splits over two ranks; its random weights make its
greedy tokens say little, so exactness at T = 0 is checked on the sampled tokens' log-probs."""

import pytest

from benchmarks.integration.engine_run import cuts_per_rank
from refreekv_vllm.workloads import mixed_prompts, passkey_prompt
from tests.e2e.engines import (
    abort_once_pruned,
    free_blocks,
    in_process_engine,
    parallel_engine,
    plain_logprobs,
    tokens_and_logprobs,
    with_logprobs,
)
from tests.e2e.test_engine_pruning import greedy

pytestmark = pytest.mark.e2e

PROMPTS = mixed_prompts(6, seed=5)
# Every prompt scored, the short ones too, so that each one's cuts are compared.
REFREEKV = {"min_prompt_tokens": 0}


@pytest.fixture(scope="module")
def plain_tp2(tiny_llama_dir):
    return plain_logprobs(tiny_llama_dir, PROMPTS, tensor_parallel_size=2)


@pytest.fixture(scope="module")
def tp1_cuts(tiny_llama_dir, plain_tp2):
    # One in-process engine at a time: plain TP = 2 is gone, the TP = 2 plugin comes after.
    with in_process_engine(tiny_llama_dir, refreekv=REFREEKV) as llm:
        (cuts,) = cuts_per_rank(llm, llm.generate(PROMPTS, greedy(max_tokens=2)))
        return cuts


@pytest.fixture(scope="module")
def refreekv_tp2(tiny_llama_dir, tp1_cuts):
    with parallel_engine(tiny_llama_dir, refreekv=REFREEKV, debug_accounting=True,
                         tensor_parallel_size=2) as llm:
        yield llm


def test_threshold_zero_matches_plain_vllm_with_the_same_parallelism(refreekv_tp2, plain_tp2):
    start = free_blocks(refreekv_tp2)
    outputs = refreekv_tp2.generate(PROMPTS, with_logprobs(refreekv_threshold=0.0))
    assert tokens_and_logprobs(outputs) == plain_tp2
    assert free_blocks(refreekv_tp2) == start


def test_both_ranks_apply_the_cuts_of_one_rank_with_every_head(refreekv_tp2, tp1_cuts):
    start = free_blocks(refreekv_tp2)
    outputs = refreekv_tp2.generate(PROMPTS, greedy(max_tokens=2))
    rank0, rank1 = cuts_per_rank(refreekv_tp2, outputs)
    assert rank0 == rank1
    assert set(rank0) == set(tp1_cuts) == set(range(len(PROMPTS)))
    pairs = [(a, b) for i in tp1_cuts for a, b in zip(rank0[i], tp1_cuts[i], strict=True)]
    differing = sum(a != b for a, b in pairs)
    # The ranks' model forward sums partial products in another order than one rank does, so a
    # cut right at the threshold may move; on these prompts none did.
    assert differing <= len(pairs) // 10, f"{differing} of {len(pairs)} layer cuts differ"
    assert any(cut > 4 for cuts in rank0.values() for cut in cuts), "nothing was cut"
    assert free_blocks(refreekv_tp2) == start


def test_mixed_policies_in_one_batch_and_aborts_balance_the_pool(refreekv_tp2):
    start = free_blocks(refreekv_tp2)
    prompts = [passkey_prompt(60 + 10 * i, 0.5, 42000 + i) for i in range(4)]
    settings = [{"refreekv_enabled": False},
                {"refreekv_policy": "fixed", "refreekv_budget": 0.5},
                {"refreekv_window": 1, "refreekv_threshold": 0.01},  # the paper's rule
                {}]
    outputs = refreekv_tp2.generate(prompts, [greedy(max_tokens=4, **xargs)
                                              for xargs in settings])
    rank0, rank1 = cuts_per_rank(refreekv_tp2, outputs)
    assert rank0 == rank1
    assert set(rank0) == {1, 2, 3}  # the opted-out prompt is never scored
    n, m = len(outputs[1].prompt_token_ids), 4
    assert set(rank0[1]) == {m + n - round(0.5 * n)}  # the fixed budget, every layer
    assert free_blocks(refreekv_tp2) == start

    # Aborted once pruned (the fixed budget: the tiny model's own cuts free no whole block).
    abort_once_pruned(refreekv_tp2, [passkey_prompt(50 + 10 * i, 0.4, 7100 + i)
                                     for i in range(3)],
                      greedy(max_tokens=64, refreekv_policy="fixed", refreekv_budget=0.5))
    assert free_blocks(refreekv_tp2) == start
