"""The cache policies compared, each selected per request through ``SamplingParams.extra_args``
(vLLM's ``vllm_xargs``) in one engine.

- ``full``: ReFreeKV disabled for the request (``refreekv_enabled: false``), i.e. the full cache.
  ``full-rerun`` repeats it after everything is in the prefix cache: its agreement with ``full``
  is the noise floor of greedy decoding on this backend.
- ``refreekv-w{w}[-{agg}][-heads]-T{T}``: ReFreeKV at threshold T with observation window w
  (w = 1 is the paper's last-token rule; agg combines the window's rows per head; ``-heads``:
  every head keeps its own norm within T instead of the mean of the heads' norms).
- ``fixed-{b}``: a fixed budget b of the prompt, StreamingLLM style (sinks + most recent
  tokens, the same cut on every layer), freed through the same block mechanism.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from refreekv_vllm.config import REQUEST_KEY_PREFIX
from refreekv_vllm.policy.policies import CutPolicy, FixedBudgetPolicy, ThresholdPolicy

# The engine-wide configuration the benchmark pins (the plugin's defaults): requests that leave
# a key out get these values.
ENGINE_CONFIG: dict[str, Any] = {"threshold": 0.005, "window": 64, "window_agg": "mean"}
THRESHOLDS = (0.005, 0.01, 0.02, 0.05)
# w = 64 (the largest window the kernels take) was asked for by the layer analysis: it runs on
# the development split and is kept only if it earns it there.
WINDOWS = ((1, None), (8, "max"), (8, "mean"), (32, "max"), (32, "mean"), (64, "mean"))
# Every head keeping its own norm (the layer analysis's "per-head max": 6/6 passkeys at w = 1,
# budget 0.725; with w = 32 max the only rule under which no copy layer lost the needle): on
# the development split, kept only if it earns it there.
EVERY_HEAD_WINDOWS = ((1, None), (32, "max"))
FIXED_BUDGETS = (0.9, 0.5, 0.2)


@dataclass(frozen=True)
class Policy:
    """One compared policy: the full cache (``rule`` None) or one of the package's cut
    policies (``refreekv_vllm.policy.policies``), whose settings the request sends."""

    rule: CutPolicy | None = None
    rerun: bool = False

    @property
    def adaptive(self) -> bool:
        """A ReFreeKV rule: the budget is its output."""
        return isinstance(self.rule, ThresholdPolicy)

    @property
    def fixed(self) -> bool:
        """The fixed-budget baseline."""
        return isinstance(self.rule, FixedBudgetPolicy)

    @property
    def budget(self) -> float:
        return self.rule.budget if isinstance(self.rule, FixedBudgetPolicy) else 1.0

    @property
    def name(self) -> str:
        rule = self.rule
        if rule is None:
            return "full-rerun" if self.rerun else "full"
        if isinstance(rule, FixedBudgetPolicy):
            return f"fixed-{rule.budget:g}"
        assert isinstance(rule, ThresholdPolicy)
        agg = f"-{rule.window_agg}" if rule.window > 1 else ""
        heads = "-heads" if rule.head_agg == "max" else ""
        return f"refreekv-w{rule.window}{agg}{heads}-T{rule.threshold:g}"

    @property
    def family(self) -> str:
        """Plot series: policies that differ only in T (or the fixed budget)."""
        rule = self.rule
        if isinstance(rule, ThresholdPolicy):
            return (f"ReFreeKV w={rule.window}" + (f" {rule.window_agg}" if rule.window > 1 else "")
                    + (" every head" if rule.head_agg == "max" else ""))
        return "full cache" if rule is None else "fixed budget"

    def xargs(self) -> dict[str, Any]:
        """The request's ``vllm_xargs`` selecting this policy: its registry name and every
        setting it has."""
        if self.rule is None:
            return {"refreekv_enabled": False}
        settings = self.rule.describe()
        return {REQUEST_KEY_PREFIX + key: value for key, value in settings.items()
                if value is not None}


def threshold_rule(threshold: float, window: int = 1, window_agg: str | None = None,
                   head_agg: str = "mean") -> Policy:
    """A ReFreeKV policy (a window of one row has nothing to aggregate: ``max``)."""
    return Policy(ThresholdPolicy(threshold=threshold, window=window,
                                  window_agg=window_agg or "max", head_agg=head_agg))


def fixed_budget(budget: float) -> Policy:
    return Policy(FixedBudgetPolicy(budget=budget))


FULL = Policy()
FULL_RERUN = Policy(rerun=True)
PAPER_RULE = threshold_rule(0.01)


def configured_default(engine_config: dict[str, Any]) -> Policy:
    """The rule an engine with ``engine_config`` (the keys of ``ENGINE_CONFIG``) applies to a
    request that names none."""
    return threshold_rule(engine_config["threshold"], engine_config["window"],
                          engine_config["window_agg"])


CONFIGURED_DEFAULT = configured_default(ENGINE_CONFIG)


def full_grid() -> list[Policy]:
    refreekv = [threshold_rule(t, w, agg) for w, agg in WINDOWS for t in THRESHOLDS]
    refreekv += [threshold_rule(t, w, agg, head_agg="max")
                 for w, agg in EVERY_HEAD_WINDOWS for t in THRESHOLDS]
    fixed = [fixed_budget(b) for b in FIXED_BUDGETS]
    return [FULL, FULL_RERUN, *refreekv, *fixed]


def quick_grid() -> list[Policy]:
    return [FULL, PAPER_RULE, CONFIGURED_DEFAULT, fixed_budget(0.5)]


def select(policies: Sequence[Policy], names: Sequence[str] | None) -> list[Policy]:
    """The named policies in the given order, after ``full`` (the reference, always run).
    ``fixed-{b}`` names any budget b in (0, 1] (the iso-budget baselines' are measured ones)."""
    if not names:
        return list(policies)
    by_name = {p.name: p for p in full_grid() + list(policies)}
    for name in set(names) - set(by_name):
        budget = _fixed_budget_of(name)
        if budget is not None:
            by_name[name] = fixed_budget(budget)
    unknown = sorted(set(names) - set(by_name))
    if unknown:
        raise ValueError(f"unknown policies {unknown}; known: {sorted(by_name)}")
    chosen = [FULL] + [by_name[n] for n in names if n != FULL.name]
    return list(dict.fromkeys(chosen))


def _fixed_budget_of(name: str) -> float | None:
    """b of a ``fixed-{b}`` name written by :attr:`Policy.name`, else None."""
    prefix, _, value = name.partition("-")
    try:
        budget = float(value)
    except ValueError:
        return None
    if prefix != "fixed" or not 0 < budget <= 1 or fixed_budget(budget).name != name:
        return None
    return budget
