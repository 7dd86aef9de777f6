"""A stopped fidelity run's summaries, rebuilt from its samples file: complete (task, policy)
pairs give the metrics a finished run computes, and what is incomplete is named, not used."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from benchmarks.fidelity.from_samples import read_samples, rebuild
from benchmarks.fidelity.summary import task_metrics

RULE = "refreekv-w32-mean-T0.005"


def _write(path: Path, rows: list[tuple[str, str, str, float, float]]) -> None:
    with open(path, "w", encoding="utf-8") as f:
        for task, policy, sample, score, physical in rows:
            f.write(json.dumps({"task": task, "policy": policy, "id": sample, "score": score,
                                "agree": True, "ideal": physical, "physical": physical,
                                "reported": policy != "full", "output": f"{score}"}) + "\n")


@pytest.fixture
def samples(tmp_path: Path) -> Path:
    rows = []
    for task, n in (("passkey", 4), ("reading", 3)):
        for i in range(n):
            rows.append((task, "full", f"s{i}", 1.0, 1.0))
            rows.append((task, "full-rerun", f"s{i}", 1.0, 1.0))
        rows += [(task, RULE, f"s{i}", float(i % 2), 0.5 + 0.1 * i) for i in range(n)]
    # Stopped while the paper's rule ran on passkey: 2 of its 4 samples written.
    rows += [("passkey", "refreekv-w1-T0.01", f"s{i}", 0.0, 0.4) for i in range(2)]
    path = tmp_path / "fidelity_stats_dev_samples.jsonl"
    _write(path, rows)
    return path


def test_complete_pairs_give_a_finished_runs_metrics(samples):
    tasks, policies, left_out = rebuild(read_samples(samples))
    assert [t["name"] for t in tasks] == ["passkey", "reading"]
    assert policies == ["full", "full-rerun", RULE]
    assert left_out == ["passkey/refreekv-w1-T0.01 (2 of 4 samples)"]
    passkey = tasks[0]["policies"][RULE]
    expected = task_metrics("passkey", [0.0, 1.0, 0.0, 1.0], [1.0] * 4,
                            ["0.0", "1.0", "0.0", "1.0"], ["1.0"] * 4, [0.5, 0.6, 0.7, 0.8],
                            [0.5, 0.6, 0.7, 0.8], wall_s=0.0)
    assert passkey == expected
    assert passkey["score"] == 0.5 and passkey["physical_budget"] == pytest.approx(0.65)


def test_a_policy_missing_from_a_task_is_left_out_everywhere(samples):
    with open(samples, encoding="utf-8") as f:
        kept = [line for line in f
                if not ('"reading"' in line and f'"{RULE}"' in line)]
    samples.write_text("".join(kept), encoding="utf-8")
    tasks, policies, left_out = rebuild(read_samples(samples))
    assert RULE not in policies
    assert all(RULE not in t["policies"] for t in tasks)
    assert f"passkey/{RULE} (not run on every task)" in left_out


def test_rebuild_of_a_test_split_run_with_its_iso_budget_baselines(samples, monkeypatch):
    """A stopped `--split test --chosen R --iso-budget-of R` run: the chosen policy is reported,
    and its baseline is the complete fixed-budget run closest to its mean physical budget."""
    from benchmarks.fidelity import from_samples
    from benchmarks.fidelity import policies as pol

    rows = []
    for task, n in (("passkey", 4), ("reading", 3)):
        rows += [(task, "fixed-0.6", f"s{i}", 1.0, 0.64) for i in range(n)]
        rows += [(task, "fixed-0.3", f"s{i}", 0.0, 0.33) for i in range(n)]
    rows += [("passkey", "fixed-0.62", "s0", 1.0, 0.625)]  # stopped: not a candidate
    with open(samples, "a", encoding="utf-8") as f:
        for task, policy, sample, score, physical in rows:
            f.write(json.dumps({"task": task, "policy": policy, "id": sample, "score": score,
                                "agree": True, "ideal": physical, "physical": physical,
                                "reported": True, "output": f"{score}"}) + "\n")
    monkeypatch.setattr("sys.argv", [
        "from_samples", str(samples), "--model", "m", "--command", "c", "--split", "test",
        "--chosen", RULE, "--iso-budget-of", f"{RULE},refreekv-w1-T0.01"])
    from_samples.main()
    result = json.loads(samples.with_name("fidelity_stats_dev.json").read_text())
    assert result["summary"]["policy"] == RULE
    assert "chosen before this run" in result["summary"]["rule"]
    # The rule's budget: passkey 0.65, reading 0.6 -> 0.625; fixed-0.6 ran at 0.64.
    iso = result["iso_budget"]
    assert list(iso) == [RULE]  # the paper's rule is incomplete: no comparison for it
    assert iso[RULE]["target_physical_budget"] == 0.625 and iso[RULE]["fixed"] == "fixed-0.6"
    assert iso[RULE]["fixed_summary"]["mean_physical_budget"] == pytest.approx(0.64)
    assert "passkey/fixed-0.62 (1 of 4 samples)" in result["left_out"]
    # Without a baseline near its budget the rule gets no comparison (fixed-0.3 is 0.295 off).
    tasks, names, _ = rebuild(read_samples(samples))
    others = [p for p in pol.select(pol.full_grid(), names) if p.name != "fixed-0.6"]
    entries, unmatched = from_samples.iso_budget_baselines(tasks, others, [RULE])
    assert entries == {} and "iso-budget baseline of " + RULE in unmatched[0]
    assert "fixed-0.6" in (samples.parent / "fidelity_stats_dev.md").read_text()


def test_fixed_budget_names_select_any_measured_budget():
    from benchmarks.fidelity import policies as pol

    chosen = pol.select(pol.full_grid(), ["fixed-0.684", "fixed-0.5"])
    assert [p.name for p in chosen] == ["full", "fixed-0.684", "fixed-0.5"]
    assert chosen[1].budget == 0.684 and chosen[1].fixed
    for bad in ("fixed-1.5", "fixed-0", "fixed-x", "fixed-0.50", "fixd-0.5"):
        with pytest.raises(ValueError, match="unknown policies"):
            pol.select(pol.full_grid(), [bad])


def test_only_the_named_tasks_are_summarised(samples, monkeypatch):
    from benchmarks.fidelity import from_samples

    monkeypatch.setattr("sys.argv", ["from_samples", str(samples), "--model", "m", "--command",
                                     "c", "--tasks", "reading"])
    from_samples.main()
    result = json.loads(samples.with_name("fidelity_stats_dev.json").read_text())
    assert [t["name"] for t in result["tasks"]] == ["reading"]
    assert result["left_out"] == ["passkey (not summarised: not in --tasks)"]
    monkeypatch.setattr("sys.argv", ["from_samples", str(samples), "--model", "m", "--command",
                                     "c", "--tasks", "reading,gsm8k"])
    with pytest.raises(SystemExit, match="no samples of \\['gsm8k'\\]"):
        from_samples.main()


def test_gzipped_samples_read_the_same(samples):
    import gzip

    packed = samples.with_name(samples.name + ".gz")
    packed.write_bytes(gzip.compress(samples.read_bytes()))
    assert read_samples(packed) == read_samples(samples)


def test_resummarise_applies_the_current_rules_and_keeps_the_chosen_policy(samples, monkeypatch):
    """A finished run's summaries, computed again from its own per-sample scores: a policy
    reported as chosen stays the reported one, and the summary follows today's rules."""
    from benchmarks.fidelity import from_samples
    from benchmarks.fidelity.resummarise import resummarise

    monkeypatch.setattr("sys.argv", ["from_samples", str(samples), "--model", "m", "--command",
                                     "c", "--split", "test", "--chosen", RULE])
    from_samples.main()
    path = samples.with_name("fidelity_stats_dev.json")
    result = json.loads(path.read_text())
    before = result["summary"]
    # As an older run would have written it: a stale summary and goal text, and an engine
    # whose default was the w = 32 rule this run has samples of.
    result["summary"] = {**before, "mean_rel_change": 123.0}
    result["goal"]["text"] = "old"
    result["engine"]["refreekv"] = {"threshold": 0.005, "window": 32, "window_agg": "mean"}
    path.write_text(json.dumps(result))
    redone = resummarise(path)
    assert redone["summary"] == before
    assert json.loads(path.read_text())["goal"]["text"] != "old"
    # The run's own default, not today's, is reported as the engine's configured default.
    assert redone["configured_default_summary"]["policy"] == RULE
    assert (samples.parent / "fidelity_stats_dev.md").exists()
