"""ReFreeKV policy: the reference cut rule and budget accounting (no engine imports)."""

from refreekv_vllm.policy.budget import (
    block_budget,
    freeable_block_range,
    layer_block_budget,
    layer_paper_budget,
    paper_budget,
)
from refreekv_vllm.policy.reference import (
    AGGREGATIONS,
    cut_from_probs,
    layer_cut,
    request_cuts,
    window_probs,
)

__all__ = [
    "AGGREGATIONS",
    "block_budget",
    "cut_from_probs",
    "freeable_block_range",
    "layer_block_budget",
    "layer_cut",
    "layer_paper_budget",
    "paper_budget",
    "request_cuts",
    "window_probs",
]
