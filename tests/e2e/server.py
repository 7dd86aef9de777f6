"""Start ``refreekv-serve`` as a user would, on a free loopback port, and wait until healthy."""

from pathlib import Path

from benchmarks.serving.server import REFREEKV_SERVER, RunningServer, free_port
from benchmarks.serving.server import start_server as start_command

__all__ = ["RunningServer", "free_port", "start_server"]


def start_server(args: list[str], log_path: Path, env: dict[str, str] | None = None
                 ) -> RunningServer:
    return start_command([*REFREEKV_SERVER, *args], log_path, env)
