"""The scoring call as a server makes it: one request's scored layers in one ``compute_cuts``
call, at a real model's head shape, timed on the host and on the device.

The kernel benchmark (``bench_last_row_scores``) times a Llama-3-8B layer over many requests; a
server that ends one prompt in a step scores one request over all its layers (every layer's
keys live in one page pool, so the pairs are the kernel's rows). Here: SmolLM2-135M's shape
(9 query heads, 3 KV heads, head size 64, bf16, block size 16, 28 scored layers; 56 pairs for
two requests), prompts of 1K-7K tokens, the served chunk size, and per backend the host time of
a call (launches only, while the GPU is kept busy: ``host_launch_ms``) and its device time
(back-to-back calls on the stream). Run from the repository root on a GPU::

    python -m benchmarks.kernels.time_scoring_call --out benchmarks/results/scoring_call_gpu.json
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

import torch

from benchmarks.kernels.tune_last_row_scores import host_launch_ms
from refreekv_vllm.attention.scoring import SCORING_CHUNK
from refreekv_vllm.ops import compute_cuts

HQ, HKV, D, BS = 9, 3, 64, 16
PROMPT_LENS = (1024, 4096, 7000)
PAIRS = (28, 56)
WINDOWS = (64, 1)  # the shipped default and the paper's last row
ITERS = 20


def time_call(kwargs: dict[str, Any]) -> tuple[float, float]:
    """(host ms, device ms) per call."""
    for _ in range(3):
        compute_cuts(**kwargs)
    host_ms = host_launch_ms(lambda: compute_cuts(**kwargs), calls=ITERS)
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(ITERS):
        compute_cuts(**kwargs)
    end.record()
    torch.cuda.synchronize()
    return host_ms, start.elapsed_time(end) / ITERS


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--backends", default="triton,cuda")
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--commit", default="unknown", help="the plugin's commit to record")
    args = parser.parse_args()
    if "cuda" in args.backends.split(","):
        from refreekv_vllm.ops._custom_ops import load_extension

        load_extension()
    generator = torch.Generator(device="cuda").manual_seed(0)
    rows = []
    for n in PROMPT_LENS:
        for pairs in PAIRS:
            blocks = -(-n // BS)
            key_cache = torch.randn(pairs * blocks + 1, BS, HKV, D, dtype=torch.bfloat16,
                                    device="cuda", generator=generator)
            block_tables = (torch.randperm(pairs * blocks, device="cuda", generator=generator)
                            + 1).view(pairs, blocks).int()
            for window in WINDOWS:
                query = torch.randn(pairs, window, HQ, D, dtype=torch.bfloat16, device="cuda",
                                    generator=generator)
                for backend in args.backends.split(","):
                    host_ms, device_ms = time_call(dict(
                        query=query, key_cache=key_cache, block_tables=block_tables,
                        prompt_lens=torch.full((pairs,), n, dtype=torch.int32, device="cuda"),
                        window_lens=torch.full((pairs,), window, dtype=torch.int32,
                                               device="cuda"),
                        thresholds=torch.full((pairs,), 0.005, device="cuda"),
                        num_sink_tokens=4, agg="mean", backend=backend, max_prompt_len=n,
                        chunk_size=SCORING_CHUNK, scale=D**-0.5))
                    row = {"n": n, "pairs": pairs, "w": window, "backend": backend,
                           "host_ms": round(host_ms, 4), "device_ms": round(device_ms, 4)}
                    rows.append(row)
                    print(row, flush=True)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({
        "device": torch.cuda.get_device_name(), "plugin_commit": args.commit,
        "command": "python -m benchmarks.kernels.time_scoring_call " + " ".join(sys.argv[1:]),
        "rows": rows}, indent=1))


if __name__ == "__main__":
    main()
