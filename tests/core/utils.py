"""Builders for real vLLM scheduler-side objects on a tiny pool: per-layer KV cache groups made
by vLLM's own ``get_kv_cache_groups``, block size 4, the 4-layer tiny Llama's config (no weights
are loaded)."""

from __future__ import annotations

from itertools import count
from pathlib import Path

import torch
from vllm import SamplingParams
from vllm.config import CacheConfig, ModelConfig, SchedulerConfig, VllmConfig
from vllm.utils.hashing import sha256
from vllm.v1.core.kv_cache_utils import (
    get_kv_cache_config_from_groups,
    get_kv_cache_groups,
    get_request_block_hasher,
    init_none_hash,
)
from vllm.v1.kv_cache_interface import KVCacheConfig
from vllm.v1.request import Request

from refreekv_vllm.core.kv_cache_spec import LayerFullAttentionSpec

BLOCK_SIZE = 4
NUM_LAYERS = 4
NUM_SINK_TOKENS = 4
MAX_MODEL_LEN = 256

init_none_hash(sha256)


def layer_name(layer: int) -> str:
    return f"model.layers.{layer}.self_attn.attn"


def layer_spec(layer: int, **overrides: object) -> LayerFullAttentionSpec:
    fields = dict(block_size=BLOCK_SIZE, num_kv_heads=2, head_size=8, dtype=torch.float32)
    fields.update(overrides)
    return LayerFullAttentionSpec(**fields, refreekv_layer=layer)  # type: ignore[arg-type]


def per_layer_kv_cache_config(
    vllm_config: VllmConfig, num_blocks: int, num_layers: int = NUM_LAYERS
) -> KVCacheConfig:
    """The KV cache layout vLLM derives from the worker's per-layer specs."""
    specs = {layer_name(i): layer_spec(i) for i in range(num_layers)}
    groups = get_kv_cache_groups(vllm_config, specs)
    page_size = groups[0].kv_cache_spec.page_size_bytes
    return get_kv_cache_config_from_groups(vllm_config, groups, page_size * num_blocks)


def make_vllm_config(
    model_dir: Path,
    *,
    enable_prefix_caching: bool = True,
    max_num_batched_tokens: int = MAX_MODEL_LEN,
) -> VllmConfig:
    model_config = ModelConfig(
        model=str(model_dir), dtype="float32", seed=0, skip_tokenizer_init=True,
        max_model_len=MAX_MODEL_LEN)
    scheduler_config = SchedulerConfig(
        max_num_seqs=8, max_num_batched_tokens=max_num_batched_tokens,
        max_model_len=MAX_MODEL_LEN, enable_chunked_prefill=True, is_encoder_decoder=False)
    cache_config = CacheConfig(block_size=BLOCK_SIZE, enable_prefix_caching=enable_prefix_caching)
    return VllmConfig(
        model_config=model_config, scheduler_config=scheduler_config, cache_config=cache_config)


_request_ids = count()


def make_request(
    prompt: list[int], max_tokens: int = 16, extra_args: dict | None = None
) -> Request:
    return Request(
        request_id=f"req-{next(_request_ids)}",
        prompt_token_ids=list(prompt),
        sampling_params=SamplingParams(
            max_tokens=max_tokens, ignore_eos=True, extra_args=extra_args),
        pooling_params=None,
        block_hasher=get_request_block_hasher(BLOCK_SIZE, sha256),
    )
