"""The repository stands alone: no file points at design notes or folders outside it, and the
benchmarks run as modules of the repository (no test imports, no ``sys.path`` edits)."""

import re
import subprocess
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
OUTSIDE = re.compile(r"\.\./shared|\b(?:METHOD|VLLM|MEASURED|LANDSCAPE|ASSETS|STYLE)\.md\b")


def test_no_file_points_outside_the_repository():
    tracked = subprocess.run(["git", "ls-files"], cwd=REPO, check=True, capture_output=True,
                             text=True).stdout.split()
    offenders = []
    for name in tracked:
        path = REPO / name
        if path.suffix not in {".py", ".md", ".sh", ".toml", ".txt", ".yaml", ".yml", ".cu",
                               ".cpp", ""} or not path.is_file():
            continue
        for number, line in enumerate(path.read_text(errors="replace").splitlines(), 1):
            if OUTSIDE.search(line) and path != Path(__file__):
                offenders.append(f"{name}:{number}: {line.strip()[:80]}")
    assert not offenders, "\n".join(offenders)


def test_benchmarks_import_no_tests_and_edit_no_import_path():
    offenders = []
    for path in sorted((REPO / "benchmarks").rglob("*.py")):
        for number, line in enumerate(path.read_text().splitlines(), 1):
            if re.match(r"\s*(from tests\b|import tests\b)", line) or "sys.path" in line:
                offenders.append(f"{path.relative_to(REPO)}:{number}: {line.strip()}")
    assert not offenders, "\n".join(offenders)
