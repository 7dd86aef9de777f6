"""Offline sweep of the Triton key passes' launch knobs (STYLE.md §4.5: feeds the heuristic).

Times ``triton_compute_cuts`` on a Llama-3-8B layer for every (block_n, num_warps, num_stages)
of a small grid, at w = 1 and w = 32, and prints the best per window. Run from the repository
root on a GPU::

    python benchmarks/kernels/tune_last_row_scores.py --n 32768 --reqs 8
"""

from __future__ import annotations

import argparse
import itertools
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_last_row_scores import (  # noqa: E402
    DTYPE,
    HQ,
    D,
    Timer,
    build_layer,
    log,
    window_lse_from_flash_attention,
)

from refreekv_vllm.ops.triton_last_row_scores import PassConfig, triton_compute_cuts  # noqa: E402

GRID = {
    1: {"block_n": (64, 128), "num_warps": (4, 8), "num_stages": (2, 3, 4),
        "keys_as_m": (None,)},
    32: {"block_n": (32, 64, 128), "num_warps": (4, 8), "num_stages": (2, 3),
         "keys_as_m": (True, False)},
}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--n", type=int, default=32768)
    ap.add_argument("--reqs", type=int, default=8)
    ap.add_argument("--iters", type=int, default=10)
    ap.add_argument("--out", default=None, help="optional JSON output path")
    args = ap.parse_args()
    timer = Timer(args.iters, warmup=2)
    gen = torch.Generator(device="cuda").manual_seed(0)
    layer = build_layer(args.n, args.reqs, gen)
    r = args.reqs
    results = []
    for w, grid in GRID.items():
        query = torch.empty(r, w, HQ, D, dtype=DTYPE, device="cuda").normal_(generator=gen)
        kwargs = dict(
            window_lens=torch.full((r,), w, dtype=torch.int32, device="cuda"),
            thresholds=torch.full((r,), 0.01, device="cuda"),
            max_prompt_len=args.n,
            workspace=torch.empty(64 << 20, dtype=torch.float32, device="cuda"),
        )
        if w > 1:  # the serving path: normalisers from the prefill attention, one pass
            kwargs["window_lse"] = window_lse_from_flash_attention(layer, query)
        for bn, nw, ns, km in itertools.product(*grid.values()):
            cfg = PassConfig(block_n=bn, num_warps=nw, num_stages=ns, keys_as_m=km)
            try:
                def fn(cfg=cfg, query=query, kwargs=kwargs):
                    triton_compute_cuts(query, layer["key_cache"], layer["block_tables"],
                                        layer["prompt_lens"], config=cfg, **kwargs)  # fmt: skip

                ms = timer(fn)["ms"]
            except Exception as exc:  # noqa: BLE001 - an invalid config is just skipped
                log(f"w={w} {cfg}: {type(exc).__name__}")
                continue
            results.append({"w": w, "block_n": bn, "num_warps": nw, "num_stages": ns,
                            "keys_as_m": km, "ms": ms})  # fmt: skip
            log(f"w={w} block_n={bn} warps={nw} stages={ns} keys_as_m={km}: {ms:.3f} ms")
        best = min((x for x in results if x["w"] == w), key=lambda x: x["ms"], default=None)
        log(f"best for w={w}: {best}")
    if args.out:
        Path(args.out).write_text(json.dumps(results, indent=2) + "\n")


if __name__ == "__main__":
    main()
