"""Refuse, at startup, configurations that per-layer gap freeing cannot handle.

Called by the scheduler (engine core); each check names the option to change.
"""

from __future__ import annotations

from vllm.config import VllmConfig
from vllm.v1.kv_cache_interface import KVCacheConfig

from refreekv_vllm.core.kv_cache_layout import is_paged_layout, layout_problems


def check_supported(vllm_config: VllmConfig, kv_cache_config: KVCacheConfig | None = None) -> None:
    """Raise ``ValueError`` listing every unsupported setting.

    Args:
        vllm_config: The engine configuration.
        kv_cache_config: The KV cache layout, once known (engine core); ``None`` checks the
            configuration only (worker, before the layout exists).
    """
    problems = _config_problems(vllm_config)
    if kv_cache_config is not None:
        problems += _kv_cache_problems(kv_cache_config)
    if problems:
        raise ValueError(
            "refreekv-vllm cannot run with this configuration:\n"
            + "\n".join(f"  - {p}" for p in problems))


def _config_problems(vllm_config: VllmConfig) -> list[str]:
    problems: list[str] = []
    parallel = vllm_config.parallel_config
    if vllm_config.speculative_config is not None:
        problems.append(
            "speculative decoding (--speculative-config): drafters compute their own "
            "positions and slots from the block tables; remove the option")
    if parallel.decode_context_parallel_size > 1:
        problems.append("--decode-context-parallel-size > 1: use 1")
    if parallel.prefill_context_parallel_size > 1:
        problems.append("--prefill-context-parallel-size > 1: use 1")
    if parallel.enable_dbo:
        problems.append("--enable-dbo (dual-batch overlap): remove the option")
    if vllm_config.kv_transfer_config is not None:
        problems.append(
            "KV connectors (--kv-transfer-config): connectors read and write blocks that "
            "ReFreeKV releases; remove the option")
    if vllm_config.cache_config.cache_dtype != "auto":
        problems.append(
            f"--kv-cache-dtype {vllm_config.cache_config.cache_dtype}: quantized KV caches "
            "are not supported; use --kv-cache-dtype auto")
    model_config = vllm_config.model_config
    if model_config is not None:
        if model_config.use_mla:
            problems.append(
                f"MLA attention (model {model_config.model}): only standard multi-head / "
                "grouped-query attention is supported")
        if not model_config.disable_cascade_attn:
            problems.append(
                "cascade attention (--no-disable-cascade-attn): it reads null_block entries in "
                "the middle of block tables as a shared prefix; use --disable-cascade-attn")
    return problems


def _kv_cache_problems(kv_cache_config: KVCacheConfig) -> list[str]:
    """The scheduler's layout: one group of dense full-attention layers over per-layer pages."""
    if len(kv_cache_config.kv_cache_groups) != 1:
        return layout_problems(kv_cache_config)
    spec = kv_cache_config.kv_cache_groups[0].kv_cache_spec
    problems = []
    if spec.non_causal:
        problems.append("the model attends non-causally")
    if not is_paged_layout(kv_cache_config):
        problems.append(
            "the KV cache is not laid out in per-layer pages: start the engine with a refreekv "
            "section in --additional-config (it sets the worker and scheduler) rather than "
            "naming the scheduler class alone")
    return problems
