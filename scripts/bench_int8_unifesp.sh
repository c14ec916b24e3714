#!/usr/bin/env bash
# int8 against fp32 on a UNIFESP bundle (issue 12's accuracy gate): `runtime quantize` with
# activations quantized at run time (dynamic) and with fixed scales from calibration images
# (`--calibrate`: the reference split's 1199 training rows, linked into a temporary folder, never
# the test rows), each checked on the reference's 400 test images (top-1 agreement, top-1 change,
# embedding cosine), then `classify` speed of the three bundles on those 400 images (2 threads,
# batches of 16, whole processes, ROUNDS alternating rounds, medians).
#
#   scripts/bench_int8_unifesp.sh BUNDLE [UNIFESP_DIR] [ROUNDS]
#
# BUNDLE: an fp32 bundle trained on UNIFESP (scripts/train_unifesp.sh's OUT_DIR/uncalibrated).
# Writes nothing in the repository (the images' licence is unknown); the int8 bundles go to a
# temporary folder, or KEEP=DIR.
set -euo pipefail
if [ $# -lt 1 ]; then
  sed -n '2,13p' "$0" | sed 's/^# \{0,1\}//' >&2
  exit 2
fi
BUNDLE="$(cd "$1" && pwd)"
REPO="$(cd "$(dirname "$0")/.." && pwd)"
DATA="$(cd "${2:-$REPO/../shared/data/unifesp}" && pwd)"
ROUNDS="${3:-3}"
cd "$REPO"
scripts/setup.sh >&2
cargo build -q --release --locked -p runtime --bins
BIN="$REPO/target/release"
WORK="${KEEP:-$(mktemp -d)}"
mkdir -p "$WORK"
[ -n "${KEEP:-}" ] || trap 'rm -rf "$WORK"' EXIT

# The reference split's training rows: single-label rows in file order, [1, 1200).
python3 - "$DATA" "$WORK/train-images" <<'PY'
import csv, pathlib, sys
root, out = pathlib.Path(sys.argv[1]), pathlib.Path(sys.argv[2])
out.mkdir(parents=True, exist_ok=True)
with open(root / "train_df.csv", newline="") as f:
    rows = [r for r in csv.DictReader(f) if len(r["Target"].split()) == 1]
for r in rows[1:1200]:
    src = (root / r["image_path"]).resolve()
    link = out / src.name
    if not link.exists():
        link.symlink_to(src)
print(f"{len(list(out.iterdir()))} training images linked", file=sys.stderr)
PY

CHECK=(--dataset unifesp --data "$DATA" --split reference --device cpu --threads 2 --force)
for kind in dynamic static; do
  OPTS=()
  [ "$kind" = static ] && OPTS=(--calibrate "$WORK/train-images")
  echo "== int8, $kind activation scales"
  "$BIN/runtime" quantize "$BUNDLE" "${OPTS[@]}" "${CHECK[@]}" --name "unifesp-int8-$kind" \
    --out "$WORK/int8-$kind"
done

python3 - "$ROUNDS" "$BIN" "$BUNDLE" "$WORK" "$DATA" <<'PY'
import csv, json, pathlib, statistics, subprocess, sys, time
rounds, bin_, fp32, work, data = int(sys.argv[1]), *sys.argv[2:]
# the 400 test images: single-label rows [1200, 1600)
with open(pathlib.Path(data) / "train_df.csv", newline="") as f:
    rows = [r for r in csv.DictReader(f) if len(r["Target"].split()) == 1]
test = pathlib.Path(work) / "test-images"
test.mkdir(exist_ok=True)
for r in rows[1200:1600]:
    src = (pathlib.Path(data) / r["image_path"]).resolve()
    if not (test / src.name).exists():
        (test / src.name).symlink_to(src)
bundles = {"fp32": fp32, "int8 dynamic": f"{work}/int8-dynamic", "int8 static": f"{work}/int8-static"}
times = {k: [] for k in bundles}
for _ in range(rounds):
    for k, b in bundles.items():
        t = time.perf_counter()
        subprocess.run([f"{bin_}/classify", "--model", b, "--json", "--device", "cpu", "--threads", "2",
                        "--batch-size", "16", str(test)], check=True, stdout=subprocess.DEVNULL)
        times[k].append(time.perf_counter() - t)
print()
print("| bundle | agreement with fp32 | top-1 (400 test images) | classify, median wall (s) | images/s |")
print("| --- | ---: | ---: | ---: | ---: |")
for k, b in bundles.items():
    m = json.loads((pathlib.Path(b) / "manifest.json").read_text())
    q = m.get("quantization") or {}
    c = q.get("check") or {}
    med = statistics.median(times[k])
    top1 = c.get("int8_top1", c.get("fp32_top1"))
    if k == "fp32":
        other = json.loads((pathlib.Path(work) / "int8-dynamic" / "manifest.json").read_text())
        top1 = other["quantization"]["check"]["fp32_top1"]
    agree = "" if k == "fp32" else f'{c["agreement"]:.4f}'
    print(f"| {k} | {agree} | {top1:.4f} | {med:.2f} | {400 / med:.1f} |")
PY
