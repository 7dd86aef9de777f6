"""Per-request budgets from the scheduler's cut reports.

- ideal budget: the paper's token-level sample budget, the mean over all layers of kept prompt
  tokens / prompt tokens (``refreekv_vllm.policy.budget.paper_budget``);
- physical budget: the engine's block budget (``resident_budget``, the one the endpoint and the
  ``refreekv:request_block_budget`` histogram report): prompt tokens still resident / prompt
  tokens, over all layers, after freeing the whole blocks inside each layer's gap.

A request that was not pruned (full cache, opted out, too short) has both budgets 1.0.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

from refreekv_vllm.policy.budget import freeable_block_range, paper_budget, resident_budget


@dataclass(frozen=True)
class Budgets:
    ideal: float
    physical: float
    reported: bool  # whether the scheduler reported cuts for the request


UNPRUNED = Budgets(1.0, 1.0, False)


def physical_budget(cuts: Iterable[int], num_prompt_tokens: int, num_sink_tokens: int,
                    block_size: int) -> float:
    freed = [len(freeable_block_range(c, num_sink_tokens, block_size)) for c in cuts]
    return resident_budget(num_prompt_tokens, freed, block_size)


def report_budgets(report: Any, block_size: int) -> Budgets:
    """Budgets of one ``CutReport``. Layers are not treated as frozen here: a frozen layer's cut
    already keeps everything, and a fixed-budget policy may cut every layer."""
    n, m = report.num_prompt_tokens, report.num_sink_tokens
    return Budgets(ideal=paper_budget(report.cuts, n, m, frozen_layers=()),
                   physical=physical_budget(report.cuts, n, m, block_size), reported=True)


def match_reports(request_ids: Iterable[str], reports: Iterable[Any]) -> dict[str, Any]:
    """Map vLLM's output request ids to cut reports. The engine core's id is the LLM's id plus a
    random suffix (``"{id}-{8 chars}"``, ``InputProcessor.assign_request_id``)."""
    by_prefix = {r.req_id.rsplit("-", 1)[0]: r for r in reports}
    return {rid: by_prefix[rid] for rid in request_ids if rid in by_prefix}
