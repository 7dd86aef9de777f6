"""The package's folders depend on each other one way: the engine core never reaches into the
worker or the attention path; the worker and attention never import each other (the worker
names backends by path, both share the step's state through ``forward/``); the reference
policy and the kernels depend on nothing that runs inside vLLM; vLLM's private names are
imported in ``patches/`` only."""

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "refreekv_vllm"

# folder -> folders of the package it must not import (at module level or inside functions)
FORBIDDEN = {
    "core": {"worker", "attention", "ops"},
    "worker": {"attention"},
    "attention": {"worker"},
    "forward": {"core", "worker", "attention", "entrypoints", "metrics"},
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
    module.write_text("def f():\n    from refreekv_vllm.forward.layer_tables import LayerTables\n")
    assert _imported_folders(module) == {"forward"}


def _private_vllm_imports(path: Path) -> list[str]:
    """``vllm`` modules or names with a leading underscore that ``path`` imports."""
    found = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module and \
                node.module.split(".")[0] == "vllm":
            private_module = any(part.startswith("_") for part in node.module.split("."))
            names = [alias.name for alias in node.names if alias.name.startswith("_")]
            if private_module or names:
                found.append(f"{node.module}: {', '.join(a.name for a in node.names)}")
        elif isinstance(node, ast.Import):
            found += [alias.name for alias in node.names if alias.name.split(".")[0] == "vllm"
                      and any(part.startswith("_") for part in alias.name.split("."))]
    return found


def test_vllm_privates_are_imported_in_the_patches_folder_only():
    offenders = [f"{path.relative_to(PACKAGE.parent)} imports {name}"
                 for path in sorted(PACKAGE.rglob("*.py"))
                 if path.relative_to(PACKAGE).parts[0] != "patches"
                 for name in _private_vllm_imports(path)]
    assert not offenders, "\n".join(offenders)


def test_private_imports_in_the_patches_folder_are_registered_hooks():
    from refreekv_vllm.patches import HOOKS

    registered = {hook.symbol.partition(":")[0] for hook in HOOKS}
    for path in sorted((PACKAGE / "patches").glob("*.py")):
        for name in _private_vllm_imports(path):
            module, _, imported = name.partition(": ")
            assert f"{module}.{imported}" in registered or module in registered, name


def test_the_private_import_check_sees_both_forms(tmp_path):
    module = tmp_path / "m.py"
    module.write_text("import vllm._custom_ops\ndef f():\n    from vllm import _custom_ops\n"
                      "from vllm.v1.worker.gpu_model_runner import GPUModelRunner\n")
    assert _private_vllm_imports(module) == ["vllm._custom_ops", "vllm: _custom_ops"]
