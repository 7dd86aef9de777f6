"""Parsing of server-wide and per-request ReFreeKV settings."""

import math

import pytest

from refreekv_vllm.config import ConfigError, RefreeKVConfig, request_settings


def test_defaults_are_the_documented_ones():
    config = RefreeKVConfig.from_additional_config(None)
    assert (config.threshold, config.window, config.window_agg) == (0.005, 32, "mean")
    assert (config.num_sink_tokens, config.frozen_layers, config.policy) == (4, (0, 1),
                                                                              "threshold")
    assert not config.reuse_attention_lse
    assert RefreeKVConfig.from_additional_config(
        {"refreekv": {"reuse_attention_lse": True}}).reuse_attention_lse


@pytest.mark.parametrize(("raw", "field"), [
    ({"threshold": -0.1}, "threshold"),
    ({"window": 0}, "window"),
    ({"window_agg": "sum"}, "window_agg"),
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
    assert (settings.threshold, settings.window, settings.window_agg) == (0.05, 8, "mean")
    assert settings.prunes
    assert not request_settings(config, {"refreekv_threshold": 0}).prunes
    assert not request_settings(config, {"refreekv_enabled": False}).prunes


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
    assert fixed.prunes
    assert not request_settings(config, {"refreekv_policy": "fixed",
                                         "refreekv_budget": 1.0}).prunes


@pytest.mark.parametrize(("budget", "n", "kept"), [(0.5, 1000, 500), (0.2, 1000, 200),
                                                   (0.9, 101, 91), (0.01, 100, 2)])
def test_fixed_cut_keeps_sinks_plus_recent_tokens(budget, n, kept):
    settings = request_settings(RefreeKVConfig(), {"refreekv_policy": "fixed",
                                                   "refreekv_budget": budget})
    cut = settings.fixed_cut(n, num_sink_tokens=4)
    assert 4 <= cut <= n - 1
    # sinks + [cut, n): the named share, except where the last token and sinks set a floor
    assert 4 + (n - cut) == max(kept, 5)
