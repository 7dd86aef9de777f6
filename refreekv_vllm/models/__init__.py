"""Offline model assets: the default real model and a seeded tiny random Llama."""

from refreekv_vllm.models.cache import model_cache_dir
from refreekv_vllm.models.smollm2 import DEFAULT_MODEL_NAME, prepare_smollm2
from refreekv_vllm.models.tiny_llama import prepare_tiny_llama

__all__ = ["DEFAULT_MODEL_NAME", "model_cache_dir", "prepare_smollm2", "prepare_tiny_llama"]
