from pathlib import Path

import pytest

from tests.core.utils import write_model_config


@pytest.fixture(scope="session")
def model_config_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The scheduler side needs a model's shape only: a ``config.json``, nothing converted."""
    return write_model_config(tmp_path_factory.mktemp("llama-config"))
