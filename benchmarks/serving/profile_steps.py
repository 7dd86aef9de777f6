"""Where a serving step's time goes on host and device: vLLM's torch profiler in each server.

    python -m benchmarks.serving.profile_steps --engines plain_v1,refreekv --workloads chat \
        --out /tmp/profile

Starts the chosen servers (the serving benchmark's SmolLM2 setup) with vLLM's
``--profiler-config`` (torch profiler, no Python stacks, front end not traced), warms each up
with one pass of the workload, then runs it again and traces ``--iterations`` engine steps from
``--start-after`` seconds in (``/start_profile``). ReFreeKV's server is traced once per rule
(``--variants``).
Writes ``profile_steps.json``: per server and rule, the cadence of steps (host time from one
``execute_model`` to the next) for decode-only and mixed steps, decode steps also by how many
requests ran, the share of that time the device was busy, device time per step, the heaviest
kernels and host operations, and every CUDA runtime call that can make the host wait
(synchronisations, blocking copies) with its count and time.
"""

from __future__ import annotations

import argparse
import collections
import gzip
import json
import re
import statistics
import threading
import time
from pathlib import Path
from typing import Any

import requests

from benchmarks.serving.run_serving import ENGINES, PLAIN_V1, run_workload, smollm2_setup
from benchmarks.serving.server import RunningServer, launch, wait_healthy
from benchmarks.serving.step_phases import running_bucket
from benchmarks.serving.workloads import write_workload

RULES = {"plain": None, "plain_v1": None, "default": None, "t0": {"refreekv_threshold": 0.0}}
STEP = re.compile(r"execute_context_(\d+)\((\d+)\)_generation_(\d+)\((\d+)\)")
DEVICE_CATEGORIES = ("kernel", "gpu_memcpy", "gpu_memset")
WAITING_CALLS = ("Synchronize", "cudaMemcpy", "cudaEventQuery", "cudaStreamWaitEvent",
                 "cudaHostAlloc", "cudaMallocHost", "cudaFreeHost", "cudaMalloc", "cudaFree")


def profiler_flag(trace_dir: Path, iterations: int) -> list[str]:
    config = {"profiler": "torch", "torch_profiler_dir": str(trace_dir),
              "torch_profiler_with_stack": False, "ignore_frontend": True,
              "max_iterations": iterations}
    return ["--profiler-config", json.dumps(config)]


def _union_length(intervals: list[tuple[float, float]]) -> float:
    total, end = 0.0, float("-inf")
    for start, stop in sorted(intervals):
        if stop <= end:
            continue
        total += stop - max(start, end)
        end = stop
    return total


def summarise_trace(path: Path, top: int = 25) -> dict[str, Any]:
    """Step cadence, device busy share and waiting calls of one chrome trace."""
    with gzip.open(path, "rt") if path.suffix == ".gz" else open(path) as file:
        events = [e for e in json.load(file)["traceEvents"] if e.get("ph") == "X"]
    steps = sorted((e for e in events if e.get("cat") == "user_annotation"
                    and STEP.fullmatch(e.get("name", ""))),
                   key=lambda e: e["ts"])
    device = [e for e in events if e.get("cat") in DEVICE_CATEGORIES]
    runtime = [e for e in events if e.get("cat") == "cuda_runtime"]
    if len(steps) < 3:
        return {"error": f"{len(steps)} steps in the trace"}
    first, last = steps[0]["ts"], steps[-1]["ts"]
    span = last - first
    busy = _union_length([(e["ts"], e["ts"] + e["dur"]) for e in device
                          if first <= e["ts"] < last])
    cadence: dict[str, list[float]] = collections.defaultdict(list)
    host: dict[str, list[float]] = collections.defaultdict(list)
    by_running: dict[str, list[float]] = collections.defaultdict(list)
    decode_running: list[int] = []
    for step, following in zip(steps, steps[1:], strict=False):
        match = STEP.fullmatch(step["name"])
        if match is None:
            raise ValueError(f"not a step annotation: {step['name']!r}")
        ctx_reqs, _, gen_reqs, _ = (int(x) for x in match.groups())
        kind = "decode" if ctx_reqs == 0 else "mixed"
        interval_ms = (following["ts"] - step["ts"]) / 1e3
        cadence[kind].append(interval_ms)
        host[kind].append(step["dur"] / 1e3)
        if kind == "decode":
            decode_running.append(gen_reqs)
            by_running[running_bucket(gen_reqs)].append(interval_ms)
    kernels: collections.Counter[str] = collections.Counter()
    kernel_counts: collections.Counter[str] = collections.Counter()
    for e in device:
        if first <= e["ts"] < last:
            kernels[e["name"][:90]] += e["dur"]
            kernel_counts[e["name"][:90]] += 1
    waits: dict[str, list[float]] = collections.defaultdict(list)
    for e in runtime:
        if first <= e["ts"] < last and any(w in e["name"] for w in WAITING_CALLS):
            waits[e["name"]].append(e["dur"])
    host_ops: collections.Counter[str] = collections.Counter()
    for e in events:
        if e.get("cat") == "cpu_op" and first <= e["ts"] < last:
            host_ops[e["name"][:90]] += e["dur"]
    launches = collections.Counter(e["name"] for e in runtime if first <= e["ts"] < last)
    num_steps = len(steps) - 1

    def stats(values: list[float]) -> dict[str, float] | None:
        if not values:
            return None
        return {"n": len(values), "median_ms": statistics.median(values),
                "mean_ms": statistics.fmean(values)}

    return {
        "steps": num_steps,
        "span_ms": span / 1e3,
        "device_busy_share": busy / span if span else None,
        "device_busy_ms_per_step": busy / 1e3 / num_steps,
        "cadence_decode": stats(cadence["decode"]),
        "cadence_mixed": stats(cadence["mixed"]),
        "execute_model_host_decode": stats(host["decode"]),
        "execute_model_host_mixed": stats(host["mixed"]),
        "mean_running_decode": statistics.fmean(decode_running) if decode_running else None,
        "cadence_decode_by_running": {bucket: stats(values)
                                      for bucket, values in sorted(by_running.items())},
        "runtime_calls_per_step": {name: count / num_steps
                                   for name, count in launches.most_common(12)},
        "waiting_calls": {name: {"count": len(d), "total_ms": sum(d) / 1e3,
                                 "max_ms": max(d) / 1e3}
                          for name, d in sorted(waits.items(), key=lambda kv: -sum(kv[1]))},
        "top_host_ops": [{"name": name, "ms_per_step": total / 1e3 / num_steps}
                         for name, total in host_ops.most_common(top)],
        "top_kernels": [{"name": name, "ms_per_step": total / 1e3 / num_steps,
                         "per_step": kernel_counts[name] / num_steps}
                        for name, total in kernels.most_common(top)],
    }


def _new_traces(trace_dir: Path, known: set[Path], timeout_s: float = 180.0) -> list[Path]:
    """Trace files written since ``known``, once their size stopped changing."""
    deadline = time.monotonic() + timeout_s
    sizes: dict[Path, int] = {}
    while time.monotonic() < deadline:
        fresh = [p for p in trace_dir.rglob("*.json*") if p not in known]
        current = {p: p.stat().st_size for p in fresh}
        if fresh and current == sizes:
            return sorted(fresh)
        sizes = current
        time.sleep(2.0)
    return sorted(sizes)


def profile_rule(server: RunningServer, setup: Any, run: Any, dataset: Path,
                 xargs: dict[str, Any] | None, trace_dir: Path, start_after_s: float
                 ) -> dict[str, Any]:
    known = set(trace_dir.rglob("*"))
    result: dict[str, Any] = {}
    worker = threading.Thread(target=lambda: result.update(
        run_workload(server, setup, run, dataset, xargs)))
    worker.start()
    time.sleep(start_after_s)
    requests.post(f"{server.base_url}/start_profile", timeout=60).raise_for_status()
    worker.join()
    # Stops by itself after --iterations steps; a stop after that is harmless.
    requests.post(f"{server.base_url}/stop_profile", timeout=300)
    traces = _new_traces(trace_dir, known)
    worker_traces = [p for p in traces if "async_llm" not in p.name]
    return {"run": result, "traces": [p.name for p in traces],
            "profile": (summarise_trace(worker_traces[0]) if worker_traces
                        else {"error": "no trace written"})}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", choices=("cuda", "cpu"), default="cuda",
                        help="cpu: the quick workloads (a smoke test of this script)")
    parser.add_argument("--engines", default="plain_v1,refreekv")
    parser.add_argument("--variants", default="t0,default",
                        help="the rules ReFreeKV's server is traced at, in order")
    parser.add_argument("--workloads", default="chat", help="comma list of workload names")
    parser.add_argument("--iterations", type=int, default=1500,
                        help="engine steps traced per run (a whole chat run is ~2,000)")
    parser.add_argument("--start-after", type=float, default=0.5,
                        help="seconds into the run when tracing starts")
    parser.add_argument("--work-dir", type=Path, default=Path("/tmp/profile-steps"))
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    args.work_dir.mkdir(parents=True, exist_ok=True)
    setup = smollm2_setup(args.device, quick=args.device == "cpu")
    runs = {run.workload.name: run for run in setup.runs}
    datasets: dict[str, Path] = {}
    for workload in args.workloads.split(","):
        datasets[workload] = args.work_dir / f"{workload}.jsonl"
        if not datasets[workload].exists():
            from transformers import AutoTokenizer

            write_workload(AutoTokenizer.from_pretrained(setup.model_dir),
                           runs[workload].workload, args.work_dir)
    engines = {**ENGINES, "plain_v1": PLAIN_V1}
    report: dict[str, Any] = {"iterations": args.iterations}
    servers: dict[str, tuple[RunningServer, Path]] = {}
    try:
        for name in args.engines.split(","):
            command, env, _ = engines[name]
            trace_dir = args.work_dir / f"traces-{name}"
            trace_dir.mkdir(exist_ok=True)
            servers[name] = (launch([*command, "--model", str(setup.model_dir),
                                     *setup.server_flags, "--served-model-name", setup.name,
                                     *profiler_flag(trace_dir, args.iterations)],
                                    args.out / f"{name}.log", env), trace_dir)
        for server, _ in servers.values():
            wait_healthy(server)
        for workload, dataset in datasets.items():
            run = runs[workload]
            for name, (server, trace_dir) in servers.items():
                rules = args.variants.split(",") if name == "refreekv" else [name]
                for rule in rules:
                    key = f"{workload}/{name}:{rule}"
                    run_workload(server, setup, run, dataset, RULES[rule])  # warm-up pass
                    report[key] = profile_rule(server, setup, run, dataset, RULES[rule],
                                               trace_dir, args.start_after)
                    print(json.dumps({key: report[key]}), flush=True)
                    # Written after every rule: a server that dies keeps the others' results.
                    (args.out / "profile_steps.json").write_text(json.dumps(report, indent=1))
    finally:
        for server, _ in servers.values():
            server.stop()


if __name__ == "__main__":
    main()
