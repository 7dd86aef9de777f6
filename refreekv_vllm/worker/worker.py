"""``--worker-cls refreekv_vllm.worker.worker.RefreeKVWorker``: vLLM's own worker for the
platform (CPU or CUDA), with the ReFreeKV attention backend and model-runner mixin."""

import functools
from typing import Any

from refreekv_vllm.config import RefreeKVConfig
from refreekv_vllm.worker.model_runner import RefreeKVModelRunnerMixin

ATTENTION_BACKENDS = {
    "CPU_ATTN": "refreekv_vllm.attention.backend.RefreeKVCPUAttentionBackend",
    "FLASH_ATTN": "refreekv_vllm.attention.backend.RefreeKVFlashAttentionBackend",
}


class RefreeKVWorkerMixin:
    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.refreekv_config = RefreeKVConfig.from_additional_config(
            self.vllm_config.additional_config)
        if self.refreekv_config.enabled:
            _register_attention_backends()

    def init_device(self) -> None:
        super().init_device()
        if not self.refreekv_config.enabled:
            return
        runner = self.model_runner
        if type(runner).__module__.startswith("vllm.v1.worker.gpu.") or \
                type(runner).__module__.startswith("vllm.v1.worker.cpu."):
            raise RuntimeError("ReFreeKV needs vLLM's V1 model runner: set "
                               "VLLM_USE_V2_MODEL_RUNNER=0 (refreekv-serve does).")
        runner.__class__ = _runner_class(type(runner))
        runner.init_refreekv(self.refreekv_config)

    def refreekv_request_records(self) -> list[dict[str, Any]]:
        """Recent per-request pruning records (``collective_rpc`` target)."""
        if not self.refreekv_config.enabled:
            return []
        return list(self.model_runner.refreekv_records)


def _register_attention_backends() -> None:
    from vllm.v1.attention.backends.registry import AttentionBackendEnum, register_backend
    from vllm.v1.attention.selector import _cached_get_attn_backend

    for name, class_path in ATTENTION_BACKENDS.items():
        register_backend(AttentionBackendEnum[name], class_path)
    # vLLM caches its backend choice per process: an engine built earlier in this process
    # (e.g. plain vLLM in-process) would otherwise hand its unwrapped class to this one.
    _cached_get_attn_backend.cache_clear()


@functools.cache
def _runner_class(base: type) -> type:
    return type(f"RefreeKV{base.__name__}", (RefreeKVModelRunnerMixin, base), {})


@functools.cache
def _worker_class() -> type:
    from vllm.platforms import current_platform

    if current_platform.is_cpu():
        from vllm.v1.worker.cpu_worker import CPUWorker as base
    else:
        from vllm.v1.worker.gpu_worker import Worker as base
    return type(f"RefreeKV{base.__name__}", (RefreeKVWorkerMixin, base), {})


def RefreeKVWorker(*args: Any, **kwargs: Any) -> Any:  # noqa: N802 - named like the class
    """Builds the platform's worker with the ReFreeKV mixin (vLLM resolves ``--worker-cls`` to a
    callable and calls it with the worker's keyword arguments)."""
    return _worker_class()(*args, **kwargs)
