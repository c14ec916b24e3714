#!/usr/bin/env bash
# Image-encoder and end-to-end throughput: this project's Rust runtime (ort) beside Python
# onnxruntime on the same ONNX file with the same thread count, alternating runs, medians reported.
#
#   scripts/bench.sh [ENCODER.onnx] [THREADS] [ROUNDS]
#
# Default encoder: a full-size ViT-B/32 image encoder with random weights, exported by HF transformers
# + torch.onnx (scripts/make_fixtures.py --full bench-out; needs scripts/setup.sh --dev).
set -euo pipefail
cd "$(dirname "$0")/.."
CACHE="${XRAY_CLIP_CACHE:-$HOME/.cache/xray-clip}"
ENCODER="${1:-$PWD/bench-out/vit_b32_image_encoder.onnx}"
THREADS="${2:-2}"
ROUNDS="${3:-3}"
PY="$CACHE/py/bin/python"
[ -x "$PY" ] || scripts/setup.sh --dev
[ -f "$ENCODER" ] || "$PY" scripts/make_fixtures.py --only-full --full bench-out
ENCODER="$(realpath "$ENCODER")"

# Two folders: MedNIST chest X-rays (64x64 JPEG), and radiograph-sized 16-bit PNGs (1760x1760 and
# 1841x1955, from the real CR DICOMs) that make decoding and resizing cost what they do in practice.
SMALL="$(realpath ../shared/data/mednist/test/CXR 2>/dev/null || true)"
LARGE="$PWD/bench-out/large-png"
scripts/make_large_png.sh "$LARGE"

cargo build -q --release -p runtime --bench throughput 2>/dev/null || true
rust() { cargo bench -q -p runtime --bench throughput -- --encoder "$ENCODER" --threads "$THREADS" "$@" 2>/dev/null | tail -n 1; }
# The same architecture exported by this project's trainer (trainer/tests/export.rs, ignored test
# full_vit_b32_export_matches_tch, writes it from the same HF weights).
OURS="$PWD/bench-out/vit_b32_image_encoder.rust.onnx"
results=()
for r in $(seq "$ROUNDS"); do
  results+=("$(rust --folder "$SMALL" --max-files 64)")
  results+=("$(rust --folder "$LARGE" --max-files 32 --reps 3)")
  results+=("$("$PY" scripts/bench_ort.py "$ENCODER" --threads "$THREADS")")
  if [ -f "$OURS" ]; then
    results+=("$(cargo bench -q -p runtime --bench throughput -- --encoder "$OURS" --threads "$THREADS" 2>/dev/null | tail -n 1 | sed 's/"rust-ort"/"rust-ort, trainer export"/')")
  fi
done
printf '%s\n' "${results[@]}" > bench-out/bench.jsonl
"$PY" - bench-out/bench.jsonl <<'PY'
import json, sys, statistics as st
rows = [json.loads(l) for l in open(sys.argv[1])]
def med(rs, k):
    v = [r[k] for r in rs if k in r]
    return st.median(v) if v else float("nan")
rust = [r for r in rows if r["engine"] == "rust-ort"]
ours = [r for r in rows if r["engine"] == "rust-ort, trainer export"]
small = [r for r in rust if r.get("folder_files") == max(x.get("folder_files", 0) for x in rust)]
large = [r for r in rust if r not in small]
py = [r for r in rows if r["engine"].startswith("python")]
print(f"| engine ({rows[0]['threads']} threads) | batch 1, ms/image | batch 16, images/s | folder, files/s |")
print("| --- | ---: | ---: | ---: |")
print(f"| Python {py[0]['engine']} | {med(py, 'batch1_ms_per_image'):.1f} | {med(py, 'batch16_images_per_s'):.1f} | - |")
print(f"| Rust runtime (ort) | {med(rust, 'batch1_ms_per_image'):.1f} | {med(rust, 'batch16_images_per_s'):.1f} | "
      f"{med(small, 'folder_files_per_s'):.1f} (64x64 JPEG), {med(large, 'folder_files_per_s'):.1f} (~1800x1800 16-bit PNG) |")
if ours:
    print(f"| Rust runtime, graph exported by `trainer export` | {med(ours, 'batch1_ms_per_image'):.1f} | {med(ours, 'batch16_images_per_s'):.1f} | - |")
print()
print(f"decode + preprocess alone, one thread: {med(small, 'decode_preprocess_ms_per_file'):.1f} ms/file (64x64 JPEG), "
      f"{med(large, 'decode_preprocess_ms_per_file'):.1f} ms/file (~1800x1800 16-bit PNG)")
PY
