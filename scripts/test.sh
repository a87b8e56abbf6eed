#!/usr/bin/env bash
# Style checks (ruff, clang-format) and the test suite.
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${VENV:-.venv}
"$VENV/bin/ruff" check .
"$VENV/bin/ruff" format --check .
"$VENV/bin/clang-format" --dry-run --Werror csrc/*.cpp csrc/*.h csrc/*/*.cpp csrc/*/*.cu
"$VENV/bin/python" -m pytest -q -rs tests "$@"
