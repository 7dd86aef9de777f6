"""Reject bad per-request ReFreeKV parameters with HTTP 400 and the reason, in two places.

- The OpenAI server's HTTP layer (:class:`RequestBodyValidation`, added by the endpoints plugin)
  checks the raw JSON body: before a stream starts, and before vLLM's request model coerces
  values (``true`` would become ``1``).
- Where vLLM validates sampling parameters (``InputProcessor._validate_params``; vLLM maps its
  ``ValueError`` to 400) for every other way in: other endpoints, ``vllm.LLM``.
"""

import json
import logging
from typing import Any

from refreekv_vllm.config import ConfigError, RefreeKVConfig, request_settings
from refreekv_vllm.entrypoints.engine_args import wants_refreekv
from refreekv_vllm.offline import WORKER_CLS

_MARK = "_refreekv_validation"
logger = logging.getLogger(__name__)


def install_request_validation() -> None:
    """Wrap ``InputProcessor._validate_params`` once per process (idempotent)."""
    from vllm.v1.engine.input_processor import InputProcessor

    original = InputProcessor._validate_params
    if getattr(original, _MARK, False):
        return

    def _validate_params(self: Any, params: Any, supported_tasks: Any) -> None:
        original(self, params, supported_tasks)
        config = _config_of(self)
        extra_args = getattr(params, "extra_args", None)
        if config is not None and extra_args:
            try:
                request_settings(config, extra_args)
            except ConfigError as exc:
                raise ValueError(str(exc)) from None

    setattr(_validate_params, _MARK, True)
    InputProcessor._validate_params = _validate_params


def _config_of(processor: Any) -> RefreeKVConfig | None:
    """The server's ReFreeKV config, or None when this engine does not run ReFreeKV."""
    cached = processor.__dict__.get(_MARK)
    if cached is None:
        vllm_config = processor.vllm_config
        enabled = vllm_config.parallel_config.worker_cls == WORKER_CLS
        cached = (RefreeKVConfig.from_additional_config(vllm_config.additional_config)
                  if enabled else False)
        processor.__dict__[_MARK] = cached
    return cached or None


def server_config(args: Any) -> RefreeKVConfig | None:
    """The API server's view of the engine's ReFreeKV config (None: the engine runs without)."""
    raw = getattr(args, "additional_config", None) or {}
    if isinstance(raw, str):
        raw = json.loads(raw)
    if getattr(args, "worker_cls", None) != WORKER_CLS and not wants_refreekv(raw):
        return None
    return RefreeKVConfig.from_additional_config(raw)


VALIDATED_PATHS = frozenset({"/v1/completions", "/v1/chat/completions"})


def body_error(body: bytes, config: RefreeKVConfig) -> str | None:
    """Why a completion request's raw JSON body must be refused, or None. Checked on the raw
    JSON, before vLLM's request model turns ``true`` into ``1`` and before a streaming response
    has started; invalid JSON is left to vLLM."""
    try:
        parsed = json.loads(body)
    except ValueError:
        return None
    if not isinstance(parsed, dict):
        return f"the request body must be a JSON object, got a JSON {type(parsed).__name__}"
    xargs = parsed.get("vllm_xargs")
    if not isinstance(xargs, dict):
        return None  # absent, or a shape vLLM's own request model rejects
    try:
        request_settings(config, xargs)
    except ConfigError as exc:
        return str(exc)
    return None


class RequestBodyValidation:
    """ASGI middleware: HTTP 400 for a completion request whose ``refreekv_*`` parameters are
    invalid, streaming or not, before vLLM sees it. Pure ASGI, so responses pass through
    untouched (no per-chunk cost on streams)."""

    def __init__(self, app: Any) -> None:
        self.app = app

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        config = None
        if (scope["type"] == "http" and scope["method"] == "POST"
                and scope["path"] in VALIDATED_PATHS and "app" in scope):
            config = getattr(scope["app"].state, "refreekv_config", None)
        if config is None:
            await self.app(scope, receive, send)
            return
        messages, body = [], b""
        while True:
            message = await receive()
            messages.append(message)
            if message["type"] != "http.request":
                break  # the client went away: vLLM handles that
            body += message.get("body", b"")
            if not message.get("more_body", False):
                break
        error = body_error(body, config)
        if error is not None:
            logger.warning("refused %s: %s", scope["path"], error)
            await _send_json(send, 400, {"error": {
                "message": error, "type": "BadRequestError", "param": None, "code": 400}})
            return

        async def replay() -> dict:
            return messages.pop(0) if messages else await receive()

        await self.app(scope, replay, send)


async def _send_json(send: Any, status: int, content: dict) -> None:
    payload = json.dumps(content).encode()
    await send({"type": "http.response.start", "status": status,
                "headers": [(b"content-type", b"application/json"),
                            (b"content-length", str(len(payload)).encode())]})
    await send({"type": "http.response.body", "body": payload})
