"""Scoring kernels (Triton, CUDA, torch) against the float64 reference on random paged layouts.

Without a GPU the Triton kernels run under ``TRITON_INTERPRET=1`` with small shapes; with one,
the same cases run natively and the CUDA twin runs too.
"""

import math

import pytest
import torch

from benchmarks.kernels import paged_cases
from benchmarks.kernels.paged_cases import (
    PagedCase,
    compare,
    flash_attention_lse,
    load_triton_kernels,
    make_case,
)
from refreekv_vllm.ops import (
    compute_cuts,
    gather_request_keys,
    key_view_from_flash_kv_cache,
    required_workspace_numel,
)
from refreekv_vllm.ops.workspace import WorkspaceLayout, workspace_layout
from tests.markers import sweep

HAS_TRITON = load_triton_kernels()
CUDA = torch.cuda.is_available()
DEVICE = "cuda" if CUDA else "cpu"
CUDA_MARKS = [pytest.mark.gpu, pytest.mark.skipif(not CUDA, reason="CUDA kernel tests need a GPU")]


def needs_cuda(test):
    for mark in CUDA_MARKS:
        test = mark(test)
    return test


needs_triton = pytest.mark.skipif(not HAS_TRITON, reason="Triton is not installed")

# (group, head_size, dtype, w_max, agg, layout): pairwise cover of the brief's grid.
CONFIGS = [
    (1, 64, torch.bfloat16, 1, "max", "NHD"),
    (2, 128, torch.float16, 1, "mean", "HND"),
    (4, 64, torch.float16, 8, "max", "NHD"),
    (8, 128, torch.bfloat16, 8, "mean", "HND"),
    (4, 128, torch.bfloat16, 32, "max", "HND"),
    (1, 64, torch.bfloat16, 32, "mean", "NHD"),
    (8, 64, torch.float16, 1, "max", "HND"),
    (2, 128, torch.bfloat16, 32, "mean", "NHD"),
    (4, 32, torch.bfloat16, 1, "max", "NHD"),
    (2, 16, torch.float16, 8, "max", "HND"),
    # The default window (64 rows, the most the kernels take), at SmolLM2's and Qwen's GQA.
    (3, 64, torch.bfloat16, 64, "mean", "NHD"),
    (7, 64, torch.float16, 64, "mean", "HND"),
]
# Non-multiples of the block size, n <= m + 1, n = 1, and lengths spanning several chunks.
LENS = [77, 5, 1, 150, 33, 4, 61, 129]


def _run(case: PagedCase, backend: str, **kwargs) -> tuple[torch.Tensor, torch.Tensor]:
    _require_interpreter(backend)
    curve = torch.full((case.num_reqs, case.max_len), -7.0, device=case.query.device)
    cuts = compute_cuts(**case.kwargs(), backend=backend, curve_out=curve,
                        max_prompt_len=case.max_len, **kwargs)  # fmt: skip
    return cuts, curve


def _check(case: PagedCase, cuts: torch.Tensor, curve: torch.Tensor, rtol: float = 1e-3) -> None:
    result = compare(case, cuts, curve)
    if result.tie_mismatches:
        print("threshold ties (allowed):", result.tie_mismatches)
    assert not result.errors, result.errors
    assert result.max_rel_err <= rtol, result.max_rel_err
    # Entries past each request's n - m are left alone.
    for i, n in enumerate(case.prompt_lens.tolist()):
        assert bool((curve[i, max(n - case.num_sink_tokens, 0) :] == -7.0).all())


def _require_interpreter(backend: str) -> None:
    if backend == "triton" and paged_cases.INTERPRETER_PROBLEM:
        pytest.fail(paged_cases.INTERPRETER_PROBLEM)


def _chunk(backend: str) -> int:
    """Small chunks give several per request, so the coarse and fine searches both run."""
    return 32 if backend == "triton" else 64  # CUDA steps over 64 keys


def _case(config, seed, lens=LENS, **kwargs) -> PagedCase:
    group, d, dtype, w_max, agg, layout = config
    hkv = 2 if group < 8 else 1
    windows = [w_max, max(1, w_max // 2), w_max, 1, w_max, w_max, 3, w_max][: len(lens)]
    thresholds = [0.01, 0.05, 0.01, 0.2, 0.0, 0.01, 0.01, 0.03][: len(lens)]
    return make_case(
        lens=lens, num_q_heads=group * hkv, num_kv_heads=hkv, head_size=d, dtype=dtype,
        w_max=w_max, windows=windows, thresholds=thresholds, layout=layout, agg=agg,
        device=DEVICE, seed=seed, **kwargs,
    )  # fmt: skip


def _backends():
    return [
        pytest.param("triton", marks=needs_triton),
        pytest.param("cuda", marks=CUDA_MARKS),
    ]


@pytest.mark.parametrize("backend", _backends())
@pytest.mark.parametrize("config", sweep(CONFIGS, fast=2), ids=lambda c: "-".join(map(str, c)))
def test_kernel_matches_reference(backend, config):
    case = _case(config, seed=CONFIGS.index(config))
    cuts, curve = _run(case, backend, chunk_size=_chunk(backend))
    _check(case, cuts, curve)


@pytest.mark.parametrize("backend", _backends())
@pytest.mark.parametrize("w_max", [1, 8])
def test_block_size_not_a_power_of_two(backend, w_max):
    """Chunks that start inside a block: the kernels' per-chunk block ids cover them."""
    case = make_case(
        lens=[150, 61, 24, 25], num_q_heads=4, num_kv_heads=2, head_size=32, block_size=24,
        w_max=w_max, windows=[w_max, 3, w_max, 1], thresholds=[0.01, 0.05, 0.2, 0.0],
        device=DEVICE, seed=13,
    )  # fmt: skip
    cuts, curve = _run(case, backend, chunk_size=_chunk(backend))
    _check(case, cuts, curve)


# (block_size, chunk_size, key tile): blocks longer than a tile (tiles start inside a block);
# blocks longer than a chunk (chunks start inside a block); one tile holds several blocks.
BLOCK_RUNS = [(64, 128, 16), (64, 32, 16), (16, 64, 32)]


@needs_triton
@pytest.mark.parametrize("w_max", sweep([1, 8]))
@pytest.mark.parametrize("blocks", sweep(BLOCK_RUNS),
                         ids=lambda b: "block{}-chunk{}-tile{}".format(*b))
def test_blocks_and_key_tiles_of_any_relative_size(blocks, w_max):
    from refreekv_vllm.ops.triton_last_row_scores import PassConfig, triton_compute_cuts

    _require_interpreter("triton")
    block_size, chunk, block_n = blocks
    case = make_case(
        lens=[300, 129, 64, 17], num_q_heads=4, num_kv_heads=2, head_size=32,
        block_size=block_size, w_max=w_max, windows=[w_max, 3, w_max, 1],
        thresholds=[0.01, 0.05, 0.2, 0.0], device=DEVICE, seed=17,
    )  # fmt: skip
    curve = torch.full((case.num_reqs, case.max_len), -7.0, device=DEVICE)
    cuts = triton_compute_cuts(
        **case.kwargs(), curve_out=curve, max_prompt_len=case.max_len, chunk_size=chunk,
        config=PassConfig(block_n=block_n),
    )  # fmt: skip
    _check(case, cuts, curve)


@pytest.mark.parametrize("backend", _backends())
def test_many_chunks_and_extreme_thresholds(backend):
    """Many chunks (several coarse tiles), T = 1 keeps only the last token, T = 0 keeps all."""
    case = make_case(
        lens=[20000 if CUDA else 1100, 100, 70], num_q_heads=2, num_kv_heads=1, head_size=16,
        block_size=32, thresholds=[0.01, 1.0, 0.0], device=DEVICE, seed=7,
    )  # fmt: skip
    cuts, curve = _run(case, backend, chunk_size=16 if backend == "triton" else 64)
    _check(case, cuts, curve)
    assert cuts.tolist()[1:] == [99, 4]


@pytest.mark.parametrize("backend", _backends())
def test_fp32_query_with_bf16_cache(backend):
    case = _case((4, 64, torch.bfloat16, 8, "max", "NHD"), seed=3, query_dtype=torch.float32)
    cuts, curve = _run(case, backend, chunk_size=_chunk(backend))
    _check(case, cuts, curve)


WINDOW_CONFIGS = [c for c in CONFIGS if c[3] > 1]

# (chunk_size, keys per middle step, keys per fine tile) of the cut search: several middle
# steps of several tiles; one step of several tiles; one tile per step.
CUT_LEVELS = [(64, 32, 8), (128, 128, 16), (32, 16, 16)]


@needs_triton
@pytest.mark.parametrize("levels", sweep(CUT_LEVELS),
                         ids=lambda c: "chunk{}-sub{}-fine{}".format(*c))
@pytest.mark.parametrize("config", sweep([CONFIGS[2], CONFIGS[6]]),
                         ids=lambda c: "-".join(map(str, c)))
def test_cut_search_levels(config, levels):
    """The cut search narrows chunk -> tile -> position; every split of the levels gives the
    reference's cut and curve."""
    from refreekv_vllm.ops.triton_last_row_scores import PassConfig, triton_compute_cuts

    _require_interpreter("triton")
    chunk, sub_n, fine_n = levels
    case = _case(config, seed=40 + CONFIGS.index(config), lens=[300, 5, 1, 150, 33, 4, 61, 200])
    curve = torch.full((case.num_reqs, case.max_len), -7.0, device=DEVICE)
    cuts = triton_compute_cuts(
        **case.kwargs(), curve_out=curve, max_prompt_len=case.max_len, chunk_size=chunk,
        config=PassConfig(cut_sub_n=sub_n, cut_fine_n=fine_n),
    )  # fmt: skip
    _check(case, cuts, curve)


# (chunk_size, window-pass key tile, sink tokens): one tile per chunk; several tiles per chunk
# with sinks in the first, unmasked tiles in the middle and the window's causal edge in the
# last ones; more sinks than one tile holds; no sinks.
TILE_RUNS = [(32, None, 4), (64, 16, 4), (64, 16, 20), (64, 16, 0)]


@needs_triton
@pytest.mark.parametrize("tiles", sweep(TILE_RUNS),
                         ids=lambda t: "chunk{}-tile{}-sinks{}".format(*t))
@pytest.mark.parametrize("config", sweep(WINDOW_CONFIGS), ids=lambda c: "-".join(map(str, c)))
def test_given_window_lse_replaces_the_first_pass(config, tiles):
    """Window rows' normalisers handed in (as the prefill attention returns them): one pass
    over the keys, same cuts and curve, whichever tiles of a chunk need masks."""
    from refreekv_vllm.ops.triton_last_row_scores import (
        PassConfig,
        make_plan,
        triton_compute_cuts,
    )

    _require_interpreter("triton")
    chunk, block_n, sinks = tiles
    case = _case(config, seed=20 + CONFIGS.index(config), num_sink_tokens=sinks)
    r, w_max, hq, d = case.query.shape
    layout = make_plan(r, w_max, hq, case.key_cache.shape[2], d, case.max_len,
                       case.query.device, chunk_size=chunk).layout  # fmt: skip
    workspace = torch.full((layout.total,), float("nan"), device=DEVICE)
    curve = torch.full((case.num_reqs, case.max_len), -7.0, device=DEVICE)
    cuts = triton_compute_cuts(
        **case.kwargs(), curve_out=curve, max_prompt_len=case.max_len, chunk_size=chunk,
        window_lse=case.window_lse(), config=PassConfig(block_n=block_n), workspace=workspace,
    )  # fmt: skip
    _check(case, cuts, curve)
    _assert_first_pass_skipped(layout, workspace)


def _assert_first_pass_skipped(layout: WorkspaceLayout, workspace: torch.Tensor) -> None:
    """The first pass's statistics were never written: the keys were read once."""
    views = layout.views(workspace)
    for name in ("row_max", "row_sum"):
        assert bool(views[name].isnan().all()), name


@needs_cuda
@pytest.mark.parametrize("config", WINDOW_CONFIGS, ids=lambda c: "-".join(map(str, c)))
def test_cuda_given_window_lse_replaces_the_first_pass(config):
    """The CUDA kernel with the window rows' normalisers handed in: same cuts and curve as the
    reference, and its first pass's statistics (row max and sum) never written."""
    from refreekv_vllm.ops._custom_ops import cuda_compute_cuts

    case = _case(config, seed=40 + CONFIGS.index(config))
    r, w_max, hq, _ = case.query.shape
    chunk = 64
    layout = workspace_layout(r, w_max, hq, case.max_len, chunk)
    workspace = torch.full((layout.total,), float("nan"), device=DEVICE)
    curve = torch.full((case.num_reqs, case.max_len), -7.0, device=DEVICE)
    cuts = cuda_compute_cuts(**case.kwargs(), curve_out=curve, max_prompt_len=case.max_len,
                             chunk_size=chunk, window_lse=case.window_lse(),
                             workspace=workspace)  # fmt: skip
    _check(case, cuts, curve)
    _assert_first_pass_skipped(layout, workspace)


@needs_cuda
def test_flash_attention_lse_feeds_the_window_pass():
    """vLLM's FlashAttention returns the normaliser the window pass expects (base e, scaled
    logits, ``[heads, tokens]``), read from the same paged cache."""
    case = _case((4, 128, torch.bfloat16, 32, "max", "NHD"), seed=31, lens=[300, 77, 1000, 20])
    w_max, n = case.query.shape[1], case.prompt_lens.tolist()
    rows = [min(w_max, length) for length in n]
    q = torch.cat([case.query[i, w_max - k:] for i, k in enumerate(rows)])
    lse = flash_attention_lse(q, rows, case.key_cache, case.kv_cache.transpose(1, 2)[..., 128:],
                              case.block_tables, case.prompt_lens)  # fmt: skip
    assert lse.shape == (case.query.shape[2], q.shape[0])
    window_lse = torch.zeros(case.num_reqs, w_max, case.query.shape[2], device=DEVICE)
    start = 0
    for i, k in enumerate(rows):
        window_lse[i, w_max - k:] = lse[:, start:start + k].T
        start += k
    expected = case.window_lse()
    for i, k in enumerate(rows):
        torch.testing.assert_close(window_lse[i, w_max - k:], expected[i, w_max - k:],
                                   rtol=0, atol=2e-3)  # fmt: skip
    for backend in ("triton", "cuda"):
        curve = torch.full((case.num_reqs, case.max_len), -7.0, device=DEVICE)
        cuts = compute_cuts(**case.kwargs(), backend=backend, curve_out=curve,
                            max_prompt_len=case.max_len, window_lse=window_lse)  # fmt: skip
        _check(case, cuts, curve)


@pytest.mark.parametrize("backend", _backends())
def test_workspace_out_and_default_sizes(backend):
    case = _case((2, 64, torch.float16, 8, "mean", "HND"), seed=11, lens=LENS[:4])
    ref_cuts = _run(case, backend, chunk_size=_chunk(backend))[0]
    out = torch.full((case.num_reqs,), -1, dtype=torch.int32, device=DEVICE)
    _require_interpreter(backend)
    need = required_workspace_numel(
        backend, num_reqs=case.num_reqs, w_max=8, num_q_heads=4, num_kv_heads=2, head_size=64,
        max_prompt_len=case.max_len, device=case.query.device,
    )  # fmt: skip
    workspace = torch.empty(need, dtype=torch.float32, device=DEVICE)  # exactly enough
    for _ in range(2):  # reused scratch must not leak state between launches
        got = compute_cuts(**case.kwargs(), backend=backend, out=out, workspace=workspace,
                           max_prompt_len=case.max_len)  # fmt: skip
        assert got.data_ptr() == out.data_ptr()
        assert got.tolist() == ref_cuts.tolist()
    if backend == "triton":
        with pytest.raises(AssertionError, match="workspace too small"):
            compute_cuts(**case.kwargs(), backend=backend, workspace=workspace[:10])


@pytest.mark.parametrize("backend", _backends())
@pytest.mark.parametrize("w_max", [1, 8])
def test_scratch_follows_the_shared_layout(backend, w_max):
    """Both kernels leave their statistics where ``ops/workspace.py`` puts them: read through
    the layout, every section agrees with the keys and with the sections it was built from."""
    case = _case((2, 32, torch.float16, w_max, "mean", "NHD"), seed=23)
    r, _, hq, d = case.query.shape
    chunk = _chunk(backend)
    layout = workspace_layout(r, w_max, hq, case.max_len, chunk)
    workspace = torch.full((layout.total,), float("nan"), device=DEVICE)
    _require_interpreter(backend)
    compute_cuts(**case.kwargs(), backend=backend, workspace=workspace,
                 max_prompt_len=case.max_len, chunk_size=chunk)  # fmt: skip
    nc, m = layout.num_chunks, case.num_sink_tokens
    views = {name: v.double().cpu() for name, v in layout.views(workspace).items()}
    vals = views["vals"].view(r, hq, layout.n_scratch)
    row_max = views["row_max"].view(r, nc, hq, w_max)
    row_sum = views["row_sum"].view(r, nc, hq, w_max)
    lse_ref = case.window_lse().double().cpu() / math.log(2)  # [R, W_MAX, Hq], log2 units
    hkv = case.key_cache.shape[2]

    def close(got, want):
        torch.testing.assert_close(got, want, rtol=2e-3, atol=2e-3)

    for i, n in enumerate(case.prompt_lens.tolist()):
        w_eff = max(1, min(int(case.window_lens[i]), w_max, n))
        chunks = [(c, c * chunk, min((c + 1) * chunk, n)) for c in range(-(-n // chunk))]
        # Per chunk and row, the running max and sum combine to the row's normaliser.
        for j in range(w_eff):
            per_chunk = torch.stack([row_max[i, c, :, j] + torch.log2(row_sum[i, c, :, j])
                                     for c, _, _ in chunks])  # fmt: skip
            close(_log2sumexp2(per_chunk), lse_ref[i, w_max - w_eff + j])
        if w_max == 1:
            keys = gather_request_keys(case.key_cache, case.block_tables[i], n).double().cpu()
            keys = keys.repeat_interleave(hq // hkv, dim=0)
            logits = torch.einsum("hd,hkd->hk", case.query[i, 0].double().cpu(), keys)
            close(vals[i, :, :n], logits * d**-0.5 / math.log(2))
            row_sum2 = views["row_sum2"].view(r, nc, hq)
            for c, lo, hi in chunks:
                e = torch.exp2(vals[i, :, lo:hi] - row_max[i, c, :, 0, None])
                close(row_sum[i, c, :, 0], e.sum(-1))
                close(row_sum2[i, c], (e[:, max(m - lo, 0):] ** 2).sum(-1))
        else:
            lse = views["lse"].view(r, hq, w_max)
            chunk_sum = views["chunk_sum"].view(r, nc, hq)
            close(lse[i, :, :w_eff], lse_ref[i, w_max - w_eff:].T)
            for c, lo, hi in chunks:
                close(chunk_sum[i, c], vals[i, :, lo:hi].sum(-1))


def _log2sumexp2(x: torch.Tensor) -> torch.Tensor:
    """log2 of the sum of exp2 over the first dimension."""
    return torch.logsumexp(x * math.log(2), 0) / math.log(2)


@pytest.mark.parametrize("w_max", [1, 8])
def test_scratch_sections_start_on_16_bytes(w_max):
    """Odd request, head and chunk counts: every section of the scratch still starts on a
    16-byte boundary (Triton compiles one kernel variant per pointer alignment) and holds its
    whole size before the next one starts."""
    for r, hq, max_len in ((1, 9, 1000), (3, 9, 3000), (5, 15, 5000)):
        layout = workspace_layout(r, w_max, hq, max_len, 1024)
        starts = layout.offsets()
        assert all(start % 4 == 0 for start in starts)
        assert all(b - a >= size for a, b, size in zip(starts, starts[1:], layout.sizes,
                                                                strict=False))
        assert layout.total == starts[-1] < sum(layout.sizes) + 4 * len(layout.sizes)


def test_torch_backend_matches_reference():
    case = _case((4, 64, torch.bfloat16, 8, "mean", "NHD"), seed=5)
    case.query, case.key_cache = case.query.cpu(), case.key_cache.cpu()
    for name in ("block_tables", "prompt_lens", "window_lens", "thresholds"):
        setattr(case, name, getattr(case, name).cpu())
    cuts, curve = _run(case, "torch")
    _check(case, cuts, curve, rtol=1e-5)


@pytest.mark.parametrize("window_agg", ["max", "mean"])
def test_every_head_rule_runs_on_the_torch_backend_only(window_agg):
    case = make_case(lens=LENS, num_q_heads=8, num_kv_heads=2, head_size=32,
                     dtype=torch.float32, w_max=8, windows=[8, 1, 3, 8, 8, 2, 8, 5],
                     thresholds=[0.01, 0.02, 0.005, 0.05, 0.01, 0.01, 0.2, 0.0],
                     agg=window_agg, head_agg="max", seed=11)
    cuts, curve = _run(case, "torch")
    _check(case, cuts, curve, rtol=1e-5)
    mean_rule = compute_cuts(**{**case.kwargs(), "head_agg": "mean"}, backend="torch")
    assert (cuts <= mean_rule).all() and (cuts < mean_rule).any()  # every head keeps more
    for backend in ("triton", "cuda"):
        with pytest.raises(ValueError, match="needs the torch backend"):
            compute_cuts(**case.kwargs(), backend=backend)


@pytest.mark.parametrize("layout", ["NHD", "HND"])
def test_key_view_from_flash_kv_cache(layout):
    case = make_case(lens=[40, 17], num_q_heads=4, num_kv_heads=2, head_size=8, layout=layout)
    kv = case.kv_cache
    if layout == "NHD":
        assert kv.stride()[1] < kv.stride()[2]  # heads inside tokens in memory
    view = key_view_from_flash_kv_cache(kv)
    assert view.shape == (kv.shape[0], kv.shape[2], kv.shape[1], 8)
    assert view.data_ptr() == kv.data_ptr()
    for i, n in enumerate(case.prompt_lens.tolist()):
        keys = gather_request_keys(view, case.block_tables[i], n)
        for pos in (0, n // 2, n - 1):
            blk = int(case.block_tables[i, pos // 16])
            torch.testing.assert_close(keys[:, pos], kv[blk, :, pos % 16, :8], rtol=0, atol=0)
    with pytest.raises(ValueError, match="not 2 \\* head_size"):
        key_view_from_flash_kv_cache(kv, head_size=5)


def test_dispatch_rejects_unknown_backend_and_agg():
    case = make_case(lens=[9], num_q_heads=2, num_kv_heads=1, head_size=8)
    with pytest.raises(ValueError, match="backend must be one of"):
        compute_cuts(**case.kwargs(), backend="numpy")
    with pytest.raises(ValueError, match="agg must be one of"):
        compute_cuts(**{**case.kwargs(), "agg": "sum"}, backend="torch")
    with pytest.raises(ValueError, match="head_agg must be one of"):
        compute_cuts(**{**case.kwargs(), "head_agg": "sum"}, backend="torch")


@needs_cuda
def test_cuda_op_passes_opcheck():
    from refreekv_vllm.ops._custom_ops import load_extension

    load_extension()
    case = _case((4, 64, torch.bfloat16, 8, "max", "NHD"), seed=2, lens=[70, 33])
    cuts = torch.empty(2, dtype=torch.int32, device=DEVICE)
    layout = workspace_layout(2, 8, 8, 96, 64)
    ws = torch.empty(layout.total, device=DEVICE)
    curve = torch.zeros(2, 96, device=DEVICE)
    args = (case.query, case.key_cache, case.block_tables, case.prompt_lens, case.window_lens,
            case.thresholds, cuts, ws, curve, None, 4, 0.125, True, 64, 96,
            layout.offsets())  # fmt: skip
    torch.library.opcheck(
        torch.ops._refreekv_C.compute_cuts.default, args,
        test_utils=("test_schema", "test_faketensor"),
    )  # fmt: skip


@needs_cuda
def test_cuda_op_refuses_bad_block_tables():
    case = _case((4, 64, torch.bfloat16, 1, "max", "NHD"), seed=2, lens=[70, 33])
    with pytest.raises(RuntimeError, match="block_tables must be"):
        compute_cuts(**{**case.kwargs(), "block_tables": case.block_tables.long()},
                     backend="cuda")  # fmt: skip


def _shrunk_sections(offsets: list[int]) -> list[int]:
    return [offsets[0], *(o - 1 for o in offsets[1:-1]), offsets[-1]]


# One test per bad scratch layout: a crash instead of an error then names its case.
@needs_cuda
@pytest.mark.parametrize(("bad_offsets", "message"), [
    pytest.param(_shrunk_sections, "do not fit", id="sections-too-short"),
    pytest.param(lambda offsets: offsets[:-1], "must hold", id="total-missing"),
    pytest.param(lambda offsets: offsets[:-1] + [offsets[-1] + 1], "too small",
                 id="total-above-workspace"),
])  # fmt: skip
def test_cuda_op_refuses_a_scratch_layout_that_does_not_fit(bad_offsets, message):
    """Refused before any launch."""
    from refreekv_vllm.ops._custom_ops import load_extension

    load_extension()
    case = _case((4, 64, torch.bfloat16, 1, "max", "NHD"), seed=2, lens=[70, 33])
    r, w_max, hq, _ = case.query.shape
    layout = workspace_layout(r, w_max, hq, case.max_len, 64)
    cuts = torch.empty(r, dtype=torch.int32, device=DEVICE)
    ws = torch.empty(layout.total, device=DEVICE)
    with pytest.raises(RuntimeError, match=message):
        torch.ops._refreekv_C.compute_cuts(
            case.query, case.key_cache, case.block_tables, case.prompt_lens, case.window_lens,
            case.thresholds, cuts, ws, None, None, 4, 0.125, True, 64, case.max_len,
            bad_offsets(layout.offsets()))  # fmt: skip


@needs_cuda
@pytest.mark.parametrize("backend", _backends())
def test_launch_is_cuda_graph_capturable(backend):
    """With caller-provided out/workspace the launchers neither sync nor allocate."""
    case = _case((4, 64, torch.bfloat16, 8, "max", "NHD"), seed=9)
    out = torch.empty(case.num_reqs, dtype=torch.int32, device=DEVICE)
    workspace = torch.empty(1 << 22, dtype=torch.float32, device=DEVICE)
    kwargs = dict(**case.kwargs(), backend=backend, out=out, workspace=workspace,
                  max_prompt_len=case.max_len)  # fmt: skip
    eager = compute_cuts(**kwargs).clone()
    out.fill_(-1)
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        compute_cuts(**kwargs)
    graph.replay()
    torch.cuda.synchronize()
    assert out.tolist() == eager.tolist()
