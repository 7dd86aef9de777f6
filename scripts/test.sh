#!/usr/bin/env bash
# Sets up whatever is missing, then runs the linter and the whole test suite.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
# The observability tests run a real Prometheus server (Debian's package) when it can be had.
if ! command -v prometheus >/dev/null 2>&1 && command -v apt-get >/dev/null 2>&1 \
    && [ "$(id -u)" = 0 ]; then
  (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq \
    --no-install-recommends prometheus) >/dev/null 2>&1 \
    || echo "prometheus could not be installed; its test will be skipped" >&2
fi
.venv/bin/ruff check .
.venv/bin/mypy  # the package and the benchmarks, configured in pyproject.toml
status=0
.venv/bin/python -m pytest -q -rs --durations=20 "$@" || status=$?
if [ "$status" -eq 5 ]; then
  echo "no tests were collected" >&2
  exit 1
fi
exit "$status"
