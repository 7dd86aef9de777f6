"""``run_serving --pin-cpus``: the same CPUs for every server's processes, apart from the load.

A small model's server is bound by its engine core's host time, and on a machine where the
kernel places the engine core next to the API server or the load generator (on the other
hyperthread of one core, or on the same CPU for a while) every phase of a step slows down
alike: the step timer saw all of vLLM's own phases 25-40% slower in some runs than in others.
Pinning gives each engine core the same CPUs (whole cores, none shared with the rest), each API
server the next ones and the load generator (this process) what is left, so that servers are
compared on equal terms. Servers take turns, so they can share the sets.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from benchmarks.serving.server import process_tree

ENGINE_CORE_NAME = "VLLM::EngineCor"  # /proc's comm field keeps 15 characters
SYS_CPUS = Path("/sys/devices/system/cpu")


@dataclass(frozen=True)
class CpuPlan:
    engine_core: frozenset[int]
    server: frozenset[int]
    load: frozenset[int]


def vllm_cpu_thread_binds(num_ranks: int, allowed: set[int] | None = None) -> str:
    """``VLLM_CPU_OMP_THREADS_BIND`` for ``num_ranks`` CPU workers of one engine (vLLM binds
    each rank's threads itself only with a NUMA node per rank): the allowed CPUs dealt out in
    turn, ``"0,2|1,3"`` for two ranks on four CPUs."""
    cpus = sorted(os.sched_getaffinity(0) if allowed is None else allowed)
    return "|".join(",".join(map(str, cpus[rank::num_ranks])) for rank in range(num_ranks))


def physical_cores(allowed: set[int], sys_cpus: Path = SYS_CPUS) -> list[tuple[int, ...]]:
    """The allowed CPUs grouped by core (hyperthreads together), in CPU order; a CPU whose
    topology is not readable is a core of its own."""
    cores: dict[tuple[int, ...], None] = {}
    for cpu in sorted(allowed):
        path = sys_cpus / f"cpu{cpu}" / "topology" / "thread_siblings_list"
        try:
            siblings = _parse_cpu_list(path.read_text())
        except OSError:
            siblings = {cpu}
        cores[tuple(sorted(siblings & allowed))] = None
    return list(cores)


def plan_cpus(cores: list[tuple[int, ...]], engine_cores: int = 2, server_cores: int = 2
              ) -> CpuPlan:
    """Whole cores for the engine core and the API server, the rest for the load generator."""
    needed = engine_cores + server_cores + 1
    if len(cores) < needed:
        raise ValueError(f"--pin-cpus needs {needed} cores (engine core {engine_cores}, API "
                         f"server {server_cores}, load generator 1); this machine offers "
                         f"{len(cores)}")
    def cpus(group: list[tuple[int, ...]]) -> frozenset[int]:
        return frozenset(cpu for core in group for cpu in core)

    return CpuPlan(engine_core=cpus(cores[:engine_cores]),
                   server=cpus(cores[engine_cores:engine_cores + server_cores]),
                   load=cpus(cores[engine_cores + server_cores:]))


def pin_server(root_pid: int, plan: CpuPlan, proc: Path = Path("/proc")) -> dict[int, str]:
    """Every thread of the server's process tree onto its set: engine cores on
    ``plan.engine_core``, everything else on ``plan.server``. Returns pid -> process name."""
    pinned: dict[int, str] = {}
    for pid, (name, _) in process_tree(root_pid, proc).items():
        cpus = plan.engine_core if name.startswith(ENGINE_CORE_NAME) else plan.server
        _pin_threads(pid, cpus, proc)
        pinned[pid] = name
    return pinned


def pin_self(cpus: frozenset[int], proc: Path = Path("/proc")) -> None:
    """Every thread of this process (the load generator) onto ``cpus``."""
    _pin_threads(os.getpid(), cpus, proc)


def _pin_threads(pid: int, cpus: frozenset[int], proc: Path) -> None:
    for task in (proc / str(pid) / "task").glob("[0-9]*"):
        try:
            os.sched_setaffinity(int(task.name), cpus)
        except (ProcessLookupError, PermissionError):
            continue  # a thread that ended meanwhile


def _parse_cpu_list(text: str) -> set[int]:
    """``"0-3,8"`` -> {0, 1, 2, 3, 8}."""
    cpus: set[int] = set()
    for part in filter(None, text.strip().split(",")):
        low, _, high = part.partition("-")
        cpus.update(range(int(low), int(high or low) + 1))
    return cpus
