#!/bin/bash
# Build the wheel from this checkout, install it into an empty directory, and run the scoring
# kernel tests against that installed copy (on a CUDA machine: its CUDA kernel is compiled from
# the wheel's own sources). torch and vLLM come from the environment of $PYTHON (python3).
set -euo pipefail
cd "$(dirname "$0")/.."
repo=$(pwd)
work=$(mktemp -d)
PYTHON=${PYTHON:-python3}
"$PYTHON" -m pip wheel -q --no-deps --no-build-isolation -w "$work/wheel" .
"$PYTHON" -m pip install -q --no-deps --target "$work/site" "$work"/wheel/refreekv_vllm-*.whl
export PYTHONPATH="$work/site${PYTHONPATH:+:$PYTHONPATH}"
# -P: the checkout's own copy must not shadow the installed one.
"$PYTHON" -P -c "
import sys
import pytest
import refreekv_vllm
print('testing', refreekv_vllm.__file__)
assert refreekv_vllm.__file__.startswith('$work/site/'), 'not the installed wheel'
import torch
if torch.cuda.is_available():
    from refreekv_vllm.ops._custom_ops import load_extension
    load_extension(verbose=False)
    print('CUDA kernel built from the wheel')
sys.exit(pytest.main(['-q', '-p', 'no:cacheprovider', '--import-mode=append',
                      '$repo/tests/ops/test_last_row_scores.py']))
"
