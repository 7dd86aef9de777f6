"""``--worker-cls refreekv_vllm.worker.worker.RefreeKVWorker``: vLLM's own worker for the
platform (CPU or CUDA), with the ReFreeKV attention backend and model-runner mixin."""

import contextlib
import functools
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

from refreekv_vllm.config import RefreeKVConfig
from refreekv_vllm.worker.model_runner import RefreeKVModelRunnerMixin
from refreekv_vllm.worker.step_context import set_layer_tables, set_step_context

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
        with _refreekv_attention_backends():
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


@contextlib.contextmanager
def _refreekv_attention_backends() -> Iterator[None]:
    """vLLM's backend registry is global to the process: our classes are registered only while
    this engine's model is built, so that a plain engine built later in the same process
    (``vllm.LLM`` offline, tests) gets vLLM's own attention and not ours."""
    from vllm.v1.attention.backends.registry import AttentionBackendEnum, register_backend
    from vllm.v1.attention.selector import _cached_get_attn_backend

    members = [AttentionBackendEnum[name] for name in ATTENTION_BACKENDS]
    previous = {m: m.get_path() if m.is_overridden() else None for m in members}
    for member in members:
        register_backend(member, ATTENTION_BACKENDS[member.name])
    # vLLM caches its backend choice per process: an engine built earlier in this process
    # would otherwise hand its class to this one, and this one's to a later one.
    _cached_get_attn_backend.cache_clear()
    try:
        yield
    finally:
        for member, path in previous.items():
            if path is None:
                member.clear_override()
            else:
                register_backend(member, path)
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


def RefreeKVWorker(*args: Any, **kwargs: Any) -> Any:  # named like the class
    """Builds the platform's worker with the ReFreeKV mixin (vLLM resolves ``--worker-cls`` to a
    callable and calls it with the worker's keyword arguments)."""
    return _worker_class()(*args, **kwargs)
