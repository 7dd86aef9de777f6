"""The package's folders depend on each other one way: the engine core never reaches into the
worker or the attention path, the worker never into attention (it names backends by path), and
the reference policy and the kernels depend on nothing that runs inside vLLM."""

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "refreekv_vllm"

# folder -> folders of the package it must not import (at module level or inside functions)
FORBIDDEN = {
    "core": {"worker", "attention", "ops"},
    "worker": {"attention"},
    "policy": {"core", "worker", "attention", "ops", "entrypoints", "metrics"},
    "ops": {"core", "worker", "attention", "entrypoints", "metrics"},
    "patches": {"core", "worker", "attention", "ops", "entrypoints", "metrics", "policy"},
}


def _imported_folders(path: Path) -> set[str]:
    folders = set()
    for node in ast.walk(ast.parse(path.read_text())):
        names = []
        if isinstance(node, ast.ImportFrom) and node.module:
            names = [node.module]
        elif isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        for name in names:
            parts = name.split(".")
            if parts[0] == "refreekv_vllm" and len(parts) > 1:
                folders.add(parts[1])
    return folders


def test_folders_depend_on_each_other_one_way():
    offenders = []
    for folder, forbidden in FORBIDDEN.items():
        for path in sorted((PACKAGE / folder).rglob("*.py")):
            for imported in sorted(_imported_folders(path) & forbidden):
                offenders.append(f"{path.relative_to(PACKAGE.parent)} imports {imported}/")
    assert not offenders, "\n".join(offenders)


def test_the_check_sees_imports_inside_functions(tmp_path):
    module = tmp_path / "m.py"
    module.write_text("def f():\n    from refreekv_vllm.worker.layer_tables import LayerTables\n")
    assert _imported_folders(module) == {"worker"}
