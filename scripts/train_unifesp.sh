#!/usr/bin/env bash
# The reference experiment's task on its real data: UNIFESP (either layout: the PNG repack's
# train_df.csv, or Kaggle's train.csv + DICOM tree), the reference's split (single-label rows
# [1, 1200) to train, [1200, 1600) to test), from random weights, on the CPU.
#
#   scripts/train_unifesp.sh DATA_DIR OUT_DIR [best|reference] [TRAINER_FINETUNE_OPTIONS...]
#
#   best       two models trained side by side (one thread each) and merged by `runtime ensemble`
#              (the members' mean cosine similarity): each `trainer finetune --recipe scratch` on
#              the rn-small ResNet CLIP (128 px, the whole image resized to the square) from random
#              initialisations seeds 0 and 1: class-aware loss with label smoothing, AdamW, cosine
#              schedule with warm-up, 110 epochs (98 with --val 0: the same steps), the text
#              tower's token table frozen, augmentation, test-time flip averaging, a moving average
#              of the weights, each member's last epoch; the same 10% of the training rows
#              validate; the test images scored once, at the end. MEMBERS=1: one model with all
#              threads, its epoch chosen on the validation rows (the recipe before this one);
#              MEMBERS=N: N members.
#   reference  `trainer finetune --recipe reference` on the same initialisation (seed 0): what
#              the reference experiment's code did (bare class names, contrastive loss, Adam
#              2e-6, StepLR(10, 0.1), 50 epochs, last epoch).
#
# INIT=DIR starts member 0 from DIR (a trainer init folder, a checkpoint or a run folder: e.g. the
# MedNIST-pretrained model of scripts/pretrain_mednist.sh) instead of random weights (seed 0).
#
# Writes OUT_DIR/init (random weights, seed 0; init1, ... for further members), OUT_DIR/run
# (checkpoints, metrics.csv, curves.png; run1, ...), OUT_DIR/uncalibrated (the exported bundle; with
# MEMBERS > 1 the ensemble of OUT_DIR/member0, member1, ..., each member's own bundle), OUT_DIR/bundle (it
# calibrated by scripts/calibrate_unifesp.sh: temperature on the validation rows, "unknown" below
# a cosine to the nearest class centroid chosen on MedNIST's CT/MRI training images, MEDNIST=DIR,
# default ../shared/data/mednist; it answers "unknown" out of the box), OUT_DIR/eval (runtime eval
# of the calibrated bundle on the test images, MedNIST's CT/MRI test images as out-of-distribution:
# report.json, report.md, confusion.csv, confusion.png, reliability.png, coverage.png) and
# OUT_DIR/summary.json, and prints the table. OUT_DIR must lie outside the repository (the images'
# licence is unknown: no model trained on them is committed). An existing OUT_DIR is refused unless
# FORCE=1. Options after the recipe go to every `trainer finetune` and win over the recipe's (e.g.
# `--val 0`: all 1199 rows, the last epoch; then there are no validation rows to calibrate on, and
# OUT_DIR/eval scores OUT_DIR/uncalibrated).
set -euo pipefail
if [ $# -lt 2 ]; then
  sed -n '2,37p' "$0" | sed 's/^# \{0,1\}//' >&2
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
if [ -n "${INIT:-}" ]; then
  [ -d "$INIT" ] || { echo "error: INIT=$INIT is not a folder (a trainer init folder, checkpoint or run folder)" >&2; exit 2; }
  INIT="$(cd "$INIT" && pwd)"
fi
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

MEMBERS="${MEMBERS:-2}"
case "$MEMBERS" in
  [1-9]) ;;
  *) echo "error: MEMBERS must be 1 to 9, not $MEMBERS" >&2; exit 2 ;;
esac
[ "$RECIPE" = reference ] && MEMBERS=1
# Member 0's files are init, run, train.log, time.txt; member i's init<i>, run<i>, ...
suffix() { [ "$1" = 0 ] || echo "$1"; }
# Whether the options after the recipe include $1 (followed by a space or "=").
given() { case " ${EXTRA[*]-} " in *" $1"[\ =]*) return 0 ;; *) return 1 ;; esac; }
RECIPE_OPTS=()
if [ "$RECIPE" = best ]; then
  # --recipe scratch's 110 epochs of 34 steps (1079 rows, the rest validating) were what was
  # validated; with --val 0 an epoch is 38 steps, so 98 epochs are the same 3724 steps.
  given "--val 0" && ! given --epochs && RECIPE_OPTS+=(--epochs 98)
fi
if [ "$MEMBERS" -gt 1 ]; then
  # Side by side, one core each: small convolutions use a second core poorly (two one-thread
  # runs do 1.3-1.4 times the images per second of one two-thread run).
  THREADS=1
  # Each member keeps its last epoch: with the weight average the last epoch is the model, and
  # choosing each member's epoch alone did worse on the validation rows.
  given --select || RECIPE_OPTS+=(--select last)
fi
for ((i = 0; i < MEMBERS; i++)); do
  [ "$i" = 0 ] && [ -n "${INIT:-}" ] && continue
  "$BIN/trainer" init --config rn-small --seed "$i" --out "$OUT/init$(suffix "$i")" "${F[@]}"
done
START=$(date +%s)
PIDS=()
for ((i = 0; i < MEMBERS; i++)); do
  s="$(suffix "$i")"
  MODEL="$OUT/init$s"
  [ "$i" = 0 ] && [ -n "${INIT:-}" ] && MODEL="$INIT"
  EXPORT="$OUT/uncalibrated"; NAME="unifesp-$RECIPE"
  if [ "$MEMBERS" -gt 1 ]; then EXPORT="$OUT/member$i"; NAME="unifesp-$RECIPE-member$i"; fi
  CMD=(/usr/bin/time -v -o "$OUT/time$s.txt"
    "$BIN/trainer" finetune --dataset unifesp --data "$DATA" --recipe "$TRAINER_RECIPE"
    --model "$MODEL" --out "$OUT/run$s" --export "$EXPORT" --name "$NAME"
    --device cpu --threads "$THREADS" "${RECIPE_OPTS[@]}" "${F[@]}" "${EXTRA[@]}")
  if [ "$i" = 0 ]; then
    "${CMD[@]}" > >(tee "$OUT/train$s.log") 2>&1 &
  else
    "${CMD[@]}" > "$OUT/train$s.log" 2>&1 &
  fi
  PIDS+=($!)
done
for ((i = 0; i < MEMBERS; i++)); do
  wait "${PIDS[$i]}" || { echo "error: member $i failed: see $OUT/train$(suffix "$i").log" >&2; exit 1; }
done
if [ "$MEMBERS" -gt 1 ]; then
  for ((i = 1; i < MEMBERS; i++)); do tail -n 2 "$OUT/train$i.log"; done
  MEMBER_DIRS=(); for ((i = 0; i < MEMBERS; i++)); do MEMBER_DIRS+=("$OUT/member$i"); done
  "$BIN/runtime" ensemble "${MEMBER_DIRS[@]}" --out "$OUT/uncalibrated" --name "unifesp-$RECIPE" "${F[@]}"
fi
WALL=$(( $(date +%s) - START ))
# The members ran at the same time: their peaks add up.
PEAK_KB=$(cat "$OUT"/time*.txt | awk -F': ' '/Maximum resident set size/ {s += $2} END {print s}')

if python3 -c 'import json, sys; sys.exit(json.load(open(sys.argv[1]))["val_top1"] is None)' "$OUT/run/best.json"; then
  if [ "$MEMBERS" -gt 1 ]; then
    # The ensemble's own figure on the validation rows (each member's is in its run's best.json).
    "$BIN/runtime" eval --dataset unifesp --data "$DATA" --split val --model "$OUT/uncalibrated" \
      --device cpu --out "$OUT/eval-val" "${F[@]}" > "$OUT/eval-val.log"
  fi
  BIN="$BIN" scripts/calibrate_unifesp.sh "$OUT/uncalibrated" "$DATA" "$OUT/bundle" "$OUT/eval" \
    "${MEDNIST:-$REPO/../shared/data/mednist}" | tee "$OUT/eval.log"
else
  echo "note: the run held out no validation rows (--val 0): nothing to fit a temperature on, so no OUT_DIR/bundle; evaluating OUT_DIR/uncalibrated" >&2
  "$BIN/runtime" eval --dataset unifesp --data "$DATA" --split reference --model "$OUT/uncalibrated" \
    --device cpu --out "$OUT/eval" "${F[@]}" | tee "$OUT/eval.log"
fi

python3 - "$OUT" "$RECIPE" "$WALL" "$PEAK_KB" "$MEMBERS" <<'PY'
import json, sys, pathlib
out, recipe, wall, peak_kb, members = (pathlib.Path(sys.argv[1]), sys.argv[2], int(sys.argv[3]),
                                       int(sys.argv[4]), int(sys.argv[5]))
runs = [out / ("run" if i == 0 else f"run{i}") for i in range(members)]
bests = [json.loads((r / "best.json").read_text()) for r in runs]
report = json.loads((out / "eval" / "report.json").read_text())
tpl = max(report["results"], key=lambda t: t["report"]["top1"])
r = tpl["report"]
val_report = out / "eval-val" / "report.json"
if members == 1:
    val_top1 = bests[0]["val_top1"]
elif val_report.exists():
    val_top1 = max(t["report"]["top1"] for t in json.loads(val_report.read_text())["results"])
else:
    val_top1 = None
summary = {
    "recipe": recipe, "members": members, "train_wall_seconds": wall,
    "train_peak_rss_mib": round(peak_kb / 1024),
    "member_runs": [{"run": str(run), "selected_epoch": b["epoch"], "select": b["select"],
                     "val_top1": b["val_top1"], "trainer_test_top1": b["test_top1"]}
                    for run, b in zip(runs, bests)],
    "val_top1": val_top1, "eval_top1": r["top1"], "eval_macro_f1": r["macro_f1"],
    "eval_images": report["images"],
}
if members == 1:
    summary.update(selected_epoch=bests[0]["epoch"], select=bests[0]["select"],
                   trainer_test_top1=bests[0]["test_top1"])
cal = report.get("calibration")
if cal:
    summary["calibration"] = {k: cal.get(k) for k in (
        "temperature", "ece_uncalibrated", "ece_calibrated", "reject_below", "answered", "top1_answered")}
    if cal.get("ood"):
        summary["calibration"]["ood_unknown"] = cal["ood"]["unknown"]
        summary["calibration"]["ood_auroc"] = cal["ood"]["auroc"]
(out / "summary.json").write_text(json.dumps(summary, indent=1) + "\n")
f4 = lambda v: "-" if v is None else f"{v:.4f}"
print()
print("| model | epoch | val top-1 | test top-1 (trainer) | test top-1 (runtime eval) | macro-F1 | train wall | peak RSS |")
print("| --- | --- | --- | --- | --- | --- | --- | --- |")
if members > 1:
    for i, b in enumerate(bests):
        print(f'| {recipe} member {i} | {b["epoch"]} ({b["select"]}) | {f4(b["val_top1"])} | {f4(b["test_top1"])} | | | | |')
    epochs = ", ".join(str(b["epoch"]) for b in bests)
    print(f'| {recipe}: ensemble of {members} | {epochs} | {f4(val_top1)} | - | {r["top1"]:.4f} '
          f'| {r["macro_f1"]:.4f} | {wall // 60} min {wall % 60} s | {peak_kb // 1024} MiB |')
else:
    b = bests[0]
    print(f'| {recipe} | {b["epoch"]} ({b["select"]}) | {f4(b["val_top1"])} | {b["test_top1"]:.4f} | {r["top1"]:.4f} '
          f'| {r["macro_f1"]:.4f} | {wall // 60} min {wall % 60} s | {peak_kb // 1024} MiB |')
c = summary.get("calibration")
if c:
    print(f"\ncalibrated (T {c['temperature']:.3f}): ECE {c['ece_uncalibrated']:.4f} -> {c['ece_calibrated']:.4f}; "
          f"answered {c['answered']:.4f} of the test images, top-1 {c['top1_answered']:.4f} on them"
          + (f"; MedNIST CT/MRI test answered unknown {c['ood_unknown']:.4f}, AUROC {c['ood_auroc']:.4f}" if "ood_unknown" in c else ""))
print(f"\nper-class precision/recall: {out}/eval/report.md; confusion: {out}/eval/confusion.png; curves: {out}/run/curves.png")
PY
