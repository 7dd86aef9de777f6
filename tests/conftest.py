"""Session-wide fixtures: converted models are prepared once per machine (cached)."""

from pathlib import Path

import pytest


@pytest.fixture(scope="session")
def smollm2_dir() -> Path:
    from refreekv_vllm.models import prepare_smollm2

    return prepare_smollm2()


@pytest.fixture(scope="session")
def tiny_llama_dir() -> Path:
    from refreekv_vllm.models import prepare_tiny_llama

    return prepare_tiny_llama()
