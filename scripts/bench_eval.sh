#!/usr/bin/env bash
# `runtime eval` with one prompt template against the reference's five, on the same images and a
# ViT-B/32-size bundle with a text encoder (random weights, exported by `trainer export` from the HF
# weights of scripts/make_fixtures.py --full). Images are encoded once; each template adds only text
# encoding and scoring.
#
#   scripts/bench_eval.sh [IMAGES_FOLDER]
set -euo pipefail
cd "$(dirname "$0")/.."
DATA="${1:-../shared/data/mednist/test}"
CACHE="${XRAY_CLIP_CACHE:-$HOME/.cache/xray-clip}"
[ -d bench-out/vit-b32-hf ] || "$CACHE/py/bin/python" scripts/make_fixtures.py --only-full --full bench-out
cargo build -q --release -p trainer -p runtime
B=bench-out/vit-b32-bundle
if [ ! -f "$B/manifest.json" ]; then
  target/release/trainer init --from bench-out/vit-b32-hf --out bench-out/vit-b32-ckpt --force >/dev/null
  labels=$(ls "$DATA" | paste -sd, -)
  target/release/trainer export --model bench-out/vit-b32-ckpt --labels "$labels" --out "$B" --force >/dev/null
fi
for run in one five; do
  if [ $run = one ]; then args=(--template "a X-Ray image of {} part"); else args=(--reference-templates); fi
  start=$(date +%s.%N)
  target/release/runtime eval --dataset folder --data "$DATA" --model "$B" --device cpu --threads 2 "${args[@]}" \
    --out "bench-out/eval-$run" --force > /dev/null
  end=$(date +%s.%N)
  python3 - "$run" "$start" "$end" "bench-out/eval-$run/report.json" <<'PY'
import json, sys
run, start, end, path = sys.argv[1], float(sys.argv[2]), float(sys.argv[3]), sys.argv[4]
r = json.load(open(path))
print(f"{run} template(s): {len(r['results'])} scored, {r['images']} images, wall {end - start:.1f} s "
      f"(encoding {r['encode_seconds']:.1f} s, templates {r['score_seconds']:.2f} s)")
PY
done
