"""ReFreeKV inside the real vLLM engine (CPU backend): exactness at T=0, real pruning at T>0,
and the block pool's accounting."""

import pytest

from refreekv_vllm.workloads import mixed_prompts, passkey_prompt
from tests.e2e.engines import (
    abort_once_pruned,
    free_blocks,
    in_process_engine,
    recorded_steps,
    scheduler_of,
)

pytestmark = pytest.mark.e2e

MAX_TOKENS = 16


def greedy(max_tokens: int = MAX_TOKENS, **xargs):
    from vllm import SamplingParams

    return SamplingParams(temperature=0.0, max_tokens=max_tokens, ignore_eos=True,
                          extra_args=xargs or None)


def token_ids(outputs) -> list[list[int]]:
    return [list(o.outputs[0].token_ids) for o in outputs]


# Each batch is generated in the same order by both engines, so their prefix caches hold the
# same prompts at every step (plain vLLM's greedy output depends on batch and cache hits).
BATCHES = {"threshold_zero": mixed_prompts(12, seed=0), "opted_out": mixed_prompts(12, seed=1)}


@pytest.fixture(scope="module")
def plain_outputs(smollm2_dir) -> dict[str, list]:
    # In-process like the ReFreeKV engine below (vLLM's CPU worker threads differ between the
    # in-process and multiprocess executors, and with them the reduction order).
    with in_process_engine(smollm2_dir, refreekv=None) as llm:
        # The plugin is installed but inert without a refreekv section: vLLM's own classes.
        assert type(scheduler_of(llm)).__module__.startswith("vllm.")
        assert llm.llm_engine.vllm_config.parallel_config.worker_cls.startswith("vllm.")
        assert attention_backends(llm) == {"CPUAttentionBackend"}
        outputs: dict[str, list] = {}
        for name, batch in BATCHES.items():
            with recorded_steps(llm) as steps:
                outputs[name] = token_ids(llm.generate(batch, greedy()))
            outputs[f"{name}_steps"] = steps
        return outputs


@pytest.fixture(scope="module")
def refreekv_llm(smollm2_dir, plain_outputs):
    # Plain vLLM runs first and is shut down: two in-process engines cannot overlap.
    with pytest.MonkeyPatch.context() as env:
        env.setenv("REFREEKV_DEBUG_ACCOUNTING", "1")  # assert pool invariants on every release
        with in_process_engine(smollm2_dir, refreekv={}) as llm:
            yield llm


def test_threshold_zero_is_token_identical_to_plain_vllm(refreekv_llm, plain_outputs):
    start = free_blocks(refreekv_llm)
    with recorded_steps(refreekv_llm) as steps:
        outputs = refreekv_llm.generate(BATCHES["threshold_zero"],
                                        greedy(refreekv_threshold=0.0))
    assert token_ids(outputs) == plain_outputs["threshold_zero"]
    # The same steps too: admission (free blocks counted from pages) and chunking as plain
    # vLLM's, so that no request waits a step longer.
    assert len(steps) >= MAX_TOKENS and steps == plain_outputs["threshold_zero_steps"]
    assert scheduler_of(refreekv_llm).refreekv_stats().blocks_released == 0
    assert free_blocks(refreekv_llm) == start


def test_opted_out_requests_match_plain_vllm(refreekv_llm, plain_outputs):
    with recorded_steps(refreekv_llm) as steps:
        outputs = token_ids(refreekv_llm.generate(BATCHES["opted_out"],
                                                  greedy(refreekv_enabled=False)))
    assert outputs == plain_outputs["opted_out"]
    assert len(steps) >= MAX_TOKENS and steps == plain_outputs["opted_out_steps"]
    assert scheduler_of(refreekv_llm).refreekv_stats().blocks_released == 0


def attention_backends(llm) -> set[str]:
    worker = llm.llm_engine.engine_core.engine_core.model_executor.driver_worker.worker
    context = worker.model_runner.compilation_config.static_forward_context
    return {layer.get_attn_backend().__name__ for layer in context.values()}


def test_refreekv_attention_stays_inside_its_engine(refreekv_llm):
    from vllm.v1.attention.backends.registry import AttentionBackendEnum

    assert attention_backends(refreekv_llm) == {"RefreeKVCPUAttentionBackend"}
    # vLLM's registry is global: an engine built next in this process gets vLLM's own class
    # (before this was scoped, a plain engine after a ReFreeKV one ran our attention on stale
    # tables and corrupted the heap).
    assert not AttentionBackendEnum.CPU_ATTN.is_overridden()


def test_pruning_releases_blocks_and_pool_balances(refreekv_llm):
    scheduler = scheduler_of(refreekv_llm)
    start = free_blocks(refreekv_llm)
    before = scheduler.refreekv_stats()
    prompt = passkey_prompt(90, 0.5, 48213)
    refreekv_llm.generate([prompt], greedy(max_tokens=4))
    after = scheduler.refreekv_stats()
    assert after.requests_pruned == before.requests_pruned + 1
    assert after.blocks_released > before.blocks_released
    assert free_blocks(refreekv_llm) == start


def test_prompts_under_the_minimum_are_not_scored(refreekv_llm):
    """At the default min_prompt_tokens a short prompt is counted as skipped and never scored,
    beside a long one that is pruned in the same batch."""
    from refreekv_vllm.config import RefreeKVConfig

    scheduler = scheduler_of(refreekv_llm)
    start = free_blocks(refreekv_llm)
    short = "Name three colours of the rainbow and say which one comes first. " * 6
    long = passkey_prompt(40, 0.5, 40404)
    tokenizer = refreekv_llm.get_tokenizer()
    shortest = RefreeKVConfig().min_prompt_tokens
    assert len(tokenizer.encode(short)) < shortest <= len(tokenizer.encode(long))
    before = scheduler.refreekv_stats()
    refreekv_llm.generate([short, long], greedy(max_tokens=4))
    after = scheduler.refreekv_stats()
    assert after.requests_pruned == before.requests_pruned + 1
    assert (after.requests_skipped.get("short_prompt", 0)
            == before.requests_skipped.get("short_prompt", 0) + 1)
    assert scheduler.refreekv_recent_reports()[-1].num_prompt_tokens == len(
        tokenizer.encode(long))
    assert free_blocks(refreekv_llm) == start


def test_aborting_pruned_requests_mid_decode_balances_the_pool(refreekv_llm):
    start = free_blocks(refreekv_llm)
    abort_once_pruned(refreekv_llm, [passkey_prompt(40 + 10 * i, 0.5, 61000 + i)
                                     for i in range(3)], greedy(max_tokens=64))
    assert free_blocks(refreekv_llm) == start


def test_fixed_budget_policy_cuts_every_layer_to_the_named_share(refreekv_llm):
    scheduler = scheduler_of(refreekv_llm)
    start = free_blocks(refreekv_llm)
    prompt = passkey_prompt(90, 0.3, 27182)
    refreekv_llm.generate([prompt], greedy(max_tokens=4, refreekv_policy="fixed",
                                           refreekv_budget=0.5))
    report = scheduler.refreekv_recent_reports()[-1]
    n, m = report.num_prompt_tokens, report.num_sink_tokens
    assert len(set(report.cuts)) == 1  # every layer, frozen ones included
    assert m + n - report.cuts[0] == round(0.5 * n)
    block_size = refreekv_llm.llm_engine.vllm_config.cache_config.block_size
    physical = scheduler.refreekv_stats().recent_block_budgets[-1]
    assert 0.5 <= physical <= 0.5 + 2 * block_size / n
    assert free_blocks(refreekv_llm) == start


def cuts_per_setting(llm, prompt: str, settings: dict[str, dict]) -> dict[str, tuple[int, ...]]:
    """The cuts ``prompt`` gets under each named set of request settings (the pool balanced
    after each)."""
    start, cuts = free_blocks(llm), {}
    for name, xargs in settings.items():
        llm.generate([prompt], greedy(max_tokens=2, **xargs))
        cuts[name] = scheduler_of(llm).refreekv_recent_reports()[-1].cuts
        assert free_blocks(llm) == start
    return cuts


def test_mean_window_aggregation_is_selectable_per_request(refreekv_llm):
    cuts = cuts_per_setting(refreekv_llm, passkey_prompt(90, 0.6, 31415),
                            {agg: {"refreekv_window_agg": agg} for agg in ("max", "mean")})
    # Both prune, and differently: the request's aggregation reached the kernel.
    assert all(max(layer_cuts) > 4 for layer_cuts in cuts.values())
    assert cuts["mean"] != cuts["max"]


def test_every_head_rule_is_selectable_per_request_and_keeps_more(refreekv_llm):
    cuts = cuts_per_setting(refreekv_llm, passkey_prompt(90, 0.4, 16180),
                            {agg: {"refreekv_threshold": 0.05, "refreekv_head_agg": agg}
                             for agg in ("mean", "max")})
    # Every head within T puts the heads' mean within T: no layer cuts later, some earlier.
    assert all(a <= b for a, b in zip(cuts["max"], cuts["mean"], strict=True))
    assert cuts["max"] != cuts["mean"] and max(cuts["max"]) > 4


def test_a_seeded_prompt_prefilled_in_chunks_samples_and_repeats(refreekv_llm):
    """vLLM 0.26's CPU worker raised "CPU Generator does not use offset" and the engine died
    when a seeded request's prompt took more than one step; the runner now rewinds CPU
    generators itself. Same seed, same chunks (no prefix hit: distinct cache salts), same
    sample."""
    from vllm import SamplingParams

    prompt = passkey_prompt(90, 0.5, 31337)
    assert len(refreekv_llm.get_tokenizer().encode(prompt)) > 1024  # > one step's tokens
    params = SamplingParams(temperature=1.0, seed=1234, max_tokens=8, ignore_eos=True)
    samples = [token_ids(refreekv_llm.generate({"prompt": prompt, "cache_salt": salt}, params))
               for salt in ("first", "second")]
    assert samples[0] == samples[1] and len(samples[0][0]) == 8
    other = SamplingParams(temperature=1.0, seed=4321, max_tokens=8, ignore_eos=True)
    assert token_ids(refreekv_llm.generate({"prompt": prompt, "cache_salt": "third"},
                                           other)) != samples[0]
