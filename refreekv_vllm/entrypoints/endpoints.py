"""HTTP views of what ReFreeKV did (a ``vllm.endpoint_plugins`` plugin; ``refreekv-serve``
allow-lists it). Both live under ``/v1``, so vLLM's ``--api-key`` guards them.

- ``GET /v1/refreekv/stats``: server totals, read from the same Prometheus collectors
  ``/metrics`` serves.
- ``GET /v1/refreekv/requests/{request_id}``: one recent request's cuts and budgets, from the
  workers (``collective_rpc``). The id is the one the completion response carries.
"""

from argparse import Namespace
from typing import Any

from fastapi import APIRouter, FastAPI, HTTPException, Request

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
            elif key.endswith(("_total", "_count", "_sum")) or family.type == "gauge":
                if "layer" in sample.labels:
                    continue
                totals[key] = totals.get(key, 0) + sample.value
    return totals


@router.get("/v1/refreekv/requests/{request_id}")
async def refreekv_request(request_id: str, raw_request: Request) -> dict[str, Any]:
    engine_client = raw_request.app.state.refreekv_engine_client
    if engine_client is None:
        raise HTTPException(503, "no engine")
    per_worker = await engine_client.collective_rpc("refreekv_request_records")
    for records in per_worker:
        for record in reversed(records):
            # vLLM's engine ids extend the response id with a suffix.
            if record["request_id"] == request_id or record["request_id"].startswith(
                    request_id + "-"):
                return record
    raise HTTPException(404, f"no ReFreeKV record for request {request_id!r} (unpruned, "
                             "still in prefill, or older than the last records)")


class RefreeKVEndpoints:
    name = "refreekv_endpoints"
    required_tasks = ("generate",)

    def attach_router(self, app: FastAPI) -> None:
        app.include_router(router)

    async def init_state(self, engine_client: Any, state: Any, args: Namespace) -> None:
        state.refreekv_engine_client = engine_client
