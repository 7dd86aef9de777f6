"""PyTorch reference of the ReFreeKV cut rule (docs/method.md §2), the oracle for all kernels.

Everything here works on dense tensors (no paging) and in the dtype it is given: pass float64
tensors for tests, float32 (the ``torch`` kernel backend) in production. One layer of one request:

1. For every query head h and window row i (prompt position ``t_i = n - w + i``), take the causal
   softmax of ``scale * q · k`` over keys ``0 .. t_i`` (keys after ``t_i`` get probability 0).
2. Aggregate the rows of a head: ``max_i`` or ``mean_i`` (masked entries count as 0, divided by w).
   With w = 1 both are the paper's last-row attention ``a_h``.
3. ``r_h[p] = agg_h[m + p]^2`` (sinks excluded), ``tail_h[j] = sum_{p >= j} r_h[p]``,
   ``K(j) = mean_h sqrt(tail_h[j])``, ``ratio(j) = (K(0) - K(j)) / K(0)``.
4. ``j* = max{j in [0, n - m - 1] : K(0) - K(j) <= T * K(0)}``, ``cut = m + j*``.

Heads combine by the mean of their norms (step 3, the paper's ``head_agg = "mean"``) or, with
``head_agg = "max"``, every head must keep its own norm: ``j*_h = max{j : N_h(0) - N_h(j) <=
T * N_h(0)}`` with ``N_h(j) = sqrt(tail_h[j])``, and ``j* = min_h j*_h`` (the largest relative
drop over heads stays within T; a head with no mass outside the sinks allows any j).

Two rules pin the edges: ``n <= m + 1`` keeps everything (cut = m), and ``T <= 0`` keeps everything
too. The literal rule at T = 0 would still drop the oldest candidates whose squared mass vanishes
in floating point (ratio exactly 0 because adding them does not change the tail sum), which breaks
"T = 0 is identical to the unpruned engine" (docs/method.md §2, item 13); so T <= 0 disables
pruning.
The comparison is written ``B - K(j) <= T * B`` (no division) in every backend.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

AGGREGATIONS = ("max", "mean")
HEAD_AGGREGATIONS = ("mean", "max")


def _check_agg(agg: str) -> None:
    if agg not in AGGREGATIONS:
        raise ValueError(f"agg must be one of {AGGREGATIONS}, got {agg!r}")


def window_probs(
    query: torch.Tensor,
    keys: torch.Tensor,
    *,
    scale: float | None = None,
    agg: str = "max",
) -> torch.Tensor:
    """Causal softmax rows of the last ``w`` prompt positions, aggregated per query head.

    Args:
        query: ``[w, num_q_heads, head_size]`` (or ``[num_q_heads, head_size]`` for w = 1),
            post-RoPE queries of prompt positions ``n - w .. n - 1``. If ``w > n`` only the
            last ``n`` rows are used.
        keys: ``[num_kv_heads, n, head_size]`` post-RoPE prompt keys.
        scale: softmax scale, default ``head_size ** -0.5``.
        agg: ``"max"`` or ``"mean"`` over window rows.

    Returns:
        ``[num_q_heads, n]`` aggregated probabilities in the promoted dtype of the inputs
        (at least float32).
    """
    _check_agg(agg)
    if query.dim() == 2:
        query = query.unsqueeze(0)
    w, hq, d = query.shape
    hkv, n, dk = keys.shape
    if dk != d or hq % hkv != 0:
        raise ValueError(f"bad shapes: query {tuple(query.shape)}, keys {tuple(keys.shape)}")
    dtype = torch.promote_types(torch.promote_types(query.dtype, keys.dtype), torch.float32)
    scale = d**-0.5 if scale is None else scale
    w_eff = min(w, n)
    q = query[w - w_eff :].to(dtype)  # [w_eff, Hq, d]
    k = keys.to(dtype).repeat_interleave(hq // hkv, dim=0)  # [Hq, n, d]
    logits = torch.einsum("whd,hnd->hwn", q, k) * scale  # [Hq, w_eff, n]
    rows = torch.arange(n - w_eff, n, device=keys.device)
    future = torch.arange(n, device=keys.device)[None, :] > rows[:, None]  # [w_eff, n]
    logits = logits.masked_fill(future, float("-inf"))
    probs = torch.softmax(logits, dim=-1)  # [Hq, w_eff, n]
    return probs.amax(dim=1) if agg == "max" else probs.mean(dim=1)


def _head_tail_norms(probs: torch.Tensor, num_sink_tokens: int) -> torch.Tensor:
    """``N_h(j) = sqrt(tail_h[j])``, ``tail_h[j] = sum_{p >= m + j} probs[h, p]^2``: every
    head's norm over the candidates ``j = 0 .. n - m - 1`` (``[num_q_heads, n - m]``),
    non-increasing in ``j``."""
    return probs[:, num_sink_tokens:].square().flip(-1).cumsum(-1).flip(-1).sqrt()


def head_norm_sum(probs: torch.Tensor, *, num_sink_tokens: int = 4) -> torch.Tensor:
    """``sum_h sqrt(tail_h[j])`` for ``j = 0 .. n - m - 1``: the heads' part of ``K(j)``
    (empty when ``n <= m``).

    Heads add up, so ranks that each hold some of the heads (tensor parallelism) combine their
    sums by one all-reduce before :func:`cut_from_head_norm_sum`.

    Args:
        probs: ``[num_q_heads, n]`` per-head attention mass per prompt position.
    """
    return _head_tail_norms(probs, num_sink_tokens).sum(dim=0)


def cut_from_head_norm_sum(
    norm_sum: torch.Tensor,
    num_heads: int,
    *,
    num_sink_tokens: int = 4,
    threshold: float = 0.01,
) -> tuple[int, torch.Tensor]:
    """Cut of one layer from :func:`head_norm_sum` over all ``num_heads`` query heads.

    Returns:
        ``(cut, ratio)`` with ``ratio`` of shape ``[n - num_sink_tokens]`` holding
        ``ratio(j)`` for ``j = 0 .. n - m - 1`` (0 where the baseline norm is 0).
        Positions ``[num_sink_tokens, cut)`` are pruned; ``cut == num_sink_tokens`` keeps all.
    """
    m = num_sink_tokens
    if not norm_sum.numel():
        return m, norm_sum
    kept = norm_sum / num_heads  # K(j), kept[0] = baseline
    base = kept[0]
    ratio = torch.where(base > 0, (base - kept) / base, torch.zeros_like(kept))
    if kept.numel() <= 1 or threshold <= 0:
        return m, ratio
    ok = (base - kept) <= threshold * base
    j_star = int(torch.nonzero(ok).max()) if bool(ok.any()) else 0
    return m + j_star, ratio


def head_cut_positions(probs: torch.Tensor, *, num_sink_tokens: int = 4,
                       threshold: float = 0.01) -> torch.Tensor:
    """``j*_h`` of every head (``head_agg = "max"``): ``[num_q_heads]`` int64, the largest ``j``
    at which the head's own norm dropped by at most ``T`` of its baseline (0 when nothing can
    be pruned). Ranks holding some of the heads each take the minimum over theirs; the layer's
    ``j*`` is the minimum over all heads."""
    norms = _head_tail_norms(probs, num_sink_tokens)
    num_heads, candidates = norms.shape
    if candidates <= 1 or threshold <= 0:
        return torch.zeros(num_heads, dtype=torch.int64, device=probs.device)
    base = norms[:, :1]
    ok = (base - norms) <= threshold * base  # always true at j = 0
    index = torch.arange(candidates, device=probs.device)
    return torch.where(ok, index, -1).amax(dim=1)


def head_drops(probs: torch.Tensor, *, num_sink_tokens: int = 4) -> torch.Tensor:
    """``max_h (N_h(0) - N_h(j)) / N_h(0)`` for ``j = 0 .. n - m - 1`` (0 for a head without
    mass outside the sinks): the ``ratio`` curve of ``head_agg = "max"``."""
    norms = _head_tail_norms(probs, num_sink_tokens)
    base = norms[:, :1]
    drops = torch.where(base > 0, (base - norms) / torch.where(base > 0, base, 1.0), 0.0)
    return drops.amax(dim=0)


def cut_from_probs(
    probs: torch.Tensor,
    *,
    num_sink_tokens: int = 4,
    threshold: float = 0.01,
    head_agg: str = "mean",
) -> tuple[int, torch.Tensor]:
    """Cut of one layer from already aggregated attention rows.

    Args:
        probs: ``[num_q_heads, n]`` per-head attention mass per prompt position.
        head_agg: ``"mean"`` (the paper's mean of head norms) or ``"max"`` (every head).

    Returns:
        ``(cut, ratio)`` with ``ratio`` of shape ``[max(n - num_sink_tokens, 0)]``, see
        :func:`cut_from_head_norm_sum` (and :func:`head_drops` for ``"max"``).
    """
    if head_agg not in HEAD_AGGREGATIONS:
        raise ValueError(f"head_agg must be one of {HEAD_AGGREGATIONS}, got {head_agg!r}")
    if head_agg == "max":
        j_star = head_cut_positions(probs, num_sink_tokens=num_sink_tokens,
                                    threshold=threshold).min()
        return num_sink_tokens + int(j_star), head_drops(probs, num_sink_tokens=num_sink_tokens)
    return cut_from_head_norm_sum(head_norm_sum(probs, num_sink_tokens=num_sink_tokens),
                                  probs.shape[0], num_sink_tokens=num_sink_tokens,
                                  threshold=threshold)


def layer_cut(
    query: torch.Tensor,
    keys: torch.Tensor,
    *,
    num_sink_tokens: int = 4,
    threshold: float = 0.01,
    scale: float | None = None,
    agg: str = "max",
    head_agg: str = "mean",
) -> tuple[int, torch.Tensor]:
    """Cut of one layer of one request (docs/method.md §2, plus the window).

    Args:
        query: ``[w, num_q_heads, head_size]`` or ``[num_q_heads, head_size]`` post-RoPE
            queries of the last ``w`` prompt positions (query head h reads KV head
            ``h // (num_q_heads // num_kv_heads)``).
        keys: ``[num_kv_heads, n, head_size]`` post-RoPE keys of all n prompt tokens.

    Returns:
        ``(cut, ratio)``: keep ``[0, num_sink_tokens)`` and ``[cut, n)``; ``ratio`` is
        ``[max(n - num_sink_tokens, 0)]``, see :func:`cut_from_probs`.
    """
    probs = window_probs(query, keys, scale=scale, agg=agg)
    return cut_from_probs(probs, num_sink_tokens=num_sink_tokens, threshold=threshold,
                          head_agg=head_agg)


def request_cuts(
    per_layer: Sequence[tuple[torch.Tensor, torch.Tensor]],
    *,
    frozen_layers: Sequence[int] = (0, 1),
    num_sink_tokens: int = 4,
    threshold: float = 0.01,
    scale: float | None = None,
    agg: str = "max",
    head_agg: str = "mean",
) -> list[int]:
    """Cuts of every layer of one request; frozen layers keep everything (cut = m).

    Args:
        per_layer: one ``(query, keys)`` pair per layer, shapes as in :func:`layer_cut`.
    """
    frozen = set(frozen_layers)
    return [
        num_sink_tokens
        if layer in frozen
        else layer_cut(
            q,
            k,
            num_sink_tokens=num_sink_tokens,
            threshold=threshold,
            scale=scale,
            agg=agg,
            head_agg=head_agg,
        )[0]
        for layer, (q, k) in enumerate(per_layer)
    ]
