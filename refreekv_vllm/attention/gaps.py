"""Attention metadata of a layer whose requests skip their released gap blocks.

A request's block-table row for the layer is compacted (the gap's entries removed, later blocks
moved forward) and its sequence length shortened by the gap's tokens, so attention reads exactly
the kept blocks. Gaps are whole blocks, so every kept token keeps its offset inside its block.
RoPE positions and slot mappings are untouched: keys were cached already rotated, and new tokens
are written after the prompt, never into a gap.
"""

from vllm.v1.attention.backend import CommonAttentionMetadata


def skip_gaps(metadata: CommonAttentionMetadata, gaps: list[tuple[int, int, int]],
              block_size: int) -> CommonAttentionMetadata:
    """``gaps``: ``(batch_row, first_block, end_block)`` per request with a gap in this layer."""
    host_seq_lens = metadata.seq_lens_cpu_upper_bound
    if host_seq_lens is None:
        raise RuntimeError("ReFreeKV needs host sequence lengths (async speculative decoding "
                           "is not supported)")
    block_table = metadata.block_table_tensor.clone()
    seq_lens = metadata.seq_lens.clone()
    host_seq_lens = host_seq_lens.clone()
    seq_lens_cpu = metadata._seq_lens_cpu
    seq_lens_cpu = None if seq_lens_cpu is None else seq_lens_cpu.clone()
    computed_cpu = metadata._num_computed_tokens_cpu
    computed_cpu = None if computed_cpu is None else computed_cpu.clone()
    for row, first, end in gaps:
        skipped_blocks = end - first
        used_blocks = -(-int(host_seq_lens[row]) // block_size)
        block_table[row, first:used_blocks - skipped_blocks] = (
            block_table[row, end:used_blocks].clone())
        skipped_tokens = skipped_blocks * block_size
        seq_lens[row] -= skipped_tokens
        host_seq_lens[row] -= skipped_tokens
        if seq_lens_cpu is not None:
            seq_lens_cpu[row] -= skipped_tokens
        if computed_cpu is not None:
            computed_cpu[row] -= skipped_tokens
    return metadata.replace(
        block_table_tensor=block_table,
        seq_lens=seq_lens,
        seq_lens_cpu_upper_bound=host_seq_lens,
        _seq_lens_cpu=seq_lens_cpu,
        _num_computed_tokens_cpu=computed_cpu,
        max_seq_len=int(host_seq_lens[:metadata.num_reqs].max()),
    )
