"""Where the host time of a serving run goes: py-spy samples of each server's processes.

    python -m benchmarks.serving.profile_hosts --engines plain_v1,refreekv --workload chat \
        --out /tmp/profile

Starts the chosen servers (the serving benchmark's SmolLM2 setup), drives each with one of its
workloads and, while it runs, samples the engine core and the API server with ``py-spy`` (it
must be on ``PATH``). Writes the folded stacks and ``profile_hosts.json``: per process, the
functions with the most inclusive samples, and the share of samples in ReFreeKV's code.
"""

from __future__ import annotations

import argparse
import collections
import json
import shutil
import subprocess
import threading
import time
from pathlib import Path
from typing import Any

import psutil

from benchmarks.serving.run_serving import ENGINES, PLAIN_V1, run_workload, smollm2_setup
from benchmarks.serving.server import RunningServer, launch, wait_healthy
from benchmarks.serving.workloads import write_workload

VARIANTS = {"plain": None, "plain_v1": None, "default": None, "t0": {"refreekv_threshold": 0.0}}


def server_processes(server: RunningServer) -> dict[str, int]:
    """The API server's and the engine core's pids (vLLM names the latter's process title)."""
    root = psutil.Process(server.process.pid)
    found = {"api_server": root.pid}
    for child in root.children(recursive=True):
        title = " ".join(child.cmdline())
        if "EngineCore" in title or "EngineCore" in child.name():
            found["engine_core"] = child.pid
    return found


def sample(pid: int, seconds: float, path: Path) -> subprocess.Popen:
    """py-spy records ``pid`` into ``path``; its messages go to ``path`` + ``.stderr`` (a file,
    not a pipe, so that a chatty sampler can never block on a full pipe)."""
    with open(_stderr_path(path), "wb") as stderr:
        return subprocess.Popen(["py-spy", "record", "--pid", str(pid), "--duration",
                                 str(int(seconds)), "--rate", "200", "--format", "raw",
                                 "--nonblocking", "--output", str(path)],
                                stdout=subprocess.DEVNULL, stderr=stderr)


def _stderr_path(path: Path) -> Path:
    return path.with_name(path.name + ".stderr")


def summarise(folded: Path, top: int = 40) -> dict[str, Any]:
    inclusive: collections.Counter[str] = collections.Counter()
    total = plugin = 0
    for line in folded.read_text().splitlines():
        stack, _, count_text = line.rpartition(" ")
        if not stack:
            continue
        count = int(count_text)
        total += count
        frames = stack.split(";")
        if any("refreekv_vllm" in frame for frame in frames):
            plugin += count
        for frame in set(frames):
            inclusive[frame] += count
    return {"samples": total, "plugin_share": plugin / total if total else 0.0,
            "top": [(frame, count / total) for frame, count in inclusive.most_common(top)]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--engines", default="plain_v1,refreekv")
    parser.add_argument("--variant", default="default", choices=("default", "t0"),
                        help="the rule ReFreeKV's server runs the workload at")
    parser.add_argument("--workload", default="chat")
    parser.add_argument("--seconds", type=float, default=4.0)
    parser.add_argument("--work-dir", type=Path, default=Path("/tmp/profile-hosts"))
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()
    if shutil.which("py-spy") is None:
        raise SystemExit("py-spy is not on PATH")
    args.out.mkdir(parents=True, exist_ok=True)
    args.work_dir.mkdir(parents=True, exist_ok=True)
    setup = smollm2_setup("cuda", quick=False)
    (run,) = [run for run in setup.runs if run.workload.name == args.workload]
    dataset = args.work_dir / f"{run.workload.name}.jsonl"
    if not dataset.exists():
        from transformers import AutoTokenizer

        write_workload(AutoTokenizer.from_pretrained(setup.model_dir), run.workload,
                       args.work_dir)
    engines = {**ENGINES, "plain_v1": PLAIN_V1}
    servers: dict[str, RunningServer] = {}
    report: dict[str, Any] = {}
    try:
        for name in args.engines.split(","):
            command, env, _ = engines[name]
            servers[name] = launch([*command, "--model", str(setup.model_dir),
                                    *setup.server_flags, "--served-model-name", setup.name],
                                   args.out / f"{name}.log", env)
        for server in servers.values():
            wait_healthy(server)
        for name, server in servers.items():
            xargs = VARIANTS[args.variant] if name == "refreekv" else None
            run_workload(server, setup, run, dataset, xargs)  # warm-up pass
            result: dict[str, Any] = {}
            worker = threading.Thread(
                target=lambda server=server, xargs=xargs, result=result: result.update(
                    run_workload(server, setup, run, dataset, xargs)))
            worker.start()
            time.sleep(1.0)
            samplers = {role: (sample(pid, args.seconds, args.out / f"{name}-{role}.txt"),
                               args.out / f"{name}-{role}.txt")
                        for role, pid in server_processes(server).items()}
            for process, _ in samplers.values():
                process.wait()
            worker.join()
            report[name] = {"run": result}
            for role, (_, path) in samplers.items():
                if not path.exists():
                    report[name][role] = {"error": _stderr_path(path).read_text()[-2000:]}
                    continue
                report[name][role] = summarise(path)
            print(json.dumps({name: {role: value if role == "run" else
                                     {k: v for k, v in value.items() if k != "top"}
                                     for role, value in report[name].items()}}), flush=True)
    finally:
        for server in servers.values():
            server.stop()
    (args.out / "profile_hosts.json").write_text(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
