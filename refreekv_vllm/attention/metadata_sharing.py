"""One attention-metadata build per step for all layers that skip no gap.

With one KV cache group per layer, vLLM builds attention metadata once per layer per step. For
layers without a gap the builds differ only in the block table and slot mapping, which is what
vLLM's own ``builder.update_block_table`` swaps in; but vLLM only shares builds between groups
whose specs compare equal, and ours never do. The runner opens a :class:`MetadataShare` around
each ``_build_attention_metadata`` call; inside it the first gapless build is kept and reused.

FlashAttention 3 under full CUDA graphs also writes its scheduler metadata into a buffer owned by
the builder, and a captured graph reads whatever that buffer holds at replay. Shared builds
therefore write one buffer common to all layers (graphs are captured with it, so a replay reads
this step's schedule), and a build that is not shared (a layer with a gap, which never runs in a
full graph) uses the builder's own buffer so that it cannot overwrite the shared one.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

import torch

_current: MetadataShare | None = None
_shared_buffers: dict[tuple[Any, ...], torch.Tensor] = {}


class MetadataShare:
    """Builds kept during one ``_build_attention_metadata`` call."""

    def __init__(self) -> None:
        self.builds: dict[tuple[Any, ...], Any] = {}
        self.shared_buffer_written = False


@contextlib.contextmanager
def sharing_metadata() -> Iterator[MetadataShare]:
    global _current
    outer, _current = _current, MetadataShare()
    try:
        yield _current
    finally:
        _current = outer


def current_share() -> MetadataShare | None:
    return _current


def shared_buffer_like(buffer: torch.Tensor) -> torch.Tensor:
    """The process-wide buffer that every layer's shared builds write (one per shape)."""
    key = (tuple(buffer.shape), buffer.dtype, buffer.device)
    if key not in _shared_buffers:
        _shared_buffers[key] = torch.zeros_like(buffer)
    return _shared_buffers[key]


def build_key(builder: Any, common_prefix_len: int, common_attn_metadata: Any,
              args: tuple[Any, ...], kwargs: dict[str, Any]) -> tuple[Any, ...]:
    """Builds with equal keys in one share differ only in block table and slot mapping: the
    runner hands every group a shallow copy of the same common metadata."""
    cm = common_attn_metadata
    return (type(builder), common_prefix_len, id(cm.query_start_loc), id(cm.seq_lens),
            cm.num_reqs, cm.num_actual_tokens, cm.max_seq_len, cm.causal, args,
            tuple(sorted(kwargs.items())))
