"""What ReFreeKV adds to the messages between scheduler and workers (cf. vLLM's
``v1/outputs.py``): worker → scheduler, one :class:`CutReport` per request whose last prompt
chunk ran in a step, attached to that step's ``ModelRunnerOutput``; scheduler → workers, the
pages of the blocks a ``schedule()`` handed out, attached to its ``SchedulerOutput``.

``ModelRunnerOutput`` is a plain dataclass that reaches the engine core by reference (``uni``
executor) or pickled (``mp`` executor), so an extra attribute survives both paths.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

from vllm.v1.outputs import EMPTY_MODEL_RUNNER_OUTPUT, ModelRunnerOutput

# Attribute of ModelRunnerOutput holding dict[str, CutReport] (req_id -> report). May be absent.
CUTS_ATTR = "refreekv_cuts"
# Attribute of SchedulerOutput: ``(block_ids [n] int32, pages [n, num_layers] int32)``, the pages
# of every block (re)assigned in that schedule(), which the workers mirror. May be absent.
PAGE_ROWS_ATTR = "refreekv_page_rows"


@dataclass(frozen=True, slots=True)
class CutReport:
    """Cuts of one request, computed in the step that ran its last prompt chunk.

    ``cuts[layer]`` is the first kept non-sink prompt position of model layer ``layer``:
    the layer keeps ``[0, num_sink_tokens) ∪ [cut, num_prompt_tokens)`` of the prompt, and
    ``cut == num_sink_tokens`` keeps everything (frozen layers, short prompts).
    """

    req_id: str
    num_prompt_tokens: int
    num_sink_tokens: int
    cuts: tuple[int, ...]

    def __post_init__(self) -> None:
        if not self.cuts:
            raise ValueError(f"CutReport for {self.req_id!r} has no layers")
        # The last prompt token is always kept, except for prompts too short to prune.
        highest = max(self.num_sink_tokens, self.num_prompt_tokens - 1)
        bad = [c for c in self.cuts if not self.num_sink_tokens <= c <= highest]
        if bad:
            raise ValueError(
                f"CutReport for {self.req_id!r}: cuts {bad} outside "
                f"[{self.num_sink_tokens}, {highest}] "
                f"(num_prompt_tokens={self.num_prompt_tokens})")

    @property
    def prunes(self) -> bool:
        """Whether any layer drops prompt tokens."""
        return any(c > self.num_sink_tokens for c in self.cuts)


def attach_cut_reports(output: ModelRunnerOutput, reports: Mapping[str, CutReport]) -> None:
    """Worker side: attach this step's reports to its ``ModelRunnerOutput``."""
    if not reports:
        return
    # vLLM returns this shared singleton for empty steps; an attribute on it would leak into
    # every later empty step.
    if output is EMPTY_MODEL_RUNNER_OUTPUT:
        raise ValueError("cannot attach cut reports to vLLM's shared EMPTY_MODEL_RUNNER_OUTPUT")
    setattr(output, CUTS_ATTR, dict(reports))


def get_cut_reports(output: ModelRunnerOutput) -> Mapping[str, CutReport]:
    """Scheduler side: the reports attached to ``output`` (empty when there are none)."""
    return getattr(output, CUTS_ATTR, None) or {}
