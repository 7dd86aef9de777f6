"""Cut reports put together from the pipeline stages' parts.

Each worker scores and commits the cuts of its own layers: without pipeline parallelism that is
every layer, so a request's part is its whole report at once. Under pipeline parallelism a
stage other than the last sends its parts, and the earlier stages' ones it received, on to the
next stage with the step's intermediate tensors; the last stage (whose output is the one vLLM
returns to the scheduler) reports a request once the parts of every layer arrived — in the step
in which the last of its stages began to skip its gaps, so that the scheduler releases no page a
stage still reads.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from refreekv_vllm.forward.step_context import ScoringRow
from refreekv_vllm.outputs import CutPart


@dataclass
class _Partial:
    cuts_by_first_layer: dict[int, tuple[int, ...]] = field(default_factory=dict)
    row: ScoringRow | None = None  # the worker's own scoring row, once it committed its part


class CutAssembly:
    """The parts of one worker: sent on (a pipeline stage before the last) or put together."""

    def __init__(self, num_model_layers: int, sends_on: bool) -> None:
        self.num_model_layers = num_model_layers
        self.sends_on = sends_on
        self._outgoing: list[CutPart] = []
        self._partial: dict[str, _Partial] = {}
        self._complete: dict[str, tuple[ScoringRow, tuple[int, ...]]] = {}

    def add(self, part: CutPart, row: ScoringRow | None = None) -> None:
        """A part this worker committed (with its scoring ``row``) or received."""
        if self.sends_on:
            self._outgoing.append(part)
            return
        partial = self._partial.setdefault(part.req_id, _Partial())
        partial.cuts_by_first_layer[part.first_layer] = part.cuts
        if row is not None:
            partial.row = row
        parts = partial.cuts_by_first_layer
        if partial.row is None or sum(map(len, parts.values())) < self.num_model_layers:
            return
        del self._partial[part.req_id]
        cuts = tuple(cut for first in sorted(parts) for cut in parts[first])
        assert len(cuts) == self.num_model_layers, f"overlapping cut parts of {part.req_id}"
        self._complete[part.req_id] = (partial.row, cuts)

    def forget(self, req_id: str) -> None:
        self._partial.pop(req_id, None)
        self._complete.pop(req_id, None)

    def take_outgoing(self) -> list[CutPart]:
        parts, self._outgoing = self._outgoing, []
        return parts

    def take_complete(self) -> dict[str, tuple[ScoringRow, tuple[int, ...]]]:
        """Requests whose every layer's cut is known: their scoring row and cuts."""
        complete, self._complete = self._complete, {}
        return complete

    def num_tracked_requests(self) -> int:
        return len(self._partial) + len(self._complete)
