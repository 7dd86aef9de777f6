"""Data parallelism through the OpenAI server: with ``--data-parallel-size 2`` every engine prunes
the requests it runs, ``/metrics`` keeps one series per engine and the JSON views cover both."""

import json
import time
import urllib.request
from concurrent.futures import ThreadPoolExecutor

import pytest

from refreekv_vllm.config import RefreeKVConfig
from refreekv_vllm.models import DEFAULT_MODEL_NAME
from refreekv_vllm.workloads import passkey_prompt
from tests.e2e.server import start_server
from tests.e2e.test_server import get_json, post_status

pytestmark = pytest.mark.e2e

# SmolLM2 in fp32: 30 layers x K,V x 3 KV heads x 64 dims x 4 bytes per token; 4,096 tokens each.
KV_BYTES_PER_ENGINE = 4096 * 30 * 2 * 3 * 64 * 4
NUM_REQUESTS = 8


@pytest.fixture(scope="module")
def dp_server(tmp_path_factory, smollm2_dir):
    log_path = tmp_path_factory.mktemp("data-parallel") / "server.log"
    server = start_server(["--enforce-eager", "--dtype", "float32", "--data-parallel-size", "2",
                           "--max-model-len", "2048",
                           "--kv-cache-memory-bytes", str(KV_BYTES_PER_ENGINE)], log_path)
    yield server
    server.stop()


def by_engine(base_url: str, name: str) -> dict[str, float]:
    """One sample's value per ``engine`` label, summed over its other labels."""
    from prometheus_client.parser import text_string_to_metric_families

    with urllib.request.urlopen(base_url + "/metrics", timeout=30) as response:
        text = response.read().decode()
    values: dict[str, float] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == name:
                engine = sample.labels["engine"]
                values[engine] = values.get(engine, 0.0) + sample.value
    return values


def complete_passkeys(base_url: str, count: int, first_key: int, key_step: int) -> list[str]:
    """``count`` passkey completions at once (the needle at evenly spread depths); every one
    answered 200. Returns the response bodies."""
    bodies = [{"model": DEFAULT_MODEL_NAME, "max_tokens": 4,
               "prompt": passkey_prompt(50, (i + 1) / (count + 1), first_key + key_step * i)}
              for i in range(count)]
    with ThreadPoolExecutor(count) as pool:
        answers = list(pool.map(lambda body: post_status(base_url + "/v1/completions", body),
                                bodies))
    assert all(status == 200 for status, _ in answers), answers
    return [body for _, body in answers]


def idle_usage(base_url: str, engines: set[str], timeout: float = 30) -> dict[str, float]:
    """``vllm:kv_cache_usage_perc`` per engine once every one of ``engines`` reports 0 (the
    gauge follows the steps), or when ``timeout`` seconds passed."""
    deadline = time.monotonic() + timeout
    while True:
        usage = by_engine(base_url, "vllm:kv_cache_usage_perc")
        if set(usage) == engines and not any(usage.values()) or time.monotonic() > deadline:
            return usage
        time.sleep(0.5)


def test_every_engine_prunes_and_the_views_add_up(dp_server):
    url = dp_server.base_url
    answers = complete_passkeys(url, NUM_REQUESTS, 10_000, 97)

    finished = by_engine(url, "vllm:request_success_total")
    assert set(finished) == {"0", "1"} and all(finished.values()), finished
    pruned = by_engine(url, "refreekv:requests_pruned_total")
    assert set(pruned) == {"0", "1"}, pruned
    # Each engine pruned what it ran (a passkey prompt of this length prunes at the default rule).
    assert all(pruned[engine] > 0 for engine in finished), (pruned, finished)

    status, stats = get_json(url + "/v1/refreekv/stats")
    assert status == 200
    assert stats["requests_pruned_total"] == sum(pruned.values())
    released = by_engine(url, "refreekv:kv_blocks_released_total")
    assert stats["kv_blocks_released_total"] == sum(released.values())
    assert stats["threshold"] == RefreeKVConfig().threshold  # a setting, not a sum over engines

    # Every response's record is found, whichever engine ran it.
    skipped = 0
    for body in answers:
        status, record = get_json(url + "/v1/refreekv/requests/" + json.loads(body)["id"])
        assert status == 200, record
        skipped += record["blocks_skipped"]
    assert skipped == stats["kv_blocks_released_total"]

    # Both pools go back to idle once the requests are done.
    usage = idle_usage(url, {"0", "1"})
    assert set(usage) == {"0", "1"} and not any(usage.values()), usage
