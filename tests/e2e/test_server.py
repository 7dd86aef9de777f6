"""The real OpenAI-compatible server, started by ``refreekv-serve``, over HTTP."""

import json
import urllib.request

import pytest

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
