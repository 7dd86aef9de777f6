"""Per task × policy metrics, the quality goal, and the choice of the default policy.

Relative change of a task = score / full_score − 1. A task whose full-cache score is below
``NEAR_ZERO_FULL_SCORE`` (5%) has (almost) nothing to preserve: it is left out of the mean and
the worst change (and listed under ``excluded_tasks``); its own change, agreement and budget are
still reported, and its budget counts in the mean budget (the memory it used). Every score and
change comes with a 95% bootstrap interval over the task's samples (``intervals.py``).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from statistics import mean
from typing import Any

from benchmarks.fidelity.intervals import summary_intervals, task_intervals

# A task whose full cache scores below this has (almost) nothing to preserve: there, one
# sample moves the relative change by tens of percent (SmolLM2 solves 2 of 74 HumanEval
# problems), so the task is left out of the relative-change summaries.
NEAR_ZERO_FULL_SCORE = 0.05
NEAR_ZERO_TEXT = f"full-cache score below {NEAR_ZERO_FULL_SCORE:.0%}"
GOAL = {"mean_rel_change": -0.01, "worst_rel_change": -0.03, "mean_physical_budget": 0.8}
GOAL_TEXT = ("mean relative change ≥ −1%, no task below −3%, mean physical budget ≤ 0.8 "
             "(relative change = score / full-cache score − 1; tasks with a "
             f"{NEAR_ZERO_TEXT} are left out of the relative changes)")


def task_metrics(task: str, scores: Sequence[float], full_scores: Sequence[float],
                 outputs: Sequence[str], full_outputs: Sequence[str], ideal: Sequence[float],
                 physical: Sequence[float], wall_s: float) -> dict[str, Any]:
    n = len(scores)
    return {
        "score": mean(scores), "full_score": mean(full_scores),
        **task_intervals(task, scores, full_scores),
        "agreement": sum(a == b for a, b in zip(outputs, full_outputs, strict=True)) / n,
        "ideal_budget": mean(ideal), "physical_budget": mean(physical),
        "n_samples": n, "wall_s": round(wall_s, 2),
        # Per sample, in the task's order: what the intervals of a summary are drawn from.
        "scores": list(scores), "full_scores": list(full_scores),
    }


def rel_change(metrics: Mapping[str, Any]) -> float | None:
    full = metrics["full_score"]
    return None if full <= 0 else metrics["score"] / full - 1.0


def judged_rel_change(metrics: Mapping[str, Any]) -> float | None:
    """The task's relative change as a summary counts it: None when its full cache scores
    near zero."""
    return None if metrics["full_score"] < NEAR_ZERO_FULL_SCORE else rel_change(metrics)


def policy_summary(results: Mapping[str, Mapping[str, Mapping[str, Any]]], policy: str
                   ) -> dict[str, Any]:
    """``results[task][policy]`` → the policy's quality and budget over all tasks."""
    per_task = {task: judged_rel_change(by_policy[policy])
                for task, by_policy in results.items() if policy in by_policy}
    changes = {t: c for t, c in per_task.items() if c is not None}
    physical = [by_policy[policy]["physical_budget"] for by_policy in results.values()
                if policy in by_policy]
    ideal = [by_policy[policy]["ideal_budget"] for by_policy in results.values()
             if policy in by_policy]
    worst_task = min(changes, key=lambda t: changes[t]) if changes else None
    summary: dict[str, Any] = {
        "policy": policy,
        "mean_rel_change": mean(changes.values()) if changes else None,
        "worst_rel_change": changes[worst_task] if worst_task is not None else None,
        "worst_task": worst_task,
        "mean_physical_budget": mean(physical) if physical else None,
        "mean_ideal_budget": mean(ideal) if ideal else None,
        "mean_agreement": mean(by_policy[policy]["agreement"] for by_policy in results.values()
                               if policy in by_policy) if physical else None,
        "rel_change_per_task": per_task,
        "excluded_tasks": sorted(t for t, c in per_task.items() if c is None),
    }
    if all("scores" in by_policy[policy] for by_policy in results.values()
           if policy in by_policy):
        summary.update(summary_intervals({task: results[task][policy] for task in changes}))
        summary["quality_goal_by_interval"] = quality_by_interval(summary)
    summary["meets_quality_goal"] = meets_quality(summary)
    summary["meets_goal"] = summary["meets_quality_goal"] and (
        summary["mean_physical_budget"] is not None
        and summary["mean_physical_budget"] <= GOAL["mean_physical_budget"])
    return summary


def meets_quality(summary: Mapping[str, Any]) -> bool:
    mean_c, worst = summary["mean_rel_change"], summary["worst_rel_change"]
    if mean_c is None:  # no task with a non-zero full-cache score: nothing lost, nothing shown
        return True
    return mean_c >= GOAL["mean_rel_change"] and worst >= GOAL["worst_rel_change"]


def quality_by_interval(summary: Mapping[str, Any]) -> str:
    """The quality goal judged by the 95% intervals: "met" when both intervals lie above their
    bounds, "missed" when either lies below, else "undecided" (more samples needed)."""
    mean_ci, worst_ci = summary.get("mean_rel_change_ci"), summary.get("worst_rel_change_ci")
    if mean_ci is None or worst_ci is None:
        return "met"  # no task with a non-zero full-cache score, as in meets_quality
    if mean_ci[0] >= GOAL["mean_rel_change"] and worst_ci[0] >= GOAL["worst_rel_change"]:
        return "met"
    if mean_ci[1] < GOAL["mean_rel_change"] or worst_ci[1] < GOAL["worst_rel_change"]:
        return "missed"
    return "undecided"


def quality_shortfall(summary: Mapping[str, Any]) -> float:
    """How far a policy is from the quality goal (0 when it meets it)."""
    if summary["mean_rel_change"] is None:
        return 0.0
    return (max(0.0, GOAL["mean_rel_change"] - summary["mean_rel_change"])
            + max(0.0, GOAL["worst_rel_change"] - summary["worst_rel_change"]))


def choose_default(summaries: Sequence[Mapping[str, Any]]) -> tuple[Mapping[str, Any], bool]:
    """Among ReFreeKV policies: the lowest mean physical budget of those meeting the goal;
    if none does, the one closest to the quality goal (ties: lower budget). Returns the
    summary and whether it meets the goal."""
    if not summaries:
        raise ValueError("no ReFreeKV policy was run")
    meeting = [s for s in summaries if s["meets_goal"]]
    if meeting:
        return min(meeting, key=lambda s: (s["mean_physical_budget"], s["policy"])), True
    return min(summaries, key=lambda s: (quality_shortfall(s), s["mean_physical_budget"],
                                         s["policy"])), False
