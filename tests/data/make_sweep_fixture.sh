#!/usr/bin/env bash
# Rebuilds tests/data/sweep_fixture (read by notebooks/compare_runs.ipynb and tests/test_notebooks.py): a real
# `lit-sapo sweep` on the tiny random model, 3 gates x 2 seeds x 4 rollouts, with a length reward (the tiny model
# never solves a math problem) and a large lr so the gates act. Keeps the logs and summaries, not the checkpoints.
set -euo pipefail
cd "$(dirname "$0")/../.."
work=$(mktemp -d)
lit-sapo sweep --config tests/data/tiny.yaml --gates sigmoid,softsign,clip --taus 1:1.05 --eps 0.2:0.28 \
    --seeds 0,1 --out "$work" --trainer.max_steps 8 --data.rewards '{"tests.recorders.LengthReward": 1.0}' \
    --data.num_generations 4 --model.optimizer.lr 0.05
out=tests/data/sweep_fixture
rm -rf "$out" && mkdir -p "$out"
cp "$work"/summary.csv "$work"/summary.md "$out"/
for run in "$work"/*/; do
    name=$(basename "$run")
    mkdir -p "$out/$name"
    cp "$run"/logs/version_0/metrics.csv "$out/$name"/
done
rm -rf "$work"
