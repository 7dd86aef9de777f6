"""HTTP views of what ReFreeKV did (a ``vllm.endpoint_plugins`` plugin; ``refreekv-serve``
allow-lists it). Both live under ``/v1``, so vLLM's ``--api-key`` guards them.

- ``GET /v1/refreekv/stats``: server totals over every engine, read from the same Prometheus
  collectors ``/metrics`` serves.
- ``GET /v1/refreekv/requests/{request_id}``: one recent request's cuts and budgets, from the
  workers of every engine (``collective_rpc``). The id is the one the completion response
  carries.
"""

import asyncio
import re
from argparse import Namespace
from typing import Any

from fastapi import APIRouter, FastAPI, HTTPException, Request

from refreekv_vllm.entrypoints.validation import RequestBodyValidation, server_config
from refreekv_vllm.metrics.prometheus import PREFIX

router = APIRouter()


@router.get("/v1/refreekv/stats")
async def refreekv_stats() -> dict[str, Any]:
    from vllm.v1.metrics.prometheus import get_prometheus_registry

    totals: dict[str, Any] = {"requests_skipped": {}}
    for family in get_prometheus_registry().collect():
        if not family.name.startswith(PREFIX):
            continue
        name = family.name[len(PREFIX):]
        for sample in family.samples:
            key = sample.name[len(PREFIX):]
            if name == "requests_skipped" and key.endswith("_total"):
                reason = sample.labels["reason"]
                totals["requests_skipped"][reason] = (
                    totals["requests_skipped"].get(reason, 0) + sample.value)
            elif "layer" in sample.labels:
                continue
            elif family.type == "gauge":
                # Settings every engine reports alike (one series per engine).
                totals[key] = max(totals.get(key, sample.value), sample.value)
            elif key.endswith(("_total", "_count", "_sum")):
                totals[key] = totals.get(key, 0) + sample.value
    return totals


@router.get("/v1/refreekv/requests/{request_id}")
async def refreekv_request(request_id: str, raw_request: Request) -> dict[str, Any]:
    engine_client = raw_request.app.state.refreekv_engine_client
    if engine_client is None:
        raise HTTPException(503, "no engine")
    per_worker = await records_of_every_engine(engine_client)
    # Oldest first, so that a later request reusing an id wins.
    found: dict[tuple[int, int], dict[str, Any]] = {}
    for records in per_worker:
        for record in records:
            key = record_key(record["request_id"], request_id)
            if key is not None:
                found[key] = record
    if not found:
        raise HTTPException(404, f"no ReFreeKV record for request {request_id!r} (unpruned, "
                                 "still in prefill, or older than the last records)")
    if len(found) == 1:
        (record,) = found.values()
        return record
    # Several prompts or samples (n > 1) behind one response: one record each that was pruned.
    return {"request_id": request_id, "records": [found[key] for key in sorted(found)]}


async def records_of_every_engine(engine_client: Any) -> list[list[dict[str, Any]]]:
    """Every worker's recent records. With ``--data-parallel-size`` a request ran on one of
    several engines, and vLLM's data-parallel client answers a utility call with the first
    engine's result only: each engine is asked on its own."""
    core = getattr(engine_client, "engine_core", None)
    engines = getattr(core, "core_engines", None) or []
    if core is None or len(engines) < 2 or not hasattr(core, "_call_utility_async"):
        return await engine_client.collective_rpc("refreekv_request_records")
    per_engine = await asyncio.gather(*(
        core._call_utility_async("collective_rpc", "refreekv_request_records", None, (), None,
                                 engine=engine)
        for engine in engines))
    return [records for per_worker in per_engine for records in per_worker]


_ENGINE_SUFFIX = re.compile(r"-[0-9a-f]{8}$")
_SAMPLE_PREFIX = re.compile(r"^(\d+)_")


def record_key(engine_id: str, response_id: str) -> tuple[int, int] | None:
    """``(prompt index, sample index)`` of an engine request behind ``response_id``, or None if
    it belongs to another response. vLLM's engine ids extend the response id with the prompt's
    index in a completions batch (``-<i>``, completions only) and ``-`` plus 8 hex digits, and
    prefix ``<j>_`` to each of the ``n > 1`` samples; a prefix of an id matches nothing."""
    candidates = [(engine_id, -1)]
    sample = _SAMPLE_PREFIX.match(engine_id)
    if sample is not None:
        candidates.append((engine_id[sample.end():], int(sample.group(1))))
    for rest, sample_index in candidates:
        for base in (rest, _ENGINE_SUFFIX.sub("", rest)):
            if base == response_id:
                return -1, sample_index
            prompt = base[len(response_id) + 1:]
            if base.startswith(response_id + "-") and prompt.isdigit():
                return int(prompt), sample_index
    return None


class RefreeKVEndpoints:
    name = "refreekv_endpoints"
    required_tasks = ("generate",)

    def attach_router(self, app: FastAPI) -> None:
        app.include_router(router)
        app.add_middleware(RequestBodyValidation)

    async def init_state(self, engine_client: Any, state: Any, args: Namespace) -> None:
        state.refreekv_engine_client = engine_client
        state.refreekv_config = server_config(args)
