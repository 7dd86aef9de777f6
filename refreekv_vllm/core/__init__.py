"""Engine-core side of ReFreeKV: the per-layer page layout and pool, cut state, and the scheduler
that drives them.

``kv_cache_layout`` (the paged layout) and ``support`` (startup checks) are shared with the
worker.
"""
