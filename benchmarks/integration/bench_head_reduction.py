"""What tensor parallelism adds to a scoring call: the all-reduce of the heads' sums and the
broadcast of the cuts, timed inside the workers of a real tensor-parallel engine, over vLLM's own
tensor-parallel group (its shared-memory communicator on CPUs, NCCL on GPUs).

    python -m benchmarks.integration.bench_head_reduction --device cpu   # head_reduction_cpu.json

Sizes are those of one scoring call: ``sum(n - 4)`` fp32 values over the call's (request,
scored layer) pairs; e.g. one 6,000-token prompt over SmolLM2's 28 scored layers is 167,888
values (0.67 MB).
"""

import argparse
import json
import os
import platform
import statistics
import time
from pathlib import Path

from benchmarks.serving.cpu_pinning import vllm_cpu_thread_binds

# (prompt tokens, scored layers, requests in the call)
CALLS = [(1000, 28, 1), (6000, 28, 1), (6000, 28, 8), (8000, 30, 8)]
REPEATS = 20


def time_reduction(worker, sizes: list[int], repeats: int) -> list[dict]:
    """Runs in every worker (``collective_rpc``): median seconds of the all-reduce of each size
    and of the broadcast of one int32 cut per pair."""
    import torch
    from vllm.distributed import get_tp_group

    group = get_tp_group()
    device = worker.device if hasattr(worker, "device") else torch.device("cpu")
    results = []
    for numel in sizes:
        sums = torch.ones(numel, dtype=torch.float32, device=device)
        cuts = torch.zeros(max(1, numel // 1000), dtype=torch.int32, device=device)
        reduce_s, broadcast_s = [], []
        for _ in range(repeats):
            if device.type == "cuda":
                torch.cuda.synchronize()
            start = time.perf_counter()
            group.all_reduce(sums.clone())
            if device.type == "cuda":
                torch.cuda.synchronize()
            middle = time.perf_counter()
            group.broadcast(cuts, src=0)
            if device.type == "cuda":
                torch.cuda.synchronize()
            reduce_s.append(middle - start)
            broadcast_s.append(time.perf_counter() - middle)
        results.append({"numel": numel, "all_reduce_ms": statistics.median(reduce_s) * 1e3,
                        "broadcast_ms": statistics.median(broadcast_s) * 1e3})
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    parser.add_argument("--tensor-parallel-size", type=int, default=2)
    parser.add_argument("--out-dir", type=Path,
                        default=Path(__file__).resolve().parents[2] / "benchmarks" / "results")
    args = parser.parse_args()
    tp = args.tensor_parallel_size
    if args.device == "cpu":
        os.environ.setdefault("VLLM_CPU_OMP_THREADS_BIND", vllm_cpu_thread_binds(tp))
    # The timing function travels to the workers by pickle (a local benchmark engine).
    os.environ.setdefault("VLLM_ALLOW_INSECURE_SERIALIZATION", "1")
    from vllm import LLM

    from refreekv_vllm.models import prepare_tiny_llama

    llm = LLM(model=str(prepare_tiny_llama(head_dim=64)), tensor_parallel_size=tp,
              max_model_len=1024, enforce_eager=True,
              **({"kv_cache_memory_bytes": 1 << 26} if args.device == "cpu"
                 else {"gpu_memory_utilization": 0.2}))
    sizes = [pairs * requests * (n - 4) for n, pairs, requests in CALLS]
    per_worker = llm.collective_rpc(time_reduction, args=(sizes, REPEATS))
    rows = []
    for (n, pairs, requests), *measured in zip(CALLS, *per_worker, strict=True):
        rows.append({"prompt_tokens": n, "scored_layers": pairs, "requests": requests,
                     "values": measured[0]["numel"], "megabytes": measured[0]["numel"] * 4 / 1e6,
                     "all_reduce_ms": max(m["all_reduce_ms"] for m in measured),
                     "broadcast_ms": max(m["broadcast_ms"] for m in measured)})
    for row in rows:
        print(f"{row['requests']} x {row['prompt_tokens']} tokens x {row['scored_layers']} layers:"
              f" {row['megabytes']:.2f} MB, all-reduce {row['all_reduce_ms']:.3f} ms, "
              f"broadcast {row['broadcast_ms']:.3f} ms")
    device = (platform.processor() or platform.machine()) + f", {os.cpu_count()} cores" \
        if args.device == "cpu" else __import__("torch").cuda.get_device_name()
    result = {"device": device, "tensor_parallel_size": tp, "repeats": REPEATS,
              "timing": "median per call, slowest rank", "calls": rows,
              "command": f"python -m benchmarks.integration.bench_head_reduction --device "
                         f"{args.device} --tensor-parallel-size {tp}"}
    args.out_dir.mkdir(parents=True, exist_ok=True)
    (args.out_dir / f"head_reduction_{args.device}.json").write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
