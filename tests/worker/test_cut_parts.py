"""Cut reports put together from pipeline stages' parts, and the parts' ride in the
intermediate tensors between stages."""

import pytest
import torch

from refreekv_vllm.forward.step_context import ScoringRow
from refreekv_vllm.outputs import CUT_PARTS_KEY, CutPart, attach_cut_parts, take_cut_parts
from refreekv_vllm.policy.policies import ThresholdPolicy
from refreekv_vllm.worker.cut_parts import CutAssembly

RULE = ThresholdPolicy(threshold=0.01, window=1, window_agg="mean")


def row(req_id: str) -> ScoringRow:
    return ScoringRow(req_id=req_id, batch_row=0, num_prompt_tokens=100, window=1, policy=RULE)


def test_one_stage_reports_at_once():
    assembly = CutAssembly(num_model_layers=3, sends_on=False)
    assembly.add(CutPart("a", 0, (4, 9, 12)), row("a"))
    assert assembly.take_complete() == {"a": (row("a"), (4, 9, 12))}
    assert assembly.take_complete() == {} and assembly.num_tracked_requests() == 0


def test_the_last_stage_waits_for_every_layer_and_its_own_row():
    assembly = CutAssembly(num_model_layers=6, sends_on=False)
    assembly.add(CutPart("a", 0, (4, 4)))  # stage 0, received
    assembly.add(CutPart("b", 4, (20, 21)), row("b"))  # stage 2 (this one) first
    assert assembly.take_complete() == {}
    assembly.add(CutPart("a", 4, (30, 31)), row("a"))
    assembly.add(CutPart("b", 0, (4, 4)))
    assert assembly.take_complete() == {}
    assembly.add(CutPart("b", 2, (8, 9)))  # stage 1's part arrives with stage 0's next
    assembly.add(CutPart("a", 2, (10, 11)))
    assert assembly.take_complete() == {"a": (row("a"), (4, 4, 10, 11, 30, 31)),
                                        "b": (row("b"), (4, 4, 8, 9, 20, 21))}
    assembly.add(CutPart("c", 0, (4, 4)))
    assembly.forget("c")  # finished before its other parts came
    assert assembly.num_tracked_requests() == 0


def test_a_stage_before_the_last_sends_everything_on():
    assembly = CutAssembly(num_model_layers=6, sends_on=True)
    assembly.add(CutPart("a", 0, (4, 4)))
    assembly.add(CutPart("a", 2, (7, 8)), row("a"))
    assert assembly.take_complete() == {}
    assert assembly.take_outgoing() == [CutPart("a", 0, (4, 4)), CutPart("a", 2, (7, 8))]
    assert assembly.take_outgoing() == []


def test_parts_ride_in_the_intermediate_tensors_and_leave_before_the_model():
    hidden = torch.zeros(3, 8)
    tensors = {"hidden_states": hidden}
    attach_cut_parts(tensors, [])
    assert set(tensors) == {"hidden_states"}  # nothing to send: nothing added
    parts = [CutPart("a", 0, (4, 5)), CutPart("b-1", 0, (4, 4))]
    attach_cut_parts(tensors, parts)
    packed = tensors[CUT_PARTS_KEY]
    assert packed.dtype == torch.uint8 and packed.is_cpu
    # Never split over tensor-parallel ranks by vLLM's GPU transport (see outputs.py).
    assert all(packed.numel() % world_size for world_size in (2, 3, 4, 5, 6, 7, 8, 16))
    received = {key: value.clone() for key, value in tensors.items()}  # what the next stage got
    assert take_cut_parts(received) == parts
    assert set(received) == {"hidden_states"}
    assert take_cut_parts(received) == []


def test_parts_that_overlap_are_refused():
    assembly = CutAssembly(num_model_layers=3, sends_on=False)
    assembly.add(CutPart("a", 0, (4, 4)))
    with pytest.raises(AssertionError, match="overlapping"):
        assembly.add(CutPart("a", 1, (4, 4, 4)), row("a"))
