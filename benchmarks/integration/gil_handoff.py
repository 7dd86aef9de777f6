"""What a call that releases the GIL costs while another Python thread of the process is busy,
alone and beside that thread: the mechanism by which a launch inside vLLM's engine core (whose
input and output threads run Python beside the step loop) can cost many times what it costs in
a process of its own. Triton's launcher releases the GIL around every kernel launch, PyTorch's
operator bindings around every operator; a thread waiting for the GIL then takes it, and the
caller waits up to the interpreter's switch interval to get it back.

    python -m benchmarks.integration.gil_handoff   # results/gil_handoff_cpu.json
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[2]


def per_call_us(call: Callable[[], object], seconds: float) -> float:
    calls, started = 0, time.perf_counter()
    while time.perf_counter() - started < seconds:
        call()
        calls += 1
    return (time.perf_counter() - started) / calls * 1e6


def with_busy_thread(call: Callable[[], object], seconds: float) -> float:
    """Per-call microseconds while a second thread runs pure Python (holding the GIL whenever
    it can)."""
    stop = threading.Event()

    def spin() -> None:
        while not stop.is_set():
            sum(i * i for i in range(1000))

    thread = threading.Thread(target=spin, daemon=True)
    thread.start()
    try:
        return per_call_us(call, seconds)
    finally:
        stop.set()
        thread.join()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seconds", type=float, default=1.0, help="per measurement")
    parser.add_argument("--out", type=Path,
                        default=ROOT / "benchmarks" / "results" / "gil_handoff_cpu.json")
    args = parser.parse_args()
    rows = torch.randn(4096, 9, 64)
    index = torch.arange(4096 - 64, 4096)
    window = torch.empty(64, 9, 64)
    calls: dict[str, Callable[[], object]] = {
        # The window capture's operator, on the host.
        "torch.index_select of 64 rows": lambda: torch.index_select(rows, 0, index, out=window),
        # A system call that releases the GIL and nothing else.
        "time.sleep(0)": lambda: time.sleep(0),
    }
    results = [{"call": name, "alone_us": round(per_call_us(call, args.seconds), 2),
                "busy_thread_us": round(with_busy_thread(call, args.seconds), 2)}
               for name, call in calls.items()]
    for row in results:
        print(row)
    args.out.write_text(json.dumps({
        "machine": platform.processor() or platform.machine(), "python": sys.version.split()[0],
        "switch_interval_s": sys.getswitchinterval(),
        "command": "python -m benchmarks.integration.gil_handoff " + " ".join(sys.argv[1:]),
        "rows": results}, indent=1))


if __name__ == "__main__":
    main()
