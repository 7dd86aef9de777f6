"""Independent reference for ReFreeKV inside vLLM: Hugging Face transformers on CPU in float32.

For each prompt: prefill with full attention, score every layer's cut from the captured
post-RoPE queries/keys with ``policy/reference.py``, then decode greedily while each layer's
attention masks the whole blocks inside its gap (the block-granular kept set vLLM keeps).
"""

from dataclasses import dataclass

import torch
from transformers import AttentionInterface, AutoModelForCausalLM, AutoTokenizer

from refreekv_vllm.policy.budget import freeable_block_range
from refreekv_vllm.policy.reference import layer_cut

ATTENTION_NAME = "refreekv_reference"


@dataclass
class ReferenceRun:
    token_ids: list[int]
    cuts: list[int]


class _State:
    """What the custom attention function needs while one prompt runs."""

    def __init__(self, window: int, threshold: float, agg: str, num_sinks: int,
                 frozen: tuple[int, ...], block_size: int) -> None:
        self.window, self.threshold, self.agg = window, threshold, agg
        self.num_sinks, self.frozen, self.block_size = num_sinks, frozen, block_size
        self.cuts: dict[int, int] = {}
        self.num_prompt_tokens = 0


_state: _State | None = None


def _attention(module, query, key, value, attention_mask, scaling, dropout=0.0, **kwargs):
    """Eager attention in float32; scores cuts at prefill and masks gap blocks at decode."""
    state = _state
    if state is None:
        raise RuntimeError(f"{ATTENTION_NAME} attention runs only inside reference_generate")
    layer = module.layer_idx
    groups = query.shape[1] // key.shape[1]
    q_len, k_len = query.shape[2], key.shape[2]
    if q_len > 1:  # prefill: full causal attention, then this layer's cut
        state.num_prompt_tokens = k_len
        if layer in state.frozen:
            state.cuts[layer] = state.num_sinks
        else:
            w = min(state.window, k_len)
            state.cuts[layer], _ = layer_cut(
                query[0, :, -w:].transpose(0, 1).double(), key[0].double(),
                num_sink_tokens=state.num_sinks, threshold=state.threshold, scale=scaling,
                agg=state.agg)
    keys = key.repeat_interleave(groups, dim=1)
    values = value.repeat_interleave(groups, dim=1)
    logits = torch.matmul(query, keys.transpose(2, 3)) * scaling
    positions = torch.arange(k_len)
    query_positions = torch.arange(k_len - q_len, k_len)
    allowed = positions[None, :] <= query_positions[:, None]
    if q_len == 1:
        gap = freeable_block_range(state.cuts[layer], state.num_sinks, state.block_size)
        if len(gap):
            allowed[:, gap.start * state.block_size:gap.stop * state.block_size] = False
    logits = logits.masked_fill(~allowed, float("-inf"))
    probs = torch.softmax(logits, dim=-1, dtype=torch.float32)
    return torch.matmul(probs, values).transpose(1, 2).contiguous(), None


def load_reference_model(model_dir: str):
    AttentionInterface.register(ATTENTION_NAME, _attention)
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32,
                                                 attn_implementation=ATTENTION_NAME)
    return tokenizer, model.eval()


@torch.no_grad()
def reference_generate(model, prompt_ids: list[int], max_tokens: int, *, window: int,
                       threshold: float, agg: str, num_sinks: int, frozen: tuple[int, ...],
                       block_size: int) -> ReferenceRun:
    global _state
    _state = _State(window, threshold, agg, num_sinks, frozen, block_size)
    try:
        output = model.generate(torch.tensor([prompt_ids]), max_new_tokens=max_tokens,
                                do_sample=False, min_new_tokens=max_tokens)
        num_layers = model.config.num_hidden_layers
        return ReferenceRun(output[0, len(prompt_ids):].tolist(),
                            [_state.cuts[layer] for layer in range(num_layers)])
    finally:
        _state = None
