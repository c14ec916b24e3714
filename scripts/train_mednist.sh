#!/usr/bin/env bash
# Real images, real learning: a CLIP of the given preset (default tiny, 0.9 M parameters) from random
# weights, fine-tuned on MedNIST (../shared/data/mednist: 6 classes, 6000 train / 1800 test, 64x64).
# Writes RUN/metrics.csv and RUN/curves.png.
#
#   scripts/train_mednist.sh [PRESET] [EPOCHS] [LR] [RUN]
set -euo pipefail
cd "$(dirname "$0")/.."
PRESET="${1:-tiny}"
EPOCHS="${2:-5}"
LR="${3:-5e-4}"
RUN="${4:-runs/mednist-$PRESET}"
DATA="${MEDNIST:-../shared/data/mednist}"
scripts/setup.sh --torch
cargo build -q --release -p trainer
target/release/trainer init --config "$PRESET" --seed 0 --out "$RUN-init" --force
target/release/trainer finetune --dataset folder --data "$DATA/train" --test-data "$DATA/test" --model "$RUN-init" --out "$RUN" --force \
  --epochs "$EPOCHS" --lr "$LR" --batch-size 16 --device auto --template "a photo of a {}"
cat "$RUN/metrics.csv"
