"""ReFreeKV settings: server-wide from ``--additional-config '{"refreekv": {...}}'`` and
per request from ``vllm_xargs`` (``SamplingParams.extra_args``).

Both parsers raise :class:`ConfigError` with a message naming the offending field, so the server
can answer a bad request with HTTP 400 and refuse a bad startup config readably.
"""

import math
from collections.abc import Mapping
from dataclasses import dataclass, replace
from typing import Any

ADDITIONAL_CONFIG_KEY = "refreekv"
REQUEST_KEY_PREFIX = "refreekv_"
AGGREGATIONS = ("max", "mean")
POLICIES = ("threshold", "fixed")
KERNELS = ("auto", "triton", "cuda", "torch")
MAX_WINDOW = 64
MAX_THRESHOLD = 0.5


class ConfigError(ValueError):
    """A ReFreeKV setting is invalid; the message names the field."""


@dataclass(frozen=True)
class RefreeKVConfig:
    enabled: bool = True
    """Prune after prefill. When False the engine behaves exactly as plain vLLM."""
    threshold: float = 0.005
    """T: largest allowed relative drop of the head-averaged attention norm (0 prunes nothing).
    The paper uses 0.01; 0.005 with a 32-row window and mean aggregation is the one setting that
    kept quality on every task of benchmarks/results/fidelity.md."""
    window: int = 32
    """Observation window w: score rows of the last w prompt tokens (1 = the paper's rule)."""
    window_agg: str = "mean"
    """How the window's rows are combined per head before the norm test: max or mean."""
    num_sink_tokens: int = 4
    """m: first prompt tokens that are always kept and excluded from the norm."""
    frozen_layers: tuple[int, ...] = (0, 1)
    """Layers that are never pruned."""
    kernel: str = "auto"
    """Scoring backend: auto (the faster GPU kernel on GPUs, torch on CPU), triton, cuda or
    torch."""
    reuse_attention_lse: bool = False
    """Windows (w > 1) take their rows' softmax normalisers from the prefill's FlashAttention
    instead of a first pass of the Triton kernel over the keys: less device time per scoring
    step, more host time in every layer's attention call of that step (on the H200 the host
    cost was the larger one; docs/design.md)."""
    policy: str = "threshold"
    """threshold: ReFreeKV's budget-free cut. fixed: a StreamingLLM-style baseline that keeps the
    sinks plus the most recent tokens, ``budget`` of the prompt, in every layer."""
    budget: float | None = None
    """Fraction of the prompt the fixed policy keeps, in (0, 1]; required for policy fixed."""

    def scored_layers(self, num_layers: int) -> tuple[int, ...]:
        """The layers of a ``num_layers``-layer model that are scored (not frozen)."""
        return tuple(layer for layer in range(num_layers) if layer not in self.frozen_layers)

    def __post_init__(self) -> None:
        if self.policy == "fixed" and self.budget is None:
            raise ConfigError(f"additional_config.{ADDITIONAL_CONFIG_KEY}.budget is required "
                              "with policy 'fixed'")

    @classmethod
    def from_additional_config(cls, additional_config: Mapping[str, Any] | None
                               ) -> "RefreeKVConfig":
        raw = (additional_config or {}).get(ADDITIONAL_CONFIG_KEY, {})
        if not isinstance(raw, Mapping):
            raise ConfigError(f"additional_config.{ADDITIONAL_CONFIG_KEY} must be an object")
        known = set(cls.__dataclass_fields__)
        unknown = sorted(set(raw) - known)
        if unknown:
            raise ConfigError(f"unknown {ADDITIONAL_CONFIG_KEY} option(s) {unknown}; "
                              f"known: {sorted(known)}")
        prefix = f"additional_config.{ADDITIONAL_CONFIG_KEY}."
        values: dict[str, Any] = {}
        if "enabled" in raw:
            values["enabled"] = _parse_bool(raw["enabled"], prefix + "enabled")
        if "threshold" in raw:
            values["threshold"] = _parse_threshold(raw["threshold"], prefix + "threshold")
        if "window" in raw:
            values["window"] = _parse_window(raw["window"], prefix + "window")
        if "window_agg" in raw:
            values["window_agg"] = _parse_choice(raw["window_agg"], AGGREGATIONS,
                                                 prefix + "window_agg")
        if "num_sink_tokens" in raw:
            values["num_sink_tokens"] = _parse_int(raw["num_sink_tokens"], 0, 1024,
                                                   prefix + "num_sink_tokens")
        if "frozen_layers" in raw:
            layers = raw["frozen_layers"]
            if not isinstance(layers, list | tuple):
                raise ConfigError(f"{prefix}frozen_layers must be a list of layer indices")
            values["frozen_layers"] = tuple(
                sorted({_parse_int(x, 0, 100_000, prefix + "frozen_layers") for x in layers}))
        if "reuse_attention_lse" in raw:
            values["reuse_attention_lse"] = _parse_bool(raw["reuse_attention_lse"],
                                                        prefix + "reuse_attention_lse")
        if "kernel" in raw:
            values["kernel"] = _parse_choice(raw["kernel"], KERNELS, prefix + "kernel")
        if "policy" in raw:
            values["policy"] = _parse_choice(raw["policy"], POLICIES, prefix + "policy")
        if "budget" in raw:
            values["budget"] = _parse_budget(raw["budget"], prefix + "budget")
        return cls(**values)


@dataclass(frozen=True)
class RequestSettings:
    """The settings one request is pruned with (server config plus its overrides)."""
    enabled: bool
    threshold: float
    window: int
    window_agg: str
    policy: str
    budget: float | None

    @property
    def prunes(self) -> bool:
        """Whether the request is to be pruned at all (T=0 and budget 1 keep everything)."""
        if not self.enabled:
            return False
        if self.policy == "fixed":
            return self.budget is not None and self.budget < 1.0
        return self.threshold > 0

    def fixed_cut(self, num_prompt_tokens: int, num_sink_tokens: int) -> int:
        """The fixed policy's cut: keep the sinks and the last ``budget`` share of the prompt
        (``budget * n`` tokens in all, rounded), never the last token."""
        assert self.budget is not None
        kept = round(self.budget * num_prompt_tokens)
        cut = num_prompt_tokens + num_sink_tokens - kept
        return max(num_sink_tokens, min(cut, num_prompt_tokens - 1))


REQUEST_KEYS = ("refreekv_enabled", "refreekv_threshold", "refreekv_window",
                "refreekv_window_agg", "refreekv_policy", "refreekv_budget")


def request_settings(config: RefreeKVConfig, extra_args: Mapping[str, Any] | None
                     ) -> RequestSettings:
    """Apply a request's ``vllm_xargs`` overrides; raises ConfigError for bad values."""
    settings = RequestSettings(config.enabled, config.threshold, config.window,
                               config.window_agg, config.policy, config.budget)
    if not extra_args:
        return settings
    unknown = sorted(k for k in extra_args
                     if k.startswith(REQUEST_KEY_PREFIX) and k not in REQUEST_KEYS)
    if unknown:
        raise ConfigError(f"unknown vllm_xargs field(s) {unknown}; known: {list(REQUEST_KEYS)}")
    if "refreekv_enabled" in extra_args:
        enabled = _parse_bool(extra_args["refreekv_enabled"], "vllm_xargs.refreekv_enabled")
        # A request may opt out; it cannot switch pruning on when the server disabled it.
        settings = replace(settings, enabled=settings.enabled and enabled)
    if "refreekv_threshold" in extra_args:
        settings = replace(settings, threshold=_parse_threshold(
            extra_args["refreekv_threshold"], "vllm_xargs.refreekv_threshold"))
    if "refreekv_window" in extra_args:
        settings = replace(settings, window=_parse_window(
            extra_args["refreekv_window"], "vllm_xargs.refreekv_window"))
    if "refreekv_window_agg" in extra_args:
        settings = replace(settings, window_agg=_parse_choice(
            extra_args["refreekv_window_agg"], AGGREGATIONS, "vllm_xargs.refreekv_window_agg"))
    if "refreekv_policy" in extra_args:
        settings = replace(settings, policy=_parse_choice(
            extra_args["refreekv_policy"], POLICIES, "vllm_xargs.refreekv_policy"))
    if "refreekv_budget" in extra_args:
        if settings.policy != "fixed":
            raise ConfigError("vllm_xargs.refreekv_budget applies to refreekv_policy 'fixed' "
                              f"only (this request's policy is {settings.policy!r})")
        settings = replace(settings, budget=_parse_budget(
            extra_args["refreekv_budget"], "vllm_xargs.refreekv_budget"))
    if settings.policy == "fixed" and settings.budget is None:
        raise ConfigError("vllm_xargs.refreekv_budget is required with refreekv_policy 'fixed'")
    return settings


def pruning_settings(config: RefreeKVConfig, extra_args: Mapping[str, Any] | None
                     ) -> RequestSettings | None:
    """The settings a request is pruned with, or None if it is not pruned: opted out, nothing to
    cut (T=0, budget 1), or invalid overrides. The API server rejects those with HTTP 400; an
    offline caller that slipped one through gets an unpruned request, not a crashed engine.
    Scheduler and worker both decide with this, so they always agree."""
    try:
        settings = request_settings(config, extra_args)
    except ConfigError:
        return None
    return settings if settings.prunes else None


def _parse_bool(value: Any, name: str) -> bool:
    if isinstance(value, bool):
        return value
    if isinstance(value, int) and value in (0, 1):
        return bool(value)
    if isinstance(value, str) and value.lower() in ("true", "false"):
        return value.lower() == "true"
    raise ConfigError(f"{name} must be true or false, got {value!r}")


def _parse_int(value: Any, low: int, high: int, name: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise ConfigError(f"{name} must be an integer, got {value!r}")
    if not low <= value <= high:
        raise ConfigError(f"{name} must be in [{low}, {high}], got {value}")
    return value


def _parse_threshold(value: Any, name: str) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise ConfigError(f"{name} must be a number, got {value!r}")
    if not math.isfinite(value) or not 0.0 <= value <= MAX_THRESHOLD:
        raise ConfigError(f"{name} must be a finite number in [0, {MAX_THRESHOLD}], got {value}")
    return float(value)


def _parse_budget(value: Any, name: str) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise ConfigError(f"{name} must be a number, got {value!r}")
    if not math.isfinite(value) or not 0.0 < value <= 1.0:
        raise ConfigError(f"{name} must be a finite number in (0, 1], got {value}")
    return float(value)


def _parse_window(value: Any, name: str) -> int:
    return _parse_int(value, 1, MAX_WINDOW, name)


def _parse_choice(value: Any, choices: tuple[str, ...], name: str) -> str:
    if value not in choices:
        raise ConfigError(f"{name} must be one of {list(choices)}, got {value!r}")
    return value
