"""Using ReFreeKV with vLLM's offline ``LLM`` API::

    from vllm import LLM
    from refreekv_vllm.offline import refreekv_llm_kwargs

    llm = LLM(model=..., **refreekv_llm_kwargs({"threshold": 0.01}))
"""

import os
from typing import Any

WORKER_CLS = "refreekv_vllm.worker.worker.RefreeKVWorker"
SCHEDULER_CLS = "refreekv_vllm.core.scheduler.make_scheduler"


def refreekv_llm_kwargs(refreekv: dict[str, Any] | None = None) -> dict[str, Any]:
    """Engine arguments that enable ReFreeKV (``refreekv`` is the additional-config section).

    Also selects vLLM's V1 model runner (``VLLM_USE_V2_MODEL_RUNNER=0``) unless the caller chose
    one: call it before building the engine."""
    os.environ.setdefault("VLLM_USE_V2_MODEL_RUNNER", "0")
    return {"worker_cls": WORKER_CLS, "scheduler_cls": SCHEDULER_CLS,
            "additional_config": {"refreekv": dict(refreekv or {})}}
