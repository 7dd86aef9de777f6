"""The prefill attention's softmax normaliser: captured from one FlashAttention-style call,
kept per window row across prefill chunks, and dropped whenever any row came without it."""

import types

import torch

from refreekv_vllm.attention.prefill_lse import capturing_softmax_lse
from refreekv_vllm.forward.step_context import WindowCapture, WindowStore

NUM_HEADS, NUM_TOKENS = 4, 6


def _attention_module() -> types.ModuleType:
    """A module with a ``flash_attn_varlen_func`` of FlashAttention's signature and return
    convention: ``out`` alone, or ``(out, lse)`` with ``return_softmax_lse=True``."""
    module = types.ModuleType("attention_under_test")
    module.calls = []

    def flash_attn_varlen_func(q, out, return_softmax_lse=False):
        module.calls.append(return_softmax_lse)
        out.copy_(q * 2)
        lse = q.sum(-1).T.contiguous().float()  # [heads, tokens]
        return (out, lse) if return_softmax_lse else out

    module.flash_attn_varlen_func = flash_attn_varlen_func
    return module


def test_one_call_yields_its_normaliser_and_restores_the_function():
    module = _attention_module()
    original = module.flash_attn_varlen_func
    q = torch.randn(NUM_TOKENS, NUM_HEADS, 3)
    out = torch.empty_like(q)
    with capturing_softmax_lse(module, NUM_HEADS, NUM_TOKENS) as lse:
        returned = module.flash_attn_varlen_func(q=q, out=out)
    assert module.flash_attn_varlen_func is original
    assert module.calls == [True]
    assert returned is out and torch.equal(out, q * 2)  # the caller sees what it always saw
    assert len(lse) == 1 and torch.equal(lse[0], q.sum(-1).T)


def test_calls_that_ask_for_the_normaliser_themselves_capture_nothing():
    """Cascade attention asks for it and calls twice: its results are its own."""
    module = _attention_module()
    q = torch.randn(NUM_TOKENS, NUM_HEADS, 3)
    with capturing_softmax_lse(module, NUM_HEADS, NUM_TOKENS) as lse:
        first = module.flash_attn_varlen_func(q=q, out=torch.empty_like(q),
                                              return_softmax_lse=True)
        module.flash_attn_varlen_func(q=q, out=torch.empty_like(q), return_softmax_lse=True)
    assert isinstance(first, tuple) and lse == []


def test_no_call_two_calls_or_a_wrong_shape_capture_nothing():
    module = _attention_module()
    q = torch.randn(NUM_TOKENS, NUM_HEADS, 3)
    with capturing_softmax_lse(module, NUM_HEADS, NUM_TOKENS) as lse:
        pass
    assert lse == []
    with capturing_softmax_lse(module, NUM_HEADS, NUM_TOKENS) as lse:
        module.flash_attn_varlen_func(q=q, out=torch.empty_like(q))
        module.flash_attn_varlen_func(q=q, out=torch.empty_like(q))
    assert lse == []
    with capturing_softmax_lse(module, NUM_HEADS + 1, NUM_TOKENS) as lse:
        module.flash_attn_varlen_func(q=q, out=torch.empty_like(q))
    assert lse == []


def test_an_exception_still_restores_the_function():
    module = _attention_module()
    original = module.flash_attn_varlen_func
    try:
        with capturing_softmax_lse(module, NUM_HEADS, NUM_TOKENS):
            raise RuntimeError("attention failed")
    except RuntimeError:
        pass
    assert module.flash_attn_varlen_func is original


def _capture(slots: range) -> WindowCapture:
    return WindowCapture(req_id="r", num_prompt_tokens=100, window=4,
                         token_indices=range(len(slots)), window_slots=slots)


LAYERS = (2, 5)


def test_window_normalisers_follow_their_rows_over_chunks():
    store = WindowStore()
    q_early, q_late = torch.randn(2, 3, NUM_HEADS, 8), torch.randn(2, 1, NUM_HEADS, 8)
    lse_early, lse_late = torch.randn(2, 3, NUM_HEADS), torch.randn(2, 1, NUM_HEADS)
    store.put(_capture(range(0, 3)), LAYERS, rows=q_early, lse_rows=lse_early)
    assert store.get("r") is None and store.get_lse("r") is None  # one row still missing
    store.put(_capture(range(3, 4)), LAYERS, rows=q_late, lse_rows=lse_late)
    layers, queries = store.get("r")
    assert layers == LAYERS
    torch.testing.assert_close(queries, torch.cat([q_early, q_late], dim=1))
    torch.testing.assert_close(store.get_lse("r"), torch.cat([lse_early, lse_late], dim=1))
    assert store.get("other") is None


def test_a_chunk_without_normalisers_drops_them_for_the_window():
    store = WindowStore()
    store.put(_capture(range(0, 2)), LAYERS, rows=torch.randn(2, 2, NUM_HEADS, 8),
              lse_rows=torch.randn(2, 2, NUM_HEADS))
    store.put(_capture(range(2, 4)), LAYERS, rows=torch.randn(2, 2, NUM_HEADS, 8),
              lse_rows=None)
    assert store.get("r") is not None
    assert store.get_lse("r") is None
    store.drop("r")
    assert store.get("r") is None


def test_normalisers_are_kept_only_for_plain_softmax_attention():
    """Soft-capping, ALiBi and sinks change FlashAttention's normaliser, not the scorer's logits."""
    from refreekv_vllm.attention.backend import _plain_softmax

    plain = types.SimpleNamespace(logits_soft_cap=0, alibi_slopes=None, sinks=None)
    assert _plain_softmax(plain)
    assert not _plain_softmax(types.SimpleNamespace(**{**vars(plain), "logits_soft_cap": 30.0}))
    assert not _plain_softmax(types.SimpleNamespace(**{**vars(plain),
                                                       "alibi_slopes": torch.ones(4)}))
    assert not _plain_softmax(types.SimpleNamespace(**{**vars(plain), "sinks": torch.ones(4)}))
