"""Property-based fuzzing of the plugin's HTTP surface on the real server: any JSON value for any
``refreekv_*`` parameter gets HTTP 200 or 400 (never a 5xx), any id on the records endpoint 200
or 404, and the server stays healthy."""

import json
import urllib.error
import urllib.parse
import urllib.request

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from refreekv_vllm.config import REQUEST_KEYS
from refreekv_vllm.models import DEFAULT_MODEL_NAME

pytestmark = pytest.mark.e2e

JSON_VALUES = st.recursive(
    st.none() | st.booleans() | st.integers(-10**6, 10**6) | st.floats() | st.text(max_size=8),
    lambda children: st.lists(children, max_size=3)
    | st.dictionaries(st.text(max_size=5), children, max_size=3),
    max_leaves=6)
KEYS = st.sampled_from([*REQUEST_KEYS, "refreekv_unknown", "temperature_like"])
XARGS = st.dictionaries(KEYS, JSON_VALUES, max_size=3) | JSON_VALUES
FUZZ = settings(max_examples=60, deadline=None, derandomize=True,
                suppress_health_check=[HealthCheck.too_slow])


def status_of(request: urllib.request.Request) -> tuple[int, str]:
    try:
        with urllib.request.urlopen(request, timeout=120) as response:
            return response.status, response.read().decode()
    except urllib.error.HTTPError as error:
        return error.code, error.read().decode()


@FUZZ
@given(xargs=XARGS, stream=st.booleans())
def test_any_refreekv_parameter_gets_200_or_400(default_server, xargs, stream):
    body = json.dumps({"model": DEFAULT_MODEL_NAME, "prompt": "Hi", "max_tokens": 1,
                       "stream": stream, "vllm_xargs": xargs}).encode()
    status, text = status_of(urllib.request.Request(
        default_server.base_url + "/v1/completions", data=body,
        headers={"Content-Type": "application/json"}))
    assert status in (200, 400), (status, text[:500])


@FUZZ
@given(request_id=st.text(min_size=1, max_size=40))
def test_any_record_id_gets_200_or_404(default_server, request_id):
    url = (default_server.base_url + "/v1/refreekv/requests/"
           + urllib.parse.quote(request_id, safe=""))
    status, text = status_of(urllib.request.Request(url))
    assert status in (200, 404), (status, text[:500])


def test_server_healthy_after_fuzzing(default_server):
    assert status_of(urllib.request.Request(default_server.base_url + "/health"))[0] == 200
