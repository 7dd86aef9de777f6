"""What ReFreeKV adds to the messages between scheduler and workers (cf. vLLM's
``v1/outputs.py``): worker → scheduler, one :class:`CutReport` per request whose last prompt
chunk ran in a step, attached to that step's ``ModelRunnerOutput``; scheduler → workers, the
pages of the blocks a ``schedule()`` handed out, attached to its ``SchedulerOutput``; under
pipeline parallelism, stage → next stage, each stage's :class:`CutPart` of those reports, in the
intermediate tensors (only the last stage's output reaches the scheduler).

``ModelRunnerOutput`` is a plain dataclass that reaches the engine core by reference (``uni``
executor) or pickled (``mp`` executor), so an extra attribute survives both paths.
"""

from __future__ import annotations

import pickle
from collections.abc import Mapping, MutableMapping
from dataclasses import dataclass

import torch
from vllm.v1.outputs import EMPTY_MODEL_RUNNER_OUTPUT, ModelRunnerOutput

# Attribute of ModelRunnerOutput holding dict[str, CutReport] (req_id -> report). May be absent.
CUTS_ATTR = "refreekv_cuts"
# Attribute of SchedulerOutput: ``(block_ids [n] int32, pages [n, num_layers] int32)``, the pages
# of every block (re)assigned in that schedule(), which the workers mirror. May be absent.
PAGE_ROWS_ATTR = "refreekv_page_rows"
# Key of the intermediate tensors a pipeline stage sends on: its and the earlier stages' cut
# parts of the step, pickled into a uint8 CPU tensor (vLLM's pipeline transports carry tensors
# only). Absent in steps without any.
CUT_PARTS_KEY = "refreekv_cut_parts"


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


@dataclass(frozen=True, slots=True)
class CutPart:
    """One pipeline stage's cuts of a request: those of model layers ``first_layer``,
    ``first_layer + 1``, ... (what :attr:`CutReport.cuts` holds for them)."""

    req_id: str
    first_layer: int
    cuts: tuple[int, ...]


# vLLM's GPU pipeline transport splits a tensor whose size the tensor-parallel world size
# divides over the ranks and all-gathers it on arrival, through the device's communicator,
# which a CPU tensor cannot use: the payload is padded to 1 modulo 840 = lcm(1..8) bytes, which
# no world size from 2 to 8 (and no power of two) divides.
_PAYLOAD_MODULUS = 840


def attach_cut_parts(tensors: MutableMapping[str, torch.Tensor], parts: list[CutPart]) -> None:
    """A non-last pipeline stage: send ``parts`` on with the step's intermediate tensors."""
    if parts:
        payload = pickle.dumps(parts)  # bytes after the pickle are ignored when it is loaded
        padding = (1 - len(payload)) % _PAYLOAD_MODULUS
        tensors[CUT_PARTS_KEY] = torch.frombuffer(bytearray(payload + bytes(padding)),
                                                  dtype=torch.uint8)


def take_cut_parts(tensors: MutableMapping[str, torch.Tensor]) -> list[CutPart]:
    """A later stage: remove the earlier stages' parts from the received intermediate tensors
    (the model must not see them)."""
    packed = tensors.pop(CUT_PARTS_KEY, None)
    if packed is None:
        return []
    parts = pickle.loads(packed.cpu().numpy().tobytes())
    assert all(isinstance(part, CutPart) for part in parts)
    return parts
