"""Scheduler host time per decode step: plain vLLM vs ReFreeKV's paged block pool.

    python -m benchmarks.integration.bench_scheduler_host   # results/scheduler_host_cpu.json

vLLM's real ``Scheduler``, ``KVCacheManager`` and ``BlockPool`` (no model runs): a Llama-3-8B
KV layout (32 layers, 8 KV heads, head size 128, block size 16, prefix caching on), 64 requests
of 8,000 prompt tokens at T=0, stepped by hand through prefill, then ``--steps`` decode steps
are timed (``schedule()`` + ``update_from_output()``; mean, median and worst step). Two
schedulers in the same process: plain vLLM and ReFreeKV (vLLM's one KV cache group over
per-layer pages). Reported as the ratio of mean step times (median over interleaved rounds).
"""

import argparse
import json
import os
import platform
import random
import statistics
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[2]

NUM_LAYERS = 32
BLOCK_SIZE = 16


def build(kind: str, num_requests: int, prompt_len: int, model_dir: Path):
    import torch
    from vllm.config import CacheConfig, ModelConfig, SchedulerConfig, VllmConfig
    from vllm.v1.core.kv_cache_utils import get_kv_cache_config_from_groups, get_kv_cache_groups
    from vllm.v1.core.sched.scheduler import Scheduler
    from vllm.v1.kv_cache_interface import FullAttentionSpec
    from vllm.v1.structured_output import StructuredOutputManager

    from refreekv_vllm.core.kv_cache_layout import paged_kv_cache_config
    from refreekv_vllm.core.scheduler import RefreeKVScheduler

    max_model_len = prompt_len + 320
    vllm_config = VllmConfig(
        model_config=ModelConfig(model=str(model_dir), dtype="float32", seed=0,
                                 skip_tokenizer_init=True, max_model_len=max_model_len),
        scheduler_config=SchedulerConfig(
            max_num_seqs=256, max_num_batched_tokens=8192, max_model_len=max_model_len,
            enable_chunked_prefill=True, is_encoder_decoder=False),
        cache_config=CacheConfig(block_size=BLOCK_SIZE, enable_prefix_caching=True))
    spec = FullAttentionSpec(block_size=BLOCK_SIZE, num_kv_heads=8, head_size=128,
                             dtype=torch.bfloat16)
    groups = get_kv_cache_groups(
        vllm_config, {f"model.layers.{i}.self_attn.attn": spec for i in range(NUM_LAYERS)})
    num_blocks = num_requests * (max_model_len // BLOCK_SIZE + 2) + 64
    kv_cache_config = get_kv_cache_config_from_groups(
        vllm_config, groups, spec.page_size_bytes * NUM_LAYERS * num_blocks)
    if kind == "refreekv":
        kv_cache_config = paged_kv_cache_config(kv_cache_config)
    vllm_config.cache_config.num_gpu_blocks = kv_cache_config.num_blocks
    kwargs = dict(vllm_config=vllm_config, kv_cache_config=kv_cache_config,
                  structured_output_manager=StructuredOutputManager(vllm_config),
                  include_finished_set=False, log_stats=True, block_size=BLOCK_SIZE,
                  hash_block_size=BLOCK_SIZE)
    return (Scheduler if kind == "plain" else RefreeKVScheduler)(**kwargs)


T0_ARGS = {"refreekv_threshold": 0.0}


def add_request(scheduler, request_id: str, prompt_len: int, max_tokens: int,
                rng: random.Random, extra_args: dict | None = T0_ARGS) -> None:
    """A request of random prompt tokens that ignores EOS (by default T = 0, which opts it out
    of pruning; ``extra_args=None``: the server's default rule)."""
    from vllm import SamplingParams
    from vllm.utils.hashing import sha256
    from vllm.v1.core.kv_cache_utils import get_request_block_hasher
    from vllm.v1.request import Request

    scheduler.add_request(Request(
        request_id=request_id,
        prompt_token_ids=[rng.randrange(1000, 100_000) for _ in range(prompt_len)],
        sampling_params=SamplingParams(max_tokens=max_tokens, ignore_eos=True,
                                       extra_args=extra_args),
        pooling_params=None, block_hasher=get_request_block_hasher(BLOCK_SIZE, sha256)))


def runner_output(scheduler, output) -> tuple[list[str], list[bool], object]:
    """What a model runner would return for ``output``: one token per request that is not in
    the middle of its prompt. Also the scheduled request ids and which of them were."""
    from vllm.v1.outputs import ModelRunnerOutput

    req_ids = list(output.num_scheduled_tokens)
    prefilling = [scheduler.requests[r].is_prefill_chunk for r in req_ids]
    return req_ids, prefilling, ModelRunnerOutput(
        req_ids=req_ids, req_id_to_index={r: i for i, r in enumerate(req_ids)},
        sampled_token_ids=[[] if p else [7] for p in prefilling])


def time_decode_steps(scheduler, num_requests: int, prompt_len: int, steps: int) -> dict:
    rng = random.Random(0)
    for i in range(num_requests):
        add_request(scheduler, f"r{i}", prompt_len, steps + 64, rng)

    def step() -> bool:
        output = scheduler.schedule()
        req_ids, prefilling, model_output = runner_output(scheduler, output)
        scheduler.update_from_output(output, model_output)
        return len(req_ids) == num_requests and not any(prefilling)

    while not step():
        pass
    for _ in range(16):
        step()
    times = []
    for _ in range(steps):
        start = time.perf_counter()
        step()
        times.append(time.perf_counter() - start)
    # Equal prompt lengths: every 16th step all requests need a new block in every group at once.
    return {"mean_ms": 1e3 * statistics.fmean(times), "median_ms": 1e3 * statistics.median(times),
            "max_ms": 1e3 * max(times)}


def time_churn_steps(scheduler, rule: str, steps: int, concurrency: int = 32,
                     prompt_lens: tuple[int, int] = (1000, 6000),
                     output_lens: tuple[int, int] = (64, 256), seed: int = 0) -> dict:
    """Serving-like steps: the pool first filled with prefix-cache entries of finished long
    prompts, then ``concurrency`` requests running at all times (1K-6K-token prompts, 64-256
    output tokens), a finished one replaced at once. ``rule`` "default" sends a cut report for
    every prompt in the step after its prefill (layers 0-1 keep everything, the others keep the
    sinks and the last 30-70%), as the worker does; "t0" none. Times ``schedule()`` and
    ``update_from_output()`` of every step, decode-only and mixed steps apart."""
    from refreekv_vllm.outputs import PAGE_ROWS_ATTR, CutReport, attach_cut_reports

    rng = random.Random(seed)
    counter = iter(range(10**9))

    # A T = 0 request opts out, and the scheduler would skip its report.
    extra_args = None if rule == "default" else T0_ARGS

    def add(prompt_len: int, output_len: int) -> None:
        add_request(scheduler, f"r{next(counter)}", prompt_len, output_len, rng, extra_args)

    reports_due: dict[str, CutReport] = {}
    config = getattr(scheduler, "_refreekv_config", None)
    shortest = config.shortest_scored_prompt if config is not None else 0

    def step() -> tuple[float, float, bool, int]:
        start = time.perf_counter()
        output = scheduler.schedule()
        scheduled = time.perf_counter()
        # Blocks whose pages the workers must learn this step (ReFreeKV; plain vLLM has none).
        page_rows = getattr(output, PAGE_ROWS_ATTR, None)
        req_ids, prefilling, model_output = runner_output(scheduler, output)
        mixed = output.total_num_scheduled_tokens > len(req_ids)
        due = {r: reports_due.pop(r) for r in req_ids if r in reports_due}
        if due:
            attach_cut_reports(model_output, due)
        for req_id, p in zip(req_ids, prefilling, strict=True):
            request = scheduler.requests[req_id]
            if (rule == "default" and not p and request.num_output_tokens == 0
                    and request.num_prompt_tokens >= shortest):  # the worker's prompt gate
                n, m = request.num_prompt_tokens, 4
                cuts = (m, m, *(m + int(n * rng.uniform(0.3, 0.7)) for _ in range(NUM_LAYERS - 2)))
                reports_due[req_id] = CutReport(req_id=req_id, num_prompt_tokens=n,
                                                num_sink_tokens=m, cuts=cuts)
        before_update = time.perf_counter()
        finished = scheduler.update_from_output(output, model_output)
        ended = time.perf_counter()
        done = sum(out.finish_reason is not None for o in finished.values() for out in o.outputs)
        for _ in range(done if replacing else 0):
            add(rng.randrange(*prompt_lens), rng.randrange(*output_lens))
        return ((scheduled - start) * 1e3, (ended - before_update) * 1e3, mixed,
                0 if page_rows is None else len(page_rows[0]))

    # Prefix-cache entries of finished requests hold pages, as after earlier workloads.
    replacing = False
    for _ in range(2 * concurrency):
        add(rng.randrange(1000, 6000), 1)
    while scheduler.requests:
        step()
    replacing = True
    for _ in range(concurrency):
        add(rng.randrange(*prompt_lens), rng.randrange(*output_lens))
    for _ in range(64):
        step()
    timed: dict[str, list[tuple[float, float, int]]] = {"decode": [], "mixed": []}
    for _ in range(steps):
        schedule_ms, update_ms, mixed, rows_sent = step()
        timed["mixed" if mixed else "decode"].append((schedule_ms, update_ms, rows_sent))
    return {kind: {"steps": len(rows),
                   "schedule_ms": statistics.fmean(r[0] for r in rows) if rows else None,
                   "update_ms": statistics.fmean(r[1] for r in rows) if rows else None,
                   # Steps that send the workers page rows (each costs them an upload).
                   "page_row_steps": sum(r[2] > 0 for r in rows),
                   "page_rows": sum(r[2] for r in rows)}
            for kind, rows in timed.items()}


def write_results(out: Path, workload: str, results: dict, command: str,
                  **extra: Any) -> None:
    """One benchmark's JSON: this machine, the workload, the results, the command."""
    summary = {"machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores",
               "workload": workload, "results": results, **extra, "command": command}
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(summary, indent=2))


CHURN_SHAPES = {"long": {"prompt_lens": (1000, 6000), "output_lens": (64, 256)},
                "chat": {"prompt_lens": (60, 200), "output_lens": (384, 512)}}


def churn(model_dir: Path, steps: int, rounds: int, out_dir: Path) -> None:
    """``--churn``: serving-like steps (``time_churn_steps``) for plain vLLM and ReFreeKV at
    T = 0 and at the default rule, long and chat shapes, interleaved rounds; medians."""
    variants = (("plain", "t0"), ("refreekv", "t0"), ("refreekv", "default"))
    measured: dict[str, list[dict]] = {}
    for _ in range(rounds):
        for shape, lens in CHURN_SHAPES.items():
            for kind, rule in variants:
                scheduler = build(kind, 16, 6000, model_dir)
                key = f"{shape}/{kind}" + (f" {rule}" if kind == "refreekv" else "")
                measured.setdefault(key, []).append(time_churn_steps(
                    scheduler, rule, steps, prompt_lens=lens["prompt_lens"],
                    output_lens=lens["output_lens"]))
    def median(values: list[float | None]) -> float | None:
        present = [v for v in values if v is not None]  # a round may have had no mixed step
        return statistics.median(present) if present else None

    # Per variant: each kind of step's medians, and the rounds themselves.
    results: dict[str, dict[str, Any]] = {
        key: {kind: {stat: median([r[kind][stat] for r in runs])
                     for stat in ("schedule_ms", "update_ms", "page_row_steps", "page_rows")}
              for kind in ("decode", "mixed")} | {"rounds": runs}
        for key, runs in measured.items()}
    print(f"{'variant':24} {'decode sched':>12} {'update':>8} {'mixed sched':>12} {'update':>8}"
          f" {'page-row steps':>14} {'rows':>6}")
    for key, r in results.items():
        cells = [r[kind][stat] for kind in ("decode", "mixed")
                 for stat in ("schedule_ms", "update_ms")]
        sent = [sum(r[kind][stat] for kind in ("decode", "mixed"))
                for stat in ("page_row_steps", "page_rows")]
        print(f"{key:24} " + " ".join(f"{'-' if c is None else f'{c:.3f}':>{width}}"
                                      for c, width in zip(cells, (12, 8, 12, 8), strict=True))
              + f" {sent[0]:>14.0f} {sent[1]:>6.0f}")
    write_results(
        out_dir / "scheduler_churn_cpu.json",
        f"Llama-3-8B KV layout (32 layers), block size {BLOCK_SIZE}, prefix caching; the pool "
        "first filled with cached blocks of finished 1K-6K-token prompts, then 32 requests kept "
        f"running ({CHURN_SHAPES}); {steps} timed steps, {rounds} interleaved rounds; ms per "
        "step, medians over rounds",
        results, f"python -m benchmarks.integration.bench_scheduler_host --churn --steps {steps}"
                 f" --rounds {rounds}")


def pool_ops(rounds: int, out_dir: Path, reps: int = 200) -> None:
    """``--pool-ops``: one request's blocks handed out (``get_new_blocks``) and freed
    (``free_blocks``, no prefix-cache entries) at once, vLLM's ``BlockPool`` against ReFreeKV's
    paged one (30 layers, 8,000 blocks' worth of pages); median µs per call, interleaved rounds."""
    from vllm.v1.core.block_pool import BlockPool

    from refreekv_vllm.core.kv_cache_layout import BLOCK_ID_FACTOR
    from refreekv_vllm.core.paged_block_pool import PagedBlockPool

    num_blocks, num_layers = 8000, 30

    def make(kind: str) -> BlockPool:
        if kind == "plain":
            return BlockPool(num_blocks, True, hash_block_size=BLOCK_SIZE)
        return PagedBlockPool.adopt(
            BlockPool(num_blocks * BLOCK_ID_FACTOR, True, hash_block_size=BLOCK_SIZE),
            num_blocks * num_layers + 1, num_layers)

    def time_calls(pool: BlockPool, n: int) -> tuple[float, float]:
        get_us, free_us = [], []
        for _ in range(reps):
            start = time.perf_counter()
            blocks = pool.get_new_blocks(n)
            got = time.perf_counter()
            if isinstance(pool, PagedBlockPool):
                pool.page_pool.take_updates()  # as schedule() does every step
            freeing = time.perf_counter()
            pool.free_blocks(blocks)
            freed = time.perf_counter()
            get_us.append((got - start) * 1e6)
            free_us.append((freed - freeing) * 1e6)
        return statistics.median(get_us), statistics.median(free_us)

    sizes = (1, 64, 512)
    measured: dict[str, list[tuple[float, float]]] = {}
    for _ in range(rounds):
        for n in sizes:
            for kind in ("plain", "refreekv"):
                measured.setdefault(f"{kind}/{n}", []).append(time_calls(make(kind), n))
    results = {key: {"get_new_blocks_us": statistics.median(r[0] for r in runs),
                     "free_blocks_us": statistics.median(r[1] for r in runs)}
               for key, runs in measured.items()}
    print(f"{'pool/blocks':16} {'get_new_blocks us':>18} {'free_blocks us':>15}")
    for key, r in results.items():
        print(f"{key:16} {r['get_new_blocks_us']:18.1f} {r['free_blocks_us']:15.1f}")
    write_results(
        out_dir / "pool_ops_cpu.json",
        f"one request's n blocks handed out and freed at once, {reps} times per round, {rounds} "
        f"interleaved rounds, {num_layers} layers, {num_blocks} blocks' worth of pages; medians",
        results,
        f"python -m benchmarks.integration.bench_scheduler_host --pool-ops --rounds {rounds}")


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--churn", action="store_true",
                        help="serving-like churn instead of steady decode "
                             "(scheduler_churn_cpu.json)")
    parser.add_argument("--pool-ops", action="store_true",
                        help="one request's blocks handed out and freed, vLLM's pool against "
                             "the paged one (pool_ops_cpu.json)")
    parser.add_argument("--num-requests", type=int, default=64)
    parser.add_argument("--prompt-len", type=int, default=8000)
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--out-dir", default=str(ROOT / "benchmarks" / "results"))
    args = parser.parse_args()
    if args.pool_ops:  # block pools alone: no model, no schedulers
        pool_ops(args.rounds, Path(args.out_dir))
        return
    os.environ.setdefault("VLLM_ALLOW_LONG_MAX_MODEL_LEN", "1")  # tiny model's config is reused
    from vllm.utils.hashing import sha256
    from vllm.v1.core.kv_cache_utils import init_none_hash

    from refreekv_vllm.models import prepare_tiny_llama

    init_none_hash(sha256)
    model_dir = prepare_tiny_llama()
    if args.churn:
        churn(model_dir, args.steps, args.rounds, Path(args.out_dir))
        return
    kinds = ("plain", "refreekv")
    rounds: dict[str, list[dict]] = {kind: [] for kind in kinds}
    for _ in range(args.rounds):  # interleaved, so that machine noise hits both alike
        for kind in kinds:
            scheduler = build(kind, args.num_requests, args.prompt_len, model_dir)
            rounds[kind].append(time_decode_steps(scheduler, args.num_requests,
                                                  args.prompt_len, args.steps))
            del scheduler
    results = {kind: {stat: statistics.median(r[stat] for r in rounds[kind])
                      for stat in ("mean_ms", "median_ms", "max_ms")}
               | {"rounds": rounds[kind]} for kind in kinds}
    plain = results["plain"]["mean_ms"]
    print(f"{'scheduler':10} {'mean ms':>8} {'median':>8} {'max':>8} {'x plain':>8}")
    for kind, r in results.items():
        print(f"{kind:10} {r['mean_ms']:8.2f} {r['median_ms']:8.2f} {r['max_ms']:8.2f} "
              f"{r['mean_ms'] / plain:8.2f}")
    write_results(
        Path(args.out_dir) / "scheduler_host_cpu.json",
        f"Llama-3-8B KV layout (32 layers), block size {BLOCK_SIZE}, prefix caching, "
        f"{args.num_requests} x {args.prompt_len}-token prompts at T=0, {args.steps} decode steps "
        f"(schedule + update_from_output), {args.rounds} interleaved rounds; medians over rounds "
        "of each round's mean step time",
        results, "python -m benchmarks.integration.bench_scheduler_host",
        refreekv_vs_plain=results["refreekv"]["mean_ms"] / plain)


if __name__ == "__main__":
    main()
