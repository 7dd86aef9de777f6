"""Static checks of the deployment files (no Docker daemon or Kubernetes cluster exists on these
machines): hadolint on the Dockerfile, the compose file against the compose specification,
``promtool`` on the Prometheus config, Grafana's provisioning, and every Kubernetes manifest
rendered from ``deploy/kubernetes`` against the Kubernetes schemas. Each check is also shown to
catch one broken copy of its file."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import kubernetes_validate
import pytest
import yaml

from tests.deploy.kustomize import render

REPO = Path(__file__).resolve().parents[2]
DEPLOY = REPO / "deploy"
BIN = Path(sys.executable).parent
KUBERNETES_VERSION = "1.33.0"


def run(*command: str | Path) -> subprocess.CompletedProcess:
    return subprocess.run([str(c) for c in command], capture_output=True, text=True,
                          timeout=120)


def broken_copy(tmp_path: Path, source: Path, old: str, new: str) -> Path:
    text = source.read_text()
    assert old in text, f"mutation target {old!r} not in {source.name}"
    copy = tmp_path / source.name
    copy.write_text(text.replace(old, new, 1))
    return copy


# Dockerfile and its build context.

def hadolint(path: Path) -> subprocess.CompletedProcess:
    return run(BIN / "hadolint", path)


def test_dockerfile_passes_hadolint(tmp_path):
    result = hadolint(REPO / "Dockerfile")
    assert result.returncode == 0, result.stdout + result.stderr
    # An unpinned, cache-keeping pip install is what hadolint exists to catch.
    broken = broken_copy(tmp_path, REPO / "Dockerfile",
                         "python3 -m pip install --no-deps --no-cache-dir /tmp/wheels/*.whl",
                         "pip install vllm-extra-tools")
    assert hadolint(broken).returncode != 0


def test_dockerfile_follows_the_vllm_image():
    text = (REPO / "Dockerfile").read_text()
    assert re.search(r"^ARG VLLM_TAG=v0\.26\.0$", text, re.M)
    assert text.count("FROM vllm/vllm-openai:${VLLM_TAG}") == 2
    assert re.search(r"^EXPOSE 8000$", text, re.M)
    assert re.search(r"^HEALTHCHECK .*\n.*/health", text, re.M)
    assert 'ENTRYPOINT ["refreekv-serve"]' in text


def docker_context(patterns: list[str], paths: list[str]) -> list[str]:
    """The paths a ``.dockerignore`` lets into the build context (last matching pattern wins;
    a pattern also matches every path below what it names)."""

    def regex(pattern: str) -> re.Pattern[str]:
        body = re.escape(pattern.strip("/")).replace(r"\*\*", "\0").replace(r"\*", "[^/]*")
        return re.compile(body.replace("\0", ".*").replace(r"\?", "[^/]") + "(/.*)?")

    rules = [(p.startswith("!"), regex(p.lstrip("!"))) for p in patterns]
    kept = []
    for path in paths:
        included = True
        for negated, rule in rules:
            if rule.fullmatch(path):
                included = negated
        if included:
            kept.append(path)
    return kept


def dockerignore_patterns(text: str) -> list[str]:
    return [line.strip() for line in text.splitlines()
            if line.strip() and not line.startswith("#")]


def test_build_context_is_what_the_wheel_needs():
    patterns = dockerignore_patterns((REPO / ".dockerignore").read_text())
    paths = [".venv/lib/python3.11/site-packages/torch/__init__.py", "tests/conftest.py",
             "benchmarks/results/serving_gpu.json", "setup.py", "pyproject.toml", "README.md",
             "csrc/last_row_scores.cu", "refreekv_vllm/plugin.py",
             "refreekv_vllm/ops/__pycache__/x.pyc", ".git/HEAD"]
    assert docker_context(patterns, paths) == [
        "setup.py", "pyproject.toml", "README.md", "csrc/last_row_scores.cu",
        "refreekv_vllm/plugin.py"]
    # Without the leading "*" the multi-GB .venv would be sent to the daemon.
    assert ".venv/lib/python3.11/site-packages/torch/__init__.py" in docker_context(
        [p for p in patterns if p != "*"], paths)


# Compose, Prometheus, Grafana.

def check_compose(path: Path) -> subprocess.CompletedProcess:
    return run(BIN / "check-jsonschema", "--builtin-schema", "vendor.compose-spec", path)


def test_compose_file_follows_the_compose_specification(tmp_path):
    result = check_compose(DEPLOY / "compose.yaml")
    assert result.returncode == 0, result.stdout + result.stderr
    broken = broken_copy(tmp_path, DEPLOY / "compose.yaml", "    ports:\n", "    port:\n")
    assert check_compose(broken).returncode != 0


def test_compose_wires_prometheus_and_grafana_to_the_server():
    compose = yaml.safe_load((DEPLOY / "compose.yaml").read_text())
    services = compose["services"]
    gpu = services["vllm"]["deploy"]["resources"]["reservations"]["devices"][0]
    assert gpu["driver"] == "nvidia" and "gpu" in gpu["capabilities"]
    assert "VLLM_API_KEY" in services["vllm"]["environment"]
    for name in ("prometheus", "grafana"):
        for volume in services[name]["volumes"]:
            source = volume.split(":")[0]
            assert (DEPLOY / source).exists(), f"{name} mounts missing {source}"
    scrape = yaml.safe_load((DEPLOY / "prometheus" / "prometheus.yml").read_text())
    assert scrape["scrape_configs"][0]["static_configs"][0]["targets"] == ["vllm:8000"]
    datasources = yaml.safe_load(
        (DEPLOY / "grafana/provisioning/datasources/prometheus.yaml").read_text())
    assert datasources["datasources"][0]["url"] == "http://prometheus:9090"
    providers = yaml.safe_load(
        (DEPLOY / "grafana/provisioning/dashboards/refreekv.yaml").read_text())
    dashboards_dir = providers["providers"][0]["options"]["path"]
    assert f"./grafana/dashboards:{dashboards_dir}:ro" in services["grafana"]["volumes"]
    home = services["grafana"]["environment"]["GF_DASHBOARDS_DEFAULT_HOME_DASHBOARD_PATH"]
    assert (DEPLOY / "grafana" / "dashboards" / Path(home).name).is_file()


def promtool(path: Path) -> subprocess.CompletedProcess:
    binary = shutil.which("promtool")
    assert binary, "promtool (Debian's prometheus package, installed by scripts/test.sh)"
    return run(binary, "check", "config", path)


def test_prometheus_config_passes_promtool(tmp_path):
    result = promtool(DEPLOY / "prometheus" / "prometheus.yml")
    assert result.returncode == 0, result.stdout + result.stderr
    broken = broken_copy(tmp_path, DEPLOY / "prometheus" / "prometheus.yml",
                         "scrape_interval: 15s", "scrape_interval: 15 seconds")
    assert promtool(broken).returncode != 0


# Kubernetes.

KUSTOMIZATIONS = ["base", "overlays/larger-model"]


def validate(manifests: list[dict[str, Any]]) -> None:
    for manifest in manifests:
        kubernetes_validate.validate(manifest, KUBERNETES_VERSION, strict=True)


@pytest.mark.parametrize("name", KUSTOMIZATIONS)
def test_rendered_manifests_match_the_kubernetes_schemas(name):
    manifests = render(DEPLOY / "kubernetes" / name)
    assert {m["kind"] for m in manifests} == {
        "ConfigMap", "PersistentVolumeClaim", "Deployment", "Service"}
    validate(manifests)


def test_schema_check_catches_a_broken_manifest():
    manifests = render(DEPLOY / "kubernetes" / "base")
    (deployment,) = [m for m in manifests if m["kind"] == "Deployment"]
    deployment["spec"]["template"]["spec"]["containers"][0]["ports"][0]["containerPort"] = "8k"
    with pytest.raises(kubernetes_validate.ValidationError):
        validate(manifests)


@pytest.mark.parametrize("name", KUSTOMIZATIONS)
def test_manifests_fit_together(name):
    by_kind = {m["kind"]: m for m in render(DEPLOY / "kubernetes" / name)}
    config = by_kind["ConfigMap"]["data"]
    pod = by_kind["Deployment"]["spec"]["template"]
    (container,) = pod["spec"]["containers"]
    env = {e["name"]: e["valueFrom"] for e in container["env"]}
    for source in env.values():
        if "configMapKeyRef" in source:
            assert source["configMapKeyRef"]["name"] == by_kind["ConfigMap"]["metadata"]["name"]
            assert source["configMapKeyRef"]["key"] in config
    for reference in re.findall(r"\$\((\w+)\)", " ".join(container["args"])):
        assert reference in env, f"$({reference}) is not defined"
    gpus = container["resources"]["limits"]["nvidia.com/gpu"]
    assert gpus == config["TENSOR_PARALLEL_SIZE"] == "1"  # ReFreeKV refuses TP > 1 for now
    assert config["REFREEKV_ADDITIONAL_CONFIG"].startswith('{"refreekv"')
    for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
        assert container[probe]["httpGet"]["path"] == "/health"
    startup = container["startupProbe"]
    assert startup["periodSeconds"] * startup["failureThreshold"] >= 600  # a cold compile
    assert pod["metadata"]["annotations"]["prometheus.io/path"] == "/metrics"
    claim = pod["spec"]["volumes"][0]["persistentVolumeClaim"]["claimName"]
    assert claim == by_kind["PersistentVolumeClaim"]["metadata"]["name"]
    service = by_kind["Service"]["spec"]
    assert service["selector"].items() <= pod["metadata"]["labels"].items()
    assert service["ports"][0]["targetPort"] == container["ports"][0]["name"]


def test_production_stack_values_run_refreekv_through_plain_vllm_serve():
    from refreekv_vllm.config import RefreeKVConfig
    from refreekv_vllm.entrypoints.engine_args import endpoints_allowed, wants_refreekv

    values = yaml.safe_load((DEPLOY / "production-stack" / "values.yaml").read_text())
    (model,) = values["servingEngineSpec"]["modelSpec"]
    extra = model["vllmConfig"]["extraArgs"]
    additional = json.loads(extra[extra.index("--additional-config") + 1])
    assert wants_refreekv(additional)
    RefreeKVConfig.from_additional_config(additional)
    env = {e["name"]: e["value"] for e in model["env"]}
    assert endpoints_allowed(env["VLLM_PLUGINS"])
    dockerfile_tag = re.search(r"^ARG VLLM_TAG=(\S+)$", (REPO / "Dockerfile").read_text(), re.M)
    assert model["tag"] == dockerfile_tag.group(1)
