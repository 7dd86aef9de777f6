"""In-process vLLM engines on the CPU backend, for tests that inspect the scheduler's block pool.

With ``VLLM_ENABLE_V1_MULTIPROCESSING=0`` the engine core and the worker run inside the test
process, so the test can read the real ``BlockPool`` after every request.
"""

import contextlib
import gc
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from refreekv_vllm.offline import refreekv_llm_kwargs

ENGINE_DEFAULTS: dict[str, Any] = {
    "dtype": "float32",  # vLLM's bf16 matmuls take a path ~5x slower on these CPUs
    "block_size": 32,
    "max_model_len": 4096,
    "max_num_batched_tokens": 1024,  # long prompts run as several chunks
    "kv_cache_memory_bytes": 1 << 30,
    "enforce_eager": True,
    "enable_prefix_caching": True,
    "seed": 0,
}


@contextlib.contextmanager
def in_process_engine(model: Path, refreekv: dict | None, **overrides: Any) -> Iterator[Any]:
    """A ``vllm.LLM`` with ReFreeKV (``refreekv`` is its additional-config section) or plain
    vLLM (``refreekv=None``). Only one in-process engine can live in a process at a time
    (vLLM's distributed state is global)."""
    from vllm import LLM

    kwargs = {**ENGINE_DEFAULTS, **overrides, "model": str(model)}
    if refreekv is not None:
        kwargs.update(refreekv_llm_kwargs(refreekv))
    saved = {k: os.environ.get(k) for k in ("VLLM_ENABLE_V1_MULTIPROCESSING",
                                            "VLLM_USE_V2_MODEL_RUNNER")}
    os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"
    os.environ["VLLM_USE_V2_MODEL_RUNNER"] = "0"
    try:
        llm = LLM(**kwargs)
    finally:
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value
    try:
        yield llm
    finally:
        llm.llm_engine.engine_core.shutdown()
        del llm
        gc.collect()


@contextlib.contextmanager
def parallel_engine(model: Path, refreekv: dict | None, *, debug_accounting: bool = False,
                    **overrides: Any) -> Iterator[Any]:
    """:func:`in_process_engine` with tensor- or pipeline-parallel workers, each bound to its
    own CPU threads (vLLM's CPU workers bind theirs per rank; the test machine has one NUMA
    node)."""
    import pytest

    from benchmarks.serving.cpu_pinning import vllm_cpu_thread_binds

    workers = (overrides.get("tensor_parallel_size", 1)
               * overrides.get("pipeline_parallel_size", 1))
    with pytest.MonkeyPatch.context() as env:
        env.setenv("VLLM_CPU_OMP_THREADS_BIND", vllm_cpu_thread_binds(workers))
        if debug_accounting:
            env.setenv("REFREEKV_DEBUG_ACCOUNTING", "1")
        with in_process_engine(model, refreekv, **overrides) as llm:
            yield llm


def with_logprobs(**xargs: Any) -> Any:
    """Greedy sampling of 8 tokens that also returns each sampled token's log-prob."""
    from vllm import SamplingParams

    return SamplingParams(temperature=0.0, max_tokens=8, ignore_eos=True, logprobs=0,
                          extra_args=xargs or None)


def tokens_and_logprobs(outputs: Any) -> list[list[tuple[int, float]]]:
    return [[(token, step[token].logprob) for token, step in
             zip(o.outputs[0].token_ids, o.outputs[0].logprobs, strict=True)] for o in outputs]


def plain_logprobs(model: Path, prompts: list[str], **parallel: Any
                   ) -> list[list[tuple[int, float]]]:
    """:func:`tokens_and_logprobs` of plain vLLM with the given parallelism."""
    with parallel_engine(model, refreekv=None, **parallel) as llm:
        return tokens_and_logprobs(llm.generate(prompts, with_logprobs()))


def scheduler_of(llm: Any) -> Any:
    return llm.llm_engine.engine_core.engine_core.scheduler


@contextlib.contextmanager
def recorded_steps(llm: Any) -> Iterator[list[tuple[int, int]]]:
    """The shape of every step the engine's scheduler forms meanwhile: (requests, tokens)."""
    scheduler = scheduler_of(llm)
    steps: list[tuple[int, int]] = []
    schedule = scheduler.schedule

    def recording_schedule(*args: Any, **kwargs: Any) -> Any:
        output = schedule(*args, **kwargs)
        steps.append((len(output.num_scheduled_tokens), output.total_num_scheduled_tokens))
        return output

    scheduler.schedule = recording_schedule
    try:
        yield steps
    finally:
        del scheduler.schedule  # the class's method again


def free_blocks(llm: Any) -> int:
    return scheduler_of(llm).kv_cache_manager.block_pool.get_num_free_blocks()


def abort_once_pruned(llm: Any, prompts: list[str], params: Any) -> None:
    """Add ``prompts``, step until every one of them is pruned and decoding, check that they
    hold fewer blocks than before, then abort them all and step until the engine is idle."""
    engine, scheduler = llm.llm_engine, scheduler_of(llm)
    start = free_blocks(llm)
    pruned_before = scheduler.refreekv_stats().requests_pruned
    request_ids = [engine.add_request(f"abort-{pruned_before}-{i}", prompt, params)
                   for i, prompt in enumerate(prompts)]
    for _ in range(200):
        engine.step()
        if scheduler.refreekv_stats().requests_pruned == pruned_before + len(prompts):
            break
    assert scheduler.refreekv_stats().requests_pruned == pruned_before + len(prompts)
    assert free_blocks(llm) < start
    engine.abort_request(request_ids)
    while engine.has_unfinished_requests():
        engine.step()
