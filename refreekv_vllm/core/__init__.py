"""Engine-core side of ReFreeKV: cut state, gap-block release and the scheduler that drives them.

``kv_cache_spec`` (the per-layer spec) and ``support`` (startup checks) are shared with the worker.
"""
