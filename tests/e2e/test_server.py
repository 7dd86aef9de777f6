"""The real OpenAI-compatible server, started by ``refreekv-serve``, over HTTP."""

import json
import urllib.error
import urllib.request

import pytest

from refreekv_vllm.config import RefreeKVConfig
from refreekv_vllm.models import DEFAULT_MODEL_NAME

pytestmark = pytest.mark.e2e


def post_json(url: str, body: dict) -> dict:
    request = urllib.request.Request(url, data=json.dumps(body).encode(),
                                     headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=300) as response:
        return json.load(response)


def test_chat_completion_answers_coherently(default_server):
    reply = post_json(default_server.base_url + "/v1/chat/completions", {
        "model": DEFAULT_MODEL_NAME,
        "messages": [
            {"role": "system", "content": "You are a helpful AI assistant."},
            {"role": "user", "content": "What is the capital of France?"},
        ],
        "max_tokens": 20,
        "temperature": 0,
    })
    assert "Paris" in reply["choices"][0]["message"]["content"]


def test_metrics_expose_kv_cache_usage(default_server):
    with urllib.request.urlopen(default_server.base_url + "/metrics", timeout=30) as response:
        text = response.read().decode()
    assert "vllm:kv_cache_usage_perc" in text


def test_plugin_loaded_in_engine_core_and_worker(default_server, plugin_trace_dir):
    records = [json.loads(p.read_text()) for p in plugin_trace_dir.glob("*.json")]
    loaders = {record["loader"]: record["pid"] for record in records}
    engine_core = loaders.get("vllm.v1.engine.core.EngineCore.__init__")
    worker = loaders.get("vllm.v1.worker.worker_base.WorkerWrapperBase.init_worker")
    api_server = default_server.process.pid
    assert engine_core is not None, records
    assert worker is not None, records
    # On the CPU backend the worker is a process of its own, apart from the engine core.
    assert len({engine_core, worker, api_server}) == 3, records


BAD_XARGS = [
    ({"refreekv_threshold": -0.1}, "refreekv_threshold"),
    ({"refreekv_threshold": 0.9}, "refreekv_threshold"),
    ({"refreekv_threshold": "high"}, "refreekv_threshold"),
    ({"refreekv_threshold": "NaN"}, "refreekv_threshold"),
    ({"refreekv_threshold": [0.01]}, "refreekv_threshold"),
    ({"refreekv_window": 0}, "refreekv_window"),
    ({"refreekv_window": 65}, "refreekv_window"),
    ({"refreekv_window": 8.5}, "refreekv_window"),
    ({"refreekv_enabled": "maybe"}, "refreekv_enabled"),
    ({"refreekv_enabled": 2}, "refreekv_enabled"),
    ({"refreekv_budget": 0.5}, "refreekv_budget"),
    ({"refreekv_policy": "h2o"}, "refreekv_policy"),
    ({"refreekv_policy": "fixed"}, "refreekv_budget"),
    ({"refreekv_policy": "fixed", "refreekv_budget": 0}, "refreekv_budget"),
    ({"refreekv_window_agg": "sum"}, "refreekv_window_agg"),
    ({"refreekv_windw": 8}, "refreekv_windw"),
    # JSON booleans are not numbers (vLLM's request model would make true a 1).
    ({"refreekv_window": True}, "refreekv_window"),
    ({"refreekv_threshold": False}, "refreekv_threshold"),
]


def post_status(url: str, body: dict | list) -> tuple[int, str]:
    request = urllib.request.Request(url, data=json.dumps(body).encode(),
                                     headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=300) as response:
            return response.status, response.read().decode()
    except urllib.error.HTTPError as error:
        return error.code, error.read().decode()


@pytest.mark.parametrize(("xargs", "field"), BAD_XARGS)
def test_bad_request_parameters_get_http_400(default_server, xargs, field):
    status, body = post_status(default_server.base_url + "/v1/completions", {
        "model": DEFAULT_MODEL_NAME, "prompt": "Hello", "max_tokens": 2, "vllm_xargs": xargs})
    assert status == 400, body
    assert field in body


@pytest.mark.parametrize("endpoint", ["/v1/completions", "/v1/chat/completions"])
def test_bad_parameters_of_a_stream_get_http_400_before_it_starts(default_server, endpoint):
    log_before = default_server.log()
    prompt = ({"prompt": "Hello"} if endpoint == "/v1/completions"
              else {"messages": [{"role": "user", "content": "Hello"}]})
    status, body = post_status(default_server.base_url + endpoint, {
        "model": DEFAULT_MODEL_NAME, **prompt, "max_tokens": 2, "stream": True,
        "vllm_xargs": {"refreekv_window": 0}})
    assert status == 400, body
    assert "refreekv_window" in json.loads(body)["error"]["message"]
    new_lines = default_server.log()[len(log_before):]
    assert "Traceback" not in new_lines and " ERROR " not in new_lines, new_lines


def test_a_json_array_body_gets_http_400(default_server):
    status, body = post_status(default_server.base_url + "/v1/completions", [
        {"model": DEFAULT_MODEL_NAME, "prompt": "Hello", "max_tokens": 2}])
    assert status == 400, body
    assert "JSON object" in body


def test_server_keeps_serving_after_bad_requests(default_server):
    status, body = post_status(default_server.base_url + "/v1/completions", {
        "model": DEFAULT_MODEL_NAME, "prompt": "The capital of France is", "max_tokens": 4,
        "temperature": 0, "vllm_xargs": {"refreekv_threshold": 0.02, "refreekv_window": 8}})
    assert status == 200, body
    assert "Paris" in json.loads(body)["choices"][0]["text"]


def scrape(base_url: str) -> dict[str, float]:
    """Our samples summed over label sets (one model per server), by sample name."""
    from prometheus_client.parser import text_string_to_metric_families

    with urllib.request.urlopen(base_url + "/metrics", timeout=30) as response:
        text = response.read().decode()
    totals: dict[str, float] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name.startswith("refreekv:") and "le" not in sample.labels:
                totals[sample.name] = totals.get(sample.name, 0.0) + sample.value
    return totals


def get_json(url: str) -> tuple[int, dict]:
    try:
        with urllib.request.urlopen(url, timeout=60) as response:
            return response.status, json.load(response)
    except urllib.error.HTTPError as error:
        return error.code, json.loads(error.read().decode() or "{}")


def test_metrics_and_stats_count_what_the_engine_did(default_server):
    from refreekv_vllm.workloads import passkey_prompt

    url = default_server.base_url
    before = scrape(url)
    status, pruned = post_status(url + "/v1/completions", {
        "model": DEFAULT_MODEL_NAME, "prompt": passkey_prompt(50, 0.5, 71830), "max_tokens": 2})
    assert status == 200
    status, opted_out = post_status(url + "/v1/completions", {
        "model": DEFAULT_MODEL_NAME, "prompt": passkey_prompt(50, 0.3, 11112), "max_tokens": 2,
        "vllm_xargs": {"refreekv_enabled": False}})
    assert status == 200
    after = scrape(url)

    status, record = get_json(url + "/v1/refreekv/requests/" + json.loads(pruned)["id"])
    assert status == 200, record
    assert record["blocks_skipped"] > 0 and 0 < record["block_budget"] < 1
    status, _ = get_json(url + "/v1/refreekv/requests/" + json.loads(opted_out)["id"])
    assert status == 404
    pruned_id = json.loads(pruned)["id"]
    for prefix in (pruned_id[:-2], pruned_id.split("-")[0]):  # never another request's record
        status, _ = get_json(url + "/v1/refreekv/requests/" + prefix)
        assert status == 404, prefix

    def delta(name: str) -> float:
        return after.get(name, 0.0) - before.get(name, 0.0)

    assert delta("refreekv:requests_pruned_total") == 1
    assert delta("refreekv:requests_skipped_total") == 1  # the opted-out one
    assert delta("refreekv:kv_blocks_released_total") == record["blocks_skipped"]
    assert delta("refreekv:request_block_budget_count") == 1
    # One definition of the block budget: the endpoint and the histogram agree.
    assert delta("refreekv:request_block_budget_sum") == pytest.approx(record["block_budget"])
    assert delta("refreekv:kv_bytes_freed_total") > 0
    assert delta("refreekv:tokens_pruned_total") == record["tokens_pruned"]
    assert after["refreekv:threshold"] == RefreeKVConfig().threshold

    status, stats = get_json(url + "/v1/refreekv/stats")
    assert status == 200
    assert stats["requests_pruned_total"] == after["refreekv:requests_pruned_total"]
    assert stats["kv_bytes_freed_total"] == after["refreekv:kv_bytes_freed_total"]


def test_one_id_finds_every_sample_of_n_greater_than_one(default_server):
    from refreekv_vllm.workloads import passkey_prompt

    url = default_server.base_url
    status, body = post_status(url + "/v1/completions", {
        "model": DEFAULT_MODEL_NAME, "prompt": passkey_prompt(50, 0.4, 55501), "max_tokens": 2,
        "n": 2, "temperature": 1.0, "seed": 3})
    assert status == 200, body
    status, found = get_json(url + "/v1/refreekv/requests/" + json.loads(body)["id"])
    assert status == 200, found
    assert found["request_id"] == json.loads(body)["id"]
    assert len(found["records"]) == 2
    assert all(record["blocks_skipped"] > 0 for record in found["records"])
