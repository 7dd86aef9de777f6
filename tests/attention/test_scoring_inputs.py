"""What the scorer hands the kernel: each request's window queries and their softmax
normalisers, right-aligned and row for row, when the window ran over two prefill chunks and
windows differ between requests. The kernels themselves are checked in tests/ops."""

import pytest
import torch

from refreekv_vllm.attention import scoring
from refreekv_vllm.config import RefreeKVConfig
from refreekv_vllm.forward.step_context import ScoringRow, StepContext, WindowCapture, window_store
from refreekv_vllm.policy.policies import ThresholdPolicy

RULE = ThresholdPolicy(threshold=0.01, window=4, window_agg="mean")

HEADS, HEAD_SIZE, LAYER = 3, 4, 2  # layers 0-1 frozen: layer 2 is the only one scored


def _query(step: int, num_tokens: int) -> torch.Tensor:
    """Token t of step s carries 1000 s + 10 t + h in head h."""
    t = torch.arange(num_tokens, dtype=torch.float32)[:, None, None]
    h = torch.arange(HEADS, dtype=torch.float32)[None, :, None]
    return (1000 * step + 10 * t + h).expand(num_tokens, HEADS, HEAD_SIZE).contiguous()


def _lse(step: int, num_tokens: int) -> torch.Tensor:
    """FlashAttention's layout, ``[heads, tokens]``: 1000 s + 100 t + h."""
    h = torch.arange(HEADS, dtype=torch.float32)[:, None]
    t = torch.arange(num_tokens, dtype=torch.float32)[None, :]
    return 1000 * step + 100 * t + h


@pytest.fixture
def recorded(monkeypatch):
    calls: list[dict] = []

    def record(query, key_cache, block_tables, prompt_lens, window_lens, thresholds, **kwargs):
        calls.append({"query": query.clone(), "window_lens": window_lens.tolist(),
                      "window_lse": kwargs["window_lse"], "backend": kwargs["backend"],
                      "head_agg": kwargs["head_agg"], "thresholds": thresholds.tolist()})
        return torch.full((query.shape[0],), 4, dtype=torch.int32)

    monkeypatch.setattr(scoring, "compute_cuts", record)
    yield calls
    for req_id in ("a", "b"):
        window_store.drop(req_id)


def _steps(with_lse_in_first_chunk: bool = True) -> StepContext:
    """Request a (window 4, 10 prompt tokens): positions 6-7 run in step 1 as tokens 3-4,
    positions 8-9 in step 2 as tokens 0-1. Request b (window 2, 5 tokens): all in step 2,
    its window is tokens 5-6. Both are scored in step 2."""
    config = RefreeKVConfig()
    key_cache = torch.zeros(4, 16, 1, HEAD_SIZE)
    layer_tables = torch.zeros(LAYER + 1, 2, 2, dtype=torch.int32)
    first = StepContext(config=config, kernel="triton", captures=[
        WindowCapture("a", 10, 4, token_indices=range(3, 5), window_slots=range(0, 2))])
    for layer in range(LAYER + 1):
        scoring.capture(first, layer, range(LAYER + 1), _query(1, 5),
                        _lse(1, 5) if with_lse_in_first_chunk else None)
    scoring.end_of_forward(first, key_cache, layer_tables, range(LAYER + 1), 1.0, "triton")
    assert recorded_nothing_yet(first)
    second = StepContext(
        config=config, kernel="triton",
        captures=[WindowCapture("a", 10, 4, token_indices=range(0, 2), window_slots=range(2, 4)),
                  WindowCapture("b", 5, 2, token_indices=range(5, 7), window_slots=range(0, 2))],
        scoring=[ScoringRow("a", 0, 10, 4, RULE), ScoringRow("b", 1, 5, 2, RULE)])
    for layer in range(LAYER + 1):
        scoring.capture(second, layer, range(LAYER + 1), _query(2, 7), _lse(2, 7))
    scoring.end_of_forward(second, key_cache, layer_tables, range(LAYER + 1), 1.0, "triton")
    return second


def recorded_nothing_yet(step: StepContext) -> bool:
    """A step without a finishing prompt files its rows and scores nothing."""
    return not step.cuts and step.captured_queries is None


def test_window_rows_and_normalisers_reach_the_kernel_aligned(recorded):
    step = _steps()
    (call,) = recorded
    assert call["window_lens"] == [4, 2]
    query, lse = call["query"], call["window_lse"]
    assert query.shape == (2, 4, HEADS, HEAD_SIZE) and lse.shape == (2, 4, HEADS)
    heads = torch.arange(HEADS, dtype=torch.float32)
    # (step, token) of each window row, oldest first; b's rows sit at the right end.
    a_rows, b_rows = [(1, 3), (1, 4), (2, 0), (2, 1)], [(2, 5), (2, 6)]
    for req, rows in ((0, a_rows), (1, b_rows)):
        for slot, (s, t) in enumerate(rows, start=4 - len(rows)):
            torch.testing.assert_close(query[req, slot, :, 0], 1000 * s + 10 * t + heads)
            torch.testing.assert_close(lse[req, slot], 1000 * s + 100 * t + heads)
    ((layers, req_ids, cuts),) = step.cuts
    assert (layers, req_ids) == ([LAYER], ["a", "b"])
    assert step.cuts_by_request(cuts.tolist()) == {"a": {LAYER: 4}, "b": {LAYER: 4}}
    assert scoring.window_normalisers["attention"] >= 1


def test_a_chunk_without_normalisers_sends_none(recorded):
    before = scoring.window_normalisers["own"]
    _steps(with_lse_in_first_chunk=False)
    (call,) = recorded
    assert call["window_lse"] is None
    assert scoring.window_normalisers["own"] == before + 2  # two requests, one layer each


def test_only_gpu_kernels_with_a_window_ask_for_normalisers():
    window = [WindowCapture("a", 10, 4, token_indices=range(0, 1), window_slots=range(3, 4))]
    assert not scoring.wants_prefill_lse(StepContext(RefreeKVConfig(), "triton", captures=window),
                                         LAYER)  # off unless the config asks for it
    config = RefreeKVConfig(reuse_attention_lse=True)
    window = [WindowCapture("a", 10, 4, token_indices=range(0, 1), window_slots=range(3, 4))]
    one_row = [WindowCapture("a", 10, 1, token_indices=range(0, 1), window_slots=range(0, 1))]
    assert scoring.wants_prefill_lse(StepContext(config, "triton", captures=window), LAYER)
    assert scoring.wants_prefill_lse(StepContext(config, "cuda", captures=window), LAYER)
    assert not scoring.wants_prefill_lse(StepContext(config, "torch", captures=window), LAYER)
    assert not scoring.wants_prefill_lse(StepContext(config, "triton", captures=one_row), LAYER)
    frozen = config.frozen_layers[0]
    assert not scoring.wants_prefill_lse(StepContext(config, "triton", captures=window), frozen)
    assert not scoring.wants_prefill_lse(StepContext(config, "triton"), LAYER)


def run_forward(step: StepContext, query: torch.Tensor) -> None:
    """Every layer's attention call of one step, then the end of its forward (no normalisers;
    the layer tables are placeholders: the kernel is recorded, not run)."""
    layers = range(LAYER + 1)
    for layer in layers:
        scoring.capture(step, layer, layers, query)
    scoring.end_of_forward(step, torch.zeros(4, 16, 1, HEAD_SIZE),
                           torch.zeros(len(layers), 2, 2, dtype=torch.int32), layers, 1.0,
                           "triton")


def test_windows_that_run_whole_in_their_scoring_step_skip_the_store(recorded):
    """Request a (window 3) is tokens 0-2 and request b (window 2) tokens 4-5 of one step that
    scores both; no normalisers: the kernel gets the rows straight from the step's buffer."""
    config = RefreeKVConfig()
    step = StepContext(
        config=config, kernel="triton",
        captures=[WindowCapture("a", 3 + 5, 3, token_indices=range(0, 3), window_slots=range(3)),
                  WindowCapture("b", 6, 2, token_indices=range(4, 6), window_slots=range(2))],
        scoring=[ScoringRow("a", 0, 8, 3, RULE), ScoringRow("b", 1, 6, 2, RULE)])
    run_forward(step, _query(3, 6))
    assert window_store.get("a") is None and window_store.get("b") is None
    (call,) = recorded
    assert call["window_lens"] == [3, 2] and call["window_lse"] is None
    query, heads = call["query"], torch.arange(HEADS, dtype=torch.float32)
    for req, tokens in ((0, [0, 1, 2]), (1, [4, 5])):
        for slot, t in enumerate(tokens, start=3 - len(tokens)):
            torch.testing.assert_close(query[req, slot, :, 0], 3000 + 10 * t + heads)


def test_requests_whose_every_head_keeps_its_norm_are_scored_by_the_torch_backend(recorded):
    """One step, two requests with the same window: the paper's mean over heads goes to the
    step's kernel, every head's own norm (head_agg "max") to the torch backend, in its own
    call."""
    every_head = ThresholdPolicy(threshold=0.02, window=2, window_agg="mean", head_agg="max")
    step = StepContext(
        config=RefreeKVConfig(), kernel="triton",
        captures=[WindowCapture("a", 6, 2, token_indices=range(0, 2), window_slots=range(2)),
                  WindowCapture("b", 6, 2, token_indices=range(2, 4), window_slots=range(2))],
        scoring=[ScoringRow("a", 0, 6, 2, RULE), ScoringRow("b", 1, 6, 2, every_head)])
    run_forward(step, _query(4, 4))
    calls = sorted(recorded, key=lambda call: call["head_agg"])
    assert [(c["head_agg"], c["backend"]) for c in calls] == [("max", "torch"),
                                                             ("mean", "triton")]
    assert [c["thresholds"] for c in calls] == [[pytest.approx(0.02)], [pytest.approx(0.01)]]
    assert [req_ids for _, req_ids, _ in step.cuts] in (
        [["a"], ["b"]], [["b"], ["a"]])


@pytest.mark.parametrize("num_requests", [1, 2, 3, 5])
def test_pair_inputs_are_request_major_and_each_vector_starts_on_16_bytes(num_requests):
    """Triton compiles a kernel once per alignment of its pointers: a vector that starts 4
    bytes into a 16-byte word (an odd pair count) would compile new variants while serving."""
    rows = [ScoringRow(f"r{i}", batch_row=7 - i, num_prompt_tokens=100 + i, window=32,
                       policy=RULE) for i in range(num_requests)]
    layers = [2, 3, 5]
    inputs = scoring._pair_inputs(rows, [0.01 * (i + 1) for i in range(num_requests)], layers,
                                  torch.device("cpu"))
    assert inputs.layers.tolist() == layers * num_requests
    assert inputs.batch_rows.tolist() == [7 - i for i in range(num_requests) for _ in layers]
    assert inputs.prompt_lens.tolist() == [100 + i for i in range(num_requests) for _ in layers]
    assert inputs.window_lens.tolist() == [32] * (3 * num_requests)
    assert inputs.thresholds.tolist() == pytest.approx(
        [0.01 * (i + 1) for i in range(num_requests) for _ in layers])
    base = inputs.layers.data_ptr()
    for vector in (inputs.batch_rows, inputs.prompt_lens, inputs.window_lens, inputs.thresholds):
        assert (vector.data_ptr() - base) % 16 == 0
