"""``refreekv-serve``: vLLM's OpenAI-compatible server with the ReFreeKV plugin.

Every vLLM flag is passed through. What this adds to plain ``vllm serve`` with
``--additional-config '{"refreekv": {...}}'`` (which runs ReFreeKV by itself, see
``engine_args.py``): the default model when ``--model`` is absent, a loopback bind address
unless ``--host`` is given, the ``refreekv`` section when the additional config lacks one, the
endpoint plugin allow-listed in ``VLLM_PLUGINS``, and readable errors (exit 2) for a model
directory that does not exist or a bad ReFreeKV config.
"""

import importlib.metadata
import json
import os
import sys
from collections.abc import Mapping, Sequence
from typing import Any

from refreekv_vllm import envs
from refreekv_vllm.config import ADDITIONAL_CONFIG_KEY
from refreekv_vllm.entrypoints.engine_args import ENDPOINT_PLUGIN, GENERAL_PLUGIN

API_SERVER_MODULE = "vllm.entrypoints.openai.api_server"


class UsageError(Exception):
    """A problem with the command line that the user can fix."""


def _flag_value(argv: Sequence[str], flag: str) -> str | None:
    for i, arg in enumerate(argv):
        if arg == flag and i + 1 < len(argv):
            return argv[i + 1]
        if arg.startswith(flag + "="):
            return arg.split("=", 1)[1]
    return None


def _has_flag(argv: Sequence[str], *flags: str) -> bool:
    return any(arg == f or arg.startswith(f + "=") for arg in argv for f in flags)


def _without_flag(argv: Sequence[str], flag: str) -> list[str]:
    kept: list[str] = []
    skip = False
    for arg in argv:
        if skip:
            skip = False
        elif arg == flag:
            skip = True
        elif not arg.startswith(flag + "="):
            kept.append(arg)
    return kept


def _positional_model(argv: Sequence[str]) -> str | None:
    # `vllm serve MODEL` style: a leading positional argument names the model.
    return argv[0] if argv and not argv[0].startswith("-") else None


def check_model(model: str) -> None:
    """Fail early and readably for a local model path that is missing or not a model.
    Hub ids (``org/name``) that are not local paths are left to vLLM."""
    path = os.path.expanduser(model)
    is_local = (os.path.exists(path) or model.startswith(("/", ".", "~"))
                or model.count("/") >= 2)
    if not is_local:
        return
    if not os.path.isdir(path):
        raise UsageError(f"model directory not found: {model}")
    if not os.path.isfile(os.path.join(path, "config.json")):
        raise UsageError(f"{model} is not a Hugging Face model directory (no config.json)")


def check_additional_config(raw: str | None) -> dict[str, Any]:
    """The ``--additional-config`` object, its ``refreekv`` section validated before vLLM
    starts."""
    from refreekv_vllm.config import ConfigError, RefreeKVConfig

    if raw is None:
        return {}
    try:
        parsed = json.loads(raw)
    except json.JSONDecodeError as exc:
        raise UsageError(f"--additional-config is not valid JSON: {exc}") from None
    if not isinstance(parsed, dict):
        raise UsageError("--additional-config must be a JSON object")
    try:
        RefreeKVConfig.from_additional_config(parsed)
    except ConfigError as exc:
        raise UsageError(str(exc)) from None
    return parsed


def build_argv(argv: Sequence[str]) -> list[str]:
    """The api_server command line for ``refreekv-serve ARGV``."""
    args = list(argv)
    positional = _positional_model(args)
    if positional is not None:
        args = ["--model", positional, *args[1:]]
    model = _flag_value(args, "--model")
    if model is None:
        from refreekv_vllm.models import DEFAULT_MODEL_NAME, prepare_smollm2

        args = ["--model", str(prepare_smollm2()), *args]
        if not _has_flag(args, "--served-model-name"):
            args += ["--served-model-name", DEFAULT_MODEL_NAME]
    else:
        check_model(model)
    additional = check_additional_config(_flag_value(args, "--additional-config"))
    additional.setdefault(ADDITIONAL_CONFIG_KEY, {})
    args = [*_without_flag(args, "--additional-config"),
            "--additional-config", json.dumps(additional)]
    for flag in ("--worker-cls", "--scheduler-cls"):
        if _has_flag(args, flag):
            raise UsageError(f"{flag} is set by ReFreeKV; drop it")
    if not _has_flag(args, "--host"):
        args += ["--host", envs.REFREEKV_SERVE_HOST]
    return [sys.executable, "-m", API_SERVER_MODULE, *args]


def main(argv: Sequence[str] | None = None) -> None:
    try:
        command = build_argv(sys.argv[1:] if argv is None else argv)
    except (UsageError, FileNotFoundError, RuntimeError) as exc:
        print(f"refreekv-serve: error: {exc}", file=sys.stderr)
        raise SystemExit(2) from None
    os.environ.update(server_environment(os.environ))
    os.execv(command[0], command)


def server_environment(env: Mapping[str, str]) -> dict[str, str]:
    """Environment the server needs, on top of the caller's."""
    # Endpoint plugins load only when allow-listed, and the list then applies to every plugin
    # group: name all installed general plugins too so none is dropped.
    allowed = [p for p in env.get("VLLM_PLUGINS", "").split(",") if p]
    if not allowed:
        allowed = [ep.name for ep in importlib.metadata.entry_points(
            group="vllm.general_plugins")]
    allowed += [name for name in (GENERAL_PLUGIN, ENDPOINT_PLUGIN) if name not in allowed]
    return {"VLLM_PLUGINS": ",".join(allowed)}


if __name__ == "__main__":
    main()
