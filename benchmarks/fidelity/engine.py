"""One vLLM engine for every policy: ReFreeKV plugin on, prefix caching on, engine core
in-process (``VLLM_ENABLE_V1_MULTIPROCESSING=0``) so the scheduler's cut reports can be read."""

from __future__ import annotations

import os
import platform
import time
from dataclasses import dataclass
from typing import Any

from benchmarks.fidelity.budgets import UNPRUNED, Budgets, match_reports, report_budgets
from benchmarks.fidelity.policies import ENGINE_CONFIG, Policy
from benchmarks.fidelity.tasks import Task


@dataclass
class BatchResult:
    outputs: list[str]
    budgets: list[Budgets]
    wall_s: float


def on_gpu() -> bool:
    import torch

    return torch.cuda.is_available()


def machine() -> dict[str, Any]:
    info: dict[str, Any] = {"platform": platform.platform(), "cpu_cores": os.cpu_count()}
    try:
        with open("/proc/cpuinfo") as f:
            names = [line.split(":", 1)[1].strip() for line in f if line.startswith("model name")]
        info["cpu_model"] = names[0] if names else platform.processor()
    except OSError:
        info["cpu_model"] = platform.processor()
    if on_gpu():
        import torch

        info["gpu"] = torch.cuda.get_device_name(0)
    return info


def build_engine(model: str, dtype: str = "bfloat16", max_model_len: int = 8192,
                 cpu_kv_cache_gib: float = 2.0) -> Any:
    """``cpu_kv_cache_gib``: the KV pool on CPUs. Policies run one after the other over the same
    prompts: with a pool that holds a whole task's prompts, the full-cache rerun and the first
    pruned policy hit the prefix cache for everything but the window they must recompute
    (pruning then takes the pruned blocks out of the cache, so later policies prefill again)."""
    os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"
    from vllm import LLM

    from refreekv_vllm.offline import refreekv_llm_kwargs

    device_kwargs: dict[str, Any] = (
        {"block_size": 16, "gpu_memory_utilization": 0.5} if on_gpu() else
        {"block_size": 32, "enforce_eager": True,
         "kv_cache_memory_bytes": int(cpu_kv_cache_gib * (1 << 30))})
    return LLM(model=model, **refreekv_llm_kwargs(dict(ENGINE_CONFIG)),
               enable_prefix_caching=True, dtype=dtype, max_model_len=max_model_len, seed=0,
               **device_kwargs)


def scheduler_of(llm: Any) -> Any:
    return llm.llm_engine.engine_core.engine_core.scheduler


def block_size_of(llm: Any) -> int:
    return llm.llm_engine.vllm_config.cache_config.block_size


def run_batch(llm: Any, task: Task, policy: Policy) -> BatchResult:
    """All of ``task``'s samples under ``policy`` in one ``generate`` call (greedy)."""
    from vllm import SamplingParams, TokensPrompt

    params = SamplingParams(temperature=0.0, max_tokens=task.max_tokens, stop=task.stop or None,
                            extra_args=policy.xargs())
    prompts = [TokensPrompt(prompt_token_ids=s.prompt_ids) for s in task.samples]
    start = time.perf_counter()
    outputs = llm.generate(prompts, params, use_tqdm=False)
    wall_s = time.perf_counter() - start
    request_ids = [o.request_id for o in outputs]
    reports = match_reports(request_ids, scheduler_of(llm).refreekv_recent_reports())
    block_size = block_size_of(llm)
    budgets = [UNPRUNED if policy.rule is None or rid not in reports
               else report_budgets(reports[rid], block_size) for rid in request_ids]
    return BatchResult([o.outputs[0].text for o in outputs], budgets, wall_s)
