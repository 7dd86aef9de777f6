"""ReFreeKV settings: server-wide from ``--additional-config '{"refreekv": {...}}'`` and
per request from ``vllm_xargs`` (``SamplingParams.extra_args``).

One pydantic model (:class:`RefreeKVConfig`) validates the server's settings, built once per
process and distinct ``additional_config`` (:meth:`RefreeKVConfig.from_additional_config`);
a request's overrides (:class:`RequestOverrides`) are the same fields with the same validators.
Both raise :class:`ConfigError` with a message naming the offending field, so the server can
answer a bad request with HTTP 400 and refuse a bad startup config readably.
"""

import dataclasses
import functools
import json
import math
from collections.abc import Mapping
from dataclasses import dataclass
from types import SimpleNamespace
from typing import Annotated, Any

from pydantic import BaseModel, BeforeValidator, ConfigDict, PrivateAttr, ValidationError

from refreekv_vllm.policy.policies import POLICIES, CutPolicy
from refreekv_vllm.policy.reference import AGGREGATIONS, HEAD_AGGREGATIONS

ADDITIONAL_CONFIG_KEY = "refreekv"
REQUEST_KEY_PREFIX = "refreekv_"
KERNELS = ("auto", "triton", "cuda", "torch")
MAX_WINDOW = 64
MAX_THRESHOLD = 0.5
MAX_SINK_TOKENS = 1024
MAX_LAYER_INDEX = 100_000
MAX_PROMPT_TOKENS = 2**31 - 1


class ConfigError(ValueError):
    """A ReFreeKV setting is invalid; the message names the field."""


# Validators shared by the server config and the per-request overrides. Each raises ValueError
# with the end of a sentence that starts with the field's name. Values arrive from JSON (the
# server's --additional-config, a request's vllm_xargs, where vLLM's request model may already
# have turned true into 1) or from Python callers.

def _flag(value: Any) -> bool:
    if isinstance(value, bool):
        return value
    if isinstance(value, int) and value in (0, 1):
        return bool(value)
    if isinstance(value, str) and value.lower() in ("true", "false"):
        return value.lower() == "true"
    raise ValueError(f"must be true or false, got {value!r}")


def _integer(low: int, high: int) -> Any:
    def check(value: Any) -> int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ValueError(f"must be an integer, got {value!r}")
        if not low <= value <= high:
            raise ValueError(f"must be in [{low}, {high}], got {value}")
        return value
    return check


def _fraction(zero_allowed: bool, high: float) -> Any:
    interval = f"{'[' if zero_allowed else '('}0, {high:g}]"

    def check(value: Any) -> float:
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise ValueError(f"must be a number, got {value!r}")
        above_zero = value >= 0.0 if zero_allowed else value > 0.0
        if not math.isfinite(value) or not above_zero or value > high:
            raise ValueError(f"must be a finite number in {interval}, got {value}")
        return float(value)
    return check


def _choice(choices: tuple[str, ...]) -> Any:
    def check(value: Any) -> str:
        if value not in choices:
            raise ValueError(f"must be one of {list(choices)}, got {value!r}")
        return value
    return check


def _layers(value: Any) -> tuple[int, ...]:
    if not isinstance(value, list | tuple):
        raise ValueError("must be a list of layer indices")
    check = _integer(0, MAX_LAYER_INDEX)
    return tuple(sorted({check(layer) for layer in value}))


Flag = Annotated[bool, BeforeValidator(_flag)]
Threshold = Annotated[float, BeforeValidator(_fraction(zero_allowed=True, high=MAX_THRESHOLD))]
Window = Annotated[int, BeforeValidator(_integer(1, MAX_WINDOW))]
Aggregation = Annotated[str, BeforeValidator(_choice(AGGREGATIONS))]
HeadAggregation = Annotated[str, BeforeValidator(_choice(HEAD_AGGREGATIONS))]
PolicyName = Annotated[str, BeforeValidator(_choice(tuple(POLICIES)))]
Budget = Annotated[float, BeforeValidator(_fraction(zero_allowed=False, high=1.0))]


class RefreeKVConfig(BaseModel):
    """The server's ReFreeKV settings (``--additional-config '{"refreekv": {...}}'``)."""

    model_config = ConfigDict(frozen=True, extra="forbid")
    _default_settings: "RequestSettings" = PrivateAttr()

    enabled: Flag = True
    """Prune after prefill. When False the engine behaves exactly as plain vLLM."""
    threshold: Threshold = 0.005
    """T: largest allowed relative drop of the head-averaged attention norm (0 prunes nothing).
    The paper uses 0.01. 0.005 with a 64-row window and mean aggregation is the setting chosen
    on the development splits of two models (benchmarks/results/fidelity.md, docs/design.md §7)."""
    window: Window = 64
    """Observation window w: score rows of the last w prompt tokens (1 = the paper's rule)."""
    window_agg: Aggregation = "mean"
    """How the window's rows are combined per head before the norm test: max or mean."""
    head_agg: HeadAggregation = "mean"
    """How heads combine in the norm test: mean (the paper's mean of the heads' norms) or max
    (every head's own norm drops by at most T; keeps more, scored by the torch backend)."""
    num_sink_tokens: Annotated[int, BeforeValidator(_integer(0, MAX_SINK_TOKENS))] = 4
    """m: first prompt tokens that are always kept and excluded from the norm."""
    frozen_layers: Annotated[tuple[int, ...], BeforeValidator(_layers)] = (0, 1)
    """Layers that are never pruned."""
    min_prompt_tokens: Annotated[int, BeforeValidator(_integer(0, MAX_PROMPT_TOKENS))] = 256
    """Prompts shorter than this are not scored (kept whole, counted as skipped
    ``short_prompt``): what such a prompt could free is small beside what its request holds
    over its life, while a step that scores pays window capture in every layer and the
    scoring launches (docs/design.md §6b, chat). 0 scores every prompt."""
    kernel: Annotated[str, BeforeValidator(_choice(KERNELS))] = "auto"
    """Scoring backend: auto (the faster GPU kernel on GPUs, torch on CPU), triton, cuda or
    torch."""
    reuse_attention_lse: Flag = False
    """Windows (w > 1) take their rows' softmax normalisers from the prefill's FlashAttention
    instead of a first pass of the Triton kernel over the keys: less device time per scoring
    step, more host time in every layer's attention call of that step (on the H200 the host
    cost was the larger one; docs/design.md)."""
    policy: PolicyName = "threshold"
    """threshold: ReFreeKV's budget-free cut. fixed: a StreamingLLM-style baseline that keeps the
    sinks plus the most recent tokens, ``budget`` of the prompt, in every layer."""
    budget: Budget | None = None
    """Fraction of the prompt the fixed policy keeps, in (0, 1]; required for policy fixed."""

    def model_post_init(self, context: Any) -> None:
        # The server's own policy must be buildable (fixed needs its budget); requests without
        # overrides are pruned with it.
        self._default_settings = _settings(self.enabled, self, _SERVER_PREFIX, "policy")

    def scored_layers(self, layers: range) -> tuple[int, ...]:
        """Which of the model layers ``layers`` (a model's, or a pipeline stage's) are scored
        (not frozen)."""
        return tuple(layer for layer in layers if layer not in self.frozen_layers)

    @property
    def shortest_scored_prompt(self) -> int:
        """Fewest prompt tokens a request needs to be scored: ``min_prompt_tokens``, and never
        under the sinks plus two (sinks and the last token alone leave nothing to cut)."""
        return max(self.num_sink_tokens + 2, self.min_prompt_tokens)

    @property
    def default_settings(self) -> "RequestSettings":
        """What a request without overrides is pruned with."""
        return self._default_settings

    @classmethod
    def from_additional_config(cls, additional_config: Mapping[str, Any] | None
                               ) -> "RefreeKVConfig":
        """The validated settings of vLLM's ``additional_config``, built once per process for
        each distinct content (every component of a process asks for it)."""
        raw = (additional_config or {}).get(ADDITIONAL_CONFIG_KEY, {})
        if not isinstance(raw, Mapping):
            raise ConfigError(f"additional_config.{ADDITIONAL_CONFIG_KEY} must be an object")
        try:
            key = json.dumps(raw, sort_keys=True)
        except (TypeError, ValueError):  # not JSON: validate without the cache
            return _validate_server(dict(raw))
        return _cached_server_config(key)


_SERVER_PREFIX = f"additional_config.{ADDITIONAL_CONFIG_KEY}."


@functools.lru_cache(maxsize=64)
def _cached_server_config(raw_json: str) -> RefreeKVConfig:
    return _validate_server(json.loads(raw_json))


def _validate_server(raw: dict[str, Any]) -> RefreeKVConfig:
    try:
        return RefreeKVConfig.model_validate(raw)
    except ValidationError as error:
        raise _config_error(error, _SERVER_PREFIX, sorted(RefreeKVConfig.model_fields)) from None


class RequestOverrides(BaseModel):
    """A request's ``refreekv_*`` keys of ``vllm_xargs``: the server's fields a request may
    change, validated as the server's are."""

    model_config = ConfigDict(frozen=True, extra="forbid",
                              alias_generator=lambda name: REQUEST_KEY_PREFIX + name)

    enabled: Flag | None = None
    threshold: Threshold | None = None
    window: Window | None = None
    window_agg: Aggregation | None = None
    head_agg: HeadAggregation | None = None
    policy: PolicyName | None = None
    budget: Budget | None = None


REQUEST_KEYS = tuple(REQUEST_KEY_PREFIX + name for name in RequestOverrides.model_fields)
_REQUEST_PREFIX = "vllm_xargs."


# The settings each policy reads: to build it, and to refuse a request's override it ignores.
POLICY_SETTINGS: dict[str, tuple[str, ...]] = {
    name: tuple(field.name for field in dataclasses.fields(cls))  # type: ignore[arg-type]
    for name, cls in POLICIES.items()}


@dataclass(frozen=True)
class RequestSettings:
    """What one request is pruned with (server config plus its overrides)."""
    enabled: bool
    policy: CutPolicy

    @property
    def prunes(self) -> bool:
        """Whether the request is to be pruned at all (T=0 and budget 1 keep everything)."""
        return self.enabled and self.policy.prunes


def _settings(enabled: bool, values: Any, prefix: str, policy_key: str) -> RequestSettings:
    """Build the policy ``values.policy`` names from the settings it reads, all required."""
    name = values.policy
    fields = POLICY_SETTINGS[name]
    missing = [field for field in fields if getattr(values, field) is None]
    if missing:
        raise ConfigError(f"{prefix}{missing[0]} is required with {policy_key} {name!r}")
    policy = POLICIES[name](**{field: getattr(values, field) for field in fields})
    return RequestSettings(enabled=enabled, policy=policy)


def request_settings(config: RefreeKVConfig, extra_args: Mapping[str, Any] | None
                     ) -> RequestSettings:
    """Apply a request's ``vllm_xargs`` overrides; raises ConfigError for bad values."""
    ours = {key: value for key, value in (extra_args or {}).items()
            if key.startswith(REQUEST_KEY_PREFIX)}
    if not ours:
        return config.default_settings
    try:
        overrides = RequestOverrides.model_validate(ours)
    except ValidationError as error:
        raise _config_error(error, _REQUEST_PREFIX, list(REQUEST_KEYS)) from None
    given = overrides.model_dump(exclude_none=True)
    # The server's settings with the request's on top (enabled is combined below).
    merged = SimpleNamespace(**{field: given.get(field, getattr(config, field))
                                for field in RequestOverrides.model_fields if field != "enabled"})
    ignored = [field for field in given if field not in ("enabled", "policy")
               and field not in POLICY_SETTINGS[merged.policy]]
    if ignored:
        field = ignored[0]
        owners = [name for name, fields in POLICY_SETTINGS.items() if field in fields]
        raise ConfigError(
            f"{_REQUEST_PREFIX}{REQUEST_KEY_PREFIX}{field} applies to refreekv_policy "
            f"{' or '.join(repr(o) for o in owners)} only (this request's policy is "
            f"{merged.policy!r})")
    # A request may opt out; it cannot switch pruning on when the server disabled it.
    enabled = config.enabled and given.get("enabled", True)
    return _settings(enabled, merged, _REQUEST_PREFIX + REQUEST_KEY_PREFIX,
                     REQUEST_KEY_PREFIX + "policy")


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


def _config_error(error: ValidationError, prefix: str, known: list[str]) -> ConfigError:
    """One readable message for pydantic's errors: unknown keys first, else the first field."""
    unknown = sorted(str(e["loc"][0]) for e in error.errors() if e["type"] == "extra_forbidden")
    if unknown:
        what = "option(s)" if prefix == _SERVER_PREFIX else "field(s)"
        where = ADDITIONAL_CONFIG_KEY if prefix == _SERVER_PREFIX else "vllm_xargs"
        return ConfigError(f"unknown {where} {what} {unknown}; known: {known}")
    first = error.errors()[0]
    message = first["msg"].removeprefix("Value error, ")
    if not first["loc"]:  # a rule over several fields: the message names them
        return ConfigError(message)
    field = ".".join(str(part) for part in first["loc"])
    return ConfigError(f"{prefix}{field} {message}")
