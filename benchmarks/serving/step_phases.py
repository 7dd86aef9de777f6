"""Per-step host phases of an engine core, from the step timer's records (``step_timer/``).

A step starts at a ``schedule`` call that scheduled something; every call belongs to the step
that started last before it (under async scheduling the wait for a step's tokens and
``update_from_output`` of the step before run after the next ``schedule``, so a step's row holds
one loop iteration of the engine core). Steps are split into decode-only and mixed (some request
is in prefill) and decode steps also by how many requests ran, so that two servers are compared
step for step.
"""

from __future__ import annotations

import bisect
import collections
import json
import statistics
import time
from pathlib import Path
from typing import Any

# The engine core's own calls, one after the other in a step; the runner's sub-steps run
# inside execute_model and sample_tokens.
ENGINE_PHASES = ("schedule", "execute_model", "sample_tokens", "wait_output",
                 "update_from_output")
RUNNING_BUCKETS = (1, 8, 16, 24, 32, 48, 64, 128, 256)


def running_bucket(running: int) -> str:
    """Decode steps are compared among steps with about as many requests."""
    low = 1
    for high in RUNNING_BUCKETS:
        if running <= high:
            return f"{low:03d}-{high:03d}"
        low = high + 1
    return f"{low:03d}+"


def wait_for_records(step_dir: Path, quiet_s: float = 2.0, timeout_s: float = 30.0) -> None:
    """Wait until the step timer has written what a finished run recorded: it writes once its
    process has been idle for a moment, so the files stop growing for ``quiet_s``."""
    def size() -> int:
        return sum(path.stat().st_size for path in step_dir.glob("steps-*.jsonl"))

    deadline = time.monotonic() + timeout_s
    last, quiet_since = size(), time.monotonic()
    while time.monotonic() < deadline:
        time.sleep(0.25)
        now = size()
        if now != last:
            last, quiet_since = now, time.monotonic()
        elif time.monotonic() - quiet_since >= quiet_s:
            return


def read_records(step_dir: Path, start: float, end: float) -> list[list[Any]]:
    """The records of calls that started in ``[start, end)`` (monotonic clock)."""
    records: list[list[Any]] = []
    for path in sorted(step_dir.glob("steps-*.jsonl")):
        with open(path) as file:
            for line in file:
                record = json.loads(line)
                if start <= record[1] < end:
                    records.append(record)
    return records


def read_timer_overhead(step_dir: Path) -> dict[str, float] | None:
    """Microseconds of wall and CPU time one timed call adds to the phases around it, the
    largest of the processes' own measurements (``overhead-<pid>.json``), or None."""
    found = [json.loads(path.read_text()) for path in sorted(step_dir.glob("overhead-*.json"))]
    if not found:
        return None
    return {"wall_us": 1e6 * max(entry["wall_s"] for entry in found),
            "cpu_us": 1e6 * max(entry["cpu_s"] for entry in found)}


def summarise_steps(records: list[list[Any]]) -> dict[str, Any]:
    """Per kind of step (and per running bucket of decode steps): the median interval between
    step starts and the mean milliseconds per step of every phase; ``other`` is the part of the
    interval no engine phase covers (the engine core's loop, input and output handling); per
    phase the mean milliseconds of the calling thread's CPU time (the rest of a phase's time
    the thread waited: for the GIL, the device or I/O) and the mean number of calls."""
    starts = sorted(r for r in records if r[0] == "schedule" and r[4])
    steps = [{"start": start, "reqs": reqs, "tokens": tokens, "phases": collections.Counter(),
              "cpu": collections.Counter(), "calls": collections.Counter()}
             for _, start, _, _, reqs, tokens in starts]
    step_starts = [row["start"] for row in steps]
    for name, start, seconds, cpu_seconds, *_ in records:
        index = bisect.bisect_right(step_starts, start) - 1
        if index >= 0 and (name != "schedule" or step_starts[index] == start):
            steps[index]["phases"][name] += seconds * 1e3
            steps[index]["cpu"][name] += cpu_seconds * 1e3
            steps[index]["calls"][name] += 1
    groups: dict[str, list[dict[str, Any]]] = collections.defaultdict(list)
    for row, following in zip(steps, steps[1:], strict=False):
        row["interval_ms"] = (following["start"] - row["start"]) * 1e3
        kind = "decode" if row["tokens"] == row["reqs"] else "mixed"
        groups[kind].append(row)
        if kind == "decode":
            groups[f"decode {running_bucket(row['reqs'])}"].append(row)
    return {kind: _group_stats(rows) for kind, rows in sorted(groups.items())}


def _group_stats(rows: list[dict[str, Any]]) -> dict[str, Any]:
    intervals = [row["interval_ms"] for row in rows]
    phases: collections.Counter[str] = collections.Counter()
    cpu: collections.Counter[str] = collections.Counter()
    calls: collections.Counter[str] = collections.Counter()
    for row in rows:
        phases.update(row["phases"])
        cpu.update(row["cpu"])
        calls.update(row["calls"])
    mean_phases = {name: total / len(rows) for name, total in sorted(phases.items())}
    mean_interval = statistics.fmean(intervals)
    return {
        "steps": len(rows),
        "mean_reqs": statistics.fmean(row["reqs"] for row in rows),
        "interval_median_ms": statistics.median(intervals),
        "interval_mean_ms": mean_interval,
        "phase_mean_ms": mean_phases,
        "phase_cpu_mean_ms": {name: total / len(rows) for name, total in sorted(cpu.items())},
        # Calls per step: with the timer's overhead per call, how much of a phase is the timer.
        "phase_calls_mean": {name: total / len(rows) for name, total in sorted(calls.items())},
        "other_mean_ms": mean_interval - sum(mean_phases.get(p, 0.0) for p in ENGINE_PHASES),
    }
