"""Using ReFreeKV with vLLM's offline ``LLM`` API: a ``refreekv`` section in the additional
config is all it takes (the plugin fills in the rest, ``entrypoints/engine_args.py``)::

    from vllm import LLM

    llm = LLM(model=..., additional_config={"refreekv": {"threshold": 0.01}})
"""

from typing import Any

WORKER_CLS = "refreekv_vllm.worker.worker.RefreeKVWorker"
SCHEDULER_CLS = "refreekv_vllm.core.scheduler.make_scheduler"


def refreekv_llm_kwargs(refreekv: dict[str, Any] | None = None) -> dict[str, Any]:
    """``LLM`` keyword arguments that enable ReFreeKV (``refreekv`` is the section's settings)."""
    return {"additional_config": {"refreekv": dict(refreekv or {})}}
