"""The ``vllm.general_plugins`` entry point. vLLM calls :func:`register` once in every process
(API server, engine core, workers); it must stay idempotent and cheap."""

import json
import os
import sys
from types import FrameType

from refreekv_vllm import envs

_registered = False


def register() -> None:
    global _registered
    if _registered:
        return
    check_vllm_version()
    from refreekv_vllm.core.kv_cache_layout import install_layout_hook
    from refreekv_vllm.entrypoints.engine_args import install_engine_defaults
    from refreekv_vllm.entrypoints.validation import install_request_validation
    from refreekv_vllm.metrics.prometheus import install_metrics_dir

    install_request_validation()
    install_layout_hook()
    install_engine_defaults()
    install_metrics_dir()
    _record_load()
    _registered = True


def check_vllm_version() -> None:
    import vllm

    from refreekv_vllm.patches import check_vllm_release

    check_vllm_release(vllm.__version__, allow_unverified=envs.REFREEKV_ALLOW_UNVERIFIED_VLLM)


def _loader_name() -> str:
    """Qualified name of the vLLM function that loaded the general plugins in this process
    (e.g. ``vllm.v1.engine.core.EngineCore.__init__``)."""
    frame: FrameType | None = sys._getframe(1)
    while frame is not None:
        if frame.f_code.co_name == "load_general_plugins":
            caller = frame.f_back
            if caller is None:
                break
            return f"{caller.f_globals.get('__name__')}.{caller.f_code.co_qualname}"
        frame = frame.f_back
    return "unknown"


def _record_load() -> None:
    trace_dir = envs.REFREEKV_PLUGIN_TRACE_DIR
    if trace_dir is None:
        return
    os.makedirs(trace_dir, exist_ok=True)
    record = {"pid": os.getpid(), "loader": _loader_name(), "argv0": sys.argv[0]}
    with open(os.path.join(trace_dir, f"{os.getpid()}.json"), "w") as f:
        json.dump(record, f)
