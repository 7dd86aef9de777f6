"""The step timer's records read back into per-step phases (synthetic records, known answers),
and the timer itself loaded into a fresh interpreter the way servers load it."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from benchmarks.serving.server import STEP_TIMER_SITE, process_cpu_seconds
from benchmarks.serving.step_phases import (
    read_records,
    read_timer_overhead,
    summarise_steps,
    wait_for_records,
)
from tests.markers import slow


def _records(steps):
    """``steps``: (requests, tokens, schedule ms, execute ms, wait ms) per step, 10 ms apart;
    each step's wait and update belong to the step before under async scheduling, and are
    recorded after the step's schedule, as the engine core does."""
    records = []
    for i, (reqs, tokens, schedule_ms, execute_ms, wait_ms) in enumerate(steps):
        t = i * 0.010
        records.append(["schedule", t, schedule_ms / 1e3, schedule_ms / 1e3, reqs, tokens])
        # Half of execute_model's time on the thread's CPU, the rest waiting.
        records.append(["execute_model", t + 0.001, execute_ms / 1e3, execute_ms / 2e3])
        records.append(["_prepare_inputs", t + 0.0012, execute_ms / 2e3, execute_ms / 2e3])
        records.append(["wait_output", t + 0.004, wait_ms / 1e3, 0.0])
        records.append(["update_from_output", t + 0.005, 0.5e-3, 0.5e-3])
    # An idle poll of the scheduler: it scheduled nothing and starts no step.
    records.append(["schedule", len(steps) * 0.010 - 0.002, 0.1e-3, 0.1e-3, 0, 0])
    return records


def test_steps_are_split_by_kind_and_running_requests():
    steps = [(4, 4, 1.0, 2.0, 3.0)] * 5 + [(20, 500, 2.0, 6.0, 1.0)] * 2 + [(20, 20, 1.0, 2.0, 0.0)]
    summary = summarise_steps(_records(steps))
    # The last step has no successor, so it has no interval.
    assert summary["decode"]["steps"] == 5 and summary["mixed"]["steps"] == 2
    assert set(summary) == {"decode", "decode 002-008", "mixed"}
    decode = summary["decode"]
    assert decode["interval_median_ms"] == pytest.approx(10.0)
    assert decode["phase_mean_ms"]["execute_model"] == pytest.approx(2.0)
    assert decode["phase_mean_ms"]["_prepare_inputs"] == pytest.approx(1.0)
    assert decode["phase_cpu_mean_ms"]["execute_model"] == pytest.approx(1.0)
    assert decode["phase_cpu_mean_ms"]["wait_output"] == 0.0
    # The idle poll (0.1 ms) lands in the step before it: step 7 has no interval, so the
    # decode steps keep their own schedule time.
    assert decode["phase_mean_ms"]["schedule"] == pytest.approx(1.0)
    # 10 ms per step: 1 + 2 + 3 + 0.5 ms of engine phases (the runner's run inside them).
    assert decode["other_mean_ms"] == pytest.approx(3.5)
    assert summary["mixed"]["mean_reqs"] == 20
    assert decode["phase_calls_mean"] == {"schedule": 1.0, "execute_model": 1.0,
                                          "_prepare_inputs": 1.0, "wait_output": 1.0,
                                          "update_from_output": 1.0}


def test_calls_per_step_count_every_call_of_a_phase():
    records = _records([(4, 4, 1.0, 2.0, 3.0)] * 3)
    # 28 captures in the first step, none in the others.
    records += [["capture", 0.002 + i * 1e-5, 1e-5, 1e-5] for i in range(28)]
    calls = summarise_steps(records)["decode"]["phase_calls_mean"]
    assert calls["capture"] == 14.0  # two steps with an interval: 28 and 0


def test_records_are_read_within_the_window(tmp_path):
    lines = [["schedule", t, 0.001, 0.001, 1, 1] for t in (1.0, 2.0, 3.0)]
    (tmp_path / "steps-1.jsonl").write_text("".join(json.dumps(r) + "\n" for r in lines))
    assert [r[1] for r in read_records(tmp_path, 1.5, 3.0)] == [2.0]


@slow
def test_the_timer_patches_vllm_only_when_asked(tmp_path):
    code = ("import vllm.v1.engine.core as core, vllm.v1.worker.worker_base as base; "
            "print(core.EngineCore.__init__.__name__, base.WorkerWrapperBase.init_device.__name__)")
    env = {**os.environ, "PYTHONPATH": str(STEP_TIMER_SITE)}
    env.pop("STEP_TIMER_DIR", None)
    plain = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True,
                           text=True, check=True).stdout.splitlines()[-1].split()
    timed = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                           check=True, env={**env, "STEP_TIMER_DIR": str(tmp_path)}
                           ).stdout.splitlines()[-1].split()
    assert plain == ["__init__", "init_device"]
    assert timed == ["__init__", "timed_init_device"]


@slow
def test_extra_functions_and_methods_are_timed(tmp_path):
    code = ("import colorsys, calendar, sched, time\n"
            "colorsys.rgb_to_hsv(1.0, 0.0, 0.0)\n"
            "calendar.Calendar().getfirstweekday()\n"
            "queue = sched.scheduler(); queue.enter(0.2, 1, print); queue.run()\n"
            "time.sleep(1.2)\n")  # the writer thread flushes twice a second
    env = {**os.environ, "PYTHONPATH": str(STEP_TIMER_SITE), "STEP_TIMER_DIR": str(tmp_path),
           "STEP_TIMER_EXTRA": "colorsys:rgb_to_hsv, calendar:Calendar.getfirstweekday, "
                               "sched:scheduler.run"}
    subprocess.run([sys.executable, "-c", code], env=env, check=True)
    records = {r[0]: r for r in read_records(tmp_path, 0.0, float("inf"))}
    assert sorted(records) == ["Calendar.getfirstweekday", "rgb_to_hsv", "scheduler.run"]
    assert all(0 <= r[3] <= r[2] + 1e-3 for r in records.values())
    # A call that mostly waits (a 0.2 s sleep inside) shows it: its thread's CPU time stays low.
    run = records["scheduler.run"]
    assert run[2] >= 0.2 and run[3] < 0.1


@slow
def test_records_are_written_only_once_the_process_is_idle(tmp_path):
    # Writing while the server works would take the GIL from the phases being measured.
    code = ("import colorsys, glob, os, time\n"
            "end = time.monotonic() + 1.0\n"
            "while time.monotonic() < end:\n"
            "    colorsys.rgb_to_hsv(1.0, 0.0, 0.0); time.sleep(0.001)\n"
            "print(len(glob.glob(os.path.join(os.environ['STEP_TIMER_DIR'], '*'))))\n")
    env = {**os.environ, "PYTHONPATH": str(STEP_TIMER_SITE), "STEP_TIMER_DIR": str(tmp_path),
           "STEP_TIMER_EXTRA": "colorsys:rgb_to_hsv"}
    busy = subprocess.run([sys.executable, "-c", code + "time.sleep(1.0)\n"], env=env,
                          capture_output=True, text=True, check=True)
    assert busy.stdout.split() == ["0"]  # a second of calls, nothing written meanwhile
    wait_for_records(tmp_path)
    records = read_records(tmp_path, 0.0, float("inf"))
    assert len(records) > 100 and {r[0] for r in records} == {"rgb_to_hsv"}
    # The process measured its timer's cost once, written with its records.
    assert read_timer_overhead(tmp_path)["wall_us"] > 0


def test_timer_overhead_is_measured_per_process_and_read_back(tmp_path):
    sys.path.insert(0, str(STEP_TIMER_SITE))
    try:
        import sitecustomize
    finally:
        sys.path.remove(str(STEP_TIMER_SITE))
    wall, cpu = sitecustomize.timer_overhead(calls=2000)
    # Four clock reads and a list append: more than nothing, far less than a millisecond.
    assert 0.0 < wall < 1e-3 and 0.0 <= cpu < 1e-3
    assert read_timer_overhead(tmp_path) is None
    for pid, seconds in ((1, 2e-6), (2, 5e-6)):
        (tmp_path / f"overhead-{pid}.json").write_text(
            json.dumps({"wall_s": seconds, "cpu_s": seconds / 2}))
    assert read_timer_overhead(tmp_path) == pytest.approx({"wall_us": 5.0, "cpu_us": 2.5})


@slow
def test_garbage_collections_are_recorded(tmp_path):
    # What the engine core gets once it exists: every collection becomes a "gc<generation>" record.
    code = ("import gc, time, sitecustomize\n"
            "sitecustomize._time_garbage_collection()\n"
            "gc.collect(0); gc.collect(2)\n"
            "time.sleep(1.2)\n")
    env = {**os.environ, "PYTHONPATH": str(STEP_TIMER_SITE), "STEP_TIMER_DIR": str(tmp_path)}
    subprocess.run([sys.executable, "-c", code], env=env, check=True)
    names = [r[0] for r in read_records(tmp_path, 0.0, float("inf"))]
    assert {"gc0", "gc2"} <= set(names) and set(names) <= {"gc0", "gc1", "gc2"}


def test_process_cpu_seconds_counts_descendants():
    # A shell (idle) whose child spins for 0.3 s of CPU and then waits.
    spin = ("import time\nt = time.process_time()\n"
            "while time.process_time() - t < 0.3: pass\ninput()")
    shell = subprocess.Popen(["sh", "-c", f"{sys.executable} -c '{spin}'"], stdin=subprocess.PIPE)
    try:
        seconds: dict[str, float] = {}
        for _ in range(100):
            seconds = process_cpu_seconds(shell.pid)
            if sum(seconds.values()) >= 0.3:
                break
            subprocess.run(["sleep", "0.1"], check=True)
        assert sum(seconds.values()) >= 0.3
        assert seconds.get("sh", 0.0) < 0.1  # the spinning is the child's, not the shell's
    finally:
        shell.communicate(b"\n")


def test_stopping_a_server_waits_for_every_process_it_started():
    """The server's child (an engine core holding GPU memory) outlives the server by a second
    after SIGTERM: stop() returns only once it is gone, so that a server started next finds
    the memory free."""
    from benchmarks.serving.server import RunningServer, group_processes

    child = ("import signal, time\n"
             "signal.signal(signal.SIGTERM, lambda *_: (time.sleep(1), exit(0)))\n"
             "print('ready', flush=True)\ntime.sleep(60)")
    leader = subprocess.Popen(["sh", "-c", f"{sys.executable} -c \"{child}\" & wait"],
                              stdout=subprocess.PIPE, start_new_session=True)
    assert leader.stdout is not None and leader.stdout.readline() == b"ready\n"
    assert len(group_processes(leader.pid)) == 2
    RunningServer(leader, "http://127.0.0.1:0", Path("unused.log")).stop()
    assert leader.poll() is not None and group_processes(leader.pid) == []
