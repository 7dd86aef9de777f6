"""The per-layer page layout derived from vLLM's own KV cache layout."""

import pytest
from vllm.v1.engine import core
from vllm.v1.kv_cache_interface import KVCacheConfig, KVCacheTensor, SlidingWindowSpec

from refreekv_vllm.core.kv_cache_layout import (
    BLOCK_ID_FACTOR,
    install_layout_hook,
    is_paged_layout,
    layout_problems,
    paged_kv_cache_config,
    stage_layers,
    stage_pages,
)
from refreekv_vllm.offline import WORKER_CLS
from tests.core.utils import (
    NUM_LAYERS,
    layer_name,
    layer_spec,
    make_vllm_config,
    vllm_kv_cache_config,
)


def test_one_tensor_of_pages_for_all_layers(model_config_dir):
    vllm_layout = vllm_kv_cache_config(make_vllm_config(model_config_dir), num_blocks=50)
    assert not is_paged_layout(vllm_layout)
    paged = paged_kv_cache_config(vllm_layout)
    assert is_paged_layout(paged)
    assert paged.num_blocks == BLOCK_ID_FACTOR * 50
    (tensor,) = paged.kv_cache_tensors
    assert tensor.size == sum(t.size for t in vllm_layout.kv_cache_tensors)
    assert tensor.shared_by == [layer_name(i) for i in range(NUM_LAYERS)]
    assert stage_pages(paged) == [50 * NUM_LAYERS]
    assert stage_layers(paged) == [NUM_LAYERS]
    assert paged.kv_cache_groups == vllm_layout.kv_cache_groups


def test_layouts_that_cannot_be_paged(model_config_dir):
    vllm_layout = vllm_kv_cache_config(make_vllm_config(model_config_dir), num_blocks=50)
    group = vllm_layout.kv_cache_groups[0]
    two_groups = KVCacheConfig(50, vllm_layout.kv_cache_tensors, [group, group])
    assert "2 KV cache groups" in layout_problems(two_groups)[0]

    sliding = SlidingWindowSpec(block_size=4, num_kv_heads=2, head_size=8,
                                dtype=layer_spec().dtype, sliding_window=8)
    window_group = type(group)(group.layer_names, sliding)
    assert "SlidingWindowSpec" in layout_problems(KVCacheConfig(
        50, vllm_layout.kv_cache_tensors, [window_group]))[0]

    shared = [KVCacheTensor(t.size, [layer_name(0), layer_name(1)])
              for t in vllm_layout.kv_cache_tensors]
    assert "KV sharing" in layout_problems(KVCacheConfig(50, shared, [group]))[0]
    with pytest.raises(ValueError, match="cannot page"):
        paged_kv_cache_config(KVCacheConfig(50, shared, [group]))


@pytest.mark.parametrize(("worker_cls", "refreekv", "paged"), [
    (WORKER_CLS, {}, True),
    (WORKER_CLS, {"enabled": False}, False),
    ("auto", {}, False),
])
def test_engine_core_hook_pages_only_refreekv_engines(model_config_dir, monkeypatch, worker_cls,
                                                      refreekv, paged):
    vllm_config = make_vllm_config(model_config_dir)
    vllm_config.parallel_config.worker_cls = worker_cls
    vllm_config.additional_config = {"refreekv": refreekv}
    vllm_layout = vllm_kv_cache_config(vllm_config, num_blocks=50)
    monkeypatch.setattr(core, "get_kv_cache_configs", lambda config, specs, memory: [vllm_layout])
    monkeypatch.setattr(core, "get_kv_cache_capacity", core.get_kv_cache_capacity)
    capacity = core.get_kv_cache_capacity(vllm_config, vllm_layout)
    install_layout_hook()
    install_layout_hook()  # idempotent: wraps once
    (layout,) = core.get_kv_cache_configs(vllm_config, [{}], [0])
    assert is_paged_layout(layout) == paged
    # The same pages, whatever the number of block ids: the same capacity.
    assert core.get_kv_cache_capacity(vllm_config, layout) == capacity


def test_every_pipeline_stage_is_paged_and_the_scheduler_sees_them_all(model_config_dir,
                                                                       monkeypatch):
    """vLLM's own ``get_kv_cache_configs`` for two stages of two layers (as two workers report
    them), through the hook: each worker pages its own layers; the scheduler's layout has every
    layer and one tensor of pages per stage; the capacity is what plain vLLM reports."""
    vllm_config = make_vllm_config(model_config_dir)  # plain vLLM's worker first
    page_size = layer_spec().page_size_bytes
    blocks = 80  # at least one request of the model's length
    stages = [{layer_name(i): layer_spec() for i in layers} for layers in ((0, 1), (2, 3))]
    plain = core.get_kv_cache_configs(vllm_config, stages, [page_size * 2 * blocks] * 2)
    capacity = core.get_kv_cache_capacity(vllm_config,
                                          core.generate_scheduler_kv_cache_config(plain))
    vllm_config.parallel_config.worker_cls = WORKER_CLS
    vllm_config.additional_config = {"refreekv": {}}
    for name in ("get_kv_cache_configs", "generate_scheduler_kv_cache_config",
                 "get_kv_cache_capacity"):
        monkeypatch.setattr(core, name, getattr(core, name))  # restored after the test
    install_layout_hook()
    workers = core.get_kv_cache_configs(vllm_config, stages, [page_size * 2 * blocks] * 2)
    assert [w.kv_cache_tensors[0].shared_by for w in workers] == [
        [layer_name(0), layer_name(1)], [layer_name(2), layer_name(3)]]
    assert all(is_paged_layout(w) and stage_pages(w) == [2 * blocks] for w in workers)
    scheduler = core.generate_scheduler_kv_cache_config(workers + workers[1:])  # TP duplicate
    assert is_paged_layout(scheduler)
    assert scheduler.kv_cache_groups[0].layer_names == [layer_name(i) for i in range(4)]
    assert (stage_pages(scheduler), stage_layers(scheduler)) == ([2 * blocks] * 2, [2, 2])
    assert scheduler.num_blocks == BLOCK_ID_FACTOR * blocks
    assert core.get_kv_cache_capacity(vllm_config, scheduler) == capacity
