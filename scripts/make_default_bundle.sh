#!/usr/bin/env bash
# Trains the embedded default bundle (models/default) with this project's trainer: a small CLIP
# (preset "small") from random weights on MedNIST's training images, exported without its text encoder
# (a model trained from scratch knows no other words). About 6 minutes on 2 CPU cores.
#
#   scripts/make_default_bundle.sh [EPOCHS] [LR]
set -euo pipefail
cd "$(dirname "$0")/.."
EPOCHS="${1:-6}"
LR="${2:-3e-4}"
DATA="${MEDNIST:-../shared/data/mednist}"
RUN=runs/default-bundle
scripts/setup.sh --torch
cargo build -q --release -p trainer -p runtime
[ -f "$RUN-init/model.safetensors" ] || target/release/trainer init --config small --seed 0 --out "$RUN-init"
target/release/trainer finetune --dataset folder --resume --force --data "$DATA/train" --test-data "$DATA/test" --model "$RUN-init" --out "$RUN" \
  --epochs "$EPOCHS" --lr "$LR" --batch-size 16 --loss class-aware --augment --device cpu --template "a medical image of a {}" \
  --export models/default --no-text-encoder --name xray-clip-default-mednist \
  --bundle-description "Demonstration model: a small CLIP (ViT 4x192, patch 32) trained from random weights on MedNIST's 6 classes. Real use starts from OpenAI's ViT-B/32 weights." \
  --bundle-license "trained on MedNIST (CC BY-SA 4.0; B. J. Erickson, Mayo Clinic, from TCIA, the RSNA Bone Age challenge and the NIH Chest X-ray data set); this bundle is shared under CC BY-SA 4.0" \
  --bundle-notes "not for clinical use; knows only: abdomen CT, breast MRI, chest X-ray, chest CT, hand X-ray, head CT"
target/release/runtime eval --dataset folder --data "$DATA/test" --model models/default --device cpu --out "$RUN-eval" --force
du -sh models/default
