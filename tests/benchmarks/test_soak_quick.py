"""The soak benchmark's short run in the suite: a mixed workload with preemption against the
real server, and everything back to idle afterwards."""

import pytest

from benchmarks.soak import run_soak

pytestmark = pytest.mark.e2e


def test_short_soak_leaves_nothing_behind():
    result = run_soak.main(["--requests", "36", "--kv-pool-tokens", "2304"])
    assert result["requests"] == 36
    assert result["unexpected_errors"] == 0, result["error_examples"]
    assert result["preemptions"] >= 1
    assert result["requests_pruned"] > 0
    assert result["leaked_blocks"] == 0 and result["running_at_end"] == 0
    assert result["stats_match_metrics"] and result["healthy_at_end"]
    assert result["log_error_lines"] == 0, result["log_error_examples"]
