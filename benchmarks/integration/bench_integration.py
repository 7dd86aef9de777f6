"""ReFreeKV inside vLLM vs plain vLLM, in the same run: exactness at T=0, memory actually freed
against the paper's ideal, block accounting. Speed against plain vLLM is measured through the
OpenAI server by ``benchmarks/serving/run_serving.py``.

    python -m benchmarks.integration.bench_integration --device cpu   # results/integration_cpu.json
    python -m benchmarks.integration.bench_integration --device cuda  # results/integration_gpu.json
    python -m benchmarks.integration.bench_integration --device cuda --part parallel \
        --tensor-parallel-size 2                                       # results/parallel_gpu.json
    python -m benchmarks.integration.bench_integration --device cuda --part parallel \
        --tensor-parallel-size 1 --pipeline-parallel-size 2  # results/parallel_tp1_pp2_gpu.json

Every engine runs in a child process (``engine_run.py``); this script compares their outputs.
"""

import argparse
import json
import platform
import subprocess
import sys
import time
from pathlib import Path

from refreekv_vllm.policy.budget import paper_budget

ROOT = Path(__file__).resolve().parents[2]


def child(workload: str, engine: str, args, out_dir: Path, extra: list[str]) -> dict:
    out = out_dir / f"{workload}-{engine}.json"
    command = [sys.executable, "-m", "benchmarks.integration.engine_run", workload,
               "--engine", engine, "--device", args.device, "--out", str(out), *extra]
    print("$", " ".join(command), flush=True)
    started = time.perf_counter()
    subprocess.run(command, check=True, cwd=ROOT)
    result = json.loads(out.read_text())
    result["wall_s"] = time.perf_counter() - started
    return result


# Rules checked against the reference besides the default: the T = 1% with the paper's
# last-row window and with the observation window.
REFERENCE_RULES: dict[str, dict[str, float | str]] = {
    "paper_w1_T0.01": {"threshold": 0.01, "window": 1},
    "w32_max_T0.01": {"threshold": 0.01, "window": 32, "window_agg": "max"},
}


def compare_with_reference(args, scratch: Path, model: str, block_size: int,
                           settings: dict | None = None) -> dict:
    """vLLM (float32, ReFreeKV ``settings`` over the defaults) against the transformers
    reference."""
    from benchmarks.integration.hf_reference import load_reference_model, reference_generate
    from refreekv_vllm.config import RefreeKVConfig
    from refreekv_vllm.policy.budget import freeable_block_range

    settings = settings or {}
    max_tokens = 32
    vllm_run = child("reference", "refreekv", args, scratch,
                     ["--model", model, "--block-size", str(block_size), "--num-prompts", "10",
                      "--max-tokens", str(max_tokens), "--filler", "70",
                      "--refreekv", json.dumps(settings)])
    config = RefreeKVConfig.from_additional_config({"refreekv": settings})
    _, hf_model = load_reference_model(model)
    matches, same_blocks, records = 0, 0, []
    for request in vllm_run["requests"]:
        ref = reference_generate(hf_model, request["prompt_ids"], max_tokens,
                                 window=config.window, threshold=config.threshold,
                                 agg=config.window_agg, num_sinks=config.num_sink_tokens,
                                 frozen=config.frozen_layers, block_size=block_size)

        def blocks(cuts: list[int]) -> list[tuple[int, int]]:
            gaps = [freeable_block_range(c, config.num_sink_tokens, block_size) for c in cuts]
            return [(g.start, g.stop) if len(g) else (0, 0) for g in gaps]

        match = request["token_ids"][:max_tokens] == ref.token_ids[:max_tokens]
        layers_same = sum(a == b for a, b in zip(blocks(request["cuts"]), blocks(ref.cuts),
                                                 strict=True))
        matches += match
        same_blocks += layers_same == len(ref.cuts)
        records.append({"num_prompt_tokens": len(request["prompt_ids"]), "tokens_match": match,
                        "layers_with_same_kept_blocks": layers_same,
                        "vllm_cuts": request["cuts"], "reference_cuts": ref.cuts})
    n = len(records)
    print(f"reference: {matches}/{n} outputs match, {same_blocks}/{n} identical kept blocks",
          flush=True)
    return {"reference_match": matches / n, "reference_kept_blocks_match": same_blocks / n,
            "reference_requests": records,
            "leaked_blocks_reference_run": vllm_run["leaked_blocks"]}


def device_name(device: str) -> str:
    if device == "cuda":
        import torch

        return torch.cuda.get_device_name()
    return f"{platform.processor() or platform.machine()} CPU, {_cpu_count()} cores"


def _cpu_count() -> int:
    import os

    return len(os.sched_getaffinity(0))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", choices=["cpu", "cuda"], required=True)
    parser.add_argument("--out-dir", default=str(ROOT / "benchmarks" / "results"))
    parser.add_argument("--part",
                        choices=["all", "exactness", "reference", "capacity", "parallel"],
                        default="all",
                        help="run part of the benchmark, merging into an existing result file")
    parser.add_argument("--tensor-parallel-size", type=int, default=2,
                        help="parallel: ranks of the tensor-parallel engines")
    parser.add_argument("--pipeline-parallel-size", type=int, default=1,
                        help="parallel: stages of the pipeline-parallel engines")
    args = parser.parse_args()

    scratch = Path("/tmp/refreekv-bench")
    scratch.mkdir(parents=True, exist_ok=True)
    if args.part == "parallel":
        tp, pp = args.tensor_parallel_size, args.pipeline_parallel_size
        kind = f"parallel_tp{tp}_pp{pp}" if pp > 1 else "parallel"
        out = Path(args.out_dir) / f"{kind}_{'gpu' if args.device == 'cuda' else 'cpu'}.json"
        result = run_parallel(args, scratch)
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(result, indent=2))
        print(json.dumps(result, indent=2))
        return
    name = "integration_gpu.json" if args.device == "cuda" else "integration_cpu.json"
    out = Path(args.out_dir) / name
    result = json.loads(out.read_text()) if out.exists() and args.part != "all" else {}
    result["device"] = device_name(args.device)
    if args.part in ("all", "exactness"):
        result.update(run_exactness(args, scratch))
    if args.part == "reference":
        from refreekv_vllm.models import prepare_smollm2

        model, block_size = str(prepare_smollm2()), 16 if args.device == "cuda" else 32
        result["reference_by_rule"] = {
            label: {k: v for k, v in compare_with_reference(args, scratch, model, block_size,
                                                            settings).items()
                    if k != "reference_requests"} | {"settings": settings}
            for label, settings in REFERENCE_RULES.items()}
        result["reference_by_rule_command"] = " ".join(["python", *sys.argv])
    if args.part == "capacity":
        from refreekv_vllm.models import prepare_smollm2

        block_size_flag = "16" if args.device == "cuda" else "32"
        result.update(compare_capacity(
            args, scratch, ["--model", str(prepare_smollm2()), "--block-size", block_size_flag]))
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2))
    print(json.dumps({k: v for k, v in result.items()
                      if not k.startswith(("per_request", "reference_requests"))}, indent=2))


def run_exactness(args, scratch: Path) -> dict:
    from refreekv_vllm.models import prepare_smollm2

    model = str(prepare_smollm2())
    block_size = "16" if args.device == "cuda" else "32"
    common = ["--model", model, "--block-size", block_size]
    plain = child("exactness", "plain", args, scratch, common)
    pruned = child("exactness", "refreekv", args, scratch, common)

    reports = pruned["reports"]
    num_sinks = 4
    ideal = [paper_budget(r["cuts"], r["num_prompt_tokens"], num_sinks) for r in reports]
    physical = pruned["stats"]["recent_block_budgets"][-len(reports):]
    ideal_budget = sum(ideal) / len(ideal)
    physical_budget = sum(physical) / len(physical)
    result = {
        "model": "SmolLM2-135M-Instruct (bf16)",
        "t0_identical": plain["t0_token_ids"] == pruned["t0_token_ids"],
        "t0_identical_requests": sum(a == b for a, b in zip(plain["t0_token_ids"],
                                                            pruned["t0_token_ids"],
                                                            strict=True)),
        "t0_requests": len(plain["t0_token_ids"]),
        "ideal_budget": ideal_budget,
        "physical_budget": physical_budget,
        "freed_vs_ideal": (1 - physical_budget) / (1 - ideal_budget) if ideal_budget < 1 else 1.0,
        "leaked_blocks": plain["leaked_blocks"] + pruned["leaked_blocks"],
        "pruned_passkeys_found": pruned["pruned_passkeys_found"],
        "pruning_stats": pruned["stats"],
        # Layer scorings by the source of the window rows' softmax normalisers: "attention"
        # (the prefill's FlashAttention, one pass over the keys) or "own" (two passes).
        "window_normalisers": pruned["window_normalisers"],
        "per_request": [{"num_prompt_tokens": r["num_prompt_tokens"], "ideal_budget": i,
                         "physical_budget": p} for r, i, p in zip(reports, ideal, physical,
                                                                  strict=True)],
        "command": " ".join(["python -m benchmarks.integration.bench_integration",
                             *sys.argv[1:]]),
    }
    if args.device == "cpu":
        result.update(compare_with_reference(args, scratch, model, int(block_size)))
        result.update(compare_capacity(args, scratch, common))
    return result


def run_parallel(args, scratch: Path) -> dict:
    """Tensor and pipeline parallelism: plain vLLM and ReFreeKV with ``--tensor-parallel-size``
    ranks per stage and ``--pipeline-parallel-size`` stages, and ReFreeKV on one rank. The tiny
    Llama (4 query heads, 2 KV heads, head size 64, 4 layers) splits over two ranks, which
    SmolLM2's 9 heads do not. The ranks of the last stage report the cuts of every layer."""
    import os

    from benchmarks.serving.cpu_pinning import vllm_cpu_thread_binds
    from refreekv_vllm.models import prepare_tiny_llama

    tp, pp = args.tensor_parallel_size, args.pipeline_parallel_size
    if args.device == "cpu":
        os.environ.setdefault("VLLM_CPU_OMP_THREADS_BIND", vllm_cpu_thread_binds(tp * pp))
    common = ["--model", str(prepare_tiny_llama(head_dim=64)),
              "--block-size", "16", "--filler", "60"]
    parallel = [*common, "--tensor-parallel-size", str(tp), "--pipeline-parallel-size", str(pp)]
    plain = child("exactness", "plain", args, scratch, parallel)
    pruned = child("exactness", "refreekv", args, scratch, parallel)
    one_rank = child("exactness", "refreekv", args, scratch, common)
    ranks = pruned["cuts_per_rank"][-tp:]  # the last stage's
    (single,) = one_rank["cuts_per_rank"]
    pairs = [(a, b) for n, cuts in single.items() for a, b in zip(ranks[0].get(n, []), cuts,
                                                                  strict=False)]
    return {
        "device": device_name(args.device),
        "tensor_parallel_size": tp,
        "pipeline_parallel_size": pp,
        "model": "tiny random Llama (4 query heads, 2 KV heads, head size 64, 4 layers)",
        "t0_identical": plain["t0_token_ids"] == pruned["t0_token_ids"],
        "cuts_identical_across_ranks": len(ranks) == tp and all(r == ranks[0] for r in ranks),
        "layer_cuts_compared_with_one_rank": len(pairs),
        "layer_cuts_differing_from_one_rank": sum(a != b for a, b in pairs),
        "prompts_scored_on_every_rank": len(ranks[0]),
        "leaked_blocks": plain["leaked_blocks"] + pruned["leaked_blocks"],
        "pruning_stats": pruned["stats"],
        "command": " ".join(["python -m benchmarks.integration.bench_integration",
                             *sys.argv[1:]]),
        "note": "TTFT and decode throughput against plain vLLM with the same parallelism come "
                "from benchmarks/serving/run_serving.py --tensor-parallel-size",
    }


def compare_capacity(args, scratch: Path, common: list[str]) -> dict:
    """A KV pool sized for N full-length requests: how many run at once, with and without."""
    extra = [*common, "--filler", "70", "--max-tokens", "32"]
    pruned = child("capacity", "refreekv", args, scratch, extra)
    plain = child("capacity", "plain", args, scratch, [*extra, "--submit",
                                                       str(pruned["submitted"])])
    return {"capacity_refreekv": pruned, "capacity_plain": plain,
            "capacity_target_met": pruned["max_running"] >= pruned["submitted"]
            and pruned["preemptions"] == 0}


if __name__ == "__main__":
    main()
