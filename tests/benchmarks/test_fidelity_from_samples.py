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
