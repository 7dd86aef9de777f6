"""Fast checks of the fidelity benchmark's scorers, sandbox, budgets and summary (no engine)."""

import time
from types import SimpleNamespace

import numpy as np
import pytest

from benchmarks.fidelity.budgets import match_reports, physical_budget, report_budgets
from benchmarks.fidelity.policies import (
    CONFIGURED_DEFAULT,
    FULL,
    PAPER_RULE,
    fixed_budget,
    full_grid,
    quick_grid,
)
from benchmarks.fidelity.sandbox import humaneval_program, run_program
from benchmarks.fidelity.scoring import (
    gsm8k_gold,
    gsm8k_score,
    last_number,
    token_f1,
    values_recalled,
)
from benchmarks.fidelity.summary import choose_default, policy_summary, rel_change, task_metrics
from benchmarks.fidelity.tasks import humaneval_completion
from refreekv_vllm.policy.budget import resident_budget

ADD_PROMPT = 'def add(x: int, y: int) -> int:\n    """Add two numbers."""\n'
ADD_TEST = ("def check(candidate):\n    assert candidate(2, 3) == 5\n"
            "    assert candidate(-1, 1) == 0\n")


@pytest.mark.parametrize(("text", "value"), [
    ("The answer is 18.", 18.0), ("$1,234.50 in total", 1234.5), ("from 3 to -7", -7.0),
    ("it is 5. The answer is 5.\n\n", 5.0), ("no digits", None), ("0.5 then .25", 0.25)])
def test_last_number(text, value):
    assert last_number(text) == value


def test_gsm8k_answer_extraction():
    gold = gsm8k_gold("Janet sells 16 - 3 - 4 = <<16-3-4=9>>9 eggs.\n#### 1,018")
    assert gold == 1018.0
    assert gsm8k_score("so 1018 - 0 = 1,018. The answer is 1,018.", gold) == 1.0
    assert gsm8k_score("The answer is 1018.0", gold) == 1.0
    assert gsm8k_score("The answer is 1017.", gold) == 0.0
    # A run-on into the next few-shot question does not count.
    assert gsm8k_score("The answer is 7.\nQuestion: what is 1018?", gold) == 0.0
    assert gsm8k_score("", gold) == 0.0


def test_passkey_scoring_is_verbatim():
    assert values_recalled("The pass key is 37519.", ["37519"]) == 1.0
    assert values_recalled("The pass key is 375.", ["37519"]) == 0.0
    assert values_recalled("The pass key is 375190.", ["37519"]) == 0.0
    assert values_recalled("* 7562631\n* 3502558", ["7562631", "1111111"]) == 0.5
    with pytest.raises(ValueError):
        values_recalled("x", [])


def test_token_f1():
    assert token_f1("The patients with glaucoma.", "patients with glaucoma") == 1.0
    assert token_f1("dogs", "patients with glaucoma") == 0.0
    assert token_f1("patients", "patients with glaucoma") == pytest.approx(0.5)


def test_humaneval_sandbox_correct_incorrect_and_infinite_loop():
    correct = humaneval_program(ADD_PROMPT, "    return x + y\n", ADD_TEST, "add")
    assert run_program(correct).status == "passed"
    wrong = humaneval_program(ADD_PROMPT, "    return x - y\n", ADD_TEST, "add")
    result = run_program(wrong)
    assert (result.passed, result.status) == (False, "failed")
    assert "AssertionError" in result.detail
    start = time.perf_counter()
    looping = humaneval_program(ADD_PROMPT, "    while True:\n        pass\n", ADD_TEST, "add")
    result = run_program(looping, timeout_s=1.0)
    assert (result.passed, result.status) == (False, "timeout")
    assert time.perf_counter() - start < 10


def test_humaneval_sandbox_limits():
    # Memory beyond the address-space limit fails instead of taking the machine down.
    hog = humaneval_program(ADD_PROMPT, "    return len(bytearray(4 << 30)) and x + y\n",
                            ADD_TEST, "add")
    assert run_program(hog).status == "failed"
    # The program runs in a fresh directory with an empty environment.
    probe = humaneval_program(
        ADD_PROMPT, "    import os\n    assert not os.environ.get('HOME') and "
        "os.listdir('.') == ['program.py']\n    return x + y\n", ADD_TEST, "add")
    assert run_program(probe).status == "passed"


def test_humaneval_completion_from_chat_reply():
    full_function = "```python\ndef add(x: int, y: int) -> int:\n    return x + y\n```"
    program = humaneval_program(ADD_PROMPT, humaneval_completion(ADD_PROMPT, full_function),
                                ADD_TEST, "add")
    assert run_program(program).passed
    body = "    return x + y\n"
    assert humaneval_completion(ADD_PROMPT, body) == body
    unterminated = "```python\ndef add(x, y):\n    return x + y\n"
    assert run_program(humaneval_program(
        ADD_PROMPT, humaneval_completion(ADD_PROMPT, unterminated), ADD_TEST, "add")).passed


def test_budgets_from_a_cut_report():
    # 100 prompt tokens, block size 16, 4 sinks; 3 layers: frozen, cut at 68, cut at 4.
    report = SimpleNamespace(req_id="7-abcdef12", num_prompt_tokens=100, num_sink_tokens=4,
                             cuts=(4, 68, 4))
    budgets = report_budgets(report, block_size=16)
    assert budgets.ideal == pytest.approx((1 + 36 / 100 + 1) / 3)
    # Layer 1 frees blocks 1..3 (48 of its 100 prompt tokens): the engine's block budget.
    assert budgets.physical == pytest.approx(1 - 48 / 300)
    assert budgets.physical == pytest.approx(resident_budget(100, [0, 3, 0], 16))
    assert physical_budget([4, 4], 100, 4, 16) == 1.0
    assert match_reports(["7", "8"], [report]) == {"7": report}


def test_policy_names_and_xargs():
    from refreekv_vllm.config import REQUEST_KEYS, RefreeKVConfig, request_settings

    assert FULL.xargs() == {"refreekv_enabled": False}
    assert PAPER_RULE.name == "refreekv-w1-T0.01"
    assert PAPER_RULE.xargs()["refreekv_threshold"] == 0.01
    assert PAPER_RULE.xargs()["refreekv_window"] == 1
    assert CONFIGURED_DEFAULT.name == "refreekv-w64-mean-T0.005"
    # The benchmark's engine pins the plugin's own defaults.
    from benchmarks.fidelity.policies import ENGINE_CONFIG

    plugin = RefreeKVConfig()
    assert {key: getattr(plugin, key) for key in ENGINE_CONFIG} == ENGINE_CONFIG
    assert CONFIGURED_DEFAULT.xargs()["refreekv_window_agg"] == "mean"
    fixed = fixed_budget(0.5)
    assert fixed.name == "fixed-0.5"
    assert fixed.xargs() == {"refreekv_policy": "fixed", "refreekv_budget": 0.5}
    # Every key a policy sends is one the plugin accepts per request, and the request is pruned
    # with exactly the policy's rule.
    for policy in full_grid():
        assert set(policy.xargs()) <= set(REQUEST_KEYS), policy.name
        settings = request_settings(RefreeKVConfig(), policy.xargs())
        if policy.rule is None:
            assert settings is None or not settings.enabled, policy.name
        else:
            assert settings.policy == policy.rule, policy.name
    names = [p.name for p in full_grid()]
    assert len(names) == len(set(names)) == 2 + (6 + 2) * 4 + 3
    every_head = [p for p in full_grid() if "-heads-" in p.name]
    assert len(every_head) == 2 * 4
    assert {p.name for p in every_head} >= {"refreekv-w1-heads-T0.01",
                                             "refreekv-w32-max-heads-T0.01"}
    assert all(p.xargs()["refreekv_head_agg"] == "max" for p in every_head)
    assert {FULL.name, PAPER_RULE.name, CONFIGURED_DEFAULT.name, "fixed-0.5"} == {
        p.name for p in quick_grid()}


def _metrics(score, full_score, physical):
    return {"score": score, "full_score": full_score, "agreement": 1.0,
            "ideal_budget": physical, "physical_budget": physical}


def test_summary_and_default_choice():
    results = {
        "a": {"x": _metrics(0.99, 1.0, 0.5), "y": _metrics(1.0, 1.0, 0.7),
              "z": _metrics(0.5, 1.0, 0.3)},
        "b": {"x": _metrics(0.5, 0.5, 0.6), "y": _metrics(0.5, 0.5, 0.8),
              "z": _metrics(0.5, 0.5, 0.3)},
        "zero": {"x": _metrics(0.0, 0.0, 0.9), "y": _metrics(0.0, 0.0, 0.9),
                 "z": _metrics(0.0, 0.0, 0.3)},
    }
    assert rel_change(results["zero"]["x"]) is None
    x = policy_summary(results, "x")
    assert x["mean_rel_change"] == pytest.approx(-0.005)
    assert x["worst_task"] == "a" and x["excluded_tasks"] == ["zero"]
    assert x["mean_physical_budget"] == pytest.approx(2.0 / 3)
    assert x["meets_goal"]
    y, z = policy_summary(results, "y"), policy_summary(results, "z")
    assert y["meets_goal"] and not z["meets_goal"]
    chosen, met = choose_default([x, y, z])
    assert (chosen["policy"], met) == ("x", True)
    chosen, met = choose_default([z])
    assert (chosen["policy"], met) == ("z", False)


def _sampled(task, scores, full_scores):
    n = len(scores)
    return task_metrics(task, scores, full_scores, ["o"] * n, ["o"] * n, [0.5] * n, [0.5] * n,
                        0.0)


def test_intervals_are_paired_by_sample():
    rng = np.random.default_rng(1)
    full = rng.integers(0, 2, 40).astype(float).tolist()
    same = _sampled("t", full, full)
    # Every draw takes the same samples for both: no change in any draw.
    assert same["rel_change_ci"] == [0.0, 0.0]
    low, high = same["score_ci"]
    assert low < same["score"] < high
    worse = list(full)
    worse[full.index(1.0)] = 0.0  # one sample lost
    lost = _sampled("t", worse, full)
    point = lost["score"] / lost["full_score"] - 1
    assert lost["rel_change_ci"][0] < point < 0 <= lost["rel_change_ci"][1] + 1e-12
    assert _sampled("t", worse, full)["rel_change_ci"] == lost["rel_change_ci"]  # seeded
    assert _sampled("t", [0.0] * 5, [0.0] * 5)["rel_change_ci"] is None


def test_goal_judged_by_the_intervals():
    full = [1.0] * 30 + [0.0] * 30

    def summary(scores_a, scores_b):
        results = {"a": {"p": _sampled("a", scores_a, full)},
                   "b": {"p": _sampled("b", scores_b, full)},
                   "zero": {"p": _sampled("zero", [0.0] * 4, [0.0] * 4)}}
        return policy_summary(results, "p")

    kept = summary(full, full)
    assert kept["quality_goal_by_interval"] == "met" and kept["mean_rel_change_ci"] == [0, 0]
    halved = [1.0] * 15 + [0.0] * 45
    lost = summary(halved, full)
    assert lost["quality_goal_by_interval"] == "missed"
    assert lost["worst_rel_change_ci"][1] < -0.03 and lost["excluded_tasks"] == ["zero"]
    one_lost = [1.0] * 29 + [0.0] * 31
    unsure = summary(one_lost, full)
    assert unsure["mean_rel_change"] == pytest.approx(-1 / 60)
    assert unsure["quality_goal_by_interval"] == "undecided"
    assert not unsure["meets_quality_goal"]  # the point alone says missed


def test_dev_and_test_splits_are_fixed_halves():
    from benchmarks.fidelity.tasks import Sample, Task, keep_split, split_of

    samples = [Sample(f"s{i}", [1, 2, 3]) for i in range(200)]
    task = Task("t", "m", samples, max_tokens=4, score=lambda s, out: 0.0)
    dev, = keep_split([task], "dev")
    test, = keep_split([task], "test")
    assert {s.id for s in dev.samples}.isdisjoint({s.id for s in test.samples})
    assert len(dev.samples) + len(test.samples) == 200
    assert 70 <= len(dev.samples) <= 130
    assert all(split_of("t", s.id) == "dev" for s in dev.samples)
    assert keep_split([task], "all")[0].samples == samples
    assert len(task.samples) == 200  # the task itself is left whole
    with pytest.raises(ValueError, match="no test sample"):
        keep_split([Task("t", "m", dev.samples, max_tokens=4, score=task.score)], "test")
    with pytest.raises(ValueError, match="unknown split"):
        keep_split([task], "train")


def test_tasks_the_full_cache_nearly_fails_are_left_out_of_the_summary():
    # SmolLM2 on HumanEval: the full cache solves 2 of 74, so one sample is a 50% change.
    full = [1.0] * 30 + [0.0] * 30
    nearly_failed = [1.0] * 2 + [0.0] * 72
    results = {"a": {"p": _sampled("a", full, full)},
               "code": {"p": _sampled("code", [1.0] + [0.0] * 73, nearly_failed)}}
    assert rel_change(results["code"]["p"]) == pytest.approx(-0.5)  # still in its own row
    summary = policy_summary(results, "p")
    assert summary["excluded_tasks"] == ["code"]
    assert summary["mean_rel_change"] == 0.0 and summary["worst_task"] == "a"
    assert summary["mean_rel_change_ci"] == [0.0, 0.0]
    assert summary["quality_goal_by_interval"] == "met"
    # Its budget still counts: it is memory the policy used.
    assert summary["mean_physical_budget"] == pytest.approx(0.5)
    results["code"]["p"] = _sampled("code", [1.0] * 3 + [0.0] * 71, [1.0] * 4 + [0.0] * 70)
    assert policy_summary(results, "p")["excluded_tasks"] == []  # 4 of 74 = 5.4% counts
