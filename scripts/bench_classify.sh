#!/usr/bin/env bash
# `classify` (this project, whole process) beside the Python stack a user would otherwise write
# (scripts/py_classify.py: PIL + transformers' CLIPImageProcessor + onnxruntime) on the same ONNX
# files, same threads, batches of 16, on a folder of 96 radiograph-sized images (the first 96
# UNIFESP PNGs, 512 px, when ../shared/data/unifesp is there; else 96 generated 512x512 PNGs).
# Models: a ViT-B/32 with random weights exported by the trainer (fp32) and its int8 bundle
# (runtime quantize). Runs alternate; medians of ROUNDS; results in bench-out/classify.json.
#
#   scripts/bench_classify.sh [ROUNDS] [THREADS]
set -euo pipefail
cd "$(dirname "$0")/.."
ROUNDS="${1:-3}"
THREADS="${2:-2}"
CACHE="${XRAY_CLIP_CACHE:-$HOME/.cache/xray-clip}"
PY="$CACHE/py-export/bin/python"
[ -x "$PY" ] || scripts/setup.sh --export-tools >&2
scripts/setup.sh --torch >&2
cargo build -q --release --locked -p runtime --bins
cargo build -q --release --locked -p trainer --bins
BIN="$PWD/target/release"
OUT="$PWD/bench-out"
mkdir -p "$OUT"
if [ ! -d "$OUT/vit-b32-fp32" ]; then
  [ -d "$OUT/vit-b32-init" ] || "$BIN/trainer" init --config vit-b-32 --seed 0 --out "$OUT/vit-b32-init"
  "$BIN/trainer" export --model "$OUT/vit-b32-init" --labels unifesp --name vit-b32-fp32 --out "$OUT/vit-b32-fp32"
fi
[ -d "$OUT/vit-b32-int8" ] || "$BIN/runtime" quantize "$OUT/vit-b32-fp32" --name vit-b32-int8 --out "$OUT/vit-b32-int8"
IMAGES="$OUT/images-96"
if [ ! -d "$IMAGES" ]; then
  mkdir -p "$IMAGES"
  "$PY" - "$IMAGES" <<'PY'
import sys, pathlib
import numpy as np
from PIL import Image
out = pathlib.Path(sys.argv[1])
src = sorted(pathlib.Path("../shared/data/unifesp/images/train").glob("*.png"))[:96]
if len(src) == 96:
    for p in src:  # links, not copies: the images' licence is unknown
        (out / p.name).symlink_to(p.resolve())
else:
    rng = np.random.default_rng(0)
    y, x = np.mgrid[0:512, 0:512]
    for i in range(96):
        a = (128 + 60 * np.sin(x / (9 + i % 7)) * np.cos(y / 13) + rng.normal(0, 12, (512, 512))).clip(0, 255)
        Image.fromarray(a.astype(np.uint8)).save(out / f"synthetic_{i:02d}.png")
PY
fi
"$PY" - "$ROUNDS" "$THREADS" "$BIN" "$OUT" "$IMAGES" "$PY" <<'PY'
import json, subprocess, sys, time, statistics, pathlib
rounds, threads, bin_, out, images, py = int(sys.argv[1]), sys.argv[2], *sys.argv[3:]
runs = {
    "classify fp32": [f"{bin_}/classify", "--model", f"{out}/vit-b32-fp32", "--json", "--device", "cpu", "--threads", threads, "--batch-size", "16", images],
    "classify int8": [f"{bin_}/classify", "--model", f"{out}/vit-b32-int8", "--json", "--device", "cpu", "--threads", threads, "--batch-size", "16", images],
    "python fp32": [py, "scripts/py_classify.py", f"{out}/vit-b32-fp32", images, "--threads", threads],
    "python int8": [py, "scripts/py_classify.py", f"{out}/vit-b32-int8", images, "--threads", threads],
}
times = {k: [] for k in runs}
for _ in range(rounds):
    for k, cmd in runs.items():
        t = time.perf_counter()
        r = subprocess.run(cmd, capture_output=True, text=True)
        dt = time.perf_counter() - t
        if r.returncode != 0 or len(r.stdout.splitlines()) != 96:
            sys.exit(f"{k} failed: {r.stderr[-2000:]}")
        times[k].append(dt)
med = {k: statistics.median(v) for k, v in times.items()}
res = {"images": 96, "threads": int(threads), "rounds": rounds, "median_seconds": med, "all_seconds": times,
       "speedup_fp32_vs_python_fp32": med["python fp32"] / med["classify fp32"],
       "speedup_int8_vs_python_fp32": med["python fp32"] / med["classify int8"],
       "speedup_int8_vs_python_int8": med["python int8"] / med["classify int8"]}
pathlib.Path(out, "classify.json").write_text(json.dumps(res, indent=1) + "\n")
print("| run (96 images, batches of 16, %s threads, whole process) | median wall time | images/s |" % threads)
print("| --- | ---: | ---: |")
for k, v in med.items():
    print(f"| {k} | {v:.2f} s | {96 / v:.1f} |")
print(f"\nclassify vs Python, fp32 file: {res['speedup_fp32_vs_python_fp32']:.2f}x; "
      f"classify int8 vs Python fp32: {res['speedup_int8_vs_python_fp32']:.2f}x; "
      f"classify int8 vs Python on the int8 file: {res['speedup_int8_vs_python_int8']:.2f}x")
PY
