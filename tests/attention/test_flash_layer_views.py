"""FlashAttention 3 over a layer's view (pages without the gap, shortened lengths) with the
scheduler metadata vLLM computed from the logical lengths, as every layer shares it in
ReFreeKV: its output must equal attention over the kept keys computed from scratch
(``attention/backend.py::_layer_metadata``). GPU only."""

import pytest
import torch

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")]

BLOCK_SIZE, HEADS_Q, HEADS_KV, HEAD_SIZE = 16, 8, 2, 128


def _attention_reference(q, keys, values, scale):
    """q: [Hq, D]; keys/values: [n, Hkv, D] -> [Hq, D] (one decode query)."""
    group = HEADS_Q // HEADS_KV
    k = keys.repeat_interleave(group, dim=1).transpose(0, 1).float()  # [Hq, n, D]
    v = values.repeat_interleave(group, dim=1).transpose(0, 1).float()
    p = torch.softmax((q.float()[:, None, :] * k).sum(-1) * scale, dim=-1)
    return (p[..., None] * v).sum(1)


@pytest.mark.parametrize("num_splits", [0, 32])
def test_shared_schedule_over_shortened_views(num_splits):
    from vllm.vllm_flash_attn import flash_attn_varlen_func, get_scheduler_metadata

    torch.manual_seed(0)
    device = "cuda"
    logical = [3000, 700, 5000, 33, 1500]
    gaps = [(1, 150), (0, 0), (2, 300), (0, 0), (1, 60)]  # whole blocks skipped per request
    num_reqs = len(logical)
    max_blocks = -(-max(logical) // BLOCK_SIZE)
    num_pages = num_reqs * max_blocks + 1
    cache = torch.randn(num_pages, BLOCK_SIZE, HEADS_KV, 2 * HEAD_SIZE, device=device,
                        dtype=torch.bfloat16)
    key_cache, value_cache = cache[..., :HEAD_SIZE], cache[..., HEAD_SIZE:]
    pages = torch.randperm(num_pages - 1, device=device)[:num_reqs * max_blocks] + 1
    logical_table = pages.view(num_reqs, max_blocks).to(torch.int32)
    view_table = torch.zeros_like(logical_table)
    view_lens = []
    for r, (first, end) in enumerate(gaps):
        used = -(-logical[r] // BLOCK_SIZE)
        kept = [i for i in range(used) if not first <= i < end]
        view_table[r, :len(kept)] = logical_table[r, kept]
        view_lens.append(logical[r] - (end - first) * BLOCK_SIZE)
    q = torch.randn(num_reqs, HEADS_Q, HEAD_SIZE, device=device, dtype=torch.bfloat16)
    cu_q = torch.arange(num_reqs + 1, device=device, dtype=torch.int32)
    lens = {name: torch.tensor(values, device=device, dtype=torch.int32)
            for name, values in (("logical", logical), ("view", view_lens))}
    scale = HEAD_SIZE ** -0.5

    def schedule(seq_lens):
        return get_scheduler_metadata(
            batch_size=num_reqs, max_seqlen_q=1, max_seqlen_k=max(logical),
            num_heads_q=HEADS_Q, num_heads_kv=HEADS_KV, headdim=HEAD_SIZE,
            cache_seqlens=seq_lens, qkv_dtype=torch.bfloat16, cu_seqlens_q=cu_q,
            page_size=BLOCK_SIZE, causal=True, window_size=(-1, -1), num_splits=num_splits)

    def attend(scheduler_metadata):
        return flash_attn_varlen_func(
            q=q, k=key_cache, v=value_cache, out=torch.empty_like(q), cu_seqlens_q=cu_q,
            max_seqlen_q=1, seqused_k=lens["view"], max_seqlen_k=max(logical),
            softmax_scale=scale, causal=True, block_table=view_table,
            scheduler_metadata=scheduler_metadata, num_splits=num_splits, fa_version=3)

    shared = attend(schedule(lens["logical"]))  # what ReFreeKV's layers run with
    own = attend(schedule(lens["view"]))
    torch.testing.assert_close(shared, own, atol=2e-3, rtol=2e-3)
    for r in range(num_reqs):
        ids = view_table[r, :-(-view_lens[r] // BLOCK_SIZE)].long()
        keys = key_cache[ids].reshape(-1, HEADS_KV, HEAD_SIZE)[:view_lens[r]]
        values = value_cache[ids].reshape(-1, HEADS_KV, HEAD_SIZE)[:view_lens[r]]
        expected = _attention_reference(q[r], keys, values, scale)
        torch.testing.assert_close(shared[r].float(), expected, atol=2e-2, rtol=2e-2)
