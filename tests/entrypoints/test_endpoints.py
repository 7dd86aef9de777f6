"""The plugin's HTTP routes sit where vLLM's --api-key middleware guards them, and
refreekv-serve's environment allow-lists them without dropping other plugins."""

from vllm.entrypoints.serve.utils.server_utils import GUARDED_PREFIX

from refreekv_vllm.entrypoints.endpoints import router
from refreekv_vllm.entrypoints.serve import server_environment


def test_routes_are_guarded_by_the_api_key():
    paths = [route.path for route in router.routes]
    assert paths
    assert all(path.startswith(GUARDED_PREFIX) for path in paths)


def test_server_environment_keeps_other_plugins_and_vllms_metrics_in_memory():
    env = server_environment({})
    allowed = env["VLLM_PLUGINS"].split(",")
    assert {"refreekv", "refreekv_endpoints", "lora_filesystem_resolver"} <= set(allowed)
    assert "PROMETHEUS_MULTIPROC_DIR" not in env
    user = server_environment({"VLLM_PLUGINS": "other"})
    assert user["VLLM_PLUGINS"].split(",") == ["other", "refreekv", "refreekv_endpoints"]


def test_record_ids_match_exactly_one_response_id():
    from refreekv_vllm.entrypoints.endpoints import record_key

    chat = "chatcmpl-5f0c-1a2b3c4d"
    assert record_key(chat, "chatcmpl-5f0c") == (-1, -1)
    assert record_key(chat, chat) == (-1, -1)
    for prefix in ("chatcmpl", "chatcmpl-5f0", "chatcmpl-5f0c-1a2b", ""):
        assert record_key(chat, prefix) is None
    completion = "cmpl-77ab-0-1a2b3c4d"  # completions add the prompt's index in the batch
    assert record_key(completion, "cmpl-77ab") == (0, -1)
    assert record_key("cmpl-77ab-3-1a2b3c4d", "cmpl-77ab") == (3, -1)
    assert record_key(completion, "cmpl-77a") is None
    assert record_key("1_" + completion, "cmpl-77ab") == (0, 1)  # sample 1 of n > 1
    assert record_key("3_" + chat, "chatcmpl-5f0c") == (-1, 3)
    assert record_key("3_" + chat, "chatcmpl-5f0") is None
    # An id that itself looks like a sample's: the whole id first.
    assert record_key("12_user-id-1a2b3c4d", "12_user-id") == (-1, -1)


def test_raw_body_checks_booleans_and_shapes():
    from refreekv_vllm.config import RefreeKVConfig
    from refreekv_vllm.entrypoints.validation import body_error

    config = RefreeKVConfig()
    assert body_error(b'{"vllm_xargs": {"refreekv_window": 8}}', config) is None
    assert "refreekv_window" in body_error(b'{"vllm_xargs": {"refreekv_window": true}}', config)
    assert "refreekv_threshold" in body_error(
        b'{"vllm_xargs": {"refreekv_threshold": false}}', config)
    assert body_error(b'{"vllm_xargs": {"refreekv_enabled": false}}', config) is None
    assert "JSON object" in body_error(b'[{"prompt": "hi"}]', config)
    assert body_error(b"{not json", config) is None  # vLLM's own answer
    assert body_error(b'{"vllm_xargs": {"other_key": true}}', config) is None
