#!/usr/bin/env bash
# Calibrates a UNIFESP bundle and measures it (issue 14's figures): the temperature fitted on the
# validation rows the model held out of its training rows (`--split val`), the "unknown" rule on
# the cosine to the nearest class centroid (centroids from the rows it trained on), its threshold
# chosen on MedNIST's CT and MRI *training* images (out of distribution for a radiograph model) for
# a false-accept target; then `runtime eval` on the reference's 400 test images with MedNIST's CT
# and MRI *test* images as the out-of-distribution set: ECE before/after, the share answered and
# the top-1 on it, the share of CT/MRI answered "unknown", the AUROC, reliability.png and
# coverage.png.
#
#   scripts/calibrate_unifesp.sh BUNDLE UNIFESP_DIR OUT_BUNDLE EVAL_DIR [MEDNIST_DIR]
#
# TARGET (default 0.02) is the false-accept target. scripts/train_unifesp.sh calls this on the
# bundle it trains. The outputs must lie outside the repository (the images' licence is unknown).
set -euo pipefail
if [ $# -lt 4 ]; then
  sed -n '2,14p' "$0" | sed 's/^# \{0,1\}//' >&2
  exit 2
fi
BUNDLE="$1" DATA="$2" OUT_BUNDLE="$3" EVAL="$4"
REPO="$(cd "$(dirname "$0")/.." && pwd)"
MEDNIST="${5:-$REPO/../shared/data/mednist}"
TARGET="${TARGET:-0.02}"
BIN="${BIN:-$REPO/target/debug}"
F=(); [ "${FORCE:-0}" = 1 ] && F=(--force)
OOD_FIT=() OOD_TEST=()
if [ -d "$MEDNIST/train" ] && [ -d "$MEDNIST/test" ]; then
  for c in AbdomenCT BreastMRI ChestCT HeadCT; do
    OOD_FIT+=(--ood "$MEDNIST/train/$c")
    OOD_TEST+=(--ood "$MEDNIST/test/$c")
  done
else
  echo "warning: no MedNIST at $MEDNIST: the temperature is fitted, but no \"unknown\" rule" >&2
fi

"$BIN/runtime" calibrate "$BUNDLE" --dataset unifesp --data "$DATA" --split val \
  --centroid-split train "${OOD_FIT[@]}" --target-false-accept "$TARGET" \
  --out "$OUT_BUNDLE" --device cpu "${F[@]}"
"$BIN/runtime" eval --dataset unifesp --data "$DATA" --split reference --model "$OUT_BUNDLE" \
  "${OOD_TEST[@]}" --device cpu --out "$EVAL" "${F[@]}"
