"""Fidelity benchmark: full cache vs ReFreeKV (several T, windows) vs fixed budgets on passkey,
multi-needle, GSM8K, HumanEval and reading-comprehension tasks, in one vLLM engine.

    python benchmarks/fidelity/run_fidelity.py            # full run (~1 h on 2 CPU cores)
    python benchmarks/fidelity/run_fidelity.py --quick    # a few samples, 4 policies (< 5 min)

Writes ``fidelity[_quick].json``, ``fidelity[_quick].md``, ``fidelity[_quick]_samples.jsonl``
(every output) and PNG plots into ``--out-dir``.
"""

from __future__ import annotations

import argparse
import json
import shlex
import sys
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

if __package__ in (None, ""):  # run as a script: make the repository importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from benchmarks.fidelity import engine as eng  # noqa: E402
from benchmarks.fidelity import policies as pol  # noqa: E402
from benchmarks.fidelity.report import plot, write_markdown  # noqa: E402
from benchmarks.fidelity.summary import (  # noqa: E402
    GOAL,
    GOAL_TEXT,
    choose_default,
    policy_summary,
    task_metrics,
)
from benchmarks.fidelity.tasks import (  # noqa: E402
    FULL_SIZES,
    QUICK_SIZES,
    TASK_NAMES,
    Task,
    build_tasks,
)

REPO = Path(__file__).resolve().parents[2]


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
             start: float, position: str) -> dict[str, Any]:
    log(f"task {position} {task.name}: {len(task.samples)} samples, prompts "
        f"{min(len(s.prompt_ids) for s in task.samples)}-"
        f"{max(len(s.prompt_ids) for s in task.samples)} tokens", start)
    by_policy: dict[str, dict[str, Any]] = {}
    full_outputs: list[str] = []
    full_scores: list[float] = []
    for i, policy in enumerate(policies):
        batch = eng.run_batch(llm, task, policy)
        scores = [task.score(s, out) for s, out in zip(task.samples, batch.outputs, strict=True)]
        if policy == pol.FULL:
            full_outputs, full_scores = batch.outputs, scores
        metrics = task_metrics(task.name, scores, full_scores, batch.outputs, full_outputs,
                               [b.ideal for b in batch.budgets],
                               [b.physical for b in batch.budgets], batch.wall_s)
        if policy.kind != "full":
            metrics["unreported"] = sum(not b.reported for b in batch.budgets)
        by_policy[policy.name] = metrics
        for s, out, ref, score, b in zip(task.samples, batch.outputs, full_outputs, scores,
                                         batch.budgets, strict=True):
            samples_file.write(json.dumps({
                "task": task.name, "policy": policy.name, "id": s.id, "score": score,
                "agree": out == ref, "ideal": b.ideal,
                "physical": b.physical, "reported": b.reported, "output": out}) + "\n")
        log(f"  {i + 1:2d}/{len(policies)} {policy.name:24s} score "
            f"{100 * metrics['score']:5.1f}%  agreement "
            f"{100 * metrics['agreement']:5.1f}%  ideal {metrics['ideal_budget']:.3f}  "
            f"physical {metrics['physical_budget']:.3f}  ({batch.wall_s:.1f} s)", start)
    return {"name": task.name, "metric": task.metric, "notes": task.notes,
            "max_tokens": task.max_tokens, "stop": task.stop, "subset_ids": task.subset_ids,
            "prompt_tokens": [len(s.prompt_ids) for s in task.samples], "policies": by_policy}


def summarise(result: dict[str, Any], policies: list[pol.Policy]) -> None:
    table = {t["name"]: t["policies"] for t in result["tasks"]}
    summaries = {p.name: policy_summary(table, p.name) for p in policies if p != pol.FULL}
    result["policy_summaries"] = list(summaries.values())
    refreekv = [summaries[p.name] for p in policies if p.kind == "refreekv"]
    chosen, met = choose_default(refreekv)
    result["summary"] = {**chosen, "met": met, "rule": (
        "among the ReFreeKV policies meeting the goal, the lowest mean physical budget; if none "
        "meets it, the one closest to the quality goal (smallest shortfall, then lowest budget)")}
    for key, policy in (("paper_rule_summary", pol.PAPER_RULE),
                        ("configured_default_summary", pol.CONFIGURED_DEFAULT)):
        result[key] = summaries.get(policy.name)
    result["fixed_summaries"] = [summaries[p.name] for p in policies if p.kind == "fixed"]
    result["noise_floor_summary"] = summaries.get(pol.FULL_RERUN.name)


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
    args = parser.parse_args()
    start = time.perf_counter()
    grid = pol.quick_grid() if args.quick else pol.full_grid()
    policies = pol.select(grid, [p for p in args.policies.split(",") if p])
    if not any(p.kind == "refreekv" for p in policies):
        raise SystemExit("no ReFreeKV policy left to run")
    name, path = model_path(args)
    out_dir = Path(args.out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    stem = "fidelity_quick" if args.quick else "fidelity"

    # The quick smoke run on CPUs uses fp32: vLLM's bf16 matmuls there take a path ~5x slower.
    dtype = "float32" if args.quick and not eng.on_gpu() else "bfloat16"
    llm = eng.build_engine(path, dtype)
    log(f"engine up ({name}, block size {eng.block_size_of(llm)})", start)
    tasks = build_tasks(llm.get_tokenizer(), QUICK_SIZES if args.quick else FULL_SIZES,
                        [t for t in args.tasks.split(",") if t])
    log(f"{len(tasks)} tasks, {len(policies)} policies", start)
    result: dict[str, Any] = {
        "command": shlex.join([Path(sys.executable).name, *sys.argv]), "quick": args.quick,
        "model": name, "machine": eng.machine(),
        "started": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "engine": {"refreekv": pol.ENGINE_CONFIG, "block_size": eng.block_size_of(llm),
                   "prefix_caching": True, "dtype": dtype, "max_model_len": 8192},
        "goal": {**GOAL, "text": GOAL_TEXT},
        "policies": [p.name for p in policies],
        "policy_families": {p.name: p.family for p in policies},
        "policy_xargs": {p.name: p.xargs() for p in policies}, "tasks": []}
    with open(out_dir / f"{stem}_samples.jsonl", "w", encoding="utf-8") as samples_file:
        for k, task in enumerate(tasks):
            result["tasks"].append(run_task(llm, task, policies, samples_file, start,
                                            f"{k + 1}/{len(tasks)}"))
    result["wall_s"] = round(time.perf_counter() - start, 1)
    summarise(result, policies)
    (out_dir / f"{stem}.json").write_text(json.dumps(result, indent=1) + "\n", encoding="utf-8")
    images = plot(result, out_dir, "_quick" if args.quick else "")
    write_markdown(result, out_dir / f"{stem}.md", images)
    summary = result["summary"]
    log(f"default policy {summary['policy']} (meets goal: {summary['met']}); wrote "
        f"{out_dir / stem}.json/.md in {result['wall_s']:.0f} s", start)


if __name__ == "__main__":
    main()
