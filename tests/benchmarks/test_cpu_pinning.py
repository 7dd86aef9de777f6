"""``run_serving --pin-cpus``: cores read from the kernel's topology, the split between engine
core, API server and load generator, and every thread of a real process tree pinned."""

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from benchmarks.serving.cpu_pinning import (
    CpuPlan,
    physical_cores,
    pin_self,
    pin_server,
    plan_cpus,
)

# A child that names itself as vLLM's engine core does, with a second thread, under a parent.
ENGINE_CORE_CHILD = """
import ctypes, threading, time
ctypes.CDLL(None).prctl(15, b"VLLM::EngineCore", 0, 0, 0)
threading.Thread(target=time.sleep, args=(60,), daemon=True).start()
print("ready", flush=True)
time.sleep(60)
"""
PARENT = f"""
import subprocess, sys, time
child = subprocess.Popen([sys.executable, "-c", {ENGINE_CORE_CHILD!r}], stdout=sys.stdout)
time.sleep(60)
"""


def _topology(root: Path, siblings: dict[int, str]) -> Path:
    for cpu, text in siblings.items():
        path = root / f"cpu{cpu}" / "topology"
        path.mkdir(parents=True)
        (path / "thread_siblings_list").write_text(text + "\n")
    return root


def test_cpus_are_grouped_by_core(tmp_path):
    root = _topology(tmp_path, {0: "0,4", 1: "1,5", 2: "2-3", 3: "2-3", 4: "0,4", 5: "1,5"})
    # CPU 6 has no readable topology: a core of its own. CPU 5 is not allowed.
    assert physical_cores({0, 1, 2, 3, 4, 6}, root) == [(0, 4), (1,), (2, 3), (6,)]


def test_plan_gives_whole_cores_and_refuses_too_few():
    cores = [(0, 8), (1, 9), (2, 10), (3, 11), (4, 12), (5, 13)]
    plan = plan_cpus(cores)
    assert plan == CpuPlan(engine_core=frozenset({0, 8, 1, 9}),
                           server=frozenset({2, 10, 3, 11}),
                           load=frozenset({4, 12, 5, 13}))
    with pytest.raises(ValueError, match="needs 5 cores.*offers 4"):
        plan_cpus(cores[:4])


@pytest.mark.skipif(len(os.sched_getaffinity(0)) < 2, reason="needs two CPUs to tell sets apart")
def test_every_thread_of_a_server_tree_is_pinned():
    first, second = sorted(os.sched_getaffinity(0))[:2]
    plan = CpuPlan(engine_core=frozenset({first}), server=frozenset({second}),
                   load=frozenset({first, second}))
    parent = subprocess.Popen([sys.executable, "-c", PARENT], stdout=subprocess.PIPE, text=True)
    try:
        assert parent.stdout.readline().strip() == "ready"
        time.sleep(0.2)
        pinned = pin_server(parent.pid, plan)
        engine = [pid for pid, name in pinned.items() if name.startswith("VLLM::EngineCor")]
        assert len(pinned) == 2 and len(engine) == 1
        for pid in pinned:
            tasks = list(Path(f"/proc/{pid}/task").iterdir())
            expected = plan.engine_core if pid in engine else plan.server
            assert {frozenset(os.sched_getaffinity(int(task.name))) for task in tasks} == {
                expected}
            if pid in engine:
                assert len(tasks) >= 2  # the second thread too
    finally:
        subprocess.run(["pkill", "-P", str(parent.pid)], check=False)
        parent.kill()
        parent.wait()


def test_the_load_generator_pins_itself():
    before = os.sched_getaffinity(0)
    target = frozenset(sorted(before)[:1])
    try:
        pin_self(target)
        assert os.sched_getaffinity(0) == target
    finally:
        pin_self(frozenset(before))
    assert os.sched_getaffinity(0) == before


def test_cpu_workers_get_the_allowed_cpus_dealt_out_in_turn():
    from benchmarks.serving.cpu_pinning import vllm_cpu_thread_binds

    assert vllm_cpu_thread_binds(2, {0, 1}) == "0|1"
    assert vllm_cpu_thread_binds(2, {3, 1, 2, 0}) == "0,2|1,3"
    assert vllm_cpu_thread_binds(3, {4, 5, 6, 7, 8}) == "4,7|5,8|6"
