"""Per-request cut state of the scheduler, its one owner, and cumulative counters.

A request moves through: reported (its cuts arrived) → pruned (gap blocks released) → finished,
or is marked no-prune for the rest of its life (preempted: its KV is recomputed in full on
resume; opted out). Everything is dropped when the request finishes or is aborted.
"""

from __future__ import annotations

from collections import Counter, deque
from dataclasses import dataclass
from enum import Enum
from typing import TYPE_CHECKING

import numpy as np

from refreekv_vllm import envs
from refreekv_vllm.outputs import CutReport
from refreekv_vllm.policy.budget import resident_budget

if TYPE_CHECKING:
    from refreekv_vllm.core.paged_block_pool import ReleasedPages


class SkipReason(str, Enum):
    """Why a cut report released nothing."""

    NOT_RUNNING = "not_running"  # finished, aborted or preempted before its report arrived
    PREEMPTED = "preempted"  # preempted earlier; resumed with fully recomputed KV
    OPTED_OUT = "opted_out"
    SHORT_PROMPT = "short_prompt"  # shorter than min_prompt_tokens: never scored
    ALREADY_REPORTED = "already_reported"  # one report per request life
    NO_GAP = "no_gap"  # no layer's gap holds a whole block


@dataclass(frozen=True, slots=True)
class PrunedRequest:
    report: CutReport
    # Per model layer, the blocks whose page of that layer the request released.
    released: ReleasedPages
    # Pages that went back to the pool at release time (not held by another request).
    num_freed_blocks: int


@dataclass(frozen=True)
class CutStats:
    """Cumulative counters since the scheduler started."""

    requests_pruned: int
    requests_skipped: dict[str, int]  # SkipReason value -> count
    # Layer pages (one layer x block_size tokens) released by pruned requests.
    blocks_released: int
    # Released pages that went back to the pool at release time (pages of blocks shared with
    # other requests go back later, once every holder pruned them, and are not counted here).
    blocks_freed: int
    # Sum over layers of gap tokens (cut - num_sink_tokens) of pruned requests.
    tokens_pruned: int
    bytes_freed: int
    # Engine block budget (resident prompt tokens / prompt tokens, mean over layers) of the
    # most recently reported requests, oldest first.
    recent_block_budgets: tuple[float, ...]


class CutState:
    def __init__(self, block_size: int, page_size_bytes: int, history: int = 256) -> None:
        self.block_size = block_size
        self.page_size_bytes = page_size_bytes

        self._reported: set[str] = set()
        self._pruned: dict[str, PrunedRequest] = {}
        self._no_prune: dict[str, SkipReason] = {}
        # req_id -> the most tokens cache_blocks may publish (see scheduler).
        self._cache_cap: dict[str, int] = {}

        self._requests_pruned = 0
        self._requests_skipped: Counter[str] = Counter()
        self._blocks_released = 0
        self._blocks_freed = 0
        self._tokens_pruned = 0
        self._recent_block_budgets: deque[float] = deque(maxlen=history)
        self._recent_reports: deque[CutReport] = deque(maxlen=history)

    # Per-request state.

    def recent_reports(self) -> list[CutReport]:
        """Cut reports of the most recently reported requests, oldest first."""
        return list(self._recent_reports)

    def no_prune_reason(self, req_id: str) -> SkipReason | None:
        return self._no_prune.get(req_id)

    def mark_no_prune(self, req_id: str, reason: SkipReason) -> None:
        self._no_prune.setdefault(req_id, reason)

    def was_reported(self, req_id: str) -> bool:
        return req_id in self._reported

    def pruned(self, req_id: str) -> PrunedRequest | None:
        return self._pruned.get(req_id)

    def block_budget_of(self, req_id: str) -> float:
        """Block budget of a pruned request (resident prompt blocks / prompt blocks)."""
        pruned = self._pruned[req_id]
        return self._block_budget(pruned.report, pruned.released.counts())

    def cap_cache(self, req_id: str, num_tokens: int) -> None:
        self._cache_cap[req_id] = min(num_tokens, self._cache_cap.get(req_id, num_tokens))

    @property
    def cache_caps(self) -> dict[str, int]:
        """req_id -> the most tokens cache_blocks may publish; the live mapping, read on the
        per-request hot path."""
        return self._cache_cap

    def record_skip(self, reason: SkipReason) -> None:
        self._requests_skipped[reason.value] += 1

    def record_report(
        self, report: CutReport, released: ReleasedPages, num_freed_blocks: int
    ) -> None:
        """Record an accepted report and what releasing its gaps did."""
        req_id = report.req_id
        assert req_id not in self._reported, f"request {req_id} reported twice"
        assert len(released.starts) == len(report.cuts)
        if envs.REFREEKV_DEBUG_ACCOUNTING:
            for layer in range(len(report.cuts)):
                ids = released.layer(layer)
                assert len(np.unique(ids)) == len(ids), (
                    f"request {req_id}: a block's layer-{layer} page released twice")
        counts = released.counts()
        self._reported.add(req_id)
        self._recent_block_budgets.append(self._block_budget(report, counts))
        self._recent_reports.append(report)

        num_released = int(counts.sum())
        if num_released == 0:
            self.record_skip(SkipReason.NO_GAP)
            return
        self._pruned[req_id] = PrunedRequest(report, released, num_freed_blocks)
        self._requests_pruned += 1
        self._blocks_released += num_released
        self._blocks_freed += num_freed_blocks
        self._tokens_pruned += sum(c - report.num_sink_tokens for c in report.cuts)

    def on_preempted(self, req_id: str) -> None:
        # All blocks were freed and the KV is recomputed in full: nothing stays pruned or capped.
        self._reported.discard(req_id)
        self._pruned.pop(req_id, None)
        self._cache_cap.pop(req_id, None)
        self.mark_no_prune(req_id, SkipReason.PREEMPTED)

    def on_finished(self, req_id: str) -> None:
        self._reported.discard(req_id)
        self._pruned.pop(req_id, None)
        self._cache_cap.pop(req_id, None)
        self._no_prune.pop(req_id, None)

    def num_tracked_requests(self) -> int:
        """Requests with any state (a leak check for tests)."""
        return len(self._reported | set(self._pruned) | set(self._no_prune) | set(self._cache_cap))

    # Counters.

    def stats(self) -> CutStats:
        return CutStats(
            requests_pruned=self._requests_pruned,
            requests_skipped=dict(self._requests_skipped),
            blocks_released=self._blocks_released,
            blocks_freed=self._blocks_freed,
            tokens_pruned=self._tokens_pruned,
            bytes_freed=self._blocks_freed * self.page_size_bytes,
            recent_block_budgets=tuple(self._recent_block_budgets),
        )

    def _block_budget(self, report: CutReport, released_per_layer: np.ndarray) -> float:
        return resident_budget(report.num_prompt_tokens, released_per_layer.tolist(),
                               self.block_size)
