#!/usr/bin/env bash
# The CPU-scale gate study of docs/gate-study.md: all five gates at the paper's tau 10 / 12 and SAPO's 1 / 1.05
# (clip at eps 0.2 / 0.28), 2 seeds, the off-policy overlay; then the comparison figures and the stress probe.
# ~48 min for the sweep on a 2-core CPU (it resumes where it stopped), ~11 min for the probe.
#   bash scripts/gate_study.sh [OUT_DIR]          (default runs/study; the probe goes to OUT_DIR-probe)
set -euo pipefail
cd "$(dirname "$0")/.."
out=${1:-runs/study}
bin=lit-sapo
[ -x .venv/bin/lit-sapo ] && bin=.venv/bin/lit-sapo   # the one `make install` builds
"$bin" sweep --config configs/quickstart.yaml --config configs/study/offpolicy.yaml \
    --gates sigmoid,erf,arctan,softsign,clip --taus 10:12,1:1.05 --eps 0.2:0.28 --seeds 0,1 --out "$out" \
    --trainer.callbacks.every_n_train_steps 24      # a checkpoint every 3 rollouts (24 optimizer steps)
"$bin" plot "$out" --out "$out/png"
"$bin" probe --config configs/quickstart.yaml --gates sigmoid,erf,arctan,softsign,clip --taus 1:1.05,10:12 \
    --eps 0.2:0.28 --steps 8 --out "$out-probe"
