"""``python -m refreekv_vllm.models [default|tiny|qwen-coder]``: prepare a model and print its
directory."""

import argparse
from collections.abc import Callable
from pathlib import Path

from refreekv_vllm.models import prepare_qwen_coder, prepare_smollm2, prepare_tiny_llama

PREPARE: dict[str, Callable[[], Path]] = {
    "default": prepare_smollm2, "tiny": prepare_tiny_llama, "qwen-coder": prepare_qwen_coder}


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m refreekv_vllm.models")
    parser.add_argument("which", nargs="?", default="default", choices=list(PREPARE))
    args = parser.parse_args()
    print(PREPARE[args.which]())


if __name__ == "__main__":
    main()
