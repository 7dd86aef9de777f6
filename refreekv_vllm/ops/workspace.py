"""The scoring kernels' scratch: one layout, followed by the Triton and the CUDA backend alike.

One launch scores ``R`` requests of one layer with windows of at most ``W_MAX`` rows, ``Hq``
query heads, and splits each prompt into ``num_chunks`` chunks of ``chunk`` keys. Its flat fp32
workspace holds, in this order:

====================  ==============================  ==========================================
section               shape                           holds
====================  ==============================  ==========================================
``vals``              ``[R, Hq, num_chunks * chunk]``  one row: its logits (log2 units); window:
                                                      r, the squared aggregated probability
``row_max``           ``[R, num_chunks, Hq * W_MAX]``  per chunk, each query row's largest logit
``row_sum``           ``[R, num_chunks, Hq * W_MAX]``  per chunk, each row's sum of ``exp2(logit
                                                      - row_max)``
``row_sum2``          ``[R, num_chunks, Hq]``          one row only: per chunk, the sum of the
                                                      squared terms over non-sink keys
``lse``               ``[R, Hq * W_MAX]``              window only: each row's log-sum-exp (log2)
``chunk_sum``         ``[R, num_chunks, Hq]``          window only: per chunk, the sum of r
====================  ==============================  ==========================================

Query row ``(head, i)`` (window row ``i`` of ``head``) is column ``head * W_MAX + i``. Sections
a launch does not use have no size. Every section starts on a 16-byte boundary: Triton compiles
one variant of a kernel per alignment of its pointers, so sections whose starts moved with the
batch size would compile new variants while serving. The CUDA op receives
:meth:`WorkspaceLayout.offsets`; the Triton launcher slices the same sections, so neither kernel
computes its own layout.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from refreekv_vllm.ops.launch_utils import align_16_bytes, cdiv

SECTIONS = ("vals", "row_max", "row_sum", "row_sum2", "lse", "chunk_sum")


@dataclass(frozen=True)
class WorkspaceLayout:
    """Where each section of one launch's scratch lives (fp32 elements; pure shape arithmetic)."""

    num_chunks: int
    chunk: int
    sizes: tuple[int, ...]
    """Elements of each section of :data:`SECTIONS`, in order."""

    @property
    def n_scratch(self) -> int:
        """Keys per head row of ``vals``."""
        return self.num_chunks * self.chunk

    @property
    def total(self) -> int:
        return self.offsets()[-1]

    def offsets(self) -> list[int]:
        """Start of each section of :data:`SECTIONS`, then the total: what the CUDA op takes."""
        starts = [0]
        for size in self.sizes:
            starts.append(align_16_bytes(starts[-1] + size))
        return starts

    def views(self, workspace: torch.Tensor) -> dict[str, torch.Tensor]:
        """Flat views of the sections this launch uses."""
        assert workspace.dtype == torch.float32 and workspace.is_contiguous()
        assert workspace.numel() >= self.total, (
            f"workspace too small: {workspace.numel()} < {self.total}")
        starts = self.offsets()
        return {name: workspace[start : start + size]
                for name, start, size in zip(SECTIONS, starts, self.sizes, strict=False)
                if size}  # fmt: skip


def workspace_layout(
    num_reqs: int,
    w_max: int,
    num_q_heads: int,
    max_prompt_len: int,
    chunk: int,
) -> WorkspaceLayout:
    """The layout of a launch over prompts of at most ``max_prompt_len`` keys."""
    num_chunks = max(1, cdiv(max_prompt_len, chunk))
    rows = num_q_heads * w_max
    per_head = num_reqs * num_chunks * num_q_heads
    window = w_max > 1
    sizes = (
        num_reqs * num_q_heads * num_chunks * chunk,  # vals
        num_reqs * num_chunks * rows,  # row_max
        num_reqs * num_chunks * rows,  # row_sum
        0 if window else per_head,  # row_sum2
        num_reqs * rows if window else 0,  # lse
        per_head if window else 0,  # chunk_sum
    )
    return WorkspaceLayout(num_chunks=num_chunks, chunk=chunk, sizes=sizes)
