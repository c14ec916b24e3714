#!/usr/bin/env bash
# The trainer's fp32 ViT-B/32 image encoder beside the strongest Python export of the same weights
# (scripts/hf_export_optimized.py: HF transformers + torch.onnx, then ONNX Runtime's transformer
# optimizer with model types `vit` and `clip`), in one engine (Python onnxruntime, the settings of
# scripts/bench_ort.py), same threads, batch 1 and 16, single runs interleaved across the models in one
# process (10 x ROUNDS at batch 1, 2 x ROUNDS at batch 16), medians. Weights: random ViT-B/32
# (`trainer init --config vit-b-32 --seed 0`). Results in bench-out/export.json.
#
#   scripts/bench_export.sh [ROUNDS] [THREADS]
set -euo pipefail
cd "$(dirname "$0")/.."
ROUNDS="${1:-3}"
THREADS="${2:-2}"
CACHE="${XRAY_CLIP_CACHE:-$HOME/.cache/xray-clip}"
PY="$CACHE/py-export/bin/python"
[ -x "$PY" ] || scripts/setup.sh --export-tools >&2
scripts/setup.sh --torch >&2
cargo build -q --release --locked -p trainer --bins
BIN="$PWD/target/release"
OUT="$PWD/bench-out"
mkdir -p "$OUT"
[ -d "$OUT/vit-b32-init" ] || "$BIN/trainer" init --config vit-b-32 --seed 0 --out "$OUT/vit-b32-init"
[ -d "$OUT/vit-b32-fp32" ] ||
  "$BIN/trainer" export --model "$OUT/vit-b32-init" --labels unifesp --name vit-b32-fp32 --out "$OUT/vit-b32-fp32"
"$PY" scripts/hf_export_optimized.py "$OUT/vit-b32-init" "$OUT/hf-export" \
  --reference "$OUT/vit-b32-fp32/image_encoder.onnx" >"$OUT/hf-export/report.json" 2>"$OUT/hf-export/log.txt" ||
  { cat "$OUT/hf-export/log.txt" >&2; exit 1; }
"$PY" - "$ROUNDS" "$THREADS" "$OUT" <<'PY'
# One process, every session loaded, single runs interleaved model after model: this shared
# machine's speed drifts by 10-15% between runs of separate processes, which would swamp the
# differences between graphs; interleaving gives each model the same drift.
import json, statistics, sys, time
import numpy as np
import onnxruntime as ort
rounds, threads, out = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3]
report = json.load(open(f"{out}/hf-export/report.json"))
models = {"trainer": f"{out}/vit-b32-fp32/image_encoder.onnx", **report["files"]}
so = ort.SessionOptions()
so.intra_op_num_threads = threads
so.inter_op_num_threads = 1
so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
so.add_session_config_entry("session.intra_op.allow_spinning", "0")
so.add_session_config_entry("session.inter_op.allow_spinning", "0")
sessions = {n: ort.InferenceSession(p, so, providers=["CPUExecutionProvider"]) for n, p in models.items()}
summary = {}
for batch, reps in ((1, 10 * rounds), (16, 2 * rounds)):
    x = np.full((batch, 3, 224, 224), 0.1, dtype=np.float32)
    times = {n: [] for n in sessions}
    for rep in range(reps + 2):
        for n, sess in sessions.items():
            t = time.perf_counter()
            sess.run(None, {sess.get_inputs()[0].name: x})
            if rep >= 2:  # two warm-ups
                times[n].append(time.perf_counter() - t)
    for n, v in times.items():
        m = statistics.median(v)
        key = "batch1_ms_per_image" if batch == 1 else "batch16_images_per_s"
        summary.setdefault(n, {})[key] = m * 1e3 if batch == 1 else batch / m
        print(f"batch {batch} {n}: median of {len(v)} runs {m * 1e3:.1f} ms", file=sys.stderr)
python = [n for n in summary if n != "trainer"]
best1 = min(python, key=lambda n: summary[n]["batch1_ms_per_image"])
best16 = max(python, key=lambda n: summary[n]["batch16_images_per_s"])
t = summary["trainer"]
result = {"threads": threads, "runs_batch1": 10 * rounds, "runs_batch16": 2 * rounds,
          "engine": "python onnxruntime " + ort.__version__,
          "models": summary, "best_python_batch1": best1, "best_python_batch16": best16,
          # > 1: the trainer's export is faster than the fastest Python export at that batch size
          "ratio_batch1": summary[best1]["batch1_ms_per_image"] / t["batch1_ms_per_image"],
          "ratio_batch16": t["batch16_images_per_s"] / summary[best16]["batch16_images_per_s"],
          "fused": report["fused"], "min_cosine_vs_trainer_export": report["min_cosine_vs_trainer_export"],
          "max_abs_vs_trainer_export": report["max_abs_vs_trainer_export"]}
json.dump(result, open(f"{out}/export.json", "w"), indent=1)
print(json.dumps(result, indent=1))
PY
