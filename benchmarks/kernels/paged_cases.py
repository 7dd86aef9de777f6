"""Random paged-KV scoring cases and their float64 reference, shared by tests and benchmarks.

A case scatters each request's keys over randomly permuted physical blocks of a vLLM-shaped
per-layer cache (``[num_blocks, num_kv_heads, block_size, 2 * head_size]`` with the FLASH_ATTN
``NHD`` strides or contiguous ``HND``), so kernels must follow block tables and strides.
"""

from __future__ import annotations

import importlib
import os
import sys
from dataclasses import dataclass, field

import torch

from refreekv_vllm.ops import gather_request_keys, key_view_from_flash_kv_cache
from refreekv_vllm.policy.reference import layer_cut

# Two cuts may legitimately differ when the reference ratio between them is this close to T.
TIE_TOLERANCE = 1e-4


INTERPRETER_PROBLEM: str | None = None


def load_triton_kernels() -> bool:
    """Imports the Triton kernels, interpreted when there is no GPU; False without Triton.

    Without a GPU the kernels need ``TRITON_INTERPRET=1`` from before Triton's first import
    (Triton's own ``tl.sum``/``tl.max`` are decorated then). This sets it, which is enough when
    nothing imported Triton yet; if something did (vLLM imports it), ``INTERPRETER_PROBLEM``
    says so and the interpreter tests fail with that message. The root ``tests/conftest.py``
    should set the variable before anything else is imported.
    """
    global INTERPRETER_PROBLEM
    if not torch.cuda.is_available():
        triton_was_imported = "triton" in sys.modules
        os.environ["TRITON_INTERPRET"] = "1"
    from refreekv_vllm.ops.triton_utils import HAS_TRITON

    if not HAS_TRITON:
        return False
    if not torch.cuda.is_available():
        import triton.language.standard as tl_standard

        if type(tl_standard.sum).__name__ != "InterpretedFunction":
            INTERPRETER_PROBLEM = (
                "Triton was imported before TRITON_INTERPRET=1 was set "
                f"(already imported here: {triton_was_imported}); set it in tests/conftest.py "
                "before anything imports triton or vllm"
            )
    importlib.import_module("refreekv_vllm.ops.triton_last_row_scores")
    return True


@dataclass
class PagedCase:
    query: torch.Tensor  # [R, W_MAX, Hq, D]
    kv_cache: torch.Tensor  # [num_blocks, Hkv, block_size, 2 * D] (strided per layout)
    key_cache: torch.Tensor  # [num_blocks, block_size, Hkv, D] view of kv_cache
    block_tables: torch.Tensor  # [R, max_blocks] int32
    prompt_lens: torch.Tensor  # [R] int32
    window_lens: torch.Tensor  # [R] int32
    thresholds: torch.Tensor  # [R] fp32
    num_sink_tokens: int = 4
    agg: str = "max"
    head_agg: str = "mean"
    _refs: dict[int, tuple[int, torch.Tensor]] = field(default_factory=dict, repr=False)

    @property
    def num_reqs(self) -> int:
        return self.query.shape[0]

    @property
    def max_len(self) -> int:
        return int(self.prompt_lens.max())

    def kwargs(self) -> dict:
        return dict(
            query=self.query,
            key_cache=self.key_cache,
            block_tables=self.block_tables,
            prompt_lens=self.prompt_lens,
            window_lens=self.window_lens,
            thresholds=self.thresholds,
            num_sink_tokens=self.num_sink_tokens,
            agg=self.agg,
            # Only the torch backend takes the other head aggregation (the kernels' entry
            # points have no such argument and would refuse the case).
            **({"head_agg": self.head_agg} if self.head_agg != "mean" else {}),
        )

    def window_lse(self) -> torch.Tensor:
        """``[R, W_MAX, Hq]`` fp32 natural-log softmax normaliser of every query row over its
        causal keys (row q of request i sits at position ``n_i - W_MAX + q``), as
        FlashAttention returns it; rows before position 0 get NaN, which no kernel may read."""
        r, w_max, hq, _ = self.query.shape
        hkv = self.key_cache.shape[2]
        scale = self.query.shape[-1] ** -0.5
        lse = torch.full((r, w_max, hq), float("nan"), dtype=torch.float64)
        for i, n in enumerate(self.prompt_lens.tolist()):
            keys = gather_request_keys(self.key_cache, self.block_tables[i], n).double().cpu()
            keys = keys.repeat_interleave(hq // hkv, dim=0)  # [Hq, n, D]
            for q in range(max(0, w_max - n), w_max):
                pos = n - w_max + q
                logits = torch.einsum("hd,hkd->hk", self.query[i, q].double().cpu(),
                                      keys[:, : pos + 1]) * scale  # fmt: skip
                lse[i, q] = torch.logsumexp(logits, dim=-1)
        return lse.float().to(self.query.device)

    def reference(self, i: int) -> tuple[int, torch.Tensor]:
        """float64 ``(cut, ratio)`` of request i from the same stored (rounded) values."""
        if i not in self._refs:
            n = int(self.prompt_lens[i])
            w_max = self.query.shape[1]
            w = max(1, min(int(self.window_lens[i]), w_max))
            keys = gather_request_keys(self.key_cache, self.block_tables[i], n).double()
            self._refs[i] = layer_cut(
                self.query[i, w_max - w :].double(),
                keys,
                num_sink_tokens=self.num_sink_tokens,
                threshold=float(self.thresholds[i]),
                agg=self.agg,
                head_agg=self.head_agg,
            )
        return self._refs[i]


def make_case(
    *,
    lens: list[int],
    num_q_heads: int,
    num_kv_heads: int,
    head_size: int,
    block_size: int = 16,
    dtype: torch.dtype = torch.bfloat16,
    query_dtype: torch.dtype | None = None,
    w_max: int = 1,
    windows: list[int] | None = None,
    thresholds: list[float] | None = None,
    layout: str = "NHD",
    agg: str = "max",
    head_agg: str = "mean",
    num_sink_tokens: int = 4,
    device: str | torch.device = "cpu",
    seed: int = 0,
    spare_blocks: int = 3,
) -> PagedCase:
    """Random case; a per-request drift towards recent keys makes cuts spread over the prompt."""
    gen = torch.Generator().manual_seed(seed)
    r, d = len(lens), head_size
    blocks_per_req = [-(-n // block_size) for n in lens]
    max_blocks = max(blocks_per_req) + 1  # one padding column (vLLM pads with block 0)
    num_blocks = sum(blocks_per_req) + spare_blocks + 1
    u = torch.randn(d, generator=gen)
    u = u / u.norm() * d**0.5
    keys = torch.randn(num_blocks, block_size, num_kv_heads, d, generator=gen)
    block_tables = torch.zeros(r, max_blocks, dtype=torch.int32)
    perm = torch.randperm(num_blocks - 1, generator=gen) + 1  # block 0 stays unused padding
    used = 0
    for i, n in enumerate(lens):
        ids = perm[used : used + blocks_per_req[i]]
        used += blocks_per_req[i]
        block_tables[i, : len(ids)] = ids.to(torch.int32)
        steep = float(torch.rand(1, generator=gen)) * 8.0
        drift = torch.linspace(0, steep, max(n, 1))
        flat = keys[ids.long()].reshape(-1, num_kv_heads, d)
        flat[:n] += drift[:, None, None] * u / d**0.5
        keys[ids.long()] = flat.reshape(len(ids), block_size, num_kv_heads, d)
    if layout == "NHD":  # FLASH_ATTN default: memory (nb, bs, H, 2D), logical (nb, H, bs, 2D)
        mem = torch.randn(num_blocks, block_size, num_kv_heads, 2 * d, generator=gen)
        mem[..., :d] = keys
        kv_cache = mem.to(dtype).to(device).permute(0, 2, 1, 3)
    elif layout == "HND":
        mem = torch.randn(num_blocks, num_kv_heads, block_size, 2 * d, generator=gen)
        mem[..., :d] = keys.transpose(1, 2)
        kv_cache = mem.to(dtype).to(device)
    else:
        raise ValueError(layout)
    query = torch.randn(r, w_max, num_q_heads, d, generator=gen) * 0.5 + u / 2
    windows = windows if windows is not None else [w_max] * r
    thresholds = thresholds if thresholds is not None else [0.01] * r
    return PagedCase(
        query=query.to(query_dtype or dtype).to(device),
        kv_cache=kv_cache,
        key_cache=key_view_from_flash_kv_cache(kv_cache),
        block_tables=block_tables.to(device),
        prompt_lens=torch.tensor(lens, dtype=torch.int32, device=device),
        window_lens=torch.tensor(windows, dtype=torch.int32, device=device),
        thresholds=torch.tensor(thresholds, dtype=torch.float32, device=device),
        num_sink_tokens=num_sink_tokens,
        agg=agg,
        head_agg=head_agg,
    )


def flash_attention_lse(rows: torch.Tensor, rows_per_request: list[int],
                        key_cache: torch.Tensor, value_cache: torch.Tensor,
                        block_tables: torch.Tensor, prompt_lens: torch.Tensor) -> torch.Tensor:
    """``[Hq, len(rows)]`` softmax normalisers vLLM's FlashAttention returns for query ``rows``
    (each request's last rows, concatenated) against its paged keys, causal, as in a prefill.
    Needs a GPU and vLLM's ``vllm_flash_attn``."""
    from vllm.v1.attention.backends.fa_utils import get_flash_attn_version
    from vllm.vllm_flash_attn import flash_attn_varlen_func

    counts = torch.tensor([0, *rows_per_request]).cumsum(0)
    _, lse = flash_attn_varlen_func(
        q=rows, k=key_cache, v=value_cache, out=torch.empty_like(rows),
        cu_seqlens_q=counts.to(dtype=torch.int32, device=rows.device),
        max_seqlen_q=max(rows_per_request), seqused_k=prompt_lens,
        max_seqlen_k=int(prompt_lens.max()), softmax_scale=rows.shape[-1] ** -0.5, causal=True,
        block_table=block_tables, fa_version=get_flash_attn_version() or 3,
        return_softmax_lse=True,
    )  # fmt: skip
    return lse


@dataclass
class Comparison:
    max_rel_err: float = 0.0  # of the kept fraction 1 - ratio(j)
    tie_mismatches: list[str] = field(default_factory=list)  # legitimate threshold ties
    errors: list[str] = field(default_factory=list)  # real disagreements


def compare(case: PagedCase, cuts: torch.Tensor, curve: torch.Tensor | None) -> Comparison:
    """Kernel cuts (and curve ``[R, >= n - m]``) against the float64 reference."""
    out = Comparison()
    m = case.num_sink_tokens
    cuts = cuts.cpu()
    curve = curve.cpu().double() if curve is not None else None
    for i in range(case.num_reqs):
        ref_cut, ratio = case.reference(i)
        ratio = ratio.cpu()
        got = int(cuts[i])
        if curve is not None and ratio.numel():
            kept_ref = 1.0 - ratio
            kept = 1.0 - curve[i, : ratio.numel()]
            rel = ((kept - kept_ref).abs() / kept_ref.clamp_min(1e-6)).max().item()
            out.max_rel_err = max(out.max_rel_err, rel)
        if got == ref_cut:
            continue
        thr = float(case.thresholds[i])
        lo, hi = sorted((got - m, ref_cut - m))
        between = ratio[lo + 1 : hi + 1] if lo >= 0 else ratio.new_empty(0)
        n = int(case.prompt_lens[i])
        msg = f"req {i} (n={n}, T={thr}): kernel cut {got}, reference {ref_cut}"
        if lo >= 0 and between.numel() and bool(((between - thr).abs() <= TIE_TOLERANCE).all()):
            out.tie_mismatches.append(msg)
        else:
            out.errors.append(msg)
    return out
