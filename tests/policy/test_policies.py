"""The cut policies: what each one asks of the worker, and the registry they are chosen from."""

import dataclasses

import pytest

from refreekv_vllm.config import POLICY_SETTINGS, RefreeKVConfig, RequestOverrides
from refreekv_vllm.policy.policies import (
    POLICIES,
    CutPolicy,
    FixedBudgetPolicy,
    ThresholdPolicy,
)


def test_threshold_policy_scores_its_window_and_prunes_above_zero():
    rule = ThresholdPolicy(threshold=0.01, window=32, window_agg="mean")
    assert rule.prunes and rule.fixed_cut(1000, 4) is None
    assert rule.window_rows(1000) == 32 and rule.window_rows(10) == 10
    assert not ThresholdPolicy(threshold=0.0, window=1, window_agg="max").prunes


def test_fixed_budget_scores_nothing_and_knows_its_cut():
    fixed = FixedBudgetPolicy(budget=0.5)
    assert fixed.prunes and fixed.window_rows(1000) == 0
    assert fixed.fixed_cut(1000, 4) == 504  # 4 sinks + the last 496 tokens = 500 kept
    assert not FixedBudgetPolicy(budget=1.0).prunes


@pytest.mark.parametrize("name", sorted(POLICIES))
def test_every_registered_policy_is_configurable_and_described(name):
    cls = POLICIES[name]
    assert cls.name == name and issubclass(cls, CutPolicy)
    settings = POLICY_SETTINGS[name]
    assert settings == tuple(f.name for f in dataclasses.fields(cls))  # type: ignore[arg-type]
    # each setting a policy reads is a server option and a request override
    assert set(settings) <= set(RefreeKVConfig.model_fields)
    assert set(settings) <= set(RequestOverrides.model_fields)
    values = {"threshold": 0.01, "window": 8, "window_agg": "max", "head_agg": "max",
              "budget": 0.5}
    described = cls(**{s: values[s] for s in settings}).describe()
    assert described["policy"] == name
    assert set(described) == {"policy", *values}
    assert all(described[s] == values[s] for s in settings)
