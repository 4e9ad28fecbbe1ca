#!/usr/bin/env bash
# SAPO under staleness (docs/async.md): sigmoid, erf and softsign at tau 1 / 1.05 with data.max_staleness
# k = 0, 1, 2, the gate study's off-policy overlay, seed 0; then one comparison figure.
# ~2.5 min per run on a 2-core CPU (9 runs); each sweep resumes where it stopped.
#   bash scripts/staleness_study.sh [OUT_DIR]      (default runs/staleness; figures in OUT_DIR/png)
set -euo pipefail
cd "$(dirname "$0")/.."
out=${1:-runs/staleness}
bin=lit-sapo
[ -x .venv/bin/lit-sapo ] && bin=.venv/bin/lit-sapo   # the one `make install` builds
for k in 0 1 2; do
    "$bin" sweep --config configs/quickstart.yaml --config configs/study/offpolicy.yaml \
        --gates sigmoid,erf,softsign --taus 1:1.05 --seeds 0 --out "$out/k$k" \
        --trainer.callbacks.every_n_train_steps 24 --data.max_staleness "$k"
done
# one folder per gate and k (run names carry the k), so that the plot draws 9 lines
rm -rf "$out/all"
for k in 0 1 2; do
    for run in "$out/k$k"/*/; do
        name=$(basename "$run")
        mkdir -p "$out/all/${name%-seed*}-k$k-seed0"
        cp -r "$run"logs "$out/all/${name%-seed*}-k$k-seed0/"   # every metrics.csv (a resumed run has several)
    done
done
"$bin" plot "$out/all" --out "$out/png"
