"""The cut policies a request can be pruned with, one small class each, and their registry.

A policy answers three questions for the worker and the scheduler: does it prune at all, how
many of the prompt's last query rows must be kept for scoring (0: nothing is scored), and is the
cut known without scoring. Adding a policy is a class here, an entry in :data:`POLICIES` and its
settings in ``config.py``.
"""

from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import Any, ClassVar


class CutPolicy(ABC):
    name: ClassVar[str]

    @property
    @abstractmethod
    def prunes(self) -> bool:
        """Whether a request under this policy can lose any token."""

    def window_rows(self, num_prompt_tokens: int) -> int:
        """How many of the prompt's last query rows the scorer needs (0: none, not scored)."""
        return 0

    def fixed_cut(self, num_prompt_tokens: int, num_sink_tokens: int) -> int | None:
        """Every layer's cut when it is known without scoring, else None."""
        return None

    def describe(self) -> dict[str, Any]:
        """The policy's settings for a request's record (every policy's keys, None if unused)."""
        return {"policy": self.name, "threshold": None, "window": None, "window_agg": None,
                "head_agg": None, "budget": None}


@dataclass(frozen=True)
class ThresholdPolicy(CutPolicy):
    """ReFreeKV: the shortest recent suffix whose attention norm stays within ``threshold`` of
    the full one, scored on the last ``window`` prompt rows combined by ``window_agg``, the
    heads by ``head_agg`` (``"mean"`` of their norms, or ``"max"``: every head's own norm). The
    paper's rule is ``window=1``, ``head_agg="mean"``."""

    name: ClassVar[str] = "threshold"
    threshold: float
    window: int
    window_agg: str
    head_agg: str = "mean"

    @property
    def prunes(self) -> bool:
        return self.threshold > 0

    def window_rows(self, num_prompt_tokens: int) -> int:
        return min(self.window, num_prompt_tokens)

    def describe(self) -> dict[str, Any]:
        return {**super().describe(), "threshold": self.threshold, "window": self.window,
                "window_agg": self.window_agg, "head_agg": self.head_agg}


@dataclass(frozen=True)
class FixedBudgetPolicy(CutPolicy):
    """StreamingLLM-style baseline: every layer keeps the sinks plus the most recent tokens,
    ``budget`` of the prompt in all."""

    name: ClassVar[str] = "fixed"
    budget: float

    @property
    def prunes(self) -> bool:
        return self.budget < 1.0

    def fixed_cut(self, num_prompt_tokens: int, num_sink_tokens: int) -> int:
        """Keep ``round(budget * n)`` tokens, sinks included, and never cut the last token."""
        kept = round(self.budget * num_prompt_tokens)
        cut = num_prompt_tokens + num_sink_tokens - kept
        return max(num_sink_tokens, min(cut, num_prompt_tokens - 1))

    def describe(self) -> dict[str, Any]:
        return {**super().describe(), "budget": self.budget}


POLICIES: dict[str, type[CutPolicy]] = {
    ThresholdPolicy.name: ThresholdPolicy,
    FixedBudgetPolicy.name: FixedBudgetPolicy,
}
