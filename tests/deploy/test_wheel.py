"""The wheel built from the Docker build context (the repository's files that ``.dockerignore``
lets through), installed as the image installs it: in a clean virtual environment with
``pip install --no-deps``. It must carry the CUDA kernel's sources (so
``kernel: cuda`` can build them where no prebuilt ``_refreekv_C`` ships) and vLLM's plugin entry
points."""

import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

from tests.deploy.test_static_checks import docker_context, dockerignore_patterns
from tests.markers import slow

REPO = Path(__file__).resolve().parents[2]

RESOLVE_SOURCES = """
import importlib.util, pathlib, sysconfig
site = pathlib.Path(sysconfig.get_paths()["purelib"])
spec = importlib.util.spec_from_file_location(
    "build_cuda", site / "refreekv_vllm" / "ops" / "build_cuda.py")
build_cuda = importlib.util.module_from_spec(spec)
spec.loader.exec_module(build_cuda)
paths = build_cuda.source_paths()
assert all(pathlib.Path(p).is_relative_to(site) for p in paths), paths
print("\\n".join(paths))
"""


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> Path:
    tracked = subprocess.run(["git", "ls-files"], cwd=REPO, check=True, capture_output=True,
                             text=True).stdout.split()
    context = tmp_path_factory.mktemp("context")
    patterns = dockerignore_patterns((REPO / ".dockerignore").read_text())
    for path in docker_context(patterns, tracked):
        (context / path).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(REPO / path, context / path)
    out = tmp_path_factory.mktemp("wheel")
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation",
                    "-w", str(out), str(context)], check=True, capture_output=True, timeout=300)
    (path,) = out.glob("refreekv_vllm-*.whl")
    return path


@slow
def test_wheel_carries_kernel_sources_and_plugin_entry_points(wheel):
    with zipfile.ZipFile(wheel) as archive:
        names = set(archive.namelist())
        entry_points = next(archive.read(n).decode() for n in names
                            if n.endswith(".dist-info/entry_points.txt"))
    for source in (REPO / "csrc").iterdir():
        assert f"refreekv_vllm/csrc/{source.name}" in names
    assert "refreekv = refreekv_vllm.plugin:register" in entry_points
    assert "refreekv_endpoints = refreekv_vllm.entrypoints.endpoints:RefreeKVEndpoints" in (
        entry_points)
    assert not any(n.startswith(("tests/", "benchmarks/", ".venv")) for n in names)


@slow
def test_clean_venv_install_resolves_the_kernel_sources(wheel, tmp_path):
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True, timeout=120)
    python = venv / "bin" / "python"
    subprocess.run([str(python), "-m", "pip", "install", "--no-deps", "--no-index", str(wheel)],
                   check=True, capture_output=True, timeout=300)
    result = subprocess.run([str(python), "-c", RESOLVE_SOURCES], capture_output=True,
                            text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    assert {Path(p).name for p in result.stdout.split()} == {"torch_bindings.cpp",
                                                             "last_row_scores.cu"}
