"""Every vLLM internal that ReFreeKV overrides or changes at run time, in one registry.

Upgrading vLLM means auditing exactly these hooks. Each :class:`Hook` names the vLLM symbol,
how ReFreeKV changes it, the module of ours that does so, why, and the parameters the change
relies on (positions included: some overrides pass arguments through by position). When the
plugin loads, it compares the installed vLLM with :data:`SUPPORTED_VLLM` and refuses any other
release, naming the hooks that moved in it (:func:`check_vllm_release`).
``tests/test_patches.py`` checks them on every test run.
"""

from __future__ import annotations

import importlib
import inspect
import logging
from dataclasses import dataclass
from typing import Any

logger = logging.getLogger(__name__)

SUPPORTED_VLLM = ("0.26.0",)
"""vLLM releases every hook below was checked against."""

OVERRIDE = "override"  # a method of our subclass (or mixin) calls vLLM's through super()
WRAP = "wrap"  # replaced at run time on a class, an instance or a module; the original is called
CLASS_SWAP = "class swap"  # an object vLLM built gets our subclass as its __class__
CALL = "call"  # a private function or method we call
READ = "read"  # a private attribute we read (set by the class's __init__)


@dataclass(frozen=True)
class Hook:
    symbol: str
    """``module:qualified.name`` in vLLM."""
    kind: str
    where: str
    """The module of ours that makes the change."""
    why: str
    params: tuple[str, ...]
    """The leading parameter names the change relies on, in order (``self`` included)."""
    device: str = "any"
    """"cuda" or "cpu" for symbols that exist on that platform's vLLM build only."""
    keywords: tuple[str, ...] = ()
    """Parameters the change passes by name, wherever they are."""
    attribute: str = ""
    """For READ hooks: the attribute the class's ``__init__`` must assign."""


def _hook(symbol: str, kind: str, where: str, why: str, *params: str, device: str = "any",
          keywords: tuple[str, ...] = (), attribute: str = "") -> Hook:
    return Hook(symbol, kind, where, why, params, device, keywords, attribute)


_SCHED = "vllm.v1.core.sched.scheduler:Scheduler."
_POOL = "vllm.v1.core.block_pool:BlockPool."
_TABLE = "vllm.v1.worker.block_table:MultiGroupBlockTable."
_RUNNER = "vllm.v1.worker.gpu_model_runner:GPUModelRunner."
_SCHEDULER = "refreekv_vllm.core.scheduler"
_PAGED_POOL = "refreekv_vllm.core.paged_block_pool"
_MODEL_RUNNER = "refreekv_vllm.worker.model_runner"
_BLOCK_TABLE = "refreekv_vllm.worker.block_table"
_BACKEND = "refreekv_vllm.attention.backend"
_WORKER = "refreekv_vllm.worker.worker"

HOOKS: tuple[Hook, ...] = (
    # Engine core: the scheduler and its KV cache manager.
    _hook(_SCHED + "__init__", OVERRIDE, _SCHEDULER,
          "adopt the block pool as a paged one, install the cache and prefix-hit caps",
          "self", "vllm_config", "kv_cache_config"),
    _hook(_SCHED + "schedule", OVERRIDE, _SCHEDULER,
          "attach the pages of the blocks handed out to the SchedulerOutput", "self"),
    _hook(_SCHED + "update_from_output", OVERRIDE, _SCHEDULER,
          "apply the cut reports riding on the ModelRunnerOutput before vLLM's bookkeeping",
          "self", "scheduler_output", "model_runner_output"),
    _hook(_SCHED + "add_request", OVERRIDE, _SCHEDULER,
          "count requests that opt out", "self", "request"),
    _hook(_SCHED + "_preempt_request", OVERRIDE, _SCHEDULER,
          "a preempted request is recomputed with its full KV and never pruned again",
          "self", "request", "timestamp"),
    _hook(_SCHED + "_free_request", OVERRIDE, _SCHEDULER,
          "forget a finished request's cut state", "self", "request", "delay_free_blocks"),
    _hook("vllm.v1.core.kv_cache_coordinator:KVCacheCoordinator.cache_blocks", WRAP, _SCHEDULER,
          "never publish to the prefix cache blocks written after a request was pruned",
          "self", "request", "num_computed_tokens"),
    _hook("vllm.v1.core.kv_cache_manager:KVCacheManager.get_computed_blocks", WRAP, _SCHEDULER,
          "shorten prefix hits so that a pruned request's observation window is computed",
          "self", "request"),
    _hook("vllm.v1.core.kv_cache_manager:KVCacheManager.free", WRAP, _SCHEDULER,
          "withdraw a request's pruned layers from shared blocks before vLLM frees them",
          "self", "request"),
    _hook("vllm.v1.core.block_pool:BlockPool", CLASS_SWAP, _PAGED_POOL,
          "blocks hold one page per layer; freed pages count as free memory", "self",
          "num_gpu_blocks", "enable_caching", "hash_block_size"),
    _hook(_POOL + "get_new_blocks", OVERRIDE, _PAGED_POOL, "give new blocks their pages",
          "self", "num_blocks"),
    _hook(_POOL + "touch", OVERRIDE, _PAGED_POOL,
          "a prefix hit on a free block keeps the pages it holds", "self", "blocks"),
    _hook(_POOL + "free_blocks", OVERRIDE, _PAGED_POOL,
          "free blocks keep their pages only as whole prefix-cache entries",
          "self", "ordered_blocks"),
    _hook(_POOL + "get_num_free_blocks", OVERRIDE, _PAGED_POOL,
          "admission sees the memory pruning freed", "self"),
    _hook(_POOL + "get_usage", OVERRIDE, _PAGED_POOL,
          "vllm:kv_cache_usage_perc counts pages", "self"),
    _hook(_POOL + "reset_prefix_cache", OVERRIDE, _PAGED_POOL,
          "cached free blocks give their pages back", "self"),
    _hook(_POOL + "_maybe_evict_cached_block", CALL, _PAGED_POOL,
          "a block that lost a layer's page can no longer be a prefix hit", "self", "block"),
    _hook("vllm.v1.engine.core:get_kv_cache_configs", WRAP, "refreekv_vllm.core.kv_cache_layout",
          "one KV cache tensor of per-layer pages instead of one tensor per layer",
          "vllm_config", "kv_cache_specs", "available_memory"),
    _hook("vllm.v1.engine.core:generate_scheduler_kv_cache_config", WRAP,
          "refreekv_vllm.core.kv_cache_layout",
          "under pipeline parallelism the scheduler's pool needs every stage's pages, not the "
          "first worker's", "kv_cache_configs"),
    _hook("vllm.v1.engine.core:get_kv_cache_capacity", WRAP,
          "refreekv_vllm.core.kv_cache_layout",
          "the capacity the server reports counts whole blocks of pages, not block ids",
          "vllm_config", "kv_cache_config"),
    _hook("vllm.engine.arg_utils:EngineArgs.create_engine_config", WRAP,
          "refreekv_vllm.entrypoints.engine_args",
          "a refreekv section in --additional-config sets the scheduler, worker and runner",
          "self"),
    _hook("vllm.v1.engine.core_client:AsyncMPClient._call_utility_async", CALL,
          "refreekv_vllm.entrypoints.endpoints",
          "with data parallelism, ask every engine for its per-request records",
          "self", "method", keywords=("engine",)),
    _hook("vllm.v1.engine.input_processor:InputProcessor._validate_params", WRAP,
          "refreekv_vllm.entrypoints.validation",
          "reject bad per-request refreekv_* settings with a readable error",
          "self", "params", "supported_tasks"),
    # Worker: the model runner and its persistent batch.
    _hook(_RUNNER + "get_kv_cache_spec", OVERRIDE, _MODEL_RUNNER,
          "refuse layers that are not dense full attention", "self"),
    _hook(_RUNNER + "initialize_kv_cache", OVERRIDE, _MODEL_RUNNER,
          "build the per-layer tables over vLLM's block table", "self", "kv_cache_config",
          "is_profiling"),
    _hook("vllm.v1.worker.cpu_model_runner:CPUModelRunner.initialize_kv_cache", OVERRIDE,
          _MODEL_RUNNER, "the same on the CPU backend", "self", "kv_cache_config",
          "is_profiling", device="cpu"),
    _hook(_RUNNER + "_update_states", OVERRIDE, _MODEL_RUNNER,
          "mirror page rows, forget finished requests, commit finished scoring",
          "self", "scheduler_output"),
    _hook(_RUNNER + "_prepare_inputs", OVERRIDE, _MODEL_RUNNER,
          "plan which requests' windows are captured and scored in the step",
          "self", "scheduler_output", "num_scheduled_tokens"),
    _hook(_RUNNER + "_determine_batch_execution_and_padding", OVERRIDE, _MODEL_RUNNER,
          "scoring steps run attention eagerly (use_cascade_attn, passed by position)",
          "self", "num_tokens", "num_reqs", "num_scheduled_tokens_np",
          "max_num_scheduled_tokens", "use_cascade_attn"),
    _hook(_RUNNER + "_sample", OVERRIDE, _MODEL_RUNNER,
          "CPU generators of discarded prompt chunks are rewound by state",
          "self", "logits", "spec_decode_metadata"),
    _hook(_RUNNER + "_bookkeeping_sync", OVERRIDE, _MODEL_RUNNER,
          "vLLM's own rewind skips those generators", "self", "scheduler_output"),
    _hook(_RUNNER + "execute_model", OVERRIDE, _MODEL_RUNNER,
          "a pipeline stage before the last sends its cut parts on in the intermediate "
          "tensors", "self", "scheduler_output", "intermediate_tensors"),
    _hook(_RUNNER + "sync_and_gather_intermediate_tensors", OVERRIDE, _MODEL_RUNNER,
          "a later pipeline stage takes the earlier stages' cut parts out of what they sent "
          "before the model sees it", "self", "num_tokens", "intermediate_tensors", "sync_self"),
    _hook(_RUNNER + "sample_tokens", OVERRIDE, _MODEL_RUNNER,
          "queue the step's cuts and attach the cut reports", "self", "grammar_output"),
    _hook("vllm.v1.worker.gpu_model_runner:AsyncGPUModelRunnerOutput", READ,
          "refreekv_vllm.patches.async_output",
          "under async scheduling the cut reports go on the ModelRunnerOutput it wraps",
          "self", "model_runner_output", attribute="_model_runner_output"),
    _hook("vllm.v1.worker.block_table:MultiGroupBlockTable", CLASS_SWAP, _BLOCK_TABLE,
          "the gap rows follow every row edit of vLLM's persistent batch", "self"),
    _hook(_TABLE + "add_row", OVERRIDE, _BLOCK_TABLE, "a new row has no gap",
          "self", "block_ids", "row_idx"),
    _hook(_TABLE + "clear_row", OVERRIDE, _BLOCK_TABLE, "a cleared row has no gap",
          "self", "row_idx"),
    _hook(_TABLE + "move_row", OVERRIDE, _BLOCK_TABLE, "the gap moves with its row",
          "self", "src", "tgt"),
    _hook(_TABLE + "swap_row", OVERRIDE, _BLOCK_TABLE, "the gaps swap with their rows",
          "self", "src", "tgt"),
    _hook(_TABLE + "commit_block_table", OVERRIDE, _BLOCK_TABLE,
          "upload the gap rows with the block table", "self", "num_reqs"),
    _hook("vllm.v1.worker.gpu_model_runner:GPUModelRunner", CLASS_SWAP, _WORKER,
          "the worker's model runner gets the ReFreeKV mixin (CPUModelRunner derives from it)",
          "self", "vllm_config", "device"),
    _hook("vllm.v1.worker.gpu_worker:Worker.__init__", OVERRIDE, _WORKER,
          "read the refreekv section of the additional config", "self"),
    _hook("vllm.v1.worker.gpu_worker:Worker.init_device", OVERRIDE, _WORKER,
          "swap the model runner's class", "self"),
    _hook("vllm.v1.worker.cpu_worker:CPUWorker.init_device", OVERRIDE, _WORKER,
          "the same on the CPU backend", "self", device="cpu"),
    _hook("vllm.v1.worker.gpu_worker:Worker.load_model", OVERRIDE, _WORKER,
          "attention layers pick ReFreeKV's backends while the model is built", "self"),
    _hook("vllm.v1.worker.gpu_worker:Worker.shutdown", OVERRIDE, _WORKER,
          "drop the process-wide step state", "self"),
    _hook("vllm.v1.attention.selector:_cached_get_attn_backend", CALL,
          "refreekv_vllm.patches.attention_backends",
          "forget backends selected before ours were registered", "backend"),
    # Attention.
    _hook("vllm.v1.attention.backends.flash_attn:FlashAttentionImpl.forward", OVERRIDE,
          _BACKEND, "each layer attends over its own pages, without its gap; window capture",
          "self", "layer", "query", "key", "value", "kv_cache", "attn_metadata", "output",
          device="cuda"),
    _hook("vllm.v1.attention.backends.flash_attn:FlashAttentionImpl.do_kv_cache_update",
          OVERRIDE, _BACKEND, "each layer writes its KV to its own pages",
          "self", "layer", "key", "value", "kv_cache", "slot_mapping", device="cuda"),
    _hook("vllm.v1.attention.backends.flash_attn:flash_attn_varlen_func", WRAP,
          "refreekv_vllm.attention.prefill_lse",
          "scoring steps keep the softmax normaliser the prefill computes anyway",
          "q", "k", "v", device="cuda", keywords=("return_softmax_lse",)),
    _hook("vllm.v1.attention.backends.cpu_attn:CPUAttentionBackendImpl.forward", OVERRIDE,
          _BACKEND, "as FlashAttentionImpl.forward, on the CPU backend",
          "self", "layer", "query", "key", "value", "kv_cache", "attn_metadata", "output",
          device="cpu"),
    _hook("vllm.v1.attention.backends.cpu_attn:CPUAttentionBackendImpl.do_kv_cache_update",
          OVERRIDE, _BACKEND, "as FlashAttentionImpl.do_kv_cache_update, on the CPU backend",
          "self", "layer", "key", "value", "kv_cache", "slot_mapping", device="cpu"),
    _hook("vllm._custom_ops:cpu_attn_get_scheduler_metadata", CALL,
          "refreekv_vllm.patches.cpu_attention",
          "a layer whose lengths its gaps shortened gets the CPU kernel's plan for them",
          device="cpu", keywords=("num_reqs", "num_heads", "num_kv_heads", "head_dim",
                                  "seq_lens", "dtype", "query_start_loc", "causal",
                                  "sliding_window_size", "isa", "enable_kv_split",
                                  "dynamic_causal")),
)


def resolve(symbol: str) -> Any:
    """The object ``module:qualified.name`` names (imports the module)."""
    module_name, _, qualname = symbol.partition(":")
    target: Any = importlib.import_module(module_name)
    for part in qualname.split("."):
        target = getattr(target, part)
    return target


def hook_problems(device: str, hooks: tuple[Hook, ...] = HOOKS) -> list[str]:
    """What no longer matches in the installed vLLM, one line per hook, for the hooks that
    exist on ``device`` ("cuda" or "cpu")."""
    problems = []
    for hook in hooks:
        if hook.device not in ("any", device):
            continue
        try:
            target = resolve(hook.symbol)
        except (ImportError, AttributeError) as exc:
            problems.append(f"{hook.symbol} ({hook.kind} in {hook.where}): missing ({exc})")
            continue
        function = (inspect.getattr_static(target, "__init__") if isinstance(target, type)
                    else target)
        try:
            names = tuple(inspect.signature(function).parameters)
        except (TypeError, ValueError):
            names = ()
        if names[:len(hook.params)] != hook.params:
            problems.append(f"{hook.symbol} ({hook.kind} in {hook.where}): expected parameters "
                            f"{hook.params}, found {names[:len(hook.params)] or names}")
        missing = [name for name in hook.keywords if name not in names]
        if missing:
            problems.append(f"{hook.symbol} ({hook.kind} in {hook.where}): no parameter "
                            f"{', '.join(missing)}")
        if hook.attribute and not _assigns(function, hook.attribute):
            problems.append(f"{hook.symbol} ({hook.kind} in {hook.where}): __init__ no longer "
                            f"sets {hook.attribute}")
    return problems


def _assigns(function: Any, attribute: str) -> bool:
    try:
        source = inspect.getsource(function)
    except (OSError, TypeError):
        return False
    return f"self.{attribute} =" in source


def check_vllm_release(version: str, device: str | None = None, hooks: tuple[Hook, ...] = HOOKS,
                       allow_unverified: bool = False) -> None:
    """At startup: refuse a vLLM release other than :data:`SUPPORTED_VLLM`, naming the hooks
    that moved in it (a hook that silently no longer fits could corrupt the KV cache). With
    ``allow_unverified`` a release whose hooks all still match starts, with a warning.
    ``device`` ("cuda" or "cpu") defaults to vLLM's platform, resolved only for another
    release (the plugin calls this in every process)."""
    if version in SUPPORTED_VLLM:
        return
    if device is None:
        from vllm.platforms import current_platform

        device = current_platform.device_type
    supported = ", ".join(SUPPORTED_VLLM)
    problems = hook_problems(device, hooks)
    if problems:
        raise RuntimeError(
            f"refreekv-vllm supports vLLM {supported}; vLLM {version} changed what these hooks "
            "rely on (refreekv_vllm/patches):\n" + "\n".join(f"  - {p}" for p in problems))
    if not allow_unverified:
        raise RuntimeError(
            f"refreekv-vllm supports vLLM {supported}; vLLM {version} was not verified (every "
            "hook's signature still matches: set REFREEKV_ALLOW_UNVERIFIED_VLLM=1 to try it, "
            f"or install vllm=={SUPPORTED_VLLM[-1]})")
    logger.warning("refreekv-vllm was verified on vLLM %s, not %s; every hook's signature "
                   "still matches (REFREEKV_ALLOW_UNVERIFIED_VLLM=1)", supported, version)
