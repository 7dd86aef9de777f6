"""CI smoke test of the fidelity benchmark: its quick mode end to end (one real engine, ~3-4
minutes on 2 CPU cores), then the shape and sanity of what it wrote."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.e2e

REPO = Path(__file__).resolve().parents[2]
METRIC_KEYS = {"score", "full_score", "agreement", "ideal_budget", "physical_budget",
               "n_samples", "wall_s"}
SUMMARY_KEYS = {"policy", "mean_rel_change", "worst_rel_change", "mean_physical_budget"}


@pytest.fixture(scope="module")
def quick_run(tmp_path_factory) -> tuple[dict, Path]:
    out_dir = tmp_path_factory.mktemp("fidelity")
    proc = subprocess.run(
        [sys.executable, "-m", "benchmarks.fidelity.run_fidelity", "--quick", "--out-dir",
         str(out_dir), "--iso-budget-of", "refreekv-w1-T0.01"], cwd=REPO, capture_output=True,
        text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    return json.loads((out_dir / "fidelity_quick.json").read_text()), out_dir


def test_writes_report_plots_and_samples(quick_run):
    result, out_dir = quick_run
    assert not (out_dir / "fidelity.json").exists()  # quick mode never overwrites a full run
    markdown = (out_dir / "fidelity_quick.md").read_text()
    assert "## Verdict" in markdown and "Paper's rule" in markdown
    for name in ("fidelity_quick_score_vs_budget.png", "fidelity_quick_agreement_vs_budget.png"):
        assert (out_dir / name).stat().st_size > 1000
        assert f"]({name})" in markdown
    lines = (out_dir / "fidelity_quick_samples.jsonl").read_text().splitlines()
    assert len(lines) == sum(len(t["subset_ids"]) * len(t["policies"]) for t in result["tasks"])


def test_schema_and_summaries(quick_run):
    result, _ = quick_run
    for key in ("command", "machine", "model", "tasks", "policies", "wall_s"):
        assert result[key], key
    iso = result["iso_budget"]["refreekv-w1-T0.01"]
    assert iso["target_physical_budget"] == pytest.approx(
        result["paper_rule_summary"]["mean_physical_budget"], abs=1e-3)
    fixed = {p for p in result["policies"] if p.startswith("fixed-")}
    assert set(result["policies"]) - fixed == {"full", "refreekv-w1-T0.01",
                                               "refreekv-w64-mean-T0.005"}
    # fixed-0.5 of the grid, the baseline at equal memory and at most one corrected rerun of it.
    assert "fixed-0.5" in fixed and iso["fixed"] in fixed and len(fixed) <= 3
    assert {t["name"] for t in result["tasks"]} == {
        "passkey", "multi_needle", "gsm8k", "humaneval", "reading"}
    for task in result["tasks"]:
        assert task["subset_ids"] and len(set(task["subset_ids"])) == len(task["subset_ids"])
        assert set(task["policies"]) == set(result["policies"])
        for metrics in task["policies"].values():
            assert set(metrics) >= METRIC_KEYS
            assert metrics["n_samples"] == len(task["subset_ids"])
    for key in ("summary", "paper_rule_summary", "configured_default_summary"):
        assert set(result[key]) >= SUMMARY_KEYS, key
    assert result["paper_rule_summary"]["policy"] == "refreekv-w1-T0.01"
    assert result["configured_default_summary"]["policy"] == "refreekv-w64-mean-T0.005"
    assert result["summary"]["policy"] in ("refreekv-w1-T0.01", "refreekv-w64-mean-T0.005")
    assert isinstance(result["summary"]["met"], bool)


def test_full_cache_agrees_with_itself_and_budgets_are_fractions(quick_run):
    result, _ = quick_run
    for task in result["tasks"]:
        full = task["policies"]["full"]
        assert full["agreement"] == 1.0
        assert full["score"] == full["full_score"]
        assert full["ideal_budget"] == full["physical_budget"] == 1.0
        for metrics in task["policies"].values():
            assert 0.0 <= metrics["score"] <= 1.0 and 0.0 <= metrics["agreement"] <= 1.0
            assert 0.0 < metrics["ideal_budget"] <= 1.0
            assert 0.0 < metrics["physical_budget"] <= 1.0
            # Whole blocks only: resident blocks never fall below the token-level ideal much.
            assert metrics["physical_budget"] >= metrics["ideal_budget"] - 0.02


def test_fixed_budget_keeps_half_at_block_granularity(quick_run):
    result, _ = quick_run
    for task in result["tasks"]:
        fixed = task["policies"]["fixed-0.5"]
        assert fixed["ideal_budget"] == pytest.approx(0.5, abs=0.05), task["name"]
        # Prompts of 500-1,000 tokens are 16-32 blocks of 32: the sink block and the block the
        # cut falls in stay resident, so up to ~2 blocks above one half.
        assert 0.45 <= fixed["physical_budget"] <= 0.65, task["name"]


def test_intervals_and_the_fixed_budget_at_equal_memory(quick_run):
    result, out_dir = quick_run
    iso = result["iso_budget"]["refreekv-w1-T0.01"]
    fixed = iso["fixed_summary"]
    # The baseline at the paper rule's memory lands near it (corrected once for whole blocks).
    assert fixed["mean_physical_budget"] == pytest.approx(iso["target_physical_budget"],
                                                          abs=0.05)
    for task in result["tasks"]:
        for metrics in task["policies"].values():
            low, high = metrics["score_ci"]
            assert low <= metrics["score"] <= high
            assert len(metrics["scores"]) == metrics["n_samples"]
    summary = result["summary"]
    if summary["mean_rel_change"] is not None:
        low, high = summary["mean_rel_change_ci"]
        assert low <= high
        assert summary["quality_goal_by_interval"] in ("met", "missed", "undecided")
    assert "At equal memory" in (out_dir / "fidelity_quick.md").read_text()


def test_refreekv_actually_pruned(quick_run):
    result, _ = quick_run
    pruned = [(t["name"], name) for t in result["tasks"]
              for name, m in t["policies"].items()
              if name.startswith("refreekv") and m["physical_budget"] < 1.0]
    assert pruned
    assert result["paper_rule_summary"]["mean_physical_budget"] < 1.0
    # Every request of a pruning policy got a cut report from the scheduler.
    for task in result["tasks"]:
        for name, metrics in task["policies"].items():
            if name != "full":
                assert metrics["unreported"] == 0, (task["name"], name)


def test_stats_size_gives_each_split_sixty_samples_per_task():
    from transformers import AutoTokenizer

    from benchmarks.fidelity.tasks import STATS_SIZES, build_tasks, keep_split
    from refreekv_vllm.models import prepare_smollm2

    tasks = build_tasks(AutoTokenizer.from_pretrained(prepare_smollm2()), STATS_SIZES)
    for split in ("dev", "test"):
        for task in keep_split(tasks, split):
            assert len(task.samples) >= 60, (task.name, split)


def test_larger_humaneval_sizes_extend_the_smaller_ones():
    """A larger HumanEval size asks the same prompts first (results of a smaller run stay
    comparable) and never asks a problem that is one of its shots."""
    import ast
    import dataclasses

    from transformers import AutoTokenizer

    from benchmarks.fidelity.tasks import STATS_SIZES, PromptBuilder, humaneval_task
    from refreekv_vllm.models import prepare_smollm2

    builder = PromptBuilder(AutoTokenizer.from_pretrained(prepare_smollm2()))
    small = humaneval_task(builder, dataclasses.replace(STATS_SIZES, humaneval=40))
    large = humaneval_task(builder, STATS_SIZES)
    assert [(s.id, s.prompt_ids) for s in large.samples[:40]] == [(s.id, s.prompt_ids)
                                                                  for s in small.samples]
    asked = {s.id for s in large.samples}
    assert len(asked) == len(large.samples) == STATS_SIZES.humaneval
    shots = ast.literal_eval(large.notes.split("(")[1].split(")")[0])
    assert len(shots) == 3 and not asked & set(shots)
    with pytest.raises(ValueError, match="at most 161 HumanEval problems"):
        humaneval_task(builder, dataclasses.replace(STATS_SIZES, humaneval=162))
