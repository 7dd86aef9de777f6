"""Fidelity benchmark: full cache vs ReFreeKV (several T, windows) vs fixed budgets on passkey,
multi-needle, GSM8K, HumanEval and reading-comprehension tasks, in one vLLM engine.

    python -m benchmarks.fidelity.run_fidelity            # full run (~1 h on 2 CPU cores)
    python -m benchmarks.fidelity.run_fidelity --quick    # a few samples, 4 policies (< 5 min)
    # with intervals: choose on the dev half, report once on the held-out test half
    python -m benchmarks.fidelity.run_fidelity --size stats --split dev
    python -m benchmarks.fidelity.run_fidelity --size stats --split test --chosen C \
        --policies full-rerun,C,refreekv-w1-T0.01 --iso-budget-of C,refreekv-w1-T0.01

Writes ``fidelity[_quick][_stats][_<split>].json``, ``.md``, ``_samples.jsonl`` (every output)
and PNG plots into ``--out-dir``.
"""

from __future__ import annotations

import argparse
import json
import shlex
import sys
import time
from collections.abc import Mapping
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from benchmarks.fidelity import engine as eng
from benchmarks.fidelity import policies as pol
from benchmarks.fidelity.report import write_result
from benchmarks.fidelity.summary import (
    GOAL,
    GOAL_TEXT,
    choose_default,
    policy_summary,
    task_metrics,
)
from benchmarks.fidelity.tasks import (
    FULL_SIZES,
    QUICK_SIZES,
    SPLITS,
    STATS_LONG_SIZES,
    STATS_SIZES,
    TASK_NAMES,
    Task,
    build_tasks,
    keep_split,
)

REPO = Path(__file__).resolve().parents[2]
SIZES = {"full": FULL_SIZES, "stats": STATS_SIZES, "stats-long": STATS_LONG_SIZES}


def log(message: str, start: float) -> None:
    print(f"[fidelity {time.perf_counter() - start:7.1f} s] {message}", flush=True)


def model_path(args: argparse.Namespace) -> tuple[str, str]:
    """(display name, local directory) of the model to serve."""
    if args.model_path:
        return Path(args.model_path).name, args.model_path
    if args.model == "qwen-coder":
        from refreekv_vllm.models import QWEN_CODER_NAME, prepare_qwen_coder

        return QWEN_CODER_NAME, str(prepare_qwen_coder())
    from refreekv_vllm.models import DEFAULT_MODEL_NAME, prepare_smollm2

    return DEFAULT_MODEL_NAME, str(prepare_smollm2())


def run_task(llm: Any, task: Task, policies: list[pol.Policy], samples_file: Any,
             start: float, position: str, reference: dict[str, list] | None = None
             ) -> dict[str, Any]:
    """Every policy on the task's samples. ``reference`` holds the full cache's ``outputs`` and
    ``scores`` (filled by the ``full`` policy, or given when it ran in an earlier pass)."""
    log(f"task {position} {task.name}: {len(task.samples)} samples, prompts "
        f"{min(len(s.prompt_ids) for s in task.samples)}-"
        f"{max(len(s.prompt_ids) for s in task.samples)} tokens", start)
    by_policy: dict[str, dict[str, Any]] = {}
    reference = {} if reference is None else reference
    full_outputs: list[str] = reference.get("outputs", [])
    full_scores: list[float] = reference.get("scores", [])
    for i, policy in enumerate(policies):
        batch = eng.run_batch(llm, task, policy)
        scores = [task.score(s, out) for s, out in zip(task.samples, batch.outputs, strict=True)]
        if policy == pol.FULL:
            full_outputs, full_scores = batch.outputs, scores
            reference.update(outputs=full_outputs, scores=full_scores)
        metrics = task_metrics(task.name, scores, full_scores, batch.outputs, full_outputs,
                               [b.ideal for b in batch.budgets],
                               [b.physical for b in batch.budgets], batch.wall_s)
        if policy.rule is not None:
            metrics["unreported"] = sum(not b.reported for b in batch.budgets)
        by_policy[policy.name] = metrics
        for s, out, ref, score, b in zip(task.samples, batch.outputs, full_outputs, scores,
                                         batch.budgets, strict=True):
            samples_file.write(json.dumps({
                "task": task.name, "policy": policy.name, "id": s.id, "score": score,
                "agree": out == ref, "ideal": b.ideal,
                "physical": b.physical, "reported": b.reported, "output": out}) + "\n")
        samples_file.flush()  # a stopped run keeps every finished policy (from_samples.py)
        log(f"  {i + 1:2d}/{len(policies)} {policy.name:24s} score "
            f"{100 * metrics['score']:5.1f}%  agreement "
            f"{100 * metrics['agreement']:5.1f}%  ideal {metrics['ideal_budget']:.3f}  "
            f"physical {metrics['physical_budget']:.3f}  ({batch.wall_s:.1f} s)", start)
    return {"name": task.name, "metric": task.metric, "notes": task.notes,
            "max_tokens": task.max_tokens, "stop": task.stop, "subset_ids": task.subset_ids,
            "prompt_tokens": [len(s.prompt_ids) for s in task.samples], "policies": by_policy}


def result_header(command: str, model: str, policies: list[pol.Policy],
                  engine: dict[str, Any], size: str, split: str, quick: bool = False
                  ) -> dict[str, Any]:
    """What a result file says of its run before any task: the command, model, machine,
    engine settings, goal and the compared policies (``tasks`` still empty)."""
    return {"command": command, "quick": quick, "model": model, "machine": eng.machine(),
            "engine": {"refreekv": pol.ENGINE_CONFIG, **engine},
            "goal": {**GOAL, "text": GOAL_TEXT},
            "policies": [p.name for p in policies],
            "policy_families": {p.name: p.family for p in policies},
            "policy_xargs": {p.name: p.xargs() for p in policies},
            "size": size, "split": split, "tasks": []}


ISO_TOLERANCE = 0.02  # physical budget a fixed-budget baseline may miss its target by


def run_iso_budget(llm: Any, tasks: list[Task], result: dict[str, Any], names: list[str],
                   references: dict[str, dict[str, list]], samples_file: Any, start: float
                   ) -> list[pol.Policy]:
    """The fixed budget at the mean physical budget each named policy reached over the tasks
    (the paper's comparison at equal memory), recorded under ``result["iso_budget"]``. A fixed
    budget b keeps a fraction b of the prompt's tokens, and whole blocks put its physical budget
    above b: a baseline that misses its target by more than ``ISO_TOLERANCE`` is run once more
    with b moved by the miss, and the closer of the two is the comparison."""
    table = {t["name"]: t["policies"] for t in result["tasks"]}
    targets = {name: iso_target(table, name) for name in names}
    physical: dict[pol.Policy, float] = {}  # each baseline run: its mean physical budget

    def run(budget: float) -> pol.Policy:
        policy = pol.fixed_budget(round(min(max(budget, 0.01), 1.0), 3))
        if policy not in physical:
            for task, record in zip(tasks, result["tasks"], strict=True):
                done = run_task(llm, task, [policy], samples_file, start, "iso-budget",
                                references[task.name])
                record["policies"].update(done["policies"])
            physical[policy] = policy_summary(table, policy.name)["mean_physical_budget"]
        return policy

    result["iso_budget"] = {}
    for name, target in targets.items():
        first = run(target)
        ran = [first]
        if abs(physical[first] - target) > ISO_TOLERANCE:
            ran.append(run(first.budget - (physical[first] - target)))
        result["iso_budget"][name] = iso_budget_entry(target, {p.name: physical[p] for p in ran})
    ran = list(physical)
    result["policies"] += [p.name for p in ran if p.name not in result["policies"]]
    result["policy_families"].update({p.name: p.family for p in ran})
    result["policy_xargs"].update({p.name: p.xargs() for p in ran})
    return ran


def iso_target(table: dict[str, Any], name: str) -> float:
    """The physical budget a fixed baseline must match: the policy's mean over the tasks of
    ``table`` (task -> policy -> metrics)."""
    return round(policy_summary(table, name)["mean_physical_budget"], 3)


def iso_budget_entry(target: float, fixed_budgets: dict[str, float]) -> dict[str, Any]:
    """The fixed-budget baseline compared at ``target``: of the runs (name -> mean physical
    budget), the one closest to it."""
    closest = min(fixed_budgets, key=lambda name: abs(fixed_budgets[name] - target))
    return {"target_physical_budget": target, "fixed": closest}


CHOSEN_RULE = "chosen before this run (--chosen), reported as measured"


def summarise(result: dict[str, Any], policies: list[pol.Policy], chosen_name: str | None
              ) -> None:
    table = {t["name"]: t["policies"] for t in result["tasks"]}
    summaries = {p.name: policy_summary(table, p.name) for p in policies if p != pol.FULL}
    result["policy_summaries"] = list(summaries.values())
    if chosen_name is not None:
        chosen: Mapping[str, Any] = summaries[chosen_name]
        result["summary"] = {**chosen, "met": chosen["meets_goal"],
                             "rule": CHOSEN_RULE}
    else:
        refreekv = [summaries[p.name] for p in policies if p.adaptive]
        chosen, met = choose_default(refreekv)
        result["summary"] = {**chosen, "met": met, "rule": (
            "among the ReFreeKV policies meeting the goal, the lowest mean physical budget; if "
            "none meets it, the one closest to the quality goal (smallest shortfall, then lowest "
            "budget)")}
    result["summary"]["policies_compared"] = sum(p.adaptive for p in policies)
    # The default of the engine that ran (recorded in the result), not of today's code.
    configured = pol.configured_default(result.get("engine", {}).get("refreekv",
                                                                     pol.ENGINE_CONFIG))
    for key, policy in (("paper_rule_summary", pol.PAPER_RULE),
                        ("configured_default_summary", configured)):
        result[key] = summaries.get(policy.name)
    result["fixed_summaries"] = [summaries[p.name] for p in policies if p.fixed]
    result["noise_floor_summary"] = summaries.get(pol.FULL_RERUN.name)
    for entry in result.get("iso_budget", {}).values():
        entry["fixed_summary"] = summaries[entry["fixed"]]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", choices=["smollm2", "qwen-coder"], default="smollm2")
    parser.add_argument("--model-path", default="", help="a local Hugging Face model directory")
    parser.add_argument("--quick", action="store_true",
                        help="a few short samples per task and 4 policies (< 5 min on CPU)")
    parser.add_argument("--out-dir", default=str(REPO / "benchmarks" / "results"))
    parser.add_argument("--policies", default="",
                        help="comma-separated policy names to run (full is always run)")
    parser.add_argument("--tasks", default=",".join(TASK_NAMES),
                        help=f"comma-separated subset of {','.join(TASK_NAMES)}")
    parser.add_argument("--size", choices=tuple(SIZES), default="full",
                        help="stats: 140 samples per task (HumanEval 40), for intervals; "
                             "stats-long: the same with retrieval prompts of 2K-24K tokens "
                             "(models with a 32K context)")
    parser.add_argument("--split", choices=SPLITS, default="all",
                        help="dev: the samples the default is chosen on; test: the held-out "
                             "half it is reported on")
    parser.add_argument("--chosen", default="",
                        help="the default policy already chosen (on the dev split): the summary "
                             "reports it instead of choosing again")
    parser.add_argument("--iso-budget-of", default="",
                        help="comma-separated ReFreeKV policies: after them, the fixed budget "
                             "at each one's mean physical budget (the same memory)")
    parser.add_argument("--dtype", choices=("bfloat16", "float32"), default="",
                        help="model dtype (default bfloat16; float32 for --quick on CPUs)")
    parser.add_argument("--cpu-kv-cache-gib", type=float, default=2.0,
                        help="KV pool on CPUs (GiB); large enough for a task's prompts, the "
                             "full-cache rerun and the first pruned policy reuse their prefill "
                             "from the prefix cache")
    args = parser.parse_args()
    start = time.perf_counter()
    grid = pol.quick_grid() if args.quick else pol.full_grid()
    policies = pol.select(grid, [p for p in args.policies.split(",") if p])
    if not any(p.adaptive for p in policies):
        raise SystemExit("no ReFreeKV policy left to run")
    name, path = model_path(args)
    out_dir = Path(args.out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    stem = ("fidelity_quick" if args.quick else "fidelity") + (
        f"_{args.size}" if args.size != "full" else "") + (
        f"_{args.split}" if args.split != "all" else "")
    iso_of = [name for name in args.iso_budget_of.split(",") if name]
    running = {p.name for p in policies if p.adaptive}
    unknown = sorted(set(iso_of + ([args.chosen] if args.chosen else [])) - running)
    if unknown:
        raise SystemExit(f"--iso-budget-of / --chosen name policies that do not run: {unknown}")

    # vLLM's bf16 matmuls on CPUs take a path ~5x slower than fp32: the quick smoke run uses
    # fp32 there, and so may a CPU run that asks for it (the dtype is recorded).
    dtype = args.dtype or ("float32" if args.quick and not eng.on_gpu() else "bfloat16")
    max_model_len = 32768 if args.size == "stats-long" else 8192
    llm = eng.build_engine(path, dtype, max_model_len, args.cpu_kv_cache_gib)
    log(f"engine up ({name}, block size {eng.block_size_of(llm)})", start)
    sizes = QUICK_SIZES if args.quick else SIZES[args.size]
    tasks = keep_split(build_tasks(llm.get_tokenizer(), sizes,
                                   [t for t in args.tasks.split(",") if t]), args.split)
    log(f"{len(tasks)} tasks, {len(policies)} policies", start)
    result = result_header(
        shlex.join(["python", "-m", "benchmarks.fidelity.run_fidelity", *sys.argv[1:]]), name,
        policies, {"block_size": eng.block_size_of(llm), "prefix_caching": True,
                   "dtype": dtype, "max_model_len": max_model_len},
        "quick" if args.quick else args.size, args.split, quick=args.quick)
    result["started"] = datetime.now(timezone.utc).isoformat(timespec="seconds")
    references: dict[str, dict[str, list]] = {task.name: {} for task in tasks}
    with open(out_dir / f"{stem}_samples.jsonl", "w", encoding="utf-8") as samples_file:
        for k, task in enumerate(tasks):
            result["tasks"].append(run_task(llm, task, policies, samples_file, start,
                                            f"{k + 1}/{len(tasks)}", references[task.name]))
        if iso_of:
            policies = policies + run_iso_budget(llm, tasks, result, iso_of, references,
                                                 samples_file, start)
    result["wall_s"] = round(time.perf_counter() - start, 1)
    summarise(result, policies, args.chosen or None)
    write_result(result, out_dir, stem)
    summary = result["summary"]
    log(f"default policy {summary['policy']} (meets goal: {summary['met']}); wrote "
        f"{out_dir / stem}.json/.md in {result['wall_s']:.0f} s", start)


if __name__ == "__main__":
    main()
