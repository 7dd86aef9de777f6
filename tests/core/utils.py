"""Builders for real vLLM scheduler-side objects on a tiny pool: vLLM's own KV cache layout for a
4-layer dense model (``get_kv_cache_groups``), turned into ReFreeKV's per-layer page layout,
block size 4, a 4-layer Llama's ``config.json`` alone (no weights, no tokenizer, no model to
convert)."""

from __future__ import annotations

import json
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
from vllm.v1.kv_cache_interface import FullAttentionSpec, KVCacheConfig
from vllm.v1.request import Request

from refreekv_vllm.core.kv_cache_layout import paged_kv_cache_config

BLOCK_SIZE = 4
NUM_LAYERS = 4
NUM_SINK_TOKENS = 4
MAX_MODEL_LEN = 256

init_none_hash(sha256)


def layer_name(layer: int) -> str:
    return f"model.layers.{layer}.self_attn.attn"


def layer_spec(**overrides: object) -> FullAttentionSpec:
    fields = dict(block_size=BLOCK_SIZE, num_kv_heads=2, head_size=8, dtype=torch.float32)
    fields.update(overrides)
    return FullAttentionSpec(**fields)  # type: ignore[arg-type]


def vllm_kv_cache_config(
    vllm_config: VllmConfig, num_blocks: int, num_layers: int = NUM_LAYERS
) -> KVCacheConfig:
    """The layout vLLM derives from the worker's specs: ``num_blocks`` blocks of all layers."""
    specs = {layer_name(i): layer_spec() for i in range(num_layers)}
    groups = get_kv_cache_groups(vllm_config, specs)
    page_size = groups[0].kv_cache_spec.page_size_bytes
    return get_kv_cache_config_from_groups(vllm_config, groups,
                                           page_size * num_layers * num_blocks)


def paged_config(vllm_config: VllmConfig, num_blocks: int,
                 num_layers: int = NUM_LAYERS) -> KVCacheConfig:
    """What ReFreeKV's engine core hands the scheduler: ``num_blocks * num_layers`` pages."""
    return paged_kv_cache_config(vllm_kv_cache_config(vllm_config, num_blocks, num_layers))


def write_model_config(directory: Path) -> Path:
    """A 4-layer GQA Llama's ``config.json``: all vLLM's ``ModelConfig`` reads with
    ``skip_tokenizer_init``."""
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "config.json").write_text(json.dumps({
        "architectures": ["LlamaForCausalLM"], "model_type": "llama", "vocab_size": 49152,
        "hidden_size": 128, "intermediate_size": 256, "num_hidden_layers": NUM_LAYERS,
        "num_attention_heads": 4, "num_key_value_heads": 2, "head_dim": 32,
        "max_position_embeddings": 8192, "rope_theta": 100000.0, "tie_word_embeddings": True,
        "torch_dtype": "bfloat16"}))
    return directory


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
