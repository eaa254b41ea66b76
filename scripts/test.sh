#!/usr/bin/env bash
# The README's test command: set up, lint, then the whole suite (the slow browser run included).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
ruff check .
python -m pytest -q "$@"
