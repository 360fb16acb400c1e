#!/usr/bin/env bash
# Standard benchmark, order 1, MiniLM backbone: seqlora, replay and rkif with the same sizes and seed.
# Resumable: rerunning continues each method after its last finished task.
# Usage: bash benchmarks/harness.sh [method ...]
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=benchmarks/results/standard_o1
for m in "${@:-seqlora replay rkif}"; do
  for method in $m; do
    .venv/bin/rkif run --method "$method" --benchmark standard --order 1 --epochs 1 \
      --train-size 500 --test-size 300 --batch-size 8 --lr 1e-3 --seed 42 \
      --output "$OUT/$method" --resume
  done
done
.venv/bin/rkif report "$OUT"/*/ --out "$OUT"
