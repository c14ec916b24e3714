#!/usr/bin/env bash
# A starting point for scripts/train_unifesp.sh from other real data: the rn-small CLIP of the
# UNIFESP recipe (trainer init --config rn-small --seed 0) trained with `--recipe scratch` on
# MedNIST's training images (6 classes, two of them radiographs; 4800 to train, 1200 scored at
# the end: the folder's default split random:0.2:0), all epochs, the last one kept.
#
#   scripts/pretrain_mednist.sh OUT_DIR [EPOCHS] [TRAINER_FINETUNE_OPTIONS...]
#   INIT=OUT_DIR/run scripts/train_unifesp.sh ../shared/data/unifesp /tmp/unifesp-pretrained best
#
# EPOCHS defaults to 10 (66 s each on 2 cores). MEDNIST=DIR (default ../shared/data/mednist).
# Writes OUT_DIR/init (random weights) and OUT_DIR/run (checkpoints, metrics.csv, curves.png).
set -euo pipefail
if [ $# -lt 1 ]; then
  sed -n '2,11p' "$0" | sed 's/^# \{0,1\}//' >&2
  exit 2
fi
REPO="$(cd "$(dirname "$0")/.." && pwd)"
mkdir -p "$(dirname "$1")"
OUT="$(cd "$(dirname "$1")" && pwd)/$(basename "$1")"
EPOCHS="${2:-10}"
EXTRA=("${@:3}")
DATA="${MEDNIST:-$REPO/../shared/data/mednist}"
[ -d "$DATA/train" ] || { echo "error: no MedNIST training folder $DATA/train (set MEDNIST=DIR)" >&2; exit 2; }
if [ -e "$OUT" ] && [ "${FORCE:-0}" != 1 ]; then
  echo "error: $OUT exists; remove it or run with FORCE=1 to replace what this script wrote there" >&2
  exit 2
fi
F=(); [ "${FORCE:-0}" = 1 ] && F=(--force)
cd "$REPO"
scripts/setup.sh --torch >&2
cargo build -q --locked --workspace --bins
BIN="$REPO/target/debug"
mkdir -p "$OUT"
"$BIN/trainer" init --config rn-small --seed 0 --out "$OUT/init" "${F[@]}"
/usr/bin/time -v -o "$OUT/time.txt" "$BIN/trainer" finetune --dataset folder --data "$DATA/train" \
  --recipe scratch --model "$OUT/init" --out "$OUT/run" --epochs "$EPOCHS" --val 0 \
  --device cpu --threads "${THREADS:-$(nproc)}" "${F[@]}" "${EXTRA[@]}" 2>&1 | tee "$OUT/train.log"
