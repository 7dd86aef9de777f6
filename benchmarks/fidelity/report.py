"""Markdown report and plots of a fidelity run (``fidelity[_quick].json`` → ``.md`` + PNGs)."""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from benchmarks.fidelity.summary import GOAL_TEXT, NEAR_ZERO_TEXT, rel_change


def _pct(x: float | None, signed: bool = False) -> str:
    if x is None:
        return "n/a"
    return f"{100 * x:+.1f}%" if signed else f"{100 * x:.1f}%"


def _ci(interval: list[float] | None) -> str:
    """`` [low, high]`` of a relative change in percent, or nothing (results without samples)."""
    if interval is None:
        return ""
    return f" [{_pct(interval[0], True)}, {_pct(interval[1], True)}]"


def _verdict(summary: Mapping[str, Any] | None) -> str:
    if summary is None:
        return "not run (left out by --policies)."
    ok = "meets" if summary["meets_goal"] else "does not meet"
    worst = (f"worst {_pct(summary['worst_rel_change'], True)} on {summary['worst_task']}"
             if summary["worst_task"] else "no task left to judge")
    excluded = (f"; left out ({NEAR_ZERO_TEXT}): {', '.join(summary['excluded_tasks'])}"
                if summary["excluded_tasks"] else "")
    by_interval = (f" (quality goal by the 95% intervals: {summary['quality_goal_by_interval']})"
                   if "quality_goal_by_interval" in summary else "")
    return (f"**{summary['policy']}** {ok} the goal{by_interval}: mean relative change "
            f"{_pct(summary['mean_rel_change'], True)}"
            f"{_ci(summary.get('mean_rel_change_ci'))}, {worst}"
            f"{_ci(summary.get('worst_rel_change_ci'))}, mean physical budget "
            f"{summary['mean_physical_budget']:.3f} (ideal {summary['mean_ideal_budget']:.3f}), "
            f"mean agreement with the full cache {_pct(summary['mean_agreement'])}{excluded}.")


def _fixed_failures(summary: Mapping[str, Any]) -> str:
    drops = {t: c for t, c in summary["rel_change_per_task"].items() if c is not None}
    failing = {t: c for t, c in drops.items() if c < -0.03}
    if not failing:
        return (f"**{summary['policy']}** loses no task by more than 3% (mean "
                f"{_pct(summary['mean_rel_change'], True)}, physical budget "
                f"{summary['mean_physical_budget']:.3f}).")
    listed = ", ".join(f"{t} {_pct(c, True)}" for t, c in sorted(failing.items(),
                                                                  key=lambda kv: kv[1]))
    return (f"**{summary['policy']}** (physical budget {summary['mean_physical_budget']:.3f}) "
            f"fails on {listed}.")


def _policy_table(summaries: list[Mapping[str, Any]]) -> list[str]:
    lines = ["| policy | mean rel. change [95% CI] | worst task [95% CI] | "
             "mean physical budget | mean ideal budget | mean agreement | meets goal "
             "(by the intervals) |",
             "| --- | --- | --- | --- | --- | --- | --- |"]
    for s in summaries:
        worst = (f"{s['worst_task']} {_pct(s['worst_rel_change'], True)}"
                 f"{_ci(s.get('worst_rel_change_ci'))}" if s["worst_task"] else "n/a")
        judged = (f" ({s['quality_goal_by_interval']})" if "quality_goal_by_interval" in s
                  else "")
        lines.append(f"| {s['policy']} | {_pct(s['mean_rel_change'], True)}"
                     f"{_ci(s.get('mean_rel_change_ci'))} | {worst} | "
                     f"{s['mean_physical_budget']:.3f} | {s['mean_ideal_budget']:.3f} | "
                     f"{_pct(s['mean_agreement'])} | "
                     f"{'yes' if s['meets_goal'] else 'no'}{judged} |")
    return lines


def _task_table(task: Mapping[str, Any]) -> list[str]:
    metric = f" — {task['metric']} (%)" if task["metric"] else ""
    lines = [f"### {task['name']}{metric}", "", task["notes"], "",
             "| policy | score | rel. change [95% CI] | full score | agreement | ideal budget | "
             "physical budget | n | wall s |",
             "| --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    for name, m in task["policies"].items():
        lines.append(f"| {name} | {_pct(m['score'])} | {_pct(rel_change(m), True)}"
                     f"{_ci(m.get('rel_change_ci'))} | {_pct(m['full_score'])} | "
                     f"{_pct(m['agreement'])} | {m['ideal_budget']:.3f} | "
                     f"{m['physical_budget']:.3f} | {m['n_samples']} | {m['wall_s']:.1f} |")
    return lines + [""]


def plot(result: Mapping[str, Any], out_dir: Path, suffix: str) -> list[str]:
    """Score and agreement against physical budget, one panel per task, one series per policy
    family (a ReFreeKV family is one window setting across thresholds). Returns the PNG names."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    families = result["policy_families"]
    order = list(dict.fromkeys(families[name] for name in result["policies"]))
    colors = {f: plt.get_cmap("tab10")(i % 10) for i, f in enumerate(order)}
    tasks = result["tasks"]
    cols = 3
    rows = -(-(len(tasks) + 1) // cols)  # one spare panel holds the legend
    names = []
    for key, label in (("score", "score"), ("agreement", "agreement with full cache")):
        fig, axes = plt.subplots(rows, cols, figsize=(4.4 * cols, 3.4 * rows), squeeze=False)
        flat = list(axes.flat)
        for ax, task in zip(flat, tasks, strict=False):
            series: dict[str, list[tuple[float, float]]] = {}
            for name, m in task["policies"].items():
                series.setdefault(families[name], []).append((m["physical_budget"], m[key]))
            for family in order:
                points = sorted(series.get(family, []))
                if not points:
                    continue
                styles: dict[str, dict[str, Any]] = {
                    "full cache": dict(marker="*", markersize=13, linestyle="none"),
                    "fixed budget": dict(marker="s", linestyle="--")}
                style = styles.get(family, dict(marker="o", linestyle="-"))
                ax.plot([p[0] for p in points], [100 * p[1] for p in points], label=family,
                        color=colors[family], **style)
            ax.set_title(f"{task['name']}: {task['metric'] or 'score'}" if key == "score"
                         else task["name"], fontsize=10)
            ax.set_xlabel("physical budget (resident prompt blocks)", fontsize=8)
            ax.set_ylabel(f"{label} (%)", fontsize=8)
            ax.set_xlim(0, 1.05)
            ax.set_ylim(-4, 104)
            ax.grid(alpha=0.3)
        handles, labels = flat[0].get_legend_handles_labels()
        for ax in flat[len(tasks):]:
            ax.axis("off")
        flat[len(tasks)].legend(handles, labels, loc="center", fontsize=9)
        fig.tight_layout()
        name = f"fidelity{suffix}_{key}_vs_budget.png"
        fig.savefig(out_dir / name, dpi=80)
        plt.close(fig)
        names.append(name)
    return names


def _wall_time(result: Mapping[str, Any]) -> str:
    if result["wall_s"] is not None:
        return f"{result['wall_s']:.0f} s."
    left_out = result.get("left_out")
    return ("not recorded: the run was stopped and its summaries rebuilt from its samples "
            "(`benchmarks.fidelity.from_samples`)"
            + (f"; left out: {', '.join(left_out)}." if left_out else "."))


def write_result(result: Mapping[str, Any], out_dir: Path, stem: str) -> None:
    """A run's ``<stem>.json``, its plots and ``<stem>.md`` (stems start with ``fidelity``)."""
    (out_dir / f"{stem}.json").write_text(json.dumps(result, indent=1) + "\n", encoding="utf-8")
    images = plot(result, out_dir, stem[len("fidelity"):])
    write_markdown(result, out_dir / f"{stem}.md", images)


def write_markdown(result: Mapping[str, Any], path: Path, images: list[str]) -> None:
    summary, paper = result["summary"], result["paper_rule_summary"]
    configured, machine = result["configured_default_summary"], result["machine"]
    lines = [f"# ReFreeKV fidelity{' (quick)' if result['quick'] else ''}", "",
             f"Model {result['model']}; {machine.get('gpu') or machine['cpu_model']}"
             f" ({machine['cpu_cores']} cores); total wall time {_wall_time(result)}",
             "", f"Command: `{result['command']}`", "",
             "Every policy runs in one engine (prefix caching on), selected per request through "
             "`vllm_xargs`; greedy decoding; each task's samples run as one batch per policy. "
             "Agreement = exact match of the generated text with the full-cache output of the "
             "same sample. Ideal budget = the paper's token-level budget (mean over layers); "
             "physical budget = prompt KV blocks still resident / prompt blocks, over all layers. "
             "The full cache's wall time includes the prefill that the full-cache rerun and "
             "the first pruned policy reuse from the prefix cache (a pruned request recomputes "
             "only its last window's tokens); pruning takes the pruned blocks out of the prefix "
             "cache, so each later policy computes its prompts again.",
             "", f"Goal: {GOAL_TEXT}.", "",
             f"Samples: {result.get('size', 'full')} size, {result.get('split', 'all')} split; "
             f"{summary.get('policies_compared', 'n/a')} ReFreeKV policies compared "
             "(a choice among many policies on few samples is partly chance: choose on the dev "
             "split, report on the test split).", "", "## Verdict", ""]
    if summary["rule"].startswith("chosen before"):
        lines.append(f"Reported policy, chosen before this run: {_verdict(summary)}")
    elif summary["met"]:
        lines.append(f"Default policy by the rule (lowest mean physical budget among the "
                     f"ReFreeKV policies that meet the goal): {_verdict(summary)}")
    else:
        lines.append(f"**No ReFreeKV policy met the goal.** Closest to the quality goal: "
                     f"{_verdict(summary)}")
    lines += ["", f"- Engine's configured default: {_verdict(configured)}",
              f"- Paper's rule (w=1, T=0.01): {_verdict(paper)}"]
    for name, iso in result.get("iso_budget", {}).items():
        refreekv = next(s for s in result["policy_summaries"] if s["policy"] == name)
        fixed = iso["fixed_summary"]
        lines.append(
            f"- At equal memory: **{name}** {_pct(refreekv['mean_rel_change'], True)}"
            f"{_ci(refreekv.get('mean_rel_change_ci'))} at physical budget "
            f"{refreekv['mean_physical_budget']:.3f} against **{fixed['policy']}** "
            f"{_pct(fixed['mean_rel_change'], True)}{_ci(fixed.get('mean_rel_change_ci'))} at "
            f"{fixed['mean_physical_budget']:.3f}.")
    for fixed in result["fixed_summaries"]:
        lines.append(f"- {_fixed_failures(fixed)}")
    noise = result.get("noise_floor_summary")
    if noise:
        lines.append(f"- Noise floor: the full cache run again (prefix-cache hits instead of a "
                     f"cold prefill) agrees with the first run on "
                     f"{_pct(noise['mean_agreement'])} of the samples (mean over tasks), "
                     f"mean relative change {_pct(noise['mean_rel_change'], True)}.")
    lines += ["", "## All policies", "", *_policy_table(result["policy_summaries"]), ""]
    lines += [f"![{name}]({name})" for name in images] + ["", "## Per task", ""]
    for task in result["tasks"]:
        lines += _task_table(task)
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
