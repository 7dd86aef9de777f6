"""The plugin's Prometheus metrics: the only place that creates ``refreekv:*`` collectors.

They are updated where pruning happens (engine core and workers), in other processes than the
API server that serves ``/metrics``. Only these values travel through files, in Prometheus'
multiprocess format: vLLM's own metrics stay in the API server's memory (setting
``PROMETHEUS_MULTIPROC_DIR`` for everything would put a file write behind each of vLLM's
per-token observations and make every scrape read all of them). ``install_metrics_dir`` (the
general plugin, in every process) picks the directory — vLLM's multiprocess one when the user
set it, else a fresh one that the engine processes inherit — and adds its reader to the registry
that ``/metrics`` serves. The prefix is ours: vLLM deletes every ``vllm:`` collector at startup.
"""

import contextlib
import functools
import logging
import multiprocessing
import os
import tempfile
import threading
from collections.abc import Iterator, Sequence
from typing import Any

from prometheus_client import REGISTRY, Counter, Gauge, Histogram, values
from prometheus_client.mmap_dict import MmapedDict, mmap_key
from prometheus_client.multiprocess import MultiProcessCollector

logger = logging.getLogger(__name__)

PREFIX = "refreekv:"
METRICS_DIR_ENV = "REFREEKV_METRICS_DIR"
METRICS_DIR_OWNER_ENV = "REFREEKV_METRICS_DIR_OWNER"
VLLM_MULTIPROC_ENV = "PROMETHEUS_MULTIPROC_DIR"
BUDGET_BUCKETS = (0.05, 0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 0.95, 1.0)
SCORING_BUCKETS = (1e-4, 3e-4, 1e-3, 3e-3, 1e-2, 3e-2, 0.1, 0.3, 1.0, 3.0)


class SchedulerMetrics:
    """Updated by the scheduler (engine core): what was released and freed. ``engine`` is the
    engine's index, as on vLLM's own series: with ``--data-parallel-size`` each engine prunes
    on its own and its series carry its index."""

    def __init__(self, model_name: str, engine: int, threshold: float, window: int,
                 num_layers: int, skip_reasons: list[str]) -> None:
        with _file_backed_values():
            self._create((model_name, str(engine)), threshold, window, num_layers, skip_reasons)

    def _create(self, labels: tuple[str, str], threshold: float, window: int, num_layers: int,
                skip_reasons: list[str]) -> None:
        m = _collectors()
        self.requests_pruned = m["requests_pruned"].labels(*labels)
        self._skipped = m["requests_skipped"]
        self._labels = labels
        self.blocks_released = m["blocks_released"].labels(*labels)
        self.blocks_freed = m["blocks_freed"].labels(*labels)
        self.tokens_pruned = m["tokens_pruned"].labels(*labels)
        self.bytes_freed = m["bytes_freed"].labels(*labels)
        self.block_budget = m["block_budget"].labels(*labels)
        self.paper_budget = m["paper_budget"].labels(*labels)
        self._layer_prompt_tokens = m["layer_prompt_tokens"]
        self._layer_kept_tokens = m["layer_kept_tokens"]
        # Every series exists from the start (at 0), so dashboards and rate() see it.
        for reason in skip_reasons:
            self._skipped.labels(*labels, reason)
        # Label lookups cost microseconds: the per-layer series are looked up once.
        self._layer_prompt = [self._layer_prompt_tokens.labels(*labels, str(layer))
                              for layer in range(num_layers)]
        self._layer_kept = [self._layer_kept_tokens.labels(*labels, str(layer))
                            for layer in range(num_layers)]
        m["threshold"].labels(*labels).set(threshold)
        m["window"].labels(*labels).set(window)

    def skipped(self, reason: str, count: int = 1) -> None:
        self._skipped.labels(*self._labels, reason).inc(count)

    def layer_tokens(self, prompt_tokens: int, kept_tokens: Sequence[int]) -> None:
        """Prompt tokens (the same in every layer) and kept tokens per layer, of one step's
        reports together."""
        for prompt, kept, value in zip(self._layer_prompt, self._layer_kept, kept_tokens,
                                       strict=True):
            prompt.inc(prompt_tokens)
            kept.inc(value)


class WorkerMetrics:
    """Updated by the worker: how long scoring took."""

    def __init__(self, model_name: str, engine: int) -> None:
        with _file_backed_values():
            self.scoring_seconds = _collectors()["scoring_seconds"].labels(model_name,
                                                                          str(engine))


def engine_index(vllm_config: Any) -> int:
    """The engine's index among data-parallel engines (0 without data parallelism): vLLM runs
    each engine of a dense model as an engine of its own, keeping the index here."""
    return int(getattr(vllm_config.parallel_config, "data_parallel_index", 0) or 0)


def install_metrics_dir() -> None:
    """Once per process: make sure the engine processes have a directory to write to and that
    this process's ``/metrics`` registry reads it."""
    if os.environ.get(VLLM_MULTIPROC_ENV):
        return  # vLLM's own registry reads every process's files already
    path = os.environ.get(METRICS_DIR_ENV)
    if not path and multiprocessing.parent_process() is not None:
        logger.warning(
            "ReFreeKV: process %d was started without its server's metrics directory (%s); "
            "the refreekv:* values it counts will not reach /metrics.", os.getpid(),
            METRICS_DIR_ENV)
    if not path or _inherited_from_another_server():
        # Processes started from here (the engine core, workers) inherit it.
        path = os.environ[METRICS_DIR_ENV] = tempfile.mkdtemp(prefix="refreekv-metrics-")
        os.environ[METRICS_DIR_OWNER_ENV] = str(os.getpid())
    _add_reader(path)


def _inherited_from_another_server() -> bool:
    """A directory this plugin made for some other top-level process (a server started from a
    script or test that ran an engine itself): sharing it would add that process's values to
    ours. Engine cores and workers are multiprocessing children and keep their server's."""
    owner = os.environ.get(METRICS_DIR_OWNER_ENV)
    return (owner is not None and owner != str(os.getpid())
            and multiprocessing.parent_process() is None)


@functools.cache
def _add_reader(path: str) -> None:
    os.makedirs(path, exist_ok=True)
    MultiProcessCollector(REGISTRY, path=path)


def _values_dir() -> str | None:
    return os.environ.get(VLLM_MULTIPROC_ENV) or os.environ.get(METRICS_DIR_ENV)


@contextlib.contextmanager
def _file_backed_values() -> Iterator[None]:
    """Metric children created inside keep their values in this process's files of the
    metrics directory (in-memory values if there is none: nothing would read them)."""
    path = _values_dir()
    if path is None or os.environ.get(VLLM_MULTIPROC_ENV):
        yield  # prometheus_client's own multiprocess values already, or no directory
        return
    original = values.ValueClass
    values.ValueClass = functools.partial(_FileValue, path)
    try:
        yield
    finally:
        values.ValueClass = original


class _FileValue:
    """One metric value, written through to ``<dir>/<type>_<pid>.db`` in the format
    ``prometheus_client``'s ``MultiProcessCollector`` reads."""

    _multiprocess = True
    _files: dict[tuple[str, int], MmapedDict] = {}
    _lock = threading.Lock()

    def __init__(self, path: str, typ: str, metric_name: str, name: str, labelnames: list[str],
                 labelvalues: list[str], help_text: str, multiprocess_mode: str = "",
                 **kwargs: object) -> None:
        self._path = path
        self._prefix = f"{typ}_{multiprocess_mode}" if typ == "gauge" else typ
        self._key = mmap_key(metric_name, name, labelnames, labelvalues, help_text)
        self._value = 0.0
        self._timestamp = 0.0
        self._write()

    def _write(self) -> None:
        with self._lock:
            key = (self._prefix, os.getpid())
            file = self._files.get(key)
            if file is None:
                file = self._files[key] = MmapedDict(
                    os.path.join(self._path, f"{self._prefix}_{key[1]}.db"))
            file.write_value(self._key, self._value, self._timestamp)

    def inc(self, amount: float) -> None:
        self._value += amount
        self._write()

    def set(self, value: float, timestamp: float | None = None) -> None:
        self._value = value
        self._timestamp = timestamp or 0.0
        self._write()

    def set_exemplar(self, exemplar: object) -> None:
        return None

    def get(self) -> float:
        return self._value

    def get_exemplar(self) -> None:
        return None


@functools.cache
def _collectors() -> dict:
    # Outside any registry: /metrics reads the values from the files (an in-process registry
    # entry would repeat them in a process that serves /metrics itself).
    registry = None if _values_dir() else REGISTRY
    model = ["model_name", "engine"]
    return {
        "requests_pruned": Counter(
            PREFIX + "requests_pruned", "Requests whose KV blocks were released after prefill.",
            model, registry=registry),
        "requests_skipped": Counter(
            PREFIX + "requests_skipped",
            "Requests left unpruned after scoring, by their settings or their prompt's length, "
            "by reason.",
            [*model, "reason"], registry=registry),
        "blocks_released": Counter(
            PREFIX + "kv_blocks_released",
            "KV blocks (one layer x block_size tokens) whose reference this plugin dropped.",
            model, registry=registry),
        "blocks_freed": Counter(
            PREFIX + "kv_blocks_freed",
            "Released KV blocks that went back to the free pool (no other holder).", model,
            registry=registry),
        "tokens_pruned": Counter(
            PREFIX + "tokens_pruned",
            "Prompt tokens dropped, summed over layers (token-level, the paper's count).", model,
            registry=registry),
        "bytes_freed": Counter(
            PREFIX + "kv_bytes_freed", "Bytes of KV cache returned to the free pool.", model,
            registry=registry),
        "block_budget": Histogram(
            PREFIX + "request_block_budget",
            "Per pruned request: fraction of its prompt KV blocks still resident.", model,
            buckets=BUDGET_BUCKETS, registry=registry),
        "paper_budget": Histogram(
            PREFIX + "request_paper_budget",
            "Per pruned request: the paper's budget (mean kept token fraction over layers).",
            model, buckets=BUDGET_BUCKETS, registry=registry),
        "layer_prompt_tokens": Counter(
            PREFIX + "layer_prompt_tokens", "Prompt tokens scored, per layer.",
            [*model, "layer"], registry=registry),
        "layer_kept_tokens": Counter(
            PREFIX + "layer_kept_tokens", "Prompt tokens kept after the cut, per layer.",
            [*model, "layer"], registry=registry),
        "scoring_seconds": Histogram(
            PREFIX + "scoring_seconds",
            "Host time to launch the scoring of every layer of a step's finishing prompts.",
            model, buckets=SCORING_BUCKETS, registry=registry),
        "threshold": Gauge(
            PREFIX + "threshold", "Server-wide threshold T in effect.", model,
            multiprocess_mode="mostrecent", registry=registry),
        "window": Gauge(
            PREFIX + "window", "Server-wide observation window w in effect.", model,
            multiprocess_mode="mostrecent", registry=registry),
    }
