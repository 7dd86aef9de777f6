"""The plugin's Prometheus metrics: the only place that creates ``refreekv:*`` collectors.

They are updated where pruning happens (engine core and workers). ``refreekv-serve`` sets
``PROMETHEUS_MULTIPROC_DIR`` before vLLM starts, so every process writes its values there and the
API server's ``/metrics`` (vLLM builds a ``MultiProcessCollector`` registry when the variable is
set) serves their sum. The prefix is ours: vLLM deletes every ``vllm:`` collector at startup.
"""

import functools

from prometheus_client import Counter, Gauge, Histogram

PREFIX = "refreekv:"
BUDGET_BUCKETS = (0.05, 0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 0.95, 1.0)
SCORING_BUCKETS = (1e-4, 3e-4, 1e-3, 3e-3, 1e-2, 3e-2, 0.1, 0.3, 1.0, 3.0)


class SchedulerMetrics:
    """Updated by the scheduler (engine core): what was released and freed."""

    def __init__(self, model_name: str, threshold: float, window: int, num_layers: int,
                 skip_reasons: list[str]) -> None:
        m = _collectors()
        self.requests_pruned = m["requests_pruned"].labels(model_name)
        self._skipped = m["requests_skipped"]
        self._model_name = model_name
        self.blocks_released = m["blocks_released"].labels(model_name)
        self.blocks_freed = m["blocks_freed"].labels(model_name)
        self.tokens_pruned = m["tokens_pruned"].labels(model_name)
        self.bytes_freed = m["bytes_freed"].labels(model_name)
        self.block_budget = m["block_budget"].labels(model_name)
        self.paper_budget = m["paper_budget"].labels(model_name)
        self._layer_prompt_tokens = m["layer_prompt_tokens"]
        self._layer_kept_tokens = m["layer_kept_tokens"]
        # Every series exists from the start (at 0), so dashboards and rate() see it.
        for reason in skip_reasons:
            self._skipped.labels(model_name, reason)
        for layer in range(num_layers):
            self._layer_prompt_tokens.labels(model_name, str(layer))
            self._layer_kept_tokens.labels(model_name, str(layer))
        m["threshold"].labels(model_name).set(threshold)
        m["window"].labels(model_name).set(window)

    def skipped(self, reason: str, count: int = 1) -> None:
        self._skipped.labels(self._model_name, reason).inc(count)

    def layer_tokens(self, layer: int, prompt_tokens: int, kept_tokens: int) -> None:
        self._layer_prompt_tokens.labels(self._model_name, str(layer)).inc(prompt_tokens)
        self._layer_kept_tokens.labels(self._model_name, str(layer)).inc(kept_tokens)


class WorkerMetrics:
    """Updated by the worker: how long scoring took."""

    def __init__(self, model_name: str) -> None:
        self.scoring_seconds = _collectors()["scoring_seconds"].labels(model_name)


@functools.cache
def _collectors() -> dict:
    model = ["model_name"]
    return {
        "requests_pruned": Counter(
            PREFIX + "requests_pruned", "Requests whose KV blocks were released after prefill.",
            model),
        "requests_skipped": Counter(
            PREFIX + "requests_skipped",
            "Requests left unpruned after scoring or by their settings, by reason.",
            [*model, "reason"]),
        "blocks_released": Counter(
            PREFIX + "kv_blocks_released",
            "KV blocks (one layer x block_size tokens) whose reference this plugin dropped.",
            model),
        "blocks_freed": Counter(
            PREFIX + "kv_blocks_freed",
            "Released KV blocks that went back to the free pool (no other holder).", model),
        "tokens_pruned": Counter(
            PREFIX + "tokens_pruned",
            "Prompt tokens dropped, summed over layers (token-level, the paper's count).", model),
        "bytes_freed": Counter(
            PREFIX + "kv_bytes_freed", "Bytes of KV cache returned to the free pool.", model),
        "block_budget": Histogram(
            PREFIX + "request_block_budget",
            "Per pruned request: fraction of its prompt KV blocks still resident.", model,
            buckets=BUDGET_BUCKETS),
        "paper_budget": Histogram(
            PREFIX + "request_paper_budget",
            "Per pruned request: the paper's budget (mean kept token fraction over layers).",
            model, buckets=BUDGET_BUCKETS),
        "layer_prompt_tokens": Counter(
            PREFIX + "layer_prompt_tokens", "Prompt tokens scored, per layer.",
            [*model, "layer"]),
        "layer_kept_tokens": Counter(
            PREFIX + "layer_kept_tokens", "Prompt tokens kept after the cut, per layer.",
            [*model, "layer"]),
        "scoring_seconds": Histogram(
            PREFIX + "scoring_seconds",
            "Host time to launch the scoring of every layer of a step's finishing prompts.", model,
            buckets=SCORING_BUCKETS),
        "threshold": Gauge(
            PREFIX + "threshold", "Server-wide threshold T in effect.", model,
            multiprocess_mode="mostrecent"),
        "window": Gauge(
            PREFIX + "window", "Server-wide observation window w in effect.", model,
            multiprocess_mode="mostrecent"),
    }
