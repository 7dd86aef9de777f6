"""The prefill attention's softmax normaliser of the window rows, kept for the scorer.

A window of w > 1 rows needs each row's log-sum-exp over its causal keys before it can turn
logits into probabilities; computing it is a whole extra pass over the keys. FlashAttention
computes exactly that normaliser for every query row of the prefill and can return it
(``return_softmax_lse``; FA3 computes it either way), so on scoring steps the wrapped forward
asks for it and the scorer reads the keys once.

vLLM's ``FlashAttentionImpl.forward`` calls the module-level ``flash_attn_varlen_func`` without
that flag, so for the duration of one such forward the module global is swapped for a wrapper
that sets it. Any other call pattern (cascade attention asks for the normaliser itself and calls
twice) leaves nothing captured, and the scorer falls back to its own first pass.
"""

from collections.abc import Iterator
from contextlib import contextmanager
from types import ModuleType
from typing import Any

import torch


@contextmanager
def capturing_softmax_lse(module: ModuleType, num_heads: int, num_tokens: int
                          ) -> Iterator[list[torch.Tensor]]:
    """Yields a list that holds, after the block, FlashAttention's ``[num_heads, >= num_tokens]``
    natural-log normaliser of this forward's query rows if exactly one call produced it."""
    original = module.flash_attn_varlen_func
    results: list[torch.Tensor | None] = []

    def with_lse(*args: Any, **kwargs: Any) -> Any:
        if kwargs.get("return_softmax_lse"):
            results.append(None)
            return original(*args, **kwargs)
        out, lse = original(*args, **{**kwargs, "return_softmax_lse": True})
        results.append(lse)
        return out

    captured: list[torch.Tensor] = []
    module.flash_attn_varlen_func = with_lse  # type: ignore[attr-defined]
    try:
        yield captured
    finally:
        module.flash_attn_varlen_func = original  # type: ignore[attr-defined]
    lse = results[0] if len(results) == 1 else None
    if lse is not None and _is_lse(lse, num_heads, num_tokens):
        captured.append(lse)


def _is_lse(lse: torch.Tensor | None, num_heads: int, num_tokens: int) -> bool:
    return (lse is not None and lse.dim() == 2 and lse.shape[0] == num_heads
            and lse.shape[1] >= num_tokens and lse.dtype == torch.float32)
