"""One default for every model, chosen on the dev splits, reported on the test splits.

    # 1. every policy on each model's dev half
    python -m benchmarks.fidelity.run_fidelity --size stats --split dev --model smollm2
    python -m benchmarks.fidelity.run_fidelity --size stats --split dev --model qwen-coder
    # 2. the universal default: meets the goal on every model's dev half, lowest mean budget
    python -m benchmarks.fidelity.combine choose fidelity_stats_dev.json QWEN_DEV.json
    # 3. that policy once on each test half (--chosen, --iso-budget-of), then the report
    python -m benchmarks.fidelity.combine report --model smollm2=DEV.json,TEST.json \\
        --model qwen-coder=DEV.json,TEST.json --out benchmarks/results

``report`` writes ``fidelity.json`` (``summary.policy`` and, per model on the test split,
``summary.by_model``) and ``fidelity.md``.
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Mapping, Sequence
from pathlib import Path
from statistics import mean
from typing import Any

from benchmarks.fidelity.summary import GOAL, GOAL_TEXT, NEAR_ZERO_TEXT, quality_shortfall

PAPER_RULE = "refreekv-w1-T0.01"


def _summaries(result: Mapping[str, Any]) -> dict[str, Mapping[str, Any]]:
    return {s["policy"]: s for s in result["policy_summaries"]}


def choose_universal(dev_results: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
    """Among the ReFreeKV policies run on every model's dev split: those meeting the goal on
    every model, the lowest budget (mean over models); if none does, the smallest summed
    shortfall. Per-model or per-task choices are never made."""
    per_model = [_summaries(r) for r in dev_results]
    names = set.intersection(*(set(s) for s in per_model))
    candidates = sorted(n for n in names if n.startswith("refreekv-"))
    if not candidates:
        raise ValueError("no ReFreeKV policy ran on every model's dev split")

    def budget(name: str) -> float:
        return mean(s[name]["mean_physical_budget"] for s in per_model)

    meeting = [n for n in candidates if all(s[n]["meets_goal"] for s in per_model)]
    if meeting:
        chosen, met = min(meeting, key=lambda n: (budget(n), n)), True
    else:
        chosen = min(candidates, key=lambda n: (sum(quality_shortfall(s[n]) for s in per_model),
                                                budget(n), n))
        met = False
    return {"policy": chosen, "met_on_dev": met, "policies_compared": len(candidates),
            "mean_physical_budget_dev": budget(chosen),
            "models": [r["model"] for r in dev_results]}


def model_summary(test: Mapping[str, Any], policy: str) -> dict[str, Any]:
    """What the acceptance asks per model, on the test split."""
    summaries = _summaries(test)
    if policy not in summaries:
        raise ValueError(f"{policy} did not run on the test split of {test['model']}")
    s = summaries[policy]
    iso = test.get("iso_budget", {}).get(policy)
    fixed = iso["fixed_summary"] if iso else None
    paper = summaries.get(PAPER_RULE)
    paper_iso = test.get("iso_budget", {}).get(PAPER_RULE)
    summary = {
        "mean_rel_change": s["mean_rel_change"],
        "mean_rel_change_ci": s.get("mean_rel_change_ci"),
        "worst_rel_change": s["worst_rel_change"], "worst_task": s["worst_task"],
        "worst_rel_change_ci": s.get("worst_rel_change_ci"),
        "mean_physical_budget": s["mean_physical_budget"],
        # Samples of the tasks the quality is judged on (a task left out still ran).
        "n_samples": sum(t["policies"][policy]["n_samples"] for t in test["tasks"]
                         if t["name"] not in s["excluded_tasks"]),
        "n_samples_run": sum(t["policies"][policy]["n_samples"] for t in test["tasks"]),
        "meets_goal": s["meets_goal"],
        "quality_goal_by_interval": s.get("quality_goal_by_interval"),
        "excluded_tasks": s["excluded_tasks"],
        "iso_budget_fixed_rel_change": fixed["mean_rel_change"] if fixed else None,
        "iso_budget_fixed_rel_change_ci": fixed.get("mean_rel_change_ci") if fixed else None,
        "iso_budget_fixed_physical_budget": fixed["mean_physical_budget"] if fixed else None,
        "paper_rule": None if paper is None else {
            key: paper.get(key) for key in (
                "mean_rel_change", "mean_rel_change_ci", "worst_rel_change",
                "mean_physical_budget", "meets_goal", "quality_goal_by_interval")},
        "paper_rule_iso_fixed_rel_change": (paper_iso["fixed_summary"]["mean_rel_change"]
                                            if paper_iso else None),
        "noise_floor_rel_change": (test.get("noise_floor_summary") or {}).get(
            "mean_rel_change"),
    }
    summary["meets_goal_by_interval"] = goal_verdict(summary) == "yes"
    return summary


def beats_fixed(summary: Mapping[str, Any]) -> str:
    """ReFreeKV against the fixed budget at equal memory, judged by the intervals."""
    ours, theirs = summary["mean_rel_change_ci"], summary["iso_budget_fixed_rel_change_ci"]
    if ours is None or theirs is None:
        return "not measured"
    if ours[0] > theirs[1]:
        return "yes"
    if ours[1] < theirs[0]:
        return "no (the fixed budget is better)"
    return "not distinguishable (intervals overlap)"


def goal_verdict(summary: Mapping[str, Any]) -> str:
    """The goal judged as the acceptance asks: quality by the 95% intervals, and the budget."""
    quality = summary.get("quality_goal_by_interval")
    budget = summary.get("mean_physical_budget")
    if quality is None or budget is None:
        return "not measured"
    fits = budget <= GOAL["mean_physical_budget"]
    if quality == "met" and fits:
        return "yes"
    reasons = [] if quality == "met" else [f"quality {quality} by the intervals"]
    if not fits:
        reasons.append(f"budget {budget:.3f} above {GOAL['mean_physical_budget']}")
    return "no (" + "; ".join(reasons) + ")"


def _pct(x: float | None) -> str:
    return "n/a" if x is None else f"{100 * x:+.1f}%"


def _ci(ci: Sequence[float] | None) -> str:
    return "" if ci is None else f" [{_pct(ci[0])}, {_pct(ci[1])}]"


def write_report(result: Mapping[str, Any], path: Path) -> None:
    summary = result["summary"]
    lines = ["# ReFreeKV fidelity: one default, chosen on dev, reported on test", "",
             f"Goal: {GOAL_TEXT}; judged by the 95% intervals.", "",
             f"Default: **{summary['policy']}**, chosen on the dev splits of "
             f"{', '.join(summary['models'])} among {summary['policies_compared']} ReFreeKV "
             f"policies ({'meets' if summary['met_on_dev'] else 'does not meet'} the goal there, "
             f"mean physical budget {summary['mean_physical_budget_dev']:.3f}).", ""]
    for model, s in summary["by_model"].items():
        paper = s["paper_rule"] or {}
        lines += [f"## {model} (test split, {s['n_samples']} samples judged)", "",
                  f"**Default meets the goal: {goal_verdict(s)}.**", "",
                  f"- Default: mean change {_pct(s['mean_rel_change'])}"
                  f"{_ci(s['mean_rel_change_ci'])}, worst {_pct(s['worst_rel_change'])} "
                  f"({s['worst_task']}){_ci(s['worst_rel_change_ci'])}, physical budget "
                  f"{s['mean_physical_budget']:.3f}.",
                  f"- Paper's rule (meets the goal: {goal_verdict(paper)}): mean change "
                  f"{_pct(paper.get('mean_rel_change'))}{_ci(paper.get('mean_rel_change_ci'))}"
                  f", physical budget {paper.get('mean_physical_budget') or float('nan'):.3f}.",
                  f"- Fixed budget at the default's memory "
                  f"({s['iso_budget_fixed_physical_budget'] or float('nan'):.3f}): mean change "
                  f"{_pct(s['iso_budget_fixed_rel_change'])}"
                  f"{_ci(s['iso_budget_fixed_rel_change_ci'])}. ReFreeKV better at equal "
                  f"memory: {beats_fixed(s)}.",
                  f"- Noise floor (full cache run again): {_pct(s['noise_floor_rel_change'])}.",
                  ""]
        if s["excluded_tasks"]:
            lines += [f"Left out of the changes ({NEAR_ZERO_TEXT}): "
                      f"{', '.join(s['excluded_tasks'])}.", ""]
        sources = result.get("sources", {}).get(model, {})
        if sources:
            lines += ["Per task, every policy and the plots: "
                      + ", ".join(f"[{split}]({name}.md)" for split, name in sources.items())
                      + ".", ""]
            lines += [f"![{name}]({name}_score_vs_budget.png)" for name in sources.values()
                      if (path.parent / f"{name}_score_vs_budget.png").exists()]
            lines.append("")
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")


PER_SAMPLE_KEYS = ("scores", "full_scores")


def _condensed(result: Mapping[str, Any]) -> dict[str, Any]:
    """A run's result without its per-sample score lists (its own file keeps them)."""
    tasks = [{**task, "policies": {name: {k: v for k, v in metrics.items()
                                          if k not in PER_SAMPLE_KEYS}
                                   for name, metrics in task["policies"].items()}}
             for task in result.get("tasks", [])]
    return {**result, "tasks": tasks}


def report(models: Mapping[str, tuple[Path, Path]], out_dir: Path) -> dict[str, Any]:
    dev = {name: json.loads(paths[0].read_text()) for name, paths in models.items()}
    test = {name: json.loads(paths[1].read_text()) for name, paths in models.items()}
    for name in models:
        if dev[name].get("split") != "dev" or test[name].get("split") != "test":
            raise ValueError(f"{name}: expected a dev and a test result, got "
                             f"{dev[name].get('split')} and {test[name].get('split')}")
    choice = choose_universal(list(dev.values()))
    for name in models:
        reported = test[name].get("summary", {})
        if reported.get("rule", "").startswith("chosen before") and \
                reported["policy"] != choice["policy"]:
            raise ValueError(f"{name}: the test split reports {reported['policy']}, the dev "
                             f"splits choose {choice['policy']}: rerun the test split with "
                             f"--chosen {choice['policy']}")
    choice["by_model"] = {name: model_summary(test[name], choice["policy"]) for name in models}
    sources = {name: {"dev": paths[0].stem, "test": paths[1].stem}
               for name, paths in models.items()
               if all(p.parent.resolve() == out_dir.resolve() for p in paths)}
    result = {"goal": {**GOAL, "text": GOAL_TEXT}, "summary": choice, "sources": sources,
              "models": {name: {"dev": _condensed(dev[name]), "test": _condensed(test[name])}
                         for name in models}}
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "fidelity.json").write_text(json.dumps(result, indent=1) + "\n")
    write_report(result, out_dir / "fidelity.md")
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    commands = parser.add_subparsers(dest="command", required=True)
    choose = commands.add_parser("choose", help="the universal default from dev results")
    choose.add_argument("dev_results", nargs="+", type=Path)
    combine = commands.add_parser("report", help="fidelity.json/.md from dev and test results")
    combine.add_argument("--model", action="append", required=True,
                         help="NAME=DEV.json,TEST.json (once per model)")
    combine.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()
    if args.command == "choose":
        print(json.dumps(choose_universal([json.loads(p.read_text())
                                           for p in args.dev_results]), indent=1))
        return
    models = {}
    for spec in args.model:
        name, _, paths = spec.partition("=")
        dev, _, test = paths.partition(",")
        models[name] = (Path(dev), Path(test))
    print(json.dumps(report(models, args.out)["summary"], indent=1))


if __name__ == "__main__":
    main()
