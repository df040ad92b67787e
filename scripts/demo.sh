#!/usr/bin/env bash
# The README's main command (via `make demo`): prune and evaluate on the embedded default.
set -euo pipefail
cd "$(dirname "$0")/.."
exec .venv/bin/python -m prune.demo "$@"
