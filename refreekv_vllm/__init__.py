"""refreekv-vllm: threshold-free KV-cache pruning (ReFreeKV) as a vLLM plugin."""

__version__ = "0.1.0"
