from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.e2e.server import RunningServer, start_server


@pytest.fixture(scope="session")
def plugin_trace_dir(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("plugin-trace")


@pytest.fixture(scope="session")
def default_server(tmp_path_factory, plugin_trace_dir, smollm2_dir) -> Iterator[RunningServer]:
    """The server as the README starts it (default model); eager to start faster, fp32 to
    prefill faster on CPUs."""
    log_path = tmp_path_factory.mktemp("server") / "server.log"
    server = start_server(["--enforce-eager", "--dtype", "float32"], log_path,
                          env={"REFREEKV_PLUGIN_TRACE_DIR": str(plugin_trace_dir)})
    yield server
    server.stop()
