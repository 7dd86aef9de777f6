"""The ModelRunnerOutput inside vLLM's async-scheduling wrapper (registered in
``patches/__init__.py``)."""

from typing import Any


def model_runner_output(output: Any) -> Any:
    """The ``ModelRunnerOutput`` that ``output`` is or wraps: under async scheduling the model
    runner returns an ``AsyncGPUModelRunnerOutput`` that holds it privately."""
    return getattr(output, "_model_runner_output", output)
