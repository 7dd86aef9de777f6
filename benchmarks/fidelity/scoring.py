"""Per-sample scorers; every one returns a score in [0, 1]."""

from __future__ import annotations

import re
import string
from collections import Counter
from collections.abc import Sequence

_NUMBER = re.compile(r"-?\d[\d,]*(?:\.\d+)?|-?\.\d+")


def values_recalled(output: str, values: Sequence[str]) -> float:
    """Fraction of ``values`` (passkeys, magic numbers) that occur verbatim in ``output``.

    RULER's string-match metric: a truncated key ("375" for 37519) does not count."""
    if not values:
        raise ValueError("no values to look for")
    found = set(re.findall(r"\d+", output))
    return sum(v in found for v in values) / len(values)


def last_number(text: str) -> float | None:
    """The last number in ``text`` ("$1,234.50" -> 1234.5), or None."""
    matches = _NUMBER.findall(text)
    for raw in reversed(matches):
        cleaned = raw.replace(",", "").rstrip(".")
        try:
            return float(cleaned)
        except ValueError:
            continue
    return None


def gsm8k_gold(answer: str) -> float:
    """The reference number after ``####`` in a GSM8K solution."""
    value = last_number(answer.rsplit("####", 1)[-1])
    if value is None:
        raise ValueError(f"no #### answer in {answer!r}")
    return value


def gsm8k_score(output: str, gold: float) -> float:
    """1.0 if the last number of the generation (cut at a next "Question:") equals ``gold``."""
    output = output.split("Question:", 1)[0]
    predicted = last_number(output)
    return float(predicted is not None and abs(predicted - gold) < 1e-6)


def normalize_answer(text: str) -> str:
    """SQuAD normalisation: lower case, no punctuation, no articles, single spaces."""
    text = text.lower()
    text = "".join(ch for ch in text if ch not in set(string.punctuation))
    text = re.sub(r"\b(a|an|the)\b", " ", text)
    return " ".join(text.split())


def token_f1(prediction: str, reference: str) -> float:
    """SQuAD token F1 between normalised bags of words."""
    pred, ref = normalize_answer(prediction).split(), normalize_answer(reference).split()
    if not pred or not ref:
        return float(pred == ref)
    common = sum((Counter(pred) & Counter(ref)).values())
    if common == 0:
        return 0.0
    precision, recall = common / len(pred), common / len(ref)
    return 2 * precision * recall / (precision + recall)
