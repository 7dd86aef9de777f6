"""Offline model assets: the default real model, a second real architecture (Qwen2.5-Coder,
optional wheels) and a seeded tiny random Llama."""

from refreekv_vllm.models.cache import model_cache_dir
from refreekv_vllm.models.qwen_coder import QWEN_CODER_NAME, prepare_qwen_coder
from refreekv_vllm.models.smollm2 import DEFAULT_MODEL_NAME, prepare_smollm2
from refreekv_vllm.models.tiny_llama import prepare_tiny_llama

__all__ = ["DEFAULT_MODEL_NAME", "QWEN_CODER_NAME", "model_cache_dir", "prepare_qwen_coder",
           "prepare_smollm2", "prepare_tiny_llama"]
