"""``python -m refreekv_vllm.models [default|tiny]``: prepare a model and print its directory."""

import argparse

from refreekv_vllm.models import prepare_smollm2, prepare_tiny_llama


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m refreekv_vllm.models")
    parser.add_argument("which", nargs="?", default="default", choices=["default", "tiny"])
    args = parser.parse_args()
    print(prepare_smollm2() if args.which == "default" else prepare_tiny_llama())


if __name__ == "__main__":
    main()
