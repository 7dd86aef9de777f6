"""``--worker-cls refreekv_vllm.worker.worker.RefreeKVWorker``: vLLM's own worker for the
platform (CPU or CUDA), with the ReFreeKV attention backend and model-runner mixin."""

import functools
from typing import TYPE_CHECKING, Any

from refreekv_vllm.config import RefreeKVConfig
from refreekv_vllm.forward.step_context import set_layer_tables, set_step_context
from refreekv_vllm.patches.attention_backends import registered_attention_backends
from refreekv_vllm.worker.model_runner import RefreeKVModelRunnerMixin

ATTENTION_BACKENDS = {
    "CPU_ATTN": "refreekv_vllm.attention.backend.RefreeKVCPUAttentionBackend",
    "FLASH_ATTN": "refreekv_vllm.attention.backend.RefreeKVFlashAttentionBackend",
}


if TYPE_CHECKING:  # the mixin's methods run on vLLM's worker: type them as such
    from vllm.v1.worker.gpu_worker import Worker as _WorkerBase
else:
    _WorkerBase = object


class RefreeKVWorkerMixin(_WorkerBase):
    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.refreekv_config = RefreeKVConfig.from_additional_config(
            self.vllm_config.additional_config)

    def load_model(self, *args: Any, **kwargs: Any) -> None:
        # Attention layers pick their backend class when the model is built.
        if not self.refreekv_config.enabled:
            return super().load_model(*args, **kwargs)
        with registered_attention_backends(ATTENTION_BACKENDS):
            return super().load_model(*args, **kwargs)

    def shutdown(self) -> None:
        super().shutdown()
        set_layer_tables(None)
        set_step_context(None)

    def init_device(self) -> None:
        super().init_device()
        if not self.refreekv_config.enabled:
            return
        runner = self.model_runner
        if type(runner).__module__.startswith("vllm.v1.worker.gpu.") or \
                type(runner).__module__.startswith("vllm.v1.worker.cpu."):
            raise RuntimeError("ReFreeKV needs vLLM's V1 model runner: set "
                               "VLLM_USE_V2_MODEL_RUNNER=0 (refreekv-serve does).")
        runner_class: type = type(runner)
        runner.__class__ = _runner_class(runner_class)
        runner.init_refreekv(self.refreekv_config)

    def refreekv_request_records(self) -> list[dict[str, Any]]:
        """Recent per-request pruning records (``collective_rpc`` target)."""
        if not self.refreekv_config.enabled:
            return []
        return list(self.model_runner.refreekv_records)


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


def RefreeKVWorker(*args: Any, **kwargs: Any) -> Any:  # named like the class
    """Builds the platform's worker with the ReFreeKV mixin (vLLM resolves ``--worker-cls`` to a
    callable and calls it with the worker's keyword arguments)."""
    return _worker_class()(*args, **kwargs)
