#!/usr/bin/env bash
# Publish a finished recipe run: its report from the current code, then the files anyone needs to re-derive its
# verdicts, copied to benchmarks/results/<name>/, and the re-derivation checked.
#   bash benchmarks/recipes/publish.sh runs/recipes benchmarks/results/recipes
set -euo pipefail
run=${1:?usage: publish.sh RUN_DIR RESULT_DIR}
result=${2:?usage: publish.sh RUN_DIR RESULT_DIR}
py=${PYTHON:-.venv/bin/python}
"$py" -m forgetless.cli report --run-dir "$run" --output-dir "$run/report"
mkdir -p "$result"
cp "$run/report/"{verdicts.md,verdicts.json,items.jsonl.gz,report.md,report.json,retention.json} "$result/"
cp "$run/run_config.json" "$result/"
PYTHONPATH=src "$py" benchmarks/rederive.py "$result"
