"""The runner's per-step plan on the CPU: which window rows a step captures and which requests
it scores, from vLLM's persistent batch (``RefreeKVModelRunnerMixin._plan_step``)."""

from __future__ import annotations

from types import SimpleNamespace
from typing import Any

import numpy as np
import pytest

from refreekv_vllm.config import RefreeKVConfig
from refreekv_vllm.policy.policies import FixedBudgetPolicy, ThresholdPolicy
from refreekv_vllm.worker.model_runner import RefreeKVModelRunnerMixin


class Batch:
    """The fields of vLLM's ``InputBatch`` the plan reads."""

    def __init__(self, requests: list[tuple[str, int, int]]) -> None:
        self.req_ids = [req_id for req_id, _, _ in requests]
        self.num_computed_tokens_cpu = np.asarray([c for _, c, _ in requests], dtype=np.int32)
        self.num_prompt_tokens = np.asarray([p for _, _, p in requests], dtype=np.int32)


def runner(requests: list[tuple[str, int, int]], xargs: dict[str, dict[str, Any]],
           config: RefreeKVConfig | None = None) -> Any:
    """``requests``: (id, tokens computed before the step, prompt tokens) per batch row."""
    plan = RefreeKVModelRunnerMixin.__new__(RefreeKVModelRunnerMixin)
    plan.refreekv_config = config or RefreeKVConfig()
    plan._refreekv_kernel = "torch"
    plan._refreekv_heads = None
    plan._refreekv_no_prune = set()
    plan._refreekv_metrics = SimpleNamespace(scoring_seconds=SimpleNamespace(observe=print))
    plan.input_batch = Batch(requests)
    plan.requests = {req_id: SimpleNamespace(sampling_params=SimpleNamespace(
        extra_args=xargs.get(req_id))) for req_id, _, _ in requests}
    return plan


def test_a_window_split_over_two_chunks_is_captured_in_both_and_scored_in_the_last():
    # "a": 100-token prompt, window 32 (rows 68-99), chunks of 80 then 20 tokens; "b" decodes
    config = RefreeKVConfig(window=32, min_prompt_tokens=0)
    first = runner([("b", 50, 10), ("a", 0, 100)], {}, config)
    step = first._plan_step(np.asarray([1, 80]))
    (capture,) = step.captures
    assert (capture.req_id, capture.window) == ("a", 32)
    assert capture.token_indices == range(1 + 68, 1 + 80)  # after b's one token
    assert capture.window_slots == range(0, 12)
    assert not step.scoring
    second = runner([("a", 80, 100)], {}, config)._plan_step(np.asarray([20]))
    (capture,) = second.captures
    assert capture.token_indices == range(0, 20) and capture.window_slots == range(12, 32)
    (row,) = second.scoring
    assert (row.req_id, row.batch_row, row.num_prompt_tokens, row.window) == ("a", 0, 100, 32)
    assert row.policy == ThresholdPolicy(0.005, 32, "mean") and row.fixed_cut is None


def test_overrides_fixed_budgets_and_opt_outs():
    xargs = {"w1": {"refreekv_window": 1, "refreekv_threshold": 0.01},
             "fixed": {"refreekv_policy": "fixed", "refreekv_budget": 0.5},
             "out": {"refreekv_enabled": False}, "t0": {"refreekv_threshold": 0},
             "bad": {"refreekv_window": 0}}
    names = list(xargs) + ["preempted"]
    plan = runner([(name, 0, 40) for name in names], xargs, RefreeKVConfig(min_prompt_tokens=0))
    plan._refreekv_no_prune.add("preempted")
    step = plan._plan_step(np.full(len(names), 40))
    assert [c.req_id for c in step.captures] == ["w1"]
    assert step.captures[0].token_indices == range(39, 40)  # the last prompt row only
    by_id = {row.req_id: row for row in step.scoring}
    assert sorted(by_id) == ["fixed", "w1"]
    assert by_id["fixed"].policy == FixedBudgetPolicy(0.5) and by_id["fixed"].window == 0
    assert by_id["fixed"].fixed_cut == FixedBudgetPolicy(0.5).fixed_cut(40, 4) == 24
    assert by_id["fixed"].batch_row == 1


@pytest.mark.parametrize("requests", [
    [("decoding", 60, 40)],  # past its prompt
    [("tiny", 0, 5)],  # prompt not longer than the sinks and the last token
])
def test_steps_without_pruning_work_have_no_plan(requests):
    assert runner(requests, {})._plan_step(np.asarray([1] * len(requests))) is None


def test_prompts_under_the_minimum_are_neither_captured_nor_scored():
    """The default min_prompt_tokens: a shorter prompt's window is not captured and it is
    not scored, so a step of short prompts only costs what a T = 0 step costs."""
    shortest = RefreeKVConfig().min_prompt_tokens
    assert shortest == 256
    plan = runner([("short", 0, shortest - 1), ("long", 0, shortest)], {})
    step = plan._plan_step(np.asarray([shortest - 1, shortest]))
    assert [c.req_id for c in step.captures] == ["long"]
    assert [row.req_id for row in step.scoring] == ["long"]
    assert runner([("short", 0, shortest - 1)], {})._plan_step(
        np.asarray([shortest - 1])) is None


def test_a_disabled_server_plans_nothing():
    config = RefreeKVConfig.from_additional_config({"refreekv": {"enabled": False}})
    assert runner([("a", 0, 100)], {}, config)._plan_step(np.asarray([100])) is None


@pytest.mark.parametrize("policy", [ThresholdPolicy(0.01, 32, "mean"), FixedBudgetPolicy(0.5)])
def test_the_request_record_holds_the_cuts_budgets_and_policy(policy):
    from refreekv_vllm.forward.step_context import ScoringRow
    from refreekv_vllm.worker.model_runner import request_record

    num_layers, block_size = 4, 16
    cuts = (4, 4, 40, 68)
    gaps = np.zeros((num_layers, 2), dtype=np.int32)
    gaps[2], gaps[3] = (1, 2), (1, 4)  # blocks wholly inside [4, cut) per layer
    row = ScoringRow("r", 0, 100, policy.window_rows(100), policy, policy.fixed_cut(100, 4))
    record = request_record(row, cuts, gaps, RefreeKVConfig(), block_size)
    assert record["cuts"] == list(cuts) and record["request_id"] == "r"
    assert record["policy"] == policy.name and record | policy.describe() == record
    assert record["blocks_skipped"] == 4 and record["tokens_pruned"] == 36 + 64
    # resident tokens per layer: 100, 100, 84, 52 of 100
    assert record["block_budget"] == pytest.approx((100 + 100 + 84 + 52) / 400)
