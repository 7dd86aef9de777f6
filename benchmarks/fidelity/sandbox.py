"""Run a HumanEval program (prompt + completion + test + ``check(entry_point)``) in a sandboxed
child process: isolated interpreter (``python -I``), empty environment, a fresh temporary working
directory, a wall-clock timeout and resource limits (CPU seconds, address space, file size, open
files, no core dumps) set in the child before it starts. The program needs no network.
"""

from __future__ import annotations

import os
import resource
import signal
import subprocess
import sys
import tempfile
from dataclasses import dataclass

MEMORY_LIMIT_BYTES = 1 << 30
FILE_SIZE_LIMIT_BYTES = 1 << 20
OPEN_FILES_LIMIT = 64


@dataclass(frozen=True)
class ExecResult:
    passed: bool
    status: str  # "passed", "failed", "timeout"
    detail: str = ""


def humaneval_program(prompt: str, completion: str, test: str, entry_point: str) -> str:
    return f"{prompt}{completion}\n\n{test}\n\ncheck({entry_point})\n"


def _limit_child(cpu_seconds: int) -> None:
    """preexec_fn: runs in the child between fork and exec."""
    resource.setrlimit(resource.RLIMIT_CPU, (cpu_seconds, cpu_seconds))
    resource.setrlimit(resource.RLIMIT_AS, (MEMORY_LIMIT_BYTES, MEMORY_LIMIT_BYTES))
    resource.setrlimit(resource.RLIMIT_FSIZE, (FILE_SIZE_LIMIT_BYTES, FILE_SIZE_LIMIT_BYTES))
    resource.setrlimit(resource.RLIMIT_NOFILE, (OPEN_FILES_LIMIT, OPEN_FILES_LIMIT))
    resource.setrlimit(resource.RLIMIT_CORE, (0, 0))


def run_program(program: str, timeout_s: float = 5.0) -> ExecResult:
    """Execute ``program``; passed iff it exits 0 within ``timeout_s``."""
    cpu_seconds = max(1, int(timeout_s) + 1)
    with tempfile.TemporaryDirectory(prefix="refreekv-humaneval-") as workdir:
        path = os.path.join(workdir, "program.py")
        with open(path, "w", encoding="utf-8") as f:
            f.write(program)
        proc = subprocess.Popen(
            [sys.executable, "-I", "-B", path], cwd=workdir, env={},
            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
            preexec_fn=lambda: _limit_child(cpu_seconds), start_new_session=True)
        try:
            _, stderr = proc.communicate(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)  # the child and anything it spawned
            proc.communicate()
            return ExecResult(False, "timeout", f"no exit within {timeout_s} s")
    if proc.returncode == 0:
        return ExecResult(True, "passed")
    if proc.returncode in (-signal.SIGXCPU, -signal.SIGKILL):
        return ExecResult(False, "timeout", f"killed by signal {-proc.returncode}")
    tail = stderr.decode("utf-8", "replace").strip().splitlines()[-1:] or [""]
    return ExecResult(False, "failed", tail[0][:200])
