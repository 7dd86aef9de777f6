"""Pipeline parallelism through the OpenAI server: SmolLM2's 30 layers over two stages (15
each, so both stages score layers), requests over HTTP, both stages' cuts reach the per-request
records and the counters, and the pools go back to idle."""

import json

import pytest

from benchmarks.serving.cpu_pinning import vllm_cpu_thread_binds
from tests.e2e.server import start_server
from tests.e2e.test_data_parallel import complete_passkeys, idle_usage
from tests.e2e.test_server import get_json

pytestmark = pytest.mark.e2e

NUM_LAYERS, FIRST_STAGE_LAYERS, SINKS = 30, 15, 4
NUM_REQUESTS = 6


@pytest.fixture(scope="module")
def pp_server(tmp_path_factory, smollm2_dir):
    log_path = tmp_path_factory.mktemp("pipeline-parallel") / "server.log"
    server = start_server(["--enforce-eager", "--dtype", "float32",
                           "--pipeline-parallel-size", "2", "--max-model-len", "2048",
                           "--kv-cache-memory-bytes", str(1 << 28)], log_path,
                          env={"VLLM_CPU_OMP_THREADS_BIND": vllm_cpu_thread_binds(2),
                               "REFREEKV_DEBUG_ACCOUNTING": "1"})
    yield server
    server.stop()


def test_both_stages_prune_and_report_through_the_server(pp_server):
    url = pp_server.base_url
    answers = complete_passkeys(url, NUM_REQUESTS, 20_000, 89)

    status, stats = get_json(url + "/v1/refreekv/stats")
    assert status == 200 and stats["requests_pruned_total"] > 0, stats
    records = []
    for body in answers:
        status, record = get_json(url + "/v1/refreekv/requests/" + json.loads(body)["id"])
        assert status == 200, record
        assert len(record["cuts"]) == NUM_LAYERS
        records.append(record)
    # Each stage's layers were scored and cut by that stage.
    assert any(cut > SINKS for r in records for cut in r["cuts"][:FIRST_STAGE_LAYERS])
    assert any(cut > SINKS for r in records for cut in r["cuts"][FIRST_STAGE_LAYERS:])
    assert sum(r["blocks_skipped"] for r in records) == stats["kv_blocks_released_total"] > 0

    usage = idle_usage(url, {"0"})
    assert usage and not any(usage.values()), usage
