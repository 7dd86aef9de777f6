"""OpenAI-compatible vLLM servers for benchmarks and tests: start one on a loopback port, wait
until it is healthy, sample its ``/metrics`` while a workload runs, stop it."""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

STARTUP_TIMEOUT_S = 900
PLAIN_SERVER = [sys.executable, "-m", "vllm.entrypoints.openai.api_server"]
REFREEKV_SERVER = [sys.executable, "-m", "refreekv_vllm.entrypoints.serve"]


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@dataclass
class RunningServer:
    process: subprocess.Popen
    base_url: str
    log_path: Path
    step_dir: Path | None = None  # where the step timer writes, if it runs in this server

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def get(self, path: str, timeout: float = 10) -> str:
        with urllib.request.urlopen(self.base_url + path, timeout=timeout) as response:
            return response.read().decode()

    def stop(self, timeout_s: float = 60) -> None:
        """Stop the server and every process it started (the engine core holds the GPU memory
        that a server started next needs), waiting until they are all gone: SIGTERM, then
        SIGKILL after ``timeout_s``."""
        if self.process.poll() is None:
            os.killpg(self.process.pid, signal.SIGTERM)
        deadline, killed = time.monotonic() + timeout_s, False
        while self.process.poll() is None or group_processes(self.process.pid):
            if time.monotonic() > deadline:
                if killed:
                    raise RuntimeError(f"processes of server {self.base_url} did not exit: "
                                       f"{group_processes(self.process.pid)}")
                with contextlib.suppress(ProcessLookupError):  # it may have just gone
                    os.killpg(self.process.pid, signal.SIGKILL)
                deadline, killed = time.monotonic() + timeout_s, True
            time.sleep(0.1)


STEP_TIMER_SITE = Path(__file__).resolve().parent / "step_timer"


def launch(command: list[str], log_path: Path, env: dict[str, str] | None = None,
           step_dir: Path | None = None) -> RunningServer:
    """Start ``command`` (a server command line without ``--port``) on a free port; with
    ``step_dir``, every engine step's host phases are recorded there (``step_timer``)."""
    port = free_port()
    env = dict(env or {})
    if step_dir is not None:
        step_dir.mkdir(parents=True, exist_ok=True)
        path = os.environ.get("PYTHONPATH")
        env["PYTHONPATH"] = f"{STEP_TIMER_SITE}{os.pathsep}{path}" if path else str(STEP_TIMER_SITE)
        env["STEP_TIMER_DIR"] = str(step_dir)
    with open(log_path, "w") as log_file:  # the child keeps its own copy of the descriptor
        process = subprocess.Popen([*command, "--port", str(port)], stdout=log_file,
                                   stderr=subprocess.STDOUT, env={**os.environ, **env},
                                   start_new_session=True)
    return RunningServer(process, f"http://127.0.0.1:{port}", log_path, step_dir)


def wait_healthy(server: RunningServer, timeout_s: float = STARTUP_TIMEOUT_S) -> RunningServer:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if server.process.poll() is not None:
            raise RuntimeError(f"server exited with {server.process.returncode}:\n"
                               f"{server.log()[-5000:]}")
        try:
            server.get("/health", timeout=2)
            return server
        except OSError:
            time.sleep(2)
    server.stop()
    raise RuntimeError(f"server not healthy after {timeout_s:.0f} s:\n{server.log()[-5000:]}")


def start_server(command: list[str], log_path: Path, env: dict[str, str] | None = None
                 ) -> RunningServer:
    return wait_healthy(launch(command, log_path, env))


def parse_metrics(text: str) -> dict[str, float]:
    """Prometheus text exposition -> metric sample name -> value summed over label sets."""
    values: dict[str, float] = {}
    for line in text.splitlines():
        if not line or line.startswith("#"):
            continue
        name_and_labels, _, value = line.rpartition(" ")
        name = name_and_labels.split("{", 1)[0]
        try:
            values[name] = values.get(name, 0.0) + float(value)
        except ValueError:
            continue
    return values


@dataclass
class MetricsSampler:
    """Polls ``/metrics`` in a thread: running requests and KV usage over time."""
    server: RunningServer
    # Four scrapes a second: fine enough for the peak of a burst that runs for seconds; at ten
    # a second the scrapes took ~4% of the API server's time (metrics_scrape_cpu.json), which
    # serving at a production scrape interval (15-60 s) never pays.
    interval_s: float = 0.25
    samples: list[tuple[float, dict[str, float]]] = field(default_factory=list)

    def __enter__(self) -> MetricsSampler:
        self._stop = threading.Event()
        self.samples.append((time.monotonic(), self._read()))
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
        self.samples.append((time.monotonic(), self._read()))

    def _read(self) -> dict[str, float]:
        return parse_metrics(self.server.get("/metrics"))

    def _run(self) -> None:
        while not self._stop.wait(self.interval_s):
            try:
                self.samples.append((time.monotonic(), self._read()))
            except OSError:
                continue

    def delta(self, name: str) -> float:
        return self.samples[-1][1].get(name, 0.0) - self.samples[0][1].get(name, 0.0)

    def peak(self, name: str) -> float:
        return max(values.get(name, 0.0) for _, values in self.samples)

    def time_mean(self, name: str) -> float:
        """Mean over the sampled period, each sample weighted by the time until the next."""
        total = weighted = 0.0
        for (t0, values), (t1, _) in zip(self.samples, self.samples[1:], strict=False):
            weighted += values.get(name, 0.0) * (t1 - t0)
            total += t1 - t0
        return weighted / total if total else 0.0


def process_tree(root_pid: int, proc: Path = Path("/proc")) -> dict[int, tuple[str, list[str]]]:
    """A process and its descendants: pid -> (name, the ``stat`` fields after the name). vLLM
    names its processes (e.g. ``VLLM::EngineCore``, cut to 15 characters). Linux only; empty
    elsewhere."""
    stats = _proc_stats(proc)
    parents = {pid: int(fields[1]) for pid, (_, fields) in stats.items()}
    tree, frontier = {root_pid}, [root_pid]
    while frontier:
        parent = frontier.pop()
        children = [pid for pid, ppid in parents.items() if ppid == parent and pid not in tree]
        tree.update(children)
        frontier.extend(children)
    return {pid: stats[pid] for pid in tree if pid in stats}


def group_processes(group: int, proc: Path = Path("/proc")) -> list[int]:
    """Live (not zombie) processes of a process group. Linux only; empty elsewhere."""
    return sorted(pid for pid, (_, fields) in _proc_stats(proc).items()
                  if int(fields[2]) == group and fields[0] != "Z")


def _proc_stats(proc: Path) -> dict[int, tuple[str, list[str]]]:
    """pid -> (name, the fields of /proc/<pid>/stat after the name: state, ppid, pgrp, ...)."""
    stats: dict[int, tuple[str, list[str]]] = {}
    for entry in proc.glob("[0-9]*"):
        try:
            raw = (entry / "stat").read_text()
        except OSError:
            continue
        # The name is in parentheses and may hold spaces; fields follow the last ")".
        stats[int(entry.name)] = (raw[raw.index("(") + 1:raw.rindex(")")],
                                  raw[raw.rindex(")") + 2:].split())
    return stats


def process_cpu_seconds(root_pid: int) -> dict[str, float]:
    """CPU seconds (user + system) of a process and its descendants, summed by process name."""
    ticks = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100
    seconds: dict[str, float] = {}
    for name, fields in process_tree(root_pid).values():
        seconds[name] = seconds.get(name, 0.0) + (int(fields[11]) + int(fields[12])) / ticks
    return seconds
