"""Host time of every engine-core phase, per step, in any vLLM server (plain or ReFreeKV).

Loaded by Python at start-up when this directory is on ``PYTHONPATH`` (``run_serving
--step-timer`` puts it there for every server alike); does nothing unless ``STEP_TIMER_DIR`` is
set. When vLLM's engine core is imported it wraps, per instance, the calls one engine step makes
on a single-GPU server: the scheduler's ``schedule`` and ``update_from_output``, the executor's
``execute_model`` and ``sample_tokens``, the wait for a step's sampled tokens, and the model
runner's sub-steps (in whichever process the worker runs). Each call becomes a record
``[name, start, seconds, cpu_seconds]`` (monotonic clock, shared by the processes; the calling
thread's CPU time over the call, so that the rest, ``seconds - cpu_seconds``, is time the thread
waited: for the GIL, the device or I/O); ``schedule`` records also carry the step's scheduled
requests and tokens; garbage collections in the engine core are records ``gc0``-``gc2``.
``STEP_TIMER_EXTRA`` names more functions to time (``module:function`` or
``module:Class.method``, comma-separated). A daemon thread appends
the records to ``STEP_TIMER_DIR/steps-<pid>.jsonl`` once the process has made none for a
quarter of a second (or when a quarter of a million are waiting): writing them while the
server is under load would take the GIL from the engine core for milliseconds at a time, and
more often in a server that makes more records, slowing every phase it is meant to measure.
What a wrapper adds to the phases around it (two reads each of wall and thread time, a system
call on some machines) is measured by every process at its first timed call, and written
with its first records: ``overhead-<pid>.json``.
"""

from __future__ import annotations

import collections
import importlib.abc
import importlib.util
import json
import os
import sys
import threading
import time
from typing import Any

_DIR = os.environ.get("STEP_TIMER_DIR")
RUNNER_PHASES = ("_update_states", "_prepare_inputs", "_determine_batch_execution_and_padding",
                 "_build_attention_metadata", "_preprocess", "_model_forward", "_sample",
                 "_bookkeeping_sync")


FLUSH_CHECK_S = 0.25
MAX_WAITING_RECORDS = 250_000


class _Recorder:
    def __init__(self, directory: str) -> None:
        self.records: list[list[Any]] = []
        self.path = os.path.join(directory, f"steps-{os.getpid()}.jsonl")
        # Measured at the first timed call (a server's warm-up), written with the first records.
        wall, cpu = timer_overhead()
        self.overhead: tuple[str, str] | None = (
            os.path.join(directory, f"overhead-{os.getpid()}.json"),
            json.dumps({"wall_s": wall, "cpu_s": cpu}))
        threading.Thread(target=self._flush_when_idle, daemon=True).start()

    def _flush_when_idle(self) -> None:
        seen = 0
        while True:
            time.sleep(FLUSH_CHECK_S)
            waiting = len(self.records)
            if waiting and (waiting == seen or waiting >= MAX_WAITING_RECORDS):
                records, self.records = self.records, []
                if self.overhead is not None:
                    path, text = self.overhead
                    with open(path, "w") as file:
                        file.write(text)
                    self.overhead = None
                with open(self.path, "a") as file:
                    file.write("".join(json.dumps(r) + "\n" for r in records))
                waiting = 0
            seen = waiting


_recorders: dict[int, _Recorder] = {}


def _recorder() -> _Recorder:
    """This process's recorder (a forked child starts its own: the parent's writer thread does
    not survive the fork)."""
    pid = os.getpid()
    recorder = _recorders.get(pid)
    if recorder is None:
        if _DIR is None:
            raise RuntimeError("STEP_TIMER_DIR is not set: nothing should be timed")
        recorder = _recorders[pid] = _Recorder(_DIR)
    return recorder


def timed(name: str, call: Any, scheduling: bool = False,
          sink: list[list[Any]] | None = None) -> Any:
    """``call`` wrapped to record each call (into this process's recorder, or ``sink``)."""
    clock, cpu_clock = time.monotonic, time.thread_time

    def wrapper(*args: Any, **kwargs: Any) -> Any:
        start, cpu_start = clock(), cpu_clock()
        result = call(*args, **kwargs)
        record = [name, start, clock() - start, cpu_clock() - cpu_start]
        if scheduling:
            record += [len(getattr(result, "num_scheduled_tokens", ()) or ()),
                       getattr(result, "total_num_scheduled_tokens", 0)]
        (_recorder().records if sink is None else sink).append(record)
        return result

    return wrapper


def timer_overhead(calls: int = 5_000) -> tuple[float, float]:
    """Wall and thread-CPU seconds that timing one call adds to the phases around it (a timed
    no-op against the bare one, best of three): thread-time reads are system calls whose cost
    differs between machines, so every process measures its own (``overhead-<pid>.json``)."""
    def noop() -> None:
        return None

    sink: list[list[Any]] = []
    probe = timed("probe", noop, sink=sink)

    def seconds_per_call(call: Any) -> tuple[float, float]:
        best = (float("inf"), float("inf"))
        for _ in range(3):
            sink.clear()
            wall, cpu = time.perf_counter(), time.thread_time()
            for _ in range(calls):
                call()
            best = min(best, ((time.perf_counter() - wall) / calls,
                              (time.thread_time() - cpu) / calls))
        return best

    timed_wall, timed_cpu = seconds_per_call(probe)
    bare_wall, bare_cpu = seconds_per_call(noop)
    return max(0.0, timed_wall - bare_wall), max(0.0, timed_cpu - bare_cpu)


class _TimedFuture:
    """A batch-queue future whose ``result()`` (the wait for a step's output) is timed."""

    def __init__(self, future: Any) -> None:
        self._future = future
        self.result = timed("wait_output", future.result)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._future, name)


class _TimedBatchQueue(collections.deque):
    # deque.pop takes no index: typeshed ignores the same mismatch with MutableSequence.pop.
    def pop(self) -> Any:  # type: ignore[override]
        future, *rest = super().pop()
        return (_TimedFuture(future), *rest)


def _instrument_engine_core(engine_core: Any) -> None:
    scheduler, executor = engine_core.scheduler, engine_core.model_executor
    scheduler.schedule = timed("schedule", scheduler.schedule, scheduling=True)
    scheduler.update_from_output = timed("update_from_output", scheduler.update_from_output)
    executor.execute_model = timed("execute_model", executor.execute_model)
    executor.sample_tokens = timed("sample_tokens", executor.sample_tokens)
    if engine_core.batch_queue is not None:
        engine_core.batch_queue = _TimedBatchQueue(engine_core.batch_queue,
                                                   engine_core.batch_queue.maxlen)


def _instrument_runner(runner: Any) -> None:
    for phase in RUNNER_PHASES:
        if hasattr(runner, phase):
            setattr(runner, phase, timed(phase, getattr(runner, phase)))


_gc_timed = False


def _time_garbage_collection() -> None:
    """Every collection of this process as a record ``gc<generation>`` (it stops the thread
    that triggered it, whichever phase that was in); once per process, however many engine
    cores it builds."""
    import gc

    global _gc_timed
    if _gc_timed:
        return
    _gc_timed = True
    started: list[tuple[float, float]] = []

    def callback(phase: str, info: dict[str, int]) -> None:
        if phase == "start":
            started.append((time.monotonic(), time.thread_time()))
        elif started:
            start, cpu_start = started.pop()
            _recorder().records.append([f"gc{info['generation']}", start,
                                        time.monotonic() - start,
                                        time.thread_time() - cpu_start])

    gc.callbacks.append(callback)


def _patch_engine_core(module: Any) -> None:
    init = module.EngineCore.__init__

    def __init__(self: Any, *args: Any, **kwargs: Any) -> None:
        init(self, *args, **kwargs)
        _instrument_engine_core(self)
        _time_garbage_collection()

    module.EngineCore.__init__ = __init__


def _patch_worker_base(module: Any) -> None:
    # The model runner exists once the worker's device is initialised, in whichever process
    # the worker runs (the engine core's on one GPU, a worker process otherwise).
    init_device = module.WorkerWrapperBase.init_device

    def timed_init_device(self: Any, *args: Any, **kwargs: Any) -> Any:
        result = init_device(self, *args, **kwargs)
        runner = getattr(getattr(self, "worker", None), "model_runner", None)
        if runner is not None:
            _instrument_runner(runner)
        if os.environ.get("STEP_TIMER_SYNC_DEBUG"):
            # "warn" names (once per source line) every call that makes the host wait for the
            # GPU; allocator syncs (cudaMalloc/cudaFree) are not among them.
            import torch

            torch.cuda.set_sync_debug_mode(os.environ["STEP_TIMER_SYNC_DEBUG"])
        return result

    module.WorkerWrapperBase.init_device = timed_init_device


def _extra_patches(spec: str) -> dict[str, Any]:
    """``STEP_TIMER_EXTRA``: comma list of ``module:function`` or ``module:Class.method`` to
    time as well (named by their qualified name), patched when their module is imported."""
    names: dict[str, list[str]] = collections.defaultdict(list)
    for item in filter(None, (part.strip() for part in spec.split(","))):
        module, _, qualname = item.partition(":")
        names[module].append(qualname)

    def patcher(qualnames: list[str]) -> Any:
        def patch(module: Any) -> None:
            for qualname in qualnames:
                owner_name, _, attr = qualname.rpartition(".")
                owner = getattr(module, owner_name) if owner_name else module
                setattr(owner, attr, timed(qualname, getattr(owner, attr)))
        return patch

    return {module: patcher(qualnames) for module, qualnames in names.items()}


_PATCHES = {"vllm.v1.engine.core": _patch_engine_core,
            "vllm.v1.worker.worker_base": _patch_worker_base,
            **_extra_patches(os.environ.get("STEP_TIMER_EXTRA", ""))}


class _PatchOnImport(importlib.abc.MetaPathFinder):
    def __init__(self) -> None:
        self.done: set[str] = set()

    def find_spec(self, name: str, path: Any, target: Any = None) -> Any:
        patch = _PATCHES.get(name)
        if patch is None or name in self.done:
            return None
        self.done.add(name)
        spec = importlib.util.find_spec(name)
        if spec is None or spec.loader is None:
            return spec
        exec_module = spec.loader.exec_module

        def exec_and_patch(module: Any) -> None:
            exec_module(module)
            patch(module)

        spec.loader.exec_module = exec_and_patch  # type: ignore[method-assign]
        return spec


if _DIR:
    os.makedirs(_DIR, exist_ok=True)
    sys.meta_path.insert(0, _PatchOnImport())
