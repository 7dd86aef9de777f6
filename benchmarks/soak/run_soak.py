"""Soak run: a long mixed workload against the real server, then checks that nothing leaked.

    python -m benchmarks.soak.run_soak --requests 1000 --out benchmarks/results
    python -m benchmarks.soak.run_soak --url http://HOST:PORT --model NAME --requests 200

Without ``--url`` it starts vLLM's own server as a user of plain ``vllm serve`` would
(``python -m vllm.entrypoints.openai.api_server`` with ``--additional-config
'{"refreekv": {}}'`` and the endpoint plugin allow-listed; SmolLM2, CPU-friendly flags) with a
small KV pool. A first wave of short prompts with long outputs outgrows it, so running requests get
preempted whatever the arrival times; then requests of every kind run concurrently in a seeded
order: the default rule, opted out, the paper's rule, the fixed-budget baseline, seeded
sampling, repeated prompts (prefix-cache hits), streams read to the end, streams dropped by the
client mid-decode, and bad parameters (which must get HTTP 400). Afterwards: no unexpected
error, the preemption counter moved, no request running, the KV pool idle again, ReFreeKV's
stats endpoint equal to ``/metrics``, the server healthy, and (own server) no ERROR line in its
log. Writes ``soak_<device>.json``.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import random
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path
from typing import Any

import aiohttp

from benchmarks.serving.server import launch, parse_metrics, wait_healthy
from refreekv_vllm.entrypoints.serve import API_SERVER_MODULE, server_environment
from refreekv_vllm.workloads import passkey_prompt

KINDS = ("default", "opted_out", "paper_rule", "fixed_budget", "seeded", "repeat",
         "stream", "stream_dropped", "bad")
XARGS = {
    "opted_out": {"refreekv_enabled": False},
    "paper_rule": {"refreekv_window": 1, "refreekv_threshold": 0.01},
    "fixed_budget": {"refreekv_policy": "fixed", "refreekv_budget": 0.5},
}
BAD_XARGS = [{"refreekv_window": 0}, {"refreekv_threshold": "high"}, {"refreekv_window": True},
             {"refreekv_budget": 0.5}, {"refreekv_policy": "h2o"}, {"refreekv_windw": 3}]
# SmolLM2-135M in fp32: 30 layers x K,V x 3 KV heads x 64 dims x 4 bytes per token.
SMOLLM2_FP32_TOKEN_BYTES = 30 * 2 * 3 * 64 * 4
BLOCK_SIZE = 32  # ReFreeKV's default on CPUs


# Filler lines of the shortest passkey prompt: 273 SmolLM2 tokens, above the default
# min_prompt_tokens (256), so that every prompt is scored under the default rule.
SHORTEST_FILLER = 9


def plan(num_requests: int, seed: int, pressure_requests: int = 0, pressure_tokens: int = 0
         ) -> list[dict[str, Any]]:
    """The requests, in order: kind, prompt, output length, and what the server must answer.

    The first ``pressure_requests`` are short prompts with ``pressure_tokens`` outputs each
    under the default rule: sent together, their decode growth alone outgrows a pool smaller
    than their total, so running (pruned) requests get preempted however the arrivals fall.
    """
    rng = random.Random(seed)
    sent: list[str] = []
    requests = []
    for _ in range(min(pressure_requests, num_requests)):
        body: dict[str, Any] = {
            "prompt": passkey_prompt(SHORTEST_FILLER, rng.random(), rng.randrange(10**4, 10**5)),
            "max_tokens": pressure_tokens, "ignore_eos": True, "temperature": 0.0}
        requests.append({"kind": "pressure", "body": body, "expect": 200})
    for i in range(num_requests - len(requests)):
        kind = KINDS[i % len(KINDS)] if i < len(KINDS) else rng.choice(KINDS)
        if kind == "repeat" and sent:
            prompt = rng.choice(sent)
        else:
            prompt = passkey_prompt(rng.randint(SHORTEST_FILLER, 40), rng.random(),
                                    rng.randrange(10**4, 10**5))
            sent.append(prompt)
        body = {"prompt": prompt, "max_tokens": rng.randint(24, 96),
                "ignore_eos": True, "temperature": 0.0}
        if kind in XARGS:
            body["vllm_xargs"] = XARGS[kind]
        if kind == "seeded":
            body.update(temperature=1.0, seed=rng.randrange(1 << 20))
        if kind == "bad":
            body["vllm_xargs"] = rng.choice(BAD_XARGS)
        if kind.startswith("stream"):
            body["stream"] = True
        requests.append({"kind": kind, "body": body, "expect": 400 if kind == "bad" else 200})
    return requests


async def send(session: aiohttp.ClientSession, url: str, model: str, request: dict[str, Any]
               ) -> str | None:
    """Sends one request; returns a description of what went wrong, or None."""
    body = {"model": model, **request["body"]}
    async with session.post(url + "/v1/completions", json=body) as response:
        if response.status != request["expect"]:
            return f"{request['kind']}: HTTP {response.status}: {(await response.text())[:200]}"
        if request["kind"] == "stream_dropped":
            async for _ in response.content.iter_any():
                break  # first chunk: the client goes away mid-decode
            return None
        text = await response.text()
        if response.status == 200 and body.get("stream"):
            if "data: [DONE]" not in text or '"error"' in text:
                return f"{request['kind']}: stream did not end cleanly: {text[-200:]}"
        elif response.status == 200 and not json.loads(text)["choices"][0]["text"]:
            return f"{request['kind']}: empty completion"
    return None


async def drive(url: str, model: str, requests: list[dict[str, Any]], concurrency: int
                ) -> list[str]:
    gate = asyncio.Semaphore(concurrency)
    timeout = aiohttp.ClientTimeout(total=600)

    async def one(session: aiohttp.ClientSession, request: dict[str, Any]) -> str | None:
        async with gate:
            try:
                return await send(session, url, model, request)
            except (aiohttp.ClientError, asyncio.TimeoutError, ValueError, KeyError) as exc:
                return f"{request['kind']}: {type(exc).__name__}: {exc}"

    async with aiohttp.ClientSession(timeout=timeout) as session:
        results = await asyncio.gather(*(one(session, r) for r in requests))
    return [r for r in results if r is not None]


async def get(url: str) -> tuple[int, str]:
    async with (aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=60)) as session,
                session.get(url) as response):
        return response.status, await response.text()


def settle(url: str, timeout_s: float = 60.0) -> dict[str, float]:
    """``/metrics`` once nothing runs or waits any more (aborted streams take a moment)."""
    deadline = time.monotonic() + timeout_s
    while True:
        metrics = parse_metrics(asyncio.run(get(url + "/metrics"))[1])
        idle = (metrics.get("vllm:num_requests_running", 0) == 0
                and metrics.get("vllm:num_requests_waiting", 0) == 0
                and metrics.get("vllm:kv_cache_usage_perc", 0) == 0)
        if idle or time.monotonic() > deadline:
            return metrics
        time.sleep(1)


def stats_match_metrics(url: str, metrics: dict[str, float]) -> bool:
    status, text = asyncio.run(get(url + "/v1/refreekv/stats"))
    if status != 200:
        return False
    stats = json.loads(text)
    keys = ("requests_pruned_total", "kv_blocks_released_total", "kv_blocks_freed_total",
            "kv_bytes_freed_total", "tokens_pruned_total")
    return all(stats.get(key, 0) == metrics.get("refreekv:" + key, 0) for key in keys)


def leaked_blocks(usage: float, pool_blocks: int | None) -> int | None:
    if usage == 0:
        return 0
    return None if pool_blocks is None else max(1, round(usage * pool_blocks))


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--url", default=None, help="a running server (default: start one)")
    parser.add_argument("--model", default=None, help="served model name (with --url)")
    parser.add_argument("--requests", type=int, default=1000)
    parser.add_argument("--concurrency", type=int, default=12)
    parser.add_argument("--kv-pool-tokens", type=int, default=3072,
                        help="KV pool of the server this starts (small: preemption happens)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args(argv)
    server = log_path = None
    url, model = args.url, args.model
    started = time.time()
    try:
        if url is None:
            from refreekv_vllm.models import DEFAULT_MODEL_NAME, prepare_smollm2

            log_path = Path(tempfile.mkdtemp(prefix="refreekv-soak-")) / "server.log"
            command = [sys.executable, "-m", API_SERVER_MODULE, "--model", str(prepare_smollm2()),
                       "--served-model-name", DEFAULT_MODEL_NAME, "--host", "127.0.0.1",
                       "--additional-config", '{"refreekv": {}}', "--dtype", "float32",
                       "--enforce-eager", "--max-model-len", "2048",
                       "--max-num-seqs", str(args.concurrency), "--kv-cache-memory-bytes",
                       str(args.kv_pool_tokens * SMOLLM2_FP32_TOKEN_BYTES)]
            server = wait_healthy(launch(command, log_path, server_environment(os.environ)))
            url, model = server.base_url, DEFAULT_MODEL_NAME
        if model is None:
            raise SystemExit("--model is required with --url")
        before = parse_metrics(asyncio.run(get(url + "/metrics"))[1])
        # Decode growth of one wave is 1.5 pools: preemption cannot be avoided.
        requests = plan(args.requests, args.seed, pressure_requests=args.concurrency,
                        pressure_tokens=3 * args.kv_pool_tokens // (2 * args.concurrency))
        errors = asyncio.run(drive(url, model, requests, args.concurrency))
        after = settle(url)
        healthy = asyncio.run(get(url + "/health"))[0] == 200
        stats_match = stats_match_metrics(url, after)
        log_errors = ([line for line in log_path.read_text(errors="replace").splitlines()
                       if " ERROR " in line or line.startswith("Traceback")]
                      if log_path is not None else None)
    finally:
        if server is not None:
            server.stop()
    result = {
        "command": "python -m benchmarks.soak.run_soak " + " ".join(
            argv if argv is not None else sys.argv[1:]),
        "machine": f"{platform.machine()}, {os.cpu_count()} cores",
        "requests": len(requests),
        "by_kind": dict(Counter(r["kind"] for r in requests)),
        "concurrency": args.concurrency,
        "preemptions": after.get("vllm:num_preemptions_total", 0)
        - before.get("vllm:num_preemptions_total", 0),
        "requests_pruned": after.get("refreekv:requests_pruned_total", 0)
        - before.get("refreekv:requests_pruned_total", 0),
        "running_at_end": after.get("vllm:num_requests_running", 0),
        "kv_usage_at_end": after.get("vllm:kv_cache_usage_perc", 0),
        # vLLM's usage is the share of KV pages held by requests (prefix-cache entries count
        # as free): once idle, every held page is a leak. Counted in blocks of the pool this
        # run started (with --url only whether there is one).
        "leaked_blocks": leaked_blocks(after.get("vllm:kv_cache_usage_perc", 0),
                                       None if args.url else args.kv_pool_tokens // BLOCK_SIZE),
        "unexpected_errors": len(errors),
        "error_examples": errors[:10],
        "stats_match_metrics": stats_match,
        "healthy_at_end": healthy,
        "log_error_lines": None if log_errors is None else len(log_errors),
        "log_error_examples": None if log_errors is None else log_errors[:5],
        "duration_s": round(time.time() - started, 1),
    }
    print(json.dumps({k: v for k, v in result.items() if "examples" not in k}, indent=1))
    if args.out is not None:
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / "soak_cpu.json").write_text(json.dumps(result, indent=1))
    return result


if __name__ == "__main__":
    main()
