"""CPU_ATTN key reads (ops/cpu_keys.py) against vLLM's own cache-write op."""

import pytest
import torch

from benchmarks.kernels import paged_cases
from benchmarks.kernels.paged_cases import load_triton_kernels
from refreekv_vllm.ops import compute_cuts
from refreekv_vllm.ops.cpu_keys import gather_cpu_attn_keys, key_view_from_cpu_attn_kv_cache
from refreekv_vllm.policy.reference import layer_cut

HAS_TRITON = load_triton_kernels()

try:
    import vllm._custom_ops as vllm_ops

    _CPU_OPS = hasattr(torch.ops._C, "cpu_attn_reshape_and_cache")
    _SKIP = None if _CPU_OPS else "this vLLM build has no CPU attention ops (GPU wheel)"
except ImportError:
    _SKIP = "vllm is not importable"
needs_vllm_cpu = pytest.mark.skipif(_SKIP is not None, reason=_SKIP or "")

# (isa, block_size, head_size, dtype): 'vec' needs block_size % 32 == 0; head sizes that are
# not multiples of 32 select 'vec16' in vLLM.
LAYOUTS = [
    ("vec", 32, 64, torch.float32),
    ("vec", 64, 128, torch.bfloat16),
    ("vec16", 16, 64, torch.float16),
    ("vec16", 16, 48, torch.bfloat16),
]


def _filled_cache(isa, bs, d, dtype, lens, hkv=2, seed=0):
    """Writes random keys for each request with vLLM's op; returns (kv, block table, keys)."""
    gen = torch.Generator().manual_seed(seed)
    blocks = [-(-n // bs) for n in lens]
    nb = sum(blocks) + 2
    kv = torch.zeros(nb, hkv, bs, 2 * d, dtype=dtype)
    key_cache, value_cache = kv.view(nb, hkv, 2 * bs, d).chunk(2, dim=2)
    perm = torch.randperm(nb, generator=gen)
    table = torch.zeros(len(lens), max(blocks), dtype=torch.int32)
    dense = []
    used = 0
    for i, n in enumerate(lens):
        ids = perm[used : used + blocks[i]]
        used += blocks[i]
        table[i, : len(ids)] = ids.to(torch.int32)
        pos = torch.arange(n)
        slots = ids[pos // bs] * bs + pos % bs
        keys = torch.randn(n, hkv, d, generator=gen).to(dtype)
        values = torch.randn(n, hkv, d, generator=gen).to(dtype)
        vllm_ops.cpu_attn_reshape_and_cache(keys, values, key_cache, value_cache, slots, isa)
        dense.append(keys.transpose(0, 1))  # [Hkv, n, d]
    return kv, table, dense


@needs_vllm_cpu
@pytest.mark.parametrize(("isa", "bs", "d", "dtype"), LAYOUTS)
def test_round_trip_through_vllm_cache_write(isa, bs, d, dtype):
    lens = [bs * 2 + 5, 1, bs]
    kv, table, dense = _filled_cache(isa, bs, d, dtype, lens)
    view = key_view_from_cpu_attn_kv_cache(kv, isa)
    assert view.shape == (kv.shape[0], bs, 2, d)
    assert view.data_ptr() == kv.data_ptr()
    for i, n in enumerate(lens):
        got = gather_cpu_attn_keys(kv, table[i], n, isa)
        torch.testing.assert_close(got, dense[i], rtol=0, atol=0)


@needs_vllm_cpu
@pytest.mark.parametrize(
    "backend", ["torch", pytest.param("triton", marks=pytest.mark.skipif(not HAS_TRITON,
                                                                         reason="no Triton"))]
)  # fmt: skip
def test_cuts_read_straight_from_the_cpu_layout(backend):
    isa, bs, d, dtype = "vec", 32, 64, torch.bfloat16
    lens = [90, 40, 5]
    kv, table, dense = _filled_cache(isa, bs, d, dtype, lens, seed=1)
    gen = torch.Generator().manual_seed(2)
    query = torch.randn(3, 4, 4, d, generator=gen).to(dtype)
    windows = torch.tensor([4, 1, 2], dtype=torch.int32)
    thresholds = torch.tensor([0.3, 0.3, 0.3])
    kwargs = dict(num_sink_tokens=4, agg="max", backend=backend)
    if backend == "triton":
        if paged_cases.INTERPRETER_PROBLEM:
            pytest.fail(paged_cases.INTERPRETER_PROBLEM)
        kwargs["chunk_size"] = 32
    cuts = compute_cuts(
        query, key_view_from_cpu_attn_kv_cache(kv, isa), table,
        torch.tensor(lens, dtype=torch.int32), windows, thresholds, **kwargs,
    )  # fmt: skip
    expected = [
        layer_cut(query[i, 4 - int(windows[i]) :].double(), dense[i].double(), threshold=0.3)[0]
        for i in range(3)
    ]
    assert cuts.tolist() == expected
    assert any(c > 4 for c in expected)


def test_refuses_packed_layouts():
    kv = torch.zeros(3, 2, 32, 128, dtype=torch.bfloat16)
    with pytest.raises(ValueError, match="ISA 'amx' is not supported"):
        key_view_from_cpu_attn_kv_cache(kv, "amx")
    with pytest.raises(ValueError, match="unsupported KV cache dtype"):
        key_view_from_cpu_attn_kv_cache(torch.zeros(3, 2, 32, 128, dtype=torch.uint8), "vec")
    with pytest.raises(ValueError, match="contiguous"):
        key_view_from_cpu_attn_kv_cache(kv.transpose(1, 2), "vec")
