"""How the serving benchmark orders and combines its runs (no servers)."""

import os
import shutil
import sys
from pathlib import Path

import pytest

import refreekv_vllm
from benchmarks.serving.run_serving import (
    engine_cpu_ms_per_token,
    merge_runs,
    repeat_ratios,
    repeat_spread,
    round_order,
    round_ratios,
    server_sessions,
    servers_one_at_a_time,
    source_digest,
)


def test_rounds_rotate_and_palindromes_run_every_variant_forth_and_back():
    variants = ["plain", "default", "t0"]
    assert round_order(variants, 0, palindrome=False) == ["plain", "default", "t0"]
    assert round_order(variants, 1, palindrome=False) == ["default", "t0", "plain"]
    assert round_order(variants, 4, palindrome=True) == [
        "default", "t0", "plain", "plain", "t0", "default"]


def test_a_linear_drift_cancels_in_a_palindrome():
    """A machine 1% slower per run: in A B B A both variants see the same mean slowdown."""
    order = round_order(["plain", "refreekv"], 0, palindrome=True)
    speeds: dict[str, list[float]] = {}
    for position, variant in enumerate(order):
        speeds.setdefault(variant, []).append(100.0 * (1 - 0.01 * position))
    merged = {v: merge_runs([{"output_tok_s": s} for s in runs], "passes")["output_tok_s"]
              for v, runs in speeds.items()}
    assert merged["refreekv"] == merged["plain"]


def test_merged_runs_keep_their_parts_and_count_once():
    runs = [{"output_tok_s": 100.0, "completed": 8, "peak_running": 3, "errors": ["x"],
             "step_phases": {"decode": 1}},
            {"output_tok_s": 110.0, "completed": 8, "peak_running": 5, "errors": [],
             "step_phases": {"decode": 2}}]
    merged = merge_runs(runs, "passes")
    assert merged["output_tok_s"] == 105.0 and merged["completed"] == 16
    assert merged["peak_running"] == 5 and merged["errors"] == ["x"]
    assert merged["passes"] == runs and "rounds" not in merged
    assert merge_runs([runs[0]], "passes") == runs[0]


def test_round_ratios_pair_the_runs_of_each_round():
    def runs(*values: float) -> dict:
        return merge_runs([merge_runs([{"output_tok_s": v}], "passes") for v in values],
                          "rounds")

    models = {"smollm2": {"runs": {"long_c1/plain": runs(100.0, 50.0),
                                   "long_c1/default": runs(95.0, 60.0)}}}
    assert round_ratios(models, "default")["c1_decode_ratio"] == [0.95, 1.2]


def test_the_report_lists_every_runs_decode_steps():
    from benchmarks.serving.report import decode_step_lines, measured_runs

    def leaf(interval: float) -> dict:
        return {"output_tok_s": 1.0, "step_phases": {
            "decode": {"interval_mean_ms": interval, "mean_reqs": 7.0}}}

    rounds = [merge_runs([leaf(2.0), leaf(2.2)], "passes"), merge_runs([leaf(2.4), leaf(2.6)],
                                                                         "passes")]
    run = merge_runs(rounds, "rounds")
    assert [r["step_phases"]["decode"]["interval_mean_ms"] for r in measured_runs(run)] == [
        2.0, 2.2, 2.4, 2.6]
    lines = decode_step_lines({"runs": {"long_c8/t0": run, "health/refreekv": {}}})
    assert lines[-1] == "| long_c8 | ReFreeKV T = 0 | 2.00 (7), 2.20 (7), 2.40 (7), 2.60 (7) |"
    assert decode_step_lines({"runs": {"long_c8/t0": {"output_tok_s": 1.0}}}) == []


def test_the_report_weighs_each_runs_mixed_steps_by_their_count():
    """Steps that run prompt tokens: each call's mean per step over every single run (a run of
    3 steps at 10 ms and one of 1 step at 2 ms average 8 ms); calls under the floor in every
    server are left out."""
    from benchmarks.serving.report import mixed_step_lines

    def leaf(steps: int, forward_ms: float, tiny_ms: float = 0.01) -> dict:
        return {"output_tok_s": 1.0, "step_phases": {"mixed": {
            "steps": steps, "interval_mean_ms": forward_ms + 1.0,
            "phase_mean_ms": {"_model_forward": forward_ms, "tiny": tiny_ms}}}}

    default = merge_runs([merge_runs([leaf(3, 10.0), leaf(1, 2.0)], "passes")], "rounds")
    plain = merge_runs([merge_runs([leaf(2, 4.0)], "passes")], "rounds")
    lines = mixed_step_lines({"runs": {"chat/plain": plain, "chat/default": default,
                                       "health/refreekv": {}}})
    assert lines[3] == "| call | plain vLLM | ReFreeKV default |"
    assert lines[5] == "| steps | 2 | 4 |"
    assert lines[6:] == ["| `time between steps` | 5.00 | 9.00 |",
                         "| `_model_forward` | 4.00 | 8.00 |"]
    assert mixed_step_lines({"runs": {"chat/t0": {"output_tok_s": 1.0}}}) == []


def test_the_report_gives_calls_per_step_and_the_timers_cost():
    from benchmarks.serving.report import mixed_step_lines

    run = {"output_tok_s": 1.0, "step_phases": {
        "mixed": {"steps": 4, "interval_mean_ms": 20.0,
                  "phase_mean_ms": {"capture": 1.0, "execute_model": 18.0},
                  "phase_cpu_mean_ms": {"capture": 0.9, "execute_model": 17.0},
                  "phase_calls_mean": {"capture": 28.0, "execute_model": 1.0}},
        "timer_overhead_per_call": {"wall_us": 3.25, "cpu_us": 1.5}}}
    lines = mixed_step_lines({"runs": {"long_c8/default": run}})
    assert lines[1].endswith("; ×n: calls per step, where more than one. Each timed call adds "
                             "3.2 µs to the calls around it")
    assert "| `capture` ×28 | 1.00 (0.90) |" in lines
    assert "| `execute_model` | 18.00 (17.00) |" in lines


def test_repeat_ratios_give_each_servers_second_pass_over_its_first():
    """The run's noise floor: per round, the same server's two passes of a palindrome; a
    single pass (no palindrome) gives none, and one round is read from the run itself."""
    from benchmarks.serving.report import repeat_lines

    def passes(*values: float) -> dict:
        return merge_runs([{"output_tok_s": v} for v in values], "passes")

    two_rounds = merge_runs([passes(100.0, 90.0), passes(80.0, 88.0)], "rounds")
    models = {"smollm2": {"runs": {"chat/plain": two_rounds, "chat/t0": passes(50.0, 55.0),
                                   "long_c1/plain": passes(10.0), "health/plain": {}}}}
    repeats = repeat_ratios(models)
    assert repeats == {"smollm2": {"chat": {"plain": [0.9, 1.1], "t0": [1.1]}}}
    assert repeat_spread(repeats) == pytest.approx(0.1)
    assert repeat_spread({}) is None
    lines = repeat_lines({"repeat_ratios": repeats, "repeat_spread": 0.1})
    assert "median distance from 1: 0.100" in lines[1]
    assert lines[-2:] == ["| chat | plain vLLM | 0.900, 1.100 |",
                          "| chat | ReFreeKV T = 0 | 1.100 |"]
    assert repeat_lines({"repeat_ratios": {}}) == []


def test_engine_cpu_per_token_counts_the_engine_core_only():
    before = {"VLLM::EngineCor": 10.0, "python3": 1.0}
    after = {"VLLM::EngineCor": 12.5, "python3": 9.0}
    assert engine_cpu_ms_per_token(before, after, 1000) == pytest.approx(2.5)
    assert engine_cpu_ms_per_token({}, after, 500) == pytest.approx(25.0)
    assert engine_cpu_ms_per_token(before, after, 0) is None
    assert engine_cpu_ms_per_token(before, {"python3": 9.0}, 1000) is None


def test_source_digest_names_the_code_that_ran(tmp_path):
    package = Path(refreekv_vllm.__file__).parent
    copy = tmp_path / "refreekv_vllm"
    shutil.copytree(package, copy, ignore=shutil.ignore_patterns("__pycache__"))
    assert source_digest(copy) == source_digest(package)
    config = copy / "config.py"
    config.write_bytes(config.read_bytes() + b"\n")
    assert source_digest(copy) != source_digest(package)


def test_servers_one_at_a_time_run_every_pass_of_their_own_variants():
    """Together: one session interleaving every variant in each round; one at a time: a
    session per engine with the same passes; restarted per round: the same, a session (or one
    per engine) for each round. Every plan runs every (round, workload, variant) pass the same
    number of times."""
    variants = [("plain", "plain", None), ("refreekv", "default", None),
                ("refreekv", "t0", {"refreekv_threshold": 0.0})]
    together = server_sessions(variants, num_runs=2, rounds=2, palindrome=True,
                               one_at_a_time=False)
    apart = server_sessions(variants, num_runs=2, rounds=2, palindrome=True,
                            one_at_a_time=True)
    assert [s.engines for s in together] == [["plain", "refreekv"]]
    assert [s.engines for s in apart] == [["plain"], ["refreekv"]]
    assert [p[2][1] for p in together[0].passes[:6]] == [
        "plain", "default", "t0", "t0", "default", "plain"]
    assert [p[2][1] for p in apart[1].passes[:4]] == ["default", "t0", "t0", "default"]
    # Round 2 starts with the other variant of the engine.
    assert [p[2][1] for p in apart[1].passes[8:12]] == ["t0", "default", "default", "t0"]

    restarted = server_sessions(variants, num_runs=2, rounds=2, palindrome=True,
                                one_at_a_time=False, restart_per_round=True)
    assert [s.engines for s in restarted] == [["plain", "refreekv"]] * 2
    assert [s.passes for s in restarted] == [together[0].passes[:12], together[0].passes[12:]]
    restarted_apart = server_sessions(variants, num_runs=2, rounds=2, palindrome=True,
                                      one_at_a_time=True, restart_per_round=True)
    assert [s.engines for s in restarted_apart] == [["plain"], ["refreekv"]] * 2
    assert {p[0] for p in restarted_apart[2].passes} == {1}

    def counted(sessions):
        found: dict = {}
        for session in sessions:
            for round_index, run_index, (engine, variant, _) in session.passes:
                assert engine in session.engines
                key = (round_index, run_index, variant)
                found[key] = found.get(key, 0) + 1
        return found

    assert counted(together) == counted(apart) == counted(restarted) == counted(restarted_apart)
    assert set(counted(apart).values()) == {2}  # palindrome: two passes each


def test_servers_run_one_at_a_time_only_where_they_do_not_fit_together():
    from benchmarks.serving.run_serving import ModelSetup

    big = ModelSetup("8b", Path("m"), [], [], gpu_bytes_per_server=59 * 10**9)
    small = ModelSetup("small", Path("m"), [], [])
    h100, h200 = 81_559 * 2**20, 143_771 * 2**20
    assert servers_one_at_a_time("auto", big, 2, h100)
    assert not servers_one_at_a_time("auto", big, 2, h200)
    assert servers_one_at_a_time("auto", big, 3, h200)  # with plain vLLM on V1 as well
    assert not servers_one_at_a_time("auto", small, 3, h100)
    assert not servers_one_at_a_time("auto", big, 2, None)  # no GPU to ask
    assert servers_one_at_a_time("one-at-a-time", small, 2, None)
    assert not servers_one_at_a_time("together", big, 2, h100)


def _result(rounds: dict[str, list[float]], digest: str = "d1") -> dict:
    """A serving result of SmolLM2's long_c8 whose variants ran ``rounds`` (output tok/s per
    round, one pass each)."""
    from benchmarks.serving.run_serving import assemble_result

    runs = {f"long_c8/{variant}": merge_runs(
        [merge_runs([{"output_tok_s": value, "completed": 32}], "passes") for value in values],
        "rounds") for variant, values in rounds.items()}
    runs["health/refreekv"] = {"healthy": True}
    model = {"model": "SmolLM2", "dummy_weights": False, "server_flags": ["--dtype", "bf16"],
             "kv_pool_tokens": 64, "palindrome": True, "servers": "together",
             "rounds": len(next(iter(rounds.values()))),
             "workloads": {"long_c8": {"name": "long_c8", "seed": 2}}, "runs": runs}
    return assemble_result({"smollm2": model}, command="run", device="GPU", vllm_version="v",
                           plugin_commit="c", plugin_source_digest=digest, quick=False,
                           wall_s=1.0)


def test_merged_results_pool_their_rounds_and_recompute_the_summary():
    from benchmarks.serving.merge_results import merge_results

    first = _result({"plain": [100.0, 100.0], "default": [90.0, 92.0]})
    second = _result({"plain": [100.0, 100.0], "default": [98.0, 99.0]})
    assert first["summary"]["c8_throughput_ratio"] == 0.91
    merged = merge_results([first, second])
    assert merged["round_ratios"]["default"]["c8_throughput_ratio"] == [0.9, 0.92, 0.98, 0.99]
    assert merged["summary"]["c8_throughput_ratio"] == 0.95
    run = merged["models"]["smollm2"]["runs"]["long_c8/default"]
    assert run["completed"] == 128 and len(run["rounds"]) == 4
    assert merged["models"]["smollm2"]["rounds"] == 4 and merged["command"] == ["run", "run"]
    assert merged["models"]["smollm2"]["runs"]["health/refreekv"] == {"healthy": True}


def test_results_of_other_sources_or_with_unpaired_rounds_are_not_merged():
    from benchmarks.serving.merge_results import merge_results

    plain_only = _result({"plain": [100.0]})
    both = _result({"plain": [100.0], "default": [90.0]})
    with pytest.raises(ValueError, match="plugin_source_digest"):
        merge_results([both, _result({"plain": [100.0], "default": [90.0]}, digest="d2")])
    with pytest.raises(ValueError, match="more rounds on some servers"):
        merge_results([both, plain_only])


def test_an_alternative_config_runs_as_its_own_server_and_column(tmp_path):
    from benchmarks.serving.report import write_markdown
    from benchmarks.serving.run_serving import assemble_result, selected_engines

    engines = selected_engines(False, ["plain"], {"kernel": "cuda"})
    assert list(engines) == ["plain", "refreekv_alt"]
    command, _, variants = engines["refreekv_alt"]
    assert command[-2:] == ["--additional-config", '{"refreekv": {"kernel": "cuda"}}']
    assert variants == [("alt", None)]
    runs = {f"long_c8/{variant}": merge_runs([{"output_tok_s": value}], "rounds")
            for variant, value in (("plain", 100.0), ("default", 90.0), ("alt", 95.0))}
    model = {"model": "SmolLM2", "server_flags": [], "workloads": {}, "runs": runs}
    result = assemble_result({"smollm2": model}, command="run", device="GPU", vllm_version="v",
                             plugin_commit="c", plugin_source_digest="d", quick=False,
                             wall_s=1.0, alt_config={"kernel": "cuda"})
    assert result["summary_alt"]["c8_throughput_ratio"] == 0.95
    write_markdown(result, tmp_path / "r.md")
    assert "| `c8_throughput_ratio` | 0.900 | – | 0.950 |" in (tmp_path / "r.md").read_text()


def test_results_so_far_are_written_only_when_their_rounds_are_complete(tmp_path):
    """A run cut short keeps what it measured: after each session whose rounds no later session
    continues, the model's result so far (its rounds paired as in the final result)."""
    import json

    from benchmarks.serving.run_serving import (
        ModelSetup,
        Run,
        assemble_result,
        model_result,
        rounds_complete,
        write_partial,
    )
    from benchmarks.serving.workloads import Workload

    variants = [("plain", "plain", None), ("refreekv", "default", None)]

    def plan(one_at_a_time: bool, restart: bool) -> list[bool]:
        sessions = server_sessions(variants, num_runs=1, rounds=2, palindrome=False,
                                   one_at_a_time=one_at_a_time, restart_per_round=restart)
        return [rounds_complete(sessions, i) for i in range(len(sessions))]

    assert plan(False, False) == [True]
    assert plan(False, True) == [True, True]
    assert plan(True, False) == [False, True]  # each engine's session spans both rounds
    assert plan(True, True) == [False, True, False, True]

    setup = ModelSetup("SmolLM2", Path("m"), [], [Run(Workload("long_c8", "long", 4), 8)])
    passes = {(0, "long_c8/plain"): [{"output_tok_s": 100.0}],
              (0, "long_c8/default"): [{"output_tok_s": 96.0}]}
    so_far = model_result(setup, passes, {}, None, rounds=2, palindrome=False,
                          one_at_a_time=False, restart_per_round=True)
    assert so_far["rounds"] == 2 and so_far["rounds_measured"] == 1
    result = assemble_result({"smollm2": so_far}, command="run", device="GPU",
                             vllm_version="v", plugin_commit="c", plugin_source_digest="d",
                             quick=False, wall_s=1.0)
    write_partial(result, tmp_path / "serving_gpu_partial.json")
    written = json.loads((tmp_path / "serving_gpu_partial.json").read_text())
    assert written["summary"]["c8_throughput_ratio"] == 0.96
    assert list(tmp_path.iterdir()) == [tmp_path / "serving_gpu_partial.json"]


def test_the_gpu_is_asked_of_nvidia_smi_so_that_this_process_stays_off_it(tmp_path, monkeypatch):
    """The load generator names the GPU between rounds, while servers start: it must not open a
    CUDA context itself (an nvidia-smi stand-in answers here; without one, a torch child)."""
    from benchmarks.serving.run_serving import device_name, gpu_memory_bytes

    smi = tmp_path / "nvidia-smi"
    smi.write_text("#!/bin/sh\ncase \"$1\" in\n  --query-gpu=name) echo 'NVIDIA H100 80GB HBM3';;\n"
                   "  --query-gpu=memory.total) echo 81559;;\nesac\n")
    smi.chmod(0o755)
    monkeypatch.setenv("PATH", f"{tmp_path}:{os.environ['PATH']}")
    assert device_name("cuda") == "NVIDIA H100 80GB HBM3"
    assert gpu_memory_bytes() == 81559 * 2**20
    assert "torch" not in sys.modules or not sys.modules["torch"].cuda.is_initialized()
