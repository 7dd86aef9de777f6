"""Deployment artefacts against the real server: the Grafana dashboard's queries and a real
Prometheus server scraping /metrics."""

import json
import re
import shutil
import signal
import subprocess
import time
import urllib.parse
import urllib.request
from pathlib import Path

import pytest

from refreekv_vllm.models import DEFAULT_MODEL_NAME
from refreekv_vllm.workloads import passkey_prompt
from tests.e2e.server import free_port
from tests.e2e.test_server import post_status, scrape

pytestmark = pytest.mark.e2e

DEPLOY = Path(__file__).resolve().parents[2] / "deploy"
METRIC_NAME = re.compile(r"\b((?:refreekv|vllm):[a-zA-Z0-9_]+)")


def exported_names(base_url: str) -> set[str]:
    with urllib.request.urlopen(base_url + "/metrics", timeout=30) as response:
        text = response.read().decode()
    return {m.group(1) for m in METRIC_NAME.finditer(text)}


def test_every_dashboard_query_names_an_exported_metric(default_server):
    dashboard = json.loads((DEPLOY / "grafana" / "dashboards" / "refreekv.json").read_text())
    exprs = [t["expr"] for panel in dashboard["panels"] for t in panel["targets"]]
    assert exprs
    exported = exported_names(default_server.base_url)
    for expr in exprs:
        names = METRIC_NAME.findall(expr)
        assert names, expr
        for name in names:
            assert name in exported, f"{name} (in {expr!r}) is not exported"


@pytest.fixture
def prometheus_server(default_server, tmp_path):
    binary = shutil.which("prometheus")
    if binary is None:
        pytest.skip("Debian's prometheus package is not installed (scripts/test.sh installs it "
                    "where apt-get works)")
    target = urllib.parse.urlparse(default_server.base_url).netloc
    config = tmp_path / "prometheus.yml"
    config.write_text(
        (DEPLOY / "prometheus" / "prometheus.yml").read_text()
        .replace("scrape_interval: 15s", "scrape_interval: 1s")
        .replace('"vllm:8000"', f'"{target}"'))
    port = free_port()
    with open(tmp_path / "prometheus.log", "w") as log:
        process = subprocess.Popen(
            [binary, f"--config.file={config}", f"--storage.tsdb.path={tmp_path / 'data'}",
             f"--web.listen-address=127.0.0.1:{port}"],
            stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        yield f"http://127.0.0.1:{port}"
        process.send_signal(signal.SIGTERM)
        process.wait(timeout=30)


def promql(base_url: str, query: str) -> float | None:
    url = base_url + "/api/v1/query?" + urllib.parse.urlencode({"query": query})
    try:
        with urllib.request.urlopen(url, timeout=10) as response:
            result = json.load(response)["data"]["result"]
    except OSError:
        return None
    return float(result[0]["value"][1]) if result else None


def test_prometheus_reports_kv_bytes_freed(default_server, prometheus_server):
    status, _ = post_status(default_server.base_url + "/v1/completions", {
        "model": DEFAULT_MODEL_NAME, "prompt": passkey_prompt(50, 0.7, 55531), "max_tokens": 2})
    assert status == 200
    expected = scrape(default_server.base_url)["refreekv:kv_bytes_freed_total"]
    assert expected > 0
    query = "sum(refreekv:kv_bytes_freed_total)"
    deadline = time.monotonic() + 90
    value = None
    while time.monotonic() < deadline:
        value = promql(prometheus_server, query)
        if value == expected:
            break
        time.sleep(1)
    assert value == expected
