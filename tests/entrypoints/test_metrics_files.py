"""ReFreeKV's counters cross from the engine processes to the API server's registry through
files, while vLLM's own metrics stay in memory: a child process (as the engine core is) updates
them, the parent's registry (the one ``/metrics`` serves) reads them."""

import multiprocessing
import os
import subprocess
import sys
import textwrap

PARENT = textwrap.dedent("""
    import multiprocessing, os, sys
    from prometheus_client import REGISTRY, values
    from refreekv_vllm.metrics.prometheus import install_metrics_dir

    def engine_core():
        from refreekv_vllm.metrics.prometheus import SchedulerMetrics
        metrics = SchedulerMetrics("m", 0, 0.01, 32, num_layers=2, skip_reasons=["opted_out"])
        metrics.requests_pruned.inc(3)
        metrics.block_budget.observe(0.42)
        metrics.layer_tokens(100, [100, 40])

    if __name__ == "__main__":
        install_metrics_dir()
        assert values.ValueClass is values.MutexValue, "vLLM's metrics must stay in memory"
        child = multiprocessing.get_context(sys.argv[1]).Process(target=engine_core)
        child.start(); child.join()
        assert child.exitcode == 0
        found = {s.name: s.value for f in REGISTRY.collect() for s in f.samples
                 if s.name.startswith("refreekv:")
                 and s.labels.get("layer") in (None, "1") and s.labels.get("le") in (None, "0.5")}
        print(sorted(found.items()))
        assert found["refreekv:requests_pruned_total"] == 3
        assert found["refreekv:request_block_budget_count"] == 1
        assert found["refreekv:request_block_budget_bucket"] == 1
        assert found["refreekv:layer_kept_tokens_total"] == 40
        assert found["refreekv:threshold"] == 0.01
        assert os.listdir(os.environ["REFREEKV_METRICS_DIR"])
""")


def test_engine_process_counters_reach_the_serving_registry(tmp_path):
    script = tmp_path / "parent.py"
    script.write_text(PARENT)
    env = {k: v for k, v in os.environ.items()
           if k not in ("PROMETHEUS_MULTIPROC_DIR", "REFREEKV_METRICS_DIR")}
    for method in ("spawn", "fork"):
        if method not in multiprocessing.get_all_start_methods():
            continue
        result = subprocess.run([sys.executable, str(script), method], env=env,
                                capture_output=True, text=True, timeout=120)
        assert result.returncode == 0, result.stdout + result.stderr


CHOOSE_DIR = textwrap.dedent("""
    import os
    from refreekv_vllm.metrics.prometheus import install_metrics_dir
    install_metrics_dir()
    print(os.environ["REFREEKV_METRICS_DIR"])
""")


def test_each_server_reads_only_its_own_metrics_directory(tmp_path):
    """A server started from a process that made a directory for itself (a test session, a
    script running ``vllm.LLM``) must not add that process's values to its own; a directory
    the user chose is kept."""
    env = {k: v for k, v in os.environ.items() if k != "PROMETHEUS_MULTIPROC_DIR"}

    def chosen(**extra: str) -> str:
        result = subprocess.run([sys.executable, "-c", CHOOSE_DIR], env={**env, **extra},
                                capture_output=True, text=True, timeout=120)
        assert result.returncode == 0, result.stderr
        return result.stdout.strip().splitlines()[-1]

    made_by_another = str(tmp_path / "another")
    assert chosen(REFREEKV_METRICS_DIR=made_by_another,
                  REFREEKV_METRICS_DIR_OWNER=str(os.getpid())) != made_by_another
    users = str(tmp_path / "users")
    env.pop("REFREEKV_METRICS_DIR_OWNER", None)
    assert chosen(REFREEKV_METRICS_DIR=users) == users
