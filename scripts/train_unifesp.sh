#!/usr/bin/env bash
# The reference experiment's task on its real data: UNIFESP (either layout: the PNG repack's
# train_df.csv, or Kaggle's train.csv + DICOM tree), the reference's split (single-label rows
# [1, 1200) to train, [1200, 1600) to test), from random weights, on the CPU.
#
#   scripts/train_unifesp.sh DATA_DIR OUT_DIR [best|reference] [TRAINER_FINETUNE_OPTIONS...]
#
#   best       `trainer finetune --recipe scratch` on the rn-small ResNet CLIP (128 px, the whole
#              image resized to the square): class-aware loss with label smoothing, AdamW, cosine
#              schedule with warm-up, augmentation, test-time flip averaging, a moving average of
#              the weights as the model; the epoch chosen on 10% of the training rows; the test
#              images scored once, at the end.
#   reference  `trainer finetune --recipe reference` on the same initialisation: what the reference
#              experiment's code did (bare class names, contrastive loss, Adam 2e-6, StepLR(10, 0.1),
#              50 epochs, last epoch).
#
# Writes OUT_DIR/init (random weights, seed 0), OUT_DIR/run (checkpoints, metrics.csv, curves.png),
# OUT_DIR/uncalibrated (the exported bundle), OUT_DIR/bundle (it calibrated by
# scripts/calibrate_unifesp.sh: temperature on the validation rows, "unknown" below a cosine to the
# nearest class centroid chosen on MedNIST's CT/MRI training images, MEDNIST=DIR, default
# ../shared/data/mednist; it answers "unknown" out of the box), OUT_DIR/eval (runtime eval of the
# calibrated bundle on the test images, MedNIST's CT/MRI test images as out-of-distribution:
# report.json, report.md, confusion.csv, confusion.png, reliability.png, coverage.png) and
# OUT_DIR/summary.json, and prints the table. OUT_DIR must lie outside the repository (the images'
# licence is unknown: no model trained on them is committed). An existing OUT_DIR is refused unless
# FORCE=1. Options after the recipe go to `trainer finetune` and win over the recipe's (e.g.
# `--val 0`: all 1199 rows, the last epoch; then there are no validation rows to calibrate on, and
# OUT_DIR/eval scores OUT_DIR/uncalibrated).
set -euo pipefail
if [ $# -lt 2 ]; then
  sed -n '2,28p' "$0" | sed 's/^# \{0,1\}//' >&2
  exit 2
fi
DATA="$(cd "$1" && pwd)" || { echo "error: no data folder $1" >&2; exit 2; }
RECIPE="${3:-best}"
EXTRA=("${@:4}")
case "$RECIPE" in
  best) TRAINER_RECIPE=scratch ;;
  reference) TRAINER_RECIPE=reference ;;
  *) echo "error: recipe must be best or reference, not $RECIPE" >&2; exit 2 ;;
esac
REPO="$(cd "$(dirname "$0")/.." && pwd)"
mkdir -p "$(dirname "$2")"
OUT="$(cd "$(dirname "$2")" && pwd)/$(basename "$2")"
case "$OUT/" in
  "$REPO"/*) echo "error: OUT_DIR $OUT is inside the repository; put it elsewhere (the data's licence is unknown)" >&2; exit 2 ;;
esac
if [ -e "$OUT" ] && [ "${FORCE:-0}" != 1 ]; then
  echo "error: $OUT exists; remove it or run with FORCE=1 to replace what this script wrote there" >&2
  exit 2
fi
cd "$REPO"
scripts/setup.sh --torch >&2
cargo build -q --locked --workspace --bins
BIN="$REPO/target/debug"
mkdir -p "$OUT"
THREADS="${THREADS:-$(nproc)}"
F=(); [ "${FORCE:-0}" = 1 ] && F=(--force)

"$BIN/trainer" init --config rn-small --seed 0 --out "$OUT/init" "${F[@]}"
START=$(date +%s)
/usr/bin/time -v -o "$OUT/time.txt" \
  "$BIN/trainer" finetune --dataset unifesp --data "$DATA" --recipe "$TRAINER_RECIPE" \
    --model "$OUT/init" --out "$OUT/run" --export "$OUT/uncalibrated" --name "unifesp-$RECIPE" \
    --device cpu --threads "$THREADS" "${F[@]}" "${EXTRA[@]}" 2>&1 | tee "$OUT/train.log"
WALL=$(( $(date +%s) - START ))
PEAK_KB=$(awk -F': ' '/Maximum resident set size/ {print $2}' "$OUT/time.txt")

if python3 -c 'import json, sys; sys.exit(json.load(open(sys.argv[1]))["val_top1"] is None)' "$OUT/run/best.json"; then
  BIN="$BIN" scripts/calibrate_unifesp.sh "$OUT/uncalibrated" "$DATA" "$OUT/bundle" "$OUT/eval" \
    "${MEDNIST:-$REPO/../shared/data/mednist}" | tee "$OUT/eval.log"
else
  echo "note: the run held out no validation rows (--val 0): nothing to fit a temperature on, so no OUT_DIR/bundle; evaluating OUT_DIR/uncalibrated" >&2
  "$BIN/runtime" eval --dataset unifesp --data "$DATA" --split reference --model "$OUT/uncalibrated" \
    --device cpu --out "$OUT/eval" "${F[@]}" | tee "$OUT/eval.log"
fi

python3 - "$OUT" "$RECIPE" "$WALL" "$PEAK_KB" <<'PY'
import json, sys, pathlib
out, recipe, wall, peak_kb = pathlib.Path(sys.argv[1]), sys.argv[2], int(sys.argv[3]), int(sys.argv[4])
best = json.loads((out / "run" / "best.json").read_text())
report = json.loads((out / "eval" / "report.json").read_text())
tpl = max(report["results"], key=lambda t: t["report"]["top1"])
r = tpl["report"]
summary = {
    "recipe": recipe, "train_wall_seconds": wall, "train_peak_rss_mib": round(peak_kb / 1024),
    "selected_epoch": best["epoch"], "select": best["select"], "val_top1": best["val_top1"],
    "trainer_test_top1": best["test_top1"], "eval_top1": r["top1"], "eval_macro_f1": r["macro_f1"],
    "eval_images": report["images"],
}
cal = report.get("calibration")
if cal:
    summary["calibration"] = {k: cal.get(k) for k in (
        "temperature", "ece_uncalibrated", "ece_calibrated", "reject_below", "answered", "top1_answered")}
    if cal.get("ood"):
        summary["calibration"]["ood_unknown"] = cal["ood"]["unknown"]
        summary["calibration"]["ood_auroc"] = cal["ood"]["auroc"]
(out / "summary.json").write_text(json.dumps(summary, indent=1) + "\n")
print()
print(f"| recipe | epoch | val top-1 | test top-1 (trainer) | test top-1 (runtime eval) | macro-F1 | train wall | peak RSS |")
print(f"| --- | --- | --- | --- | --- | --- | --- | --- |")
v = "-" if best["val_top1"] is None else f'{best["val_top1"]:.4f}'
print(f'| {recipe} | {best["epoch"]} ({best["select"]}) | {v} | {best["test_top1"]:.4f} | {r["top1"]:.4f} '
      f'| {r["macro_f1"]:.4f} | {wall // 60} min {wall % 60} s | {peak_kb // 1024} MiB |')
c = summary.get("calibration")
if c:
    print(f"\ncalibrated (T {c['temperature']:.3f}): ECE {c['ece_uncalibrated']:.4f} -> {c['ece_calibrated']:.4f}; "
          f"answered {c['answered']:.4f} of the test images, top-1 {c['top1_answered']:.4f} on them"
          + (f"; MedNIST CT/MRI test answered unknown {c['ood_unknown']:.4f}, AUROC {c['ood_auroc']:.4f}" if "ood_unknown" in c else ""))
print(f"\nper-class precision/recall: {out}/eval/report.md; confusion: {out}/eval/confusion.png; curves: {out}/run/curves.png")
PY
