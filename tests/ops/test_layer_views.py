"""Per-layer views (pages without the gap, shortened lengths, page slots) against a plain-Python
reference on fresh random steps: the Triton kernel (interpreted without a GPU) and the PyTorch
path the CPU backend uses."""

import pytest
import torch

from benchmarks.kernels.paged_cases import load_triton_kernels
from refreekv_vllm.ops.layer_views import torch_layer_views, triton_layer_views

HAS_TRITON = load_triton_kernels()
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
BLOCK_SIZE = 4


def random_step(seed: int, num_reqs: int, num_layers: int, max_blocks: int,
                num_block_ids: int, num_tokens: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    seq_lens = torch.randint(1, max_blocks * BLOCK_SIZE + 1, (num_reqs,), generator=g)
    seq_lens[-1] = 0  # a CUDA-graph padding row
    block_table = torch.stack([torch.randperm(num_block_ids - 1, generator=g)[:max_blocks] + 1
                               for _ in range(num_reqs)]).to(torch.int32)
    gaps = torch.zeros(num_reqs, num_layers, 2, dtype=torch.int32)
    for r in range(num_reqs):
        used = -(-int(seq_lens[r]) // BLOCK_SIZE)
        for layer in range(num_layers):
            kind = int(torch.randint(4, (1,), generator=g))
            if kind == 0 or used < 3:
                continue  # no gap
            first = int(torch.randint(1, used - 1, (1,), generator=g))
            end = int(torch.randint(first + 1, used, (1,), generator=g))
            if kind == 3:  # stale: a gap that does not lie inside this sequence
                first, end = used, used + 2
            gaps[r, layer] = torch.tensor([first, end])
    page_map = torch.randperm(num_block_ids * num_layers, generator=g).view(
        num_block_ids, num_layers).to(torch.int32)
    slots = (block_table[torch.randint(num_reqs, (num_tokens,), generator=g),
                         torch.randint(max_blocks, (num_tokens,), generator=g)].long()
             * BLOCK_SIZE + torch.randint(BLOCK_SIZE, (num_tokens,), generator=g))
    slots[::5] = -1  # padding tokens
    return {"block_table": block_table, "seq_lens": seq_lens.to(torch.int32), "gaps": gaps,
            "page_map": page_map, "slots": slots}


def reference(step: dict[str, torch.Tensor]) -> tuple[list, list, list]:
    """Per layer: each request's pages in attention order, its length, each token's slot."""
    block_table, seq_lens, gaps = step["block_table"], step["seq_lens"], step["gaps"]
    page_map, slots = step["page_map"], step["slots"]
    num_layers = page_map.shape[1]
    tables, lengths, layer_slots = [], [], []
    for layer in range(num_layers):
        layer_tables, layer_lengths = [], []
        for r, seq_len in enumerate(seq_lens.tolist()):
            used = -(-seq_len // BLOCK_SIZE)
            first, end = gaps[r, layer].tolist()
            if end * BLOCK_SIZE >= seq_len:
                first = end = 0
            kept = [i for i in range(used) if not first <= i < end]
            layer_tables.append([int(page_map[block_table[r, i], layer]) for i in kept])
            layer_lengths.append(seq_len - (end - first) * BLOCK_SIZE)
        tables.append(layer_tables)
        lengths.append(layer_lengths)
        layer_slots.append([s if s < 0 else int(page_map[s // BLOCK_SIZE, layer]) * BLOCK_SIZE
                            + s % BLOCK_SIZE for s in slots.tolist()])
    return tables, lengths, layer_slots


@pytest.mark.parametrize("backend", [
    "torch",
    pytest.param("triton", marks=pytest.mark.skipif(not HAS_TRITON, reason="no Triton")),
])
@pytest.mark.parametrize(("seed", "num_reqs", "num_layers", "max_blocks", "num_tokens"), [
    (0, 5, 3, 7, 13),
    (1, 9, 4, 70, 300),  # rows longer than one kernel tile, tokens over two programs
    (2, 2, 1, 3, 1),
])
def test_views_match_the_reference(backend, seed, num_reqs, num_layers, max_blocks, num_tokens):
    step = random_step(seed, num_reqs, num_layers, max_blocks, 4 * max_blocks + 8, num_tokens)
    expected_tables, expected_lengths, expected_slots = reference(step)
    device = "cpu" if backend == "torch" else DEVICE
    inputs = {k: v.to(device) for k, v in step.items()}
    max_reqs, max_tokens = num_reqs + 3, num_tokens + 5
    tables = torch.full((num_layers, max_reqs, max_blocks), -9, dtype=torch.int32, device=device)
    lengths = torch.full((num_layers, max_reqs), -9, dtype=torch.int32, device=device)
    slots = torch.full((num_layers, max_tokens), -9, dtype=torch.int64, device=device)
    run = torch_layer_views if backend == "torch" else triton_layer_views
    run(inputs["block_table"], inputs["seq_lens"], inputs["gaps"], inputs["page_map"],
        inputs["slots"], BLOCK_SIZE, tables, lengths, slots)
    tables, lengths, slots = tables.cpu(), lengths.cpu(), slots.cpu()

    assert lengths[:, :num_reqs].tolist() == expected_lengths
    assert slots[:, :num_tokens].tolist() == expected_slots
    for layer in range(num_layers):
        for r, expected in enumerate(expected_tables[layer]):
            assert tables[layer, r, :len(expected)].tolist() == expected
    # Nothing is written past the step's requests and tokens.
    assert (lengths[:, num_reqs:] == -9).all() and (slots[:, num_tokens:] == -9).all()
    assert (tables[:, num_reqs:] == -9).all()
