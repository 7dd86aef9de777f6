"""Session-wide fixtures: converted models are prepared once per machine (cached); a model's
shape alone is a config.json."""

import os
from pathlib import Path

import pytest
import torch

if not torch.cuda.is_available():
    # Triton kernels run in Triton's interpreter on CPU machines; this must be set before
    # anything (vLLM included) imports triton.
    os.environ.setdefault("TRITON_INTERPRET", "1")


@pytest.fixture(scope="session")
def smollm2_dir() -> Path:
    from refreekv_vllm.models import prepare_smollm2

    return prepare_smollm2()


@pytest.fixture(scope="session")
def tiny_llama_dir() -> Path:
    from refreekv_vllm.models import prepare_tiny_llama

    return prepare_tiny_llama()


@pytest.fixture(scope="session")
def model_config_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """vLLM's scheduler-side and worker-side objects need a model's shape only: a
    ``config.json`` (``tests/core/utils.py``), no weights, nothing converted."""
    from tests.core.utils import write_model_config

    return write_model_config(tmp_path_factory.mktemp("llama-config"))
