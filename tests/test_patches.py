"""The hook registry (``refreekv_vllm/patches``) against the installed vLLM: every hook still
has the parameters it relies on, every method ReFreeKV overrides is registered, and a release
whose internals moved is refused at startup with the hook named."""

import dataclasses
import inspect

import pytest
import torch

from refreekv_vllm.patches import (
    HOOKS,
    OVERRIDE,
    check_vllm_release,
    hook_problems,
    resolve,
)

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def test_every_hook_matches_the_installed_vllm():
    assert hook_problems(DEVICE) == []


def _our_overrides() -> dict[str, set[str]]:
    """vLLM class -> the methods of it that a ReFreeKV class defines again."""
    from vllm.v1.core.block_pool import BlockPool
    from vllm.v1.core.sched.scheduler import Scheduler
    from vllm.v1.worker.block_table import MultiGroupBlockTable
    from vllm.v1.worker.gpu_model_runner import GPUModelRunner
    from vllm.v1.worker.gpu_worker import Worker

    from refreekv_vllm.attention import backend
    from refreekv_vllm.core.paged_block_pool import PagedBlockPool
    from refreekv_vllm.core.scheduler import RefreeKVSchedulerMixin
    from refreekv_vllm.worker.block_table import GapMirroringBlockTable
    from refreekv_vllm.worker.model_runner import RefreeKVModelRunnerMixin
    from refreekv_vllm.worker.worker import RefreeKVWorkerMixin

    pairs = [(RefreeKVSchedulerMixin, Scheduler), (PagedBlockPool, BlockPool),
             (GapMirroringBlockTable, MultiGroupBlockTable),
             (RefreeKVModelRunnerMixin, GPUModelRunner), (RefreeKVWorkerMixin, Worker)]
    # The attention impl of this platform's backend (built on first use).
    name = "RefreeKVFlashAttentionBackend" if DEVICE == "cuda" else "RefreeKVCPUAttentionBackend"
    impl = getattr(backend, name).get_impl_cls()
    pairs.append((impl, impl.__mro__[1]))
    overrides = {}
    for ours, theirs in pairs:
        key = f"{theirs.__module__}:{theirs.__qualname__}"
        overrides[key] = {name for name, value in vars(ours).items()
                          if inspect.isfunction(value) and hasattr(theirs, name)}
    return overrides


def test_every_override_is_registered():
    registered = {hook.symbol for hook in HOOKS if hook.kind == OVERRIDE}
    missing = [f"{owner}.{name}" for owner, names in _our_overrides().items()
               for name in sorted(names) if f"{owner}.{name}" not in registered]
    assert not missing, f"overrides missing from refreekv_vllm/patches: {missing}"


def test_registered_symbols_resolve_and_say_why():
    for hook in HOOKS:
        assert hook.why and hook.where.startswith("refreekv_vllm."), hook
        if hook.device in ("any", DEVICE):
            assert resolve(hook.symbol) is not None


def test_a_moved_hook_is_named():
    scheduler_free = next(h for h in HOOKS if h.symbol.endswith("Scheduler._free_request"))
    renamed = dataclasses.replace(scheduler_free, params=("self", "req"))
    gone = dataclasses.replace(scheduler_free, symbol="vllm.v1.core.sched.scheduler:Gone.x")
    keyword = dataclasses.replace(scheduler_free, params=("self",), keywords=("no_such_arg",))
    read = next(h for h in HOOKS if h.attribute)
    unset = dataclasses.replace(read, attribute="_no_such_attribute")
    problems = hook_problems(DEVICE, (renamed, gone, keyword, read, unset))
    assert len(problems) == 4
    assert "expected parameters ('self', 'req')" in problems[0]
    assert "Gone.x" in problems[1] and "missing" in problems[1]
    assert "no parameter no_such_arg" in problems[2]
    assert "no longer sets _no_such_attribute" in problems[3]


def test_an_unverified_release_is_refused_naming_moved_hooks():
    hook = next(h for h in HOOKS if h.symbol.endswith("Scheduler._free_request"))
    moved = dataclasses.replace(hook, params=("self", "req"))
    with pytest.raises(RuntimeError, match=r"(?s)vLLM 99\.0\.0 changed.*Scheduler\._free_request"):
        check_vllm_release("99.0.0", DEVICE, (moved,), allow_unverified=True)
    with pytest.raises(RuntimeError, match="REFREEKV_ALLOW_UNVERIFIED_VLLM=1"):
        check_vllm_release("99.0.0", DEVICE, (hook,))
    check_vllm_release("99.0.0", DEVICE, (hook,), allow_unverified=True)  # a warning
    check_vllm_release("0.26.0", DEVICE, (moved,))  # the verified release is not re-checked
