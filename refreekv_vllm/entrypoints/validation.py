"""Reject bad per-request ReFreeKV parameters where vLLM validates sampling parameters, so the
OpenAI server answers HTTP 400 with the message (vLLM maps ``ValueError`` there to 400) instead
of the engine seeing them."""

from typing import Any

from refreekv_vllm.config import ConfigError, RefreeKVConfig, request_settings
from refreekv_vllm.offline import WORKER_CLS

_MARK = "_refreekv_validation"


def install_request_validation() -> None:
    """Wrap ``InputProcessor._validate_params`` once per process (idempotent)."""
    from vllm.v1.engine.input_processor import InputProcessor

    original = InputProcessor._validate_params
    if getattr(original, _MARK, False):
        return

    def _validate_params(self: Any, params: Any, supported_tasks: Any) -> None:
        original(self, params, supported_tasks)
        config = _config_of(self)
        extra_args = getattr(params, "extra_args", None)
        if config is not None and extra_args:
            try:
                request_settings(config, extra_args)
            except ConfigError as exc:
                raise ValueError(str(exc)) from None

    setattr(_validate_params, _MARK, True)
    InputProcessor._validate_params = _validate_params


def _config_of(processor: Any) -> RefreeKVConfig | None:
    """The server's ReFreeKV config, or None when this engine does not run ReFreeKV."""
    cached = processor.__dict__.get(_MARK)
    if cached is None:
        vllm_config = processor.vllm_config
        enabled = vllm_config.parallel_config.worker_cls == WORKER_CLS
        cached = (RefreeKVConfig.from_additional_config(vllm_config.additional_config)
                  if enabled else False)
        processor.__dict__[_MARK] = cached
    return cached or None
