"""``refreekv-serve``: argument handling, and readable failures of the real command."""

import json
import subprocess
import sys

import pytest

from refreekv_vllm.entrypoints import serve
from tests.markers import slow


def run_serve(*args: str, timeout: int = 300) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "refreekv_vllm.entrypoints.serve", *args],
                          capture_output=True, text=True, timeout=timeout)


def test_defaults_fill_model_host_and_name(smollm2_dir):
    argv = serve.build_argv([])
    assert argv[1:3] == ["-m", serve.API_SERVER_MODULE]
    assert argv[argv.index("--model") + 1] == str(smollm2_dir)
    assert argv[argv.index("--host") + 1] == "127.0.0.1"
    assert argv[argv.index("--served-model-name") + 1] == "SmolLM2-135M-Instruct"
    # The rest is what plain `vllm serve` gets from the plugin for a refreekv section.
    assert json.loads(argv[argv.index("--additional-config") + 1]) == {"refreekv": {}}
    assert "--worker-cls" not in argv and "--scheduler-cls" not in argv


def test_additional_config_keeps_the_users_settings(tiny_llama_dir):
    argv = serve.build_argv([str(tiny_llama_dir), "--additional-config",
                             '{"other": 1, "refreekv": {"threshold": 0.01}}'])
    assert argv.count("--additional-config") == 1
    assert json.loads(argv[argv.index("--additional-config") + 1]) == {
        "other": 1, "refreekv": {"threshold": 0.01}}


def test_user_flags_win(tiny_llama_dir):
    argv = serve.build_argv([str(tiny_llama_dir), "--host", "0.0.0.0", "--block-size", "16"])
    assert argv[argv.index("--model") + 1] == str(tiny_llama_dir)
    assert argv.count("--host") == 1 and argv[argv.index("--host") + 1] == "0.0.0.0"
    assert argv.count("--block-size") == 1
    assert "--served-model-name" not in argv


def test_missing_model_is_a_readable_error(tmp_path):
    result = run_serve("--model", str(tmp_path / "no-such-model"))
    assert result.returncode == 2
    assert "model directory not found" in result.stderr
    assert "Traceback" not in result.stderr


def test_directory_without_config_is_refused(tmp_path):
    with pytest.raises(serve.UsageError, match="no config.json"):
        serve.check_model(str(tmp_path))


@slow
def test_bad_flag_is_a_readable_error():
    result = run_serve("--no-such-flag")
    assert result.returncode != 0
    assert "unrecognized arguments: --no-such-flag" in result.stderr
    assert "Traceback" not in result.stderr
