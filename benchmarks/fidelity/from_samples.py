"""Summaries of a fidelity run rebuilt from its samples file, for a run that was stopped before
it finished (every (task, policy) pair whose samples are all in the file is kept; the others
are left out and named).

    python -m benchmarks.fidelity.from_samples RESULTS/fidelity_stats_dev_samples.jsonl \\
        --model SmolLM2-135M-Instruct --command "python -m benchmarks.fidelity.run_fidelity ..."

Writes ``<stem>.json`` and ``.md`` (and plots) next to the samples file, ``<stem>`` being the
samples file's name without ``_samples.jsonl`` (a gzipped ``.jsonl.gz`` is read as well).
"""

from __future__ import annotations

import argparse
import gzip
import json
from collections import defaultdict
from pathlib import Path
from typing import Any

from benchmarks.fidelity import policies as pol
from benchmarks.fidelity.report import write_result
from benchmarks.fidelity.run_fidelity import (
    iso_budget_entry,
    iso_target,
    result_header,
    summarise,
)
from benchmarks.fidelity.summary import policy_summary, task_metrics


def read_samples(path: Path) -> dict[str, dict[str, list[dict[str, Any]]]]:
    """task -> policy -> sample records, in file order."""
    by_task: dict[str, dict[str, list[dict[str, Any]]]] = defaultdict(dict)
    with (gzip.open(path, "rt", encoding="utf-8") if path.suffix == ".gz"
          else open(path, encoding="utf-8")) as f:
        for line in f:
            record = json.loads(line)
            by_task[record["task"]].setdefault(record["policy"], []).append(record)
    return dict(by_task)


def rebuild(samples: dict[str, dict[str, list[dict[str, Any]]]]
            ) -> tuple[list[dict[str, Any]], list[str], list[str]]:
    """``result["tasks"]`` entries of the complete (task, policy) pairs, the policies run on
    every kept task, and what was left out."""
    tasks: list[dict[str, Any]] = []
    left_out: list[str] = []
    for name, by_policy in samples.items():
        full = by_policy.get(pol.FULL.name)
        if full is None:
            left_out.append(f"{name} (no full-cache reference)")
            continue
        ids = [s["id"] for s in full]
        policies: dict[str, Any] = {}
        for policy, records in by_policy.items():
            if [s["id"] for s in records] != ids:
                left_out.append(f"{name}/{policy} ({len(records)} of {len(ids)} samples)")
                continue
            policies[policy] = task_metrics(
                name, [s["score"] for s in records], [s["score"] for s in full],
                [s["output"] for s in records], [s["output"] for s in full],
                [s["ideal"] for s in records], [s["physical"] for s in records], wall_s=0.0)
        tasks.append({"name": name, "metric": "", "notes": "", "policies": policies,
                      "subset_ids": ids})
    everywhere = [p for p in tasks[0]["policies"]
                  if all(p in t["policies"] for t in tasks)] if tasks else []
    for task in tasks:
        for policy in [p for p in task["policies"] if p not in everywhere]:
            left_out.append(f"{task['name']}/{policy} (not run on every task)")
            del task["policies"][policy]
    return tasks, everywhere, left_out


# A rebuilt comparison at equal memory takes a fixed-budget run at most this far from the
# policy's mean physical budget (a stopped run may hold only the baselines of other targets).
MAX_ISO_MISS = 0.05


def iso_budget_baselines(tasks: list[dict[str, Any]], policies: list[pol.Policy],
                         iso_of: list[str]) -> tuple[dict[str, Any], list[str]]:
    """``result["iso_budget"]`` for the policies ``iso_of``, from the complete fixed-budget
    runs, and the policies left without one."""
    table = {t["name"]: t["policies"] for t in tasks}
    fixed = {p.name: policy_summary(table, p.name)["mean_physical_budget"]
             for p in policies if p.fixed}
    entries, unmatched = {}, []
    for name in iso_of:
        target = iso_target(table, name)
        entry = iso_budget_entry(target, fixed) if fixed else None
        if entry is None or abs(fixed[entry["fixed"]] - target) > MAX_ISO_MISS:
            unmatched.append(f"iso-budget baseline of {name} (no complete fixed-budget run "
                             f"within {MAX_ISO_MISS} of its budget {target})")
        else:
            entries[name] = entry
    return entries, unmatched


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("samples", type=Path)
    parser.add_argument("--model", required=True, help="the model the run served")
    parser.add_argument("--command", required=True, help="the command that made the samples")
    parser.add_argument("--dtype", default="bfloat16")
    parser.add_argument("--size", default="stats", help="the run's --size")
    parser.add_argument("--split", default="all", help="the run's --split")
    parser.add_argument("--tasks", default="",
                        help="comma-separated tasks to summarise (default: every task in the "
                             "file; the others are named as left out)")
    parser.add_argument("--chosen", default=None, help="the run's --chosen")
    parser.add_argument("--iso-budget-of", default="",
                        help="the run's --iso-budget-of: each policy's fixed baseline is the "
                             "complete fixed-budget run closest to its mean physical budget")
    args = parser.parse_args()
    samples = read_samples(args.samples)
    wanted = [name for name in args.tasks.split(",") if name] or list(samples)
    if set(wanted) - set(samples):
        raise SystemExit(f"no samples of {sorted(set(wanted) - set(samples))} in {args.samples}")
    left_out = [f"{name} (not summarised: not in --tasks)" for name in samples
                if name not in wanted]
    tasks, names, incomplete = rebuild({name: samples[name] for name in wanted})
    left_out += incomplete
    if not tasks:
        raise SystemExit(f"no complete task in {args.samples}")
    if args.chosen is not None and args.chosen not in names:
        raise SystemExit(f"--chosen {args.chosen} has no complete samples on every task")
    policies = pol.select(pol.full_grid(), names)
    stem = args.samples.name.removesuffix(".gz").removesuffix("_samples.jsonl")
    iso_of = [name for name in args.iso_budget_of.split(",") if name in names]
    iso_budget, unmatched = iso_budget_baselines(tasks, policies, iso_of)
    result = result_header(args.command, args.model, policies, {"dtype": args.dtype},
                           args.size, args.split)
    result.update(tasks=tasks, wall_s=None, stopped_early=True, left_out=left_out + unmatched,
                  iso_budget=iso_budget)
    summarise(result, policies, args.chosen)
    out_dir = args.samples.parent
    write_result(result, out_dir, stem)
    print(f"wrote {out_dir / stem}.json/.md from {len(tasks)} task(s); "
          f"left out: {result['left_out']}")


if __name__ == "__main__":
    main()
