"""Per-layer specs make vLLM's stock grouping build one KV cache group per layer."""

import pickle

import pytest
from vllm.config import VllmConfig
from vllm.v1.core.kv_cache_coordinator import (
    HybridKVCacheCoordinator,
    KVCacheCoordinatorNoPrefixCache,
)
from vllm.v1.core.kv_cache_manager import KVCacheManager
from vllm.v1.core.kv_cache_utils import get_kv_cache_config_from_groups, get_kv_cache_groups
from vllm.v1.core.single_type_kv_cache_manager import FullAttentionManager
from vllm.v1.kv_cache_interface import FullAttentionSpec, KVCacheConfig, KVCacheGroupSpec

from refreekv_vllm.core.kv_cache_spec import LayerFullAttentionSpec, layer_index_of_group
from tests.core.utils import BLOCK_SIZE, layer_name, layer_spec, per_layer_kv_cache_config

NUM_LAYERS = 5


def plain_spec() -> FullAttentionSpec:
    spec = layer_spec(0)
    return FullAttentionSpec(
        block_size=spec.block_size, num_kv_heads=spec.num_kv_heads, head_size=spec.head_size,
        dtype=spec.dtype)


def test_merge_keeps_the_layer():
    merged = LayerFullAttentionSpec.merge([layer_spec(3), layer_spec(3)])
    assert type(merged) is LayerFullAttentionSpec
    assert merged == layer_spec(3)


@pytest.mark.parametrize("other", [layer_spec(4), plain_spec()], ids=["other-layer", "plain"])
def test_merge_refuses_other_specs(other):
    with pytest.raises(AssertionError):
        LayerFullAttentionSpec.merge([layer_spec(3), other])


def test_uniform_only_within_one_layer():
    spec = layer_spec(1)
    assert spec.is_uniform_with_collection({"a": layer_spec(1), "b": layer_spec(1)})
    assert not spec.is_uniform_with_collection({"a": layer_spec(1), "b": layer_spec(2)})
    assert not spec.is_uniform_with_collection({"a": layer_spec(1), "b": plain_spec()})


def test_spec_survives_pickle_and_hashes_by_layer():
    # Workers ship their specs to the engine core pickled; grouping buckets specs by hash.
    spec = layer_spec(2)
    assert pickle.loads(pickle.dumps(spec)) == spec
    assert len({layer_spec(i) for i in (0, 1, 1, 2)}) == 3


def test_stock_grouping_gives_one_group_per_layer():
    vllm_config = VllmConfig()
    specs = {layer_name(i): layer_spec(i) for i in range(NUM_LAYERS)}

    groups = get_kv_cache_groups(vllm_config, specs)

    assert [g.layer_names for g in groups] == [[layer_name(i)] for i in range(NUM_LAYERS)]
    assert [g.kv_cache_spec for g in groups] == [layer_spec(i) for i in range(NUM_LAYERS)]
    page_sizes = {g.kv_cache_spec.page_size_bytes for g in groups}
    assert page_sizes == {layer_spec(0).page_size_bytes}


def test_plain_specs_would_share_one_group():
    # The control: without the layer field every dense model lands in a single group.
    vllm_config = VllmConfig()
    groups = get_kv_cache_groups(
        vllm_config, {layer_name(i): plain_spec() for i in range(NUM_LAYERS)})
    assert len(groups) == 1


def test_memory_layout_of_per_layer_groups():
    vllm_config = VllmConfig()
    page_size = layer_spec(0).page_size_bytes
    groups = get_kv_cache_groups(
        vllm_config, {layer_name(i): layer_spec(i) for i in range(NUM_LAYERS)})

    config = get_kv_cache_config_from_groups(vllm_config, groups, page_size * 37)

    # One layer per group: a block is one layer's page, and one tensor backs every layer.
    assert config.num_blocks == 37
    assert len(config.kv_cache_tensors) == 1
    assert config.kv_cache_tensors[0].size == page_size * 37
    assert config.kv_cache_tensors[0].shared_by == [layer_name(i) for i in range(NUM_LAYERS)]
    assert layer_index_of_group(config) == list(range(NUM_LAYERS))


@pytest.mark.parametrize(
    ("enable_caching", "coordinator_cls"),
    [(True, HybridKVCacheCoordinator), (False, KVCacheCoordinatorNoPrefixCache)])
def test_kv_cache_manager_accepts_per_layer_groups(enable_caching, coordinator_cls):
    config = per_layer_kv_cache_config(VllmConfig(), num_blocks=16, num_layers=NUM_LAYERS)
    manager = KVCacheManager(
        config, max_model_len=64, scheduler_block_size=BLOCK_SIZE, hash_block_size=BLOCK_SIZE,
        enable_caching=enable_caching)
    assert type(manager.coordinator) is coordinator_cls
    managers = manager.coordinator.single_type_managers
    assert len(managers) == NUM_LAYERS
    assert all(type(m) is FullAttentionManager for m in managers)


def test_layer_index_of_group_refuses_shared_groups():
    config = KVCacheConfig(
        num_blocks=4, kv_cache_tensors=[],
        kv_cache_groups=[KVCacheGroupSpec([layer_name(0), layer_name(1)], plain_spec())])
    with pytest.raises(AssertionError, match="exactly one layer per group"):
        layer_index_of_group(config)


def test_layer_index_of_group_checks_the_spec_layer():
    config = KVCacheConfig(
        num_blocks=4, kv_cache_tensors=[],
        kv_cache_groups=[KVCacheGroupSpec([layer_name(0)], layer_spec(1))])
    with pytest.raises(AssertionError, match="has a spec for layer 1"):
        layer_index_of_group(config)
