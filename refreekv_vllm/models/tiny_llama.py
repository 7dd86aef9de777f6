"""A seeded random Llama with SmolLM2's real tokenizer, for tests that only need shapes."""

from pathlib import Path

from refreekv_vllm.models.cache import build_once, model_cache_dir
from refreekv_vllm.models.hf_fixes import patch_tokenizer_config
from refreekv_vllm.models.smollm2 import prepare_smollm2


def prepare_tiny_llama(num_layers: int = 4, head_dim: int = 32, seed: int = 0,
                       cache_dir: Path | None = None) -> Path:
    """GQA 4:2, ``num_layers`` layers (>= 4 so that layers past the frozen 0-1 exist).
    ``head_dim`` 32 or 64 selects vLLM's CPU ``vec`` attention ISA, 16 selects ``vec16``."""
    source = {"kind": "tiny-llama", "layers": num_layers, "head_dim": head_dim, "seed": seed,
              "recipe": 1}
    name = f"tiny-llama-l{num_layers}-d{head_dim}-s{seed}"
    tokenizer_dir = prepare_smollm2(cache_dir)

    def build(out_dir: Path) -> None:
        import torch
        from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

        tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
        torch.manual_seed(seed)
        config = LlamaConfig(
            vocab_size=len(tokenizer), hidden_size=4 * head_dim, intermediate_size=8 * head_dim,
            num_hidden_layers=num_layers, num_attention_heads=4, num_key_value_heads=2,
            head_dim=head_dim, max_position_embeddings=8192, rope_theta=100000.0,
            tie_word_embeddings=True, bos_token_id=tokenizer.bos_token_id,
            eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
        config.architectures = ["LlamaForCausalLM"]
        LlamaForCausalLM(config).to(torch.bfloat16).save_pretrained(out_dir)
        tokenizer.save_pretrained(out_dir)
        patch_tokenizer_config(out_dir)

    return build_once((cache_dir or model_cache_dir()) / name, source, build)
