"""The reference cut rule (policy/reference.py) against docs/method.md §3 and independent math."""

import pytest
import torch

from refreekv_vllm.policy.reference import (
    cut_from_probs,
    layer_cut,
    request_cuts,
    window_probs,
)

# docs/method.md §3: two heads, n = 12, m = 4, T = 0.01.
ROWS = torch.tensor(
    [
        [0.40, 0.05, 0.02, 0.01, 0.004, 0.006, 0.010, 0.010, 0.030, 0.060, 0.150, 0.250],
        [0.30, 0.10, 0.05, 0.05, 0.002, 0.003, 0.005, 0.040, 0.050, 0.100, 0.150, 0.150],
    ],
    dtype=torch.float64,
)
KEPT = [0.271385, 0.271367, 0.271328, 0.271219, 0.269479, 0.266089, 0.251840, 0.200000]
RATIO = [0, 0.000064, 0.000209, 0.000612, 0.007024, 0.019513, 0.072019, 0.263039]


def test_method_test_vector():
    cut, ratio = cut_from_probs(ROWS, num_sink_tokens=4, threshold=0.01)
    assert cut == 8  # j* = 4, kept = {0..3} ∪ {8..11}
    torch.testing.assert_close(ratio, torch.tensor(RATIO, dtype=torch.float64), atol=1e-5, rtol=0)
    kept = (1 - ratio) * torch.tensor(KEPT[0], dtype=torch.float64)
    torch.testing.assert_close(kept, torch.tensor(KEPT, dtype=torch.float64), atol=1e-5, rtol=0)


def test_sinks_inside_the_norms_would_change_the_answer():
    """Keeping the sinks' mass in both norms (Eq. (1) read literally) gives j* = 5, not 4."""
    m = 4
    tail = ROWS[:, m:].square().flip(-1).cumsum(-1).flip(-1)
    with_sinks = (tail + ROWS[:, :m].square().sum(-1, keepdim=True)).sqrt().mean(0)
    ratio = (with_sinks[0] - with_sinks) / with_sinks[0]
    assert int(torch.nonzero(ratio <= 0.01).max()) == 5
    assert cut_from_probs(ROWS, num_sink_tokens=m, threshold=0.01)[0] == m + 4


def _full_causal_rows(query, keys, scale):
    """Rows n-w..n-1 of the full [n, n] causal attention matrix, computed independently."""
    w, hq, d = query.shape
    hkv, n, _ = keys.shape
    group = hq // hkv
    out = torch.zeros(hq, w, n, dtype=torch.float64)
    for h in range(hq):
        k = keys[h // group].double()
        full_q = torch.randn(n, d, dtype=torch.float64)  # rows < n - w are irrelevant
        full_q[n - w :] = query[:, h].double()
        logits = full_q @ k.T * scale
        mask = torch.triu(torch.ones(n, n, dtype=torch.bool), diagonal=1)
        attn = torch.softmax(logits.masked_fill(mask, float("-inf")), dim=-1)
        out[h] = attn[n - w :]
    return out


@pytest.mark.parametrize("w", [1, 3, 8])
@pytest.mark.parametrize("group", [1, 4])
def test_window_rows_equal_full_causal_attention(w, group):
    gen = torch.Generator().manual_seed(w * 10 + group)
    hkv, n, d = 2, 23, 16
    query = torch.randn(w, hkv * group, d, generator=gen, dtype=torch.float64)
    keys = torch.randn(hkv, n, d, generator=gen, dtype=torch.float64)
    rows = _full_causal_rows(query, keys, d**-0.5)
    torch.testing.assert_close(window_probs(query, keys, agg="max"), rows.amax(dim=1))
    torch.testing.assert_close(window_probs(query, keys, agg="mean"), rows.mean(dim=1))


def test_window_longer_than_prompt_uses_the_last_n_rows():
    gen = torch.Generator().manual_seed(1)
    query = torch.randn(9, 2, 8, generator=gen, dtype=torch.float64)
    keys = torch.randn(1, 5, 8, generator=gen, dtype=torch.float64)
    torch.testing.assert_close(
        window_probs(query, keys, agg="mean"), window_probs(query[-5:], keys, agg="mean")
    )


def test_single_row_query_shapes_and_aggregations_agree():
    gen = torch.Generator().manual_seed(2)
    q = torch.randn(4, 16, generator=gen, dtype=torch.float64)
    keys = torch.randn(2, 30, 16, generator=gen, dtype=torch.float64)
    a = layer_cut(q, keys, agg="max")
    b = layer_cut(q[None], keys, agg="mean")
    assert a[0] == b[0]
    torch.testing.assert_close(a[1], b[1])


def test_matches_method_pseudo_code():
    """docs/method.md §2, transcribed, on random inputs (w = 1)."""
    gen = torch.Generator().manual_seed(3)
    for _ in range(20):
        n = int(torch.randint(6, 80, (1,), generator=gen))
        q = torch.randn(8, 32, generator=gen, dtype=torch.float64) * 2
        keys = torch.randn(2, n, 32, generator=gen, dtype=torch.float64)
        k = keys.repeat_interleave(4, dim=0)
        probs = torch.softmax(torch.einsum("hd,hnd->hn", q, k) * 32**-0.5, dim=-1)
        kept = probs[:, 4:].square().flip(-1).cumsum(-1).flip(-1).sqrt().mean(dim=0)
        ok = (kept[0] - kept) <= 0.01 * kept[0]
        expected = 4 + int(torch.nonzero(ok).max())
        assert layer_cut(q, keys)[0] == expected


def _random_case(gen, n, hq=4, hkv=2, d=16, w=1):
    # A drift along one direction makes attention favour recent keys, so cuts vary.
    u = torch.randn(d, generator=gen, dtype=torch.float64)
    drift = torch.linspace(0, float(torch.rand(1, generator=gen)) * 6, n, dtype=torch.float64)
    keys = torch.randn(hkv, n, d, generator=gen, dtype=torch.float64) + drift[None, :, None] * u
    query = torch.randn(w, hq, d, generator=gen, dtype=torch.float64) + u
    return query, keys


def test_properties_on_random_inputs():
    gen = torch.Generator().manual_seed(4)
    thresholds = [0.0, 1e-4, 1e-3, 0.01, 0.05, 0.2, 0.9]
    for trial in range(40):
        n = int(torch.randint(1, 120, (1,), generator=gen))
        w = [1, 4, 16][trial % 3]
        query, keys = _random_case(gen, n, w=w)
        agg = "max" if trial % 2 else "mean"
        cuts = [layer_cut(query, keys, threshold=t, agg=agg)[0] for t in thresholds]
        assert cuts[0] == 4  # T = 0 prunes nothing
        assert cuts == sorted(cuts)  # non-decreasing in T
        for c in cuts:
            if n <= 5:
                assert c == 4
            else:
                assert 4 <= c <= n - 1  # sinks and the last token are always kept
        _, ratio = layer_cut(query, keys, agg=agg)
        assert ratio.numel() == max(n - 4, 0)
        if ratio.numel():
            assert ratio[0] == 0
            assert bool((ratio.diff() >= -1e-12).all())  # monotone


def test_results_invariant_to_kv_head_order():
    gen = torch.Generator().manual_seed(5)
    query, keys = _random_case(gen, 60, hq=8, hkv=2, w=4)
    perm_q = torch.cat([query[:, 4:], query[:, :4]], dim=1)
    perm_k = keys.flip(0)
    a = layer_cut(query, keys, threshold=0.05)
    b = layer_cut(perm_q, perm_k, threshold=0.05)
    assert a[0] == b[0]
    torch.testing.assert_close(a[1], b[1])


def test_request_cuts_freezes_layers():
    gen = torch.Generator().manual_seed(6)
    layers = [_random_case(gen, 50) for _ in range(4)]
    cuts = request_cuts(layers, threshold=0.5)
    assert cuts[:2] == [4, 4]
    assert cuts[2:] == [layer_cut(q, k, threshold=0.5)[0] for q, k in layers[2:]]
    assert any(c > 4 for c in cuts[2:])
    assert request_cuts(layers, frozen_layers=(), threshold=0.5)[0] == layer_cut(
        *layers[0], threshold=0.5
    )[0]


def test_short_prompts_and_bad_arguments():
    q = torch.randn(2, 8, dtype=torch.float64)
    for n in range(1, 6):
        cut, ratio = layer_cut(q, torch.randn(1, n, 8, dtype=torch.float64), threshold=0.9)
        assert cut == 4
        assert ratio.numel() == max(n - 4, 0)
    with pytest.raises(ValueError, match="agg must be one of"):
        layer_cut(q, torch.randn(1, 9, 8), agg="sum")
    with pytest.raises(ValueError, match="bad shapes"):
        layer_cut(torch.randn(3, 8), torch.randn(2, 9, 8))


def test_every_head_rule_on_the_method_vector():
    """head_agg = "max" on docs/method.md §3's rows: each head's own norm, by hand."""
    norms = ROWS[:, 4:].square().flip(-1).cumsum(-1).flip(-1).sqrt()
    drops = (norms[:, :1] - norms) / norms[:, :1]
    # Head 0 keeps its norm within 1% up to j = 5, head 1 up to j = 3: the stricter one wins
    # (the mean of the two norms allows j = 4).
    assert [int(torch.nonzero(d <= 0.01).max()) for d in drops] == [5, 3]
    cut, ratio = cut_from_probs(ROWS, num_sink_tokens=4, threshold=0.01, head_agg="max")
    assert cut == 4 + 3
    torch.testing.assert_close(ratio, drops.amax(dim=0))


def test_every_head_rule_matches_a_loop_over_heads_and_keeps_more():
    gen = torch.Generator().manual_seed(6)
    for trial in range(40):
        n = int(torch.randint(1, 150, (1,), generator=gen))
        query, keys = _random_case(gen, n, hq=8, hkv=2, w=[1, 8][trial % 2])
        threshold = [0.0, 0.005, 0.01, 0.05][trial % 4]
        probs = window_probs(query, keys, agg="max")
        per_head = [cut_from_probs(probs[h:h + 1], num_sink_tokens=4, threshold=threshold)[0]
                    for h in range(probs.shape[0])]
        cut = layer_cut(query, keys, threshold=threshold, agg="max", head_agg="max")[0]
        assert cut == min(per_head)  # one head alone is the mean rule over one head
        # Every head within T puts their mean within T: never a later cut than the mean rule.
        assert cut <= layer_cut(query, keys, threshold=threshold, agg="max")[0]
        assert 4 <= cut <= max(4, n - 1)
        if threshold == 0.0:
            assert cut == 4


def test_unknown_head_aggregation_is_refused():
    with pytest.raises(ValueError, match="head_agg"):
        cut_from_probs(ROWS, head_agg="median")
