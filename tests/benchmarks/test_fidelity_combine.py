"""One default for every model: chosen on the dev splits, reported on the test splits."""

import json

import pytest

from benchmarks.fidelity.combine import beats_fixed, choose_universal, goal_verdict, report
from benchmarks.fidelity.summary import policy_summary, task_metrics

FULL = [1.0] * 20 + [0.0] * 20


def _metrics(task, scores, budget):
    n = len(scores)
    return task_metrics(task, scores, FULL, ["o"] * n, ["o"] * n, [budget] * n, [budget] * n,
                        0.0)


def _result(model, split, policies, iso=None):
    """``policies``: name -> (scores of every sample, physical budget), on two tasks."""
    tasks = [{"name": task, "policies": {name: _metrics(task, scores, budget)
                                         for name, (scores, budget) in policies.items()}}
             for task in ("a", "b")]
    table = {t["name"]: t["policies"] for t in tasks}
    result = {"model": model, "split": split, "tasks": tasks,
              "policy_summaries": [policy_summary(table, name) for name in policies]}
    if iso:
        result["iso_budget"] = {name: {"fixed": fixed,
                                       "fixed_summary": policy_summary(table, fixed)}
                                for name, fixed in iso.items()}
    return result


KEEP = FULL
LOSE_ONE = [1.0] * 19 + [0.0] * 21
HALF = [1.0] * 10 + [0.0] * 30


def test_one_default_for_every_model_from_the_dev_splits():
    small = _result("small", "dev", {"refreekv-a": (KEEP, 0.7), "refreekv-b": (KEEP, 0.5),
                                     "refreekv-c": (KEEP, 0.75), "fixed-0.5": (HALF, 0.5)})
    large = _result("large", "dev", {"refreekv-a": (KEEP, 0.7), "refreekv-b": (HALF, 0.5),
                                     "refreekv-c": (KEEP, 0.75)})
    choice = choose_universal([small, large])
    # b is cheaper but loses half on one model: a, the cheapest that holds on both.
    assert choice["policy"] == "refreekv-a" and choice["met_on_dev"]
    assert choice["policies_compared"] == 3
    lost = choose_universal([_result("m", "dev", {"refreekv-b": (HALF, 0.5),
                                                  "refreekv-d": (LOSE_ONE, 0.9)})])
    assert lost == {**lost, "policy": "refreekv-d", "met_on_dev": False}


def test_report_on_the_test_splits(tmp_path):
    dev = {m: _result(m, "dev", {"refreekv-a": (KEEP, 0.7), "refreekv-w1-T0.01": (HALF, 0.5)})
           for m in ("small", "large")}
    test = {m: _result(m, "test", {"refreekv-a": (KEEP, 0.7), "refreekv-w1-T0.01": (HALF, 0.5),
                                   "fixed-0.7": (HALF, 0.7)}, iso={"refreekv-a": "fixed-0.7"})
            for m in ("small", "large")}
    paths = {}
    for m in dev:
        for split, results in (("dev", dev), ("test", test)):
            (tmp_path / f"{m}_{split}.json").write_text(json.dumps(results[m]))
        paths[m] = (tmp_path / f"{m}_dev.json", tmp_path / f"{m}_test.json")
    result = report(paths, tmp_path / "out")
    summary = result["summary"]
    assert summary["policy"] == "refreekv-a"
    for model in ("small", "large"):
        s = summary["by_model"][model]
        assert s["n_samples"] == 80 and s["mean_rel_change"] == 0.0
        assert s["mean_rel_change_ci"] == [0.0, 0.0]
        assert s["iso_budget_fixed_rel_change"] == pytest.approx(-0.5)
        assert beats_fixed(s) == "yes"
        assert s["paper_rule"]["quality_goal_by_interval"] == "missed"
        assert s["meets_goal_by_interval"]
    markdown = (tmp_path / "out" / "fidelity.md").read_text()
    assert "ReFreeKV better at equal memory: yes" in markdown
    assert "**Default meets the goal: yes.**" in markdown
    assert "Paper's rule (meets the goal: no (quality missed by the intervals))" in markdown
    test["small"]["summary"] = {"policy": "refreekv-w1-T0.01", "rule": "chosen before this run"}
    (tmp_path / "small_test.json").write_text(json.dumps(test["small"]))
    with pytest.raises(ValueError, match="rerun the test split with --chosen refreekv-a"):
        report(paths, tmp_path / "out")
    with pytest.raises(ValueError, match="expected a dev and a test"):
        report({"small": (paths["small"][1], paths["small"][1])}, tmp_path / "bad")


def test_equal_memory_verdict_is_judged_by_the_intervals():
    def verdict(ours, theirs):
        return beats_fixed({"mean_rel_change_ci": ours, "iso_budget_fixed_rel_change_ci": theirs})

    assert verdict([-0.01, 0.0], [-0.3, -0.1]) == "yes"
    assert verdict([-0.3, -0.1], [-0.01, 0.0]).startswith("no")
    assert verdict([-0.1, 0.0], [-0.05, 0.01]).startswith("not distinguishable")
    assert verdict(None, [-0.05, 0.01]) == "not measured"


def test_goal_verdict_needs_the_interval_and_the_budget():
    met = {"quality_goal_by_interval": "met", "mean_physical_budget": 0.7}
    assert goal_verdict(met) == "yes"
    assert goal_verdict({**met, "mean_physical_budget": 0.96}) == "no (budget 0.960 above 0.8)"
    assert goal_verdict({**met, "quality_goal_by_interval": "undecided"}) == (
        "no (quality undecided by the intervals)")
    assert goal_verdict({}) == "not measured"
