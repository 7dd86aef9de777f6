"""Tensor parallelism in the scoring op: ranks that each hold half of the query heads (and their
KV heads) combine their heads' sums and reach the cut that all heads give on one rank.

Two threads play the two ranks; their all-reduce and broadcast meet at a barrier, so the op runs
exactly as it does between vLLM's tensor-parallel workers."""

import threading

import pytest
import torch

from benchmarks.kernels.paged_cases import make_case
from refreekv_vllm.ops import HeadReduction, torch_compute_cuts


class TwoRanks:
    """Sum and broadcast between two threads (sum in rank order, as a collective would)."""

    def __init__(self) -> None:
        self._barrier = threading.Barrier(2)
        self._slots: list[torch.Tensor | None] = [None, None]

    def reduction(self, rank: int) -> HeadReduction:
        def all_reduce(tensor: torch.Tensor) -> torch.Tensor:
            self._slots[rank] = tensor.clone()
            self._barrier.wait()
            total = self._slots[0] + self._slots[1]
            self._barrier.wait()
            return total

        def broadcast(tensor: torch.Tensor) -> torch.Tensor:
            self._slots[rank] = tensor.clone()
            self._barrier.wait()
            chosen = self._slots[0].clone()
            self._barrier.wait()
            return chosen

        def all_gather(tensor: torch.Tensor) -> torch.Tensor:
            self._slots[rank] = tensor.clone()
            self._barrier.wait()
            gathered = torch.cat([self._slots[0], self._slots[1]])
            self._barrier.wait()
            return gathered

        return HeadReduction(world_size=2, all_reduce=all_reduce, broadcast=broadcast,
                             all_gather=all_gather)


def rank_inputs(case, rank: int) -> dict:
    """Rank ``rank``'s half of the heads: query heads and the KV heads they read."""
    kwargs = case.kwargs()
    hq, hkv = case.query.shape[2], case.key_cache.shape[2]
    kwargs["query"] = case.query[:, :, rank * hq // 2:(rank + 1) * hq // 2]
    kwargs["key_cache"] = case.key_cache[:, :, rank * hkv // 2:(rank + 1) * hkv // 2]
    return kwargs


def split_cuts(case) -> list[list[int]]:
    ranks, results = TwoRanks(), [None, None]

    def run(rank: int) -> None:
        results[rank] = torch_compute_cuts(**rank_inputs(case, rank),
                                           head_reduction=ranks.reduction(rank),
                                           compute_dtype=torch.float64).tolist()

    threads = [threading.Thread(target=run, args=(rank,)) for rank in (0, 1)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=60)
    assert all(result is not None for result in results), "a rank did not finish"
    return results


@pytest.mark.parametrize("head_agg", ["mean", "max"])
@pytest.mark.parametrize("agg", ["max", "mean"])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_two_ranks_reach_the_cuts_of_all_heads(seed, agg, head_agg):
    case = make_case(lens=[37, 200, 513, 96], num_q_heads=8, num_kv_heads=4, head_size=32,
                     dtype=torch.float64, w_max=8, windows=[1, 8, 4, 8],
                     thresholds=[0.01, 0.005, 0.02, 0.01], agg=agg, head_agg=head_agg,
                     seed=seed)
    # Heads that disagree, so that a rank's own heads alone would cut elsewhere.
    case.query[:, :, :4] *= 4.0
    expected = [case.reference(i)[0] for i in range(case.num_reqs)]
    rank0, rank1 = split_cuts(case)
    assert rank0 == rank1 == expected

    local_only = torch_compute_cuts(**rank_inputs(case, 0), compute_dtype=torch.float64)
    assert local_only.tolist() != expected, "the case does not tell a rank's heads from all"
