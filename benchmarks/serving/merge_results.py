"""Serving results of one plugin source from several invocations as one result: a measurement
split over machine leases (one model per invocation, or more rounds of some workloads). Every
round of every invocation is kept; each number is then the median over all of them and the
summary is recomputed from the pooled rounds, exactly as one longer run would have reported it.
Results of different plugin sources, vLLM versions, devices or server flags are refused. Run
from the repository root::

    python -m benchmarks.serving.merge_results --out benchmarks/results A.json B.json
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

from benchmarks.serving.run_serving import assemble_result, merge_runs, rounds_of, write_reports

# What must be the same in every merged result, and in every result's entry of one model.
SAME_RESULT = ("device", "vllm_version", "plugin_source_digest", "quick", "alt_config")
SAME_MODEL = ("model", "dummy_weights", "server_flags", "kv_pool_tokens", "palindrome",
              "servers", "restart_per_round")


def _require_same(entries: list[dict[str, Any]], keys: tuple[str, ...], what: str) -> None:
    for key in keys:
        values = {json.dumps(entry.get(key), sort_keys=True) for entry in entries}
        if len(values) > 1:
            raise ValueError(f"{what} differ in {key!r}: {sorted(values)}")


def merge_models(entries: list[dict[str, Any]]) -> dict[str, Any]:
    """One model's entries of several results as one entry, their rounds pooled."""
    _require_same(entries, SAME_MODEL, f"the entries of model {entries[0]['model']!r}")
    workloads: dict[str, Any] = {}
    rounds: dict[str, list[dict[str, Any]]] = {}
    health: dict[str, dict[str, bool]] = {}
    for entry in entries:
        for name, definition in entry["workloads"].items():
            if workloads.setdefault(name, definition) != definition:
                raise ValueError(f"workload {name!r} is defined differently in two results")
        for key, run in entry["runs"].items():
            if key.startswith("health/"):
                healthy = health.get(key, {"healthy": True})["healthy"] and run["healthy"]
                health[key] = {"healthy": healthy}
            else:
                rounds.setdefault(key, []).extend(rounds_of(run))
    per_workload: dict[str, set[int]] = {}
    for key, parts in rounds.items():
        per_workload.setdefault(key.split("/")[0], set()).add(len(parts))
    uneven = sorted(name for name, counts in per_workload.items() if len(counts) > 1)
    if uneven:
        # Ratios pair each round's servers: every variant of a workload needs every round.
        raise ValueError(f"workloads {uneven} ran more rounds on some servers than on others")
    runs: dict[str, Any] = {key: merge_runs(parts, "rounds") for key, parts in rounds.items()}
    runs.update(health)
    counts = {len(parts) for parts in rounds.values()}
    merged = {**entries[0], "workloads": workloads, "runs": runs,
              "rounds": counts.pop() if len(counts) == 1 else {
                  key: len(parts) for key, parts in rounds.items()}}
    pinnings = [entry["cpu_pinning"] for entry in entries if "cpu_pinning" in entry]
    if any(pinning != pinnings[0] for pinning in pinnings):
        raise ValueError(f"the entries of model {entries[0]['model']!r} pinned CPUs differently")
    return merged


def merge_results(results: list[dict[str, Any]]) -> dict[str, Any]:
    if not results:
        raise ValueError("nothing to merge")
    _require_same(results, SAME_RESULT, "the results")
    by_model: dict[str, list[dict[str, Any]]] = {}
    for result in results:
        for key, entry in result["models"].items():
            by_model.setdefault(key, []).append(entry)
    commands = [command for result in results
                for command in (result["command"] if isinstance(result["command"], list)
                                else [result["command"]])]
    commits = sorted({result["plugin_commit"] for result in results})
    first = results[0]
    return assemble_result(
        {key: merge_models(entries) for key, entries in by_model.items()},
        command=commands, device=first["device"], vllm_version=first["vllm_version"],
        # The source digests are equal: commits that differ only outside the plugin.
        plugin_commit=", ".join(commits), plugin_source_digest=first["plugin_source_digest"],
        quick=first["quick"], wall_s=round(sum(result["wall_s"] for result in results), 1),
        alt_config=first.get("alt_config"))


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("results", nargs="+", type=Path, help="result JSON files to merge")
    parser.add_argument("--out", type=Path, required=True, help="folder of the merged report")
    parser.add_argument("--stem", default="serving_gpu", help="file name of the merged report")
    args = parser.parse_args(argv)
    merged = merge_results([json.loads(path.read_text()) for path in args.results])
    args.out.mkdir(parents=True, exist_ok=True)
    write_reports(merged, args.out, args.stem)
    print(json.dumps({"summary": merged["summary"], "summary_t0": merged["summary_t0"]},
                     indent=1))
    return merged


if __name__ == "__main__":
    main()
