"""The step profile's reading of a torch-profiler trace (synthetic trace, known answers)."""

import gzip
import json

import pytest

from benchmarks.serving.profile_steps import summarise_trace


def _trace(path, steps):
    """``steps``: (new requests, running requests, host ms, kernel ms) per engine step, 10 ms
    apart."""
    events = []
    for i, (new, running, host_ms, kernel_ms) in enumerate(steps):
        ts = i * 10_000.0
        name = f"execute_context_{new}({new * 100})_generation_{running - new}({running - new})"
        events += [
            {"ph": "X", "cat": "user_annotation", "name": name, "ts": ts, "dur": host_ms * 1e3},
            {"ph": "X", "cat": "gpu_user_annotation", "name": name, "ts": ts + 50, "dur": 1},
            {"ph": "X", "cat": "kernel", "name": "attention", "ts": ts + 100,
             "dur": kernel_ms * 1e3},
            {"ph": "X", "cat": "cuda_runtime", "name": "cudaStreamSynchronize", "ts": ts + 10,
             "dur": 20.0},
            {"ph": "X", "cat": "cpu_op", "name": "aten::copy_", "ts": ts + 5, "dur": 30.0},
        ]
    with gzip.open(path, "wt") as f:
        json.dump({"traceEvents": events}, f)


def test_step_cadence_busy_share_and_waits(tmp_path):
    path = tmp_path / "t.pt.trace.json.gz"
    _trace(path, [(0, 4, 3.0, 2.0)] * 6 + [(1, 30, 8.0, 4.0)] * 3 + [(0, 30, 3.0, 2.0)])
    summary = summarise_trace(path)
    assert summary["steps"] == 9 and summary["span_ms"] == pytest.approx(90.0)
    # Kernels of the first nine steps: six of 2 ms and three of 4 ms in 90 ms.
    assert summary["device_busy_share"] == pytest.approx(24 / 90)
    assert summary["cadence_decode"]["n"] == 6 and summary["cadence_mixed"]["n"] == 3
    assert summary["cadence_decode"]["median_ms"] == pytest.approx(10.0)
    assert summary["execute_model_host_mixed"]["median_ms"] == pytest.approx(8.0)
    assert set(summary["cadence_decode_by_running"]) == {"002-008"}
    assert summary["waiting_calls"]["cudaStreamSynchronize"]["count"] == 9
    assert summary["top_kernels"][0]["per_step"] == pytest.approx(1.0)
    assert summary["top_host_ops"][0]["name"] == "aten::copy_"


def test_a_trace_without_steps_says_so(tmp_path):
    path = tmp_path / "empty.json.gz"
    _trace(path, [(0, 1, 1.0, 1.0)])
    assert "error" in summarise_trace(path)
