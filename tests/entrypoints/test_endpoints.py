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
    assert env["VLLM_USE_V2_MODEL_RUNNER"] == "0"
    assert "PROMETHEUS_MULTIPROC_DIR" not in env
    user = server_environment({"VLLM_PLUGINS": "other"})
    assert user["VLLM_PLUGINS"].split(",") == ["other", "refreekv", "refreekv_endpoints"]
