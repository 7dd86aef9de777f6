"""Deterministic prompts for tests and benchmarks: a passkey hidden in filler text."""

import random

FILLER = ("The grass is green. The sky is blue. The sun is yellow. Here we go. "
          "There and back again. ")


def passkey_prompt(num_filler: int, depth: float, passkey: int) -> str:
    before = int(num_filler * depth)
    return ("There is important info hidden inside a lot of irrelevant text. Find it and "
            "memorize it.\n" + FILLER * before
            + f"The pass key is {passkey}. Remember it. {passkey} is the pass key.\n"
            + FILLER * (num_filler - before)
            + "\nWhat is the pass key? The pass key is")


def mixed_prompts(count: int, seed: int = 0) -> list[str]:
    rng = random.Random(seed)
    lengths = [2, 8, 20, 35, 60, 90]
    return [passkey_prompt(lengths[i % len(lengths)], rng.random(), rng.randrange(10000, 99999))
            for i in range(count)]
