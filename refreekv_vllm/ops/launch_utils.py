"""Shape-only launch heuristics shared by the Triton and CUDA backends (no kernel imports)."""

from __future__ import annotations

import functools

import torch


def cdiv(a: int, b: int) -> int:
    return -(-a // b)


def align_16_bytes(numel: int) -> int:
    """``numel`` 4-byte elements rounded up to whole 16 bytes. Triton compiles one variant of a
    kernel per alignment of its pointer arguments, so buffers cut from one allocation start on
    such boundaries (else a start that moves with the batch compiles new variants while
    serving)."""
    return cdiv(numel, 4) * 4


def next_power_of_2(x: int) -> int:
    return 1 if x <= 1 else 1 << (x - 1).bit_length()


@functools.lru_cache(maxsize=8)
def _num_sms(device_index: int) -> int:
    return torch.cuda.get_device_properties(device_index).multi_processor_count


def default_chunk_size(
    num_reqs: int,
    num_kv_heads: int,
    max_prompt_len: int,
    device: torch.device,
    largest: int = 1024,
) -> int:
    """Keys per program: the largest power of two from ``largest`` down to 512 that still
    gives >= 4 programs per SM, else 256.

    Larger chunks mean fewer per-program setups and per-chunk statistics for the cut search to
    scan; smaller ones keep the GPU busy when few requests are scored.
    """
    sms = _num_sms(device.index or 0) if device.type == "cuda" else 8
    chunk = largest
    while chunk >= 512:
        if num_reqs * num_kv_heads * cdiv(max_prompt_len, chunk) >= 4 * sms:
            return chunk
        chunk //= 2
    return 256


def check_chunk_size(chunk: int) -> None:
    if chunk < 16 or chunk & (chunk - 1):
        raise ValueError(f"chunk_size must be a power of two >= 16, got {chunk}")
