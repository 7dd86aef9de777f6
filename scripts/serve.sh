#!/usr/bin/env bash
# Sets up whatever is missing, then starts the OpenAI-compatible server with ReFreeKV on the
# default model (http://127.0.0.1:8000). Any vLLM flag may follow, e.g. --port 8001.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh >&2
exec .venv/bin/refreekv-serve "$@"
