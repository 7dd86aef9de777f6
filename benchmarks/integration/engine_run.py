"""One engine, one workload, one JSON file: the child process of ``bench_integration.py``.

Each engine runs in its own process so that plain vLLM and ReFreeKV never share a device or a
compile cache state, and the engine core runs in-process (``VLLM_ENABLE_V1_MULTIPROCESSING=0``)
so the block pool can be read directly.
"""

import argparse
import dataclasses
import json
import os
import time
from pathlib import Path
from typing import Any

LLAMA3_8B_CONFIG = {
    "architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": 4096,
    "intermediate_size": 14336, "num_hidden_layers": 32, "num_attention_heads": 32,
    "num_key_value_heads": 8, "head_dim": 128, "vocab_size": 128256,
    "max_position_embeddings": 16384, "rope_theta": 500000.0, "rms_norm_eps": 1e-5,
    "tie_word_embeddings": False, "torch_dtype": "bfloat16", "bos_token_id": 128000,
    "eos_token_id": 128001, "hidden_act": "silu",
}


def scheduler_of(llm):
    return llm.llm_engine.engine_core.engine_core.scheduler


def free_blocks(llm) -> int:
    return scheduler_of(llm).kv_cache_manager.block_pool.get_num_free_blocks()


def cuts_per_rank(llm, outputs: list) -> list[dict[int, list[int]]]:
    """Per worker: index in ``outputs`` -> the cuts of that prompt, for the prompts of
    ``outputs`` that were scored (from the workers' recent records)."""
    from refreekv_vllm.entrypoints.endpoints import record_key

    per_rank = []
    for records in llm.collective_rpc("refreekv_request_records"):
        found = {}
        for record in records:
            for index, output in enumerate(outputs):
                if record_key(record["request_id"], output.request_id) is not None:
                    found[index] = record["cuts"]
        per_rank.append(found)
    return per_rank


def build_llm(args, model: str, **extra):
    from vllm import LLM

    from refreekv_vllm.offline import refreekv_llm_kwargs

    kwargs = dict(model=model, dtype="bfloat16", block_size=args.block_size, seed=0,
                  enable_prefix_caching=True, tensor_parallel_size=args.tensor_parallel_size,
                  pipeline_parallel_size=args.pipeline_parallel_size)
    kwargs.update(extra)
    if args.engine == "refreekv":
        kwargs.update(refreekv_llm_kwargs(json.loads(args.refreekv)))
    return LLM(**kwargs)


def run_exactness(args) -> dict:
    """Greedy outputs of a mixed batch (plain or ReFreeKV at T=0), then ReFreeKV's default T."""
    from vllm import SamplingParams

    from refreekv_vllm.workloads import mixed_prompts

    llm = build_llm(args, args.model, max_model_len=4096,
                    max_num_batched_tokens=args.max_num_batched_tokens,
                    **({"gpu_memory_utilization": 0.3} if args.device == "cuda"
                       else {"kv_cache_memory_bytes": 1 << 30, "enforce_eager": True}))
    start_free = free_blocks(llm)
    prompts = mixed_prompts(args.num_prompts, seed=0)
    greedy = dict(temperature=0.0, max_tokens=args.max_tokens, ignore_eos=True)
    xargs = {"refreekv_threshold": 0.0} if args.engine == "refreekv" else None
    outputs = llm.generate(prompts, SamplingParams(**greedy, extra_args=xargs))
    result: dict[str, Any] = {"t0_token_ids": [list(o.outputs[0].token_ids) for o in outputs]}
    if args.engine == "refreekv":
        from refreekv_vllm.workloads import passkey_prompt

        passkeys = [10000 + 997 * i for i in range(5)]
        long_prompts = [passkey_prompt(args.filler, depth, key)
                        for key, depth in zip(passkeys, (0.1, 0.3, 0.5, 0.7, 0.9), strict=True)]
        long_outputs = llm.generate(long_prompts, SamplingParams(**greedy))
        # Pruned decoding still finds the key (a check of the gap-skipping attention path).
        result["pruned_passkeys_found"] = sum(
            str(key) in o.outputs[0].text for key, o in zip(passkeys, long_outputs, strict=True))
        result["reports"] = [
            {"num_prompt_tokens": r.num_prompt_tokens, "cuts": list(r.cuts)}
            for r in scheduler_of(llm).refreekv_recent_reports()]
        stats = scheduler_of(llm).refreekv_stats()
        result["stats"] = dataclasses.asdict(stats)
        from refreekv_vllm.attention.scoring import window_normalisers

        result["window_normalisers"] = dict(window_normalisers)
        # Every worker's cuts of the long prompts (tensor parallelism: one mapping per rank).
        result["cuts_per_rank"] = cuts_per_rank(llm, long_outputs)
    result["leaked_blocks"] = start_free - free_blocks(llm)
    return result


def run_reference(args) -> dict:
    """Greedy outputs and per-layer cuts of long prompts, one at a time, in float32."""
    from vllm import SamplingParams

    from refreekv_vllm.workloads import passkey_prompt

    llm = build_llm(args, args.model, dtype="float32", max_model_len=4096,
                    kv_cache_memory_bytes=1 << 30, enforce_eager=True)
    start_free = free_blocks(llm)
    tokenizer = llm.get_tokenizer()
    results = []
    for i in range(args.num_prompts):
        prompt = passkey_prompt(args.filler, (i + 0.5) / args.num_prompts, 20000 + 7919 * i)
        prompt_ids = tokenizer(prompt)["input_ids"]
        output = llm.generate([{"prompt_token_ids": prompt_ids}], SamplingParams(
            temperature=0.0, max_tokens=args.max_tokens, ignore_eos=True), use_tqdm=False)
        report = scheduler_of(llm).refreekv_recent_reports()[-1]
        results.append({"prompt_ids": prompt_ids, "token_ids": list(output[0].outputs[0].token_ids),
                        "cuts": list(report.cuts)})
    return {"requests": results, "leaked_blocks": start_free - free_blocks(llm)}


def run_capacity(args) -> dict:
    """How many long requests decode at once in a KV pool sized for ``N`` unpruned ones."""
    from vllm import SamplingParams

    from refreekv_vllm.workloads import passkey_prompt

    pool_requests, decode_tokens = 4, args.max_tokens
    prompts = [passkey_prompt(args.filler, (i + 0.5) / 16, 30000 + 101 * i) for i in range(16)]
    probe = build_llm(args, args.model, max_model_len=4096, enforce_eager=True,
                      kv_cache_memory_bytes=1 << 29, enable_prefix_caching=False)
    num_prompt_tokens = len(probe.get_tokenizer()(prompts[0])["input_ids"])
    budget = None
    if args.engine == "refreekv":
        # The cut report rides on the first decode step after the prompt's: a request that
        # stops at its first token has left before it (its blocks are simply freed).
        probe.generate(prompts[:1], SamplingParams(max_tokens=4, ignore_eos=True),
                       use_tqdm=False)
        budget = scheduler_of(probe).refreekv_stats().recent_block_budgets[-1]
    probe.llm_engine.engine_core.shutdown()
    del probe
    import gc

    gc.collect()
    blocks_per_request = -(-(num_prompt_tokens + decode_tokens) // args.block_size)
    # Both engines' blocks hold every layer's tokens (ReFreeKV's as one page per layer), so
    # the same block count is the same memory.
    num_blocks = pool_requests * blocks_per_request + 1
    target = args.submit or (int(0.9 * pool_requests / budget) if budget else pool_requests)
    llm = build_llm(args, args.model, max_model_len=4096, enforce_eager=True,
                    num_gpu_blocks_override=num_blocks, enable_prefix_caching=False,
                    kv_cache_memory_bytes=1 << 30)
    scheduler = scheduler_of(llm)
    running: list[int] = []
    preemptions = [0]
    schedule, preempt = scheduler.schedule, scheduler._preempt_request

    def counting_schedule(*a, **k):
        output = schedule(*a, **k)
        running.append(len(scheduler.running))
        return output

    def counting_preempt(*a, **k):
        preemptions[0] += 1
        return preempt(*a, **k)

    scheduler.schedule, scheduler._preempt_request = counting_schedule, counting_preempt
    llm.generate(prompts[:target], SamplingParams(max_tokens=decode_tokens, ignore_eos=True),
                 use_tqdm=False)
    return {"pool_requests": pool_requests, "num_prompt_tokens": num_prompt_tokens,
            "num_blocks": num_blocks, "block_budget": budget, "submitted": target,
            "max_running": max(running), "preemptions": preemptions[0]}


def timed_batch(llm, prompts: list, params) -> dict:
    """Submit a batch at once and step the engine: each request's time to first token, and the
    decode throughput of the steps after every request has its first token (pure decode)."""
    from vllm.sampling_params import RequestOutputKind

    engine = llm.llm_engine
    params = params.clone()
    params.output_kind = RequestOutputKind.DELTA
    start = time.perf_counter()
    for i, prompt in enumerate(prompts):
        engine.add_request(f"timed-{start}-{i}", prompt, params)
    first: dict[str, float] = {}
    tokens: dict[str, list[int]] = {}
    decode_started: float | None = None
    decode_tokens, now = 0, start
    while engine.has_unfinished_requests():
        outputs = engine.step()
        now = time.perf_counter()
        for output in outputs:
            tokens.setdefault(output.request_id, []).extend(output.outputs[0].token_ids)
            new_tokens = len(output.outputs[0].token_ids)
            if output.request_id not in first and new_tokens:
                first[output.request_id] = now
                new_tokens -= 1
            if decode_started is not None:
                decode_tokens += new_tokens
        if decode_started is None and len(first) == len(prompts):
            decode_started = now
    ttfts = [t - start for t in first.values()]
    if decode_started is None:
        raise RuntimeError("no request produced a first token")
    return {"mean_ttft_s": sum(ttfts) / len(ttfts), "max_ttft_s": max(ttfts),
            "decode_s": now - decode_started, "decode_tokens": decode_tokens,
            "decode_tok_per_s": decode_tokens / (now - decode_started), "total_s": now - start,
            "token_ids": [tokens[f"timed-{start}-{i}"] for i in range(len(prompts))]}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("workload",
                        choices=["exactness", "reference", "capacity"])
    parser.add_argument("--engine", choices=["plain", "refreekv"], required=True)
    parser.add_argument("--device", choices=["cpu", "cuda"], required=True)
    parser.add_argument("--model", default="")
    parser.add_argument("--refreekv", default="{}")
    parser.add_argument("--block-size", type=int, default=16)
    parser.add_argument("--num-prompts", type=int, default=16)
    parser.add_argument("--max-tokens", type=int, default=32)
    parser.add_argument("--max-num-batched-tokens", type=int, default=1024)
    parser.add_argument("--filler", type=int, default=90)
    parser.add_argument("--prompt-len", type=int, default=8000)
    parser.add_argument("--submit", type=int, default=0, help="capacity: requests to submit")
    parser.add_argument("--tensor-parallel-size", type=int, default=1)
    parser.add_argument("--pipeline-parallel-size", type=int, default=1)
    parser.add_argument("--scratch", default="/tmp/refreekv-bench")
    parser.add_argument("--out", required=True)
    args = parser.parse_args()
    os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"
    os.environ.setdefault("VLLM_USE_V2_MODEL_RUNNER", "0")
    run = {"exactness": run_exactness, "reference": run_reference,
           "capacity": run_capacity}[args.workload]
    Path(args.out).write_text(json.dumps(run(args)))


if __name__ == "__main__":
    main()
