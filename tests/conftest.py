"""Session-wide fixtures: converted models are prepared once per machine (cached)."""

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
