"""Offline sweep of the Triton key passes' launch knobs (feeds the heuristic).

Times ``triton_compute_cuts`` on a Llama-3-8B layer for every (chunk, block_n, num_warps,
num_stages) of a small grid, as device time (CUDA-graph replay, L2 flushed), for w = 1 and for
w = 32 with each aggregation (the window pass takes the prefill's normalisers, as it serves).
Then, for the default knobs, the device time of each kernel (torch profiler) and the host time
of one launch sequence while the GPU is busy. Run from the repository root on a GPU::

    python -m benchmarks.kernels.tune_last_row_scores --out benchmarks/results/tune_scoring_gpu.json
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from benchmarks.kernels.bench_last_row_scores import (
    DTYPE,
    HQ,
    D,
    Timer,
    build_layer,
    log,
    window_lse_from_flash_attention,
)
from refreekv_vllm.ops.triton_last_row_scores import PassConfig, triton_compute_cuts

# (w, agg) -> knob grid; chunk None = the launch heuristic's choice.
GRID = {
    (1, "max"): [
        dict(chunk=None, block_n=bn, num_warps=4, num_stages=ns)
        for bn, ns in ((128, 2), (128, 3), (64, 4))
    ],
    (32, "mean"): [
        dict(chunk=chunk, block_n=bn, num_warps=nw, num_stages=ns)
        for chunk in (None, 1024)
        for bn, nw, ns in ((64, 4, 3), (64, 4, 4), (64, 8, 3), (64, 4, 2), (128, 8, 3),
                           (32, 4, 4))
    ],
    (32, "max"): [
        dict(chunk=None, block_n=bn, num_warps=nw, num_stages=ns)
        for bn, nw, ns in ((64, 4, 3), (64, 8, 3), (64, 8, 4))
    ],
}


def kernel_times(fn, iters: int = 20) -> dict[str, float]:
    """Mean device ms per call of each kernel ``fn`` launches (torch profiler)."""
    from torch.profiler import ProfilerActivity, profile

    fn()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(iters):
            fn()
        torch.cuda.synchronize()
    out: dict[str, float] = {}
    for ev in prof.key_averages():
        if ev.device_time_total > 0:
            out[ev.key] = ev.device_time_total / 1e3 / iters
    return out


def host_launch_ms(fn, calls: int = 50) -> float:
    """Host ms per call of ``fn`` while the GPU is busy (launch cost only, no waiting)."""
    fn()
    torch.cuda.synchronize()
    torch.cuda._sleep(2_000_000_000)  # keeps the GPU busy far longer than the launches take
    t0 = time.perf_counter()
    for _ in range(calls):
        fn()
    ms = (time.perf_counter() - t0) * 1e3 / calls
    torch.cuda.synchronize()
    return ms


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--n", type=int, default=8192)
    ap.add_argument("--reqs", type=int, default=32)
    ap.add_argument("--iters", type=int, default=10)
    ap.add_argument("--out", default=None, help="optional JSON output path")
    args = ap.parse_args()
    timer = Timer(args.iters, warmup=2)
    gen = torch.Generator(device="cuda").manual_seed(0)
    layer = build_layer(args.n, args.reqs, gen)
    r = args.reqs
    results: dict = {"n": args.n, "reqs": r, "device": torch.cuda.get_device_name(),
                     "sweep": [], "defaults": []}  # fmt: skip
    workspace = torch.empty(64 << 20, dtype=torch.float32, device="cuda")
    for (w, agg), grid in GRID.items():
        query = torch.empty(r, w, HQ, D, dtype=DTYPE, device="cuda").normal_(generator=gen)
        kwargs = dict(
            window_lens=torch.full((r,), w, dtype=torch.int32, device="cuda"),
            thresholds=torch.full((r,), 0.01, device="cuda"),
            max_prompt_len=args.n, agg=agg, workspace=workspace,
        )
        if w > 1:  # the serving path: normalisers from the prefill attention, one pass
            kwargs["window_lse"] = window_lse_from_flash_attention(layer, query)

        def call(cfg=None, chunk=None, query=query, kwargs=kwargs):
            triton_compute_cuts(query, layer["key_cache"], layer["block_tables"],
                                layer["prompt_lens"], config=cfg, chunk_size=chunk,
                                **kwargs)  # fmt: skip

        for knobs in grid:
            chunk = knobs["chunk"]
            cfg = PassConfig(**{k: v for k, v in knobs.items() if k != "chunk"})
            try:
                ms = timer(lambda cfg=cfg, chunk=chunk: call(cfg, chunk), graph=True)["ms"]
            except Exception as exc:  # an invalid config is just skipped
                log(f"w={w} {agg} {knobs}: {type(exc).__name__}: {exc}")
                continue
            results["sweep"].append({"w": w, "agg": agg, **knobs, "graph_ms": ms})
            log(f"w={w} {agg} {knobs}: {ms:.3f} ms")
        best = min((x for x in results["sweep"] if (x["w"], x["agg"]) == (w, agg)),
                   key=lambda x: x["graph_ms"], default=None)  # fmt: skip
        log(f"best for w={w} {agg}: {best}")
        default = {"w": w, "agg": agg, "graph_ms": timer(call, graph=True)["ms"],
                   "eager_ms": timer(call)["ms"], "host_launch_ms": host_launch_ms(call),
                   "kernels_ms": kernel_times(call)}  # fmt: skip
        results["defaults"].append(default)
        log(f"defaults w={w} {agg}: {default}")
    if args.out:
        Path(args.out).write_text(json.dumps(results, indent=2) + "\n")


if __name__ == "__main__":
    main()
