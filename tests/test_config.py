"""Parsing of server-wide and per-request ReFreeKV settings."""

import math

import pytest

from refreekv_vllm.config import ConfigError, RefreeKVConfig, request_settings
from refreekv_vllm.policy.policies import FixedBudgetPolicy, ThresholdPolicy


def test_defaults_are_the_documented_ones():
    config = RefreeKVConfig.from_additional_config(None)
    assert (config.threshold, config.window, config.window_agg) == (0.005, 64, "mean")
    assert (config.num_sink_tokens, config.frozen_layers, config.policy) == (4, (0, 1),
                                                                              "threshold")
    assert not config.reuse_attention_lse
    assert RefreeKVConfig.from_additional_config(
        {"refreekv": {"reuse_attention_lse": True}}).reuse_attention_lse


@pytest.mark.parametrize(("raw", "field"), [
    ({"threshold": -0.1}, "threshold"),
    ({"window": 0}, "window"),
    ({"window_agg": "sum"}, "window_agg"),
    ({"head_agg": "median"}, "head_agg"),
    ({"policy": "fixed"}, "budget"),
    ({"policy": "fixed", "budget": 1.5}, "budget"),
    ({"budget": math.nan}, "budget"),
    ({"frozen_layers": 3}, "frozen_layers"),
    ({"thresold": 0.1}, "thresold"),
    ({"reuse_attention_lse": "yes"}, "reuse_attention_lse"),
])
def test_bad_server_config_names_the_field(raw, field):
    with pytest.raises(ConfigError, match=field):
        RefreeKVConfig.from_additional_config({"refreekv": raw})


def test_request_overrides_apply_on_top_of_the_server_config():
    config = RefreeKVConfig.from_additional_config({"refreekv": {"window": 8}})
    settings = request_settings(config, {"refreekv_threshold": 0.05,
                                         "refreekv_window_agg": "mean"})
    assert settings.policy == ThresholdPolicy(threshold=0.05, window=8, window_agg="mean")
    assert settings.prunes
    assert not request_settings(config, {"refreekv_threshold": 0}).prunes
    assert not request_settings(config, {"refreekv_enabled": False}).prunes


def test_a_request_may_ask_every_head_to_keep_its_norm():
    config = RefreeKVConfig()
    settings = request_settings(config, {"refreekv_head_agg": "max"})
    assert settings.policy == ThresholdPolicy(threshold=0.005, window=64, window_agg="mean",
                                              head_agg="max")
    assert settings.policy.describe()["head_agg"] == "max"
    assert request_settings(config, None).policy.head_agg == "mean"  # the paper's mean
    with pytest.raises(ConfigError, match="refreekv_head_agg applies to refreekv_policy "
                                          "'threshold' only"):
        request_settings(config, {"refreekv_policy": "fixed", "refreekv_budget": 0.5,
                                  "refreekv_head_agg": "max"})


def test_a_request_cannot_enable_pruning_on_a_disabled_server():
    config = RefreeKVConfig.from_additional_config({"refreekv": {"enabled": False}})
    assert not request_settings(config, {"refreekv_enabled": True}).prunes


def test_budget_needs_the_fixed_policy():
    config = RefreeKVConfig()
    with pytest.raises(ConfigError, match="refreekv_budget"):
        request_settings(config, {"refreekv_budget": 0.5})
    with pytest.raises(ConfigError, match="refreekv_budget"):
        request_settings(config, {"refreekv_policy": "fixed"})
    fixed = request_settings(config, {"refreekv_policy": "fixed", "refreekv_budget": 0.5})
    assert fixed.prunes and fixed.policy == FixedBudgetPolicy(budget=0.5)
    with pytest.raises(ConfigError, match="refreekv_threshold applies to refreekv_policy "
                                          "'threshold' only"):
        request_settings(config, {"refreekv_policy": "fixed", "refreekv_budget": 0.5,
                                  "refreekv_threshold": 0.01})
    assert not request_settings(config, {"refreekv_policy": "fixed",
                                         "refreekv_budget": 1.0}).prunes


@pytest.mark.parametrize(("budget", "n", "kept"), [(0.5, 1000, 500), (0.2, 1000, 200),
                                                   (0.9, 101, 91), (0.01, 100, 2)])
def test_fixed_cut_keeps_sinks_plus_recent_tokens(budget, n, kept):
    policy = request_settings(RefreeKVConfig(), {"refreekv_policy": "fixed",
                                                 "refreekv_budget": budget}).policy
    cut = policy.fixed_cut(n, num_sink_tokens=4)
    assert cut is not None
    assert 4 <= cut <= n - 1
    # sinks + [cut, n): the named share, except where the last token and sinks set a floor
    assert 4 + (n - cut) == max(kept, 5)


@pytest.mark.parametrize("value", [1, "true", True])
def test_flags_arrive_as_json_or_as_vllm_coerced_them(value):
    config = RefreeKVConfig.from_additional_config({"refreekv": {"enabled": False}})
    assert not config.enabled
    assert request_settings(RefreeKVConfig(), {"refreekv_enabled": value}).enabled


@pytest.mark.parametrize(("xargs", "field"), [
    ({"refreekv_window": 8.0}, "refreekv_window"),
    ({"refreekv_window": "8"}, "refreekv_window"),
    ({"refreekv_threshold": "0.01"}, "refreekv_threshold"),
    ({"refreekv_threshold": True}, "refreekv_threshold"),
    ({"refreekv_enabled": "yes"}, "refreekv_enabled"),
    ({"refreekv_windw": 3}, "refreekv_windw"),
    ({"refreekv_head_agg": "min"}, "refreekv_head_agg"),
])
def test_request_overrides_use_the_server_validators(xargs, field):
    with pytest.raises(ConfigError, match=f"{field}"):
        request_settings(RefreeKVConfig(), xargs)
    server_field = field.removeprefix("refreekv_")
    if server_field in RefreeKVConfig.model_fields:  # the same value refused at startup
        with pytest.raises(ConfigError, match=f"refreekv.{server_field}"):
            RefreeKVConfig.from_additional_config({"refreekv": {server_field: xargs[field]}})


def test_the_config_is_built_once_per_content():
    raw = {"refreekv": {"window": 8, "frozen_layers": [1, 0, 1]}}
    first = RefreeKVConfig.from_additional_config(raw)
    assert first.frozen_layers == (0, 1)
    assert RefreeKVConfig.from_additional_config({"refreekv": {"frozen_layers": [0, 1],
                                                               "window": 8}}) is not first
    assert RefreeKVConfig.from_additional_config(dict(raw)) is first
    with pytest.raises(ValueError, match="frozen"):
        first.window = 4  # frozen: shared by every component of the process


def test_requests_without_overrides_share_the_server_settings():
    config = RefreeKVConfig.from_additional_config({"refreekv": {"policy": "fixed",
                                                                 "budget": 0.25}})
    assert request_settings(config, None) is request_settings(config, {"other_plugin": 1})
    assert request_settings(config, None).policy == FixedBudgetPolicy(budget=0.25)
    # a request may switch to ReFreeKV's rule, which reads the server's threshold and window
    assert request_settings(config, {"refreekv_policy": "threshold"}).policy == ThresholdPolicy(
        threshold=0.005, window=64, window_agg="mean")
