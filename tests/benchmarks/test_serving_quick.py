"""The serving benchmark's CPU smoke run: plain vLLM and ReFreeKV behind real OpenAI servers,
driven by vLLM's own load generator. No timings are asserted: both servers answer every
request, ReFreeKV prunes, runs at least as many requests at once as plain vLLM in the same KV
memory, and every server's KV pool is idle again after each run."""

import json

import pytest

from benchmarks.serving import run_serving

pytestmark = pytest.mark.e2e


def test_quick_serving_benchmark(tmp_path):
    result = run_serving.main(["--device", "cpu", "--quick", "--out", str(tmp_path),
                               "--work-dir", str(tmp_path / "work")])
    model = result["models"]["smollm2"]
    runs = {key: run for key, run in model["runs"].items() if not key.startswith("health/")}
    assert {key.split("/")[1] for key in runs} == {"plain", "default", "t0"}
    for key, run in runs.items():
        workload = model["workloads"][key.split("/")[0]]
        assert (run["completed"], run["failed"], run["errors"]) == (
            workload["num_prompts"], 0, []), key
        assert run["kv_usage_after"] == 0.0, key  # pool idle again
        assert run["engine_cpu_ms_per_token"] > 0, key
    assert all(model["runs"][f"health/{engine}"]["healthy"] for engine in ("plain", "refreekv"))
    burst = {variant: runs[f"long_burst/{variant}"] for variant in ("plain", "default", "t0")}
    assert burst["default"]["requests_pruned"] > 0 and burst["t0"]["requests_pruned"] == 0
    assert 0 < burst["default"]["physical_budget"] < 1
    assert burst["default"]["peak_running"] >= burst["plain"]["peak_running"]
    assert set(result["summary"]) == set(result["summary_t0"])
    written = json.loads((tmp_path / "serving_cpu.json").read_text())
    assert written["summary"] == result["summary"]
    assert (tmp_path / "serving_cpu.md").read_text().count("| long_burst |") == 3
    assert result["summary"]["burst_concurrency_ratio"] is not None
    assert (tmp_path / "serving_cpu.png").stat().st_size > 0
