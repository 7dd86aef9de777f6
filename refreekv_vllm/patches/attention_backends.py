"""ReFreeKV's attention backends registered in vLLM's process-global backend registry, for the
time one engine's model is built (registered in ``patches/__init__.py``)."""

import contextlib
from collections.abc import Iterator, Mapping


@contextlib.contextmanager
def registered_attention_backends(paths: Mapping[str, str]) -> Iterator[None]:
    """``paths``: vLLM backend name (``AttentionBackendEnum``) -> our class path. vLLM's
    registry is global to the process: our classes are registered only while this engine's
    model is built, so that a plain engine built later in the same process (``vllm.LLM``
    offline, tests) gets vLLM's own attention and not ours."""
    from vllm.v1.attention.backends.registry import AttentionBackendEnum, register_backend
    from vllm.v1.attention.selector import _cached_get_attn_backend

    members = [AttentionBackendEnum[name] for name in paths]
    previous = {m: m.get_path() if m.is_overridden() else None for m in members}
    for member in members:
        register_backend(member, paths[member.name])
    # vLLM caches its backend choice per process: an engine built earlier in this process
    # would otherwise hand its class to this one, and this one's to a later one.
    _cached_get_attn_backend.cache_clear()
    try:
        yield
    finally:
        for member, path in previous.items():
            if path is None:
                member.clear_override()
            else:
                register_backend(member, path)
        _cached_get_attn_backend.cache_clear()
