"""Markers for the fast subset (``pytest -m "not e2e and not slow"``, seconds on a laptop)."""

from collections.abc import Sequence
from typing import Any

import pytest

slow = pytest.mark.slow


def sweep(values: Sequence[Any], fast: int = 1) -> list[Any]:
    """Parameters of a sweep: the first ``fast`` cases stay in the fast subset, the others are
    ``slow`` (each runs for about a second in Triton's interpreter on CPUs)."""
    return [value if i < fast else pytest.param(value, marks=slow)
            for i, value in enumerate(values)]
