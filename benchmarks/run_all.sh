#!/usr/bin/env bash
# Every speed benchmark, side by side against its baseline, at sizes that fit a 2-core CPU in
# about an hour. Each prints its own table; JSON lands in benchmarks/results/.
# On a GPU machine the same scripts run in bf16 (the model loads in bf16 on CUDA by default).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
export HF_HUB_OFFLINE=1 FORGETLESS_PROGRESS=0
mkdir -p benchmarks/results
echo "## scoring: forgetless (default, no prefix, packed) vs plain forward vs batch-1 reference";  $PY benchmarks/bench_score.py --examples 8 24 96
echo "## scoring cost vs sequence length and data size";     $PY benchmarks/bench_score_scale.py
echo "## training step: stm vs sft vs plain HF Trainer";      $PY benchmarks/bench_train.py --batch 4 --length 512 --steps 3 --json benchmarks/results/bench_train.json
echo "## training end to end: forgetless sft / stm, padded / packed / 4 micro-batches vs TRL SFTTrainer"
$PY benchmarks/bench_train_trl.py --repeats 2 --json benchmarks/results/bench_train_trl.json --variants trl-padding-free trl-padded \
  forgetless-sft forgetless-sft-packed forgetless-sft-accum4 forgetless-stm forgetless-stm-packed forgetless-stm-accum4
echo "## generation: continuous batching vs padded generate() batches vs one at a time (~25 min)"
$PY benchmarks/bench_generation.py --per-source 16 --rows 16 32 64 --generate 8 16 32 --out benchmarks/results/bench_generation.json
echo "## multiple choice: packed vs one forward per choice";  $PY benchmarks/bench_mc.py --task hellaswag --items 50
