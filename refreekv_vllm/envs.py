"""Environment knobs, all read lazily. They turn on diagnostics, place files or bind
addresses; none changes pruning.

``REFREEKV_`` is our prefix: vLLM warns about unknown ``VLLM_*`` variables.
"""

import os

ENV_VARS = {
    # Directory where every process that loads the plugin records who loaded it (tests use it
    # to prove the plugin runs in the engine-core and worker processes).
    "REFREEKV_PLUGIN_TRACE_DIR": lambda: os.environ.get("REFREEKV_PLUGIN_TRACE_DIR") or None,
    # Converted models are cached here (default ~/.cache/refreekv_vllm).
    "REFREEKV_CACHE_DIR": lambda: os.environ.get("REFREEKV_CACHE_DIR") or None,
    # Where the engine processes leave ReFreeKV's metric values for the API server's /metrics
    # (set by the plugin in the first process that loads it; children inherit it).
    "REFREEKV_METRICS_DIR": lambda: os.environ.get("REFREEKV_METRICS_DIR") or None,
    # "1": assert the block accounting invariants each time gap blocks are released (never
    # released twice, reference counts never negative, null_block never released).
    "REFREEKV_DEBUG_ACCOUNTING": lambda: os.environ.get("REFREEKV_DEBUG_ACCOUNTING") == "1",
    # Address refreekv-serve binds when --host is not given (default loopback; the Docker
    # image sets 0.0.0.0, as vLLM's own image binds all interfaces).
    "REFREEKV_SERVE_HOST": lambda: os.environ.get("REFREEKV_SERVE_HOST") or "127.0.0.1",
    # "1": start on a vLLM release ReFreeKV was not verified on when every hook's signature
    # still matches (refreekv_vllm/patches); for trying a new release, not for serving.
    "REFREEKV_ALLOW_UNVERIFIED_VLLM":
        lambda: os.environ.get("REFREEKV_ALLOW_UNVERIFIED_VLLM") == "1",
}


def __getattr__(name: str):
    if name in ENV_VARS:
        return ENV_VARS[name]()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__() -> list[str]:
    return list(ENV_VARS)
