"""One KV cache group per attention layer (VLLM.md §5.5).

ReFreeKV cuts differ per layer, and a block table shared by several layers can only free what all
of them drop. The worker therefore reports a :class:`LayerFullAttentionSpec` per layer; since the
specs of two layers never compare equal and never merge, vLLM's stock
``get_kv_cache_groups`` falls through to its general path and builds one group per layer.
"""

from __future__ import annotations

from dataclasses import dataclass, fields

from vllm.model_executor.models.utils import extract_layer_index
from vllm.v1.kv_cache_interface import FullAttentionSpec, KVCacheConfig, KVCacheSpec


@dataclass(frozen=True, kw_only=True)
class LayerFullAttentionSpec(FullAttentionSpec):
    """A ``FullAttentionSpec`` bound to one model layer.

    Not registered: the spec registry walks the MRO and finds ``FullAttentionManager``.
    """

    refreekv_layer: int

    @classmethod
    def merge(cls, specs: list[LayerFullAttentionSpec]) -> LayerFullAttentionSpec:
        # get_kv_cache_groups only treats AssertionError as "not mergeable".
        assert all(isinstance(spec, LayerFullAttentionSpec) for spec in specs), (
            "LayerFullAttentionSpec cannot be merged with other KV cache specs")
        layers = {spec.refreekv_layer for spec in specs}
        assert len(layers) == 1, (
            f"specs of layers {sorted(layers)} cannot share a KV cache group")
        # FullAttentionSpec.merge checks the attention fields and rebuilds a plain spec.
        base = FullAttentionSpec.merge(specs)
        init_fields = {f.name: getattr(base, f.name) for f in fields(base) if f.init}
        return cls(**init_fields, refreekv_layer=layers.pop())

    def is_uniform_with_collection(self, kv_cache_specs: dict[str, KVCacheSpec]) -> bool:
        if not all(
            isinstance(spec, LayerFullAttentionSpec)
            and spec.refreekv_layer == self.refreekv_layer
            for spec in kv_cache_specs.values()
        ):
            return False
        return super().is_uniform_with_collection(kv_cache_specs)


def layer_index_of_group(kv_cache_config: KVCacheConfig) -> list[int]:
    """Model layer index of each KV cache group (index = group id); one layer per group."""
    layer_indices: list[int] = []
    for group_id, group in enumerate(kv_cache_config.kv_cache_groups):
        assert len(group.layer_names) == 1, (
            f"KV cache group {group_id} holds layers {group.layer_names}; "
            "refreekv-vllm needs exactly one layer per group")
        layer_index = extract_layer_index(group.layer_names[0])
        spec = group.kv_cache_spec
        assert not isinstance(spec, LayerFullAttentionSpec) or (
            spec.refreekv_layer == layer_index), (
            f"KV cache group {group_id}: layer {group.layer_names[0]!r} has a spec for layer "
            f"{spec.refreekv_layer}")
        layer_indices.append(layer_index)
    assert len(set(layer_indices)) == len(layer_indices), (
        f"several KV cache groups map to the same layer: {layer_indices}")
    return layer_indices
