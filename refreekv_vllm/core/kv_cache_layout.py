"""The KV cache layout behind per-layer pages (docs/design.md §1).

vLLM lays a dense model's KV cache out as one KV cache group: ``N`` blocks, one tensor per layer
of ``N`` pages each, block ``b`` meaning page ``b`` of every layer. ReFreeKV keeps the group
(so vLLM's scheduler and runner do exactly their plain per-step work) and changes two things:

- all layers share one tensor of ``N * num_layers`` pages, so a page a layer gives back can be
  used by any layer of any request;
- the scheduler gets ``BLOCK_ID_FACTOR * N`` block ids: the pages a pruned request gives back
  must be usable as new blocks, so there must be more block ids than full blocks.

The engine core derives this layout from vLLM's own (``install_layout_hook``); scheduler and
workers receive it through vLLM's usual ``KVCacheConfig`` hand-off.

Under pipeline parallelism every stage's worker gets its own layers' tensor of pages; the
scheduler, which vLLM gives one worker's layout, gets every stage's tensor instead, so that its
page pool keeps one set of pages per stage (``page_pool.PagePool``).
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any

from vllm.model_executor.models.utils import extract_layer_index
from vllm.v1.kv_cache_interface import FullAttentionSpec, KVCacheConfig, KVCacheTensor

# Block ids per full block of pages. At a physical budget b the pool holds up to 1/b times as
# many blocks as without pruning; 4 covers budgets down to 0.25 (the fidelity benchmark's
# budgets were 0.5-0.95). Each id costs one int32 per layer on the worker and one small object
# in the scheduler.
BLOCK_ID_FACTOR = 4


def paged_kv_cache_config(config: KVCacheConfig) -> KVCacheConfig:
    """vLLM's layout for a dense full-attention model (or for one pipeline stage of it), turned
    into the per-layer page layout."""
    problems = layout_problems(config)
    if problems:
        raise ValueError("ReFreeKV cannot page this KV cache layout: " + "; ".join(problems))
    (group,) = config.kv_cache_groups
    page_size = group.kv_cache_spec.page_size_bytes
    num_pages = sum(tensor.size for tensor in config.kv_cache_tensors) // page_size
    layer_names = sorted(group.layer_names, key=extract_layer_index)
    return KVCacheConfig(
        num_blocks=config.num_blocks * BLOCK_ID_FACTOR,
        kv_cache_tensors=[KVCacheTensor(size=num_pages * page_size, shared_by=layer_names)],
        kv_cache_groups=config.kv_cache_groups)


def scheduler_kv_cache_config(configs: list[KVCacheConfig]) -> KVCacheConfig:
    """The scheduler's view of the workers' paged layouts: every layer in the group and one
    tensor of pages per pipeline stage (tensor-parallel ranks of a stage hold the same)."""
    tensors = {tuple(tensor.shared_by): tensor for config in configs
               for tensor in config.kv_cache_tensors}
    stages = sorted(tensors.values(), key=lambda tensor: extract_layer_index(tensor.shared_by[0]))
    (group,) = configs[0].kv_cache_groups
    layer_names = [name for tensor in stages for name in tensor.shared_by]
    return KVCacheConfig(
        num_blocks=configs[0].num_blocks,
        kv_cache_tensors=[dataclasses.replace(tensor, shared_by=list(tensor.shared_by))
                          for tensor in stages],
        kv_cache_groups=[dataclasses.replace(group, layer_names=layer_names)])


def layout_problems(config: KVCacheConfig) -> list[str]:
    """Why vLLM's layout cannot be paged (empty when it can)."""
    if len(config.kv_cache_groups) != 1:
        return [f"{len(config.kv_cache_groups)} KV cache groups (sliding-window or hybrid "
                "model); only dense full-attention models are supported"]
    group = config.kv_cache_groups[0]
    spec = group.kv_cache_spec
    problems = []
    if type(spec) is not FullAttentionSpec or spec.sliding_window is not None \
            or spec.attention_chunk_size is not None:
        problems.append(f"the layers have a {type(spec).__name__}: only dense full attention "
                        "is supported")
    layers = sorted(extract_layer_index(name) for name in group.layer_names)
    if not _consecutive(layers):
        problems.append(f"layer indices {layers} are not consecutive")
    sizes = {tensor.size for tensor in config.kv_cache_tensors}
    if any(len(tensor.shared_by) != 1 or tensor.offset or tensor.block_stride
           for tensor in config.kv_cache_tensors) or len(sizes) != 1 \
            or len(config.kv_cache_tensors) != len(group.layer_names):
        problems.append("the layers do not each own one KV cache tensor of the same size "
                        "(KV sharing across layers, packed layouts)")
    return problems


def is_paged_layout(config: KVCacheConfig) -> bool:
    """Whether ``config`` is :func:`paged_kv_cache_config`'s layout (a worker's) or
    :func:`scheduler_kv_cache_config`'s: tensors of ``num_blocks / BLOCK_ID_FACTOR`` pages per
    layer, each shared by consecutive layers, together every layer of the group (vLLM's own
    layout has ``num_blocks`` pages per layer)."""
    if len(config.kv_cache_groups) != 1 or config.num_blocks % BLOCK_ID_FACTOR:
        return False
    (group,) = config.kv_cache_groups
    full_blocks = config.num_blocks // BLOCK_ID_FACTOR
    page_size = group.kv_cache_spec.page_size_bytes
    names: list[str] = []
    for tensor in config.kv_cache_tensors:
        layers = [extract_layer_index(name) for name in tensor.shared_by]
        if tensor.size != full_blocks * len(layers) * page_size or not _consecutive(layers):
            return False
        names += tensor.shared_by
    return sorted(names) == sorted(group.layer_names)


def _consecutive(layers: list[int]) -> bool:
    """Whether ``layers`` are ``first, first + 1, ...`` (a model's, or a pipeline stage's)."""
    return layers == list(range(layers[0], layers[0] + len(layers)))


def stage_pages(config: KVCacheConfig) -> list[int]:
    """Pages of each pipeline stage's tensor (one entry without pipeline parallelism)."""
    page_size = config.kv_cache_groups[0].kv_cache_spec.page_size_bytes
    return [tensor.size // page_size for tensor in config.kv_cache_tensors]


def stage_layers(config: KVCacheConfig) -> list[int]:
    """Layers of each pipeline stage, in the order of :func:`stage_pages`."""
    return [len(tensor.shared_by) for tensor in config.kv_cache_tensors]


def uses_paged_layout(vllm_config: Any) -> bool:
    """Whether this engine runs ReFreeKV's worker with pruning enabled."""
    from refreekv_vllm.config import RefreeKVConfig
    from refreekv_vllm.offline import WORKER_CLS

    if vllm_config.parallel_config.worker_cls != WORKER_CLS:
        return False
    return RefreeKVConfig.from_additional_config(vllm_config.additional_config).enabled


def install_layout_hook() -> None:
    """Make the engine core hand the paged layout to scheduler and workers of ReFreeKV engines,
    and report the capacity of its pages (vLLM's ``EngineCore._initialize_kv_caches`` calls
    ``get_kv_cache_configs``, ``generate_scheduler_kv_cache_config`` and
    ``get_kv_cache_capacity`` by the names it imported into ``vllm.v1.engine.core``)."""
    from vllm.v1.engine import core

    if getattr(core.get_kv_cache_configs, "refreekv_wrapped", False):
        return
    original = core.get_kv_cache_configs

    @functools.wraps(original)
    def get_kv_cache_configs(vllm_config: Any, *args: Any, **kwargs: Any
                             ) -> list[KVCacheConfig]:
        configs = original(vllm_config, *args, **kwargs)
        if not uses_paged_layout(vllm_config):
            return configs
        return [paged_kv_cache_config(config) for config in configs]

    original_scheduler_config = core.generate_scheduler_kv_cache_config

    @functools.wraps(original_scheduler_config)
    def generate_scheduler_kv_cache_config(configs: list[KVCacheConfig]) -> KVCacheConfig:
        # vLLM gives the scheduler the first worker's layout: under pipeline parallelism that is
        # the first stage's layers only.
        if all(is_paged_layout(config) for config in configs):
            return scheduler_kv_cache_config(configs)
        return original_scheduler_config(configs)

    original_capacity = core.get_kv_cache_capacity

    @functools.wraps(original_capacity)
    def get_kv_cache_capacity(vllm_config: Any, kv_cache_config: KVCacheConfig
                              ) -> tuple[int, float]:
        # What the server reports as its capacity: full blocks of pages (in the scarcest
        # stage), not block ids.
        if uses_paged_layout(vllm_config) and is_paged_layout(kv_cache_config):
            whole_blocks = min(pages // layers for pages, layers in
                               zip(stage_pages(kv_cache_config), stage_layers(kv_cache_config),
                                   strict=True))
            kv_cache_config = dataclasses.replace(kv_cache_config, num_blocks=whole_blocks)
        return original_capacity(vllm_config, kv_cache_config)

    get_kv_cache_configs.refreekv_wrapped = True  # type: ignore[attr-defined]
    core.get_kv_cache_configs = get_kv_cache_configs
    core.generate_scheduler_kv_cache_config = generate_scheduler_kv_cache_config
    core.get_kv_cache_capacity = get_kv_cache_capacity
