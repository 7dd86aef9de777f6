"""Markdown table and PNG plot of a serving benchmark result (``run_serving.py``)."""

from __future__ import annotations

import collections
import json
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

COLUMNS = [("output_tok_s", "out tok/s", "{:.1f}"), ("request_s", "req/s", "{:.2f}"),
           ("ttft_p50_ms", "TTFT p50 ms", "{:.0f}"), ("ttft_p99_ms", "TTFT p99 ms", "{:.0f}"),
           ("tpot_p50_ms", "TPOT p50 ms", "{:.2f}"), ("tpot_p99_ms", "TPOT p99 ms", "{:.2f}"),
           ("peak_running", "peak running", "{:.0f}"), ("mean_running", "mean running", "{:.1f}"),
           ("preemptions", "preempt.", "{:.0f}"), ("peak_kv_usage", "peak KV", "{:.2f}"),
           ("requests_pruned", "pruned", "{:.0f}"), ("physical_budget", "budget b", "{:.3f}"),
           ("engine_cpu_ms_per_token", "engine CPU ms/token", "{:.3f}")]
VARIANT_LABELS = {"plain": "plain vLLM", "default": "ReFreeKV default", "t0": "ReFreeKV T = 0",
                  "plain_v1": "plain vLLM, V1 runner", "alt": "ReFreeKV default, alt config"}


def _cell(value: Any, fmt: str) -> str:
    return "–" if value is None else fmt.format(value)


def workload_runs(runs: dict[str, Any]) -> Iterator[tuple[str, str, dict[str, Any]]]:
    """``(workload, variant, run)`` of a model's ``runs`` (the servers' health entries left
    out)."""
    for key, run in runs.items():
        if not key.startswith("health/"):
            workload, variant = key.split("/")
            yield workload, variant, run


def measured_runs(run: dict[str, Any]) -> list[dict[str, Any]]:
    """The single runs behind a reported one, in run order (rounds, then passes)."""
    parts = run.get("rounds") or run.get("passes")
    return [leaf for part in parts for leaf in measured_runs(part)] if parts else [run]


def decode_step_lines(model: dict[str, Any]) -> list[str]:
    """Mean time between decode-only steps of every single run (step timer): with runs of a
    few seconds, whether a gap repeats in every run tells an effect from the machine's noise."""
    rows = []
    for workload, variant, run in workload_runs(model["runs"]):
        decode = [(leaf.get("step_phases") or {}).get("decode") for leaf in measured_runs(run)]
        if not any(decode):
            continue
        cells = ", ".join("–" if d is None else f"{d['interval_mean_ms']:.2f} "
                          f"({d['mean_reqs']:.0f})" for d in decode)
        rows.append(f"| {workload} | {VARIANT_LABELS[variant]} | {cells} |")
    if not rows:
        return []
    return ["", "Decode steps: mean ms between steps (mean running requests), every run in run "
            "order:", "", "| workload | server | runs |", "|---|---|---|", *rows]


MIXED_PHASE_FLOOR_MS = 0.05  # phases below this in every server are left out of the table


@dataclass
class _MixedSteps:
    """Steps that ran prompt tokens, over every single run of a (workload, variant)."""
    steps: int
    wall_ms: dict[str, float]  # mean milliseconds per step of each phase
    cpu_ms: dict[str, float]  # of which its thread ran on a CPU (timers that record it)
    calls: dict[str, float]  # mean calls per step (timers that record it)
    timer_us: float | None  # wall time one timed call adds around it, if measured


def _mixed_steps(run: dict[str, Any]) -> _MixedSteps | None:
    steps = 0
    wall, cpu, calls = (collections.Counter[str]() for _ in range(3))
    timer_us: list[float] = []
    for leaf in measured_runs(run):
        phases = leaf.get("step_phases") or {}
        mixed = phases.get("mixed")
        if not mixed:
            continue
        n = mixed["steps"]
        steps += n
        wall.update({name: ms * n for name, ms in {
            **mixed["phase_mean_ms"], "time between steps": mixed["interval_mean_ms"]}.items()})
        cpu.update({name: ms * n for name, ms in mixed.get("phase_cpu_mean_ms", {}).items()})
        calls.update({name: c * n for name, c in mixed.get("phase_calls_mean", {}).items()})
        if phases.get("timer_overhead_per_call"):
            timer_us.append(phases["timer_overhead_per_call"]["wall_us"])
    if not steps:
        return None
    def per_step(counter: collections.Counter[str]) -> dict[str, float]:
        return {name: total / steps for name, total in counter.items()}

    return _MixedSteps(steps, per_step(wall), per_step(cpu), per_step(calls),
                       max(timer_us) if timer_us else None)


def _wall_and_cpu(wall: float | None, cpu: float | None) -> str:
    return _cell(wall, "{:.2f}") + (f" ({cpu:.2f})" if wall is not None and cpu is not None
                                    else "")


def mixed_step_lines(model: dict[str, Any]) -> list[str]:
    """Per workload, the host time of each timed call in steps that run prompt tokens, server
    by server: where a step that admits prompts spends its time (``STEP_TIMER_EXTRA`` adds the
    plugin's and FlashAttention's calls), how much of it was computing rather than waiting
    (for the GIL, a lock or the device), and how many calls a step made (each adds the
    timer's own cost to the calls around it)."""
    by_workload: dict[str, dict[str, _MixedSteps]] = {}
    for workload, variant, run in workload_runs(model["runs"]):
        mixed = _mixed_steps(run)
        if mixed is not None:
            by_workload.setdefault(workload, {})[variant] = mixed
    lines: list[str] = []
    for workload, variants in by_workload.items():
        names = sorted({name for v in variants.values() for name, ms in v.wall_ms.items()
                        if ms >= MIXED_PHASE_FLOOR_MS},
                       key=lambda name: -max(v.wall_ms.get(name, 0.0) for v in variants.values()))
        labels = [VARIANT_LABELS[variant] for variant in variants]
        with_cpu = any(v.cpu_ms for v in variants.values())
        timer = [v.timer_us for v in variants.values() if v.timer_us is not None]
        calls = {name: max(v.calls.get(name, 0.0) for v in variants.values()) for name in names}
        lines += ["", f"Steps that run prompt tokens, {workload}: mean ms per step of each timed "
                  "call (calls nest: a runner call is part of `execute_model`)"
                  + ("; in brackets the part its thread ran on a CPU" if with_cpu else "")
                  + ("; ×n: calls per step, where more than one" if any(
                      c > 1.5 for c in calls.values()) else "")
                  + (f". Each timed call adds {max(timer):.1f} µs to the calls around it"
                     if timer else ""), "",
                  "| call | " + " | ".join(labels) + " |", "|---|" + "---|" * len(labels),
                  "| steps | " + " | ".join(str(v.steps) for v in variants.values()) + " |"]
        lines += [f"| `{name}`" + (f" ×{calls[name]:.0f}" if calls[name] > 1.5 else "") + " | "
                  + " | ".join(_wall_and_cpu(v.wall_ms.get(name), v.cpu_ms.get(name))
                               for v in variants.values()) + " |"
                  for name in names]
    return lines


def repeat_lines(result: dict[str, Any]) -> list[str]:
    """Each variant's second pass over its first within a round (``repeat_ratios``): the
    noise floor of the run, for reading the ratios above."""
    repeats = result.get("repeat_ratios") or {}
    rows = [f"| {workload} | {VARIANT_LABELS[variant]} | "
            + ", ".join(f"{r:.3f}" for r in ratios) + " |"
            for workloads in repeats.values() for workload, variants in workloads.items()
            for variant, ratios in variants.items()]
    if not rows:
        return []
    spread = result.get("repeat_spread")
    return ["", "Noise floor: the same server on the same workload twice in a round (`A B C C B "
            "A`), output tok/s of the second pass over the first, per round"
            + (f"; median distance from 1: {spread:.3f}" if spread is not None else "") + ".",
            "", "| workload | server | rounds |", "|---|---|---|", *rows]


def write_markdown(result: dict[str, Any], path: Path) -> None:
    # Servers beside plain vLLM and ReFreeKV's two rules: (summary key, column title).
    extra = [(key, title) for key, title in (
        ("summary_plain_v1", "plain vLLM, V1 runner"),
        ("summary_alt", f"ReFreeKV default, `{json.dumps(result.get('alt_config'))}`"))
        if key in result]
    # A run split over invocations (--reuse) records each command.
    commands = result["command"] if isinstance(result["command"], list) else [result["command"]]
    lines = [f"# Serving: plain vLLM vs ReFreeKV ({result['device']})", "",
             " and ".join(f"`{command}`" for command in commands)
             + f" — vLLM {result['vllm_version']}, plugin {result['plugin_commit']}"
             + (f" (sources {result['plugin_source_digest']})"
                if "plugin_source_digest" in result else "") + ". "
             f"{result['note']}." + (f" {result['not_measured']}." if "not_measured" in result
                                     else ""), "",
             "## Ratios (ReFreeKV / plain vLLM, same run)", "",
             "Median over rounds of the ratio within each round.", "",
             "| ratio | default rule | T = 0 |" + "".join(f" {title} |" for _, title in extra),
             "|---|---|---|" + "---|" * len(extra)]
    for key, value in result["summary"].items():
        cells = [value, result["summary_t0"].get(key),
                 *(result[summary].get(key) for summary, _ in extra)]
        lines.append(f"| `{key}` | " + " | ".join(_cell(c, "{:.3f}") for c in cells) + " |")
    paired = result.get("round_ratios", {})
    if any(len(values) > 1 for rule in paired.values() for values in rule.values()):
        lines += ["", "Within each round (servers measured minutes apart), in round order:", "",
                  "| ratio | default rule | T = 0 |", "|---|---|---|"]
        for key in result["summary"]:
            cells = [", ".join(f"{v:.3f}" for v in paired.get(rule, {}).get(key, [])) or "–"
                     for rule in ("default", "t0")]
            lines.append(f"| `{key}` | " + " | ".join(cells) + " |")
    lines += repeat_lines(result)
    for model in result["models"].values():
        lines += ["", f"## {model['model']}", "",
                  f"Server flags (both servers): `{' '.join(model['server_flags'])}`"
                  + (". The servers ran one at a time (they do not fit the GPU together): each "
                     "ran all its rounds before the next started, so its ratios pair passes "
                     "minutes apart" if model.get("servers") == "one at a time" else "")
                  + (". Fresh servers for every round" if model.get("restart_per_round")
                     else ""), "",
                  "| workload | server | " + " | ".join(label for _, label, _ in COLUMNS)
                  + " |", "|---|---|" + "---|" * len(COLUMNS)]
        for workload, variant, run in workload_runs(model["runs"]):
            cells = [_cell(run.get(name), fmt) for name, _, fmt in COLUMNS]
            lines.append(f"| {workload} | {VARIANT_LABELS[variant]} | " + " | ".join(cells)
                         + " |")
        lines += decode_step_lines(model)
        lines += mixed_step_lines(model)
        lines += ["", "Workloads: " + "; ".join(
            f"{name}: {w['num_prompts']} {w['kind']} prompts"
            + (f" of {w['min_tokens']}-{w['max_tokens']} tokens" if w["kind"] == "long" else "")
            + f", {w['output_tokens'][0]}-{w['output_tokens'][1]} output tokens, "
            + (f"concurrency {w['max_concurrency']}" if w["max_concurrency"] else "all at once")
            for name, w in model["workloads"].items())]
    path.write_text("\n".join(lines) + "\n")


def write_plot(result: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    keys = [k for k, v in result["summary"].items() if k.endswith("_ratio") and v is not None]
    fig, ax = plt.subplots(figsize=(9, 4.5))
    width = 0.4
    for offset, (summary, label) in enumerate(((result["summary"], "default rule"),
                                               (result["summary_t0"], "T = 0"))):
        values = [summary.get(k) or 0.0 for k in keys]
        ax.bar([i + (offset - 0.5) * width for i in range(len(keys))], values, width,
               label=label)
    ax.axhline(1.0, color="black", linewidth=0.8)
    ax.set_xticks(range(len(keys)))
    ax.set_xticklabels([k.removesuffix("_ratio") for k in keys], rotation=30, ha="right",
                       fontsize=8)
    ax.set_ylabel("ReFreeKV / plain vLLM")
    ax.set_title(f"Serving ratios, {result['device']}")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
