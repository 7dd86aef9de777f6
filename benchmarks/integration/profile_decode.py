"""Where a decode step's device time goes: plain vLLM vs ReFreeKV at T=0, one engine per run.

    python -m benchmarks.integration.profile_decode --engine plain --out /tmp/prof
    python -m benchmarks.integration.profile_decode --engine refreekv --out /tmp/prof

Llama-3-8B shape, dummy weights, 64 prompts of 8,000 tokens, bf16, CUDA graphs, async
scheduling. After every request has its first token, a few warm steps
run, then ``--steps`` engine steps are traced with ``torch.profiler`` (device activity only, so
the host is not slowed). Writes ``profile-<engine>.json``: wall time per step, device time per
step split into kernels / copies / fills, operation counts, and the heaviest kernels.
"""

import argparse
import collections
import gzip
import json
import os
import random
import time
from pathlib import Path

from benchmarks.integration.engine_run import LLAMA3_8B_CONFIG, build_llm


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--engine", choices=["plain", "refreekv"], required=True)
    parser.add_argument("--num-prompts", type=int, default=64)
    parser.add_argument("--prompt-len", type=int, default=8000)
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--refreekv", default="{}")
    parser.add_argument("--block-size", type=int, default=16)
    parser.add_argument("--out", required=True)
    args = parser.parse_args()
    os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"
    os.environ.setdefault("VLLM_USE_V2_MODEL_RUNNER", "0")
    out_dir = Path(args.out)
    out_dir.mkdir(parents=True, exist_ok=True)
    print(json.dumps(profile(args, out_dir), indent=1)[:4000])


def profile(args, out_dir: Path) -> dict:
    import torch
    from vllm import SamplingParams, TokensPrompt
    from vllm.sampling_params import RequestOutputKind

    model_dir = out_dir / "llama3-8b-shape"
    model_dir.mkdir(exist_ok=True)
    (model_dir / "config.json").write_text(json.dumps(LLAMA3_8B_CONFIG))
    llm = build_llm(args, str(model_dir), load_format="dummy", skip_tokenizer_init=True,
                    max_model_len=args.prompt_len + 300, gpu_memory_utilization=0.85)
    rng = random.Random(0)
    xargs = {"refreekv_threshold": 0.0} if args.engine == "refreekv" else None
    params = SamplingParams(max_tokens=200, ignore_eos=True, extra_args=xargs,
                            output_kind=RequestOutputKind.DELTA)
    engine = llm.llm_engine
    for i in range(args.num_prompts):
        ids = [rng.randrange(1000, 120000) for _ in range(args.prompt_len)]
        engine.add_request(f"p{i}", TokensPrompt(prompt_token_ids=ids), params)
    started: set[str] = set()
    while len(started) < args.num_prompts:
        started.update(o.request_id for o in engine.step() if o.outputs[0].token_ids)
    for _ in range(10):
        engine.step()
    torch.cuda.synchronize()
    trace = out_dir / f"trace-{args.engine}.json"
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
        begin = time.perf_counter()
        for _ in range(args.steps):
            engine.step()
        torch.cuda.synchronize()
        wall = time.perf_counter() - begin
    prof.export_chrome_trace(str(trace))
    summary = summarize(json.loads(trace.read_text()), args.steps)
    with gzip.open(f"{trace}.gz", "wt") as f:
        f.write(trace.read_text())
    trace.unlink()
    summary.update(engine=args.engine, wall_ms_per_step=1e3 * wall / args.steps,
                   device=torch.cuda.get_device_name())
    (out_dir / f"profile-{args.engine}.json").write_text(json.dumps(summary, indent=1))
    return summary


def summarize(trace: dict, steps: int) -> dict:
    """Device time and operation counts per step, by category and by kernel name."""
    by_cat: dict[str, list[float]] = collections.defaultdict(list)
    by_name: dict[str, list[float]] = collections.defaultdict(list)
    intervals = []
    for event in trace["traceEvents"]:
        cat = event.get("cat", "")
        if event.get("ph") != "X" or cat not in ("kernel", "gpu_memcpy", "gpu_memset"):
            continue
        by_cat[cat].append(event["dur"])
        by_name[event["name"][:90]].append(event["dur"])
        intervals.append((event["ts"], event["ts"] + event["dur"]))
    intervals.sort()
    busy, end = 0.0, float("-inf")
    for lo, hi in intervals:
        if hi > end:
            busy += hi - max(lo, end)
            end = hi
    span = intervals[-1][1] - intervals[0][0] if intervals else 0.0

    def per_step(durations: list[float]) -> dict[str, float]:
        return {"count": len(durations) / steps, "ms": sum(durations) / 1e3 / steps}

    heaviest = sorted(by_name.items(), key=lambda kv: -sum(kv[1]))[:40]
    most_frequent = sorted(by_name.items(), key=lambda kv: -len(kv[1]))[:25]
    return {
        "steps": steps,
        "device_busy_ms_per_step": busy / 1e3 / steps,
        "device_span_ms_per_step": span / 1e3 / steps,
        "per_step": {cat: per_step(d) for cat, d in by_cat.items()},
        "heaviest": [{"name": n, **per_step(d)} for n, d in heaviest],
        "most_frequent": [{"name": n, **per_step(d)} for n, d in most_frequent],
    }


if __name__ == "__main__":
    main()
