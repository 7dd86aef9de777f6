"""ReFreeKV scoring ops: one contract, three backends (``triton``, ``cuda``, ``torch``).

:func:`compute_cuts` scores many requests of one layer against the keys in vLLM's paged cache and
returns one cut per request. The ``torch`` backend gathers each request's keys and runs
``policy/reference.py`` in fp32 (CPU, or a debugging oracle); it syncs with the host. The
``triton`` and ``cuda`` backends never sync and can run under CUDA graphs when ``workspace`` and
``out`` are supplied.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from refreekv_vllm.policy.reference import (
    AGGREGATIONS,
    HEAD_AGGREGATIONS,
    cut_from_head_norm_sum,
    head_cut_positions,
    head_drops,
    head_norm_sum,
    window_probs,
)

BACKENDS = ("triton", "cuda", "torch")


def key_view_from_flash_kv_cache(
    kv_cache: torch.Tensor, head_size: int | None = None
) -> torch.Tensor:
    """K view ``[num_blocks, block_size, num_kv_heads, head_size]`` of a FLASH_ATTN-style cache.

    Args:
        kv_cache: vLLM's per-layer tensor of logical shape
            ``[num_blocks, num_kv_heads, block_size, 2 * head_size]`` (K and V packed in the
            last dim, K first), with whatever strides its layout gives it (``NHD``: memory
            ``(nb, bs, H, 2D)``; ``HND``: contiguous). FLASH_ATTN, TRITON_ATTN and FLASHINFER
            (non-fp4) share this shape.

    Returns:
        A strided view (no copy) of the keys.
    """
    if kv_cache.dim() != 4:
        raise ValueError(f"expected a 4-D kv cache, got shape {tuple(kv_cache.shape)}")
    if head_size is None:
        head_size = kv_cache.shape[-1] // 2
    if kv_cache.shape[-1] != 2 * head_size:
        raise ValueError(f"last dim {kv_cache.shape[-1]} is not 2 * head_size ({head_size})")
    return kv_cache.transpose(1, 2)[..., :head_size]


def gather_request_keys(
    key_cache: torch.Tensor, block_table_row: torch.Tensor, num_tokens: int
) -> torch.Tensor:
    """Dense keys of one request.

    Args:
        key_cache: ``[num_blocks, block_size, num_kv_heads, head_size]`` view, any strides.
        block_table_row: ``[>= ceil(num_tokens / block_size)]`` integer block ids.

    Returns:
        ``[num_kv_heads, num_tokens, head_size]`` copy, dtype of ``key_cache``.
    """
    _, bs, hkv, d = key_cache.shape
    num_blocks = -(-num_tokens // bs)
    ids = block_table_row[:num_blocks].to(device=key_cache.device, dtype=torch.long)
    return key_cache[ids].reshape(num_blocks * bs, hkv, d)[:num_tokens].transpose(0, 1)


@dataclass(frozen=True)
class HeadReduction:
    """How ranks that each hold ``1 / world_size`` of the query heads (tensor parallelism)
    combine their heads' part of the rule: ``all_reduce`` sums a tensor over the ranks, in place
    or not, and returns the sum; ``broadcast`` hands rank 0's tensor to every rank;
    ``all_gather`` concatenates every rank's tensor along dim 0, in rank order."""
    world_size: int
    all_reduce: Callable[[torch.Tensor], torch.Tensor]
    broadcast: Callable[[torch.Tensor], torch.Tensor]
    all_gather: Callable[[torch.Tensor], torch.Tensor]


def torch_compute_cuts(
    query: torch.Tensor,
    key_cache: torch.Tensor,
    block_tables: torch.Tensor,
    prompt_lens: torch.Tensor,
    window_lens: torch.Tensor,
    thresholds: torch.Tensor,
    *,
    num_sink_tokens: int = 4,
    scale: float | None = None,
    agg: str = "max",
    head_agg: str = "mean",
    curve_out: torch.Tensor | None = None,
    out: torch.Tensor | None = None,
    compute_dtype: torch.dtype = torch.float32,
    head_reduction: HeadReduction | None = None,
) -> torch.Tensor:
    """``compute_cuts`` by gathering keys and running the reference per request (host sync).

    With ``head_reduction`` (tensor parallelism) every request's heads' part of the rule goes
    through one all-reduce of ``sum(n - m)`` fp32 values per call (``head_agg = "max"``: an
    all-gather of one int64 per request, each rank's smallest ``j*_h``), and rank 0's cuts are
    broadcast, so that every rank applies the same cuts."""
    r, w_max = query.shape[:2]
    if out is None:
        out = torch.empty(r, dtype=torch.int32, device=query.device)
    lens = prompt_lens.tolist()
    wins = window_lens.tolist()
    thrs = thresholds.tolist()
    probs_of = []
    for i in range(r):
        w = max(1, min(int(wins[i]), w_max))
        keys = gather_request_keys(key_cache, block_tables[i], int(lens[i]))
        probs_of.append(window_probs(query[i, w_max - w :].to(compute_dtype),
                                     keys.to(compute_dtype), scale=scale, agg=agg))
    if head_agg == "max":
        result = _every_head_cuts(probs_of, thrs, num_sink_tokens, curve_out, head_reduction)
    else:
        result = _mean_head_cuts(probs_of, thrs, num_sink_tokens, curve_out, head_reduction,
                                 query.shape[2])
    result = result.to(device=query.device, dtype=torch.int32)
    if head_reduction is not None:
        # Sums over ranks can differ in their last bits from rank to rank: one rank decides.
        result = head_reduction.broadcast(result)
    out.copy_(result)
    return out


def _every_head_cuts(probs_of: list[torch.Tensor], thresholds: list[float], m: int,
                     curve_out: torch.Tensor | None,
                     head_reduction: HeadReduction | None) -> torch.Tensor:
    """``head_agg = "max"``: ``m + min_h j*_h`` per request, the minimum over every rank's
    heads."""
    j_stars = torch.stack([
        head_cut_positions(probs, num_sink_tokens=m, threshold=float(threshold)).min()
        for probs, threshold in zip(probs_of, thresholds, strict=True)]).cpu()
    if head_reduction is not None:
        gathered = head_reduction.all_gather(j_stars.to(probs_of[0].device))
        j_stars = gathered.reshape(head_reduction.world_size, -1).amin(dim=0).cpu()
    if curve_out is not None:
        for i, probs in enumerate(probs_of):
            drops = head_drops(probs, num_sink_tokens=m)
            curve_out[i, : drops.numel()] = drops.to(curve_out.dtype)
    return j_stars + m


def _mean_head_cuts(probs_of: list[torch.Tensor], thresholds: list[float], m: int,
                    curve_out: torch.Tensor | None, head_reduction: HeadReduction | None,
                    num_heads: int) -> torch.Tensor:
    """The paper's ``head_agg = "mean"``: one all-reduce of the heads' norm sums under TP."""
    norm_sums = [head_norm_sum(probs, num_sink_tokens=m) for probs in probs_of]
    if head_reduction is not None:
        sizes = [x.numel() for x in norm_sums]
        total = head_reduction.all_reduce(torch.cat(norm_sums).contiguous())
        norm_sums = list(total.split(sizes))
        num_heads *= head_reduction.world_size
    cuts = []
    for i, norm_sum in enumerate(norm_sums):
        cut, ratio = cut_from_head_norm_sum(norm_sum, num_heads, num_sink_tokens=m,
                                            threshold=float(thresholds[i]))
        cuts.append(cut)
        if curve_out is not None and ratio.numel():
            curve_out[i, : ratio.numel()] = ratio.to(curve_out.dtype)
    return torch.tensor(cuts, dtype=torch.int64)


def required_workspace_numel(
    backend: str,
    *,
    num_reqs: int,
    w_max: int,
    num_q_heads: int,
    num_kv_heads: int,
    head_size: int,
    max_prompt_len: int,
    device: torch.device,
    chunk_size: int | None = None,
) -> int:
    """fp32 elements of ``workspace`` that :func:`compute_cuts` needs for these shapes.

    Pass the same ``max_prompt_len`` and ``chunk_size`` to :func:`compute_cuts`; allocate once
    for the largest batch and reuse it (required under CUDA graphs). 0 for ``torch``.
    """
    if backend == "torch":
        return 0
    if backend == "cuda":
        from refreekv_vllm.ops.launch_utils import default_chunk_size
        from refreekv_vllm.ops.workspace import workspace_layout

        chunk = chunk_size or default_chunk_size(num_reqs, num_kv_heads, max_prompt_len, device)
        return workspace_layout(num_reqs, w_max, num_q_heads, max_prompt_len, chunk).total
    if backend == "triton":
        from refreekv_vllm.ops.triton_last_row_scores import make_plan

        return make_plan(num_reqs, w_max, num_q_heads, num_kv_heads, head_size, max_prompt_len,
                         device, chunk_size).layout.total
    raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")


def compute_cuts(
    query: torch.Tensor,
    key_cache: torch.Tensor,
    block_tables: torch.Tensor,
    prompt_lens: torch.Tensor,
    window_lens: torch.Tensor,
    thresholds: torch.Tensor,
    *,
    num_sink_tokens: int = 4,
    scale: float | None = None,
    agg: str = "max",
    head_agg: str = "mean",
    backend: str = "triton",
    curve_out: torch.Tensor | None = None,
    out: torch.Tensor | None = None,
    max_prompt_len: int | None = None,
    workspace: torch.Tensor | None = None,
    chunk_size: int | None = None,
    window_lse: torch.Tensor | None = None,
    head_reduction: HeadReduction | None = None,
) -> torch.Tensor:
    """ReFreeKV cut of every request of one layer, keys read from the paged cache.

    Args:
        query: ``[R, W_MAX, num_q_heads, head_size]`` bf16/fp16/fp32 post-RoPE queries of each
            request's last prompt positions, right-aligned (request r uses its last
            ``window_lens[r]`` rows, clamped to ``[1, min(W_MAX, n)]``).
        key_cache: ``[num_blocks, block_size, num_kv_heads, head_size]`` view with any strides
            (:func:`key_view_from_flash_kv_cache`, or
            ``refreekv_vllm.ops.cpu_keys.key_view_from_cpu_attn_kv_cache`` on CPU).
        block_tables: ``[R, max_blocks]`` int32.
        prompt_lens: ``[R]`` int32 prompt lengths n.
        window_lens: ``[R]`` int32 window sizes w.
        thresholds: ``[R]`` fp32 thresholds T (T <= 0 prunes nothing).
        num_sink_tokens: m, always kept and excluded from the norms.
        scale: softmax scale, default ``head_size ** -0.5``.
        agg: ``"max"`` or ``"mean"`` over window rows.
        head_agg: ``"mean"`` (the paper's mean of head norms) or ``"max"`` (every head keeps
            its own norm within T; ``torch`` backend only).
        backend: ``"triton"``, ``"cuda"`` (JIT-built ``torch.ops._refreekv_C``) or ``"torch"``.
        curve_out: optional ``[R, L]`` fp32, ``L >= max n - m``; receives ``ratio(j)``.
        out: optional ``[R]`` int32 result buffer.
        max_prompt_len: host bound on ``prompt_lens`` for grid/scratch sizing (GPU backends);
            default ``max_blocks * block_size``.
        workspace: optional flat fp32 scratch (GPU backends) of at least
            :func:`required_workspace_numel` elements; allocated per call when omitted.
        chunk_size: keys per program of the GPU backends (power of two); default from
            ``launch_utils.default_chunk_size`` (larger for the Triton window pass).
        window_lse: optional ``[R, W_MAX, num_q_heads]`` fp32 natural-log softmax normaliser
            of every query row (FlashAttention's ``softmax_lse`` of the prefill), aligned with
            ``query``. The GPU backends then read the keys once instead of twice for windows
            of w > 1 rows; the torch backend computes the normaliser itself.
        head_reduction: tensor parallelism (``query`` holds this rank's heads): combine the
            ranks' heads (``torch`` backend only).

    Returns:
        ``[R]`` int32 cuts: keep ``[0, m)`` and ``[cut, n)``; ``cut == m`` keeps everything.
    """
    if agg not in AGGREGATIONS:
        raise ValueError(f"agg must be one of {AGGREGATIONS}, got {agg!r}")
    if head_agg not in HEAD_AGGREGATIONS:
        raise ValueError(f"head_agg must be one of {HEAD_AGGREGATIONS}, got {head_agg!r}")
    if backend == "torch":
        return torch_compute_cuts(
            query, key_cache, block_tables, prompt_lens, window_lens, thresholds,
            num_sink_tokens=num_sink_tokens, scale=scale, agg=agg, head_agg=head_agg,
            curve_out=curve_out, out=out, head_reduction=head_reduction,
        )  # fmt: skip
    if head_agg != "mean":
        raise ValueError(f"the {backend} backend combines heads by their mean; head_agg "
                         f"{head_agg!r} needs the torch backend")
    if head_reduction is not None:
        raise ValueError(f"the {backend} backend scores all heads on one rank; tensor "
                         "parallelism needs the torch backend")
    fn: Callable[..., torch.Tensor]
    if backend == "triton":
        from refreekv_vllm.ops.triton_last_row_scores import triton_compute_cuts

        fn = triton_compute_cuts
    elif backend == "cuda":
        from refreekv_vllm.ops._custom_ops import cuda_compute_cuts

        fn = cuda_compute_cuts
    else:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    return fn(
        query, key_cache, block_tables, prompt_lens, window_lens, thresholds,
        num_sink_tokens=num_sink_tokens, scale=scale, agg=agg, max_prompt_len=max_prompt_len,
        curve_out=curve_out, out=out, workspace=workspace, chunk_size=chunk_size,
        window_lse=window_lse,
    )  # fmt: skip


__all__ = [
    "BACKENDS",
    "HeadReduction",
    "compute_cuts",
    "gather_request_keys",
    "key_view_from_flash_kv_cache",
    "required_workspace_numel",
    "torch_compute_cuts",
]
