"""Paper and block budgets of a pruned request, pure functions (docs/method.md §4).

A layer with cut ``s`` keeps prompt positions ``[0, m) ∪ [s, n)``. The paper budget counts those
tokens; the engine frees whole blocks only, so its block budget counts the prompt tokens that
stay resident after freeing every block wholly inside the gap ``[m, s)``.
"""

from __future__ import annotations

from collections.abc import Sequence


def freeable_block_range(cut: int, num_sink_tokens: int, block_size: int) -> range:
    """Logical block indices whose tokens all lie in the gap ``[num_sink_tokens, cut)``.

    Block ``i`` holds ``[i * block_size, (i + 1) * block_size)``; it can be freed iff that span
    is inside the gap, i.e. ``i`` in ``ceil(m / bs) .. floor(cut / bs) - 1``. Empty when the
    gap holds no whole block (including ``cut <= num_sink_tokens``).
    """
    if block_size <= 0:
        raise ValueError(f"block_size must be positive, got {block_size}")
    first = -(-num_sink_tokens // block_size)
    stop = cut // block_size
    return range(first, max(first, stop))


def layer_paper_budget(cut: int, num_prompt_tokens: int, num_sink_tokens: int = 4) -> float:
    """Kept prompt tokens / prompt tokens of one layer: ``(m + n - s) / n``; 1.0 if n <= m + 1."""
    n, m = num_prompt_tokens, num_sink_tokens
    if n <= m + 1:
        return 1.0
    if not m <= cut <= n - 1:
        raise ValueError(f"cut {cut} outside [{m}, {n - 1}] for n={n}")
    return (m + n - cut) / n


def layer_block_budget(
    cut: int, num_prompt_tokens: int, num_sink_tokens: int, block_size: int
) -> float:
    """Resident prompt tokens / prompt tokens of one layer after block-granular freeing.

    Always ``>=`` :func:`layer_paper_budget` of the same cut.
    """
    n, m = num_prompt_tokens, num_sink_tokens
    if n <= m + 1:
        return 1.0
    if not m <= cut <= n - 1:
        raise ValueError(f"cut {cut} outside [{m}, {n - 1}] for n={n}")
    return resident_budget(n, [len(freeable_block_range(cut, m, block_size))], block_size)


def paper_budget(
    cuts: Sequence[int],
    num_prompt_tokens: int,
    num_sink_tokens: int = 4,
    frozen_layers: Sequence[int] = (0, 1),
) -> float:
    """Sample budget of the paper: unweighted mean over all layers, frozen layers at 1.0.

    Args:
        cuts: one cut per layer; entries of frozen layers are ignored.
    """
    if not cuts:
        raise ValueError("need at least one layer")
    frozen = set(frozen_layers)
    per_layer = [
        1.0 if i in frozen else layer_paper_budget(c, num_prompt_tokens, num_sink_tokens)
        for i, c in enumerate(cuts)
    ]
    return sum(per_layer) / len(per_layer)


def resident_budget(num_prompt_tokens: int, blocks_freed: Sequence[int], block_size: int
                    ) -> float:
    """The block budget, the one definition the endpoint, the metrics and the benchmarks use:
    mean over layers of the prompt tokens still resident / prompt tokens, where layer ``l``
    freed ``blocks_freed[l]`` whole blocks of its gap."""
    if not blocks_freed:
        raise ValueError("need at least one layer")
    n = num_prompt_tokens
    return sum(n - min(n, k * block_size) for k in blocks_freed) / (n * len(blocks_freed))


def block_budget(
    cuts: Sequence[int],
    num_prompt_tokens: int,
    block_size: int,
    num_sink_tokens: int = 4,
    frozen_layers: Sequence[int] = (0, 1),
) -> float:
    """Engine block budget: mean over all layers of resident prompt tokens / n (frozen at 1.0)."""
    if not cuts:
        raise ValueError("need at least one layer")
    frozen = set(frozen_layers)
    per_layer = [
        1.0
        if i in frozen
        else layer_block_budget(c, num_prompt_tokens, num_sink_tokens, block_size)
        for i, c in enumerate(cuts)
    ]
    return sum(per_layer) / len(per_layer)
