"""GPU benchmark and correctness sweep of the ReFreeKV scoring kernels (Triton and CUDA).

Llama-3-8B layer (32 query heads, 8 KV heads, head size 128, bf16, block size 16, FLASH_ATTN
NHD cache), batches at n in {1K, 8K, 32K, 128K}, windows w in {1, 32, 64}. Per config it records
Triton and CUDA median times, the bandwidth they reach as a fraction of a measured
device-to-device copy, and their time as a fraction of the same requests' prefill attention of
that layer (vLLM's FlashAttention on the paged cache; torch SDPA when vLLM is missing). Then a
correctness sweep of both kernels against the float64 reference on fresh random layouts.

Run from the repository root (vLLM on PYTHONPATH for the FlashAttention baseline)::

    python -m benchmarks.kernels.bench_last_row_scores --out benchmarks/results

Writes ``kernels_gpu.json`` and ``kernels_gpu.md`` to ``--out``.

With a window (w > 1) Triton is timed as it serves on FlashAttention: each window row's softmax
normaliser comes from the prefill attention (``softmax_lse``, here from vLLM's FlashAttention on
the same rows), so it reads the keys once; ``triton_two_pass`` is the same kernel finding the
normalisers itself (first pass over K), as the CUDA kernel always does.

Bytes counted for ``bw_fraction`` (what the kernels move in DRAM): keys once per pass over K
(one pass for w = 1 and for Triton with the prefill's normalisers, two otherwise; V is never
read), the fp32 scratch row per query head and
position (logits or r, written once), and the per-chunk statistics. ``k_once_bw_fraction`` uses
only one read of K: the speed of "reading the layer's keys once", whatever the pass count.
"""

from __future__ import annotations

import argparse
import datetime
import json
import platform
import subprocess
import sys
import time
import traceback
from pathlib import Path
from typing import Any

import torch

from benchmarks.kernels.paged_cases import compare, flash_attention_lse, make_case
from refreekv_vllm.ops import compute_cuts
from refreekv_vllm.ops.launch_utils import cdiv
from refreekv_vllm.ops.triton_last_row_scores import make_plan

ROOT = Path(__file__).resolve().parents[2]

HQ, HKV, D, BS = 32, 8, 128, 16
DTYPE = torch.bfloat16
# n -> number of requests (64K tokens at 1K, 256K tokens otherwise).
BATCHES = {1024: 64, 8192: 32, 32768: 8, 131072: 2}
# (w, aggregation): the paper's last row, a 32-row window with each aggregation, and the
# shipped default, 64 rows with mean (refreekv_vllm/config.py).
WINDOWS = ((1, "max"), (32, "mean"), (32, "max"), (64, "mean"))
T0 = time.time()


def log(msg: str) -> None:
    print(f"[{time.time() - T0:6.1f}s] {msg}", flush=True)


class Timer:
    """Median / p20 / p80 of CUDA-event times (ms), L2 flushed before every run."""

    def __init__(self, iters: int, warmup: int) -> None:
        self.iters, self.warmup = iters, warmup
        self.flush = torch.empty(256 << 20, dtype=torch.int8, device="cuda")

    def __call__(self, fn, iters: int | None = None, graph: bool = False) -> dict[str, float]:
        """Times fn() launched eagerly, or (graph=True) replays of a CUDA graph of it."""
        iters = iters or self.iters
        for _ in range(self.warmup):
            fn()
        if graph:
            torch.cuda.synchronize()
            g = torch.cuda.CUDAGraph()
            with torch.cuda.graph(g):
                fn()
            fn = g.replay
            fn()
        times = []
        for _ in range(iters):
            self.flush.zero_()
            start = torch.cuda.Event(enable_timing=True)
            end = torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end))
        q = torch.tensor(times).quantile(torch.tensor([0.5, 0.2, 0.8])).tolist()
        return {"ms": q[0], "p20_ms": q[1], "p80_ms": q[2], "iters": iters}


def copy_bandwidth(timer: Timer) -> float:
    """Bytes read + written per second of a 1 GiB device-to-device copy."""
    src = torch.empty(1 << 30, dtype=torch.int8, device="cuda")
    dst = torch.empty_like(src)
    t = timer(lambda: dst.copy_(src))["ms"]
    return 2 * (1 << 30) / (t * 1e-3)


def build_layer(n: int, r: int, gen: torch.Generator) -> dict:
    """Random paged layer: FA NHD cache with shuffled blocks, and every position's queries (the
    prefill baseline)."""
    blocks = cdiv(n, BS)
    nb = r * blocks + 1
    mem = torch.empty(nb, BS, HKV, 2 * D, dtype=DTYPE, device="cuda").normal_(generator=gen)
    kv = mem.permute(0, 2, 1, 3)  # logical (nb, H, bs, 2D), as vLLM binds it
    ids = torch.randperm(nb - 1, device="cuda", generator=gen) + 1
    block_tables = ids[: r * blocks].view(r, blocks).to(torch.int32)
    return {
        "kv": kv,
        "key_cache": kv.transpose(1, 2)[..., :D],
        "value_cache": kv.transpose(1, 2)[..., D:],
        "block_tables": block_tables,
        "prompt_lens": torch.full((r,), n, dtype=torch.int32, device="cuda"),
        "query_all": torch.empty(r * n, HQ, D, dtype=DTYPE, device="cuda").normal_(generator=gen),
    }


def prefill_fn(layer: dict, n: int, r: int):
    """One layer's causal prefill attention of the same requests; returns (fn, impl)."""
    q = layer["query_all"]
    cu = torch.arange(0, (r + 1) * n, n, dtype=torch.int32, device="cuda")
    out = torch.empty_like(q)
    try:
        from vllm.v1.attention.backends.fa_utils import get_flash_attn_version
        from vllm.vllm_flash_attn import flash_attn_varlen_func

        version = get_flash_attn_version() or 3

        def fa():
            flash_attn_varlen_func(
                q=q, k=layer["key_cache"], v=layer["value_cache"], out=out,
                cu_seqlens_q=cu, max_seqlen_q=n, seqused_k=layer["prompt_lens"],
                max_seqlen_k=n, softmax_scale=D**-0.5, causal=True,
                block_table=layer["block_tables"], fa_version=version,
            )  # fmt: skip

        fa()
        return fa, f"vllm_flash_attn (FA{version}, paged)"
    except Exception as exc:  # any failure means: use the fallback
        note = f"vllm flash attention unavailable ({type(exc).__name__}: {exc}); torch SDPA"
    qs = q.view(r, n, HQ, D).transpose(1, 2)
    ks = torch.empty(r, HKV, n, D, dtype=DTYPE, device="cuda").normal_()
    vs = torch.empty_like(ks).normal_()

    def sdpa():
        from torch.nn.attention import SDPBackend, sdpa_kernel

        with sdpa_kernel(SDPBackend.FLASH_ATTENTION):
            torch.nn.functional.scaled_dot_product_attention(
                qs, ks, vs, is_causal=True, enable_gqa=True
            )

    sdpa()
    return sdpa, note


def bytes_moved(n: int, r: int, w: int, chunk: int, lse_given: bool) -> tuple[int, int]:
    """(bytes the kernels move, bytes of one read of K)."""
    k_once = r * n * HKV * D * DTYPE.itemsize
    own_lse = w > 1 and not lse_given
    chunks = cdiv(n, chunk)
    scratch = r * HQ * n * 4  # logits (w = 1) or r (w > 1), written once
    # Per-row chunk max and sum (written, read back once) when the kernels find each row's
    # normaliser themselves, plus one per-head chunk sum.
    stats = (2 * (2 * r * chunks * HQ * w * 4) if w == 1 or own_lse else r * w * HQ * 4) \
        + 2 * (r * chunks * HQ * 4)
    return k_once * (2 if own_lse else 1) + scratch + stats, k_once


def window_lse_from_flash_attention(layer: dict, query: torch.Tensor) -> torch.Tensor:
    """``[R, w, Hq]`` softmax normalisers of the window rows, as vLLM's FlashAttention returns
    them during the prefill (each request's last w rows against its paged keys, causal)."""
    r, w = query.shape[:2]
    lse = flash_attention_lse(query.reshape(r * w, HQ, D), [w] * r, layer["key_cache"],
                              layer["value_cache"], layer["block_tables"], layer["prompt_lens"])
    return lse.T.reshape(r, w, HQ).contiguous()


def bench_config(timer, layer, n, r, w, agg, copy_bw, prefill_ms, backends, gen) -> dict:
    query = torch.empty(r, w, HQ, D, dtype=DTYPE, device="cuda").normal_(generator=gen)
    args = dict(
        query=query, key_cache=layer["key_cache"], block_tables=layer["block_tables"],
        prompt_lens=layer["prompt_lens"],
        window_lens=torch.full((r,), w, dtype=torch.int32, device="cuda"),
        thresholds=torch.full((r,), 0.01, device="cuda"), num_sink_tokens=4, agg=agg,
        max_prompt_len=n,
    )  # fmt: skip
    chunk = make_plan(r, w, HQ, HKV, D, n, torch.device("cuda")).chunk  # the Triton launch's
    moved, k_once = bytes_moved(n, r, w, chunk, lse_given=False)
    rec: dict[str, Any] = {
        "n": n, "w": w, "agg": agg, "num_reqs": r, "tokens": n * r, "chunk": chunk,
        "bytes_moved": moved, "k_bytes": k_once, "prefill_ms": prefill_ms}  # fmt: skip
    # (name, backend, extra arguments, bytes moved). "triton" is the serving path: with a window
    # it takes the rows' normalisers from the prefill attention; "triton_two_pass" finds them
    # itself (the path when the attention cannot return them, and the CUDA kernel's way).
    variants: list[tuple[str, str, dict[str, torch.Tensor], int]] = [
        (b, b, {}, moved) for b in backends if b != "triton"]
    if "triton" in backends:
        if w > 1:
            try:
                lse = {"window_lse": window_lse_from_flash_attention(layer, query)}
                one_pass = bytes_moved(n, r, w, chunk, lse_given=True)[0]
                variants.insert(0, ("triton", "triton", lse, one_pass))
                if "cuda" in backends:
                    variants.append(("cuda_given_lse", "cuda", lse, one_pass))
            except Exception as exc:  # record and time the two-pass path only
                rec["window_lse_error"] = f"{type(exc).__name__}: {exc}"
            variants.insert(1, ("triton_two_pass", "triton", {}, moved))
        else:
            variants.insert(0, ("triton", "triton", {}, moved))
    workspace = torch.empty(64 << 20, dtype=torch.float32, device="cuda")  # 256 MiB, reused
    out = torch.empty(r, dtype=torch.int32, device="cuda")
    for name, backend, extra, variant_bytes in variants:
        def fn(backend=backend, extra=extra):
            compute_cuts(**args, **extra, backend=backend, workspace=workspace, out=out)

        try:
            # Eager: back-to-back launches on an idle GPU, so a call costs at least its host
            # launch time (the Triton launcher's Python work), which a prefill step overlaps
            # with the GPU work queued before it.
            rec[f"{name}_eager_ms"] = timer(fn)["ms"]
            # Kernel (device) time: replays of a CUDA graph of the same call.
            t = timer(fn, graph=True)
        except Exception as exc:  # record and go on
            rec[f"{name}_error"] = f"{type(exc).__name__}: {exc}"
            log(f"  {name} failed: {rec[f'{name}_error']}")
            continue
        rec[f"{name}_ms"] = t["ms"]
        rec[f"{name}_p20_ms"] = t["p20_ms"]
        rec[f"{name}_p80_ms"] = t["p80_ms"]
        rec[f"{name}_bytes_moved"] = variant_bytes
        rec[f"{name}_bw_fraction"] = variant_bytes / (t["ms"] * 1e-3) / copy_bw
        rec[f"{name}_k_once_bw_fraction"] = k_once / (t["ms"] * 1e-3) / copy_bw
        if prefill_ms:
            rec[f"{name}_prefill_fraction"] = t["ms"] / prefill_ms
            rec[f"{name}_eager_prefill_fraction"] = rec[f"{name}_eager_ms"] / prefill_ms
    # Headline keys: Triton (the serving kernel).
    rec["triton_ms"] = rec.get("triton_ms")
    rec["cuda_ms"] = rec.get("cuda_ms")
    rec["bw_fraction"] = rec.get("triton_bw_fraction")
    rec["prefill_fraction"] = rec.get("triton_prefill_fraction")
    return rec


SWEEP = [
    # (lens, group, head_size, dtype, w_max, agg, layout, chunk)
    ([8191, 3000, 5, 1, 777], 4, 128, torch.bfloat16, 1, "max", "NHD", None),
    ([4096, 1500, 300, 5], 4, 128, torch.bfloat16, 32, "max", "NHD", None),
    ([2000, 513, 64, 2], 8, 128, torch.float16, 8, "mean", "HND", 256),
    ([3001, 1024, 17], 1, 64, torch.bfloat16, 32, "mean", "NHD", 512),
    ([6000, 4500], 2, 64, torch.float16, 1, "mean", "HND", 1024),
    ([16384], 4, 128, torch.bfloat16, 64, "max", "NHD", None),
    ([700, 90, 33, 6], 4, 64, torch.bfloat16, 16, "max", "HND", 64),
]


def correctness_sweep(backends: list[str], seeds: int) -> dict:
    res: dict[str, Any] = {
        "configs": 0, "requests": 0, "cut_mismatches": 0, "cut_tie_mismatches": 0,
        "cut_errors": [], "failures": []}  # fmt: skip
    for b in backends:
        res[f"{b}_max_rel_err"] = 0.0
    for idx, (lens, group, d, dtype, w_max, agg, layout, chunk) in enumerate(SWEEP):
        for seed in range(seeds):
            hkv = min(8, 32 // group)
            r = len(lens)
            thresholds = [(0.001, 0.01, 0.05, 0.0, 0.3)[(i + seed) % 5] for i in range(r)]
            windows = [max(1, w_max >> (i % 3)) for i in range(r)]
            case = make_case(
                lens=lens, num_q_heads=group * hkv, num_kv_heads=hkv, head_size=d, dtype=dtype,
                w_max=w_max, windows=windows, thresholds=thresholds, layout=layout, agg=agg,
                device="cuda", seed=1000 * idx + seed,
            )  # fmt: skip
            res["configs"] += 1
            res["requests"] += r
            variants: list[tuple[str, torch.Tensor | None]] = [(b, None) for b in backends]
            if w_max > 1:  # both GPU kernels with the rows' normalisers handed in
                variants += [(b, case.window_lse()) for b in backends]
            for backend, window_lse in variants:
                try:
                    curve = torch.zeros(r, max(lens), device="cuda")
                    cuts = compute_cuts(**case.kwargs(), window_lse=window_lse, backend=backend,
                                        curve_out=curve, max_prompt_len=max(lens),
                                        chunk_size=chunk)  # fmt: skip
                    cmp = compare(case, cuts, curve)
                    key = f"{backend}_max_rel_err"
                    res[key] = max(res[key], cmp.max_rel_err)
                    res["cut_tie_mismatches"] += len(cmp.tie_mismatches)
                    res["cut_mismatches"] += len(cmp.tie_mismatches) + len(cmp.errors)
                    res["cut_errors"] += [f"{backend} sweep {idx}: {e}" for e in cmp.errors]
                except Exception as exc:
                    res["failures"].append(f"{backend} sweep {idx}: {type(exc).__name__}: {exc}")
                    log(f"  sweep {idx} {backend} failed: {exc}")
        log(f"sweep config {idx} done")
    return res


def versions() -> dict:
    out: dict[str, str | None] = {"python": platform.python_version(),
                                  "torch": torch.__version__}
    for mod in ("triton", "vllm"):
        try:
            out[mod] = __import__(mod).__version__
        except Exception:
            out[mod] = None
    try:
        commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=ROOT, text=True,
                                capture_output=True, check=False).stdout.strip()
    except OSError:
        commit = ""
    out["commit"] = commit if len(commit) == 40 else None  # copies without .git have none
    return out


def write_markdown(path: Path, data: dict) -> None:
    lines = [
        f"# Scoring kernels on {data['device']}",
        "",
        f"Copy bandwidth {data['copy_bandwidth_gbps']:.0f} GB/s (read + write). Layer: "
        f"{HQ} q heads, {HKV} KV heads, d={D}, bf16, block size {BS}. Prefill baseline: "
        f"{data['prefill_impl']}.",
        "",
        "| n | w | agg | reqs | Triton ms (eager) | Triton two-pass ms (eager) | CUDA ms (eager) "
        "| CUDA one-pass ms (eager) | Triton BW frac | CUDA BW frac | Triton K-once frac "
        "| prefill ms | Triton/prefill | Triton two-pass/prefill | CUDA/prefill |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]

    def f(v, fmt):
        return format(v, fmt) if isinstance(v, (int, float)) and v is not None else "-"

    for r in data["results"]:
        lines.append(
            f"| {r['n']} | {r['w']} | {r.get('agg', '-')} | {r['num_reqs']} "
            f"| {f(r.get('triton_ms'), '.3f')} ({f(r.get('triton_eager_ms'), '.3f')}) "
            f"| {f(r.get('triton_two_pass_ms'), '.3f')} "
            f"({f(r.get('triton_two_pass_eager_ms'), '.3f')}) | {f(r.get('cuda_ms'), '.3f')} "
            f"({f(r.get('cuda_eager_ms'), '.3f')}) | {f(r.get('cuda_given_lse_ms'), '.3f')} "
            f"({f(r.get('cuda_given_lse_eager_ms'), '.3f')}) "
            f"| {f(r.get('triton_bw_fraction'), '.2f')} "
            f"| {f(r.get('cuda_bw_fraction'), '.2f')} "
            f"| {f(r.get('triton_k_once_bw_fraction'), '.2f')} "
            f"| {f(r.get('prefill_ms'), '.2f')} | {f(r.get('triton_prefill_fraction'), '.4f')} "
            f"| {f(r.get('triton_two_pass_prefill_fraction'), '.4f')} "
            f"| {f(r.get('cuda_prefill_fraction'), '.4f')} |"
        )
    lines += [
        "",
        "Times are kernel (device) time, from CUDA-graph replays; in parentheses the same call "
        "launched eagerly back to back on an idle GPU, which adds the host launch cost.",
        "",
        "Triton with a window (w > 1) takes each row's softmax normaliser from the prefill "
        "attention (vLLM's FlashAttention returns it), so it reads the keys once; the two-pass "
        "column is the same kernel finding the normalisers itself, as the CUDA kernel does.",
        "",
        f"Correctness ({data['correctness']['requests']} requests, fresh random paged layouts, "
        "Triton also with given normalisers): "
        f"triton_max_rel_err {f(data['triton_max_rel_err'], '.2e')}, "
        f"cuda_max_rel_err {f(data['cuda_max_rel_err'], '.2e')}, "
        f"cut_mismatches {data['cut_mismatches']} "
        f"(threshold ties: {data['correctness']['cut_tie_mismatches']}).",
        "",
        f"Command: `{data['command']}`",
    ]
    path.write_text("\n".join(lines) + "\n")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results"))
    ap.add_argument("--iters", type=int, default=30)
    ap.add_argument("--warmup", type=int, default=5)
    ap.add_argument("--backends", default="triton,cuda")
    ap.add_argument("--sizes", default=",".join(map(str, BATCHES)), help="prompt lengths")
    ap.add_argument("--sweep-seeds", type=int, default=2)
    args = ap.parse_args()
    if not torch.cuda.is_available():
        sys.exit("this benchmark needs a CUDA GPU")
    backends = [b for b in args.backends.split(",") if b]
    out_dir = Path(args.out)
    out_dir.mkdir(parents=True, exist_ok=True)
    data: dict = {
        "device": torch.cuda.get_device_name(),
        "timestamp": datetime.datetime.now(datetime.timezone.utc).isoformat(),
        "command": " ".join(["python", "-m", "benchmarks.kernels.bench_last_row_scores",
                             *sys.argv[1:]]),
        "versions": versions(),
        "layer": {"num_q_heads": HQ, "num_kv_heads": HKV, "head_size": D, "dtype": "bfloat16",
                  "block_size": BS, "layout": "FLASH_ATTN NHD"},  # fmt: skip
        "bytes_counted": "K reads x passes (1 for w=1 and for triton with the prefill's "
        "softmax normalisers, 2 for triton_two_pass and cuda at w>1) + fp32 scratch row per "
        "q head and position + per-chunk stats; k_once_* counts one read of K only",
        "timing": "<backend>_ms: kernel (device) time, median of CUDA-graph replays of the "
        "call, CUDA events, L2 flushed; bw and prefill fractions use it. <backend>_eager_ms: "
        "the same call launched eagerly back to back on an idle GPU, bounded below by the "
        "host launch cost, which a prefill step overlaps with queued GPU work",
        "results": [],
    }
    timer = Timer(args.iters, args.warmup)
    if "cuda" in backends:
        log("building/loading the CUDA extension (first build takes a few minutes)")
        try:
            from refreekv_vllm.ops._custom_ops import load_extension

            load_extension()
        except Exception as exc:
            data["cuda_error"] = f"{type(exc).__name__}: {exc}"
            log(f"CUDA extension unavailable: {exc}")
            backends.remove("cuda")
    copy_bw = copy_bandwidth(timer)
    data["copy_bandwidth_gbps"] = copy_bw / 1e9
    log(f"copy bandwidth {data['copy_bandwidth_gbps']:.0f} GB/s")
    gen = torch.Generator(device="cuda").manual_seed(0)
    data["prefill_impl"] = None
    for n in (int(s) for s in args.sizes.split(",")):
        r = BATCHES.get(n, max(1, (256 << 10) // n))
        try:
            layer = build_layer(n, r, gen)
            fn, impl = prefill_fn(layer, n, r)
            data["prefill_impl"] = data["prefill_impl"] or impl
            prefill_ms = timer(fn, iters=max(5, min(args.iters, 20)))["ms"]
            log(f"n={n} x {r}: prefill {prefill_ms:.2f} ms ({impl})")
        except Exception as exc:
            log(f"n={n}: setup failed: {exc}")
            data["results"].append({"n": n, "num_reqs": r, "error": traceback.format_exc()})
            continue
        for w, agg in WINDOWS:
            rec = bench_config(timer, layer, n, r, w, agg, copy_bw, prefill_ms, backends, gen)
            data["results"].append(rec)
            log(f"n={n} w={w} {agg}: " + ", ".join(
                f"{b} {rec.get(f'{b}_ms') or float('nan'):.3f} ms "
                f"(eager {rec.get(f'{b}_eager_ms') or float('nan'):.3f}) "
                f"(bw {rec.get(f'{b}_bw_fraction') or float('nan'):.2f}, "
                f"prefill {rec.get(f'{b}_prefill_fraction') or float('nan'):.4f})"
                for b in backends))  # fmt: skip
        del layer
        torch.cuda.empty_cache()
    log("correctness sweep")
    sweep = correctness_sweep(backends, args.sweep_seeds)
    data["correctness"] = sweep
    data["triton_max_rel_err"] = sweep.get("triton_max_rel_err")
    data["cuda_max_rel_err"] = sweep.get("cuda_max_rel_err")
    data["cut_mismatches"] = sweep["cut_mismatches"]
    (out_dir / "kernels_gpu.json").write_text(json.dumps(data, indent=2, default=str) + "\n")
    write_markdown(out_dir / "kernels_gpu.md", data)
    log(f"wrote {out_dir / 'kernels_gpu.json'} and kernels_gpu.md")
    if sweep["cut_errors"] or sweep["failures"]:
        log(f"CORRECTNESS PROBLEMS: {sweep['cut_errors'][:5]} {sweep['failures'][:5]}")


if __name__ == "__main__":
    main()
