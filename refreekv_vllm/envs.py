"""Environment knobs, all read lazily. They switch on diagnostics only, never behaviour.

``REFREEKV_`` is our prefix: vLLM warns about unknown ``VLLM_*`` variables.
"""

import os

ENV_VARS = {
    # Directory where every process that loads the plugin records who loaded it (tests use it
    # to prove the plugin runs in the engine-core and worker processes).
    "REFREEKV_PLUGIN_TRACE_DIR": lambda: os.environ.get("REFREEKV_PLUGIN_TRACE_DIR") or None,
    # Converted models are cached here (default ~/.cache/refreekv_vllm).
    "REFREEKV_CACHE_DIR": lambda: os.environ.get("REFREEKV_CACHE_DIR") or None,
}


def __getattr__(name: str):
    if name in ENV_VARS:
        return ENV_VARS[name]()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__() -> list[str]:
    return list(ENV_VARS)
