#!/usr/bin/env bash
# Issue 14's figures on real images, fitted and measured on different images.
#
# 1. The built-in demonstration bundle (MedNIST's 6 classes): temperature and class centroids from
#    half of MedNIST's test images (the test part of split random:0.5:0, 900 images), the "unknown"
#    threshold on the cosine to the nearest class centroid chosen on half of the UNIFESP
#    radiographs of body parts it does not know (single-label rows, all but Chest and Hand; every
#    other row, linked into a temporary folder, never copied into the repository) for a TARGET
#    false-accept rate; then `runtime eval` on the other 900 MedNIST test images with the other
#    half of those radiographs as the out-of-distribution set. Then the same fit with the rule on
#    the calibrated top-1 probability (--reject-score probability), for comparison.
# 2. With a UNIFESP bundle (BUNDLE, e.g. OUT_DIR/uncalibrated of scripts/train_unifesp.sh):
#    scripts/calibrate_unifesp.sh on it (validation rows, MedNIST CT/MRI train -> test).
#
#   scripts/bench_calibration.sh [MEDNIST_DIR] [UNIFESP_DIR] [BUNDLE]
#
# Prints what the commands print; the reports (reliability.png, coverage.png) stay in a temporary
# folder (KEEP=DIR to keep them there instead).
set -euo pipefail
cd "$(dirname "$0")/.."
MEDNIST="$(cd "${1:-../shared/data/mednist}" && pwd)"
UNIFESP="$(cd "${2:-../shared/data/unifesp}" && pwd)"
BUNDLE="${3:-}"
export TARGET="${TARGET:-0.02}"
scripts/setup.sh >&2
cargo build -q --release --locked -p runtime --bin runtime
if [ -n "${KEEP:-}" ]; then
  WORK="$KEEP"; mkdir -p "$WORK"
else
  WORK="$(mktemp -d /tmp/xray-clip-calibration-XXXXXX)"
  trap 'rm -rf "$WORK"' EXIT
fi
python3 - "$UNIFESP" "$WORK" <<'PY'
import csv, os, pathlib, sys
root, work = pathlib.Path(sys.argv[1]), pathlib.Path(sys.argv[2])
halves = [work / "ood-fit", work / "ood-test"]
for h in halves:
    h.mkdir(parents=True, exist_ok=True)
n = 0
for r in csv.DictReader(open(root / "train_df.csv", newline="")):
    t = r["Target"].strip()
    if " " in t or int(t) in (3, 9):  # multi-label rows; Chest and Hand, which the bundle knows
        continue
    src = root / r["image_path"]
    dst = halves[n % 2] / src.name
    if src.exists() and not dst.exists():
        os.symlink(src, dst)
    n += 1
print(f"{n} UNIFESP radiographs of body parts other than chest and hand, in two halves", file=sys.stderr)
PY
BIN=target/release
echo "== demonstration bundle (TARGET $TARGET)"
"$BIN/runtime" calibrate --dataset folder --data "$MEDNIST/test" --split random:0.5:0 \
  --ood "$WORK/ood-fit" --target-false-accept "$TARGET" --out "$WORK/demo" --device cpu --force
"$BIN/runtime" eval --model "$WORK/demo" --dataset folder --data "$MEDNIST/test" --split train \
  --split-spec random:0.5:0 --ood "$WORK/ood-test" --out "$WORK/demo-eval" --device cpu --force | tail -n 2
echo "== demonstration bundle, the rule on the calibrated top-1 probability instead (TARGET $TARGET)"
"$BIN/runtime" calibrate --dataset folder --data "$MEDNIST/test" --split random:0.5:0 \
  --reject-score probability --ood "$WORK/ood-fit" --target-false-accept "$TARGET" \
  --out "$WORK/demo-probability" --device cpu --force | grep '^unknown below'

if [ -n "$BUNDLE" ]; then
  echo "== UNIFESP bundle $BUNDLE (TARGET $TARGET)"
  BIN="$PWD/$BIN" FORCE=1 scripts/calibrate_unifesp.sh "$BUNDLE" "$UNIFESP" "$WORK/unifesp" \
    "$WORK/unifesp-eval" "$MEDNIST"
fi
echo "reports: $WORK/demo-eval${BUNDLE:+ and $WORK/unifesp-eval}"
