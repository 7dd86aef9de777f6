"""What a ``/metrics`` scrape costs: plain vLLM against ReFreeKV, one server after the other.

    python -m benchmarks.serving.metrics_scrape [--device cpu] [--scrapes 60]

Each server (the serving benchmark's commands and flags, SmolLM2) first answers a few chat
requests whose prompts are long enough to be scored, so that ReFreeKV's ``refreekv:*`` series
and vLLM's histograms hold values; then ``/metrics`` is fetched ``--scrapes`` times over HTTP.
Reported per server: median and p90 wall time of a scrape, and the size of the exposition.
ReFreeKV's own series are read from its metrics directory at every scrape (they are counted
in the engine processes); the serving benchmark scrapes four times a second, Prometheus
typically every 15-60 s. Writes ``benchmarks/results/metrics_scrape_<device>.json``.
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
import urllib.request
from pathlib import Path

from benchmarks.serving.run_serving import ENGINES, device_name, smollm2_setup
from benchmarks.serving.server import RunningServer, launch, wait_healthy

ROOT = Path(__file__).resolve().parents[2]
PROMPT_CHARS = 3000  # ~700 tokens: above the default min_prompt_tokens, so the default rule scores


def chat(server: RunningServer, text: str) -> None:
    body = json.dumps({"model": "m", "messages": [{"role": "user", "content": text}],
                       "max_tokens": 8, "ignore_eos": True}).encode()
    request = urllib.request.Request(server.base_url + "/v1/chat/completions", body,
                                     {"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=600) as response:
        response.read()


def scrape_cost(server: RunningServer, scrapes: int) -> dict[str, float]:
    times, exposition = [], ""
    for _ in range(scrapes):
        start = time.perf_counter()
        exposition = server.get("/metrics")
        times.append((time.perf_counter() - start) * 1e3)
    times.sort()
    return {"median_ms": statistics.median(times), "p90_ms": times[int(0.9 * (len(times) - 1))],
            "bytes": len(exposition), "lines": exposition.count("\n"),
            "refreekv_lines": sum(line.startswith("refreekv:")
                                  for line in exposition.splitlines())}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--scrapes", type=int, default=60)
    parser.add_argument("--requests", type=int, default=4)
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results")
    args = parser.parse_args()
    setup = smollm2_setup(args.device, quick=True)
    text = (ROOT / "README.md").read_text()[:PROMPT_CHARS]
    results: dict[str, dict[str, float]] = {}
    with tempfile.TemporaryDirectory(prefix="metrics-scrape-") as work:
        for engine in ("plain", "refreekv"):
            command, env, _ = ENGINES[engine]
            server = launch([*command, "--model", str(setup.model_dir), *setup.server_flags,
                             "--served-model-name", "m"], Path(work) / f"{engine}.log", env)
            try:
                wait_healthy(server)
                for index in range(args.requests):
                    chat(server, f"{index} {text}")
                results[engine] = scrape_cost(server, args.scrapes)
            finally:
                server.stop()
    print(f"{'server':10} {'median ms':>10} {'p90 ms':>8} {'lines':>6} {'refreekv:':>9}")
    for engine, r in results.items():
        print(f"{engine:10} {r['median_ms']:10.2f} {r['p90_ms']:8.2f} {r['lines']:6.0f} "
              f"{r['refreekv_lines']:9.0f}")
    summary = {
        "device": device_name(args.device),
        "workload": (f"SmolLM2 servers with the serving benchmark's flags, {args.requests} chat "
                     f"requests of ~{PROMPT_CHARS} characters each, then {args.scrapes} "
                     "scrapes of /metrics over HTTP, one at a time"),
        "results": results,
        "refreekv_vs_plain": results["refreekv"]["median_ms"] / results["plain"]["median_ms"],
        "command": f"python -m benchmarks.serving.metrics_scrape --device {args.device} "
                   f"--scrapes {args.scrapes}",
    }
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / f"metrics_scrape_{args.device}.json").write_text(json.dumps(summary, indent=2))


if __name__ == "__main__":
    main()
