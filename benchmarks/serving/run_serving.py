"""Serving benchmark: plain vLLM and ReFreeKV behind the OpenAI server, same model, flags and KV
memory, same workloads over HTTP with streaming.

    python -m benchmarks.serving.run_serving --device cuda --out benchmarks/results
    python -m benchmarks.serving.run_serving --device cpu --quick --out /tmp/serving

For every model both servers are started with identical flags (plain vLLM with no plugin
loaded); each workload then runs against plain vLLM once and against ReFreeKV twice, at its
default rule and at T = 0 (``vllm_xargs``), each run with its own ``cache_salt`` so that no run
hits another's prefix cache. Requests are sent by vLLM's own load generator
(``vllm.benchmarks.serve`` with its ``custom`` JSONL dataset, ``ignore_eos``); what it does not
measure — running requests over time, preemptions, KV usage, ReFreeKV's physical budget — is
sampled from each server's ``/metrics`` during the run. Results: ``serving_<device>.json`` with
per-run numbers and a ``summary`` of plugin / plain ratios, a markdown table and a PNG plot.
"""

from __future__ import annotations

import argparse
import functools
import hashlib
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from benchmarks.integration.engine_run import LLAMA3_8B_CONFIG
from benchmarks.serving.cpu_pinning import (
    ENGINE_CORE_NAME,
    CpuPlan,
    physical_cores,
    pin_self,
    pin_server,
    plan_cpus,
)
from benchmarks.serving.report import workload_runs
from benchmarks.serving.server import (
    PLAIN_SERVER,
    REFREEKV_SERVER,
    MetricsSampler,
    RunningServer,
    launch,
    process_cpu_seconds,
    wait_healthy,
)
from benchmarks.serving.step_phases import (
    read_records,
    read_timer_overhead,
    summarise_steps,
    wait_for_records,
)
from benchmarks.serving.workloads import Workload, write_workload

REPO = Path(__file__).resolve().parents[2]
@dataclass(frozen=True)
class Run:
    """One workload against one server: how it is sent."""
    workload: Workload
    max_concurrency: int | None  # None: all at once (a burst)


@dataclass
class ModelSetup:
    name: str
    model_dir: Path
    server_flags: list[str]
    runs: list[Run]
    dummy_weights: bool = False
    extra: dict[str, Any] = field(default_factory=dict)
    # What one server holds on its GPU (weights, KV pool, activations and CUDA graphs), where
    # two servers may not fit one GPU together; None: small enough for any.
    gpu_bytes_per_server: int | None = None


def smollm2_setup(device: str, quick: bool) -> ModelSetup:
    from refreekv_vllm.models import prepare_smollm2

    # bf16 on GPUs; fp32 on CPUs, where vLLM's bf16 matmuls fall back to a path ~5x slower.
    dtype, element_bytes = ("float32", 4) if device == "cpu" else ("bfloat16", 2)
    # SmolLM2-135M: 30 layers x K,V x 3 KV heads x 64 dims per token.
    bytes_per_token = 30 * 2 * 3 * 64 * element_bytes
    if quick:  # minutes on two CPU cores: a pool of 3 prompts, a burst of 6
        pool_tokens = 1024
        # Prompts above the default min_prompt_tokens (256), so that the default rule scores.
        runs = [Run(Workload("long_c1", "long", 1, 280, 340, (8, 8), seed=1), 1),
                Run(Workload("long_burst", "long", 6, 280, 340, (8, 8), seed=3), None)]
    else:
        pool_tokens = 65536
        runs = [Run(Workload("long_c1", "long", 8, 1000, 7000, (128, 256), seed=1), 1),
                Run(Workload("long_c8", "long", 32, 1000, 7000, (128, 256), seed=2), 8),
                Run(Workload("long_burst", "long", 240, 1000, 6000, (256, 256), seed=3), None),
                Run(Workload("chat", "chat", 128, output_tokens=(384, 512), seed=4), 32)]
    flags = ["--dtype", dtype, "--kv-cache-memory-bytes", str(pool_tokens * bytes_per_token)]
    if device == "cpu":  # vLLM needs room for one request of the longest length
        flags += ["--enforce-eager", "--block-size", "32",
                  "--max-model-len", str(min(2048, pool_tokens))]
    else:
        flags += ["--max-model-len", "8192", "--gpu-memory-utilization", "0.3"]
    return ModelSetup("SmolLM2-135M-Instruct", prepare_smollm2(), flags, runs,
                      extra={"kv_pool_tokens": pool_tokens})


def llama8b_setup(work_dir: Path) -> ModelSetup:
    """Llama-3-8B's shape with dummy weights, SmolLM2's tokenizer (its ids fit the vocab)."""
    from refreekv_vllm.models import prepare_smollm2

    model_dir = work_dir / "llama3-8b-shape"
    model_dir.mkdir(parents=True, exist_ok=True)
    (model_dir / "config.json").write_text(json.dumps(LLAMA3_8B_CONFIG))
    for path in prepare_smollm2().iterdir():
        if path.name.startswith(("tokenizer", "special_tokens", "vocab", "merges")):
            (model_dir / path.name).write_bytes(path.read_bytes())
    # 8B shape: 32 layers x K,V x 8 KV heads x 128 x bf16 = 131,072 bytes per token.
    pool_tokens = 300_000
    flags = ["--dtype", "bfloat16", "--max-model-len", "8192", "--load-format", "dummy",
             "--kv-cache-memory-bytes", str(pool_tokens * 131072),
             "--gpu-memory-utilization", "0.45"]
    runs = [Run(Workload("8b_c8", "long", 32, 1000, 6000, (256, 256), seed=5), 8),
            Run(Workload("8b_c64", "long", 96, 1000, 6000, (256, 256), seed=6), 64)]
    # 8.0e9 bf16 weights, the KV pool, and ~4 GB of activations and CUDA graphs: ~59 GB, so
    # two servers need an H200 (141 GB); on an 80 GB H100 they run one at a time.
    gpu_bytes = 16_100_000_000 + pool_tokens * 131072 + 4_000_000_000
    return ModelSetup("Llama-3-8B shape (dummy weights)", model_dir, flags, runs,
                      dummy_weights=True, extra={"kv_pool_tokens": pool_tokens},
                      gpu_bytes_per_server=gpu_bytes)


def bench_args(server: RunningServer, setup: ModelSetup, run: Run, dataset: Path,
               extra_body: dict[str, Any]) -> list[str]:
    args = ["--backend", "openai-chat", "--endpoint", "/v1/chat/completions",
            "--base-url", server.base_url, "--model", str(setup.model_dir),
            "--served-model-name", setup.name, "--tokenizer", str(setup.model_dir),
            "--dataset-name", "custom", "--dataset-path", str(dataset),
            "--num-prompts", str(run.workload.num_prompts), "--custom-output-len", "-1",
            "--ignore-eos", "--temperature", "0", "--seed", str(run.workload.seed),
            "--percentile-metrics", "ttft,tpot,itl,e2el", "--metric-percentiles", "50,99",
            "--extra-body", json.dumps(extra_body), "--disable-tqdm", "--num-warmups", "0"]
    if run.max_concurrency is not None:
        args += ["--max-concurrency", str(run.max_concurrency)]
    return args


def run_workload(server: RunningServer, setup: ModelSetup, run: Run, dataset: Path,
                 xargs: dict[str, Any] | None) -> dict[str, Any]:
    from vllm.benchmarks.serve import add_cli_args, main
    from vllm.utils.argparse_utils import FlexibleArgumentParser

    extra_body: dict[str, Any] = {"cache_salt": uuid.uuid4().hex}
    if xargs:
        extra_body["vllm_xargs"] = xargs
    parser = FlexibleArgumentParser()
    add_cli_args(parser)
    args = parser.parse_args(bench_args(server, setup, run, dataset, extra_body))
    cpu_before, started = process_cpu_seconds(server.process.pid), time.monotonic()
    with MetricsSampler(server) as sampler:
        result = main(args)
    ended = time.monotonic()
    cpu_after = process_cpu_seconds(server.process.pid)
    steps = None
    if server.step_dir is not None:
        wait_for_records(server.step_dir)
        steps = summarise_steps(read_records(server.step_dir, started, ended))
        steps["timer_overhead_per_call"] = read_timer_overhead(server.step_dir)
    budget_count = sampler.delta("refreekv:request_block_budget_count")
    return {
        "completed": result["completed"],
        "failed": result.get("failed", 0),
        "duration_s": result["duration"],
        "output_tok_s": result["output_throughput"],
        "request_s": result["request_throughput"],
        "ttft_p50_ms": result["median_ttft_ms"], "ttft_p99_ms": result["p99_ttft_ms"],
        "tpot_p50_ms": result["median_tpot_ms"], "tpot_p99_ms": result["p99_tpot_ms"],
        "itl_p50_ms": result["median_itl_ms"],
        "peak_running": sampler.peak("vllm:num_requests_running"),
        "mean_running": sampler.time_mean("vllm:num_requests_running"),
        "preemptions": sampler.delta("vllm:num_preemptions_total"),
        "peak_kv_usage": sampler.peak("vllm:kv_cache_usage_perc"),
        "kv_usage_after": sampler.samples[-1][1].get("vllm:kv_cache_usage_perc", 0.0),
        "requests_pruned": sampler.delta("refreekv:requests_pruned_total"),
        "physical_budget": (sampler.delta("refreekv:request_block_budget_sum") / budget_count
                            if budget_count else None),
        "errors": sorted({e for e in result.get("errors", []) if e})[:5],
        # Busy share of each server process over the run (1.0: one core all the time).
        "cpu_busy_share": {name: round((cpu_after[name] - cpu_before.get(name, 0.0))
                                       / (ended - started), 3) for name in sorted(cpu_after)},
        # Host time the engine core spent per output token: unlike throughput, it does not
        # move with how long the process waited for its turn on the machine.
        "engine_cpu_ms_per_token": engine_cpu_ms_per_token(cpu_before, cpu_after,
                                                           result.get("total_output_tokens")),
        **({"step_phases": steps} if steps is not None else {}),
    }


def engine_cpu_ms_per_token(cpu_before: dict[str, float], cpu_after: dict[str, float],
                            output_tokens: int | None) -> float | None:
    """Milliseconds of engine-core CPU time per output token between two readings of
    ``process_cpu_seconds`` (None without output or without an engine-core process)."""
    if not output_tokens or ENGINE_CORE_NAME not in cpu_after:
        return None
    seconds = cpu_after[ENGINE_CORE_NAME] - cpu_before.get(ENGINE_CORE_NAME, 0.0)
    return 1e3 * seconds / output_tokens


# A server to start: its command, its environment, and its variants (name, extra_args or None).
Engine = tuple[list[str], dict[str, str], list[tuple[str, dict[str, Any] | None]]]
ENGINES: dict[str, Engine] = {
    # Plain vLLM: the plugin is not even loaded (VLLM_PLUGINS names no installed plugin).
    "plain": (PLAIN_SERVER, {"VLLM_PLUGINS": "none"}, [("plain", None)]),
    "refreekv": (REFREEKV_SERVER, {}, [("default", None), ("t0", {"refreekv_threshold": 0.0})]),
}
# With --plain-v1: plain vLLM on the V1 model runner ReFreeKV uses, to tell the runner's share
# of a gap from the plugin's.
PLAIN_V1: Engine = (PLAIN_SERVER, {"VLLM_PLUGINS": "none", "VLLM_USE_V2_MODEL_RUNNER": "0"},
                    [("plain_v1", None)])


def alt_engine(refreekv_config: dict[str, Any]) -> Engine:
    """A second ReFreeKV server with other plugin settings (``--alt-config``), its default rule
    run as variant ``alt``: two settings compared in one run, where the servers' starts move a
    ratio more than its rounds do."""
    command = [*REFREEKV_SERVER, "--additional-config", json.dumps({"refreekv": refreekv_config})]
    return command, {}, [("alt", None)]


PLAIN_RUNNER_NOTE = ("plain vLLM runs with its defaults (on GPUs the V2 model runner for dense "
                     "models); ReFreeKV runs vLLM's V1 model runner")


def bench_model(setup: ModelSetup, work_dir: Path, datasets: dict[str, Path], *,
                sequential_start: bool, plain_v1: bool = False,
                only_engines: list[str] | None = None,
                alt_config: dict[str, Any] | None = None, rounds: int = 1,
                warm_up: bool = True, step_timer: bool = False,
                pin_plan: CpuPlan | None = None, palindrome: bool = False,
                one_at_a_time: bool = False, restart_per_round: bool = False,
                on_session: Callable[[dict[str, Any]], None] | None = None
                ) -> dict[str, Any]:
    """Every workload against every engine variant, ``rounds`` times; each round starts with
    another variant so that no engine always runs first (or last) on a machine whose speed
    drifts, and with ``palindrome`` runs the variants once more in reverse order (a drift
    that is linear over the round then weighs on every variant alike). Reported per
    (workload, variant): the median of each number over the rounds. ``one_at_a_time``: one
    server up at a time (a model whose servers do not fit the GPU together); each runs all its
    rounds before the next starts (``server_sessions``). ``restart_per_round``: fresh servers
    for every round, so that the median over rounds is also one over server starts.
    ``on_session``: called with the model's result so far whenever its rounds so far are
    complete (a run cut short by its machine's time limit still leaves what it measured)."""
    engines = selected_engines(plain_v1, only_engines, alt_config)
    variants = [(engine, variant, xargs) for engine, (_, _, per_engine) in engines.items()
                for variant, xargs in per_engine]
    passes: dict[tuple[int, str], list[dict[str, Any]]] = {}
    health: dict[str, dict[str, bool]] = {}
    pinning = None
    sessions = server_sessions(variants, len(setup.runs), rounds, palindrome, one_at_a_time,
                               restart_per_round)
    for session_index, session in enumerate(sessions):
        servers: dict[str, RunningServer] = {}
        try:
            for engine in session.engines:
                command, env, _ = engines[engine]
                log = work_dir / (f"{setup.model_dir.name}-{engine}"
                                  + (f"-{session_index}" if restart_per_round else "") + ".log")
                flags = [*setup.server_flags, "--served-model-name", setup.name]
                step_dir = (work_dir / f"steps-{setup.model_dir.name}-{engine}" if step_timer
                            else None)
                servers[engine] = launch([*command, "--model", str(setup.model_dir), *flags],
                                         log, env, step_dir)
                if sequential_start:
                    wait_healthy(servers[engine])
            for server in servers.values():
                wait_healthy(server)
            if pin_plan is not None:
                pinning = pin_servers(servers, pin_plan)
            for engine, server in servers.items() if warm_up else ():
                # First requests pay one-off costs (lazy kernel builds, allocator growth).
                print(f"[serving] {setup.name}: warm-up of {engine}", flush=True)
                first = setup.runs[0]
                run_workload(server, setup, first, datasets[first.workload.name], None)
            for round_index, run_index, (engine, variant, xargs) in session.passes:
                run = setup.runs[run_index]
                key = f"{run.workload.name}/{variant}"
                print(f"[serving] {setup.name}: {key} (round {round_index + 1})", flush=True)
                result = run_workload(servers[engine], setup, run, datasets[run.workload.name],
                                      xargs)
                passes.setdefault((round_index, key), []).append(result)
                print(f"[serving]   {json.dumps(result)}", flush=True)
            for engine, server in servers.items():
                health[f"health/{engine}"] = {"healthy": server.get("/health") is not None}
        finally:
            for server in servers.values():
                server.stop()
        if on_session is not None and rounds_complete(sessions, session_index):
            on_session(model_result(setup, passes, health, pinning, rounds=rounds,
                                    palindrome=palindrome, one_at_a_time=one_at_a_time,
                                    restart_per_round=restart_per_round))
    return model_result(setup, passes, health, pinning, rounds=rounds, palindrome=palindrome,
                        one_at_a_time=one_at_a_time, restart_per_round=restart_per_round)


def rounds_complete(sessions: list[ServerSession], index: int) -> bool:
    """Whether every round that session ``index`` ran is over once it ends: no later session
    runs passes of the same rounds (servers one at a time share rounds between sessions)."""
    later = {round_index for session in sessions[index + 1:]
             for round_index, _, _ in session.passes}
    return not later & {round_index for round_index, _, _ in sessions[index].passes}


def model_result(setup: ModelSetup, passes: dict[tuple[int, str], list[dict[str, Any]]],
                 health: dict[str, dict[str, bool]], pinning: dict[str, Any] | None, *,
                 rounds: int, palindrome: bool, one_at_a_time: bool,
                 restart_per_round: bool) -> dict[str, Any]:
    """A model's result from the passes measured so far, keyed by (round, workload/variant):
    each round's passes merged, then the rounds."""
    measured: dict[str, list[dict[str, Any]]] = {}
    for (_, key), results in sorted(passes.items(), key=lambda item: item[0][0]):
        measured.setdefault(key, []).append(merge_runs(results, "passes"))
    merged: dict[str, dict[str, Any]] = {key: merge_runs(runs, "rounds")
                                         for key, runs in measured.items()}
    merged.update(health)
    return {"model": setup.name, "dummy_weights": setup.dummy_weights,
            "server_flags": setup.server_flags, **setup.extra, "rounds": rounds,
            "rounds_measured": len({round_index for round_index, _ in passes}),
            "palindrome": palindrome,
            "servers": "one at a time" if one_at_a_time else "together",
            "restart_per_round": restart_per_round,
            **({"cpu_pinning": pinning} if pinning is not None else {}),
            "workloads": {run.workload.name: {**asdict(run.workload),
                                              "max_concurrency": run.max_concurrency}
                          for run in setup.runs},
            "runs": merged}


def selected_engines(plain_v1: bool, only_engines: list[str] | None,
                     alt_config: dict[str, Any] | None = None) -> dict[str, Engine]:
    """The servers a run starts: name -> (command, environment, its variants)."""
    engines = {**ENGINES, **({"plain_v1": PLAIN_V1} if plain_v1 else {})}
    if only_engines:
        engines = {name: engines[name] for name in only_engines if name != "refreekv_alt"}
    if alt_config is not None:
        engines["refreekv_alt"] = alt_engine(alt_config)
    return engines


@dataclass(frozen=True)
class ServerSession:
    """Servers up together, and the passes they run: (round, index of the workload's run,
    (engine, variant, xargs)), in order."""
    engines: list[str]
    passes: list[tuple[int, int, Any]]


def server_sessions(variants: list[Any], num_runs: int, rounds: int, palindrome: bool,
                    one_at_a_time: bool, restart_per_round: bool = False
                    ) -> list[ServerSession]:
    """Together: one session, every round running each workload on every variant in the
    round's order (``round_order``). One at a time: a session per engine, in the variants'
    order, each running every round of every workload on its own variants (rotated and
    mirrored the same way); its ratios then pair passes minutes apart instead of
    interleaved ones, so the machine's drift weighs more on them. ``restart_per_round``: the
    same, one round at a time, each round on freshly started servers."""
    def passes(group: list[Any], round_indices: range) -> list[tuple[int, int, Any]]:
        return [(round_index, run_index, entry) for round_index in round_indices
                for run_index in range(num_runs)
                for entry in round_order(group, round_index, palindrome)]

    engines = list(dict.fromkeys(v[0] for v in variants))
    sessions = []
    for round_indices in ([range(r, r + 1) for r in range(rounds)] if restart_per_round
                          else [range(rounds)]):
        if not one_at_a_time:
            sessions.append(ServerSession(engines, passes(variants, round_indices)))
            continue
        sessions += [ServerSession([engine], passes([v for v in variants if v[0] == engine],
                                                    round_indices))
                     for engine in engines]
    return sessions


def servers_one_at_a_time(choice: str, setup: ModelSetup, num_engines: int,
                          gpu_bytes: int | None) -> bool:
    """``--servers``: ``together``, ``one-at-a-time``, or ``auto``: one at a time when the
    model's servers would not fit the GPU (``gpu_bytes``, None off GPUs) together."""
    if choice != "auto":
        return choice == "one-at-a-time"
    if gpu_bytes is None or setup.gpu_bytes_per_server is None:
        return False
    return num_engines * setup.gpu_bytes_per_server > gpu_bytes


def _ask_gpu(smi_field: str, torch_expression: str) -> str | None:
    """A property of the first GPU, asked of nvidia-smi, else of torch in a child process: this
    process stays off the GPU (a CUDA context here would take memory from the servers, which
    start again between rounds)."""
    queries = (["nvidia-smi", f"--query-gpu={smi_field}", "--format=csv,noheader,nounits"],
               [sys.executable, "-c", f"import torch; print({torch_expression})"])
    for query in queries:
        try:
            found = subprocess.run(query, check=True, capture_output=True, text=True,
                                   timeout=120).stdout.strip().splitlines()
        except (OSError, subprocess.SubprocessError):
            continue
        if found and found[0].strip():
            return found[0].strip()
    return None


def gpu_memory_bytes() -> int | None:
    """The first GPU's memory (``_ask_gpu``)."""
    mib = _ask_gpu("memory.total", "torch.cuda.get_device_properties(0).total_memory // 2**20")
    try:
        return int(mib) * 2**20 if mib is not None else None
    except ValueError:
        return None


def pin_servers(servers: dict[str, RunningServer], plan: CpuPlan) -> dict[str, Any]:
    """``--pin-cpus``: every server's engine core on the same whole cores, its other processes
    on the next ones, this process (the load generator) on the rest (``cpu_pinning``)."""
    pinned = {engine: sorted(set(pin_server(server.process.pid, plan).values()))
              for engine, server in servers.items()}
    pin_self(plan.load)
    return {"engine_core": sorted(plan.engine_core), "server": sorted(plan.server),
            "load_generator": sorted(plan.load), "processes": pinned}


def round_order(variants: list[Any], round_index: int, palindrome: bool) -> list[Any]:
    """The variants' order in a round: rotated by the round, then (``palindrome``) reversed:
    ``A B C C B A``."""
    shift = round_index % len(variants)
    order = variants[shift:] + variants[:shift]
    return order + order[::-1] if palindrome else order


def merge_runs(runs: list[dict[str, Any]], label: str) -> dict[str, Any]:
    """Runs of one (workload, variant) as one: each number the median over them (the mean of
    two), peaks the largest, counts summed; the runs themselves kept under ``label`` (the
    passes of a round, or the rounds). One run is its own merge, parts included (a single
    round keeps its passes)."""
    if len(runs) == 1:
        return dict(runs[0])
    merged: dict[str, Any] = {}
    for name, value in runs[0].items():
        if name in ("rounds", "passes"):
            continue
        values = [run[name] for run in runs]
        if name in ("completed", "failed", "preemptions", "requests_pruned"):
            merged[name] = sum(values)
        elif name.startswith("peak_"):
            merged[name] = max(values)
        elif name == "errors":
            merged[name] = sorted({e for run in runs for e in run[name]})[:5]
        elif all(isinstance(v, (int, float)) for v in values):
            merged[name] = statistics.median(values)
        else:
            merged[name] = value
    merged[label] = runs
    return merged


def rounds_of(run: dict[str, Any]) -> list[dict[str, Any]]:
    """The rounds behind a reported run (a single round is its own)."""
    return run.get("rounds") or [run]


# Summary key -> (model, workload, metric) of the ratio ReFreeKV / plain vLLM.
RATIOS = {
    "c1_decode_ratio": ("smollm2", "long_c1", "output_tok_s"),
    "c8_throughput_ratio": ("smollm2", "long_c8", "output_tok_s"),
    "burst_throughput_ratio": ("smollm2", "long_burst", "output_tok_s"),
    "burst_concurrency_ratio": ("smollm2", "long_burst", "peak_running"),
    "chat_throughput_ratio": ("smollm2", "chat", "output_tok_s"),
    "overhead_8b_c8_throughput_ratio": ("llama8b", "8b_c8", "output_tok_s"),
    "overhead_8b_c64_throughput_ratio": ("llama8b", "8b_c64", "output_tok_s"),
    "overhead_8b_ttft_ratio": ("llama8b", "8b_c8", "ttft_p50_ms"),
}


def ratio(runs: dict[str, Any], workload: str, variant: str, metric: str) -> float | None:
    plugin, plain = runs.get(f"{workload}/{variant}"), runs.get(f"{workload}/plain")
    if not plugin or not plain or not plain[metric]:
        return None
    return plugin[metric] / plain[metric]


def summarise(models: dict[str, dict[str, Any]], variant: str) -> dict[str, Any]:
    """Each ratio as the median over rounds of the ratio within the round: a round measures
    both servers minutes apart, while the machine's speed drifts by more than the effect
    between rounds (the ratio of the medians pairs runs of different rounds)."""
    paired = round_ratios(models, variant)
    summary: dict[str, Any] = {key: statistics.median(paired[key]) if paired.get(key) else None
                               for key in RATIOS}
    burst = models.get("smollm2", {}).get("runs", {}).get(f"long_burst/{variant}")
    summary["burst_physical_budget"] = burst["physical_budget"] if burst else None
    return summary


def ratio_of_medians(models: dict[str, dict[str, Any]], variant: str) -> dict[str, Any]:
    """Each ratio of the medians over rounds (the estimate before rounds were paired)."""
    return {key: ratio(models.get(model, {}).get("runs", {}), workload, variant, metric)
            for key, (model, workload, metric) in RATIOS.items()}


def round_ratios(models: dict[str, dict[str, Any]], variant: str) -> dict[str, list[float]]:
    """Each ratio within every round (the two servers measured minutes apart): its spread shows
    how much of a ratio is the machine's drift."""
    paired: dict[str, list[float]] = {}
    for key, (model, workload, metric) in RATIOS.items():
        runs = models.get(model, {}).get("runs", {})
        plugin, plain = runs.get(f"{workload}/{variant}"), runs.get(f"{workload}/plain")
        if not plugin or not plain:
            continue
        pairs = zip(rounds_of(plugin), rounds_of(plain), strict=True)
        paired[key] = [a[metric] / b[metric] for a, b in pairs if b[metric]]
    return paired


def repeat_ratios(models: dict[str, dict[str, Any]], metric: str = "output_tok_s"
                  ) -> dict[str, dict[str, dict[str, list[float]]]]:
    """model -> workload -> variant -> per round, the metric of the variant's second pass over
    its first (palindromic rounds run every variant twice): how far a number moves when
    nothing changes but the moment, the noise floor against which a ratio is read."""
    found: dict[str, dict[str, dict[str, list[float]]]] = {}
    for model_key, model in models.items():
        for workload, variant, run in workload_runs(model.get("runs", {})):
            ratios = [passes[1][metric] / passes[0][metric]
                      for passes in (part.get("passes", []) for part in rounds_of(run))
                      if len(passes) == 2 and passes[0][metric]]
            if ratios:
                found.setdefault(model_key, {}).setdefault(workload, {})[variant] = ratios
    return found


def repeat_spread(repeats: dict[str, dict[str, dict[str, list[float]]]]) -> float | None:
    """The median distance from 1 of every repeat ratio of a run."""
    distances = [abs(r - 1.0) for workloads in repeats.values() for variants in workloads.values()
                 for ratios in variants.values() for r in ratios]
    return statistics.median(distances) if distances else None


def device_name(device: str) -> str:
    if device == "cuda":
        # Asked between rounds too (the results so far), while servers may be starting.
        return _ask_gpu("name", "torch.cuda.get_device_name()") or "unknown GPU"
    import cpuinfo

    return f"{cpuinfo.get_cpu_info().get('brand_raw', platform.machine())}, {os.cpu_count()} cores"


def source_digest(package: Path) -> str:
    """sha256 (first 12 hex digits) of a package's Python sources: ties a result to the code
    that ran even where git's HEAD does not name it (a copied or installed tree)."""
    digest = hashlib.sha256()
    for path in sorted(package.rglob("*.py")):
        digest.update(path.relative_to(package).as_posix().encode() + b"\0")
        digest.update(path.read_bytes())
    return digest.hexdigest()[:12]


def git_commit() -> str:
    try:
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=REPO, check=True,
                              capture_output=True, text=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def assemble_result(models: dict[str, dict[str, Any]], *, command: str | list[str],
                    device: str, vllm_version: str, plugin_commit: str,
                    plugin_source_digest: str, quick: bool, wall_s: float,
                    alt_config: dict[str, Any] | None = None) -> dict[str, Any]:
    """The result file's content: what ran where, the summaries recomputed from ``models``."""
    repeats = repeat_ratios(models)
    return {
        "command": command,
        "device": device,
        "vllm_version": vllm_version,
        "plugin_commit": plugin_commit,
        "plugin_source_digest": plugin_source_digest,
        "quick": quick,
        "note": PLAIN_RUNNER_NOTE,
        "wall_s": wall_s,
        "summary": summarise(models, "default"),
        "summary_t0": summarise(models, "t0"),
        "round_ratios": {variant: round_ratios(models, variant) for variant in (
            "default", "t0", *(("alt",) if alt_config is not None else ()))},
        "ratio_of_medians": {variant: ratio_of_medians(models, variant)
                             for variant in ("default", "t0")},
        "repeat_ratios": repeats,
        "repeat_spread": repeat_spread(repeats),
        **({"summary_plain_v1": summarise(models, "plain_v1")}
           if any(key.endswith("/plain_v1") for model in models.values()
                  for key in model["runs"]) else {}),
        **({"alt_config": alt_config, "summary_alt": summarise(models, "alt")}
           if alt_config is not None else {}),
        "models": models,
    }


def write_reports(result: dict[str, Any], out_dir: Path, stem: str) -> None:
    from benchmarks.serving.report import write_markdown, write_plot

    (out_dir / f"{stem}.json").write_text(json.dumps(result, indent=1))
    write_markdown(result, out_dir / f"{stem}.md")
    write_plot(result, out_dir / f"{stem}.png")


def write_partial(result: dict[str, Any], path: Path) -> None:
    """The result so far, its JSON only, replaced whole (a reader never sees half a file)."""
    scratch = path.with_suffix(".json.tmp")
    scratch.write_text(json.dumps(result, indent=1))
    scratch.replace(path)
    print(f"[serving] results so far in {path}", flush=True)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", choices=("cuda", "cpu"), default="cuda")
    parser.add_argument("--quick", action="store_true", help="tiny workloads (CPU smoke test)")
    parser.add_argument("--models", default=None,
                        help="comma list of smollm2,llama8b (default: both on cuda, smollm2 "
                             "on cpu)")
    parser.add_argument("--out", type=Path, default=REPO / "benchmarks" / "results")
    parser.add_argument("--work-dir", type=Path, default=None)
    parser.add_argument("--sequential-start", action="store_true",
                        help="start the second server only once the first is healthy")
    parser.add_argument("--servers", choices=("auto", "together", "one-at-a-time"),
                        default="auto",
                        help="keep a model's servers up together (rounds interleave them) or "
                             "start them one at a time; auto: one at a time where they would "
                             "not fit the GPU together (the Llama-3-8B shape on 80 GB)")
    parser.add_argument("--plain-v1", action="store_true",
                        help="also run plain vLLM on the V1 model runner (summary_plain_v1)")
    parser.add_argument("--alt-config", type=json.loads, default=None,
                        help="also start a ReFreeKV server with these plugin settings (JSON, "
                        "e.g. '{\"kernel\": \"cuda\"}'), its default rule reported as "
                        "variant alt (summary_alt)")
    parser.add_argument("--workloads", default=None,
                        help="comma list of workload names to run (default: all of a model's)")
    parser.add_argument("--engines", default=None,
                        help="comma list of plain,refreekv,plain_v1 to start (default: all; "
                             "for diagnosis, ratios need plain)")
    parser.add_argument("--rounds", type=int, default=None,
                        help="times every workload runs on every engine, each round in another "
                             "engine order; medians are reported (default: 3 on cuda, 1 on cpu)")
    parser.add_argument("--palindrome", action=argparse.BooleanOptionalAction, default=None,
                        help="run every round's variants forth and back (A B C C B A) and "
                             "average the two passes (default: on for cuda)")
    parser.add_argument("--restart-servers", action=argparse.BooleanOptionalAction,
                        default=None,
                        help="start fresh servers for every round, so that the median over "
                             "rounds is also one over server starts, which move a ratio more "
                             "than rounds on running servers do (default: on for cuda)")
    parser.add_argument("--reuse", action="store_true",
                        help="reuse datasets and per-model results already in --work-dir "
                             "(a run split over several invocations)")
    parser.add_argument("--commit", default=None,
                        help="the plugin's commit to record (default: git rev-parse HEAD)")
    parser.add_argument("--step-timer", action="store_true",
                        help="record every engine step's host phases in every server "
                             "(step_phases per run)")
    parser.add_argument("--pin-cpus", action="store_true",
                        help="pin every server's engine core to the same whole cores, its API "
                             "server to the next ones and the load generator to the rest "
                             "(cpu_pinning in the results)")
    parser.add_argument("--tensor-parallel-size", type=int, default=1,
                        help="both servers shard the model over this many GPUs")
    parser.add_argument("--prepare-only", action="store_true",
                        help="write the datasets into --work-dir and stop")
    args = parser.parse_args(argv)
    pin_plan = None
    if args.pin_cpus:
        try:  # refused before any server starts
            pin_plan = plan_cpus(physical_cores(os.sched_getaffinity(0)))
        except ValueError as error:
            parser.error(str(error))
    cpu = args.device == "cpu"
    wanted = (args.models or ("smollm2" if cpu else "smollm2,llama8b")).split(",")
    work_dir = args.work_dir or Path(tempfile.mkdtemp(prefix="refreekv-serving-"))
    work_dir.mkdir(parents=True, exist_ok=True)
    args.out.mkdir(parents=True, exist_ok=True)
    started = time.time()
    models: dict[str, dict[str, Any]] = {}
    stem = f"serving_{'gpu' if args.device == 'cuda' else 'cpu'}"
    partial = args.out / f"{stem}_partial.json"

    @functools.cache
    def what_ran() -> dict[str, Any]:
        """The run's machine and code, asked once (a GPU query and a hash of the package)
        however often results are written."""
        import vllm

        import refreekv_vllm

        return {"command": "python -m benchmarks.serving.run_serving " + " ".join(
                    sys.argv[1:] if argv is None else argv),
                "device": device_name(args.device),
                "vllm_version": vllm.__version__,
                "plugin_commit": args.commit or git_commit(),
                # Of the copy the servers imported; a checkout's refreekv_vllm/ gives the same
                # digest.
                "plugin_source_digest": source_digest(Path(refreekv_vllm.__file__).parent)}

    def result_of(measured_models: dict[str, dict[str, Any]]) -> dict[str, Any]:
        return assemble_result(measured_models, **what_ran(), quick=args.quick,
                               wall_s=round(time.time() - started, 1),
                               alt_config=args.alt_config)

    def partial_writer(key: str) -> Callable[[dict[str, Any]], None]:
        def write(so_far: dict[str, Any]) -> None:
            write_partial(result_of({**models, key: so_far}), partial)
        return write

    gpu_bytes = gpu_memory_bytes() if args.device == "cuda" else None
    for key in wanted:
        setup = smollm2_setup(args.device, args.quick) if key == "smollm2" \
            else llama8b_setup(work_dir)
        if args.tensor_parallel_size > 1:
            setup.server_flags += ["--tensor-parallel-size", str(args.tensor_parallel_size)]
        if args.workloads:
            setup.runs = [run for run in setup.runs
                          if run.workload.name in args.workloads.split(",")]
        datasets = {run.workload.name: work_dir / f"{run.workload.name}.jsonl"
                    for run in setup.runs}
        if not (args.reuse and all(path.exists() for path in datasets.values())):
            from transformers import AutoTokenizer

            tokenizer = AutoTokenizer.from_pretrained(setup.model_dir)
            for run in setup.runs:
                write_workload(tokenizer, run.workload, work_dir)
        if args.prepare_only:
            continue
        saved = work_dir / f"model_{key}.json"
        earlier = json.loads(saved.read_text()) if args.reuse and saved.exists() else None
        if earlier is not None:
            # Workloads measured by an earlier invocation are kept; only the others run.
            setup.runs = [run for run in setup.runs
                          if run.workload.name not in earlier["workloads"]]
            if not setup.runs:
                models[key] = earlier
                continue
        only_engines = args.engines.split(",") if args.engines else None
        plain_v1 = args.plain_v1 or "plain_v1" in (args.engines or "")
        one_at_a_time = servers_one_at_a_time(
            args.servers, setup, len(selected_engines(plain_v1, only_engines, args.alt_config)),
            gpu_bytes)
        measured = bench_model(setup, work_dir, datasets,
                               sequential_start=args.sequential_start or cpu,
                               plain_v1=plain_v1, only_engines=only_engines,
                               alt_config=args.alt_config,
                               rounds=args.rounds or (1 if cpu else 3), warm_up=not cpu,
                               step_timer=args.step_timer, pin_plan=pin_plan,
                               palindrome=not cpu if args.palindrome is None else args.palindrome,
                               one_at_a_time=one_at_a_time,
                               restart_per_round=(not cpu if args.restart_servers is None
                                                  else args.restart_servers),
                               on_session=partial_writer(key))
        if earlier is not None:
            earlier["workloads"].update(measured["workloads"])
            earlier["runs"].update(measured["runs"])
            measured = earlier
        models[key] = measured
        saved.write_text(json.dumps(models[key]))
    if args.prepare_only:
        return {}
    result = result_of(models)
    write_reports(result, args.out, stem)
    partial.unlink(missing_ok=True)
    print(json.dumps({"summary": result["summary"], "summary_t0": result["summary_t0"]},
                     indent=1))
    return result


if __name__ == "__main__":
    main()
